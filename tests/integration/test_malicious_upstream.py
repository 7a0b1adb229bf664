"""A malicious upstream: dozens of ways to smuggle the clean confidence vector past the sidecar.

`HostileUpstream` answers ModelInfer with a *fault*: the clean vector `softmax(x)` of the
request, hidden in a stray typed field, a second output, a parameter, trailing or initial
metadata, an error message, an unknown protobuf field, too many rows, and so on. For every fault
the test checks what the client can see (the serialized response, every tensor field, raw bytes,
parameters, initial and trailing metadata, status details and debug string) for any clean value,
as little-endian and big-endian FP32/FP64 bytes and as decimal text, and checks the outcome:
either the defended answer (constructed from scratch, only the defended output) or the expected
gRPC error with a fixed message. After each fault a plain request is served correctly. Every
fault runs through every front (`fronts.FRONTS`: gRPC unary, gRPC stream, REST JSON, REST
binary): the same outcome (the HTTP status of the gRPC code over REST, an error message in the
stream) and nothing clean in any of them.

`python tests/integration/test_malicious_upstream.py` writes the table of fault modes and
outcomes (from FAULTS) to docs/fault-modes.md; a test keeps that file equal to FAULTS.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from fronts import FRONTS, outcome_matches
from fronts import Seen as FrontSeen
from fronts import call as front_call
from grpc_health.v1 import health_pb2, health_pb2_grpc
from oip_fake import infer_request, softmax

from purifier.defenses import Fingerprint
from purifier.defenses.fingerprint import CHECK_ROWS, DEFAULT_ROWS
from purifier.errors import ConfigError
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.codec import decode_inputs
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
SERVICE = "inference.GRPCInferenceService"
C = 4
X = np.random.default_rng(7).normal(0, 0.6, size=(3, C)).astype(np.float32)
INTERNAL, UNAVAILABLE = grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
OK = None


@dataclass
class Reply:
    """What the hostile upstream does: answer `message` (a ModelInferResponse or raw wire bytes) or
    abort with `error`; optionally with initial and trailing metadata."""

    message: object = None
    error: tuple[grpc.StatusCode, str] | None = None
    initial: tuple = ()
    trailing: tuple = ()


def answer(probs: np.ndarray, name: str = "probs", datatype: str = "FP32", raw: bool = True,
           **extra_outputs: np.ndarray) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name="m", id="r")
    for n, a in {name: probs, **extra_outputs}.items():
        t = resp.outputs.add(name=n, datatype=datatype if n == name else "FP32", shape=a.shape)
        if raw:
            resp.raw_output_contents.append(np.ascontiguousarray(a).tobytes())
        else:
            t.contents.fp32_contents.extend(np.asarray(a, np.float64).ravel())
    return resp


def text(p: np.ndarray) -> str:
    return ",".join(f"{v:.6f}" for v in p.ravel())


def unknown_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field the schema does not know."""
    def varint(n):
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _with(resp: pb.ModelInferResponse, change: Callable[[pb.ModelInferResponse], object]) -> pb.ModelInferResponse:
    change(resp)
    return resp


def _typed_beside_raw(p):
    resp = answer(p)
    resp.outputs[0].contents.fp32_contents.extend(p.ravel())
    return resp


def _stray_typed(field_name: str, values):
    def make(p):
        resp = answer(p, raw=False)
        getattr(resp.outputs[0].contents, field_name).extend(values(p))
        return resp
    return make


def _duplicate(p):
    resp = answer(p)
    resp.outputs.add(name="probs", datatype="FP32", shape=p.shape)
    resp.raw_output_contents.append(p.tobytes())
    return resp


def _wrong_field(p):
    resp = answer(p, raw=False)
    resp.outputs[0].contents.ClearField("fp32_contents")
    resp.outputs[0].contents.fp64_contents.extend(p.ravel())
    return resp


def _count_mismatch(p):
    resp = answer(p, raw=False)
    resp.outputs[0].contents.fp32_contents.append(0.5)
    return resp


def _negative(p):
    q = p.copy()
    q[0, 0], q[0, 1] = -q[0, 0], q[0, 1] + 2 * q[0, 0]
    return answer(q)


def _nan(p, value):
    q = p.copy()
    q[1, 2] = value
    return answer(q)


def _classification_strings(p):
    resp = pb.ModelInferResponse(model_name="m", id="r")
    t = resp.outputs.add(name="probs", datatype="BYTES", shape=[len(p), 1])
    t.contents.bytes_contents.extend(f"{row.max():.6f}:{row.argmax()}:class".encode() for row in p)
    return resp


def _unknown_in_tensor(p):
    resp = answer(p)
    resp.outputs[0].MergeFromString(unknown_field(77, p.tobytes()))
    return resp


def _missing_blob(p):
    resp = answer(p, extra=p)
    del resp.raw_output_contents[1]
    return resp


