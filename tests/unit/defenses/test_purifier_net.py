"""PURIFIER: torch/ORT parity, output invariants, keyed determinism, repair and budget maths,
the label swapper's index and reach, bad input, and the privacy effect on a real digits target."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strong_secret import SECRET

from purifier.defenses import load_defense
from purifier.defenses.base import FitData, finalize
from purifier.defenses.cvae import torch_reformer
from purifier.defenses.purifier_net import PurifierNet
from purifier.defenses.repair import blend_to_budget, repair_top
from purifier.errors import ArtifactError, ConfigError, DefenseError, InvalidProbabilities
from purifier.evaluation import balanced_accuracy


def dirichlet(n, c, seed=0, alpha=0.3):
    return np.random.default_rng(seed).dirichlet(np.ones(c) * alpha, size=n)


def synthetic_fit_data(c: int, seed: int = 0, n: int = 200) -> FitData:
    rng = np.random.default_rng(seed)
    ym, yr = rng.integers(0, c, n), rng.integers(0, c, n)
    Xm, Xr = rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n, 5)).astype(np.float32)
    return FitData(dirichlet(n, c, seed, 0.1), dirichlet(n, c, seed + 1, 0.5), Xm, Xr, ym, yr, f"synthetic-{c}")


@pytest.fixture(scope="module")
def digits_data(digits_target):
    return FitData.from_target(digits_target)


@pytest.fixture(scope="module")
def fitted(digits_data):
    return PurifierNet(secret=SECRET, seed=0, epochs=100).fit(digits_data)


@pytest.fixture(scope="module")
def swapper(fitted, digits_data):
    return fitted.with_options(label_swap=True).fit_swapper(digits_data)


def norm(p):
    """What `transform` feeds `_transform` (and keys the noise on): float64 rows renormalized."""
    p = p.astype(np.float64)
    return p / p.sum(1, keepdims=True)


_small: dict[int, PurifierNet] = {}


def small_defense(c: int) -> PurifierNet:
    """Briefly trained defenses for several class counts (invariants hold for any weights)."""
    if c not in _small:
        _small[c] = PurifierNet(epochs=3, secret=SECRET).fit(synthetic_fit_data(c))
    return _small[c]


# --- serving graph -------------------------------------------------------------------------------

def test_onnx_matches_torch(fitted):
    p = dirichlet(500, 10, seed=3)
    noise = np.random.default_rng(4).normal(size=(500, fitted.latent_dim))
    ort = fitted._session(p.astype(np.float32), noise.astype(np.float32))
    ref = torch_reformer(fitted.model, p, noise)
    assert np.abs(ort - ref).max() < 1e-5
    zero = np.zeros_like(noise)
    assert np.abs(fitted._session(p.astype(np.float32), zero.astype(np.float32))
                  - torch_reformer(fitted.model, p, zero)).max() < 1e-5


def test_layer_sizes_scale_with_classes():
    from purifier.defenses.cvae import layer_sizes

    assert layer_sizes(10) == (32, 3) and layer_sizes(100) == (200, 12) and layer_sizes(2) == (32, 2)
    assert small_defense(37).latent_dim == 5


# --- invariants ----------------------------------------------------------------------------------

@given(st.sampled_from([2, 3, 10, 37, 100]), st.integers(1, 40),
       st.sampled_from([np.float16, np.float32, np.float64]), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_invariants(c, n, dtype, seed):
    d = small_defense(c)
    p = dirichlet(n, c, seed).astype(dtype)
    p = (p / p.sum(1, keepdims=True, dtype=np.float64)).astype(dtype)
    out = d.transform(p)
    assert out.dtype == dtype and out.shape == p.shape
    assert np.isfinite(out).all() and (out >= 0).all()
    assert np.abs(out.sum(1, dtype=np.float64) - 1).max() < max(1e-3, 8 * c * np.finfo(dtype).eps)
    assert np.array_equal(out.argmax(1), p.argmax(1))
    perm = np.random.default_rng(seed).permutation(n)
    np.testing.assert_array_equal(d.transform(p[perm]), out[perm])  # batch-independent


def test_deterministic_keyed_and_mean_mode(fitted, digits_data):
    p = digits_data.reference_probs[:64]
    out = fitted.transform(p)
    np.testing.assert_array_equal(out, fitted.transform(p.copy()))
    np.testing.assert_array_equal(fitted.transform(p[[7]]), out[[7]])
    other = fitted.with_options(secret=SECRET + b"other")
    assert not np.array_equal(other.transform(p), out)  # noise is keyed by the secret
    mean = fitted.with_options(noise="mean")
    mean.secret = None  # no secret needed without noise
    m = mean.transform(p)
    g = torch_reformer(fitted.model, p, np.zeros((64, fitted.latent_dim))).astype(np.float64)
    g = repair_top(g / g.sum(1, keepdims=True), p.argmax(1))
    np.testing.assert_allclose(m, g, atol=2e-6)
    assert (m != out).any(1).mean() > 0.9  # keyed noise does move the latent


def test_keyed_noise_requires_secret(digits_data):
    with pytest.raises(ConfigError, match="secret"):
        PurifierNet(epochs=1).fit(digits_data)


# --- repair and budget ---------------------------------------------------------------------------

def test_repair_example_and_minimality():
    g = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5]])
    out = repair_top(g, np.array([1, 1, 0]))
    m = 2.0 ** -7
    c = 0.8 / (2 + m)
    np.testing.assert_allclose(out[0], [c, c * (1 + m), 0.2])
    np.testing.assert_array_equal(out[1], g[1])  # already right: untouched
    c = 0.7 / (2 + m)  # 0.2 + (0.5 - c) = c (1 + m); 0.3 stays below c
    np.testing.assert_allclose(out[2], [c * (1 + m), 0.3, c])


@given(st.integers(2, 60), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_repair_properties(c, seed):
    rng = np.random.default_rng(seed)
    g = dirichlet(50, c, seed, alpha=rng.uniform(0.05, 2))
    top = rng.integers(0, c, 50)
    out = repair_top(g, top)
    assert np.array_equal(out.argmax(1), top)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)
    i = np.arange(50)
    level = out[i, top] / (1 + 2.0 ** -7)
    moved = out < g - 1e-15
    # only entries above the level were cut, exactly to the level; k only gained
    assert np.allclose(out[moved], np.broadcast_to(level[:, None], g.shape)[moved])
    assert (out[i, top] >= g[i, top] - 1e-15).all()


def test_budget_blend_is_exact(fitted, digits_data):
    raw = digits_data.member_probs[:200]
    p = norm(raw)
    full = fitted._purify(p)
    d = np.abs(full - p).sum(1)
    eps = float(np.quantile(d, 0.3))  # binding on ~70% of the rows
    out = fitted.with_options(budget=eps).transform(raw)
    l1 = np.abs(out - p).sum(1)
    assert (l1 <= eps + 1e-9).all()
    np.testing.assert_allclose(l1, np.minimum(d, eps), atol=1e-9)
    t = np.minimum(1, eps / d)
    np.testing.assert_allclose(out, p + t[:, None] * (full - p), atol=1e-12)
    assert (d > eps).mean() > 0.5  # the budget was binding on most rows, so this tested something
    np.testing.assert_allclose(blend_to_budget(p, p, eps), p)


# --- label swapper -------------------------------------------------------------------------------

def test_needs_inputs_only_with_swapper(fitted, swapper):
    assert fitted.needs_inputs is False and swapper.needs_inputs is True


def test_swapper_touches_only_indexed_members(swapper, digits_target, digits_data):
    Xm, ym = digits_target.role("train")
    pm = digits_data.member_probs
    out = swapper.transform(pm, Xm)
    plain = finalize(pm, swapper._purify(norm(pm)))
    changed = (out.argmax(1) != pm.argmax(1))
    q = swapper.realized_swap_fraction
    assert 0 < q < 0.5 and changed.mean() == pytest.approx(len(swapper.member_index) / len(Xm))
    np.testing.assert_array_equal(out[~changed], plain[~changed])
    # swapped rows: the purified vector with its top two entries exchanged, never one-hot
    srt_out, srt_plain = np.sort(out[changed], 1), np.sort(plain[changed], 1)
    np.testing.assert_allclose(srt_out, srt_plain, atol=1e-3)
    assert ((out[changed] > 0).sum(1) >= 2).all() and (out[changed].max(1) < 1).all()
    assert (np.argsort(-plain[changed], 1)[:, 1] == out[changed].argmax(1)).all()
    # non-members are never touched, in FP32 or FP64 input form
    for role in ("reference", "eval_nonmembers"):
        Xn, _ = digits_target.role(role)
        pn = digits_target.predict_proba(Xn)
        on = swapper.transform(pn, Xn.astype(np.float64))
        np.testing.assert_array_equal(on, finalize(pn, swapper._purify(norm(pn))))
    # a member row with -0.0 instead of 0.0 is the same record
    Xneg = np.where(Xm == 0, -0.0, Xm).astype(np.float32)
    np.testing.assert_array_equal(swapper.transform(pm, Xneg), out)


def test_swapper_fraction_closes_gap(swapper, digits_data):
    m_ok = digits_data.member_probs.argmax(1) == digits_data.member_labels
    r_ok = digits_data.reference_probs.argmax(1) == digits_data.reference_labels
    q_star = 1 - r_ok.mean() / m_ok.mean()
    assert swapper.realized_swap_fraction == pytest.approx(q_star * m_ok.mean(), abs=0.05)


def test_swapper_indexes_a_keyed_subset_of_correct_members():
    data = synthetic_fit_data(4, seed=5, n=400)
    d = PurifierNet(epochs=1, label_swap=True, swap_fraction=0.5, secret=SECRET).fit(data)
    from purifier.defenses import label_swap

    hit = label_swap.lookup(d.member_index, label_swap.row_keys(d._prf(), data.member_inputs))
    correct = data.member_probs.argmax(1) == data.member_labels
    assert not hit[~correct].any()
    assert abs(hit[correct].mean() - 0.5) < 4 * np.sqrt(0.25 / correct.sum())
    assert not label_swap.lookup(d.member_index, label_swap.row_keys(d._prf(), data.reference_inputs)).any()


def test_index_holds_no_raw_rows(swapper, digits_target, tmp_path):
    swapper.save(tmp_path / "d")
    index = np.load(tmp_path / "d" / "member_index.npy", allow_pickle=False)
    assert index.dtype == np.uint64 and index.ndim == 1 and np.all(np.diff(index) > 0)
    Xm, _ = digits_target.role("train")
    blobs = b"".join(f.read_bytes() for f in (tmp_path / "d").iterdir())
    for row in Xm[:50]:
        for dtype in (np.float32, np.float64):
            assert row.astype(dtype).tobytes()[:64] not in blobs
    loaded = load_defense(tmp_path / "d", secret=SECRET)
    np.testing.assert_array_equal(loaded.transform(digits_target.predict_proba(Xm[:40]), Xm[:40]),
                                  swapper.transform(digits_target.predict_proba(Xm[:40]), Xm[:40]))
    with pytest.raises(ConfigError, match="another PRF secret"):
        load_defense(tmp_path / "d", secret=SECRET + b"x")


def test_swapper_bad_inputs_fail_closed(swapper, digits_data):
    p = digits_data.member_probs[:4]
    with pytest.raises(DefenseError, match="input rows"):
        swapper.transform(p)
    with pytest.raises(DefenseError, match="expected \\(4, 64\\)"):
        swapper.transform(p, digits_data.member_inputs[:3])


# --- persistence and bad input -------------------------------------------------------------------

def test_save_load_roundtrip_and_bad_artifacts(fitted, digits_data, tmp_path):
    d = fitted.save(tmp_path / "d")
    loaded = load_defense(d, secret=SECRET, model_id=digits_data.model_id)
    p = digits_data.reference_probs
    np.testing.assert_array_equal(loaded.transform(p), fitted.transform(p))
    assert loaded.needs_inputs is False
    with pytest.raises(ArtifactError, match="fitted for model"):
        load_defense(d, secret=SECRET, model_id="0" * 64)
    with pytest.raises(InvalidProbabilities, match="fitted for 10"):
        loaded.transform(dirichlet(2, 9))
    with pytest.raises(InvalidProbabilities, match="row 1 sums"):
        loaded.transform(np.array([[1.0] + [0.0] * 9, [0.5] * 10]))
    onnx = d / "reformer.onnx"
    raw = onnx.read_bytes()
    onnx.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ArtifactError, match="sha256 of reformer.onnx"):
        load_defense(d, secret=SECRET)
    manifest = json.loads((d / "defense.json").read_text())
    from purifier.artifacts import sha256_file

    manifest["files"]["reformer.onnx"] = sha256_file(onnx)  # hash fixed up: ORT must still refuse
    (d / "defense.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="cannot load ONNX model"):
        load_defense(d, secret=SECRET)
    onnx.unlink()
    with pytest.raises(ArtifactError, match="does not exist"):
        load_defense(d, secret=SECRET)


def test_bad_hyper_parameters():
    with pytest.raises(ConfigError, match="noise: 'gauss' is not one of keyed, mean"):
        PurifierNet(noise="gauss")
    with pytest.raises(ConfigError, match="budget"):
        PurifierNet(budget=0)
    with pytest.raises(ConfigError, match="swap_fraction"):
        PurifierNet(swap_fraction=1.5)


# --- privacy on a real target --------------------------------------------------------------------

def _features(probs, labels):
    """Attack features: sorted probabilities (top 3), log p_y, correctness."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1)
    i = np.arange(len(p))
    top3 = -np.sort(-p, 1)[:, :3]
    return np.c_[top3, np.log(p[i, labels]), (p.argmax(1) == labels)]


