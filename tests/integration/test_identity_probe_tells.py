"""An upstream that tells identity probes from client requests must not escape the identity check.

docs/serving.md promises that an upstream cannot tell a probe from a client request by its id,
size, version, representation, requested outputs, deadline or timing, nor by what the model check
asked. Each test runs a hostile upstream that answers what it takes for a probe with the fitted
model (softmax(x)) and every other request with another model with the same classes
(softmax(x / 3)), while a client sends ordinary traffic through the sidecar; the identity check
must catch it (a probe mismatch, then NOT_SERVING). Each cheat uses one observation the upstream
always has, and each worked before (a red-team review):

* the deadline: probes went out with PROBE_TIMEOUT_S (10 s), client requests with the client's
  deadline or upstream_timeout_s (30 s), so the upstream read the probe off `time_remaining()`;
  now a probe carries the deadline of a recent client request;
* the poll: probes were sent by the health poller right after its ModelReady call, so a
  ModelInfer a few milliseconds after a ModelReady was a probe; now probes run on their own clock;
* the rows: the model check after every (re)connection sent all 64 stored rows right after
  ModelMetadata, so the upstream knew every row a later probe could draw from; now the check asks
  a few rows (`Fingerprint.check_rows`) and probes draw from the others.
"""

from __future__ import annotations

import threading
import time
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


class CheatingUpstream:
    """Declares input x FP32 [-1, C] and output probs; answers ModelInfer with the fitted model
    when `looks_like_probe(request, context, x)` says so, per row when it returns a (N,) mask."""

    def __init__(self):
        self.looks_like_probe = lambda request, context, x: False
        self.last_ready = 0.0
        self.after_metadata = False
        self.lock = threading.Lock()
        self.answered = {"fitted": 0, "other": 0}
        server = grpc.server(ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
        spec = pb.ModelMetadataResponse.TensorMetadata
        metadata = pb.ModelMetadataResponse(name="m", versions=["1"], platform="cheat",
                                            inputs=[spec(name="x", datatype="FP32", shape=[-1, C])],
                                            outputs=[spec(name="probs", datatype="FP32", shape=[-1, C])])

        def ready(request, context):
            with self.lock:
                self.last_ready = time.monotonic()
            return pb.ModelReadyResponse(ready=True)

        def meta(request, context):
            with self.lock:
                self.after_metadata = True
            return metadata

        handlers = {
            "ModelReady": grpc.unary_unary_rpc_method_handler(ready, pb.ModelReadyRequest.FromString,
                                                              pb.ModelReadyResponse.SerializeToString),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(meta, pb.ModelMetadataRequest.FromString,
                                                                 pb.ModelMetadataResponse.SerializeToString),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self._infer, pb.ModelInferRequest.FromString,
                                                              pb.ModelInferResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.server = server

    def _infer(self, request, context):
        x = decode_inputs(request)[0]
        fitted = np.broadcast_to(np.asarray(self.looks_like_probe(request, context, x), bool), (len(x),))
        with self.lock:
            self.answered["fitted"] += int(fitted.sum())
            self.answered["other"] += int((~fitted).sum())
        probs = np.where(fitted[:, None], softmax(x), softmax(x / 3.0))
        response = pb.ModelInferResponse(model_name="m", id=request.id)
        response.outputs.add(name="probs", datatype="FP32", shape=x.shape)
        response.raw_output_contents.append(np.ascontiguousarray(probs, np.float32).tobytes())
        return response


def probes(sc, outcome: str) -> float:
    return sc.metrics.registry.get_sample_value("purifier_identity_probes_total", {"outcome": outcome}) or 0.0


@pytest.fixture
def cheated(flatten_cls):
    """(upstream, run): `run(cheat, **settings)` serves a 64-row fingerprint of softmax(x) through a
    sidecar probing at most 0.2 s apart, sends client traffic for up to 15 s and returns
    (mismatched probes, matched probes, rows the cheat answered with the other model)."""
    upstream = CheatingUpstream()

    def run(cheat, **extra):
        defense = flatten_cls()
        defense.n_classes = C
        defense.fingerprint = Fingerprint(PROBE_ROWS, softmax(PROBE_ROWS).astype(np.float64))
        upstream.looks_like_probe = cheat
        settings = Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                                     "confidence_output": "probs", "host": "127.0.0.1", "port": 0,
                                     "metrics_port": -1, "identity_check_s": 0.2, **extra}, env={})
        rng = np.random.default_rng(0)
        with BackgroundSidecar(settings, defense=defense) as sc, \
                grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 15                 # a bound on the test, not a timing assertion
            i = 0
            while time.monotonic() < deadline and not probes(sc, "mismatch"):
                x = rng.normal(0, 1, size=(1 + i % 3, C)).astype(np.float32)
                try:
                    stub.ModelInfer(infer_request(x, request_id=f"client-{i}"), timeout=30)
                except grpc.RpcError:
                    pass
                i += 1
                time.sleep(0.02)
            return probes(sc, "mismatch"), probes(sc, "match"), upstream.answered["other"]

    try:
        yield upstream, run
    finally:
        upstream.server.stop(0)


def test_a_probe_cannot_be_told_by_its_deadline(cheated):
    """Before: probes went out with a 10 s deadline (preflight.PROBE_TIMEOUT_S), clients' requests
    with the client's deadline (here 30 s, also upstream_timeout_s's default)."""
    upstream, run = cheated
    mismatched, matched, other = run(lambda request, context, x: context.time_remaining() < 20)
    assert other > 0 and matched + mismatched >= 1               # the cheat ran, the probes ran
    assert mismatched >= 1, (f"{matched:.0f} probes matched while {other} client rows were answered by another "
                             "model: probes are told apart by their deadline")


def test_a_probe_cannot_be_told_by_following_the_health_poll(cheated):
    """Before: every probe was sent by readiness.poll_once right after its ModelReady call."""
    upstream, run = cheated

    def right_after_model_ready(request, context, x):
        with upstream.lock:
            return time.monotonic() - upstream.last_ready < 0.25

    mismatched, matched, other = run(right_after_model_ready, health_poll_s=1.0)
    assert other > 0 and matched + mismatched >= 1
    assert mismatched >= 1, (f"{matched:.0f} probes matched while {other} client rows were answered by another "
                             "model: probes are told apart by following a ModelReady call")


def test_the_model_check_does_not_hand_the_upstream_every_probe_row(cheated):
    """Before: the check at start-up (and after every reconnect) sent all 64 stored rows right after
    ModelMetadata; an upstream that remembered them answered every later probe with the fitted
    model and was never caught."""
    upstream, run = cheated
    remembered: set[bytes] = set()

    def remember_the_check(request, context, x):
        with upstream.lock:
            after_metadata, upstream.after_metadata = upstream.after_metadata, False
        rows = [r.tobytes() for r in np.ascontiguousarray(x, np.float32)]
        if after_metadata:
            remembered.update(rows)
        return np.array([r in remembered for r in rows])

    mismatched, matched, other = run(remember_the_check)
    assert other > 0 and matched + mismatched >= 1
    assert mismatched >= 1, (f"{matched:.0f} probes matched while {other} client rows were answered by another "
                             f"model: the start-up check revealed {len(remembered)} of the {len(PROBE_ROWS)} "
                             "probe rows")
