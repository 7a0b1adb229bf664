"""Start-up from settings: defense loading (secret, kind, model identity, inferred kind), a bare .onnx
model, and models whose confidence output cannot be defended (skl2onnx's default export, logits)."""

from __future__ import annotations

import numpy as np
import pytest
from strong_secret import write_secret

from purifier.defenses import IdentityDefense
from purifier.errors import ArtifactError, ConfigError
from purifier.models.onnx_graph import GraphBuilder
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration
BASE = {"host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1}
NONE = {"defense": "none", **BASE}


def saved_defense(directory, model_id, n_classes=10):
    d = IdentityDefense()
    d.n_classes, d.model_id = n_classes, model_id
    return d.save(directory)


def test_defense_dir_needs_a_secret_the_right_kind_and_the_right_model(digits_target, tmp_path, monkeypatch):
    monkeypatch.delenv("PURIFIER_SECRET", raising=False)
    monkeypatch.delenv("PURIFIER_SECRET_FILE", raising=False)
    good = saved_defense(tmp_path / "good", digits_target.model_id)
    flags = {"model": str(digits_target.directory), "defense": "memguard", "defense_dir": str(good), **BASE}
    with pytest.raises(ConfigError, match="secret: no PRF secret configured"):
        with BackgroundSidecar(Settings.resolve(flags, env={})):
            pass
    secret = write_secret(tmp_path / "secret")
    flags["secret_file"] = str(secret)
    with pytest.raises(ConfigError, match="holds a 'none' defense, not 'memguard'"):
        with BackgroundSidecar(Settings.resolve(flags, env={})):
            pass
    flags["defense_dir"] = str(saved_defense(tmp_path / "other", "0" * 64))
    with pytest.raises(ArtifactError, match="fitted for model 000000000000"):
        with BackgroundSidecar(Settings.resolve(flags, env={})):
            pass


def test_bare_onnx_file_is_served_under_its_stem(digits_target, triton_infer):
    x = np.zeros((3, 64), np.float32)
    with BackgroundSidecar(Settings.resolve({"model": str(digits_target.onnx_path), **NONE}, env={})) as sc:
        assert sc.model_name == "model"
        probs = triton_infer(sc.port, "model", x)
    np.testing.assert_allclose(probs, digits_target.classifier().run(x)["probabilities"], rtol=1e-6)


@pytest.mark.parametrize("output,message", [
    (None, r"confidence_output: 'output_label' is INT64, not a floating-point confidence vector; the probabilities are in "
           r"the ZipMap output 'output_probability': re-export it with skl2onnx options=\{id\(model\): "
           r"\{'zipmap': False\}\}"),
    ("output_probability", r"'output_probability' is an ONNX ZipMap \(seq\(map\(int64,tensor\(float\)\)\)\), not a "
                           r"tensor; re-export it with skl2onnx options=\{id\(model\): \{'zipmap': False\}\}"),
])
def test_skl2onnx_default_export_is_refused_naming_the_fix(zipmap_onnx, output, message):
    flags = {"model": str(zipmap_onnx), "confidence_output": output, **NONE}
    with pytest.raises(ConfigError, match=message):
        with BackgroundSidecar(Settings.resolve(flags, env={})):
            pass


def test_a_logits_output_needs_the_logits_flag(digits_target, triton_infer):
    flags = {"model": str(digits_target.directory), "confidence_output": "logits", **NONE}
    with pytest.raises(ConfigError, match="'logits' does not hold probabilities on the probe rows .* add --logits"):
        with BackgroundSidecar(Settings.resolve(flags, env={})):
            pass
    x = np.zeros((2, 64), np.float32)
    with BackgroundSidecar(Settings.resolve({**flags, "confidence_kind": "logits"}, env={})) as sc:
        probs = triton_infer(sc.port, sc.model_name, x, output="logits")
    np.testing.assert_allclose(probs, digits_target.classifier().run(x)["probabilities"], rtol=1e-5, atol=1e-7)


def test_logits_flag_on_an_output_of_probability_vectors_is_refused(digits_target):
    """Before, --logits on probabilities was accepted and every answer was a softmax of probabilities
    (flattened vectors)."""
    flags = {"model": str(digits_target.directory), "confidence_kind": "logits", **NONE}
    with pytest.raises(ConfigError, match="confidence_kind: --logits is set, but 'probabilities' already holds "
                                          "probability vectors on the 2 probe rows; .*: drop --logits"):
        with BackgroundSidecar(Settings.resolve(flags, env={})):
            pass


def test_defense_dir_without_defense_serves_the_fitted_defense_and_says_which(digits_target, tmp_path, caplog,
                                                                            triton_infer):
    """Before, --defense-dir alone served undefended, silently."""
    import logging

    from purifier.defenses.base import FitData
    from purifier.defenses.memguard import MemGuard

    caplog.set_level(logging.INFO, logger="purifier_server")
    secret = write_secret(tmp_path / "secret")
    memguard = MemGuard(epsilon=1.0, epochs=5, optimizer="adam", secret=secret.read_bytes().strip())
    memguard.fit(FitData.from_target(digits_target)).save(tmp_path / "memguard")
    flags = {"model": str(digits_target.directory), "defense_dir": str(tmp_path / "memguard"),
             "secret_file": str(secret), **BASE}
    x, _ = digits_target.role("eval_members")
    x = np.ascontiguousarray(x[:32], np.float32)
    with BackgroundSidecar(Settings.resolve(flags, env={})) as sc:
        assert sc.defense.name == "memguard"
        got = triton_infer(sc.port, sc.model_name, x)
        assert sc.metrics.registry.get_sample_value("purifier_defense_active", {"defense": "memguard"}) == 1
    clean = digits_target.classifier().run(x)["probabilities"]
    np.testing.assert_allclose(got, memguard.transform(clean), rtol=1e-6)
    assert np.abs(got - clean).sum(axis=1).max() > 1e-3          # defended, not the clean vector
    assert "defense inferred from defense.json" in caplog.text
    assert any(getattr(r, "defense", None) == "memguard" for r in caplog.records)


@pytest.mark.parametrize("model,x,reason", [
    ("plus_half", [[1.0, -1.0]], "not probability vectors"),  # a negative entry, the row sums to 1
    ("plus_half", [[3.0, 0.0]], "not probability vectors"),  # sums to 4
    ("softmax", [[1000.0, 0.0]], "non-finite confidences"),  # exp overflows: inf / inf
])
def test_an_embedded_model_answer_that_cannot_be_defended_is_refused_not_served(tmp_path, model, x, reason):
    """The embedded model's arrays reach the data plane without a protobuf message (codec.Decoded):
    a finite request that makes the model itself answer something other than probability vectors
    gets an error naming the reason, never the model's vector, for every defense path."""
    g = GraphBuilder(model)
    inp = g.input("input", np.float32, ("N", 2))
    if model == "plus_half":  # zeros -> [0.5, 0.5]: the start-up probe passes
        probs = g.op("Add", inp, g.const(np.float32(0.5)))
    else:
        e = g.op("Exp", inp)
        probs = g.op("Div", e, g.op("ReduceSum", e, g.const(np.array([-1], np.int64)), keepdims=1))
    g.output(probs, "probabilities", np.float32, ("N", 2))
    path = tmp_path / f"{model}.onnx"
    path.write_bytes(g.model_bytes())
    with BackgroundSidecar(Settings.resolve({"model": str(path), **NONE}, env={})) as sc:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{sc.port}")
        try:
            def ask(rows):
                inp = grpcclient.InferInput("input", [len(rows), 2], "FP32")
                inp.set_data_from_numpy(np.asarray(rows, np.float32))
                return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")])

            np.testing.assert_allclose(ask([[0.0, 0.0]]).as_numpy("probabilities"), [[0.5, 0.5]])
            with pytest.raises(InferenceServerException, match=rf"rejected \({reason}\)") as refused:
                ask(x)
            assert "StatusCode.INTERNAL" in str(refused.value.status())
        finally:
            client.close()
