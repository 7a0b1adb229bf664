"""`--logits` means one softmax: what `purifier serve --logits` answers a client is, bit for bit and
in the same dtype, what `purifier audit --model ... --logits` computes in process for the same rows
(`purifier.probabilities.softmax`), undefended and behind a defense."""

from __future__ import annotations

import numpy as np
import pytest

from purifier.models.access import OnnxTarget
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("defended", [False, True], ids=["none", "flatten"])
def test_serve_and_audit_turn_the_same_logits_into_the_same_probabilities(digits_target, flatten_cls, triton_infer,
                                                                         defended):
    X, _ = digits_target.role("eval_nonmembers")
    X = np.ascontiguousarray(X[:32], np.float32)
    settings = Settings.resolve({"model": str(digits_target.directory), "confidence_output": "logits",
                                 "confidence_kind": "logits", "defense": None if defended else "none",
                                 "host": "127.0.0.1", "port": 0, "http_port": -1, "metrics_port": -1}, env={})
    inject = {"defense": flatten_cls()} if defended else {}
    with BackgroundSidecar(settings, **inject) as sidecar:
        served = triton_infer(sidecar.port, sidecar.model_name, X, output="logits")
    audit = OnnxTarget(digits_target.directory, output_name="logits", logits=True,
                       defense=flatten_cls() if defended else None)
    audited = audit.query(X)
    assert served.dtype == np.float32  # the model's datatype: FP32 logits, FP32 probabilities
    np.testing.assert_allclose(served.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(served.astype(np.float64), audited)