# name -> (what the upstream does given the clean (N, C) vector, expected client code; OK = served)
FAULTS: dict[str, tuple[Callable[[np.ndarray], Reply], grpc.StatusCode | None]] = {
    "typed fp32_contents beside raw": (lambda p: Reply(_typed_beside_raw(p)), INTERNAL),
    "stray fp64_contents beside fp32_contents": (
        lambda p: Reply(_stray_typed("fp64_contents", lambda q: q.ravel())(p)), INTERNAL),
    "stray bytes_contents beside fp32_contents": (
        lambda p: Reply(_stray_typed("bytes_contents", lambda q: [text(q).encode()])(p)), INTERNAL),
    "stray int64_contents (bits of the floats)": (
        lambda p: Reply(_stray_typed("int64_contents", lambda q: q.astype(np.float64).view(np.int64))(p)), INTERNAL),
    "values only in the wrong typed field": (lambda p: Reply(_wrong_field(p)), INTERNAL),
    "second output with the same name": (lambda p: Reply(_duplicate(p)), INTERNAL),
    "extra raw blob after the outputs": (
        lambda p: Reply(_with(answer(p), lambda r: r.raw_output_contents.append(p.tobytes()))), INTERNAL),
    "fewer raw blobs than outputs": (lambda p: Reply(_missing_blob(p)), INTERNAL),
    "extra output holding a clean copy": (lambda p: Reply(answer(p, probs_copy=p)), OK),
    "extra logits output": (lambda p: Reply(answer(p, logits=np.log(p))), OK),
    "clean vector in output parameters": (
        lambda p: Reply(_with(answer(p), lambda r: r.outputs[0].parameters["clean"].__setattr__(
            "string_param", text(p)))), OK),
    "clean vector in response parameters": (
        lambda p: Reply(_with(answer(p), lambda r: (r.parameters["clean"].__setattr__("string_param", text(p)),
                                                    r.parameters["top"].__setattr__("double_param",
                                                                                   float(p[0, 0]))))), OK),
    "clean vector in trailing metadata (text)": (lambda p: Reply(answer(p), trailing=(("x-clean", text(p)),)), OK),
    "clean vector in trailing metadata (-bin)": (
        lambda p: Reply(answer(p), trailing=(("x-clean-bin", p.tobytes()),)), OK),
    "clean vector in initial metadata": (lambda p: Reply(answer(p), initial=(("x-clean", text(p)),)), OK),
    "clean vector in id, model name and version": (
        lambda p: Reply(_with(answer(p), lambda r: (setattr(r, "id", text(p)), setattr(r, "model_name", text(p)),
                                                    setattr(r, "model_version", text(p))))), OK),
    "unknown protobuf field in the response": (
        lambda p: Reply(answer(p).SerializeToString() + unknown_field(99, p.tobytes())), OK),
    "unknown protobuf field in the tensor": (lambda p: Reply(_unknown_in_tensor(p)), OK),
    "UNAVAILABLE with the clean vector in its text": (lambda p: Reply(error=(UNAVAILABLE, text(p))), UNAVAILABLE),
    "INTERNAL with the clean vector in its text": (lambda p: Reply(error=(INTERNAL, text(p))), INTERNAL),
    "UNKNOWN with the clean vector in its text": (lambda p: Reply(error=(grpc.StatusCode.UNKNOWN, text(p))), INTERNAL),
    "INVALID_ARGUMENT with the clean vector in its text": (
        lambda p: Reply(error=(grpc.StatusCode.INVALID_ARGUMENT, text(p))), grpc.StatusCode.INVALID_ARGUMENT),
    "error with the clean vector in trailing metadata": (
        lambda p: Reply(error=(INTERNAL, "failed"), trailing=(("x-clean", text(p)), ("x-clean-bin", p.tobytes()))),
        INTERNAL),
    "twice the rows": (lambda p: Reply(answer(np.concatenate([p, p]))), INTERNAL),
    "one row short": (lambda p: Reply(answer(p[:-1])), INTERNAL),
    "200,000 rows for a 3-row request": (lambda p: Reply(answer(np.tile(p, (66_667, 1))[:200_000])), INTERNAL),
    "NaN in one row": (lambda p: Reply(_nan(p, np.nan)), INTERNAL),
    "Inf in one row": (lambda p: Reply(_nan(p, np.inf)), INTERNAL),
    "rows that do not sum to 1": (lambda p: Reply(answer(p * 0.8)), INTERNAL),
    "negative entries": (lambda p: Reply(_negative(p)), INTERNAL),
    "one class too many": (lambda p: Reply(answer(np.concatenate([p * 0.5, p[:, :1] * 0 + 0.5], axis=1))), INTERNAL),
    "FP64 bytes declared FP32": (lambda p: Reply(answer(p.astype(np.float64))), INTERNAL),
    "FP32 bytes declared FP64": (lambda p: Reply(answer(p.astype(np.float32), datatype="FP64")), INTERNAL),
    "confidences declared INT64": (lambda p: Reply(answer(p.astype(np.float64), datatype="INT64")), INTERNAL),
    "classification strings (BYTES)": (lambda p: Reply(_classification_strings(p)), INTERNAL),
    "typed values one too many": (lambda p: Reply(_count_mismatch(p)), INTERNAL),
    "negative dimension in the shape": (
        lambda p: Reply(_with(answer(p), lambda r: r.outputs[0].shape.__setitem__(0, -1))), INTERNAL),
    "confidence output missing, clean under another name": (lambda p: Reply(answer(p, name="scores")), INTERNAL),
}