def classwise_threshold_attack(fit_p, fit_y, fit_m, ev_p, ev_y):
    """Song & Mittal's class-wise confidence threshold: per class, the p_y threshold that maximises
    balanced accuracy on the fit set; member iff p_y >= threshold."""
    conf_fit = fit_p[np.arange(len(fit_p)), fit_y]
    conf_ev = ev_p[np.arange(len(ev_p)), ev_y]
    pred = np.zeros(len(ev_p), bool)
    for k in np.unique(ev_y):
        cand = np.r_[np.unique(conf_fit[fit_y == k]), np.inf]
        sel = fit_y == k
        m, c = fit_m[sel], conf_fit[sel]
        if m.all() or not m.any():
            thr = 0.5
        else:
            ba = [(np.mean(c[m] >= t) + np.mean(c[~m] < t)) / 2 for t in cand]
            thr = cand[int(np.argmax(ba))]
        pred[ev_y == k] = conf_ev[ev_y == k] >= thr
    return pred


def nn_attack(fit_p, fit_y, fit_m, ev_p, ev_y, seed=0):
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier((32, 16), max_iter=600, random_state=seed)
    clf.fit(_features(fit_p, fit_y), fit_m)
    return clf.predict(_features(ev_p, ev_y)).astype(bool)


def attack_report(target, defense) -> dict:
    """Two-fold attacks on the audit's evaluation members / non-members: each fold's attack is
    fitted on the other fold's defended outputs (never on the records it is scored on)."""
    Xm, ym = target.role("eval_members")
    Xn, yn = target.role("eval_nonmembers")
    n = min(len(ym), len(yn))
    X, y = np.r_[Xm[:n], Xn[:n]], np.r_[ym[:n], yn[:n]]
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    clean = target.predict_proba(X)
    out = clean if defense is None else defense.transform(clean, X if defense.needs_inputs else None)
    fold = np.random.default_rng(0).permutation(2 * n) % 2 == 0
    res = {"gap": balanced_accuracy(out.argmax(1) == y, member),
           "floor": balanced_accuracy(clean.argmax(1) == y, member)}
    for name, attack in (("classwise", classwise_threshold_attack), ("nn", nn_attack)):
        pred = np.zeros(2 * n, bool)
        for f in (fold, ~fold):
            pred[f] = attack(out[~f], y[~f], member[~f], out[f], y[f])
        res[name] = balanced_accuracy(pred, member)
    res["argmax_agreement"] = float((out.argmax(1) == clean.argmax(1)).mean())
    res["mean_l1"] = float(np.abs(out.astype(np.float64) - clean).sum(1).mean())
    res["member_acc"] = float((out[member].argmax(1) == y[member]).mean())
    return res


