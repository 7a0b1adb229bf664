"""Where the sidecar gets the undefended answer: a remote OIP v2 server or an in-process ONNX model.

`RemoteUpstream` talks to any Open Inference Protocol (KServe v2) gRPC server (Triton, KServe,
MLServer; TorchServe under its own service name `org.pytorch.serve.grpc.openinference.
GRPCInferenceService`) over one long-lived grpc.aio channel with keepalive, a bounded answer size,
and a retry policy for UNAVAILABLE on ModelInfer/ModelMetadata (safe to repeat; gRPC stops at the
caller's deadline). The caller's remaining deadline and application metadata are passed on, and
because the upstream call is awaited inside the handler task, a cancelled client call cancels it
too. It counts (re)connections (`generation`) so that the sidecar checks the model again after
each one.

`EmbeddedUpstream` runs an ONNX model (a target directory from `purifier train-target`, or a bare
.onnx) with onnxruntime in a worker thread (ORT releases the GIL, so the event loop keeps serving).
Its answers are the output arrays (`codec.Decoded`), never encoded: they only travel to the data
plane, which checks them as any upstream's answer (`codec.read_answer`) and builds the client's.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

from purifier.artifacts import sha256_file
from purifier.errors import ArtifactError
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.codec import Decoded, check_request_layout, decode_inputs
from purifier_server.errors import BadRequest, UpstreamFailed

MAX_RESPONSE_BYTES = 256 << 20
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC's default reconnect backoff grows to 120 s: after a long upstream outage the sidecar
    # would stay NOT_SERVING for up to two minutes once the upstream is back. Cap it at 2 s.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 1),
    ("grpc.per_rpc_retry_buffer_size", 64 << 20),  # larger requests are sent once, not retried
    # requests are bounded by the sidecar's own receive limit; answers by this (a malformed or
    # hostile upstream must not make the sidecar allocate without bound)
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
]
# ModelInfer and ModelMetadata are safe to repeat (a pure function of the request), so a call that
# finds the upstream UNAVAILABLE (a restart, a dropped connection) is retried with backoff; gRPC
# stops retrying at the caller's deadline. ModelReady is not retried: the readiness probe must see
# an outage at once.
RETRY_POLICY = {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}
Metadata = tuple[tuple[str, str | bytes], ...]


# the upstream is away for now: ask again later rather than take the failure as its answer
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})


class _RandomIds:
    """Ids of 16 hex digits from the operating system's randomness, drawn 4 KiB (512 ids) at a time:
    one system call per 512 requests instead of one per request."""

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        self._pool, self._at = b"", 0

    def __call__(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = secrets.token_bytes(4096), 0
        self._at += 8
        return self._pool[self._at - 8:self._at].hex()


_ids = _RandomIds()
os.register_at_fork(after_in_child=_ids.forget)  # a forked process never repeats its parent's ids


def upstream_request_id() -> str:
    """The id of a request to the upstream: 16 random hex digits, for a client's request and an
    identity probe alike (readiness.py), so the upstream cannot tell the two apart by their ids.

    The operating system's randomness: the ids must not be predictable to the upstream, and they
    are no defense output (those are deterministic keyed functions of the input).
    """
    return _ids()


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: OIP datatype ("" when it is not a tensor) and shape (-1 = any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    onnx_type: str = ""  # embedded only: the ONNX type, e.g. seq(map(int64,tensor(float))) for a ZipMap


class Upstream(Protocol):
    """Where the undefended answer comes from. What the sidecar (app.py) relies on:

    name, version: the model served and the version it answers under.
    confidence_output: the output to defend ("" when it must come from settings).
    inputs, outputs: TensorSpecs, known after `model_metadata` (embedded: at once).
    model_id: the ONNX sha256 when the upstream knows it (embedded), else None.
    generation: grows each time the connection to the upstream is (re)established; the model
        behind it must be verified again (embedded: always 0).
    versions: the versions the upstream's last metadata answer advertised (embedded: its one).
    backend: the runtime behind the model when known ("onnxruntime"), else "" (ModelConfig).
    """

    name: str
    version: str
    versions: tuple[str, ...]
    backend: str
    confidence_output: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    model_id: str | None
    generation: int

    async def infer(self, request, timeout: float | None, metadata: Metadata) -> tuple[object, Metadata]:
        """-> (ModelInferResponse or, in-process, `codec.Decoded`; trailing metadata).
        Errors: UpstreamFailed, BadRequest."""

    async def ready(self, name: str, version: str) -> bool: ...

    async def model_metadata(self, name: str, version: str): ...

    async def model_config(self, name: str, version: str):
        """The upstream's own ModelConfig (Triton's extension), or None when it serves none."""

    async def close(self) -> None: ...


def _specs(tensors) -> list[TensorSpec]:
    return [TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors]


class RemoteUpstream:
    """An OIP v2 gRPC server at `target` ("host:port") exposing `service`.

    Construct it on the running event loop (it watches the channel's connectivity). `versions`
    holds the versions its last ModelMetadata answer advertised.

    Args:
        name, version, confidence_output: the model the sidecar defends, from settings.
        default_timeout: deadline for calls whose caller sent none.
    """

    model_id = None
    versions: tuple[str, ...] = ()
    backend = ""

    def __init__(self, target: str, service: str, default_timeout: float, *, name: str, version: str = "",
                 confidence_output: str = ""):
        self.target = target
        self.name, self.version, self.confidence_output = name, version, confidence_output
        self.default_timeout = default_timeout
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._generation = 0
        self._connected = False
        config = {"methodConfig": [{"name": [{"service": service, "method": m} for m in ("ModelInfer", "ModelMetadata")],
                                    "retryPolicy": RETRY_POLICY}]}
        options = [*CHANNEL_OPTIONS, ("grpc.service_config", json.dumps(config))]
        self._channel = grpc.aio.insecure_channel(target, options=options)

        def method(name, req, resp):
            return self._channel.unary_unary(f"/{service}/{name}", request_serializer=req.SerializeToString,
                                             response_deserializer=resp.FromString)

        self._infer = method("ModelInfer", pb.ModelInferRequest, pb.ModelInferResponse)
        self._ready = method("ModelReady", pb.ModelReadyRequest, pb.ModelReadyResponse)
        self._metadata = method("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse)
        self._config = method("ModelConfig", pb.ModelConfigRequest, pb.ModelConfigResponse)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="upstream-connectivity")

    def _observe(self, ready: bool) -> None:
        if ready and not self._connected:
            self._generation += 1
        self._connected = ready

    @property
    def generation(self) -> int:
        """How many times the channel has become READY: a restarted upstream may serve another model."""
        self._observe(self._channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY)
        return self._generation

    async def _watch(self) -> None:
        # Catches READY -> (failure) -> READY between two reads of `generation`: every change
        # away from READY is seen here, even when the channel is READY again by the time it runs.
        state = self._channel.get_state(try_to_connect=False)
        while True:
            await self._channel.wait_for_state_change(state)
            if state == grpc.ChannelConnectivity.READY:
                self._observe(False)
            state = self._channel.get_state(try_to_connect=False)
            self._observe(state == grpc.ChannelConnectivity.READY)

    async def infer(self, request, timeout, metadata):
        call = self._infer(request, timeout=self.default_timeout if timeout is None else timeout,
                           metadata=metadata or None)
        try:
            response = await call
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as e:
            raise UpstreamFailed(f"upstream {e.code().name}: {e.details()}", e.code()) from None
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
            raise UpstreamFailed(f"upstream {e.code().name}: {e.details()}", e.code()) from None
        self.inputs, self.outputs = _specs(meta.inputs), _specs(meta.outputs)
        self.versions = tuple(meta.versions)
        return meta

    async def model_config(self, name, version):
        # KServe, MLServer and TorchServe do not implement it (UNIMPLEMENTED): then None. An
        # upstream that is away for now raises: None would describe the model without its
        # max_batch_size, and a description that changes refuses the model (readiness.py).
        try:
            return (await self._config(pb.ModelConfigRequest(name=name, version=version), timeout=5.0)).config
        except grpc.aio.AioRpcError as e:
            if e.code() in TRANSIENT_CODES:
                raise UpstreamFailed(f"upstream {e.code().name}: {e.details()}", e.code()) from None
            return None

    async def close(self):
        self._watcher.cancel()
        await asyncio.gather(self._watcher, return_exceptions=True)
        await self._channel.close()


class EmbeddedUpstream:
    """An ONNX classifier run in-process.

    Args:
        model: a target directory (model.onnx + model.json) or an .onnx file.
        name: the model name clients use; default: the directory name or the file stem.
        device: cpu | cuda | auto (onnxruntime providers).
        large_rows: requests with more rows run in their own lane (see below).

    Two worker threads, one per lane: requests of at most `large_rows` rows and larger ones. A
    4096-row batch holds a thread for tens of milliseconds; in one first-come-first-served queue a
    one-row request waited behind every large one queued before it.
    """

    version = "1"
    versions = ("1",)
    backend = "onnxruntime"
    generation = 0

    def __init__(self, model: str | Path, name: str | None = None, device: str = "cpu", large_rows: int = 256):
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
        self.inputs = []
        for i in session.get_inputs():
            if _ORT_TYPES.get(i.type) is None:
                raise ArtifactError(f"model: input {i.name!r} has ONNX type {i.type}, which the sidecar cannot "
                                    f"decode; supported: {', '.join(_ORT_TYPES)}")
            self.inputs.append(TensorSpec(i.name, _ORT_TYPES[i.type], _shape(i.shape), i.type))
        # outputs that are not tensors (a skl2onnx ZipMap) get datatype "": never run, never served
        self.outputs = [TensorSpec(o.name, _ORT_TYPES.get(o.type, ""), _shape(getattr(o, "shape", None) or ()), o.type)
                        for o in session.get_outputs()]
        self.confidence_output = (manifest or {}).get("confidence_output") or self.outputs[0].name
        self.platform = "onnxruntime_onnx"
        # ORT releases the GIL in run(), so the lanes and the event loop proceed in parallel
        self.large_rows = large_rows
        self._small = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-ort")
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-ort-large")

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
        """Run the graph; the answer is the output arrays themselves (`codec.Decoded`): it only
        travels to the data plane, which checks them as it checks any upstream's answer and builds
        the client's answer in the client's representation."""
        arrays = self.decode(request)
        tensors = {s.name for s in self.outputs if s.datatype}
        wanted = [o.name for o in request.outputs] or [s.name for s in self.outputs if s.datatype]
        unknown = [n for n in wanted if n not in tensors]
        if unknown:
            raise BadRequest(f"unknown output(s) {unknown}; the model has {sorted(tensors)}")
        loop = asyncio.get_running_loop()
        rows = len(arrays[0]) if arrays[0].ndim else 1
        lane = self._small if rows <= self.large_rows else self._large
        results = await loop.run_in_executor(lane, self.classifier.session.run, wanted,
                                             dict(zip([s.name for s in self.inputs], arrays, strict=True)))
        return Decoded(dict(zip(wanted, results, strict=True)), self.version), ()

    async def ready(self, name, version):
        return name == self.name and version in ("", self.version)

    async def model_metadata(self, name, version):
        def spec(s):
            return pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)

        return pb.ModelMetadataResponse(name=self.name, versions=[self.version], platform=self.platform,
                                        inputs=[spec(s) for s in self.inputs],
                                        outputs=[spec(s) for s in self.outputs if s.datatype])

    async def model_config(self, name, version):
        return None  # described from the graph's inputs and outputs (model_description)

    async def close(self):
        for lane in (self._small, self._large):
            lane.shutdown(wait=False, cancel_futures=True)


_ORT_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
              "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL"}


def _shape(dims) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in dims)