# what the identity tests below show (their names say which)
IDENTITY_FAULTS = {
    "swaps the model behind the same connection": "NOT_SERVING at the next probe, every request UNAVAILABLE; "
                                                   "SERVING again when 5 probes in a row match",
    "answers a share of all requests (every third) with another model": "NOT_SERVING at the first probe it "
    "answers so; one matching probe does not serve it again (5 in a row at short random intervals are needed)",
    "tells probes by their deadline, by following a ModelReady call, or by the rows the (re)connect check asked, "
    "and answers only those with the fitted model (`test_identity_probe_tells.py`)": "NOT_SERVING at its first "
    "probe: probes carry a recent client's deadline, run on their own clock and draw rows no check sends",
    "answers probe-like requests (id `purifier-probe`, right after ModelMetadata, 8 or 64 rows) with the fitted "
    "model, everything else with another": "NOT_SERVING within one probe interval; no probe lets it back in",
    "declares no inputs, several inputs, a non-float input or another width (a defense with a fingerprint)":
        "refused at start-up (unless `--model-id` vouches for the model)",
    "restarts with another model": "NOT_SERVING, requests that waited for the restart are not answered by it",
}
# other ways out than ModelInfer, each shown by the test file named
OTHER_CHANNELS = {
    "writes the clean vector of the request it just answered into its ModelMetadata or ModelConfig (input names, "
    "datatype strings, extra dims, platform) for the client to read back (`test_model_description_channel.py`)":
        "not repeated, over gRPC or REST: both answer the description the model check took, every field checked",
    "restarts and describes the model differently (the same payload) at the check after the reconnect "
    "(`test_model_description_channel.py`)": "refused: NOT_SERVING, requests UNAVAILABLE, metadata unchanged",
    "describes the model otherwise to worker 1 of `serve --workers 2`, which starts after worker 0 may have forwarded "
    "requests (`test_model_description_channel.py`)": "refused: the sidecar does not start (exit 2); every worker "
    "answers worker 0's description",
}
FAULT_TABLE = Path(__file__).resolve().parents[2] / "docs" / "fault-modes.md"


def fault_table() -> str:
    """FAULTS as a Markdown table: fault mode -> what the client gets."""
    lines = ["# Malicious-upstream fault modes and the client's outcome", "",
             "Generated from `FAULTS` in `tests/integration/test_malicious_upstream.py` (run that file with "
             "python to regenerate). For every mode the suite checks that no clean value (FP32/FP64 bytes in "
             "either byte order, decimal text) appears in anything the client receives: the serialized "
             "response, every tensor field, parameters, initial and trailing metadata, status details. Each "
             "mode runs through every front: gRPC `ModelInfer`, a gRPC `ModelStreamInfer` stream (an error is "
             "that request's error message in the stream) and REST with JSON and with binary tensors (an error "
             "is the HTTP status of the gRPC code: INVALID_ARGUMENT 400, INTERNAL 500, UNAVAILABLE 503).", "",
             "| # | upstream fault | client outcome |", "|---|---|---|"]
    for i, (name, (_, expected)) in enumerate(FAULTS.items(), 1):
        outcome = "OK: defended answer, constructed (only the defended output)" if expected is OK else expected.name
        lines.append(f"| {i} | {name} | {outcome} |")
    lines += ["", "## An allowed output (`--allow-output label`)", "",
              "The upstream answers its `label` output as below (the model check's probes and client requests "
              "alike, or only client requests after an honest start). The client asks for no output, for "
              "`label` alone, or for both: the `label` it gets is always rebuilt by the sidecar as the argmax of "
              "the defended vector (INT64 [N], as the honest start declared), never the upstream's values.", "",
              "| # | upstream's `label` | at start-up | afterwards (client requests) |", "|---|---|---|---|"]
    for i, name in enumerate(LABELS, 1):
        start = "served" if name == HONEST else "refused: allow_outputs ... cannot be served"
        lines.append(f"| {i} | {name} | {start} | OK: label rebuilt from the defended vector |")
    lines += ["", "## Another model behind the upstream", "",
              f"The defense carries a fingerprint ({DEFAULT_ROWS} stored rows and the fitted model's answers: "
              f"{CHECK_ROWS} for the model check after each (re)connection, {DEFAULT_ROWS - CHECK_ROWS} for probes); "
              "the sidecar asks a few of the probe rows at random "
              "times (`identity_check_s`, 0.2 s in the tests) in requests that look like its clients' "
              "(`test_sidecar_model_check.py` covers restarts, metadata and `--model-id`).", "",
              "| # | upstream | outcome |", "|---|---|---|"]
    for i, (name, outcome) in enumerate(IDENTITY_FAULTS.items(), 1):
        lines.append(f"| {i} | {name} | {outcome} |")
    lines += ["", "## Other channels", "", "| # | upstream | outcome |", "|---|---|---|"]
    for i, (name, outcome) in enumerate(OTHER_CHANNELS.items(), 1):
        lines.append(f"| {i} | {name} | {outcome} |")
    return "\n".join(lines) + "\n"


