"""The sidecar's request path, whatever the transport: validate -> upstream -> read -> defend -> construct.

Open Inference Protocol (KServe v2), answered for exactly one model (the one whose confidence
vectors the defense was fitted for). The fronts (`servicer.py` for gRPC, unary and streaming;
`http_front.py` for REST) only translate wire messages to a `ModelInferRequest` and back; every
rule lives here, once. `infer`:

1. refuses what would bypass the defense (Triton's `classification` parameter, any
   `shared_memory_*` parameter, outputs that are neither the confidence output nor allowed) or
   exceed a limit (`max_request_rows`), and anything while the upstream model is unverified;
2. forwards the request with the caller's deadline and application metadata (re-encoded as typed
   or raw contents when `upstream_contents` asks for it: TorchServe reads typed contents only),
   asking for the confidence output and the allowed outputs whatever the client asked for (the
   model check's probes ask for the same);
3. reads the upstream's confidences with `codec.read_answer` (one representation per tensor, the
   request's row count, finite confidences: anything else is an error, nothing of it returned);
   nothing else of the answer is read;
4. defends the confidences (MemGuard, Jia et al. CCS 2019; PURIFIER, Yang et al. AAAI 2023)
   through the batcher, also when the client asked only for an allowed output;
5. constructs a new response: the defended tensor and the allowed class-index outputs rebuilt
   from it (`outputs.py`: never the upstream's values) in the request's representation, the
   request's id, model name and version, the allow-listed response parameters and trailing
   metadata (forwarded verbatim: the operator vouches for them). Nothing else of the upstream's
   message.

Admission is the data plane's too: at most `max_concurrent_rpcs` calls of the inference service
at once, whatever front they came through (`admitted`).

Any failure is counted, logged and raised as `Failure(code, message)` with the text from
`errors.status_for` (fixed sentences for whatever the upstream said); each front turns it into
its own error (a gRPC status, an HTTP status with a JSON body, one error message in a stream):
an undefended vector is never returned.

Model metadata and config (Triton's extension, which perf_analyzer asks for first) are
constructed by `model_description` from the upstream's metadata and config, describing the served
outputs only. A request may name version "" or the one `model_description.accepted_versions`
allows (the configured `model_version`, else the upstream's only advertised version); answers
name the version asked for, else the upstream's when accepted.

Decision on `classification`: refused rather than emulated, because top-k strings are an
alternative encoding of the same vector and a client can sort the defended probabilities itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import grpc
import numpy as np

from purifier import __version__
from purifier.errors import InvalidProbabilities
from purifier.probabilities import softmax
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.batcher import Batcher
from purifier_server.codec import (
    build_response,
    check_request_layout,
    decode_inputs,
    read_answer,
    request_rows,
    with_contents,
)
from purifier_server.errors import (
    BadRequest,
    BadUpstreamOutput,
    NotServing,
    RequestError,
    TooLarge,
    UnknownModel,
    UpstreamFailed,
    WaitedTooLong,
    log_detail,
    status_for,
)
from purifier_server.metrics import SidecarMetrics
from purifier_server.model_description import (
    Description,
    accepted_versions,
    config_answer,
    metadata_answer,
)
from purifier_server.outputs import ClassIndexOutput
from purifier_server.settings import Settings
from purifier_server.tracing import Tracing
from purifier_server.upstream import Metadata, Upstream, upstream_request_id

log = logging.getLogger("purifier_server")
# Request ids are identifiers (a UUID is 36 characters); longer ones are refused, not logged.
MAX_REQUEST_ID_CHARS = 256

# Metadata gRPC manages itself or that describes the hop, not the application.
_HOP_METADATA = ("grpc-", ":")
_HOP_KEYS = frozenset({"user-agent", "te", "content-type", "authorization", "host", "content-length",
                       "connection", "accept", "accept-encoding", "content-encoding", "transfer-encoding",
                       "keep-alive", "upgrade", "expect", "inference-header-content-length"})
# Upstream failures that a client's NaN/Inf input may have caused: answered INVALID_ARGUMENT then.
_INPUT_SUSPECT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.UNKNOWN})


def forwardable(metadata) -> Metadata:
    """Application metadata to pass on: gRPC metadata or HTTP headers (lower-case names), without
    what describes the hop; `authorization` is the sidecar's own, never forwarded. W3C trace
    context (`traceparent`, `tracestate`) goes on, so the upstream's spans join the caller's trace."""
    if not metadata:
        return ()
    return tuple((k, v) for k, v in metadata if not k.startswith(_HOP_METADATA) and k not in _HOP_KEYS)


def _refused_parameter(params) -> str | None:
    for key in params:
        if key.startswith("shared_memory"):
            return key
    return None


class Readiness(Protocol):
    """What the data plane asks of the sidecar's upstream state (readiness.Readiness)."""

    class_outputs: dict[str, ClassIndexOutput]  # the allowed outputs as the last model check found them
    description: Description | None  # what clients are told about the model (None: no check passed yet)

    def refusal(self) -> RequestError | None:
        """None while requests may go upstream; else the error to answer with."""

    async def wait_verified(self, deadline: float) -> int:
        """Until the upstream model is verified (loop-time deadline); the connection generation."""

    async def recheck(self, generation: int, deadline: float) -> bool:
        """After a failed call: True when the upstream went away (wait and ask again)."""

    def still_verified(self, generation: int) -> bool:
        """Whether an answer that came over `generation` may be used."""

    def note_request(self, rows: int, version: str, raw: bool, timeout: float | None) -> None:
        """A client request goes upstream (identity probes imitate it)."""


