"""Start-up from settings: defense loading (secret, kind, model identity) and a bare .onnx model."""

from __future__ import annotations

import numpy as np
import pytest

from purifier.defenses import IdentityDefense
from purifier.errors import ArtifactError, ConfigError
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

grpcclient = pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.integration
BASE = {"host": "127.0.0.1", "port": 0, "metrics_port": -1}


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
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef")
    flags["secret_file"] = str(secret)
    with pytest.raises(ConfigError, match="holds a 'none' defense, not 'memguard'"):
        with BackgroundSidecar(Settings.resolve(flags, env={})):
            pass
    flags["defense_dir"] = str(saved_defense(tmp_path / "other", "0" * 64))
    with pytest.raises(ArtifactError, match="fitted for model 000000000000"):
        with BackgroundSidecar(Settings.resolve(flags, env={})):
            pass


def test_bare_onnx_file_is_served_under_its_stem(digits_target):
    with BackgroundSidecar(Settings.resolve({"model": str(digits_target.onnx_path), **BASE}, env={})) as sc:
        assert sc.model_name == "model"
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{sc.port}")
        try:
            x = np.zeros((3, 64), np.float32)
            inp = grpcclient.InferInput("input", [3, 64], "FP32")
            inp.set_data_from_numpy(x)
            probs = client.infer("model", [inp]).as_numpy("probabilities")
        finally:
            client.close()
    np.testing.assert_allclose(probs, digits_target.classifier().run(x)["probabilities"], rtol=1e-6)
