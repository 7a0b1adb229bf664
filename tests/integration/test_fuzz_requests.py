"""Property test: malformed ModelInferRequests get a clear gRPC error, never a crash or a raw vector.

Hypothesis builds requests field by field with the project's own stubs and sends them on a raw
gRPC channel (tritonclient would refuse to build most of them): wrong and unknown datatypes,
shapes that disagree with the raw byte length or the typed value count, raw and typed contents
mixed, missing or extra blobs, no inputs, huge and negative dimensions, NaN/Inf values, unknown
parameters at every level, unknown outputs and batches above `max_request_rows`. The sidecar
runs the embedded ONNX digits model with a non-identity defense.

Every answer must be either a gRPC error with a status a client can act on and a message that is
not the generic "internal error" of a bug, or a success whose vector equals the defended vector
for the input actually sent. After each example a valid request must still be served.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.codec import DTYPES, TYPED_FIELD
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
MAX_ROWS = 16
WIDTH = 64
CLEAR_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
DATATYPES = ["FP32"] * 24 + [*DTYPES, "BYTES", "BF16", "fp32", "", "FP8"]
TYPED_FIELDS = sorted(set(TYPED_FIELD.values()) | {"bytes_contents"})


@pytest.fixture(scope="module")
def sidecar(digits_target, flatten_cls):
    settings_ = Settings.resolve({"model": str(digits_target.directory), "model_name": "digits",
                                  "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1,
                                  "max_request_rows": MAX_ROWS}, env={})
    with BackgroundSidecar(settings_, defense=flatten_cls()) as sc:
        yield sc


@pytest.fixture(scope="module")
def stub(sidecar):
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def oracle(digits_target, sidecar):
    """x (N, 64) FP32 -> the vector the sidecar must answer: defense(ORT(x))."""
    classifier, defense = digits_target.classifier(), type(sidecar.defense)()
    return lambda x: defense.transform(classifier.run(x)["probabilities"])


def _set_parameter(params, key: str, value) -> None:
    if isinstance(value, bool):
        params[key].bool_param = value
    elif isinstance(value, int):
        params[key].int64_param = value
    elif isinstance(value, float):
        params[key].double_param = value
    else:
        params[key].string_param = value


parameters = st.dictionaries(
    st.sampled_from(["priority", "timeout", "sequence_id", "binary_data", "x-unknown", "", "é"]),
    st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=8)),
    max_size=3)

values = st.floats(width=32, allow_nan=True, allow_infinity=True)
PIXELS = st.floats(0, 1, width=32)
SHAPES = {
    "plausible": st.integers(0, 4).map(lambda n: [n, WIDTH]),
    "oversized batch": st.integers(1, 8).map(lambda k: [MAX_ROWS + k, WIDTH]),
    "anything small": st.lists(st.integers(-3, 70), max_size=4),
    "huge": st.lists(st.sampled_from([0, 1, WIDTH, 2**31, 2**40, 2**62, -1]), min_size=1, max_size=3),
}
# mostly plausible shapes, so that the other mutations (datatype, contents...) get exercised alone
SHAPE_KINDS = ["plausible"] * 7 + ["oversized batch", "anything small", "huge"]


@st.composite
def tensors(draw):
    """(InferInputTensor, raw blob or None)."""
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(SHAPES[draw(st.sampled_from(SHAPE_KINDS))])
    name = draw(st.sampled_from(["input"] * 4 + ["x", ""]))
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    elements = draw(st.sampled_from([PIXELS, PIXELS, values]))  # NaN/Inf/huge in a third of tensors
    for k, v in draw(parameters).items():
        _set_parameter(tensor.parameters, k, v)
    n = math.prod(shape) if all(d >= 0 for d in shape) else -1
    consistent = 0 <= n <= 4 * WIDTH
    mode = draw(st.sampled_from(["raw"] * 3 + ["typed"] * 2 + ["mixed", "none"] + (["raw_bytes"] if consistent else [])))
    itemsize = DTYPES[datatype].itemsize if datatype in DTYPES else 4
    raw = None
    if mode in ("raw", "mixed"):
        if consistent and draw(st.booleans()):
            raw = draw(arrays(np.float32, n, elements=elements)).tobytes()[: n * itemsize].ljust(n * itemsize, b"\0")
        else:
            raw = draw(st.binary(max_size=4 * WIDTH * 4 + 8))
    if mode == "raw_bytes":
        raw = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    if mode in ("typed", "mixed"):
        field = TYPED_FIELD.get(datatype) if draw(st.booleans()) else draw(st.sampled_from(TYPED_FIELDS))
        field = field or "fp32_contents"
        count = n if consistent and draw(st.booleans()) else draw(st.integers(0, 3 * WIDTH))
        if field in ("fp32_contents", "fp64_contents"):
            getattr(tensor.contents, field).extend(draw(arrays(np.float32, count, elements=elements)).astype(float))
        elif field == "bool_contents":
            tensor.contents.bool_contents.extend([True] * count)
        elif field == "bytes_contents":
            tensor.contents.bytes_contents.extend([b"x"] * count)
        else:
            getattr(tensor.contents, field).extend(range(count))
    return tensor, raw


@st.composite
def requests(draw):
    req = pb.ModelInferRequest(model_name=draw(st.sampled_from(["digits"] * 28 + ["other", ""])),
                               model_version=draw(st.sampled_from([""] * 10 + ["1", "9"])),
                               id=draw(st.text(max_size=6)))
    for k, v in draw(parameters).items():
        _set_parameter(req.parameters, k, v)
    for tensor, raw in draw(st.lists(tensors(), min_size=(n := draw(st.sampled_from([1] * 8 + [0, 2, 3]))),
                                     max_size=n)):
        req.inputs.append(tensor)
        if raw is not None:
            req.raw_input_contents.append(raw)
    for _ in range(draw(st.sampled_from([0] * 8 + [1, 2]))):
        req.raw_input_contents.append(draw(st.binary(max_size=64)))  # a stray blob now and then
    for name in draw(st.lists(st.sampled_from(["probabilities", "logits", "nope", ""]), max_size=2)):
        out = req.outputs.add(name=name)
        for k, v in draw(parameters).items():
            _set_parameter(out.parameters, k, v)
    return req


def sent_rows(req) -> np.ndarray:
    """The (N, 64) FP32 rows a request that succeeded actually carried."""
    t = req.inputs[0]
    if req.raw_input_contents:
        flat = np.frombuffer(req.raw_input_contents[0], np.float32)
    else:
        flat = np.asarray(t.contents.fp32_contents, np.float32)
    return flat.reshape(tuple(t.shape))


def answered(req, resp) -> np.ndarray:
    assert [o.name for o in resp.outputs] == ["probabilities"], "an undefended output left the sidecar"
    out = resp.outputs[0]
    if resp.raw_output_contents:
        return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(tuple(out.shape))
    return np.asarray(out.contents.fp32_contents, np.float32).reshape(tuple(out.shape))


def valid_request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="digits", id="valid")
    x = np.linspace(0, 1, 2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
    req.inputs.add(name="input", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(req=requests())
def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(stub, oracle, req):
    try:
        resp = stub.ModelInfer(req, timeout=10)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        event(code.name)
        assert details and not details.startswith("internal error"), f"{code}: {details}"
        assert code in CLEAR_CODES, f"{code}: {details}"  # every malformed request is the client's mistake
    else:
        event("OK")
        x = sent_rows(req)
        np.testing.assert_allclose(answered(req, resp), oracle(x), rtol=1e-5, atol=1e-7)
        assert resp.id == req.id
    ok = stub.ModelInfer(valid_request(), timeout=10)
    x = sent_rows(valid_request())
    np.testing.assert_allclose(answered(valid_request(), ok), oracle(x), rtol=1e-5, atol=1e-7)


def test_nan_and_inf_inputs_never_return_an_undefended_or_nan_vector(stub, oracle):
    """The deterministic corner the property test may not draw: all-NaN, all-Inf, mixed rows.

    The model answers NaN for them; the sidecar names the client's input as the cause."""
    x = np.zeros((4, WIDTH), np.float32)
    x[0] = np.nan
    x[1] = np.inf
    x[2, 3] = -np.inf
    req = valid_request()
    req.inputs[0].shape[:] = list(x.shape)
    req.raw_input_contents[0] = x.tobytes()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # the client's mistake, not the model's
    assert "input 'input' holds NaN or Inf" in info.value.details()
    stub.ModelInfer(valid_request(), timeout=10)
