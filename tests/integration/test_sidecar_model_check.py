"""The model check (server/preflight.py): a defense is served only for the model it was fitted for,
and only when that model's confidence output can be defended.

Remote: `oip_fake.FakeUpstream` with declared metadata (probs = softmax(x / T); another T is
another model with the same classes) and a test defense carrying a fingerprint of T = 1. Checked:
a matching model serves; a mismatched one is refused at start-up, or, when it appears later (the
upstream was down at start, or restarted with another model), keeps health NOT_SERVING with one
log line and every request refused; the right model coming back serves again; `--model-id`
vouches only for a model that cannot be probed (as the Triton recipe passes it, it switches no
probe off); a defense without a fingerprint is accepted with a warning.
Embedded: skl2onnx's default export (int64 label + ZipMap), a logits-only model, a class count that
differs from the defense's, and `--defense-dir` without `--defense` (inferred from defense.json).
"""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from oip_fake import FakeUpstream, infer_request, softmax

from purifier.defenses import Fingerprint
from purifier.errors import ConfigError
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
C = 4
PROBE = np.random.default_rng(3).normal(0, 1.5, size=(8, C)).astype(np.float32)
X = np.random.default_rng(4).normal(0, 1.5, size=(2, C)).astype(np.float32)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def fingerprinted(flatten_cls, temperature: float = 1.0):
    """The test defense as if fitted for the fake model with this temperature."""
    defense = flatten_cls()
    defense.n_classes = C
    defense.fingerprint = Fingerprint.from_rows(PROBE, softmax(PROBE / temperature).astype(np.float64))
    return defense


