"""The sidecar's `inference.GRPCInferenceService`: validate -> upstream -> extract -> defend -> encode.

Open Inference Protocol (KServe v2) over gRPC, answered for exactly one model (the one whose
confidence vectors the defense was fitted for). `ModelInfer` refuses what would bypass the
defense (Triton's `classification` output parameter, any `shared_memory_*` parameter, outputs
that are not the defended one unless allowed), forwards the request with the caller's deadline
and metadata, rewrites the confidence output with the defense (MemGuard, Jia et al. CCS 2019;
PURIFIER, Yang et al. AAAI 2023) and answers with the same id, model name, version and
parameters. Any failure on the way is a gRPC error: an undefended vector is never returned.

Decision on `classification`: refused with INVALID_ARGUMENT rather than emulated, because top-k
strings are an alternative encoding of the same vector and a client can sort the defended
probabilities itself.
"""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np

from purifier import __version__
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.batcher import Batcher
from purifier_server.codec import (
    check_request_layout,
    decode_inputs,
    extract,
    rewrite,
    softmax,
    with_contents,
)
from purifier_server.errors import (
    BadRequest,
    BadUpstreamOutput,
    TooLarge,
    UnknownModel,
    UpstreamFailed,
    status_for,
)
from purifier_server.metrics import SidecarMetrics
from purifier_server.model_description import accepted_versions, config_answer, metadata_answer
from purifier_server.settings import Settings

log = logging.getLogger("purifier_server")

# Metadata gRPC manages itself or that describes the hop, not the application.
_HOP_METADATA = ("grpc-", ":")
_HOP_KEYS = frozenset({"user-agent", "te", "content-type", "authorization", "host"})


def forwardable(metadata) -> tuple[tuple[str, str | bytes], ...]:
    """Application metadata to pass on (authorization is the sidecar's own, never forwarded)."""
    if not metadata:
        return ()
    return tuple((k, v) for k, v in metadata if not k.startswith(_HOP_METADATA) and k not in _HOP_KEYS)


