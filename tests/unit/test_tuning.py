"""`purifier tune`: the chosen setting from planted sweeps, writing it into a fitted defense, bad input,
and one real end-to-end run on the digits target."""

import json

import numpy as np
import pytest
from strong_secret import SECRET, write_secret

from purifier import evaluation as ev
from purifier.audit import sweep as sw
from purifier.cli import main
from purifier.defenses import load_defense, read_defense_manifest


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    path = write_secret(tmp_path_factory.mktemp("secret") / "secret.txt")
    return path


@pytest.fixture(scope="module")
def memguard_dir(digits_target, secret_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("defenses") / "memguard"
    assert main(["fit-defense", "memguard", "--target", str(digits_target.directory), "--out", str(out),
                 "--param", "epochs=2", "--secret-file", str(secret_file)]) == 0
    return out


def planted_sweep(aucs: dict):
    """A stand-in for `sweep_points`: every variant's best attack AUC from `aucs[(defense, setting)]`
    (0.58 if absent), the floor at 0.515 [0.507, 0.524]."""
    from types import SimpleNamespace

    from purifier.audit.results import Best, ShadowInfo, Strongest, Tpr

    tpr = Tpr(0.01, 0.01, 400, True, (0.0, 0.02))

    def utility(mean):
        s, ba = ev.L1Summary(mean, 2 * mean, 3 * mean, 400), ev.BeforeAfter(0.1, 0.1)
        return ev.OutputUtility(1.0, s, ev.L1Summary(mean / 2, mean, mean, 400), ba, ba, None, 1.0, ba)

    def point(name, setting, label, auc, ci, mean):
        return sw.SweepPoint(name, setting, label, Best("loss", auc, ci, False), Best("loss", 0.01, None, False, tpr),
                             {}, utility(mean))

    def fake(data, access, variants, config, progress=None, shadows_=None):
        points = [point(name, setting, sw.setting_label(name, setting), aucs.get((name, setting), 0.58), (0.5, 0.6),
                        0.1) for name, setting, _ in variants]
        floor = Strongest(Best("gap", 0.515, (0.507, 0.524), False), Best("gap", 0.0, None, False, tpr),
                          Best("gap", 0.0, None, False, tpr))
        return sw.Sweep(point("none", None, "-", 0.59, (0.55, 0.63), 0.0),
                        SimpleNamespace(shadows=ShadowInfo(
                            n=config.n_shadows, recipe="mlp", epochs=150, seed=0, target_family=None, pool_size=597,
                            train_size=None, reused=False, executor=None, trained=config.n_shadows, from_cache=0,
                            cache={}, retrained_for_label_queries=(), notes=(), in_shadows_per_record={},
                            fallbacks={})), floor, points)
    return fake


def tune(*args):
    return main(["tune", *args])


def test_planted_results_choose_the_weakest_passing_epsilon_and_write_it(
        digits_target, memguard_dir, secret_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sw, "sweep_points", planted_sweep({("memguard", 0.1): 0.53, ("memguard", 0.3): 0.52,
                                                           ("memguard", 1.0): 0.516}))
    before = read_defense_manifest(memguard_dir)
    out = tmp_path / "report"
    assert tune("memguard", "--target", str(digits_target.directory), "--defense-dir", str(memguard_dir),
                "--grid", "1,0.3,0.1", "--out", str(out), "--write-to", str(memguard_dir),
                "--secret-file", str(secret_file), "--quiet") == 0
    printed = capsys.readouterr().out
    assert "chosen: memguard eps 0.3" in printed and "<- chosen" in printed
    result = json.loads((out / "tune.json").read_text())
    assert result["chosen"]["setting"] == 0.3 and result["reached_floor"]
    assert [p["setting"] for p in result["points"] if p["defense"] == "memguard"] == [0.1, 0.3, 1.0]
    assert {p["defense"] for p in result["points"]} == {"memguard", "label_only", "top_k", "round", "noise"}
    assert (out / "tune.png").stat().st_size > 10_000 and "| memguard | eps 0.3 <- chosen |" in (out / "tune.md").read_text()
    after = read_defense_manifest(memguard_dir)  # checks every file hash, the fingerprint's included
    assert after["config"] == {**before["config"], "epsilon": 0.3}
    assert after["files"] == before["files"] and after["fingerprint"] == before["fingerprint"]
    assert after["tuned"]["value"] == 0.3
    assert load_defense(memguard_dir, secret=SECRET, model_id=digits_target.model_id).epsilon == 0.3


@pytest.mark.parametrize("where", ["existing", "new"])
def test_a_chosen_setting_that_changes_nothing_is_not_written(
        digits_target, memguard_dir, secret_file, tmp_path, monkeypatch, capsys, where):
    """epsilon 0 releases nothing; if it reaches the floor (a model that leaks no more than its labels),
    --write-to still refuses it: the report says what was measured, the directory is left as it was."""
    monkeypatch.setattr(sw, "sweep_points", planted_sweep({("memguard", 0.0): 0.515, ("memguard", 1.0): 0.515}))
    before = (memguard_dir / "defense.json").read_bytes()
    target = memguard_dir if where == "existing" else tmp_path / "new"
    out = tmp_path / "report"
    assert tune("memguard", "--target", str(digits_target.directory), "--defense-dir", str(memguard_dir),
                "--grid", "0,1", "--out", str(out), "--write-to", str(target), "--secret-file", str(secret_file),
                "--quiet") == 1
    err = capsys.readouterr().err
    assert f"nothing written to {target}: " in err and "epsilon=0 (default 1)" in err and "unchanged" in err
    result = json.loads((out / "tune.json").read_text())
    assert result["chosen"]["setting"] == 0.0 and "unchanged" in result["not_written"] and result.get("written_to") is None
    assert (memguard_dir / "defense.json").read_bytes() == before and not (tmp_path / "new").exists()


def test_a_grid_that_never_reaches_the_floor_says_so_and_writes_nothing(
        digits_target, memguard_dir, secret_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sw, "sweep_points", planted_sweep({("memguard", 0.1): 0.55, ("memguard", 0.3): 0.53}))
    before = (memguard_dir / "defense.json").read_bytes()
    out = tmp_path / "report"
    assert tune("memguard", "--target", str(digits_target.directory), "--defense-dir", str(memguard_dir),
                "--grid", "0.1,0.3", "--out", str(out), "--write-to", str(memguard_dir), "--baselines", "none",
                "--secret-file", str(secret_file), "--quiet") == 1
    captured = capsys.readouterr()
    assert "no memguard setting in the grid reaches the floor: the closest is eps 0.3" in captured.out
    assert "extend --grid toward stronger settings" in captured.out
    assert f"nothing written to {memguard_dir}" in captured.err
    assert (memguard_dir / "defense.json").read_bytes() == before
    result = json.loads((out / "tune.json").read_text())
    assert result["chosen"] is None and result["closest"]["setting"] == 0.3 and result["baselines"] == []


def _one_line_error(capsys, message):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("purifier: error: ") and message in err, err


@pytest.mark.parametrize(("args", "message"), [
    (["top_k", "--grid", "2,0"], "--grid: k: must be an integer >= 1 (1 answers the label only), got 0"),
    (["round", "--grid", "2,-1"], "--grid: decimals: must be an integer in 0..15 (0 answers the label only), got -1"),
    (["memguard", "--grid", "-0.1"], "--grid: epsilon: must be a finite number >= 0"),
    (["top_k", "--grid", "1.5"], "--grid: '1.5' is not an integer (k)"),
    (["label_only"], "label_only has no budget to tune"),
    (["memguard", "--baselines", "rounding"], "--baselines: 'rounding' is not a baseline defense"),
    (["memguard", "--attacks", "gap"], "--attacks: 'gap' is not a confidence attack"),
    (["memguard", "--model", "m.onnx"], "--target brings its own model and records"),
])
def test_bad_input_is_one_line_and_writes_nothing(digits_target, tmp_path, capsys, args, message):
    out = tmp_path / "report"
    assert tune(*args, "--target", str(digits_target.directory), "--out", str(out)) == 2
    _one_line_error(capsys, message)
    assert not out.exists()


def test_an_existing_report_dir_is_refused_without_force(digits_target, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert tune("round", "--target", str(digits_target.directory), "--out", str(out)) == 2
    _one_line_error(capsys, f"--out: {out} already exists; choose a new directory or pass --force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_write_to_must_hold_the_same_defense(digits_target, memguard_dir, tmp_path, capsys):
    assert tune("round", "--target", str(digits_target.directory), "--out", str(tmp_path / "r"),
                "--write-to", str(memguard_dir)) == 2
    _one_line_error(capsys, f"--write-to: {memguard_dir} holds a memguard defense, not round")


@pytest.mark.parametrize(("param", "message"), [
    ("k=0", "k: must be an integer >= 1 (1 answers the label only), got 0"),
    ("decimals=-1", "decimals: must be an integer in 0..15 (0 answers the label only), got -1"),
])
def test_fit_defense_names_the_valid_range_of_a_baseline(digits_target, tmp_path, capsys, param, message):
    name = "top_k" if param.startswith("k") else "round"
    assert main(["fit-defense", name, "--target", str(digits_target.directory), "--out", str(tmp_path / "d"),
                 "--param", param]) == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "d").exists()


def test_end_to_end_on_the_digits_target(digits_target, secret_file, tmp_path, capsys):
    """A real, small sweep: MemGuard fitted here, two epsilons, two baselines, one shadow model."""
    out, written = tmp_path / "report", tmp_path / "tuned"
    code = tune("memguard", "--target", str(digits_target.directory), "--out", str(out), "--grid", "0.05,2",
                "--param", "epochs=3", "--baselines", "label_only,round", "--shadows", "1", "--shadow-epochs", "30",
                "--bootstrap", "50", "--attacks", "confidence,loss", "--write-to", str(written),
                "--secret-file", str(secret_file), "--quiet")
    result = json.loads((out / "tune.json").read_text())
    assert code == (0 if result["reached_floor"] else 1)
    assert {f.name for f in out.iterdir()} == {"tune.json", "tune.md", "tune.png"}
    points = {(p["defense"], p["setting"]): p for p in result["points"]}
    floor = result["floor"]["auc"]
    assert set(points) == {("memguard", 0.05), ("memguard", 2.0), ("label_only", None), ("round", 3), ("round", 2),
                           ("round", 1)}
    # the same keyed coin per row: a larger epsilon releases the noise on a superset of rows
    l1 = {eps: points[("memguard", eps)]["utility"]["l1_nonmembers"]["mean"] for eps in (0.05, 2.0)}
    assert 0 < l1[0.05] <= l1[2.0]
    # the real-traffic L1 of label_only, recomputed here from the model's answers to the non-members
    clean = digits_target.predict_proba(digits_target.role("eval_nonmembers")[0]).astype(np.float64)
    onehot = np.eye(clean.shape[1])[clean.argmax(axis=1)]
    expected = np.abs(onehot - clean / clean.sum(axis=1, keepdims=True)).sum(axis=1).mean()
    assert points[("label_only", None)]["utility"]["l1_nonmembers"]["mean"] == pytest.approx(expected, rel=1e-5)
    # the floor is at least the gap attack's AUC on the undefended answers
    Xm, ym = digits_target.role("eval_members")
    Xn, yn = digits_target.role("eval_nonmembers")
    correct = np.r_[digits_target.predict_proba(Xm).argmax(1) == ym, digits_target.predict_proba(Xn).argmax(1) == yn]
    gap = ev.gap_floor(correct, np.r_[np.ones(len(ym), bool), np.zeros(len(yn), bool)])["auc"]
    assert floor["value"] >= gap - 1e-12
    assert floor["ci95"][0] <= floor["value"] <= floor["ci95"][1]
    assert all(p["utility"]["argmax_agreement"] == 1.0 for p in result["points"])
    printed = capsys.readouterr().out
    assert "label-only floor" in printed
    if result["reached_floor"]:
        chosen = result["chosen"]["setting"]
        assert load_defense(written, secret=SECRET, model_id=digits_target.model_id).epsilon == chosen
        assert result["written_to"] == str(written)
    else:
        assert not written.exists() and "no memguard setting" in printed


def test_record_files_and_a_new_write_to_directory(digits_target, secret_file, tmp_path, monkeypatch, capsys):
    """From files (the members also fit the defense), the tuned defense is saved where --write-to points."""
    from purifier.data.records import save_records

    for role, name in (("eval_members", "members.npz"), ("eval_nonmembers", "nonmembers.npz"),
                       ("attacker", "pool.npz"), ("reference", "reference.csv")):
        save_records(tmp_path / name, *digits_target.role(role))
    monkeypatch.setattr(sw, "sweep_points", planted_sweep({("round", 2): 0.52}))
    written = tmp_path / "tuned" / "round"
    (tmp_path / "tuned").mkdir()
    assert tune("round", "--model", str(digits_target.onnx_path), "--members", str(tmp_path / "members.npz"),
                "--nonmembers", str(tmp_path / "nonmembers.npz"), "--attacker-pool", str(tmp_path / "pool.npz"),
                "--reference", str(tmp_path / "reference.csv"), "--out", str(tmp_path / "report"),
                "--write-to", str(written), "--secret-file", str(secret_file), "--quiet") == 0
    assert "chosen: round decimals 2" in capsys.readouterr().out
    defense = load_defense(written, model_id=digits_target.model_id)
    assert defense.decimals == 2 and defense.fingerprint is not None
    assert read_defense_manifest(written)["tuned"]["value"] == 2


def test_a_saturated_defense_is_told_apart_from_a_short_grid(digits_target, memguard_dir, secret_file, tmp_path,
                                                             monkeypatch, capsys):
    """The planted sweep answers alike at the two strongest settings (0.53, same L1): MemGuard past
    its largest Phase I distance, where a stronger epsilon changes nothing."""
    monkeypatch.setattr(sw, "sweep_points", planted_sweep({("memguard", 1.0): 0.53, ("memguard", 2.0): 0.53}))
    assert tune("memguard", "--target", str(digits_target.directory), "--defense-dir", str(memguard_dir),
                "--grid", "0.1,1,2", "--out", str(tmp_path / "r"), "--baselines", "none", "--quiet") == 1
    out = capsys.readouterr().out
    assert "the closest is eps 1 " in out and "a stronger one would change nothing" in out
    assert json.loads((tmp_path / "r" / "tune.json").read_text())["saturated"] is True
