"""Red-team: a hostile upstream hands the clean vector of a client's last request to that client
through ModelMetadata and ModelConfig.

The malicious-upstream suite checks every byte of ModelInfer answers. But the sidecar answers a
client's ModelMetadata (and ModelConfig) by asking the upstream again and describing what it
says: the input's name, datatype and dims, and the confidence output's datatype and dims, are
passed on as the upstream wrote them (model_description "constructs" them, from typed values,
but any string and any list of int64 is a typed value), and `platform` as any 64-character
token. So the upstream answers ModelInfer honestly, then writes the clean probabilities of the
request it just answered into its metadata; the client reads them with one more call. The model
check verified the metadata once, at start-up, and nothing checks it again.

Expected: the description a client gets is the one the model check verified (or at least one
whose names, datatypes and dims agree with it), so no clean value reaches the client by this
route either.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from oip_fake import infer_request, softmax

from purifier.defenses import Fingerprint
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.codec import decode_inputs
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
SERVICE = "inference.GRPCInferenceService"
C = 4
PROBE_ROWS = np.random.default_rng(11).normal(0, 1.5, size=(64, C)).astype(np.float32)
X = np.random.default_rng(7).normal(0, 0.6, size=(1, C)).astype(np.float32)


class LeakingMetadata:
    """Honest ModelInfer; ModelMetadata and ModelConfig that carry the last answered clean row once
    a client request has been answered (before that: the honest description)."""

    def __init__(self):
        self.last: np.ndarray | None = None
        self.lock = threading.Lock()
        server = grpc.server(ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
        handlers = {
            "ModelReady": grpc.unary_unary_rpc_method_handler(
                lambda r, c: pb.ModelReadyResponse(ready=True), pb.ModelReadyRequest.FromString,
                pb.ModelReadyResponse.SerializeToString),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(
                self._metadata, pb.ModelMetadataRequest.FromString, pb.ModelMetadataResponse.SerializeToString),
            "ModelConfig": grpc.unary_unary_rpc_method_handler(
                self._config, pb.ModelConfigRequest.FromString, pb.ModelConfigResponse.SerializeToString),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                self._infer, pb.ModelInferRequest.FromString, pb.ModelInferResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.server = server

    def _infer(self, request, context):
        x = decode_inputs(request)[0]
        probs = softmax(x)
        if len(x) == 1 and not (x[0] == PROBE_ROWS).all(axis=1).any():   # a client's row, not a probe
            with self.lock:
                self.last = probs[0]
        response = pb.ModelInferResponse(model_name="m", id=request.id)
        response.outputs.add(name="probs", datatype="FP32", shape=x.shape)
        response.raw_output_contents.append(probs.tobytes())
        return response

    def _payload(self):
        with self.lock:
            last = self.last
        if last is None:
            return "x", "FP32", [-1, C], "FP32", [-1, C], "hostile"
        millionths = [int(round(float(p) * 1e6)) for p in last]
        text = ",".join(f"{p:.6f}" for p in last)
        return (f"x;{text}", f"FP32;{text}", [-1, C, *millionths], f"FP32;{text}", [-1, C, *millionths],
                "p" + "_".join(str(m) for m in millionths))

    def _metadata(self, request, context):
        name, in_type, in_shape, out_type, out_shape, platform = self._payload()
        spec = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name="m", versions=["1"], platform=platform,
                                        inputs=[spec(name=name, datatype=in_type, shape=in_shape)],
                                        outputs=[spec(name="probs", datatype=out_type, shape=out_shape)])

    def _config(self, request, context):
        name, _, in_shape, _, out_shape, platform = self._payload()
        config = pb.ModelConfig(name="m", platform=platform, max_batch_size=8)
        config.input.add(name=name, data_type=pb.TYPE_FP32, dims=in_shape[1:])
        config.output.add(name="probs", data_type=pb.TYPE_FP32, dims=out_shape[1:])
        return pb.ModelConfigResponse(config=config)


@pytest.fixture
def leaking(flatten_cls):
    upstream = LeakingMetadata()
    defense = flatten_cls()
    defense.n_classes = C
    defense.fingerprint = Fingerprint(PROBE_ROWS, softmax(PROBE_ROWS).astype(np.float64))
    settings = Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "metrics_port": -1},
                                env={})
    try:
        with BackgroundSidecar(settings, defense=defense) as sc, \
                grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        upstream.server.stop(0)


@pytest.mark.xfail(strict=True, reason="red-team break open; fixed on branch hardening")
@pytest.mark.parametrize("method", ["ModelMetadata", "ModelConfig"])
def test_the_model_description_does_not_carry_the_clean_vector(leaking, method):
    stub = leaking
    defended = stub.ModelInfer(infer_request(X, model="m"), timeout=10)
    clean = softmax(X)[0]
    assert not np.allclose(np.frombuffer(defended.raw_output_contents[0], np.float32), clean, atol=1e-4)
    if method == "ModelMetadata":
        described = stub.ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=10)
    else:
        described = stub.ModelConfig(pb.ModelConfigRequest(name="m"), timeout=10)
    seen = str(described)
    millionths = [str(int(round(float(p) * 1e6))) for p in clean]
    leaked = [m for m in millionths if m in seen] + [f"{p:.6f}" for p in clean if f"{p:.6f}" in seen]
    assert not leaked, f"{method} through the sidecar carries the clean vector of the last request: {seen!r}"
