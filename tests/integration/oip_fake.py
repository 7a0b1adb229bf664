"""An in-process OIP v2 upstream for reliability tests: answers any method, records every call.

It serves `inference.GRPCInferenceService` through a generic handler, so *every* method name the
sidecar could forward (repository, shared-memory, model-control, streaming...) would be answered
with success here: a test that checks "the upstream never saw X" can therefore really fail.

`ModelInfer` is a pure function of the request: an FP32 input x of shape (N, C) gives
`probs` = softmax(x / temperature) and `logits` = x / temperature (both FP32, raw), so a test can
compute the expected defended answer for every input it sent; another `temperature` is another
model with the same classes. With `width` set, ModelMetadata declares input `x` and both outputs
as FP32 [-1, width] (the sidecar then probes the model); without it, ModelMetadata answers an
empty message like every other method. The server can be stopped and restarted on the same port
(an upstream outage, or a restart with another model), made slow (`delay`) or not ready
(`ready`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from purifier_server._proto import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


def softmax(x: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, C) row softmax in float32 (computed in float64, as the fake answers)."""
    z = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def infer_request(x: np.ndarray, model: str = "m", request_id: str = "r") -> pb.ModelInferRequest:
    """A well-formed raw FP32 request carrying `x` (N, C) as input "x"."""
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    return req


class FakeUpstream:
    """A restartable fake OIP server on a fixed loopback port (port 0 on first start picks one)."""

    def __init__(self, workers: int = 8, width: int | None = None, temperature: float = 1.0):
        self.workers = workers
        self.width = width
        self.temperature = temperature
        self.port = 0
        self.delay = 0.0
        self.gate: threading.Barrier | None = None  # ModelInfer waits at it (to answer calls together)
        self.ready = True
        self.calls: list[str] = []          # method names, in arrival order
        self.infer_count = 0
        self.seen_parameters: list[set[str]] = []
        self.seen_metadata: list[dict] = []     # the invocation metadata of every ModelInfer
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None

    # --- handlers -----------------------------------------------------------------------------

    def _record(self, method: str) -> None:
        with self._lock:
            self.calls.append(method)

    def _model_ready(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        self._record("ModelReady")
        return pb.ModelReadyResponse(ready=self.ready)

    def _model_infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        self._record("ModelInfer")
        with self._lock:
            self.infer_count += 1
            self.seen_parameters.append(set(request.parameters) | {k for o in request.outputs for k in o.parameters})
            self.seen_metadata.append(dict(context.invocation_metadata()))
        if self.delay:
            time.sleep(self.delay)
        if self.gate is not None:
            self.gate.wait(timeout=30)
        t = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(tuple(t.shape)) / self.temperature
        resp = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        resp.outputs.add(name="probs", datatype="FP32", shape=x.shape)
        resp.outputs.add(name="logits", datatype="FP32", shape=x.shape)
        resp.raw_output_contents.extend([softmax(x).tobytes(), np.ascontiguousarray(x).tobytes()])
        return resp

    def _model_metadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        self._record("ModelMetadata")
        spec = pb.ModelMetadataResponse.TensorMetadata
        shape = [-1, self.width]
        return pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="fake",
                                        inputs=[spec(name="x", datatype="FP32", shape=shape)],
                                        outputs=[spec(name=n, datatype="FP32", shape=shape) for n in ("probs", "logits")])

    def _anything(self, method: str):
        def handler(request: bytes, context) -> bytes:
            self._record(method)
            return b""  # an empty message parses as any response type: a forwarded call would succeed

        return handler

    def _stream(self, method: str):
        def handler(requests, context):
            self._record(method)
            for _ in requests:
                yield b""

        return handler

    def _handler(self, details):
        service, _, method = details.method.lstrip("/").partition("/")
        if service != SERVICE:
            return None
        if method == "ModelReady":
            return grpc.unary_unary_rpc_method_handler(self._model_ready, pb.ModelReadyRequest.FromString,
                                                       pb.ModelReadyResponse.SerializeToString)
        if method == "ModelMetadata" and self.width is not None:
            return grpc.unary_unary_rpc_method_handler(self._model_metadata, pb.ModelMetadataRequest.FromString,
                                                       pb.ModelMetadataResponse.SerializeToString)
        if method == "ModelInfer":
            return grpc.unary_unary_rpc_method_handler(self._model_infer, pb.ModelInferRequest.FromString,
                                                       pb.ModelInferResponse.SerializeToString)
        if method == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._anything(method))

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        outer = self

        class Generic(grpc.GenericRpcHandler):
            def service(self, details):
                return outer._handler(details)

        server = grpc.server(ThreadPoolExecutor(self.workers), handlers=(Generic(),),
                             options=[("grpc.so_reuseport", 0)])
        deadline = time.monotonic() + 10
        while True:  # the old listener may need a moment to release a fixed port
            try:
                port = server.add_insecure_port(f"127.0.0.1:{self.port}")
            except RuntimeError:
                port = 0
            if port or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not port:
            raise RuntimeError(f"fake upstream cannot bind 127.0.0.1:{self.port}")
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(5)
            self._server = None

    def forwarded(self, since: int = 0) -> list[str]:
        """Methods other than the health poll's ModelReady seen since call index `since`."""
        with self._lock:
            return [m for m in self.calls[since:] if m != "ModelReady"]