def test_purifier_pushes_attacks_to_gap_floor(digits_target, fitted, swapper):
    before = attack_report(digits_target, None)
    after = attack_report(digits_target, fitted)
    swapped = attack_report(digits_target, swapper)
    print(f"\ndigits undefended {before}\ndigits purifier {after}\ndigits purifier+swap {swapped}")
    assert after["argmax_agreement"] == 1.0
    assert before["nn"] > before["floor"] + 0.03  # the target leaks beyond the floor...
    for attack in ("classwise", "nn"):  # ...and the defense removes that excess
        assert after[attack] <= before["floor"] + 0.03
    assert swapped["gap"] < before["floor"] - 0.5 * (before["floor"] - 0.5)
    assert swapped["member_acc"] < 1.0


@pytest.mark.slow
def test_privacy_mnist5k(tmp_path):
    """The same measurement on the mnist5k CNN target (minutes of training: run with -m slow -s)."""
    from purifier.models.target import train_target

    target = train_target("mnist5k", tmp_path / "mnist5k", seed=0, progress=False)
    data = FitData.from_target(target)
    d = PurifierNet(secret=SECRET).fit(data)
    before, after = attack_report(target, None), attack_report(target, d)
    swapped = attack_report(target, d.with_options(label_swap=True).fit_swapper(data))
    print(f"\nmnist5k undefended {before}\nmnist5k purifier {after}\nmnist5k purifier+swap {swapped}")
    assert after["argmax_agreement"] == 1.0
    for attack in ("classwise", "nn"):
        assert after[attack] <= before["floor"] + 0.03
    assert abs(swapped["gap"] - 0.5) < abs(before["floor"] - 0.5)


