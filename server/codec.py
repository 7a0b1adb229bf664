"""The only code that reads or writes tensor contents of OIP v2 messages (raw bytes and typed fields).

Open Inference Protocol (KServe v2) tensors travel either typed (`InferTensorContents`, one
repeated field per datatype family) or raw (`raw_input_contents` / `raw_output_contents`: one
little-endian, row-major blob per tensor, in tensor order; then no tensor may also use typed
contents). FP16 only travels raw. tritonclient's `as_numpy` reads raw outputs only, so the
sidecar answers raw whenever the request was raw (REFERENCE.md section 5).

Every decode checks the declared shape against the data it got and raises `BadRequest` (client
input) or `BadUpstreamOutput` (the upstream's answer) naming the tensor and the mismatch.
"""

from __future__ import annotations

import math

import numpy as np

from purifier_server.errors import BadRequest, BadUpstreamOutput

# datatype -> little-endian numpy dtype
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPE_OF = {np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}
# datatype -> InferTensorContents field (FP16 has none: raw only)
TYPED_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}
CONFIDENCE_DATATYPES = ("FP16", "FP32", "FP64")
MAX_ELEMENTS = 1 << 31


def _has_typed(tensor) -> bool:
    return tensor.HasField("contents") and tensor.contents.ByteSize() > 0


def decode_tensor(tensor, raw: bytes | None, what: str, error=BadRequest) -> np.ndarray:
    """One tensor -> ndarray of its declared shape.

    Args:
        tensor: an InferInputTensor or InferOutputTensor message.
        raw: its raw blob, or None if the message uses typed contents.
        what: how to name the tensor in error messages.
    """
    dt = DTYPES.get(tensor.datatype)
    if dt is None:
        raise error(f"{what}: datatype {tensor.datatype!r} is not supported; "
                    f"use one of {', '.join(DTYPES)}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise error(f"{what}: shape {list(shape)} has a negative dimension")
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise error(f"{what}: shape {list(shape)} has {n} elements (limit {MAX_ELEMENTS})")
    if raw is not None:
        if len(raw) != n * dt.itemsize:
            raise error(f"{what}: shape {list(shape)} of {tensor.datatype} needs {n * dt.itemsize} bytes, "
                        f"raw contents has {len(raw)}")
        return np.frombuffer(raw, dtype=dt).reshape(shape)
    field = TYPED_FIELD.get(tensor.datatype)
    if field is None:
        raise error(f"{what}: {tensor.datatype} travels only as raw contents")
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
        if _has_typed(t):
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


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits -> (N, C) probabilities in the same dtype (computed in float64)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(logits.dtype)


def extract(response, name: str) -> tuple[int, np.ndarray]:
    """The confidence output of an upstream response: (its index, (N, C) float array)."""
    index = next((i for i, o in enumerate(response.outputs) if o.name == name), None)
    if index is None:
        got = ", ".join(o.name for o in response.outputs) or "none"
        raise BadUpstreamOutput(f"upstream response has no output {name!r} (outputs: {got})")
    tensor = response.outputs[index]
    if tensor.datatype not in CONFIDENCE_DATATYPES:
        raise BadUpstreamOutput(f"upstream output {name!r} is {tensor.datatype}, "
                                f"expected one of {', '.join(CONFIDENCE_DATATYPES)}")
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise BadUpstreamOutput(f"upstream response has {len(raw)} raw blobs for {len(response.outputs)} outputs")
    array = decode_tensor(tensor, raw[index] if raw else None, f"upstream output {name!r}", BadUpstreamOutput)
    if array.ndim != 2 or array.shape[1] < 2:
        raise BadUpstreamOutput(f"upstream output {name!r} has shape {list(array.shape)}, expected [N, C>=2]")
    return index, array


def _to_raw(tensor) -> bytes:
    return decode_tensor(tensor, None, f"upstream output {tensor.name!r}", BadUpstreamOutput).tobytes()


def rewrite(response, index: int, defended: np.ndarray, keep: frozenset[str], raw_request: bool) -> None:
    """Replace output `index` with `defended` (N, C) in place and drop outputs not in `keep`.

    The response stays raw if it was raw and becomes raw if the request was raw; typed otherwise.
    The defended tensor keeps its datatype.
    """
    outputs = response.outputs
    was_raw = len(response.raw_output_contents) > 0
    drop = [i for i, o in enumerate(outputs) if i != index and o.name not in keep]
    for i in reversed(drop):
        del outputs[i]
        if was_raw:
            del response.raw_output_contents[i]
    index -= sum(1 for i in drop if i < index)
    tensor = outputs[index]
    blob = np.ascontiguousarray(defended, dtype=DTYPES[tensor.datatype]).tobytes()
    if was_raw:
        response.raw_output_contents[index] = blob
    elif raw_request:
        blobs = [blob if i == index else _to_raw(o) for i, o in enumerate(outputs)]
        for o in outputs:
            o.ClearField("contents")
        response.raw_output_contents.extend(blobs)
    else:
        field = TYPED_FIELD[tensor.datatype]
        tensor.contents.ClearField(field)
        getattr(tensor.contents, field).extend(defended.ravel())
