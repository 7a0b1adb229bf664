"""Where the sidecar gets the undefended answer: a remote OIP v2 server or an in-process ONNX model.

`RemoteUpstream` talks to any Open Inference Protocol (KServe v2) gRPC server (Triton, KServe,
MLServer; TorchServe under its own service name `org.pytorch.serve.grpc.openinference.
GRPCInferenceService`) over one long-lived grpc.aio channel with keepalive and INT32_MAX message
sizes. The caller's remaining deadline and application metadata are passed on, and because the
upstream call is awaited inside the handler task, a cancelled client call cancels it too.

`EmbeddedUpstream` runs an ONNX model (a target directory from `purifier train-target`, or a bare
.onnx) with onnxruntime in a worker thread (ORT releases the GIL, so the event loop keeps serving).
It answers raw to raw requests and typed to typed ones.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

from purifier.artifacts import sha256_file
from purifier.errors import ArtifactError
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.codec import (
    DATATYPE_OF,
    DTYPES,
    TYPED_FIELD,
    check_request_layout,
    decode_inputs,
)
from purifier_server.errors import BadRequest, UpstreamFailed

INT32_MAX = 2**31 - 1
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC's default reconnect backoff grows to 120 s: after a long upstream outage the sidecar
    # would stay NOT_SERVING for up to two minutes once the upstream is back. Cap it at 2 s.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
Metadata = tuple[tuple[str, str | bytes], ...]


class Upstream(Protocol):
    model_id: str | None

    async def infer(self, request, timeout: float | None, metadata: Metadata) -> tuple[object, Metadata]:
        """-> (ModelInferResponse, application metadata to send back)."""

    async def ready(self, name: str, version: str) -> bool: ...

    async def model_metadata(self, name: str, version: str): ...

    async def model_config(self, name: str, version: str):
        """The upstream's own ModelConfig (Triton's extension), or None when it serves none."""

    async def close(self) -> None: ...


class RemoteUpstream:
    """An OIP v2 gRPC server at `target` ("host:port") exposing `service`.

    `versions` holds the versions its last ModelMetadata answer advertised.
    """

    model_id = None
    versions: tuple[str, ...] = ()

    def __init__(self, target: str, service: str, default_timeout: float):
        self.target = target
        self.default_timeout = default_timeout
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)

        def method(name, req, resp):
            return self._channel.unary_unary(f"/{service}/{name}", request_serializer=req.SerializeToString,
                                             response_deserializer=resp.FromString)

        self._infer = method("ModelInfer", pb.ModelInferRequest, pb.ModelInferResponse)
        self._ready = method("ModelReady", pb.ModelReadyRequest, pb.ModelReadyResponse)
        self._metadata = method("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse)
        self._config = method("ModelConfig", pb.ModelConfigRequest, pb.ModelConfigResponse)

    async def infer(self, request, timeout, metadata):
        call = self._infer(request, timeout=self.default_timeout if timeout is None else timeout,
                           metadata=metadata or None)
        try:
            response = await call
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as e:
            raise UpstreamFailed(f"upstream: {e.details()}", e.code()) from None
        return response, tuple(trailing or ())

    async def ready(self, name, version):
        try:
            return (await self._ready(pb.ModelReadyRequest(name=name, version=version), timeout=2.0)).ready
        except grpc.aio.AioRpcError:
            return False

    async def model_metadata(self, name, version):
        try:
            meta = await self._metadata(pb.ModelMetadataRequest(name=name, version=version), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            raise UpstreamFailed(f"upstream: {e.details()}", e.code()) from None
        self.versions = tuple(meta.versions)
        return meta

    async def model_config(self, name, version):
        # KServe, MLServer and TorchServe do not implement it (UNIMPLEMENTED): then None
        try:
            return (await self._config(pb.ModelConfigRequest(name=name, version=version), timeout=5.0)).config
        except grpc.aio.AioRpcError:
            return None

    async def close(self):
        await self._channel.close()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


class EmbeddedUpstream:
    """An ONNX classifier run in-process.

    Args:
        model: a target directory (model.onnx + model.json) or an .onnx file.
        name: the model name clients use; default: the directory name or the file stem.
        device: cpu | cuda | auto (onnxruntime providers).
    """

    version = "1"
    versions = ("1",)
    backend = "onnxruntime"

    def __init__(self, model: str | Path, name: str | None = None, device: str = "cpu"):
        from purifier.models.onnx_runner import OnnxClassifier

        path = Path(model)
        manifest = None
        if path.is_dir():
            from purifier.models.target import Target

            target = Target.load(path)  # checks the ONNX hash against model.json
            manifest, onnx = target.manifest, target.onnx_path
            self.model_id = target.model_id
        else:
            if path.suffix != ".onnx":
                raise ArtifactError(f"model: {path} is neither a target directory nor an .onnx file")
            onnx = path
            self.model_id = sha256_file(path)
        self.name = name or (path.name if path.is_dir() else path.stem)
        self.classifier = OnnxClassifier(onnx, device=device)
        session = self.classifier.session
        self.inputs = [TensorSpec(i.name, _ort_datatype(i.type), _shape(i.shape)) for i in session.get_inputs()]
        self.outputs = [TensorSpec(o.name, _ort_datatype(o.type), _shape(o.shape)) for o in session.get_outputs()]
        self.confidence_output = (manifest or {}).get("confidence_output") or self.outputs[0].name
        self.platform = "onnxruntime_onnx"
        # one thread: ORT's own intra-op pool does the parallel work; this keeps the loop free
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-ort")

    def decode(self, request) -> list[np.ndarray]:
        """Check the request against the graph's inputs and decode them."""
        check_request_layout(request)
        names = [t.name for t in request.inputs]
        expected = [s.name for s in self.inputs]
        if sorted(names) != sorted(expected):
            raise BadRequest(f"inputs {names} do not match the model's inputs {expected}")
        arrays = dict(zip(names, decode_inputs(request), strict=True))
        out = []
        for spec in self.inputs:
            a = arrays[spec.name]
            tensor = request.inputs[names.index(spec.name)]
            if tensor.datatype != spec.datatype:
                raise BadRequest(f"input {spec.name!r}: datatype {tensor.datatype}, the model expects {spec.datatype}")
            if a.ndim != len(spec.shape) or any(s >= 0 and s != d for s, d in zip(spec.shape, a.shape, strict=True)):
                raise BadRequest(f"input {spec.name!r}: shape {list(a.shape)} does not fit the model's "
                                 f"{[s if s >= 0 else -1 for s in spec.shape]}")
            out.append(a)
        return out

    async def infer(self, request, timeout, metadata):
        arrays = self.decode(request)
        known = {s.name for s in self.outputs}
        wanted = [o.name for o in request.outputs] or [s.name for s in self.outputs]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise BadRequest(f"unknown output(s) {unknown}; the model has {sorted(known)}")
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self.classifier.session.run, wanted,
                                             dict(zip([s.name for s in self.inputs], arrays, strict=True)))
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=self.version, id=request.id)
        raw = len(request.raw_input_contents) > 0 or any(a.dtype == np.float16 for a in results)
        for name, array in zip(wanted, results, strict=True):
            datatype = DATATYPE_OF.get(array.dtype)
            if datatype is None:
                raise ArtifactError(f"model output {name!r} has dtype {array.dtype}; expected FP16/32/64")
            tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            if raw:
                response.raw_output_contents.append(np.ascontiguousarray(array, DTYPES[datatype]).tobytes())
            else:  # mirror a typed request, as KServe and MLServer do
                getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.ravel())
        return response, ()

    async def ready(self, name, version):
        return name == self.name and version in ("", self.version)

    async def model_metadata(self, name, version):
        def spec(s):
            return pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)

        return pb.ModelMetadataResponse(name=self.name, versions=[self.version], platform=self.platform,
                                        inputs=[spec(s) for s in self.inputs], outputs=[spec(s) for s in self.outputs])

    async def model_config(self, name, version):
        return None  # described from the graph's inputs and outputs (model_description)

    async def close(self):
        self._executor.shutdown(wait=False, cancel_futures=True)


_ORT_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
              "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL"}


def _ort_datatype(t: str) -> str:
    if t not in _ORT_TYPES:
        raise ArtifactError(f"model: ONNX tensor type {t} is not supported by the sidecar")
    return _ORT_TYPES[t]


def _shape(dims) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in dims)