def test_fit_cli(digits_target, tmp_path, capsys, monkeypatch):
    from purifier.cli import main

    # the CLI trains with the defaults; a short run is enough to check the command's plumbing
    monkeypatch.setitem(PurifierNet.__init__.__kwdefaults__, "epochs", 20)

    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    out = tmp_path / "defense"
    rc = main(["fit-defense", "purifier", "--target", str(digits_target.directory), "--out", str(out),
               "--label-swap", "--secret-file", str(secret)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    for text in ("reconstruction error", "label agreement", "distortion L1", "members indexed"):
        assert text in printed.out
    assert "purifier cvae" in printed.err  # the progress bar
    loaded = load_defense(out, secret=SECRET, model_id=digits_target.model_id)
    assert loaded.needs_inputs and len(loaded.member_index) > 0
    assert main(["fit-defense", "purifier", "--target", str(tmp_path / "nope"), "--out", str(tmp_path / "d2"),
                 "--secret-file", str(secret)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_on_moves_the_reformer_session_and_cuda_without_a_gpu_is_one_line(fitted, digits_data):
    import onnxruntime

    p = digits_data.reference_probs[:32]
    twin = fitted.with_options()
    expected = twin.transform(p)
    twin.serve_on("auto")  # no GPU here: the CPU, the same answers
    assert twin._session.providers[0] == ("CUDAExecutionProvider" if "CUDAExecutionProvider" in
                                          onnxruntime.get_available_providers() else "CPUExecutionProvider")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime here has the CUDA provider: test_cuda.py covers --device cuda")
    np.testing.assert_array_equal(twin.transform(p), expected)
    with pytest.raises(ConfigError, match="device: cuda was asked for but onnxruntime sees no usable CUDA") as e:
        twin.serve_on("cuda")
    assert "\n" not in str(e.value)
    np.testing.assert_array_equal(fitted.transform(p), expected)  # the twin's move left the original alone
