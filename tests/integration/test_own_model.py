"""Worked examples: a model Purifier did not train, on records it does not ship, end to end.

Each example is what docs/own-model.md tells a user to do: the user's own
Python trains and exports the model and writes record files; everything after that is the CLI
(`purifier fit-defense`, `purifier serve` as a subprocess, `purifier audit`).

(a) a deliberately overfit scikit-learn RandomForest exported with skl2onnx (zipmap=False),
    fitted in process, served embedded, audited through the sidecar;
(b) the same model as a joblib file behind MLServer (predict_proba, declared inputs), fitted from
    the endpoint, served through the sidecar in front of MLServer, audited undefended vs defended;
(c) a PyTorch model exported with logits only, fitted and served with --logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from strong_secret import write_secret

from purifier.audit.results import Report
from purifier.cli import main
from purifier.data.records import save_records

pytestmark = pytest.mark.integration
N_FEATURES, N_CLASSES = 20, 4
AUDIT = ["--shadows", "2", "--bootstrap", "20", "--quiet",
         "--attacks", "gap", "confidence", "mentr", "nn", "lira_offline", "label_augment"]
CONFIDENCE = ("confidence", "mentr", "nn", "lira_offline")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's side: a seeded tabular problem, record files, an overfit RandomForest, a secret."""
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    d = tmp_path_factory.mktemp("user")
    X, y = make_classification(n_samples=3000, n_features=N_FEATURES, n_informative=10, n_redundant=4,
                               n_classes=N_CLASSES, flip_y=0.05, random_state=11)
    X = X.astype(np.float32)
    roles = {"train": (0, 600), "reference": (600, 1000), "nonmembers": (1000, 1400), "pool": (1400, 3000)}
    for role, (a, b) in roles.items():
        save_records(d / f"{role}.npz", X[a:b], y[a:b])
    save_records(d / "members.csv", X[:400], y[:400])  # evaluation members: a subset of train, as CSV
    clf = RandomForestClassifier(n_estimators=100, random_state=0).fit(X[:600], y[:600])
    write_secret(d / "secret.txt")
    return d, clf, X, y


def _cli(*args) -> None:
    rc = main(list(args))
    assert rc == 0, args


def _records(d: Path, members="members.csv") -> list[str]:
    return ["--members", str(d / members), "--nonmembers", str(d / "nonmembers.npz"),
            "--attacker-pool", str(d / "pool.npz")]


def _fit_files(d: Path) -> list[str]:
    return ["--members", str(d / "train.npz"), "--reference", str(d / "reference.npz"),
            "--secret-file", str(d / "secret.txt")]


def _report(path: Path) -> Report:
    return Report.read(path)


def _strongest(report: Report) -> float:
    return max(report.attacks[a].ranking.auc for a in CONFIDENCE)


def test_a_sklearn_onnx_embedded(user, tmp_path, serve_process):
    from skl2onnx import to_onnx

    d, clf, X, _ = user
    onnx = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}})
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx.SerializeToString())

    _cli("fit-defense", "purifier", "--model", str(model), *_fit_files(d), "--out", str(tmp_path / "pu"),
         "--param", "epochs=60")
    _cli("audit", "--model", str(model), *_records(d), "--shadow-model", "random_forest",
         "--target-family", "random_forest", "--out", str(tmp_path / "undefended"), *AUDIT)
    with serve_process("--model", str(model), "--model-name", "rf", "--confidence-output", "probabilities",
                      "--defense", "purifier", "--defense-dir", str(tmp_path / "pu"),
                      "--secret-file", str(d / "secret.txt"), log=tmp_path / "serve.log") as sidecar:
        _cli("audit", "--endpoint", sidecar, "--model-name", "rf", *_records(d), "--defense-name", "purifier",
             "--shadow-model", "random_forest", "--target-family", "random_forest",
             "--baseline", str(tmp_path / "undefended"), "--out", str(tmp_path / "defended"), *AUDIT)
    plain, defended = _report(tmp_path / "undefended"), _report(tmp_path / "defended")
    assert plain.undefended and defended.baseline == plain  # the in-process audit is the "before"
    a = defended.assumptions
    assert (a.evaluation_members, a.evaluation_nonmembers, a.attacker_pool, a.target_training_set) == (400, 400, 1600,
                                                                                                        None)
    assert a.shadow_recipe == "random_forest" and a.recipe_matches_target_family is True
    assert any("TPR at 0.1% FPR is not measurable" in w for w in a.warnings)
    md = (tmp_path / "defended" / "report.md").read_text()
    assert md.index("## What the audit assumed") < md.index("| attack |")
    # the overfit forest leaks well beyond its gap floor; the served defense takes most of it away
    assert _strongest(plain) > plain.gap_floor.auc + 0.1
    assert _strongest(defended) < _strongest(plain) - 0.05
    assert defended.gap_floor == plain.gap_floor  # labels kept: the label-only floor stays