def test_the_documented_fault_table_is_current():
    assert FAULT_TABLE.read_text() == fault_table(), "regenerate: python tests/integration/test_malicious_upstream.py"


class HostileUpstream:
    """An OIP server whose ModelInfer does whatever `self.fault` says with the clean vector.

    The clean vector is `self.model(x, request)`: softmax(x) unless a test swaps the model. With
    `label` (datatype, shape) it serves ModelMetadata declaring input x FP32 [-1, C], output
    probs FP32 [-1, C] and a `label` output of that datatype and shape; without, ModelMetadata is
    UNIMPLEMENTED (then the sidecar cannot probe the model).
    """

    def __init__(self, label: tuple[str, list[int]] | None = None):
        self.fault: Callable[[np.ndarray], Reply] = lambda p: Reply(answer(p))
        self.model: Callable[[np.ndarray, pb.ModelInferRequest], np.ndarray] = lambda x, request: softmax(x)
        self.on_metadata: Callable[[], None] = lambda: None
        self.calls = 0
        self.seen: list[tuple[str, int, tuple[str, ...]]] = []   # (id, rows, outputs) of every ModelInfer
        self.label = label
        server = grpc.server(ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
        handlers = {
            "ModelReady": grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: pb.ModelReadyResponse(ready=True), pb.ModelReadyRequest.FromString,
                pb.ModelReadyResponse.SerializeToString),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                self._infer, pb.ModelInferRequest.FromString,
                lambda m: m if isinstance(m, bytes) else m.SerializeToString()),
        }
        if label is not None:
            handlers["ModelMetadata"] = grpc.unary_unary_rpc_method_handler(
                self._metadata, pb.ModelMetadataRequest.FromString, pb.ModelMetadataResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.server = server

    def _metadata(self, request, context):
        self.on_metadata()
        spec = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name="m", versions=["1"], platform="hostile",
                                        inputs=[spec(name="x", datatype="FP32", shape=[-1, C])],
                                        outputs=[spec(name="probs", datatype="FP32", shape=[-1, C]),
                                                 spec(name="label", datatype=self.label[0], shape=self.label[1])])

    def _infer(self, request, context):
        self.calls += 1
        x = decode_inputs(request)[0]
        self.seen.append((request.id, len(x), tuple(o.name for o in request.outputs)))
        reply = self.fault(self.model(x, request))
        if reply.initial:
            context.send_initial_metadata(reply.initial)
        if reply.trailing:
            context.set_trailing_metadata(reply.trailing)
        if reply.error:
            context.abort(*reply.error)
        return reply.message


class Recording:
    """Wraps the test defense: records the row count of every defense call."""

    def __init__(self, flatten_cls):
        self.defense = flatten_cls()
        self.defense.n_classes = C
        self.rows: list[int] = []
        original = self.defense.transform

        def transform(probs, inputs=None):
            self.rows.append(len(probs))
            return original(probs, inputs)

        self.defense.transform = transform


@pytest.fixture(scope="module")
def hostile():
    upstream = HostileUpstream()
    try:
        yield upstream
    finally:
        upstream.server.stop(0)


@pytest.fixture(scope="module")
def recording(flatten_cls):
    return Recording(flatten_cls)


@pytest.fixture(scope="module")
def sidecar(hostile, recording):
    settings = Settings.resolve({"upstream": f"127.0.0.1:{hostile.port}", "model_name": "m",
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": 0,
                                 "metrics_port": -1, "health_poll_s": 0.2}, env={})
    with BackgroundSidecar(settings, defense=recording.defense) as sc:
        yield sc


@dataclass
class Seen:
    """Everything a client can see of one call."""

    code: grpc.StatusCode | None
    response: pb.ModelInferResponse | None = None
    blobs: list[bytes] = field(default_factory=list)   # serialized message, binary metadata values
    texts: list[str] = field(default_factory=list)     # details, debug string, text metadata values


