"""One inference request through each of the sidecar's fronts, with everything the client can see.

The fronts: gRPC `ModelInfer` (unary), gRPC `ModelStreamInfer` (one request in a stream), REST
with JSON tensors and REST with Triton's binary tensor extension. `call(front, sidecar, request)`
sends a `ModelInferRequest` (raw FP32 inputs) the way that front carries it and returns a `Seen`:
the outcome (gRPC code, or for REST the gRPC code whose HTTP status came back, or for the stream
the error message alone: Triton's stream errors carry no code), the answer's arrays, and every
byte and every string the client received (messages, bodies, headers, metadata, error text), for
the malicious-upstream checks. Plain `http.client` for REST, so nothing is hidden by a client
library's parsing.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field

import grpc
import numpy as np

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.codec import DTYPES, decode_tensor
from purifier_server.errors import HTTP_STATUS

FRONTS = ("grpc", "grpc-stream", "rest-json", "rest-binary")
STREAM_ERROR = "stream error"  # Seen.code of an error answered inside a stream


@dataclass
class Seen:
    """Everything a client can see of one call."""

    code: object                                       # None = answered; else a grpc.StatusCode or STREAM_ERROR
    id: str | None = None
    model_name: str | None = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)    # anything else in the answer: parameters, fields
    blobs: list[bytes] = field(default_factory=list)   # serialized messages, bodies, binary metadata
    texts: list[str] = field(default_factory=list)     # details, text metadata and headers, decoded values
    message: str = ""                                  # the error text


def _grpc_seen(response: pb.ModelInferResponse, seen: Seen) -> None:
    seen.id, seen.model_name = response.id, response.model_name
    seen.blobs.append(response.SerializeToString())
    raw = response.raw_output_contents
    for i, o in enumerate(response.outputs):
        seen.outputs[o.name] = decode_tensor(o, raw[i] if raw else None, o.name)
        for _, values in o.contents.ListFields():
            seen.texts.append(" ".join(map(str, values)))
        if o.parameters:
            seen.extra.append(f"output parameters {dict(o.parameters)}")
    if response.parameters:
        seen.extra.append(f"parameters {dict(response.parameters)}")
    seen.texts.extend(str(v) for v in response.parameters.values())


def _metadata(rpc, seen: Seen) -> None:
    for key, value in (*(rpc.initial_metadata() or ()), *(rpc.trailing_metadata() or ())):
        (seen.blobs if isinstance(value, bytes) else seen.texts).append(value)
        seen.texts.append(key)


def call_grpc(port: int, request: pb.ModelInferRequest, timeout: float = 20) -> Seen:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            response, rpc = stub.ModelInfer.with_call(request, timeout=timeout)
            seen = Seen(None)
            _grpc_seen(response, seen)
        except grpc.RpcError as e:
            rpc = e
            seen = Seen(e.code(), message=e.details() or "", texts=[e.details() or "", e.debug_error_string() or ""])
        _metadata(rpc, seen)
    return seen


def call_stream(port: int, requests: list[pb.ModelInferRequest], timeout: float = 30) -> list[Seen]:
    """Several requests in one ModelStreamInfer stream; the answers in arrival order."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        rpc = stub.ModelStreamInfer(iter(requests), timeout=timeout)
        out = []
        for answer in rpc:
            if answer.error_message:
                seen = Seen(STREAM_ERROR, id=answer.infer_response.id, message=answer.error_message,
                            texts=[answer.error_message])
                seen.blobs.append(answer.SerializeToString())
                if answer.infer_response.outputs or answer.infer_response.raw_output_contents:
                    seen.extra.append("tensors beside an error")
            else:
                seen = Seen(None)
                _grpc_seen(answer.infer_response, seen)
                seen.blobs.append(answer.SerializeToString())
            out.append(seen)
        shared = Seen(None)
        _metadata(rpc, shared)
        for seen in out:
            seen.blobs += shared.blobs
            seen.texts += shared.texts
    return out


def rest_body(request: pb.ModelInferRequest, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The REST body (and headers) of a ModelInferRequest with raw inputs, JSON or binary."""
    inputs, blobs = [], []
    for i, t in enumerate(request.inputs):
        array = decode_tensor(t, request.raw_input_contents[i], t.name)
        doc = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary:
            blob = np.ascontiguousarray(array, DTYPES[t.datatype]).tobytes()
            doc["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            doc["data"] = array.ravel().tolist()
        inputs.append(doc)
    head = {"id": request.id, "inputs": inputs}
    if request.outputs:
        head["outputs"] = [{"name": o.name, "parameters": {"binary_data": binary}} for o in request.outputs]
    if binary:
        head["parameters"] = {"binary_data_output": True}
    header = json.dumps(head).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header)),
                                      "Content-Type": "application/octet-stream"}


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


_CODE_OF_STATUS = {}
for _code, _status in HTTP_STATUS.items():
    _CODE_OF_STATUS.setdefault(_status, _code)


def call_rest(port: int, request: pb.ModelInferRequest, binary: bool, timeout: float = 20) -> Seen:
    body, headers = rest_body(request, binary)
    path = f"/v2/models/{request.model_name}" + (f"/versions/{request.model_version}" if request.model_version
                                                  else "") + "/infer"
    status, answer_headers, answer = http_request(port, "POST", path, body, headers, timeout)
    texts = [f"{k}: {v}" for k, v in answer_headers.items()]
    if status != 200:
        message = json.loads(answer)["error"]
        return Seen(_CODE_OF_STATUS[status], message=message, blobs=[answer], texts=[*texts, message])
    seen = Seen(None, blobs=[answer], texts=texts)
    length = answer_headers.get("inference-header-content-length")
    head = json.loads(answer[: int(length)] if length else answer)
    tail = answer[int(length):] if length else b""
    seen.texts.append(json.dumps(head))
    seen.id, seen.model_name = head.get("id"), head.get("model_name")
    for key in set(head) - {"id", "model_name", "model_version", "outputs"}:
        seen.extra.append(f"field {key}")
    offset = 0
    for o in head["outputs"]:
        dt = DTYPES[o["datatype"]]
        params = dict(o.get("parameters") or {})
        size = params.pop("binary_data_size", None)
        if size is not None:
            array = np.frombuffer(tail[offset:offset + size], dt).reshape(o["shape"])
            offset += size
        else:
            array = np.asarray(o["data"], dt).reshape(o["shape"])
        if params or set(o) - {"name", "datatype", "shape", "data", "parameters"}:
            seen.extra.append(f"output {o['name']} extra {params} {set(o)}")
        seen.outputs[o["name"]] = array
    return seen


def call(front: str, port: int, http_port: int, request: pb.ModelInferRequest) -> Seen:
    if front == "grpc":
        return call_grpc(port, request)
    if front == "grpc-stream":
        (seen,) = call_stream(port, [request])
        return seen
    return call_rest(http_port, request, binary=front == "rest-binary")


def outcome_matches(seen: Seen, front: str, expected) -> bool:
    """The front's outcome is the one expected of a gRPC call (None = answered)."""
    if expected is None or seen.code is None:
        return seen.code is expected
    if front == "grpc-stream":
        return seen.code == STREAM_ERROR
    if front.startswith("rest"):
        return HTTP_STATUS[seen.code] == HTTP_STATUS[expected]
    return seen.code == expected