def test_b_joblib_behind_mlserver(user, tmp_path, serve_process, mlserver_process):
    import joblib

    d, clf, _, _ = user
    server = mlserver_process(tmp_path / "models", "tabular-rf")
    model_dir = server.root / "tabular-rf"
    model_dir.mkdir(parents=True)
    joblib.dump(clf, model_dir / "model.joblib")
    # the model-settings.json of docs/own-model.md
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": "tabular-rf",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, N_FEATURES]}],
        "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, N_CLASSES]}],
        "parameters": {"uri": "./model.joblib", "extra": {"predict_fn": "predict_proba"}},
    }))
    server.write_settings()
    try:
        server.start()
        upstream = server.endpoint
        _cli("fit-defense", "memguard", "--endpoint", upstream, "--model-name", "tabular-rf", *_fit_files(d),
             "--out", str(tmp_path / "mg"))
        fingerprint = np.load(tmp_path / "mg" / "fingerprint.npz")
        np.testing.assert_allclose(fingerprint["probs"], clf.predict_proba(fingerprint["inputs"]), atol=1e-6)
        with serve_process("--upstream", upstream, "--model-name", "tabular-rf", "--confidence-output",
                          "predict_proba", "--defense", "memguard", "--defense-dir", str(tmp_path / "mg"),
                          "--secret-file", str(d / "secret.txt"), log=tmp_path / "serve.log") as sidecar:
            _cli("audit", "--endpoint", sidecar, "--model-name", "tabular-rf", *_records(d),
                 "--baseline", upstream, "--defense-name", "memguard", "--shadow-model", "random_forest",
                 "--target-family", "random_forest", "--train-size", "600", "--out", str(tmp_path / "defended"),
                 *AUDIT)
    finally:
        server.stop()
    defended = _report(tmp_path / "defended")
    plain = defended.baseline  # the same attacks and shadow models against MLServer itself, in the same report
    assert plain.undefended and plain.source.endpoint == upstream and set(plain.attacks) == set(defended.attacks)
    html = (tmp_path / "defended" / "report.html").read_text()
    assert "not audited" not in html and "No undefended baseline" not in html
    assert defended.assumptions.target_training_set == 600
    cost = defended.utility.cost
    assert cost.argmax_agreement == 1.0 and 0 < cost.l1_nonmembers.mean <= 1.0 + 0.1  # MemGuard's expected-L1 budget 1
    assert _strongest(plain) > plain.gap_floor.auc + 0.1
    assert _strongest(defended) < _strongest(plain) - 0.05
    assert defended.gap_floor == plain.gap_floor


def test_c_torch_logits_only(user, tmp_path, serve_process):
    import torch

    d, _, X, y = user
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 128), torch.nn.ReLU(), torch.nn.Linear(128, N_CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    Xt, yt = torch.from_numpy(X[:600]), torch.from_numpy(y[:600]).long()
    for _ in range(300):  # full batch, no regularisation: it memorizes its training rows
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(Xt), yt).backward()
        opt.step()
    model = tmp_path / "logits.onnx"
    torch.onnx.export(net.eval(), (Xt[:2],), str(model), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)

    _cli("fit-defense", "memguard", "--model", str(model), "--logits", *_fit_files(d), "--out", str(tmp_path / "mg"))
    mlp = ["--shadow-model", "mlp", "--shadow-epochs", "60", "--target-family", "mlp"]
    _cli("audit", "--model", str(model), "--logits", *_records(d), *mlp, "--out", str(tmp_path / "undefended"),
         *AUDIT)
    with serve_process("--model", str(model), "--model-name", "net", "--logits", "--defense", "memguard",
                      "--defense-dir", str(tmp_path / "mg"), "--secret-file", str(d / "secret.txt"),
                      log=tmp_path / "serve.log") as sidecar:
        # the sidecar answers defended probabilities (under the output's own name): no --logits here
        _cli("audit", "--endpoint", sidecar, "--model-name", "net", *_records(d), *mlp, "--defense-name", "memguard",
             "--baseline", str(tmp_path / "undefended"), "--out", str(tmp_path / "defended"), *AUDIT)
    r = _report(tmp_path / "defended")
    assert r.baseline == _report(tmp_path / "undefended") and r.baseline.undefended
    assert _strongest(r) < _strongest(r.baseline)
    assert r.source.output_name == "logits" and r.assumptions.recipe_matches_target_family is True
    assert r.utility.member_accuracy == 1.0 > r.utility.nonmember_accuracy


def test_bad_exports_are_named_with_the_fix(user, tmp_path, capsys):
    from skl2onnx import to_onnx

    d, clf, X, _ = user
    (tmp_path / "zipmap.onnx").write_bytes(to_onnx(clf, X[:1]).SerializeToString())  # the default export
    (tmp_path / "plain.onnx").write_bytes(to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}}).SerializeToString())
    cases = [("zipmap.onnx", [], "is an ONNX ZipMap .*export with skl2onnx options=.*'zipmap': False"),
             ("zipmap.onnx", ["--output-name", "output_probability"], "is an ONNX ZipMap"),
             ("plain.onnx", ["--output-name", "label"], "output 'label' is tensor\\(int64\\), not floating-point "
                                                        "confidences; choose one of: probabilities")]
    import re

    for model, extra, message in cases:
        rc = main(["fit-defense", "memguard", "--model", str(tmp_path / model), *extra, *_fit_files(d),
                   "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()
