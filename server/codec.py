"""The only code that reads or writes tensor contents of OIP v2 messages (raw bytes and typed fields).

Open Inference Protocol (KServe v2) tensors travel either typed (`InferTensorContents`, one
repeated field per datatype family) or raw (`raw_input_contents` / `raw_output_contents`: one
little-endian, row-major blob per tensor, in tensor order; then no tensor may also use typed
contents). FP16 only travels raw. tritonclient's `as_numpy` reads raw outputs only, so the
sidecar answers raw whenever the request was raw (docs/design.md#raw-answers).

Upstream answers are *read*, never edited: `read_answer` validates the whole message (one data
representation per tensor, datatype and byte length consistent, unique names, the request's
row count, finite confidences) and returns arrays. An in-process model's answer (`Decoded`: the
embedded upstream's arrays, never encoded) passes the same checks on its arrays, without a
protobuf message built only to be decoded again; `build_response` constructs the client's
answer from scratch out of arrays, so nothing else of the upstream message (other fields, stray
typed fields, unknown protobuf fields, parameters) can ride along. Request decodes raise
`BadRequest` naming the tensor and the mismatch; upstream decodes raise `BadUpstreamOutput`
with a fixed category for the client and the detail for the log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.errors import BadRequest, BadUpstreamOutput

# datatype -> little-endian numpy dtype
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPE_OF = {dt: name for name, dt in DTYPES.items()}
# datatype -> InferTensorContents field (FP16 has none: raw only)
TYPED_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}
CONFIDENCE_DATATYPES = ("FP16", "FP32", "FP64")
MAX_ELEMENTS = 1 << 31


class _UpstreamError:
    """Adapts `BadUpstreamOutput(reason, detail)` to the `error(message)` calls of `decode_tensor`."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, detail: str) -> BadUpstreamOutput:
        return BadUpstreamOutput(self.reason, detail)


_MALFORMED = _UpstreamError("malformed tensor")


def _typed_fields(tensor) -> list[str]:
    """Names of the InferTensorContents fields that hold values."""
    if not tensor.HasField("contents"):
        return []
    return [f.name for f, _ in tensor.contents.ListFields()]


def decode_tensor(tensor, raw: bytes | None, what: str, error=BadRequest) -> np.ndarray:
    """One tensor -> ndarray of its declared shape.

    Args:
        tensor: an InferInputTensor or InferOutputTensor message.
        raw: its raw blob, or None if the message uses typed contents.
        what: how to name the tensor in error messages.
        error: the exception type (or factory) to raise, given one message.
    Exactly one representation is accepted: the raw blob, or the one typed field of the
    tensor's datatype; anything else beside it is an error.
    """
    dt = DTYPES.get(tensor.datatype)
    if dt is None:
        raise error(f"{what}: datatype {tensor.datatype!r} is not supported; "
                    f"use one of {', '.join(DTYPES)}")
    shape = tuple(tensor.shape)
    if shape and min(shape) < 0:
        raise error(f"{what}: shape {list(shape)} has a negative dimension")
    n = math.prod(shape)
    if n > MAX_ELEMENTS or (shape and max(shape) > MAX_ELEMENTS):  # [0, 2**40] is empty, yet numpy refuses it
        raise error(f"{what}: shape {list(shape)} has {n} elements (limit {MAX_ELEMENTS})")
    typed = _typed_fields(tensor)
    if raw is not None:
        if typed:
            raise error(f"{what}: typed contents ({', '.join(typed)}) beside raw contents; use one or the other")
        if len(raw) != n * dt.itemsize:
            raise error(f"{what}: shape {list(shape)} of {tensor.datatype} needs {n * dt.itemsize} bytes, "
                        f"raw contents has {len(raw)}")
        return np.frombuffer(raw, dtype=dt).reshape(shape)
    field = TYPED_FIELD.get(tensor.datatype)
    if field is None:
        raise error(f"{what}: {tensor.datatype} travels only as raw contents")
    stray = [f for f in typed if f != field]
    if stray:
        raise error(f"{what}: {', '.join(stray)} beside {field}; a {tensor.datatype} tensor uses {field} only")
    values = getattr(tensor.contents, field)
    if len(values) != n:
        raise error(f"{what}: shape {list(shape)} needs {n} values, {field} has {len(values)}")
    return np.asarray(values, dtype=dt).reshape(shape)


def check_request_layout(request) -> None:
    """Raw and typed must not be mixed, and raw needs one blob per input."""
    n_raw = len(request.raw_input_contents)
    if n_raw == 0:
        return
    if n_raw != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {n_raw} entries for {len(request.inputs)} inputs")
    for t in request.inputs:
        if _typed_fields(t):
            raise BadRequest(f"input {t.name!r}: typed contents mixed with raw_input_contents; use one or the other")


def decode_inputs(request) -> list[np.ndarray]:
    """All inputs of a request, in order (layout already checked)."""
    raw = request.raw_input_contents
    return [decode_tensor(t, raw[i] if raw else None, f"input {t.name!r}") for i, t in enumerate(request.inputs)]