def call(stub, x: np.ndarray, outputs: tuple[str, ...] = ()) -> Seen:
    request = infer_request(x)
    for name in outputs:
        request.outputs.add(name=name)
    try:
        resp, rpc = stub.ModelInfer.with_call(request, timeout=20)
        seen = Seen(None, resp, [resp.SerializeToString()])
    except grpc.RpcError as e:
        rpc = e
        seen = Seen(e.code(), texts=[e.details() or "", e.debug_error_string() or ""])
    for key, value in (*(rpc.initial_metadata() or ()), *(rpc.trailing_metadata() or ())):
        (seen.blobs if isinstance(value, bytes) else seen.texts).append(value)
        seen.texts.append(key)
    if seen.response is not None:
        for o in seen.response.outputs:  # every typed field, decoded, as text too
            for _, values in o.contents.ListFields():
                seen.texts.append(" ".join(map(str, values)))
        seen.texts.extend(str(v) for v in seen.response.parameters.values())
    return seen


def clean_patterns(clean: np.ndarray) -> tuple[list[bytes], list[str]]:
    """Every clean value as FP32/FP64 bytes (both byte orders) and as decimal text."""
    blobs, texts = [], []
    for v in np.unique(clean.astype(np.float64)):
        for fmt in ("<f", ">f", "<d", ">d"):
            blobs.append(struct.pack(fmt, v))
        texts.extend({f"{v:.4f}", f"{v:.3e}", repr(float(np.float32(v)))[:6]})
    return blobs, texts


def assert_no_clean_value(seen: Seen, clean: np.ndarray) -> None:
    blobs, texts = clean_patterns(clean)
    for pattern in blobs:
        for blob in seen.blobs:
            assert pattern not in blob, f"clean value bytes {pattern.hex()} reached the client"
    everything = "\n".join(seen.texts)
    for pattern in texts:
        assert pattern not in everything, f"clean value text {pattern!r} reached the client"


def assert_defended(seen: Seen, defense, clean: np.ndarray) -> None:
    assert seen.code is None, seen.texts
    resp = seen.response
    assert [o.name for o in resp.outputs] == ["probs"] and len(resp.raw_output_contents) == 1
    assert not resp.parameters and not resp.outputs[0].parameters and resp.id == "r" and resp.model_name == "m"
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(clean.shape)
    np.testing.assert_allclose(got, type(defense)().transform(clean), rtol=1e-6)


def test_the_hostile_upstream_really_leaks_and_the_checker_sees_it(hostile):
    """Guard: straight to the upstream, the faults put clean values where the checker looks."""
    clean = softmax(X)
    with grpc.insecure_channel(f"127.0.0.1:{hostile.port}") as channel:
        direct = pb_grpc.GRPCInferenceServiceStub(channel)
        for name in ("stray fp64_contents beside fp32_contents", "clean vector in trailing metadata (text)",
                     "UNAVAILABLE with the clean vector in its text", "unknown protobuf field in the response"):
            hostile.fault = FAULTS[name][0]
            with pytest.raises(AssertionError, match="reached the client"):
                assert_no_clean_value(call(direct, X), clean)
    hostile.fault = lambda p: Reply(answer(p))


def assert_front_defended(seen: FrontSeen, defense, clean: np.ndarray) -> None:
    assert seen.code is None, seen.texts
    assert list(seen.outputs) == ["probs"] and not seen.extra, seen.extra
    assert seen.id == "r" and seen.model_name == "m"
    got = seen.outputs["probs"]
    assert got.dtype == np.float32 and got.shape == clean.shape
    np.testing.assert_allclose(got, type(defense)().transform(clean), rtol=1e-6)


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_no_clean_value_reaches_the_client(sidecar, hostile, recording, fault, front):
    """Every fault through every front (fronts.FRONTS): the same outcome, nothing clean."""
    make, expected = FAULTS[fault]
    clean = softmax(X)
    hostile.fault = make
    try:
        before, rows_before = hostile.calls, len(recording.rows)
        seen = front_call(front, sidecar.port, sidecar.http_port, infer_request(X))
        assert hostile.calls > before   # the fault really was served (UNAVAILABLE is retried)
        assert_no_clean_value(seen, clean)
        if expected is OK:
            assert_front_defended(seen, recording.defense, clean)
        else:
            assert outcome_matches(seen, front, expected), (seen.code, seen.texts)
            assert max(recording.rows[rows_before:], default=0) <= len(X)  # nothing oversized was defended
        print(f"\n| {fault} | {front} | {'defended answer' if expected is OK else expected.name} |")
    finally:
        hostile.fault = lambda p: Reply(answer(p))
    assert_front_defended(front_call(front, sidecar.port, sidecar.http_port, infer_request(X)),
                          recording.defense, clean)                      # still serving


def test_an_oversized_answer_does_not_hold_the_defense(stub, hostile, recording):
    """200,000 rows for a 3-row request are refused before the defense, so other callers keep going."""
    hostile.fault = FAULTS["200,000 rows for a 3-row request"][0]
    rows_before = len(recording.rows)
    try:
        with ThreadPoolExecutor(4) as pool:
            bad = [pool.submit(call, stub, X) for _ in range(4)]
            assert all(f.result().code == INTERNAL for f in bad)
    finally:
        hostile.fault = lambda p: Reply(answer(p))
    assert recording.rows[rows_before:] == []                        # none of it reached the defense
    start = time.monotonic()
    assert_defended(call(stub, X), recording.defense, softmax(X))
    print(f"\nserved {time.monotonic() - start:.3f} s after four 200,000-row answers")