class _Admission:
    """`DataPlane.admitted`: a context manager object without state of its own (the plane counts),
    so entering it costs no generator per call, as `contextlib.contextmanager` would."""

    __slots__ = ("plane", "infer")

    def __init__(self, plane: DataPlane, infer: bool):
        self.plane, self.infer = plane, infer

    def __enter__(self) -> None:
        self.plane._admit(self.infer)

    def __exit__(self, *exc) -> None:
        self.plane.active -= 1


class Failure(Exception):
    """A request that failed, already counted and logged: the code and the text the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class DataPlane:
    """Serves one defended model. `upstream`, `batcher` and `readiness` are injected (see app.py)."""

    def __init__(self, settings: Settings, model_name: str, confidence_output: str, upstream: Upstream,
                 batcher: Batcher, metrics: SidecarMetrics, model_version: str = "", *,
                 readiness: Readiness, tracing: Tracing | None = None):
        self.settings = settings
        self.model_name = model_name
        self.model_version = model_version or settings.model_version  # configured; "" = the upstream's
        self.encoding = settings.upstream_encoding
        self.confidence_output = confidence_output
        self.keep = tuple(settings.allow_outputs)
        self.upstream_outputs = (confidence_output, *self.keep)
        self.upstream = upstream
        self.batcher = batcher
        self.metrics = metrics
        self.readiness = readiness
        self.tracing = tracing
        self.needs_inputs = batcher.defense.needs_inputs
        self.logits = settings.confidence_kind == "logits"
        self._outcome = {code: metrics.requests.labels(model_name, code.name) for code in grpc.StatusCode}
        self.active = 0  # inference-service calls in progress (admitted), at most max_concurrent_rpcs
        self.inferring = 0  # inference requests in progress (`infer`; a stream may carry several)
        self._admission = {infer: _Admission(self, infer) for infer in (False, True)}
        metrics.describe_model(model_name, lambda: self.model_version or (self.versions or ("",))[0])

    # --- validation -----------------------------------------------------------------------------

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions a request may name besides "" (model_description.accepted_versions), of
        those the model check saw advertised."""
        described = self.readiness.description
        return accepted_versions(self.model_version, described.versions if described is not None else ())

    def check_model(self, name: str, version: str) -> None:
        """UnknownModel unless (name, version) is the model served here."""
        if name != self.model_name:
            raise UnknownModel(f"model {name!r} is not served here; this sidecar defends {self.model_name!r}")
        if not version or version in self.versions:
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

    def _validate(self, request) -> list[str]:
        """Check the request; returns the output names of the answer, in order."""
        if len(request.id) > MAX_REQUEST_ID_CHARS:
            raise BadRequest(f"the request id has {len(request.id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
        version = request.model_version
        if request.model_name != self.model_name or (version and version not in self.versions):
            self.check_model(request.model_name, version)
        if params := request.parameters:  # (most requests carry none: the checks below skip empty maps)
            if (key := _refused_parameter(params)) is not None:
                raise BadRequest(f"parameter {key!r} is refused: shared memory would bypass the defense")
            if "classification" in params:
                raise BadRequest("parameter 'classification' is refused: request the probabilities and take the "
                                 "top-k of the defended vector")
        if not request.inputs:
            raise BadRequest("request has no inputs")
        for t in request.inputs:
            if t.parameters and (key := _refused_parameter(t.parameters)) is not None:
                raise BadRequest(f"input {t.name!r}: parameter {key!r} is refused (shared memory is not supported)")
            rows = t.shape[0] if len(t.shape) else 1
            if rows > self.settings.max_request_rows:
                raise TooLarge(f"input {t.name!r} has {rows} rows; the limit is {self.settings.max_request_rows} "
                               "(max_request_rows)")
        check_request_layout(request)
        allowed = self.upstream_outputs
        names = []
        for o in request.outputs:
            if o.name not in allowed:
                raise BadRequest(f"output {o.name!r} is not served; choose from {', '.join(sorted(allowed))}")
            if o.name in names:
                raise BadRequest(f"output {o.name!r} is requested twice")
            if o.parameters:
                if "classification" in o.parameters:
                    raise BadRequest(f"output {o.name!r}: the 'classification' parameter is refused; "
                                     "request the probabilities and take the top-k of the defended vector")
                if (key := _refused_parameter(o.parameters)) is not None:
                    raise BadRequest(f"output {o.name!r}: parameter {key!r} is refused: shared memory would "
                                     "bypass the defense")
            names.append(o.name)
        return names

    # --- admission and inference ----------------------------------------------------------------

    def admitted(self, infer: bool) -> _Admission:
        """`with plane.admitted(infer):` one call of the inference service, if fewer than
        `max_concurrent_rpcs` are in progress (across fronts; a stream is one call); else Failure
        RESOURCE_EXHAUSTED (counted when `infer`).

        gRPC's own `maximum_concurrent_rpcs` counts every call of the server, health Watch streams
        (which need no token) included, so open Watch streams alone could take every slot and leave
        authorized calls RESOURCE_EXHAUSTED. Inference calls are counted here, apart from everything else.
        """
        return self._admission[infer]

    def _admit(self, infer: bool) -> None:
        if self.active >= self.settings.max_concurrent_rpcs:
            if infer:
                self._outcome[grpc.StatusCode.RESOURCE_EXHAUSTED].inc()
            raise Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.active} calls are in progress "
                          "(max_concurrent_rpcs); retry later")
        self.active += 1

    def fail(self, exc: BaseException, request_id: str | None = None) -> Failure:
        """Count and log a failed request; the Failure to answer with. Fronts call it for requests
        they could not even decode, so those are counted like every other failure."""
        code, message, bug = status_for(exc)
        self._outcome[code].inc()
        log.log(logging.ERROR if bug else logging.WARNING, "request failed: %s", log_detail(exc),
                exc_info=exc if bug else None, extra={"request_id": request_id, "code": code.name})
        return Failure(code, message)

    async def infer(self, request: pb.ModelInferRequest, timeout: float | None,
                    metadata: Metadata = ()) -> tuple[pb.ModelInferResponse, Metadata]:
        """(the defended answer, allowed trailing metadata); raises Failure.

        timeout: seconds left of the caller's deadline (None: the upstream default).
        metadata: the caller's metadata or headers (`forwardable` picks what goes upstream;
            W3C trace context included, see tracing.py).
        """
        t0 = time.perf_counter()
        forwarded = forwardable(metadata)
        self.inferring += 1
        try:
            if self.tracing is not None:
                answer = await self._traced(self.tracing, request, timeout, forwarded)
            else:
                try:
                    answer = await self._infer(request, timeout, forwarded)
                except Exception as e:
                    raise self.fail(e, request.id) from None
        finally:
            self.inferring -= 1
        self._outcome[grpc.StatusCode.OK].inc()
        self.metrics.total_stage.observe(time.perf_counter() - t0)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request served", extra={"request_id": request.id, "model": request.model_name,
                                               "ms": round(1e3 * (time.perf_counter() - t0), 3)})
        return answer

    async def _traced(self, tracing: Tracing, request, timeout, forwarded):
        """`_infer` inside the request's trace span, failures counted and logged."""
        with tracing.request(forwarded, self.model_name, request.id) as span:
            try:
                answer = await self._infer(request, timeout, forwarded)
            except Exception as e:
                failure = self.fail(e, request.id)
                tracing.outcome(span, failure.code.name)
                raise failure from None
            tracing.outcome(span, "OK")
            return answer

    async def _infer(self, request, timeout, metadata):
        names = self._validate(request) or self.upstream_outputs
        rows = request_rows(request)
        inputs = None
        if self.needs_inputs:
            first = decode_inputs(request)[0]
            inputs = np.ascontiguousarray(first.reshape(len(first), -1), dtype=np.float32)
        client_id = request.id
        # What the upstream sees is the same for every request, a client's or an identity probe
        # (readiness.py): an id the sidecar draws, and the confidence and allowed outputs whatever
        # the client asked for (only the confidences are read).
        request.id = upstream_request_id()
        del request.outputs[:]
        for name in self.upstream_outputs:
            request.outputs.add(name=name)
        raw = len(request.raw_input_contents) > 0
        self.readiness.note_request(rows, request.model_version, raw, timeout)
        forwarded = request if self.encoding is None else with_contents(request, self.encoding == "typed")
        deadline = asyncio.get_running_loop().time() + (self.settings.upstream_timeout_s if timeout is None
                                                       else timeout)
        self.batcher.coming += 1
        try:
            upstream_answer, trailing = await self._ask_upstream(forwarded, request, metadata, deadline)
        except WaitedTooLong as e:
            if timeout is None:
                raise  # the sidecar's own bound (upstream_timeout_s): UNAVAILABLE, retry later
            raise RequestError("deadline exceeded while waiting for the upstream model to be back and verified",
                               grpc.StatusCode.DEADLINE_EXCEEDED) from e
        finally:
            self.batcher.coming -= 1
        try:
            probs = read_answer(upstream_answer, self.confidence_output, [], rows)[self.confidence_output]
            defended = await self.batcher.submit(softmax(probs) if self.logits else probs, inputs,
                                                 alone=self.inferring == 1)
        except (BadUpstreamOutput, InvalidProbabilities) as e:
            self.metrics.upstream_rejected.labels(getattr(e, "reason", "not probability vectors")).inc()
            if getattr(e, "reason", None) == "non-finite confidences":
                _check_finite_inputs(request)
            raise
        # an allowed output is never the upstream's: it is rebuilt from the defended vector (outputs.py)
        built = self.readiness.class_outputs
        arrays = {n: defended if n == self.confidence_output else built[n].build(defended) for n in names}
        version = self.answer_version(request.model_version, upstream_answer.model_version)
        answer = build_response(client_id, request.model_name, version, arrays, raw=raw)
        for key in self.settings.allow_parameters:
            if key in upstream_answer.parameters:
                answer.parameters[key].CopyFrom(upstream_answer.parameters[key])
        allowed = self.settings.allow_trailers
        return answer, tuple((k, v) for k, v in trailing if k in allowed) if allowed else ()

    async def _ask_upstream(self, forwarded, request, metadata, deadline: float):
        """The upstream's answer over a verified connection: (response, trailing metadata).

        A request that finds the upstream restarting, reconnecting or being verified waits for it
        (`Readiness.wait_verified`, bounded by `deadline` and max_waiting_requests) instead of
        failing; a call that fails because the upstream went away, or whose answer came over
        another connection than the verified one (perhaps another model), is asked again once the
        upstream is back and verified. ModelInfer is a pure function of the request: safe to repeat.
        """
        loop = asyncio.get_running_loop()
        while True:
            generation = await self.readiness.wait_verified(deadline)
            t1 = time.perf_counter()
            try:
                left = max(deadline - loop.time(), 1e-3)
                if self.tracing is None:
                    answer = await self.upstream.infer(forwarded, left, metadata)
                else:
                    answer = await self._call_upstream(self.tracing, forwarded, left, metadata)
            except UpstreamFailed as e:
                # Triton answers NOT_FOUND while it reloads a model: the upstream is away as well
                away = e.code == grpc.StatusCode.UNAVAILABLE or e.upstream_code == grpc.StatusCode.NOT_FOUND
                if away and await self.readiness.recheck(generation, deadline):
                    continue
                if e.upstream_code in _INPUT_SUSPECT_CODES:
                    _check_finite_inputs(request)
                raise e from None
            self.metrics.upstream_stage.observe(time.perf_counter() - t1)
            if self.readiness.still_verified(generation):
                return answer

    async def _call_upstream(self, tracing: Tracing, forwarded, timeout: float, metadata):
        """The upstream call inside its trace span."""
        with tracing.upstream(metadata) as traced:
            return await self.upstream.infer(forwarded, timeout, traced)

    # --- the rest of the protocol ---------------------------------------------------------------

    async def server_ready(self) -> bool:
        return self.readiness.refusal() is None and await self.upstream.ready(self.model_name, "")

    async def model_ready(self, name: str, version: str) -> bool:
        try:
            self.check_model(name, version)
        except UnknownModel:
            return False
        return self.readiness.refusal() is None and await self.upstream.ready(name, version)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="purifier", version=__version__, extensions=[])

    async def _described(self, name: str, version: str, config: bool):
        """Never asks the upstream: what it says now may carry the clean vector of the request it
        just answered (model_description); the description the model check took is answered."""
        try:
            self.check_model(name, version)
            described = self.readiness.description
            if described is None:
                raise self.readiness.refusal() or NotServing("the upstream model is not verified yet; retry shortly")
        except Exception as e:
            code, message, _ = status_for(e)
            raise Failure(code, message) from None
        if not config:
            return metadata_answer(self.model_name, self.versions, described)
        return config_answer(self.model_name, self.versions, described, self.settings.max_request_rows)

    async def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        """The model's metadata, served outputs only; raises Failure."""
        return await self._described(name, version, config=False)

    async def model_config(self, name: str, version: str) -> pb.ModelConfig:
        """Triton's ModelConfig (perf_analyzer asks for it first), described by model_description."""
        return await self._described(name, version, config=True)


def _check_finite_inputs(request) -> None:
    """BadRequest when a floating-point input holds NaN or Inf (the client's mistake, not the model's)."""
    try:
        arrays = decode_inputs(request)
    except RequestError:
        return
    for tensor, array in zip(request.inputs, arrays, strict=True):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadRequest(f"input {tensor.name!r} holds NaN or Inf, which the model cannot answer; send finite "
                             "values")
