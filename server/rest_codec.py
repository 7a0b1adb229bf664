"""The Open Inference Protocol's REST encoding <-> the protobuf messages the data plane works on.

OIP v2 over HTTP (KServe v2 REST, Triton's HTTP front) carries an inference request as a JSON
object whose tensors hold their values in `data` (flat row-major, or nested in the tensor's
shape), or, with Triton's binary tensor extension, as that JSON header followed by the tensors'
raw bytes: the header's length is in the `Inference-Header-Content-Length` HTTP header and a
binary tensor names its byte count in `parameters.binary_data_size`. Outputs come back as JSON
`data` unless the request asks for binary (`parameters.binary_data_output` for all outputs,
`parameters.binary_data` per output).

Here the REST body becomes a `ModelInferRequest` with raw contents (JSON values converted to the
tensor's datatype, strictly: numbers for FP tensors, integers in range for integer tensors, JSON
booleans for BOOL, no NaN or Inf, exactly the shape's element count) and a `ModelInferResponse`
becomes a REST body; `codec.decode_tensor` then checks each tensor as it checks a gRPC one
(datatype, shape, byte count), so a REST tensor and a gRPC tensor are held to the same rules. The
REST upstream (`rest_upstream.py`) uses the same functions the other way round, with upstream
errors (`BadUpstreamOutput`, a fixed category for the client) instead of `BadRequest`.

BYTES tensors are refused, as in `codec` (no classifier input or confidence output is text).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import orjson

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.codec import DTYPES, MAX_ELEMENTS, decode_tensor
from purifier_server.errors import BadRequest, BadUpstreamOutput

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
# REST-only parameters: they say how a tensor travels over HTTP, so they do not go upstream (or back)
_TRANSPORT_PARAMETERS = frozenset({"binary_data", "binary_data_size", "binary_data_output"})
Error = Callable[[str], Exception]


def _upstream_error(detail: str) -> BadUpstreamOutput:
    return BadUpstreamOutput("malformed response", detail)


def split_body(body: bytes, header_length: str | None, error: Error = BadRequest) -> tuple[dict, memoryview]:
    """(the JSON header as a dict, the binary tail) of a REST inference body.

    header_length: the `Inference-Header-Content-Length` header, if any (binary extension).
    """
    view = memoryview(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise error(f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the "
                        f"{len(body)}-byte body")
        n = int(header_length)
        head, tail = view[:n], view[n:]
    else:
        head, tail = view, view[len(body):]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise error(f"the body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise error("the body must be a JSON object")
    return doc, tail


def _field(doc: Mapping, key: str, kind: type, what: str, error: Error, default=None):
    """doc[key] if it is a `kind` (JSON null counts as absent: `default`), else `error`."""
    value = doc.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        name = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(kind, kind.__name__)
        raise error(f"{what}: {key!r} must be {name}")
    return value


def parameters_to_pb(params: Mapping, target, what: str, error: Error) -> None:
    """JSON parameters (bool, integer, number or string values) into a protobuf InferParameter map."""
    for key, value in params.items():
        if key in _TRANSPORT_PARAMETERS:
            continue
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if not -(1 << 63) <= value < (1 << 63):
                raise error(f"{what}: parameter {key!r} is out of the int64 range")
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise error(f"{what}: parameter {key!r} must be a boolean, number or string")


def parameters_to_json(params) -> dict:
    """A protobuf InferParameter map -> JSON values."""
    out = {}
    for key, p in params.items():
        kind = p.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(p, kind)
    return out


def json_values(data, datatype: str, shape: tuple[int, ...], what: str, error: Error) -> bytes:
    """A tensor's JSON `data` (flat, or nested in `shape`) -> its raw little-endian bytes.

    Numbers for FP tensors, integers within the datatype's range for integer tensors, booleans
    for BOOL; exactly prod(shape) values.
    """
    dt = DTYPES.get(datatype)
    if dt is None:
        raise error(f"{what}: datatype {datatype!r} is not supported; use one of {', '.join(DTYPES)}")
    if not isinstance(data, list):
        raise error(f"{what}: 'data' must be a list of values")
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise error(f"{what}: shape {list(shape)} has {n} elements (limit {MAX_ELEMENTS})")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):
        raise error(f"{what}: 'data' is ragged; give a flat list or one nested in the shape {list(shape)}") from None
    if values.size != n or (values.ndim != 1 and values.shape != shape):
        raise error(f"{what}: shape {list(shape)} needs {n} values, 'data' has {values.size}"
                    + ("" if values.ndim == 1 or values.size != n else f" shaped {list(values.shape)}"))
    if n == 0:
        return b""
    kind = values.dtype.kind
    if dt.kind == "b":
        ok = kind == "b"
    elif dt.kind == "f":
        ok = kind in "iuf"
    else:
        ok = kind in "iu"
        if ok:
            info = np.iinfo(dt)
            ok = bool(values.min() >= info.min) and bool(values.max() <= info.max)
            if not ok:
                raise error(f"{what}: values outside the {datatype} range [{info.min}, {info.max}]")
    if not ok:
        expected = {"b": "booleans", "f": "numbers"}.get(dt.kind, "integers")
        raise error(f"{what}: a {datatype} tensor holds {expected}, 'data' holds {values.dtype.name} values")
    with np.errstate(over="ignore"):  # an FP64 value beyond FP32's range becomes Inf: refused just below
        out = values.astype(dt)
    if dt.kind == "f" and not np.isfinite(out).all():
        raise error(f"{what}: values outside the {datatype} range")
    return out.tobytes()


def _tensor(doc, index: int, kind: str, tail: memoryview, offset: int, error: Error):
    """(name, datatype, shape, parameters, raw bytes, new offset) of one JSON tensor."""
    what = f"{kind} {index}"
    if not isinstance(doc, dict):
        raise error(f"{what} must be a JSON object")
    name = _field(doc, "name", str, what, error)
    if name is None:
        raise error(f"{what} has no 'name'")
    what = f"{kind} {name!r}"
    datatype = _field(doc, "datatype", str, what, error)
    shape = _field(doc, "shape", list, what, error)
    if datatype is None or shape is None:
        raise error(f"{what} needs 'datatype' and 'shape'")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise error(f"{what}: 'shape' must be a list of integers")
    if any(d < 0 for d in shape):
        raise error(f"{what}: shape {shape} has a negative dimension")
    if any(d > MAX_ELEMENTS for d in shape):
        raise error(f"{what}: shape {shape} has {math.prod(shape)} elements (limit {MAX_ELEMENTS})")
    params = _field(doc, "parameters", dict, what, error) or {}
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise error(f"{what}: 'binary_data_size' must be a non-negative integer")
        if "data" in doc:
            raise error(f"{what}: 'data' beside 'binary_data_size'; use one or the other")
        if offset + size > len(tail):
            raise error(f"{what}: binary_data_size {size} runs past the body's binary part "
                        f"({len(tail) - offset} bytes left)")
        raw = bytes(tail[offset:offset + size])
        offset += size
    else:
        if "data" not in doc:
            raise error(f"{what} has neither 'data' nor 'binary_data_size'")
        raw = json_values(doc["data"], datatype, tuple(shape), what, error)
    return name, datatype, shape, params, raw, offset


def _tensors_to_pb(items: list, kind: str, add, raw_contents, tail: memoryview, error: Error) -> int:
    """Every JSON tensor of `items` ("input" or "output" tensors) added with `add(name=,
    datatype=)`, its shape and parameters set and its bytes appended to `raw_contents`; returns
    how many bytes of `tail` no tensor took."""
    offset = 0
    for i, item in enumerate(items):
        name, datatype, shape, params, raw, offset = _tensor(item, i, kind, tail, offset, error)
        tensor = add(name=name, datatype=datatype)
        _set_shape(tensor, shape, f"{kind} {name!r}", error)
        parameters_to_pb(params, tensor.parameters, f"{kind} {name!r}", error)
        raw_contents.append(raw)
    return len(tail) - offset


def _set_shape(tensor, shape, what: str, error: Error) -> None:
    try:
        tensor.shape.extend(shape)
    except ValueError:
        raise error(f"{what}: shape {shape} is out of range") from None


class RestOutputs:
    """Which outputs a REST client wants as binary (Triton's binary_data_output / binary_data)."""

    def __init__(self, default: bool, per_output: Mapping[str, bool]):
        self.default, self.per_output = default, dict(per_output)

    def binary(self, name: str) -> bool:
        return self.per_output.get(name, self.default)


def infer_request(body: bytes, header_length: str | None, model_name: str,
                  model_version: str) -> tuple[pb.ModelInferRequest, RestOutputs]:
    """A client's REST inference body -> (ModelInferRequest with raw contents, binary output wishes).

    Raises BadRequest naming the field and the problem.
    """
    doc, tail = split_body(body, header_length)
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    request_id = _field(doc, "id", str, "request", BadRequest)
    if request_id is not None:
        request.id = request_id
    params = _field(doc, "parameters", dict, "request", BadRequest) or {}
    parameters_to_pb(params, request.parameters, "request", BadRequest)
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise BadRequest("request: parameter 'binary_data_output' must be a boolean")
    inputs = _field(doc, "inputs", list, "request", BadRequest) or []
    left = _tensors_to_pb(inputs, "input", request.inputs.add, request.raw_input_contents, tail, BadRequest)
    if left:
        raise BadRequest(f"the body has {left} bytes after the last binary input")
    binary = {}
    for i, item in enumerate(_field(doc, "outputs", list, "request", BadRequest) or []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"output {i} must be an object with a 'name'")
        out = request.outputs.add(name=item["name"])
        oparams = _field(item, "parameters", dict, f"output {item['name']!r}", BadRequest) or {}
        if "binary_data" in oparams:
            if not isinstance(oparams["binary_data"], bool):
                raise BadRequest(f"output {item['name']!r}: parameter 'binary_data' must be a boolean")
            binary[item["name"]] = oparams["binary_data"]
        parameters_to_pb(oparams, out.parameters, f"output {item['name']!r}", BadRequest)
    # the tensors are checked as gRPC ones are (datatype, shape, byte count), one message per problem
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        decode_tensor(tensor, raw, f"input {tensor.name!r}")
    return request, RestOutputs(default_binary, binary)


def _response_arrays(response: pb.ModelInferResponse) -> list[tuple[pb.ModelInferResponse.InferOutputTensor,
                                                                     np.ndarray]]:
    raw = response.raw_output_contents
    return [(t, decode_tensor(t, raw[i] if raw else None, f"output {t.name!r}"))
            for i, t in enumerate(response.outputs)]


def infer_response_body(response: pb.ModelInferResponse, outputs: RestOutputs) -> tuple[bytes, int | None]:
    """(body, JSON header length or None) of the REST answer to a constructed ModelInferResponse."""
    tensors, blobs = [], []
    for t, array in _response_arrays(response):
        doc: dict = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = parameters_to_json(t.parameters)
        if outputs.binary(t.name):
            blob = np.ascontiguousarray(array, DTYPES[t.datatype]).tobytes()
            params["binary_data_size"] = len(blob)
            blobs.append(blob)
        else:
            doc["data"] = np.ascontiguousarray(array).ravel()
        if params:
            doc["parameters"] = params
        tensors.append(doc)
    head = {"model_name": response.model_name, "model_version": response.model_version, "outputs": tensors}
    if response.id:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = parameters_to_json(response.parameters)
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join((header, *blobs)), len(header)


# --- the other direction: the sidecar as a REST client of an upstream --------------------------------

def request_body(request: pb.ModelInferRequest) -> bytes:
    """A (checked) ModelInferRequest -> the JSON body of a REST inference request.

    Inputs travel as JSON `data`, which every OIP REST server reads (MLServer refuses binary
    inputs); outputs are asked for as JSON too.
    """
    raw = request.raw_input_contents
    inputs = []
    for i, t in enumerate(request.inputs):
        array = decode_tensor(t, raw[i] if raw else None, f"input {t.name!r}")
        doc = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
               "data": np.ascontiguousarray(array).ravel()}
        if t.parameters:
            doc["parameters"] = parameters_to_json(t.parameters)
        inputs.append(doc)
    head: dict = {"id": request.id, "inputs": inputs}  # KServe answers 500 to a request without an id
    if request.parameters:
        head["parameters"] = parameters_to_json(request.parameters)
    if request.outputs:
        head["outputs"] = [{"name": o.name, **({"parameters": parameters_to_json(o.parameters)}
                                               if o.parameters else {})} for o in request.outputs]
    return orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)


