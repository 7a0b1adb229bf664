"""MLServer (mlserver-sklearn, FP64 predict_proba) as a real upstream process, the sidecar in front."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sidecar(mlserver, flatten_cls):
    settings = Settings.resolve({"upstream": f"127.0.0.1:{mlserver.grpc_port}", "model_name": mlserver.model_name,
                                 "confidence_output": "predict_proba", "host": "127.0.0.1", "port": 0, "http_port": 0,
                                 "metrics_port": 0, "health_poll_s": 0.2}, env={})
    with BackgroundSidecar(settings, defense=flatten_cls()) as sc:
        yield sc


def infer(port, name, x, **kw):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inp = grpcclient.InferInput("input-0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(name, [inp], **kw)
    finally:
        client.close()


def test_outputs_are_defended_fp64_with_upstream_argmax_and_id(mlserver, sidecar, digits_rows):
    direct = infer(mlserver.grpc_port, mlserver.model_name, digits_rows).as_numpy("predict_proba")
    res = infer(sidecar.port, mlserver.model_name, digits_rows, request_id="mls-7")
    got = res.as_numpy("predict_proba")
    assert direct.dtype == got.dtype == np.float64
    np.testing.assert_allclose(got, type(sidecar.defense)().transform(direct), rtol=1e-12)
    assert np.array_equal(got.argmax(1), direct.argmax(1))
    assert np.abs(got - direct).sum(1).min() > 1e-3
    assert res.get_response().id == "mls-7"


def test_the_recipes_declared_outputs_are_described(mlserver, sidecar):
    """model-settings.json declares predict_proba (the README recipe), so metadata lists it and
    `purifier bench` needs no --output-name."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    try:
        meta = client.get_model_metadata(mlserver.model_name)
    finally:
        client.close()
    assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [("predict_proba", "FP64", [-1, 10])]


def test_metrics_count_the_requests(sidecar, digits_rows):
    def ok():
        text = urllib.request.urlopen(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=5).read().decode()
        fam = {f.name: f for f in text_string_to_metric_families(text)}["purifier_requests"]
        return sum(s.value for s in fam.samples if s.name.endswith("_total") and s.labels["outcome"] == "OK")

    before = ok()
    for _ in range(4):
        infer(sidecar.port, sidecar.model_name, digits_rows)
    assert ok() == before + 4


def test_client_deadline_is_enforced_through_the_sidecar(sidecar, digits_rows):
    with pytest.raises(InferenceServerException) as info:
        infer(sidecar.port, sidecar.model_name, np.repeat(digits_rows, 64, axis=0), client_timeout=0.0005)
    assert "DEADLINE_EXCEEDED" in str(info.value.status())
    infer(sidecar.port, sidecar.model_name, digits_rows)  # still serving


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_rest_clients_get_the_defended_fp64_answer(mlserver, sidecar, digits_rows, binary):
    """tritonclient.http through the sidecar's REST front, MLServer behind it over gRPC."""
    import tritonclient.http as httpclient

    expected = infer(sidecar.port, mlserver.model_name, digits_rows).as_numpy("predict_proba")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{sidecar.http_port}")
    try:
        inp = httpclient.InferInput("input-0", list(digits_rows.shape), "FP32")
        inp.set_data_from_numpy(digits_rows, binary_data=binary)
        got = client.infer(mlserver.model_name, [inp], outputs=[
            httpclient.InferRequestedOutput("predict_proba", binary_data=binary)]).as_numpy("predict_proba")
    finally:
        client.close()
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


def test_mlserver_over_rest_is_defended_alike(mlserver, sidecar, flatten_cls, digits_rows):
    """--upstream http://...: MLServer's REST front behind the sidecar gives the gRPC path's answers."""
    expected = infer(sidecar.port, mlserver.model_name, digits_rows).as_numpy("predict_proba")
    settings = Settings.resolve({"upstream": f"http://127.0.0.1:{mlserver.http_port}",
                                 "model_name": mlserver.model_name, "confidence_output": "predict_proba",
                                 "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1,
                                 "health_poll_s": 0.2}, env={})
    with BackgroundSidecar(settings, defense=flatten_cls()) as rest:
        got = infer(rest.port, mlserver.model_name, digits_rows, request_id="over-rest")
        np.testing.assert_allclose(got.as_numpy("predict_proba"), expected, rtol=1e-12)
        assert got.get_response().id == "over-rest"
        with pytest.raises(InferenceServerException, match="not served"):
            infer(rest.port, mlserver.model_name, digits_rows, outputs=[grpcclient.InferRequestedOutput("predict")])


def test_stream_infer_is_defended_as_unary(mlserver, sidecar, digits_rows):
    import queue

    expected = infer(sidecar.port, mlserver.model_name, digits_rows[:3]).as_numpy("predict_proba")
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(3):
            inp = grpcclient.InferInput("input-0", [1, 64], "FP32")
            inp.set_data_from_numpy(digits_rows[i:i + 1])
            client.async_stream_infer(mlserver.model_name, [inp], request_id=str(i))
        got = [answers.get(timeout=60) for _ in range(3)]
    finally:
        client.stop_stream()
        client.close()
    assert all(e is None for _, e in got), [str(e) for _, e in got]
    for result, _ in got:
        np.testing.assert_allclose(result.as_numpy("predict_proba")[0], expected[int(result.get_response().id)],
                                   rtol=1e-12)


def test_stopped_upstream_gives_unavailable_and_not_serving(mlserver, sidecar, digits_rows):
    """Runs last in this module: it stops the module's MLServer."""
    mlserver.stop()
    with pytest.raises(InferenceServerException) as info:
        infer(sidecar.port, sidecar.model_name, digits_rows)
    assert "UNAVAILABLE" in str(info.value.status())
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
