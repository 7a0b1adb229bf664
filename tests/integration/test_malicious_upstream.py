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
from oip_fake import infer_request, softmax

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
SERVICE = "inference.GRPCInferenceService"
C = 4
X = np.random.default_rng(7).normal(0, 0.6, size=(3, C)).astype(np.float32)
INTERNAL, UNAVAILABLE = grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE
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


FAULT_TABLE = Path(__file__).resolve().parents[2] / "docs" / "fault-modes.md"


def fault_table() -> str:
    """FAULTS as a Markdown table: fault mode -> what the client gets."""
    lines = ["# Malicious-upstream fault modes and the client's outcome", "",
             "Generated from `FAULTS` in `tests/integration/test_malicious_upstream.py` (run that file with "
             "python to regenerate). For every mode the suite checks that no clean value (FP32/FP64 bytes in "
             "either byte order, decimal text) appears in anything the client receives: the serialized "
             "response, every tensor field, parameters, initial and trailing metadata, status details.", "",
             "| # | upstream fault | client outcome |", "|---|---|---|"]
    for i, (name, (_, expected)) in enumerate(FAULTS.items(), 1):
        outcome = "OK: defended answer, constructed (only the defended output)" if expected is OK else expected.name
        lines.append(f"| {i} | {name} | {outcome} |")
    return "\n".join(lines) + "\n"


def test_the_documented_fault_table_is_current():
    assert FAULT_TABLE.read_text() == fault_table(), "regenerate: python tests/integration/test_malicious_upstream.py"


class HostileUpstream:
    """An OIP server whose ModelInfer does whatever `self.fault` says with the clean vector."""

    def __init__(self):
        self.fault: Callable[[np.ndarray], Reply] = lambda p: Reply(answer(p))
        self.calls = 0
        server = grpc.server(ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
        handlers = {
            "ModelReady": grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: pb.ModelReadyResponse(ready=True), pb.ModelReadyRequest.FromString,
                pb.ModelReadyResponse.SerializeToString),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                self._infer, pb.ModelInferRequest.FromString,
                lambda m: m if isinstance(m, bytes) else m.SerializeToString()),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.server = server

    def _infer(self, request, context):
        self.calls += 1
        t = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(tuple(t.shape))
        reply = self.fault(softmax(x))
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


def test_an_allowed_integer_output_is_constructed_and_a_floating_point_one_refused(hostile, recording):
    """allow_outputs passes an integer output (a label) through, rebuilt from its values; a
    floating-point output under that name (a clean copy of the top probability) is an error."""
    settings = Settings.resolve({"upstream": f"127.0.0.1:{hostile.port}", "model_name": "m",
                                 "confidence_output": "probs", "allow_outputs": ("label",), "host": "127.0.0.1",
                                 "port": 0, "http_port": 0, "metrics_port": -1}, env={})
    clean = softmax(X)
    label = clean.argmax(axis=1).astype(np.int64)

    def with_label(p):
        resp = answer(p)
        resp.outputs.add(name="label", datatype="INT64", shape=label.shape).parameters["clean"].string_param = text(p)
        resp.raw_output_contents.append(label.tobytes())
        return Reply(resp)

    with BackgroundSidecar(settings, defense=recording.defense) as sc, \
            grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            hostile.fault = with_label
            seen = call(stub, X)
            label_only = call(stub, X, outputs=("label",))
            hostile.fault = lambda p: Reply(answer(p, label=p.max(axis=1, keepdims=True)))
            refused = call(stub, X)
        finally:
            hostile.fault = lambda p: Reply(answer(p))
    assert_no_clean_value(seen, clean)
    assert [o.name for o in seen.response.outputs] == ["probs", "label"]
    assert np.array_equal(np.frombuffer(seen.response.raw_output_contents[1], np.int64), label)
    assert not seen.response.outputs[1].parameters
    assert_no_clean_value(label_only, clean)
    assert [o.name for o in label_only.response.outputs] == ["label"]
    assert np.array_equal(np.frombuffer(label_only.response.raw_output_contents[0], np.int64), label)
    assert_no_clean_value(refused, clean)
    assert refused.code == INTERNAL and "allowed output is floating point" in refused.texts[0]


if __name__ == "__main__":
    FAULT_TABLE.parent.mkdir(exist_ok=True)
    FAULT_TABLE.write_text(fault_table())
    print(f"wrote {FAULT_TABLE} ({len(FAULTS)} fault modes)")
