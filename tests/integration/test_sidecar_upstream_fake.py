"""Deadline and metadata propagation, and health transitions, against an in-process fake upstream."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from purifier.defenses import Defense
from purifier.errors import ConfigError, DefenseError
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)


class SlowUpstream(pb_grpc.GRPCInferenceServiceServicer):
    """Answers fixed probabilities after `delay` seconds and records what it was sent."""

    def __init__(self):
        self.delay = 0.0
        self.ready = True
        self.answer, self.datatype = PROBS, "FP32"
        self.seen_remaining: list[float | None] = []
        self.seen_metadata: list[dict] = []
        self.cancelled = threading.Event()
        self.trailers = (("x-upstream", "yes"),)
        self.parameters: dict[str, int] = {}

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.ready)

    def ModelInfer(self, request, context):
        self.seen_remaining.append(context.time_remaining())
        self.seen_metadata.append(dict(context.invocation_metadata()))
        context.add_callback(self.cancelled.set)
        time.sleep(self.delay)
        context.set_trailing_metadata(self.trailers)
        resp = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        for key, value in self.parameters.items():
            resp.parameters[key].int64_param = value
        resp.outputs.add(name="probs", datatype=self.datatype, shape=self.answer.shape)
        resp.outputs.add(name="logits", datatype="FP32", shape=PROBS.shape)
        resp.raw_output_contents.extend([self.answer.tobytes(), np.log(PROBS).tobytes()])
        return resp


@pytest.fixture(scope="module")
def fake():
    servicer = SlowUpstream()
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, server, port
    finally:
        server.stop(0)


def test_only_allow_listed_trailers_and_parameters_come_back(fake, flatten_cls):
    servicer = fake[0]
    servicer.parameters = {"sequence_id": 7, "internal": 8}
    servicer.trailers = (("x-upstream", "yes"), ("x-internal", "no"))
    settings = Settings.resolve({"upstream": f"127.0.0.1:{fake[2]}", "model_name": "m", "confidence_output": "probs",
                                 "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1,
                                 "allow_parameters": ("sequence_id",), "allow_trailers": ("x-upstream",)}, env={})
    try:
        with BackgroundSidecar(settings, defense=flatten_cls()) as sc, \
                grpc.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
            resp, call = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer.with_call(request(), timeout=5)
    finally:
        servicer.parameters, servicer.trailers = {}, (("x-upstream", "yes"),)
    trailers = dict(call.trailing_metadata())
    assert trailers.get("x-upstream") == "yes" and "x-internal" not in trailers
    assert list(resp.parameters) == ["sequence_id"] and resp.parameters["sequence_id"].int64_param == 7


@pytest.fixture(scope="module")
def sidecar(fake, flatten_cls):
    settings = Settings.resolve({"upstream": f"127.0.0.1:{fake[2]}", "model_name": "m", "confidence_output": "probs",
                                 "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1, "health_poll_s": 0.1}, env={})
    with BackgroundSidecar(settings, defense=flatten_cls()) as sc:
        yield sc


def request():
    req = pb.ModelInferRequest(model_name="m", id="fake-1")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 1])
    req.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    return req


def test_deadline_and_metadata_reach_the_upstream_and_trailers_do_not_come_back(fake, sidecar):
    servicer = fake[0]
    servicer.delay = 0.0
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        resp, call = stub.ModelInfer.with_call(request(), timeout=5.0, metadata=(("x-tenant", "t1"),))
        assert "x-upstream" not in dict(call.trailing_metadata())  # only allow_trailers pass
        assert [o.name for o in resp.outputs] == ["probs"] and resp.id == "fake-1"
        got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(PROBS.shape)
        np.testing.assert_allclose(got, type(sidecar.defense)().transform(PROBS), rtol=1e-6)
        assert 0 < servicer.seen_remaining[-1] <= 5.1  # gRPC rounds the wire timeout up a little
        assert servicer.seen_metadata[-1]["x-tenant"] == "t1"

        servicer.delay, servicer.cancelled = 1.0, threading.Event()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request(), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert servicer.seen_remaining[-1] <= 0.35  # the client's 0.3 s, not the 30 s default
        assert servicer.cancelled.wait(2.0)  # the upstream call ended with the client's deadline
        servicer.delay = 0.0


def test_health_follows_the_upstream(fake, sidecar):
    servicer, server, port = fake
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def wait_for(status):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if health.Check(health_pb2.HealthCheckRequest(service="")).status == status:
                    return True
                time.sleep(0.05)
            return False

        assert wait_for(health_pb2.HealthCheckResponse.SERVING)
        servicer.ready = False
        try:
            assert wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        finally:
            servicer.ready = True
        assert wait_for(health_pb2.HealthCheckResponse.SERVING)


class RecordsInputs(Defense):
    """A defense that needs the request rows (as PURIFIER's label swapper does) and records them."""

    name = "test-inputs"
    needs_inputs = True

    def __init__(self, *, secret=None):
        super().__init__(secret=secret)
        self.seen: list[np.ndarray] = []

    def _transform(self, p, inputs):
        self.seen.append(inputs.copy())
        return p, None


def test_defenses_that_need_inputs_get_the_request_rows(fake):
    settings = Settings.resolve({"upstream": f"127.0.0.1:{fake[2]}", "model_name": "m", "confidence_output": "probs",
                                 "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1}, env={})
    defense = RecordsInputs()
    with BackgroundSidecar(settings, defense=defense) as sc, grpc.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
        req = request()
        x = np.array([[1.5], [-2.0]], np.float32)
        req.raw_input_contents[0] = x.tobytes()
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=5)
    assert len(defense.seen) == 1 and np.array_equal(defense.seen[0], x)


def test_defense_fitted_for_another_model_is_refused_at_start_up(digits_target):
    settings = Settings.resolve({"model": str(digits_target.directory), "host": "127.0.0.1", "port": 0, "http_port": 0,
                                 "metrics_port": -1}, env={})
    defense = RecordsInputs()
    defense.model_id = "0" * 64
    with pytest.raises(ConfigError, match="fitted for model 000000000000"):
        with BackgroundSidecar(settings, defense=defense):
            pass


class Raises(Defense):
    name = "test-raises"

    def __init__(self, *, error: Exception | None = None, secret=None):
        super().__init__(secret=secret)
        self.error = error

    def _transform(self, p, inputs):
        raise self.error


@pytest.mark.parametrize("error,message", [
    (DefenseError("boom"), "the defense failed; see the sidecar log"),
    (RuntimeError("bug"), "internal error; see the sidecar log"),
])
def test_a_failing_defense_is_internal_and_counted_never_the_clean_vector(fake, error, message):
    settings = Settings.resolve({"upstream": f"127.0.0.1:{fake[2]}", "model_name": "m", "confidence_output": "probs",
                                 "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1}, env={})
    with BackgroundSidecar(settings, defense=Raises(error=error)) as sc, \
            grpc.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request(), timeout=5)
        assert info.value.code() == grpc.StatusCode.INTERNAL and message in info.value.details()
        assert sc.metrics.registry.get_sample_value("purifier_requests_total",
                                                    {"model": "m", "outcome": "INTERNAL"}) == 1


def test_upstream_service_name_is_configurable_for_torchserve(flatten_cls):
    """TorchServe serves the same messages under org.pytorch.serve.grpc.openinference."""
    service = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"
    servicer = SlowUpstream()
    handlers = {
        "ModelReady": grpc.unary_unary_rpc_method_handler(
            servicer.ModelReady, request_deserializer=pb.ModelReadyRequest.FromString,
            response_serializer=pb.ModelReadyResponse.SerializeToString),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString),
    }
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = Settings.resolve({"upstream": f"127.0.0.1:{port}", "upstream_service": service, "model_name": "m",
                                     "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": 0,
                                     "metrics_port": -1}, env={})
        with BackgroundSidecar(settings, defense=flatten_cls()) as sc, \
                grpc.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
            resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request(), timeout=5)
        got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(PROBS.shape)
        np.testing.assert_allclose(got, flatten_cls().transform(PROBS), rtol=1e-6)
    finally:
        server.stop(0)


def test_graceful_stop_finishes_in_flight_calls_and_refuses_new_ones(fake, flatten_cls):
    servicer = fake[0]
    settings = Settings.resolve({"upstream": f"127.0.0.1:{fake[2]}", "model_name": "m", "confidence_output": "probs",
                                 "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1}, env={})
    background = BackgroundSidecar(settings, defense=flatten_cls())
    sc = background.__enter__()
    servicer.delay = 0.8
    try:
        with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            seen = len(servicer.seen_remaining)
            in_flight = stub.ModelInfer.future(request(), timeout=10)
            deadline = time.monotonic() + 5
            while len(servicer.seen_remaining) == seen and time.monotonic() < deadline:
                time.sleep(0.01)
            stopping = asyncio.run_coroutine_threadsafe(sc.stop(grace=5.0), background.loop)
            time.sleep(0.2)
            with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as other:
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.GRPCInferenceServiceStub(other).ModelInfer(request(), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert in_flight.result(timeout=10).id == "fake-1"   # the in-flight call completed
            stopping.result(timeout=10)
    finally:
        servicer.delay = 0.0
        background.__exit__(None, None, None)


@pytest.mark.parametrize("answer,datatype,reason,detail", [
    (np.array([[1.2, -0.1, -0.1], [0.1, 0.3, 0.6]], np.float32), "FP32", "not probability vectors",
     "row 0 has negative entries"),
    (np.array([[0.5, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32), "FP32", "not probability vectors", "row 0 sums to 0.8"),
    (np.full((2, 4), 0.25, np.float32), "FP32", "not probability vectors", "4 classes, the defense was fitted for 3"),
    (np.array([[1, 0, 0], [0, 0, 1]], np.int32), "INT32", "confidence output not floating point",
     "is INT32, expected one of FP16, FP32, FP64"),
    (np.full((2, 2), 0.5, np.float64), "FP32", "malformed tensor", "needs 16 bytes, raw contents has 32"),
])
def test_upstream_answers_that_are_not_probabilities_are_errors(fake, sidecar, caplog, answer, datatype, reason,
                                                                detail):
    """The client learns the category; the detail (computed from the upstream's values) goes to the log."""
    servicer = fake[0]
    sidecar.defense.n_classes = 3
    servicer.answer, servicer.datatype = answer, datatype
    try:
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request(), timeout=5)
            assert info.value.code() == grpc.StatusCode.INTERNAL and f"({reason})" in info.value.details()
            assert detail not in info.value.details() and detail in caplog.text
            servicer.answer, servicer.datatype = PROBS, "FP32"
            assert stub.ModelInfer(request(), timeout=5).id == "fake-1"
    finally:
        servicer.answer, servicer.datatype = PROBS, "FP32"
        sidecar.defense.n_classes = None


def test_start_up_refuses_a_busy_port_and_a_class_count_mismatch(digits_target, fake, flatten_cls):
    base = {"host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1}
    with BackgroundSidecar(Settings.resolve({"model": str(digits_target.directory), "defense": "none", **base},
                                            env={})) as first:
        busy = Settings.resolve({"upstream": f"127.0.0.1:{fake[2]}", "model_name": "m", "confidence_output": "probs",
                                 **base, "port": first.port}, env={})
        with pytest.raises(ConfigError, match="port: cannot listen on 127.0.0.1"):
            with BackgroundSidecar(busy, defense=flatten_cls()):
                pass
    defense = flatten_cls()
    defense.n_classes = 3
    with pytest.raises(ConfigError, match="defense: fitted for 3 classes, the model's 'probabilities' has 10"):
        with BackgroundSidecar(Settings.resolve({"model": str(digits_target.directory), **base}, env={}),
                               defense=defense):
            pass