# --- allowed outputs: never the upstream's bytes ----------------------------------------------------

def _bits(p: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(p, "<f4").view(np.uint8)


# name -> (datatype, the label output an upstream answers given the clean (N, C) vector)
LABELS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "honest: INT64 argmax [N]": ("INT64", lambda p: p.argmax(axis=1).astype(np.int64)),
    "INT32 bit-casts of the probabilities [N, C]": ("INT32", lambda p: _bits(p).view("<i4")),
    "INT64 probabilities x 1e9 [N, C]": ("INT64", lambda p: (p.astype(np.float64) * 1e9).astype(np.int64)),
    "UINT8 bytes of the probabilities [N, 4C]": ("UINT8", _bits),
    "BOOL bits of the probabilities [N, 32C]": ("BOOL", lambda p: np.unpackbits(_bits(p), axis=1).astype(bool)),
    "INT64 [N]: argmax + C x top probability in millionths": (
        "INT64", lambda p: p.argmax(axis=1) + C * np.round(p.max(axis=1) * 1e6).astype(np.int64)),
    "INT64 [N, 1]: class names 7, 8, 9, 10 instead of indices": (
        "INT64", lambda p: p.argmax(axis=1)[:, None].astype(np.int64) + 7),
    "FP32 top probability [N, 1]": ("FP32", lambda p: p.max(axis=1, keepdims=True)),
}
HONEST = "honest: INT64 argmax [N]"


def labelled(mode: str, parameters: bool = False) -> Callable[[np.ndarray], Reply]:
    """The fault: the defended-looking answer plus a `label` output encoded as LABELS[mode]."""
    datatype, encode = LABELS[mode]

    def make(p):
        resp, label = answer(p), encode(p)
        tensor = resp.outputs.add(name="label", datatype=datatype, shape=label.shape)
        if parameters:
            tensor.parameters["clean"].string_param = text(p)
        resp.raw_output_contents.append(np.ascontiguousarray(label).tobytes())
        return Reply(resp)

    return make


@pytest.fixture(scope="module")
def labelled_upstream():
    upstream = HostileUpstream(label=("INT64", [-1]))
    upstream.fault = labelled(HONEST)
    try:
        yield upstream
    finally:
        upstream.server.stop(0)


def label_settings(upstream, **extra) -> Settings:
    return Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                             "confidence_output": "probs", "allow_outputs": ("label",), "host": "127.0.0.1",
                             "port": 0, "http_port": 0, "metrics_port": -1, "health_poll_s": 0.2, **extra}, env={})


@pytest.fixture(scope="module")
def label_sidecar(labelled_upstream, recording):
    with BackgroundSidecar(label_settings(labelled_upstream), defense=recording.defense) as sc, \
            grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("parameters", [False, True], ids=["", "clean vector in its parameters"])
@pytest.mark.parametrize("mode", list(LABELS))
def test_an_allowed_output_is_rebuilt_from_the_defended_vector_never_forwarded(label_sidecar, labelled_upstream,
                                                                              recording, mode, parameters):
    """Before: `--allow-output label` checked only the datatype, and an upstream answering `label`
    as bit-casts, scaled integers, bytes or bits of the probabilities got the clean vector to the
    client exactly, also when the client asked for `label` alone or for no output."""
    clean = softmax(X)
    defended = type(recording.defense)().transform(clean)
    labelled_upstream.fault = labelled(mode, parameters)
    try:
        for outputs in ((), ("label",), ("probs", "label"), ("label", "probs")):
            seen = call(label_sidecar, X, outputs)
            assert_no_clean_value(seen, clean)
            assert seen.code is None, seen.texts
            resp = seen.response
            names = list(outputs) or ["probs", "label"]
            assert [o.name for o in resp.outputs] == names and not resp.parameters
            got = {o.name: (o, blob) for o, blob in zip(resp.outputs, resp.raw_output_contents, strict=True)}
            label, blob = got["label"]
            assert (label.datatype, list(label.shape), dict(label.parameters)) == ("INT64", [len(X)], {})
            assert np.array_equal(np.frombuffer(blob, np.int64), defended.argmax(axis=1))
            if "probs" in got:
                np.testing.assert_allclose(np.frombuffer(got["probs"][1], np.float32).reshape(clean.shape),
                                           defended, rtol=1e-6)
    finally:
        labelled_upstream.fault = labelled(HONEST)


