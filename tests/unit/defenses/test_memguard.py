"""MemGuard: the batched faithful solver against a per-row reference, fast vs faithful, Phase II
budget and keyed coin, output invariants, persistence and the CLI."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from random_h import random_weights
from strong_secret import SECRET

from purifier.cli import main as cli_main
from purifier.defenses import load_defense
from purifier.defenses.base import FitData
from purifier.defenses.membership_classifier import LAYER_NAMES, MembershipClassifier
from purifier.defenses.memguard import MemGuard
from purifier.defenses.phase1 import EARLY_EXIT, LOG_FLOOR, MAX_STEPS, STEP, Phase1Solver
from purifier.defenses.phase1_faithful import C3_LEVELS, TorchMLP, faithful_phase1
from purifier.errors import ArtifactError, ConfigError, DefenseError, InvalidProbabilities

UNIT_EPOCHS = 20  # short Adam training keeps this file fast; the original schedule is in fit_cli


@pytest.fixture(scope="module")
def fit_data(digits_target):
    return FitData.from_target(digits_target)


@pytest.fixture(scope="module")
def memguard(fit_data):
    return MemGuard(epsilon=1.0, epochs=UNIT_EPOCHS, optimizer="adam", secret=SECRET).fit(fit_data)


@pytest.fixture(scope="module")
def rows(fit_data):
    """200 real target outputs: 100 members, 100 reference non-members."""
    return np.r_[fit_data.member_probs[:100], fit_data.reference_probs[:100]]


def random_classifier(n_classes, seed=0):
    """A real (untrained, seeded) 256-128-64-1 classifier for class counts no target has here."""
    return MembershipClassifier(random_weights(n_classes, seed))


def bare_memguard(n_classes, epsilon=1.0, mode="fast", seed=0):
    mg = MemGuard(epsilon=epsilon, mode=mode, secret=SECRET)
    mg.classifier = random_classifier(n_classes, seed)
    mg.n_classes, mg.model_id = n_classes, "f" * 64
    return mg


def dirichlet(n, c, seed=0, alpha=0.3):
    return np.random.default_rng(seed).dirichlet(np.full(c, alpha), size=n)


# --- Phase I --------------------------------------------------------------------------------

def reference_faithful_row(h, p):
    """The original algorithm for one row, written plainly with torch autograd (an independent
    check of the batched solver and of its hand-written gradient)."""
    h = TorchMLP(h)
    order = np.argsort(p, kind="stable")
    s_sorted = p[order]
    top = int(np.argmax(s_sorted))
    e0 = torch.tensor(np.log(np.maximum(s_sorted, LOG_FLOOR)))
    anchor = torch.softmax(e0, 0)
    h0 = float(h.logit(anchor[None])[0])
    if abs(1 / (1 + np.exp(-h0)) - 0.5) <= EARLY_EXIT:
        return p.copy(), False
    best, ok_any = anchor.numpy().copy(), False
    for c3 in C3_LEVELS:
        e = e0.clone()
        success = False
        for _ in range(MAX_STEPS):
            x = e.clone().requires_grad_(True)
            q = torch.softmax(x, 0)
            out = h.logit(q[None])[0]
            others = torch.cat([x[:top], x[top + 1:]])
            loss = out.abs() + 10 * torch.relu(others.max() - x[top]) + c3 * (q - anchor).abs().sum()
            (g,) = torch.autograd.grad(loss, x)
            e = e - STEP * g / g.norm()
            hn = float(h.logit(torch.softmax(e, 0)[None])[0])
            if int(torch.argmax(e)) == top and hn * h0 <= 0:
                success = True
                break
        if not success:
            break
        best, ok_any = torch.softmax(e, 0).numpy(), True
    out = np.empty_like(p)
    out[order] = best
    return out, ok_any


def test_faithful_batched_equals_per_row_loop(memguard, rows):
    pick = rows[[0, 100, 101]]
    batched, ok = faithful_phase1(memguard.classifier, pick)
    for i in range(len(pick)):
        ref, ref_ok = reference_faithful_row(memguard.classifier, pick[i])
        assert ok[i] == ref_ok
        np.testing.assert_allclose(batched[i], ref, atol=1e-9)
    assert ok.any()  # the comparison is not vacuous


def test_fast_crosses_at_least_as_often_with_no_more_than_5pct_extra_l1(memguard, rows):
    h = memguard.classifier
    pick = rows[::5]  # 40 rows: 20 members, 20 non-members
    slow, slow_ok = faithful_phase1(h, pick)
    fast, fast_ok = Phase1Solver(h)(pick)
    assert slow_ok.sum() > 0.5 * len(pick)
    assert fast_ok.sum() >= slow_ok.sum()
    both = slow_ok & fast_ok
    l1_slow = np.abs(slow - pick).sum(1)[both].mean()
    l1_fast = np.abs(fast - pick).sum(1)[both].mean()
    assert l1_fast <= 1.05 * l1_slow
    # as an attacker sorting the released vector sees it, fast crosses wherever faithful does
    member0 = h.predict_member(pick)
    flipped_fast = h.predict_member(fast) != member0
    flipped_slow = h.predict_member(slow) != member0
    assert flipped_fast.sum() >= flipped_slow.sum() >= 0.9 * slow_ok.sum()
    assert not (flipped_fast & ~fast_ok).any()
    assert (fast.argmax(1) == pick.argmax(1)).all() and (slow.argmax(1) == pick.argmax(1)).all()


# --- Phase II and invariants ---------------------------------------------------------------

def test_expected_l1_within_budget_and_coin_matches_probability(memguard, fit_data):
    mg = MemGuard(epsilon=0.1, epochs=UNIT_EPOCHS, optimizer="adam", secret=SECRET)
    mg.classifier, mg.n_classes, mg.model_id = memguard.classifier, memguard.n_classes, memguard.model_id
    p = np.r_[fit_data.member_probs, fit_data.reference_probs]
    noised, ok = mg.phase1(p)
    prob = mg.release_probability(p, noised, ok)
    dist = np.abs(noised - p).sum(1)
    assert (prob * dist).mean() <= 0.1 + 1e-12  # by construction, row by row
    assert ((prob * dist) <= 0.1 + 1e-12).all()
    out = mg.transform(p)
    released = np.abs(out - p).sum(1) > 1e-12
    # transform releases a row exactly when its keyed coin is below release_probability, on the
    # rows as transform sees them (renormalized)
    q = p / p.sum(1, keepdims=True)
    q_noised, q_ok = mg.phase1(q)
    coin = mg._coin_prf().uniform(q, "memguard-coin")[:, 0]
    release = coin < mg.release_probability(q, q_noised, q_ok)
    assert 0 < release.sum() < len(p)
    np.testing.assert_array_equal(mg._transform(q, None)[0], np.where(release[:, None], q_noised, q))
    n, expected = len(p), prob.sum()
    assert abs(released.sum() - expected) <= 4 * np.sqrt(expected) + 1  # the coin is fair
    assert np.abs(out - p).sum(1).mean() <= 0.1 + 4 * dist.max() * np.sqrt(expected) / n


def test_one_row_answers_are_the_batch_rows_and_follow_epsilon(memguard, fit_data):
    """One-row calls (a kept epsilon array, the PRF's one-row path) answer each row as the batch
    does, and an epsilon changed between calls is the one used."""
    mg = MemGuard(epsilon=0.1, epochs=UNIT_EPOCHS, optimizer="adam", secret=SECRET)
    mg.classifier, mg.n_classes, mg.model_id = memguard.classifier, memguard.n_classes, memguard.model_id
    p = fit_data.reference_probs[:40]
    answers = {}
    for epsilon in (1e-3, 2.0, 1e-3):
        mg.epsilon = epsilon
        batch = mg.transform(p)
        alone = np.concatenate([mg.transform(p[i:i + 1]) for i in range(len(p))])
        assert alone.tobytes() == batch.tobytes()
        assert answers.setdefault(epsilon, batch).tobytes() == batch.tobytes()
    clean = p / p.sum(1, keepdims=True)
    moved = [int((np.abs(answers[e] - clean).sum(1) > 1e-9).sum()) for e in (1e-3, 2.0)]
    assert moved[0] < moved[1]  # a larger budget releases more noised rows


@given(c=st.integers(2, 1000), n=st.sampled_from([1, 2, 7, 64]),
       dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       mode=st.sampled_from(["fast", "faithful"]), seed=st.integers(0, 10_000))
@settings(max_examples=10, deadline=None)
def test_invariants_on_random_dirichlet_rows(c, n, dtype, mode, seed):
    if mode == "faithful":  # the original solver costs seconds on big inputs; the fast one is covered
        c, n = 2 + c % 49, min(n, 7)
    mg = bare_memguard(c, mode=mode, seed=seed % 7)
    p = dirichlet(n, c, seed, alpha=float(np.random.default_rng(seed).choice([0.05, 0.3, 1.0]))).astype(dtype)
    p = (p / p.sum(1, keepdims=True, dtype=np.float64)).astype(dtype)
    out = mg.transform(p)
    assert out.dtype == dtype and out.shape == p.shape
    assert np.isfinite(out).all() and (out >= 0).all()
    assert np.abs(out.sum(1, dtype=np.float64) - 1).max() <= max(1e-6, 4 * c * np.finfo(dtype).eps)
    assert np.array_equal(out.argmax(1), p.argmax(1))
    np.testing.assert_array_equal(mg.transform(p), out)


def test_ties_are_deterministic_and_keep_the_first_index():
    mg = bare_memguard(5, epsilon=10.0)
    p = np.array([[0.3, 0.3, 0.2, 0.1, 0.1], [0.2] * 5, [0.1, 0.35, 0.1, 0.35, 0.1]])
    out = mg.transform(p)
    assert list(out.argmax(1)) == [0, 0, 1]
    np.testing.assert_array_equal(mg.transform(p), out)
    np.testing.assert_array_equal(mg.transform(p[::-1].copy())[::-1], out)


@pytest.mark.parametrize("mode", ["fast", "faithful"])
def test_same_row_same_output_whatever_the_batch(memguard, rows, mode):
    mg = MemGuard(epsilon=0.5, mode=mode, secret=SECRET)
    mg.classifier, mg.n_classes, mg.model_id = memguard.classifier, memguard.n_classes, memguard.model_id
    p = rows[::10 if mode == "fast" else 40].astype(np.float32)
    p = p / p.sum(1, keepdims=True)
    full = mg.transform(p)
    assert (np.abs(full - p).sum(1) > 1e-6).any()  # some rows are noised
    perm = np.random.default_rng(0).permutation(len(p))
    np.testing.assert_array_equal(mg.transform(p[perm]), full[perm])
    for i in (0, len(p) - 1):
        np.testing.assert_array_equal(mg.transform(p[i:i + 1]), full[i:i + 1])
    extra = rows[1::10][:len(p)]
    bigger = np.r_[p, extra.astype(np.float32) / extra.sum(1, keepdims=True).astype(np.float32)]
    np.testing.assert_array_equal(mg.transform(bigger)[:len(p)], full)


def test_coin_is_keyed_by_secret_and_model(memguard, rows):
    noised, ok = memguard.phase1(rows)
    eps = 0.5 * float(np.median(np.abs(noised - rows).sum(1)[ok]))  # below most rows' noise: coins decide
    outs = []
    for secret, model in ((SECRET, "a" * 64), (SECRET + b"!", "a" * 64), (SECRET, "b" * 64)):
        mg = MemGuard(epsilon=eps, secret=secret)
        mg.classifier, mg.n_classes, mg.model_id = memguard.classifier, memguard.n_classes, model
        outs.append(np.abs(mg.transform(rows) - rows).sum(1) > 1e-9)
    assert outs[0].any() and not outs[0].all()
    assert (outs[0] != outs[1]).any() and (outs[0] != outs[2]).any()


def test_large_batch(memguard, fit_data):
    p = np.tile(fit_data.reference_probs, (10, 1))[:2500]  # crosses Phase I's 1,024-row chunks
    out = memguard.transform(p)
    assert out.shape == p.shape and np.array_equal(out.argmax(1), p.argmax(1))
    np.testing.assert_array_equal(out[:300], memguard.transform(p[:300]))
    np.testing.assert_array_equal(out[2000:], memguard.transform(p[2000:]))  # rows (and coins) of later chunks


@pytest.mark.parametrize("mode", ["fast", "faithful"])
def test_phase1_of_no_rows_is_empty(memguard, mode):
    noised, ok = memguard.phase1(np.empty((0, memguard.n_classes)), mode=mode)
    assert noised.shape == (0, memguard.n_classes) and ok.shape == (0,)


# --- errors, persistence, CLI ---------------------------------------------------------------

@pytest.mark.parametrize("bad,msg", [
    (np.array([[0.5, np.nan] + [0.0] * 8]), "row 0 contains NaN"),
    (np.array([[0.1] * 10, [1.2, -0.2] + [0.0] * 8]), "row 1 has negative"),
    (np.array([[0.05] * 10]), "row 0 sums to 0.5"),
    (np.array([[0.5, 0.5]]), "fitted for 10"),
])
def test_bad_input_names_row_and_problem(memguard, bad, msg):
    with pytest.raises(InvalidProbabilities, match=msg):
        memguard.transform(bad)


@pytest.mark.parametrize("kwargs,msg", [
    ({"epsilon": -1.0}, "epsilon"), ({"epsilon": float("nan")}, "epsilon"), ({"mode": "slow"}, "fast, faithful"),
    ({"device": "tpu"}, "cpu, cuda, auto"), ({"optimizer": "rmsprop"}, "sgd, adam"), ({"epochs": 0}, "epochs"),
])
def test_bad_config(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        MemGuard(**kwargs)


def test_missing_secret_and_unfitted(memguard):
    mg = MemGuard()
    mg.classifier, mg.n_classes, mg.model_id = memguard.classifier, 10, memguard.model_id
    with pytest.raises(ConfigError, match="secret"):
        mg.transform(np.full((1, 10), 0.1))
    with pytest.raises(DefenseError, match="not fitted"):
        MemGuard(secret=SECRET).transform(np.full((1, 10), 0.1))


def test_save_load_roundtrip_and_other_model_fails(memguard, rows, tmp_path, digits_target):
    memguard.save(tmp_path / "mg")
    loaded = load_defense(tmp_path / "mg", secret=SECRET, model_id=digits_target.model_id)
    assert isinstance(loaded, MemGuard) and loaded.config() == memguard.config()
    np.testing.assert_array_equal(loaded.transform(rows), memguard.transform(rows))
    with pytest.raises(ArtifactError, match="fitted for model"):
        load_defense(tmp_path / "mg", secret=SECRET, model_id="0" * 64)
    for name in LAYER_NAMES:  # the weights really are what was saved, as plain arrays
        np.testing.assert_array_equal(loaded.classifier.arrays[name], memguard.classifier.arrays[name])


def test_tampered_class_count_fails(memguard, tmp_path):
    import json

    memguard.save(tmp_path / "mg")
    manifest = json.loads((tmp_path / "mg" / "defense.json").read_text())
    manifest["n_classes"] = 11
    (tmp_path / "mg" / "defense.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="11"):
        load_defense(tmp_path / "mg", secret=SECRET)


def test_fit_cli(digits_target, tmp_path, capsys):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_bytes(SECRET)
    rc = cli_main(["fit-defense", "memguard", "--target", str(digits_target.directory), "--out",
                   str(tmp_path / "mg"), "--epsilon", "0.5", "--secret-file", str(secret_file)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "defender classifier accuracy" in text and "noise release rate" in text
    loaded = load_defense(tmp_path / "mg", secret=SECRET, model_id=digits_target.model_id)
    assert loaded.epsilon == 0.5 and loaded.config()["epochs"] == 50
    import json

    report = json.loads((tmp_path / "mg" / "defense.json").read_text())
    assert report["defender_accuracy"]["train_balanced"] > 0.55  # h learned something
    assert report["reference_set"]["realized_mean_l1"] <= 0.5 + 0.1


# --- serving device --------------------------------------------------------------------------

def _onnxruntime_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_sidecar_device_moves_the_fast_solver_and_cuda_without_a_gpu_is_one_line(memguard, rows, tmp_path,
                                                                                 digits_target):
    """`purifier serve --device` reaches the loaded defense: auto without a GPU serves on the CPU,
    the same answers; cuda without a GPU refuses in one line (tests/unit/defenses/test_cuda.py
    runs the GPU side where there is one)."""
    from purifier_server.app import load_configured_defense
    from purifier_server.settings import Settings

    memguard.save(tmp_path / "mg")
    (tmp_path / "secret").write_bytes(SECRET)
    base = {"model": str(digits_target.directory), "defense_dir": str(tmp_path / "mg"),
            "secret_file": str(tmp_path / "secret")}
    auto = load_configured_defense(Settings.resolve({**base, "device": "auto"}, {}), digits_target.model_id)
    assert auto.serve_device == "auto"
    np.testing.assert_array_equal(auto.transform(rows), memguard.transform(rows))
    if _onnxruntime_cuda():
        pytest.skip("onnxruntime here has the CUDA provider: test_cuda.py covers --device cuda")
    with pytest.raises(ConfigError, match="device: cuda was asked for but onnxruntime sees no usable CUDA") as e:
        load_configured_defense(Settings.resolve({**base, "device": "cuda"}, {}), digits_target.model_id)
    assert "\n" not in str(e.value)