def with_contents(request, typed: bool):
    """The request as an upstream that reads only typed (`typed`) or only raw contents needs it.

    TorchServe's OIP service ignores `raw_input_contents`, which tritonclient and perf_analyzer
    always send (settings.upstream_contents). Returns `request` itself when it already travels
    that way; otherwise a copy with the same tensors re-encoded (layout already checked).
    """
    if (len(request.raw_input_contents) == 0) == typed:
        return request
    arrays = decode_inputs(request)
    out = type(request)()
    out.CopyFrom(request)
    out.ClearField("raw_input_contents")
    for tensor, array in zip(out.inputs, arrays, strict=True):
        tensor.ClearField("contents")
        if not typed:
            out.raw_input_contents.append(np.ascontiguousarray(array, DTYPES[tensor.datatype]).tobytes())
        elif (field := TYPED_FIELD.get(tensor.datatype)) is not None:
            getattr(tensor.contents, field).extend(array.ravel().tolist())
        else:
            raise BadRequest(f"input {tensor.name!r}: {tensor.datatype} travels only raw, and the upstream reads "
                             "typed contents only (upstream_contents); send another datatype")
    return out
def request_rows(request) -> int:
    """The request's row count: the first dimension of its first input (a scalar input is one row)."""
    shape = request.inputs[0].shape
    return int(shape[0]) if len(shape) else 1


class Decoded:
    """An answer that was never encoded: an in-process model's output arrays (name -> array, in
    the model's output order) and the version it answered under. `read_answer` checks it exactly
    as it checks a decoded message; it carries no parameters. The arrays are made read-only, as a
    decoded message's are, so nothing downstream can edit the upstream's answer in place."""

    __slots__ = ("arrays", "model_version")
    parameters: Mapping = MappingProxyType({})

    def __init__(self, arrays: dict[str, np.ndarray], model_version: str):
        for array in arrays.values():
            if isinstance(array, np.ndarray):
                array.flags.writeable = False
        self.arrays = arrays
        self.model_version = model_version


def read_answer(response, confidence: str | None, wanted: list[str], rows: int) -> dict[str, np.ndarray]:
    """Validate an upstream ModelInferResponse (or a `Decoded` answer) and decode the outputs the
    client gets.

    Args:
        confidence: the confidence output's name; it must be present (None: not asked for).
        wanted: names of the other outputs to return (already allowed by the caller); each must
            be present and not floating point.
        rows: the request's row count; every returned output must have it as first dimension.
    Returns:
        name -> array; the confidence output is (rows, C>=2), float16/32/64, finite.
    Raises:
        BadUpstreamOutput with a fixed category (client text) and the detail (log text).
    """
    decoded = response.arrays if isinstance(response, Decoded) else None
    if decoded is None:
        outputs = response.outputs
        raw = response.raw_output_contents
        if raw and len(raw) != len(outputs):
            raise BadUpstreamOutput("malformed response", f"{len(raw)} raw blobs for {len(outputs)} outputs")
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise BadUpstreamOutput("malformed response", f"duplicate output names {names}")
    else:
        names = list(decoded)  # a dict's keys: unique
    index = {name: i for i, name in enumerate(names)}
    arrays = {}
    for name in [confidence, *wanted] if confidence is not None else wanted:
        if name not in index:
            raise BadUpstreamOutput("missing output", f"no output {name!r} (outputs: {', '.join(names) or 'none'})")
        if decoded is None:
            tensor = outputs[index[name]]
            datatype = tensor.datatype
        else:
            array = decoded[name]
            datatype = DATATYPE_OF.get(array.dtype) if isinstance(array, np.ndarray) else None
            if datatype is None:
                raise BadUpstreamOutput("malformed tensor", f"output {name!r} is {type(array).__name__} "
                                        f"{getattr(array, 'dtype', '')}, not a tensor of an OIP datatype")
        is_confidence = name == confidence
        if is_confidence and datatype not in CONFIDENCE_DATATYPES:
            raise BadUpstreamOutput("confidence output not floating point",
                                    f"output {name!r} is {datatype}, expected one of "
                                    f"{', '.join(CONFIDENCE_DATATYPES)}")
        if not is_confidence and datatype in CONFIDENCE_DATATYPES:
            raise BadUpstreamOutput("allowed output is floating point",
                                    f"output {name!r} is {datatype}: a floating-point output beside the "
                                    "confidences is not passed through")
        if decoded is None:
            array = decode_tensor(tensor, raw[index[name]] if raw else None, f"upstream output {name!r}", _MALFORMED)
        if array.ndim == 0 or array.shape[0] != rows:
            raise BadUpstreamOutput("row count differs from the request",
                                    f"output {name!r} has shape {list(array.shape)}, the request has {rows} rows")
        arrays[name] = array
    if confidence is None:
        return arrays
    probs = arrays[confidence]
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise BadUpstreamOutput("malformed tensor", f"output {confidence!r} has shape {list(probs.shape)}, "
                                "expected [N, C>=2]")
    if np.count_nonzero(np.isfinite(probs)) != probs.size:
        raise BadUpstreamOutput("non-finite confidences", f"output {confidence!r} holds NaN or Inf")
    return arrays


def build_response(request_id: str, model_name: str, model_version: str, outputs: dict[str, np.ndarray],
                   raw: bool) -> pb.ModelInferResponse:
    """A new ModelInferResponse holding `outputs` (name -> array, in order) and nothing else.

    Raw when `raw` or when a tensor is FP16 (which has no typed field); typed otherwise. Each
    tensor keeps its array's datatype.
    """
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    raw = raw or any(a.dtype == np.float16 for a in outputs.values())
    for name, array in outputs.items():
        datatype = DATATYPE_OF[array.dtype]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:  # the array's dtype is the wire's (DATATYPE_OF); tobytes writes C order whatever the layout
            response.raw_output_contents.append(array.tobytes())
        else:
            getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.ravel())
    return response