def _refused_parameter(params) -> str | None:
    for key in params:
        if key.startswith("shared_memory"):
            return key
    return None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves one defended model. `upstream` and `batcher` are injected (see app.py)."""

    def __init__(self, settings: Settings, model_name: str, confidence_output: str, upstream,
                 batcher: Batcher, metrics: SidecarMetrics, model_version: str = ""):
        self.settings = settings
        self.model_name = model_name
        self.model_version = model_version or settings.model_version  # configured; "" = the upstream's
        self.encoding = settings.upstream_encoding
        self.confidence_output = confidence_output
        self.keep = frozenset(settings.allow_outputs)
        self.upstream = upstream
        self.batcher = batcher
        self.metrics = metrics
        self.needs_inputs = batcher.defense.needs_inputs
        self.on_upstream_unavailable = None  # async callback: mark health NOT_SERVING at once
        self._outcome = {code: metrics.requests.labels(model_name, code.name) for code in grpc.StatusCode}

    # --- validation -----------------------------------------------------------------------------

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions a request may name besides "" (model_description.accepted_versions)."""
        return accepted_versions(self.model_version, getattr(self.upstream, "versions", ()))

    async def _check_model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise UnknownModel(f"model {name!r} is not served here; this sidecar defends {self.model_name!r}")
        if not version or version in self.versions:
            return
        if not self.model_version:  # perhaps advertised since the upstream's last metadata answer
            try:
                await self.upstream.model_metadata(self.model_name, "")
            except UpstreamFailed:
                pass
            if version in self.versions:
                return
        accepted = ("", *self.versions)
        raise UnknownModel(f"model {name!r} version {version!r} is not served here; use "
                           f"{' or '.join(repr(v) for v in accepted)}"
                           + ("" if self.model_version else " (or set model_version)"))

    def answer_version(self, requested: str, upstream_answer: str) -> str:
        """The version an answer names: the requested one, else the upstream's if accepted."""
        if requested:
            return requested
        return upstream_answer if upstream_answer in self.versions else self.model_version

    async def _validate(self, request) -> None:
        await self._check_model(request.model_name, request.model_version)
        if (key := _refused_parameter(request.parameters)) is not None:
            raise BadRequest(f"parameter {key!r} is refused: shared memory would bypass the defense")
        if "classification" in request.parameters:
            raise BadRequest("parameter 'classification' is refused: request the probabilities and take the "
                             "top-k of the defended vector")
        if not request.inputs:
            raise BadRequest("request has no inputs")
        for t in request.inputs:
            if (key := _refused_parameter(t.parameters)) is not None:
                raise BadRequest(f"input {t.name!r}: parameter {key!r} is refused (shared memory is not supported)")
            rows = t.shape[0] if len(t.shape) else 1
            if rows > self.settings.max_request_rows:
                raise TooLarge(f"input {t.name!r} has {rows} rows; the limit is {self.settings.max_request_rows} "
                               "(max_request_rows)")
        check_request_layout(request)
        allowed = self.keep | {self.confidence_output}
        for o in request.outputs:
            if o.name not in allowed:
                raise BadRequest(f"output {o.name!r} is not served; choose from {', '.join(sorted(allowed))}")
            if "classification" in o.parameters:
                raise BadRequest(f"output {o.name!r}: the 'classification' parameter is refused; "
                                 "request the probabilities and take the top-k of the defended vector")
            if (key := _refused_parameter(o.parameters)) is not None:
                raise BadRequest(f"output {o.name!r}: parameter {key!r} is refused: shared memory would "
                                 "bypass the defense")

    # --- ModelInfer -----------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        t0 = time.perf_counter()
        try:
            response = await self._infer(request, context, t0)
        except Exception as e:
            code, message, bug = status_for(e)
            self._outcome[code].inc()
            if isinstance(e, UpstreamFailed) and code == grpc.StatusCode.UNAVAILABLE and self.on_upstream_unavailable:
                await self.on_upstream_unavailable()
            log.log(logging.ERROR if bug else logging.WARNING, "request failed",
                    exc_info=e if bug else None,
                    extra={"request_id": request.id, "model": request.model_name, "code": code.name,
                           "error": message})
            await context.abort(code, message)
        self._outcome[grpc.StatusCode.OK].inc()
        self.metrics.total_stage.observe(time.perf_counter() - t0)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request served", extra={"request_id": request.id, "model": request.model_name,
                                               "ms": round(1e3 * (time.perf_counter() - t0), 3)})
        return response

    async def _infer(self, request, context, t0):
        await self._validate(request)
        inputs = None
        if self.needs_inputs:
            first = decode_inputs(request)[0]
            inputs = np.ascontiguousarray(first.reshape(len(first), -1), dtype=np.float32)
        t1 = time.perf_counter()
        forwarded = request if self.encoding is None else with_contents(request, self.encoding == "typed")
        response, trailing = await self.upstream.infer(forwarded, context.time_remaining(),
                                                       forwardable(context.invocation_metadata()))
        self.metrics.upstream_stage.observe(time.perf_counter() - t1)
        index, probs = extract(response, self.confidence_output)
        if inputs is not None and len(inputs) != len(probs):
            raise BadUpstreamOutput(f"the request has {len(inputs)} rows but the upstream answered {len(probs)}")
        if self.settings.confidence_kind == "logits":
            probs = softmax(probs)
        defended = await self.batcher.submit(probs, inputs)
        rewrite(response, index, defended, self.keep, raw_request=len(request.raw_input_contents) > 0)
        response.id = request.id
        response.model_name = request.model_name
        response.model_version = self.answer_version(request.model_version, response.model_version)
        if trailing := forwardable(trailing):
            context.set_trailing_metadata(trailing)
        return response

    # --- the rest of the protocol ---------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.upstream.ready(self.model_name, ""))

    async def ModelReady(self, request, context):
        try:
            await self._check_model(request.name, request.version)
        except UnknownModel:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self.upstream.ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="purifier", version=__version__, extensions=[])

    async def _described(self, request, context, config: bool):
        try:
            await self._check_model(request.name, request.version)
            meta = await self.upstream.model_metadata(request.name, request.version)
            own = await self.upstream.model_config(request.name, request.version) if config else None
        except Exception as e:
            code, message, _ = status_for(e)
            await context.abort(code, message)
        served = (self.confidence_output, *sorted(self.keep - {self.confidence_output}))
        if not config:
            return metadata_answer(self.model_name, self.versions, meta.platform, meta.inputs, meta.outputs, served)
        return config_answer(self.model_name, self.versions, meta.inputs, meta.outputs, served,
                             self.settings.max_request_rows, own, platform=meta.platform,
                             backend=getattr(self.upstream, "backend", ""))

    async def ModelMetadata(self, request, context):
        return await self._described(request, context, config=False)

    async def ModelConfig(self, request, context):
        """Triton's ModelConfig (perf_analyzer asks for it first), described by model_description."""
        return pb.ModelConfigResponse(config=await self._described(request, context, config=True))
