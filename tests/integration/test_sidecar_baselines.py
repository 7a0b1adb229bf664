"""The baseline defenses, fitted and saved like any other, served by the sidecar from their
directory (the configured-defense path, no injection) to an unmodified tritonclient."""

from __future__ import annotations

import numpy as np
import pytest
from strong_secret import SECRET, write_secret

from purifier.defenses import FitData, defense_class, load_defense
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

grpcclient = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name,config", [("label_only", {}), ("top_k", {"k": 2}), ("round", {"decimals": 1}),
                                         ("noise", {"kind": "gaussian", "scale": 0.2, "budget": 0.1})])
def test_sidecar_serves_a_fitted_baseline(digits_target, tmp_path, name, config, triton_infer):
    secret_file = tmp_path / "secret.txt"
    write_secret(secret_file)
    defense = defense_class(name)(secret=SECRET, **config).fit(FitData.from_target(digits_target))
    defense.save(tmp_path / name)
    settings = Settings.resolve({"model": str(digits_target.directory), "host": "127.0.0.1", "port": 0, "http_port": 0,
                                 "metrics_port": -1, "defense": name, "defense_dir": str(tmp_path / name),
                                 "secret_file": str(secret_file)}, env={})
    X, _ = digits_target.role("eval_nonmembers")
    x = np.ascontiguousarray(X[:32], np.float32)
    with BackgroundSidecar(settings) as sc:
        got = triton_infer(sc.port, sc.model_name, x)
    clean = digits_target.classifier().run(x)["probabilities"]
    expected = load_defense(tmp_path / name, SECRET, digits_target.model_id).transform(clean)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32 and np.array_equal(got.argmax(1), clean.argmax(1))
    assert not np.array_equal(got, clean)  # really defended
