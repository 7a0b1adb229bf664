import json
import subprocess
import sys

import numpy as np
import pytest

from purifier.errors import ArtifactError
from purifier.models.target import PROBS_NAME, Target


def test_target_artifact_is_complete_and_leaks(digits_target):
    m = digits_target.manifest
    assert m["dataset"] == "digits" and m["n_classes"] == 10 and m["n_features"] == 64
    assert m["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 64]}
    assert set(m["outputs"]) == {"probabilities", "logits"} and m["confidence_output"] == PROBS_NAME
    assert m["ort_torch_max_abs_diff"] <= 1e-5
    assert {"python", "numpy", "torch", "onnxruntime"} <= set(m["versions"])
    # the demo target must overfit: members ~100%, non-members clearly lower
    assert m["accuracy"]["train"] >= 0.99
    assert m["accuracy"]["train"] - m["accuracy"]["eval_nonmembers"] >= 0.02


def test_onnx_has_dynamic_batch_and_probabilities(digits_target):
    clf = digits_target.classifier()
    X, _ = digits_target.role("eval_nonmembers")
    for n in (1, 7, 300):
        out = clf.run(X[:n])
        assert out[PROBS_NAME].shape == (n, 10)
        np.testing.assert_allclose(out[PROBS_NAME].sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(out[PROBS_NAME].argmax(1), out["logits"].argmax(1))


def test_corrupt_or_mismatched_artifacts_rejected(digits_target, tmp_path):
    import shutil

    d = tmp_path / "t"
    shutil.copytree(digits_target.directory, d)
    (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtifactError, match="sha256"):
        Target.load(d)
    (d / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Target.load(d)
    (d / "model.json").write_text(json.dumps({"dataset": "digits"}))
    with pytest.raises(ArtifactError, match="missing field"):
        Target.load(d)
    with pytest.raises(ArtifactError, match="does not exist"):
        Target.load(tmp_path / "nope")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "purifier.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["train-target", "--dataset", "cifar", "--out", "x"], "invalid choice: 'cifar'"),
    (["train-target", "--dataset", "digits", "--out", "/nonexistent-dir/x"], "parent directory /nonexistent-dir does not exist"),
])
def test_cli_user_errors_are_one_line(args, message, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_cli_corrupt_target_is_one_line(digits_target, tmp_path):
    import shutil

    d = tmp_path / "t"
    shutil.copytree(digits_target.directory, d)
    (d / "model.onnx").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from purifier.cli import main; from purifier.errors import PurifierError\n"
                        "from purifier.models.target import Target\n"
                        f"Target.load({str(d)!r})"], capture_output=True, text=True)
    assert r.returncode != 0 and "sha256" in r.stderr