def remote(port: int, **extra) -> Settings:
    return Settings.resolve({"upstream": f"127.0.0.1:{port}", "model_name": "m", "confidence_output": "probs",
                             "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1, "health_poll_s": 0.1, **extra},
                            env={})


def wait_health(port: int, status, timeout: float = 15.0) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == status:
                return True
            time.sleep(0.05)
    return False


def infer(port: int):
    """(defended probabilities, None) or (None, RpcError)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(X), timeout=10)
        except grpc.RpcError as e:
            return None, e
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(X.shape), None


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="purifier_server")


@pytest.fixture
def upstream():
    fake = FakeUpstream(width=C)
    try:
        yield fake
    finally:
        fake.stop()


def test_the_model_the_defense_was_fitted_for_is_served(upstream, flatten_cls, caplog):
    upstream.start()
    defense = fingerprinted(flatten_cls)
    with BackgroundSidecar(remote(upstream.port), defense=defense) as sc:
        assert wait_health(sc.port, SERVING)
        got, error = infer(sc.port)
    assert error is None
    np.testing.assert_allclose(got, flatten_cls().transform(softmax(X)), rtol=1e-6)
    assert "upstream model checked: fingerprint matched on 4 probe rows" in caplog.text   # half of 8: the rest probe


def test_another_model_is_refused_at_start_up_in_one_line(upstream, flatten_cls):
    upstream.temperature = 2.0
    upstream.start()
    with pytest.raises(ConfigError, match=r"defense: fitted for another model: the model's answers to the 4 probe "
                                          r"inputs differ .* refit it for this one") as info:
        with BackgroundSidecar(remote(upstream.port), defense=fingerprinted(flatten_cls)):
            pass
    assert "\n" not in str(info.value)


def test_a_model_that_appears_later_is_checked_and_refused_until_the_right_one_is_back(upstream, flatten_cls,
                                                                                       caplog):
    upstream.start()
    port = upstream.port
    upstream.stop()                                   # down at start-up
    upstream.temperature = 2.0
    with BackgroundSidecar(remote(port), defense=fingerprinted(flatten_cls)) as sc:
        assert wait_health(sc.port, NOT_SERVING)
        assert "the model is checked when it becomes ready" in caplog.text
        upstream.start()                              # up, with another model
        deadline = time.monotonic() + 15
        while "upstream model refused" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)                               # several polls: still one line, still NOT_SERVING
        assert caplog.text.count("upstream model refused: defense: fitted for another model") == 1
        assert wait_health(sc.port, NOT_SERVING, timeout=1)
        got, error = infer(sc.port)
        assert got is None and error.code() == grpc.StatusCode.UNAVAILABLE
        assert "refused by the sidecar's model check" in error.details()
        upstream.stop()                               # the operator puts the right model back
        upstream.temperature = 1.0
        upstream.start()
        assert wait_health(sc.port, SERVING)
        got, error = infer(sc.port)
    assert error is None
    np.testing.assert_allclose(got, flatten_cls().transform(softmax(X)), rtol=1e-6)


def test_a_restart_with_another_model_is_never_served(upstream, flatten_cls, caplog):
    upstream.start()
    with BackgroundSidecar(remote(upstream.port), defense=fingerprinted(flatten_cls)) as sc:
        assert wait_health(sc.port, SERVING)
        assert infer(sc.port)[1] is None
        upstream.stop()
        upstream.temperature = 2.0                    # same port, same classes, another model
        upstream.start()
        served_wrong = 0
        deadline = time.monotonic() + 15
        while "upstream model refused" not in caplog.text and time.monotonic() < deadline:
            got, _ = infer(sc.port)
            served_wrong += got is not None and np.allclose(got, flatten_cls().transform(softmax(X / 2.0)),
                                                            rtol=1e-5)
        assert "upstream model refused" in caplog.text
        assert wait_health(sc.port, NOT_SERVING, timeout=2)
        assert infer(sc.port)[0] is None
    assert served_wrong == 0


def test_model_id_does_not_override_the_fingerprint_of_a_model_that_can_be_probed(upstream, flatten_cls):
    """Before: --model-id switched the fingerprint comparison off, and another model was served."""
    upstream.temperature = 2.0
    upstream.start()
    defense = fingerprinted(flatten_cls)
    defense.model_id = "ab" * 32
    with pytest.raises(ConfigError, match="defense: fitted for another model"):
        with BackgroundSidecar(remote(upstream.port, model_id="ab" * 32), defense=defense):
            pass


def test_model_id_as_in_the_triton_recipe_does_not_switch_off_the_identity_probes(upstream, flatten_cls):
    """docs/serving.md's Triton recipe passes --model-id "$(sha256sum model.onnx ...)". Before, that
    switched off the fingerprint and with it every identity probe: a model swapped behind Triton
    was served for as long as it stayed, although the upstream declares the fitted input."""
    upstream.start()
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
        assert wait_health(sc.port, NOT_SERVING, timeout=2)
    assert mismatches >= 1, (f"with --model-id the swapped model was served {served_by_another} times and never "
                             "probed: the upstream declares the fitted input, so it can be")


@pytest.mark.parametrize("inputs,why", [
    ([("x", "FP32", [-1, C + 1])], r"its input 'x' takes \[-1, 5\]"),
    ([("x", "INT32", [-1, C])], "its input 'x' is INT32"),
    ([("x", "FP32", [-1, C]), ("mask", "FP32", [-1, 1])], "it declares 2 inputs"),
    ([], r"it declares no inputs \(ModelMetadata\)"),
])
def test_metadata_that_contradicts_the_fitted_model_is_refused_at_start_up(upstream, flatten_cls, inputs, why):
    """Before: inputs the fingerprint could not be sent to (another datatype, several inputs, none
    declared) only gave the info line "not probed", and the upstream was served unverified."""
    spec = pb.ModelMetadataResponse.TensorMetadata

    def metadata(request, context):
        return pb.ModelMetadataResponse(name="m", versions=["1"], platform="fake",
                                        inputs=[spec(name=n, datatype=d, shape=sh) for n, d, sh in inputs],
                                        outputs=[spec(name="probs", datatype="FP32", shape=[-1, C])])

    upstream._model_metadata = metadata
    upstream.start()
    with pytest.raises(ConfigError, match=f"defense: the upstream model contradicts the fitted one: {why}, the "
                                          "defense was fitted for one floating-point input of 4 features"):
        with BackgroundSidecar(remote(upstream.port), defense=fingerprinted(flatten_cls)):
            pass
    defense = fingerprinted(flatten_cls)                        # the operator vouches for the model instead
    defense.model_id = "ab" * 32
    with BackgroundSidecar(remote(upstream.port, model_id="ab" * 32), defense=defense) as sc:
        assert wait_health(sc.port, SERVING)


def test_a_defense_without_fingerprint_is_accepted_with_a_warning(upstream, flatten_cls, caplog):
    upstream.start()
    defense = flatten_cls()
    defense.n_classes = C
    with BackgroundSidecar(remote(upstream.port), defense=defense) as sc:
        assert wait_health(sc.port, SERVING)
        assert infer(sc.port)[1] is None
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "no fingerprint" in r.getMessage()]
    assert len(warnings) == 1 and "refit it or pass --model-id" in warnings[0].getMessage()


@pytest.mark.parametrize("extra,message", [
    ({"confidence_output": "logits"}, "'logits' does not hold probabilities on the probe rows .* add --logits"),
    ({"confidence_output": "label"}, "confidence_output: the model has no output 'label'; choose one of probs, logits"),
])
def test_outputs_that_cannot_be_defended_are_refused_at_start_up(upstream, flatten_cls, extra, message):
    upstream.start()
    with pytest.raises(ConfigError, match=message):
        with BackgroundSidecar(remote(upstream.port, **extra), defense=fingerprinted(flatten_cls)):
            pass


def test_logits_are_served_with_logits_flag(upstream, flatten_cls):
    upstream.start()
    settings = remote(upstream.port, confidence_output="logits", confidence_kind="logits")
    with BackgroundSidecar(settings, defense=fingerprinted(flatten_cls)) as sc:
        assert wait_health(sc.port, SERVING)
        with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
            req = infer_request(X)
            req.outputs.add(name="logits")
            resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(X.shape)
    np.testing.assert_allclose(got, flatten_cls().transform(softmax(X)), rtol=1e-5)


def test_a_class_count_that_differs_from_the_defense_is_refused(upstream, flatten_cls):
    upstream.start()
    defense = fingerprinted(flatten_cls)
    defense.n_classes = C + 1
    with pytest.raises(ConfigError, match=f"defense: fitted for {C + 1} classes, the model's 'probs' has {C}"):
        with BackgroundSidecar(remote(upstream.port), defense=defense):
            pass
