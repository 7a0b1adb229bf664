"""A hostile upstream must not hand the clean vector of a client's last request to that client
through ModelMetadata and ModelConfig, over gRPC or REST.

The malicious-upstream suite checks every byte of ModelInfer answers. Before (a red-team review),
the sidecar answered a client's ModelMetadata (and ModelConfig) by asking the upstream again and
describing what it said: the input's name, datatype and dims, and the confidence output's
datatype and dims, were passed on as the upstream wrote them (constructed from typed values, but
any string and any list of int64 is a typed value), and `platform` as any 64-character token. So
the upstream answered ModelInfer honestly, then wrote the clean probabilities of the request it
just answered into its metadata; the client read them with one more call. Now every answer is
built from the description the model check took (model_description.describe), and a later check
that finds another description refuses the model.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
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

    def __init__(self, port: int = 0, config_failure: grpc.StatusCode | None = None,
                 honest_metadata: int | None = None):
        self.last: np.ndarray | None = None
        self.config_failure = config_failure
        # after this many ModelMetadata answers, describe the model with a vector in its platform
        # (as the clean vector of a request it answered would be), whether or not it answered one
        self.honest_metadata, self.metadata_calls = honest_metadata, 0
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
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
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
            if self.honest_metadata is not None and self.metadata_calls > self.honest_metadata:
                millionths = [int(round(float(p) * 1e6)) for p in softmax(X)[0]]
                # in the platform only: the rest would fail the model check's other tests first
                return "x", "FP32", [-1, C], "FP32", [-1, C], "p" + "_".join(str(m) for m in millionths)
        if last is None:
            return "x", "FP32", [-1, C], "FP32", [-1, C], "hostile"
        millionths = [int(round(float(p) * 1e6)) for p in last]
        text = ",".join(f"{p:.6f}" for p in last)
        return (f"x;{text}", f"FP32;{text}", [-1, C, *millionths], f"FP32;{text}", [-1, C, *millionths],
                "p" + "_".join(str(m) for m in millionths))

    def _metadata(self, request, context):
        with self.lock:
            self.metadata_calls += 1
        name, in_type, in_shape, out_type, out_shape, platform = self._payload()
        spec = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name="m", versions=["1"], platform=platform,
                                        inputs=[spec(name=name, datatype=in_type, shape=in_shape)],
                                        outputs=[spec(name="probs", datatype=out_type, shape=out_shape)])

    def _config(self, request, context):
        if self.config_failure is not None:
            context.abort(self.config_failure, "away")
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
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": 0,
                                 "metrics_port": -1, "health_poll_s": 0.1}, env={})
    try:
        with BackgroundSidecar(settings, defense=defense) as sc, \
                grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
            yield upstream, sc, pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        upstream.server.stop(0)


def described_through(sc, stub, front: str, method: str) -> str:
    """What a client reads of the model's description through one front, as text."""
    if front == "grpc":
        if method == "ModelMetadata":
            return str(stub.ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=10))
        return str(stub.ModelConfig(pb.ModelConfigRequest(name="m"), timeout=10))
    route = "/v2/models/m" + ("" if method == "ModelMetadata" else "/config")
    with urllib.request.urlopen(f"http://127.0.0.1:{sc.http_port}{route}", timeout=10) as r:
        return json.dumps(json.loads(r.read()))


def leaked_in(seen: str, clean: np.ndarray) -> list[str]:
    millionths = [str(int(round(float(p) * 1e6))) for p in clean]
    return [m for m in millionths if m in seen] + [f"{p:.6f}" for p in clean if f"{p:.6f}" in seen]


@pytest.mark.parametrize("front", ["grpc", "rest"])
@pytest.mark.parametrize("method", ["ModelMetadata", "ModelConfig"])
def test_the_model_description_does_not_carry_the_clean_vector(leaking, method, front):
    upstream, sc, stub = leaking
    honest = described_through(sc, stub, front, method)
    defended = stub.ModelInfer(infer_request(X, model="m"), timeout=10)
    clean = softmax(X)[0]
    assert not np.allclose(np.frombuffer(defended.raw_output_contents[0], np.float32), clean, atol=1e-4)
    seen = described_through(sc, stub, front, method)
    leaked = leaked_in(seen, clean)
    assert not leaked, f"{method} through the sidecar carries the clean vector of the last request: {seen!r}"
    assert seen == honest                               # what the model check took, word for word


def test_a_description_that_changes_after_the_check_refuses_the_model(leaking):
    """The upstream restarts (a new connection, so the model check runs again) and now describes
    the model with the clean vector in it: the check refuses the changed description."""
    upstream, sc, stub = leaking
    stub.ModelInfer(infer_request(X, model="m"), timeout=10)          # the upstream now has a vector to leak
    port = upstream.port
    upstream.server.stop(0)
    upstream.__init__(port=port)
    upstream.last = softmax(X)[0]
    deadline = time.monotonic() + 30                                    # a bound on the test
    while "refused" not in str(sc.readiness.refusal()) and time.monotonic() < deadline:
        time.sleep(0.05)
    refusal = sc.readiness.refusal()
    assert refusal is not None and "refused by the sidecar's model check" in str(refusal)
    assert not leaked_in(described_through(sc, stub, "grpc", "ModelMetadata"), softmax(X)[0])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(infer_request(X, model="m"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("code", "answered"), [(grpc.StatusCode.UNAVAILABLE, False),
                                                 (grpc.StatusCode.DEADLINE_EXCEEDED, False),
                                                 (grpc.StatusCode.UNIMPLEMENTED, True)])
def test_an_upstream_away_for_now_is_not_taken_to_serve_no_config(code, answered):
    """A ModelConfig that fails because the upstream is away for now is asked again (the check
    does not complete), not taken as "no config": that would describe the model without its
    max_batch_size, and a changed description refuses the model."""
    from purifier_server.errors import UpstreamFailed
    from purifier_server.upstream import RemoteUpstream

    upstream = LeakingMetadata(config_failure=code)

    async def ask():
        remote = RemoteUpstream(f"127.0.0.1:{upstream.port}", SERVICE, 5.0, name="m")
        try:
            return await remote.model_config("m", "")
        finally:
            await remote.close()

    try:
        if answered:
            assert asyncio.run(ask()) is None
        else:
            with pytest.raises(UpstreamFailed):
                asyncio.run(ask())
    finally:
        upstream.server.stop(0)


def test_every_worker_describes_the_model_as_worker_0_does(tmp_path):
    """`purifier serve --workers 2`: worker 1 starts after worker 0 serves (and may have forwarded
    requests), so its model check must not take its own description: it is given worker 0's,
    and an upstream that describes the model otherwise to worker 1 (here: with a vector in it)
    is refused, the sidecar does not start."""
    from purifier.serve_process import ServeProcess, ServerStartError

    upstream = LeakingMetadata(honest_metadata=1)
    try:
        with pytest.raises(ServerStartError) as refused:
            ServeProcess(["--upstream", f"127.0.0.1:{upstream.port}", "--model-name", "m", "--confidence-output",
                          "probs", "--defense", "none", "--workers", "2", "--metrics-port", "-1"],
                         log_path=tmp_path / "serve.log", ready_timeout_s=120).start()
    finally:
        upstream.server.stop(0)
    assert refused.value.returncode == 2
    assert "changed since the sidecar first checked it" in refused.value.log, refused.value.log[-2000:]
    assert upstream.metadata_calls >= 2  # worker 1 checked, and was described otherwise
