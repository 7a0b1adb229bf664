"""Red-team: operator slips (or an attacker who can write the defense directory) that still serve
the model's clean vectors, or serve another model, without anyone choosing to.

* Issue 21 (item 1): `--defense none` (flag, env or TOML) is the only way to serve undefended. A
  defense directory whose defense.json says `"defense": "none"` (`IdentityDefense().save(dir)`,
  or one line edited by hand: "none" needs no secret check value and no files) is served
  undefended by `--defense-dir DIR` alone, without --defense none.
* docs/serving.md's Triton recipe passes `--model-id "$(sha256sum model.onnx ...)"`. With a
  remote upstream that turns the fingerprint comparison off and with it every identity probe: a
  model swapped behind Triton is served for as long as it stays there, although the upstream
  declares the fitted input and could be probed like any other.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from oip_fake import FakeUpstream, infer_request, softmax

from purifier.defenses import Fingerprint
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
C = 4
X = np.random.default_rng(4).normal(0, 1.5, size=(2, C)).astype(np.float32)


def remote(port: int, **extra) -> Settings:
    return Settings.resolve({"upstream": f"127.0.0.1:{port}", "model_name": "m", "confidence_output": "probs",
                             "host": "127.0.0.1", "port": 0, "metrics_port": -1, **extra}, env={})


@pytest.fixture
def upstream():
    fake = FakeUpstream(width=C).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.mark.xfail(strict=True, reason="red-team break open; fixed on branch hardening")
def test_model_id_as_in_the_triton_recipe_does_not_switch_off_the_identity_probes(upstream, flatten_cls):
    probe_rows = np.random.default_rng(11).normal(0, 1.5, size=(64, C)).astype(np.float32)
    defense = flatten_cls()
    defense.n_classes = C
    defense.model_id = "ab" * 32                         # what fit-defense records: the ONNX file's sha256
    defense.fingerprint = Fingerprint(probe_rows, softmax(probe_rows).astype(np.float64))
    settings = remote(upstream.port, model_id="ab" * 32, identity_check_s=0.2, health_poll_s=0.1)
    with BackgroundSidecar(settings, defense=defense) as sc, \
            grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(infer_request(X), timeout=10)
        upstream.temperature = 3.0                       # another model behind the same connection
        deadline = time.monotonic() + 10                 # a bound on the test (50 probe intervals)
        served_by_another = 0
        while time.monotonic() < deadline:
            try:
                stub.ModelInfer(infer_request(X), timeout=10)
                served_by_another += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                break
            time.sleep(0.05)
        mismatches = sc.metrics.registry.get_sample_value("purifier_identity_probes_total",
                                                          {"outcome": "mismatch"}) or 0.0
    assert mismatches >= 1, (f"with --model-id the swapped model was served {served_by_another} times and never "
                             "probed: the upstream declares the fitted input, so it can be")