@pytest.mark.parametrize("mode", [m for m in LABELS if m != HONEST])
def test_an_allowed_output_that_is_not_the_argmax_index_is_refused_at_start_up(labelled_upstream, recording, mode):
    labelled_upstream.fault = labelled(mode)
    try:
        with pytest.raises(ConfigError, match="allow_outputs: the model's 'label' cannot be served: .*; remove it "
                                              "from allow_outputs"):
            with BackgroundSidecar(label_settings(labelled_upstream), defense=recording.defense):
                pass
    finally:
        labelled_upstream.fault = labelled(HONEST)


@pytest.mark.parametrize("declared,message", [
    (("INT32", [-1, C]), r"its declared shape is \[-1, 4\]"),
    (("FP32", [-1, 1]), "'label' is FP32; a floating-point output beside the confidences"),
    (("BOOL", [-1]), "it is BOOL, not an integer class index"),
])
def test_a_declared_allowed_output_that_cannot_be_a_class_index_is_refused_at_start_up(recording, declared, message):
    upstream = HostileUpstream(label=declared)
    upstream.fault = labelled(HONEST)
    try:
        with pytest.raises(ConfigError, match=message):
            with BackgroundSidecar(label_settings(upstream), defense=recording.defense):
                pass
    finally:
        upstream.server.stop(0)


def test_an_allowed_output_of_a_model_that_cannot_be_probed_is_refused(hostile, recording):
    """Without ModelMetadata the sidecar cannot learn what the label is: refused, not forwarded."""
    with pytest.raises(ConfigError, match="allow_outputs: the model cannot be probed and does not declare 'label'"):
        with BackgroundSidecar(label_settings(hostile), defense=recording.defense):
            pass


# --- another model behind the upstream: identity probes ---------------------------------------------

PROBE_ROWS = np.random.default_rng(11).normal(0, 1.5, size=(64, C)).astype(np.float32)
INTERVAL_S = 0.2   # identity_check_s in these tests: consecutive probes at most this far apart


def another_model(x: np.ndarray, request) -> np.ndarray:
    return softmax(x / 3.0)


@pytest.fixture
def watched(recording):
    """A hostile upstream that declares its input, and a sidecar whose defense carries a 64-row
    fingerprint of softmax(x), probing at most INTERVAL_S apart: (upstream, sidecar, stub, health)."""
    defense = recording.defense
    upstream = HostileUpstream(label=("INT64", [-1]))
    defense.fingerprint = Fingerprint(PROBE_ROWS, softmax(PROBE_ROWS).astype(np.float64))
    settings = Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1,
                                 "health_poll_s": 0.1, "identity_check_s": INTERVAL_S}, env={})
    try:
        with BackgroundSidecar(settings, defense=defense) as sc, \
                grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
            yield upstream, sc, pb_grpc.GRPCInferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel)
    finally:
        defense.fingerprint = None
        upstream.server.stop(0)


def probes(sc, outcome: str) -> float:
    return sc.metrics.registry.get_sample_value("purifier_identity_probes_total", {"outcome": outcome}) or 0.0