def infer_response(body: bytes, header_length: str | None) -> pb.ModelInferResponse:
    """An upstream's REST answer -> ModelInferResponse (raw contents), for `codec.read_answer`.

    Only names, datatypes, shapes, values and parameters are taken; anything malformed is a
    BadUpstreamOutput ("malformed response"), whose detail goes to the log only.
    """
    doc, tail = split_body(body, header_length, _upstream_error)
    response = pb.ModelInferResponse()
    for key in ("model_name", "model_version", "id"):
        value = _field(doc, key, str, "response", _upstream_error)
        if value is not None:
            setattr(response, key, value)
    parameters_to_pb(_field(doc, "parameters", dict, "response", _upstream_error) or {}, response.parameters,
                     "response", _upstream_error)
    left = _tensors_to_pb(_field(doc, "outputs", list, "response", _upstream_error) or [], "output",
                          response.outputs.add, response.raw_output_contents, tail, _upstream_error)
    if left:
        raise _upstream_error(f"{left} bytes after the last binary output")
    return response


# --- metadata ----------------------------------------------------------------------------------------

def metadata_json(meta: pb.ModelMetadataResponse) -> dict:
    def tensors(items):
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}


def metadata_from_json(doc) -> pb.ModelMetadataResponse:
    """An upstream's REST model metadata -> ModelMetadataResponse (raises BadUpstreamOutput)."""
    if not isinstance(doc, dict):
        raise _upstream_error("model metadata is not a JSON object")
    meta = pb.ModelMetadataResponse()
    meta.name = _field(doc, "name", str, "metadata", _upstream_error, "")
    meta.platform = _field(doc, "platform", str, "metadata", _upstream_error, "")
    versions = _field(doc, "versions", list, "metadata", _upstream_error, [])
    meta.versions.extend(v for v in versions if isinstance(v, str))
    for key, target in (("inputs", meta.inputs), ("outputs", meta.outputs)):
        for i, item in enumerate(_field(doc, key, list, "metadata", _upstream_error, [])):
            what = f"metadata {key} {i}"
            if not isinstance(item, dict):
                raise _upstream_error(f"{what} is not an object")
            shape = _field(item, "shape", list, what, _upstream_error, [])
            if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise _upstream_error(f"{what}: shape is not a list of integers")
            t = target.add(name=_field(item, "name", str, what, _upstream_error, ""),
                           datatype=_field(item, "datatype", str, what, _upstream_error, ""))
            _set_shape(t, shape, what, _upstream_error)
    return meta


def message_json(message) -> dict:
    """A protobuf message (ModelConfig) -> JSON with proto field names, enum names and integers as
    numbers (protobuf's json_format writes 64-bit integers as strings, which perf_analyzer and
    tritonclient do not read as dims)."""
    def value(field, v):
        if field.type == field.TYPE_MESSAGE:
            return message_json(v)
        if field.type == field.TYPE_ENUM:
            known = field.enum_type.values_by_number
            return known[v].name if v in known else v
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else v

    out: dict[str, Any] = {}
    for field, v in message.ListFields():
        if field.type == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            out[field.name] = {k: value(entry, item) for k, item in v.items()}
        elif field.label == field.LABEL_REPEATED:
            out[field.name] = [value(field, item) for item in v]
        else:
            out[field.name] = value(field, v)
    return out
