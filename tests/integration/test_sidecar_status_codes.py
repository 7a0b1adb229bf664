"""Health follows the upstream's readiness probe only, and every status code names who must act.

Against `oip_fake.FakeUpstream`: an UNAVAILABLE caused by one request (TorchServe reports handler
errors that way) must not make health flap; a request that meets an upstream NOT_FOUND while the
model reloads waits for the reload within its deadline (clients treat NOT_FOUND as permanent, so
it is never passed on then); a dropped first attempt is retried within the
caller's deadline; a client's NaN/Inf input is INVALID_ARGUMENT even when the upstream is the
one that chokes on it; an undecodable message is INVALID_ARGUMENT, counted and logged.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from oip_fake import infer_request, softmax

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
X = np.array([[0.5, -1.0, 2.0]], np.float32)
POISON = np.array([[666.0, 0.0, 0.0]], np.float32)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def sidecar(upstream, flatten_cls):
    settings = Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1,
                                 "health_poll_s": 0.1}, env={})
    with BackgroundSidecar(settings, defense=flatten_cls()) as sc:
        yield sc


def failing_for(upstream, x_first: float, code: grpc.StatusCode, times: int | None = None):
    """Make the upstream abort ModelInfer with `code` for inputs whose first value is `x_first`
    (at most `times` times), answering normally otherwise."""
    original = upstream._model_infer
    left = [times]

    def infer(request, context):
        x = np.frombuffer(request.raw_input_contents[0], np.float32)
        if x[0] == x_first and (left[0] is None or left[0] > 0):
            if left[0] is not None:
                left[0] -= 1
            upstream._record("ModelInfer")
            context.abort(code, "handler error in the model")
        return original(request, context)

    return infer


def test_one_requests_unavailable_does_not_flip_health(sidecar, stub, upstream, monkeypatch, flatten_cls):
    """Before: the sidecar went NOT_SERVING at once, so any client could make readiness flap."""
    monkeypatch.setattr(upstream, "_model_infer", failing_for(upstream, 666.0, grpc.StatusCode.UNAVAILABLE))
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        statuses: list = []

        def read():
            try:
                statuses.extend(m.status for m in watch)
            except grpc.RpcError:
                pass                                                  # cancelled below

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(infer_request(POISON), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            resp = stub.ModelInfer(infer_request(X), timeout=5)       # the others keep being served
            got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(X.shape)
            np.testing.assert_allclose(got, flatten_cls().transform(softmax(X)), rtol=1e-6)
        time.sleep(0.5)                                               # several readiness polls
        watch.cancel()
        reader.join(timeout=5)
    assert statuses and set(statuses) == {SERVING}, statuses
    assert upstream.calls.count("ModelReady") > 0


def test_upstream_not_found_while_the_model_reloads_waits_for_the_reload(sidecar, stub, upstream, monkeypatch,
                                                                        flatten_cls):
    """Triton answers NOT_FOUND while it reloads a model (ModelReady false): a request waits for the
    reload within its deadline and is answered after it; one whose deadline ends first gets
    DEADLINE_EXCEEDED. Never NOT_FOUND, which clients take as permanent."""
    original = upstream._model_infer

    def reloading(request, context):
        upstream._record("ModelInfer")
        context.abort(grpc.StatusCode.NOT_FOUND, "handler error: model reloading")

    monkeypatch.setattr(upstream, "_model_infer", reloading)
    upstream.ready = False                                            # reloading: ModelReady says no
    try:
        waiting = stub.ModelInfer.future(infer_request(X), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(infer_request(X), timeout=1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert not waiting.done()
    finally:
        monkeypatch.setattr(upstream, "_model_infer", original)      # reloaded
        upstream.ready = True
    got = np.frombuffer(waiting.result().raw_output_contents[0], np.float32).reshape(X.shape)
    np.testing.assert_allclose(got, flatten_cls().transform(softmax(X)), rtol=1e-6)
    monkeypatch.setattr(upstream, "_model_infer", failing_for(upstream, 666.0, grpc.StatusCode.NOT_FOUND))
    with pytest.raises(grpc.RpcError) as info:                       # ready: NOT_FOUND is the upstream's answer
        stub.ModelInfer(infer_request(POISON), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "handler error" not in info.value.details()               # the upstream's own text stays in the log


def test_a_dropped_first_attempt_is_retried_within_the_deadline(stub, upstream, monkeypatch, flatten_cls):
    monkeypatch.setattr(upstream, "_model_infer", failing_for(upstream, 0.5, grpc.StatusCode.UNAVAILABLE, times=1))
    before = upstream.calls.count("ModelInfer")
    resp = stub.ModelInfer(infer_request(X), timeout=5)
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(X.shape)
    np.testing.assert_allclose(got, flatten_cls().transform(softmax(X)), rtol=1e-6)
    assert upstream.calls.count("ModelInfer") - before == 2          # the refused attempt and the retry


@pytest.mark.parametrize("row", [[0.5, np.nan, 2.0], [0.5, np.inf, 2.0], [-np.inf] * 3])
def test_a_clients_nan_or_inf_is_invalid_argument_not_an_upstream_fault(sidecar, stub, upstream, row):
    """The upstream answers NaN confidences for these inputs (softmax). Before: INTERNAL "upstream
    output is not a probability vector", blaming the model server for the client's mistake."""
    x = np.array([row], np.float32)
    before = upstream.infer_count
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(infer_request(x), timeout=5)
    assert upstream.infer_count == before + 1                          # the upstream did answer
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "input 'x' holds NaN or Inf" in info.value.details()
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == SERVING


def test_undecodable_messages_are_invalid_argument_counted_and_logged(sidecar, upstream, caplog):
    caplog.set_level(logging.WARNING, logger="purifier_server")
    before = upstream.infer_count
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        for method in ("ModelInfer", "ModelMetadata"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff\xff garbage", timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "Error" not in info.value.details()                # no Python exception names
        ok = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(X), timeout=5)
    assert isinstance(ok, pb.ModelInferResponse) and upstream.infer_count == before + 1
    counted = sidecar.metrics.registry.get_sample_value("purifier_requests_total",
                                                        {"model": "m", "outcome": "INVALID_ARGUMENT"})
    assert counted == 1
    assert caplog.text.count("undecodable request") == 2