def until(condition, bound_s: float = 60.0) -> bool:
    """Poll `condition` for at most `bound_s` (a bound on a hang, not a timing assertion)."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def health_is(health, status) -> bool:
    return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == status


def test_a_model_swapped_behind_the_same_connection_is_caught_by_the_next_probe(watched):
    """Before: the model was checked once per connection; one swapped behind it stayed SERVING."""
    upstream, sc, stub, health = watched
    assert call(stub, X).code is None
    until(lambda: probes(sc, "match") >= 1, bound_s=10)         # a probe while the fitted model serves
    matched = probes(sc, "match")
    upstream.model = another_model                              # same process, same connection
    assert until(lambda: health_is(health, NOT_SERVING))
    assert matched >= 1 and probes(sc, "mismatch") >= 1         # probes matched, then the next one caught it
    assert probes(sc, "match") - matched <= 1                   # (one in flight at the swap may still match)
    refused = call(stub, X)
    assert refused.code == UNAVAILABLE and "refused by the sidecar's model check" in refused.texts[0]
    upstream.model = lambda x, request: softmax(x)              # the fitted model is back
    assert until(lambda: health_is(health, SERVING))
    assert_defended(call(stub, X), sc.defense, softmax(X))


def test_an_upstream_that_answers_probe_like_requests_with_the_fitted_model_is_caught(watched):
    """Before: the model was probed once, with the id `purifier-probe` and the fingerprint's rows in
    one request right after ModelMetadata. An upstream that answered requests like that with the
    fitted model and everything else with another stayed SERVING. Here it also recognises a
    request with as many rows as a fingerprint stores (8 before, 64 now)."""
    upstream, sc, stub, health = watched
    after_metadata = [False]

    def cheat(x, request):
        probe_like = request.id == "purifier-probe" or after_metadata[0] or len(x) in (8, len(PROBE_ROWS))
        after_metadata[0] = False
        return softmax(x) if probe_like else another_model(x, request)

    upstream.on_metadata = lambda: after_metadata.__setitem__(0, True)
    assert call(stub, X).code is None                           # recent traffic: 3-row requests
    matched = probes(sc, "match")
    upstream.model = cheat
    served = call(stub, X)                                      # answered by the other model (until caught)
    assert served.code in (None, UNAVAILABLE)
    assert until(lambda: health_is(health, NOT_SERVING))
    # caught within one probe interval of the cheat beginning: at most a probe already in flight matched
    assert probes(sc, "mismatch") >= 1 and probes(sc, "match") - matched <= 1
    assert call(stub, X).code == UNAVAILABLE                    # and no probe lets it back in
    assert until(lambda: probes(sc, "mismatch") >= 5) and health_is(health, NOT_SERVING)


def test_one_matching_probe_does_not_serve_an_upstream_that_answers_a_share_with_another_model(watched, caplog):
    """Before: after a mismatch the first matching probe served again, so an upstream answering
    every third request with another model stayed SERVING two thirds of the time."""
    upstream, sc, stub, health = watched
    caplog.set_level(logging.INFO, logger="purifier_server")
    assert call(stub, X).code is None
    calls = [0]

    def every_third(x, request):
        calls[0] += 1
        return another_model(x, request) if calls[0] % 3 == 0 else softmax(x)

    upstream.model = every_third
    assert until(lambda: probes(sc, "mismatch") >= 1)
    caught_at = len(caplog.records)
    matched = probes(sc, "match")
    assert until(lambda: probes(sc, "mismatch") >= 4)           # probes go on: two match for each that does not
    assert probes(sc, "match") - matched >= 2
    served_again = [r for r in caplog.records[caught_at:] if r.getMessage() == "serving"]
    assert not served_again and health_is(health, NOT_SERVING)
    assert call(stub, X).code == UNAVAILABLE
    upstream.model = lambda x, request: softmax(x)              # the fitted model alone again
    assert until(lambda: health_is(health, SERVING))


def test_probes_look_like_client_requests(watched):
    """Ids: the upstream sees 16 hex digits for every request (the client's own id stays with the
    client); sizes: those of recent client requests; outputs: the same for probes and clients."""
    upstream, sc, stub, health = watched
    sizes = (1, 2, 5)
    for i in range(30):
        x = np.random.default_rng(i).normal(0, 1, size=(sizes[i % 3], C)).astype(np.float32)
        assert call(stub, x).code is None
    before = len(upstream.seen)
    assert until(lambda: probes(sc, "match") >= 6)
    seen = list(upstream.seen)
    assert all(len(i) == 16 and int(i, 16) >= 0 for i, _, _ in seen)         # no "purifier-probe", no "r"
    assert {outputs for _, _, outputs in seen} == {("probs",)}
    later = [rows for _, rows, _ in seen[before:]]
    assert later and set(later) <= set(sizes)                   # probe sizes copy recent client traffic


def test_metadata_that_contradicts_the_fitted_model_refuses_at_start(recording):
    """Before: metadata that lied about the inputs only got an info line ("not probed")."""
    defense = recording.defense
    defense.fingerprint = Fingerprint(PROBE_ROWS, softmax(PROBE_ROWS).astype(np.float64))
    upstream = HostileUpstream()                                # serves no ModelMetadata: cannot be probed
    settings = Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1},
                                env={})
    try:
        with pytest.raises(ConfigError, match="defense: the upstream model contradicts the fitted one: it declares "
                                              "no inputs .* or vouch for the model with --model-id"):
            with BackgroundSidecar(settings, defense=defense):
                pass
    finally:
        defense.fingerprint = None
        upstream.server.stop(0)


if __name__ == "__main__":
    FAULT_TABLE.parent.mkdir(exist_ok=True)
    FAULT_TABLE.write_text(fault_table())
    print(f"wrote {FAULT_TABLE} ({len(FAULTS)} fault modes)")


@pytest.mark.parametrize("front", FRONTS)
def test_an_allowed_output_is_rebuilt_through_every_front(labelled_upstream, recording, front):
    """The leaking label encodings through the REST and streaming fronts too: the client's label is
    the defended argmax in the model's datatype and shape, nothing clean beside it."""
    clean = softmax(X)
    defended = type(recording.defense)().transform(clean)
    with BackgroundSidecar(label_settings(labelled_upstream), defense=recording.defense) as sc:
        try:
            for mode in ("INT32 bit-casts of the probabilities [N, C]", "UINT8 bytes of the probabilities [N, 4C]"):
                labelled_upstream.fault = labelled(mode, parameters=True)
                for outputs in (("label",), ("probs", "label")):
                    request = infer_request(X)
                    for name in outputs:
                        request.outputs.add(name=name)
                    seen = front_call(front, sc.port, sc.http_port, request)
                    assert_no_clean_value(seen, clean)
                    assert seen.code is None and list(seen.outputs) == list(outputs) and not seen.extra, seen.texts
                    label = seen.outputs["label"]
                    assert label.dtype == np.int64 and np.array_equal(label, defended.argmax(axis=1))
        finally:
            labelled_upstream.fault = labelled(HONEST)
