"""Build and run the sidecar: gRPC and REST fronts, limits, health, model checks, metrics endpoint, graceful stop.

Operations follow the conventions of OIP v2 model servers (docs/design.md#server-conventions):
grpc.health.v1 reports SERVING for "" and `inference.GRPCInferenceService` only while the
defense is loaded, the upstream model answers ModelReady (polled; a request that finds the
upstream unavailable triggers a poll at once, but one request's failure never flips health by
itself), the model passed `preflight.check_model` since its last (re)connection and no identity
probe found another model since (readiness.py, which also holds requests while the upstream
restarts); reflection is
off unless asked for; SIGTERM marks the server NOT_SERVING, ends health Watch streams (health.py),
refuses new calls and lets in-flight calls finish within `grace_s`; Prometheus metrics live on their own
HTTP port, bound to 127.0.0.1 unless configured otherwise. TLS, mutual TLS and bearer tokens are
in security.py. The REST front (http_front.py) serves the same data plane on `http_port`, on this
event loop, with the same TLS settings, bearer token and request limit.

Resources are bounded before a byte is parsed: the receive limit is derived from
`max_request_rows` x the model's input row size (`request_limit`) and holds for the decompressed
size too (gRPC stops inflating a gzip message at the limit: RESOURCE_EXHAUSTED), callers
without the bearer token are refused before their message is read or inflated and the HTTP/2
receive window stays at 64 KiB per stream (no BDP probing), at most `max_concurrent_rpcs`
inference calls (DataPlane.admitted) and `max_watch_streams` health Watch streams (health.py,
which need no token) run at once, each counted apart, and at most `max_queued_rows` rows wait for
the defense. Request ids and every logged string are length-bounded and repeated warnings
rate-limited (logs.py). Both ports are bound before anything says "serving"; a port in use is one
line naming its flag.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from purifier.defenses import Defense, IdentityDefense, load_defense, read_defense_manifest
from purifier.defenses.keyed import load_secret
from purifier.errors import ConfigError
from purifier.threads import limit_threads
from purifier_server.batcher import Batcher
from purifier_server.codec import DTYPES
from purifier_server.dataplane import DataPlane
from purifier_server.health import MAX_PENDING, NOT_SERVING, SERVING, HealthServicer
from purifier_server.logs import configure_logging, install
from purifier_server.metrics import MetricsServer, SidecarMetrics
from purifier_server.model_description import Description
from purifier_server.preflight import ModelCheck
from purifier_server.readiness import Readiness
from purifier_server.security import BearerAuth, read_token, server_credentials
from purifier_server.servicer import SERVICE_NAME, InferenceServicer, add_to_server
from purifier_server.settings import Settings
from purifier_server.upstream import EmbeddedUpstream, RemoteUpstream, TensorSpec

if TYPE_CHECKING:
    from purifier_server.http_front import HttpServer

log = logging.getLogger("purifier_server")
# Request size when nothing says how wide a row is (a remote upstream that is down at start-up and
# a defense without a fingerprint); --max-request-bytes sets it explicitly.
FALLBACK_REQUEST_BYTES = 64 << 20
HEADROOM_BYTES = 64 << 10
# Streams one client connection may hold at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): room
# for every inference call and Watch stream, for the health calls that may wait for their message
# (health.MAX_PENDING) and this much for everything else (answered Checks, refused calls,
# reflection), so that one connection (a proxy's, say) carries what every caller needs. Admission
# is not gRPC's server-wide cap (maximum_concurrent_rpcs): that counts a call from its headers, so
# calls that never send their message (health needs no token) would take the slots authorized
# inference needs. Inference calls are admitted by the data
# plane, health by its own limits (health.py); the streams all callers can hold at once are
# bounded by max_connections x this.
OTHER_RPCS = 64
# Upper bound on the bytes one element takes in a typed (InferTensorContents) request: varints of
# negative int8/16/32 values take 10 bytes, packed floats their own size.
TYPED_ELEMENT_BYTES = {"BOOL": 1, "UINT8": 2, "UINT16": 3, "UINT32": 5, "UINT64": 10, "INT8": 10, "INT16": 10,
                       "INT32": 10, "INT64": 10, "FP16": 2, "FP32": 4, "FP64": 8}


def request_limit(settings: Settings, inputs: list[TensorSpec], defense: Defense) -> tuple[int, str]:
    """(largest request message in bytes, how it was derived).

    max_request_rows x the row size of all inputs (each element at its largest encoding, raw or
    typed) + 64 KiB for names, shapes and parameters. The row size comes from the model's inputs
    (embedded, or a remote upstream's ModelMetadata), else from the defense fingerprint's width
    (FP64), else the 64 MiB fallback.
    """
    if settings.max_request_bytes:
        return settings.max_request_bytes, "max_request_bytes"
    row = None
    if inputs and all(s.datatype in DTYPES and all(d >= 0 for d in s.shape[1:]) for s in inputs):
        row = sum(math.prod(s.shape[1:]) * TYPED_ELEMENT_BYTES[s.datatype] for s in inputs)
        how = "the model's inputs"
    elif defense.fingerprint is not None:
        row, how = defense.fingerprint.n_features * 8, "the defense fingerprint's width"
    if row is None:
        return FALLBACK_REQUEST_BYTES, "fallback (set max_request_bytes)"
    return settings.max_request_rows * row + HEADROOM_BYTES, f"max_request_rows x row size from {how}"


NO_DEFENSE = ("defense: none configured; give --defense-dir DIR (a directory from purifier fit-defense), "
              "or --defense none to serve undefended on purpose")
UNDEFENDED = "serving UNDEFENDED: clients get the model's clean confidence vectors (--defense none)"


def require_defense_choice(settings: Settings) -> None:
    """Undefended only on purpose: no --defense-dir and no --defense none refuses to start."""
    if settings.defense is None and settings.defense_dir is None:
        raise ConfigError(NO_DEFENSE)


def load_configured_defense(settings: Settings, model_id: str | None) -> Defense:
    """The defense named in settings (or in the directory's defense.json), bound to the model identity."""
    require_defense_choice(settings)
    name = settings.defense
    if name == "none":
        return IdentityDefense()
    directory = settings.defense_dir
    if directory is None:  # Settings requires it with any other --defense
        raise ConfigError(NO_DEFENSE)
    if name is None:
        name = read_defense_manifest(directory)["defense"]
        if name == "none":  # one line of defense.json must not stand in for the flag
            raise ConfigError(f"defense: {settings.defense_dir} holds the 'none' defense, which serves the model's "
                              "clean confidence vectors; serve undefended on purpose with --defense none (without "
                              "--defense-dir), or give a directory from purifier fit-defense")
        log.info("defense inferred from defense.json", extra={"defense": name, "defense_dir": settings.defense_dir})
    secret = load_secret(file=settings.secret_file)
    defense = load_defense(directory, secret, model_id)
    if defense.name != name:
        raise ConfigError(f"defense: {settings.defense_dir} holds a {defense.name!r} defense, not {name!r}")
    defense.serve_on(settings.device)
    return defense


class Sidecar:
    """The sidecar's parts, started and stopped together on the running event loop.

    `defense`, `upstream` and `registry` may be injected (tests, embedders); otherwise they are
    built from `settings`. After `start()`, `port` and `metrics_port` hold the bound ports and
    `readiness` what the sidecar knows about the upstream model (readiness.py).

    A worker of `purifier serve --workers N` (workers.py) binds the gRPC port with SO_REUSEPORT
    beside its siblings (`shared_grpc_port`) and serves the REST socket its supervisor bound
    (`http_socket`); `on_refusal(why)` is called whenever what health says may have changed, with
    why this process refuses the upstream model (None: it does not). `description`: what clients
    are told about the model, when another process took it (worker 0's, model_description): the
    model check compares with it instead of taking its own.
    """

    def __init__(self, settings: Settings, *, defense: Defense | None = None, upstream=None,
                 registry=None, shared_grpc_port: bool = False, http_socket: socket.socket | None = None,
                 description: Description | None = None):
        self.settings = settings
        self._description = description
        install()  # every logged string bounded, repeated warnings rate-limited (logs.py)
        self.metrics = SidecarMetrics(registry)
        self._defense, self._upstream = defense, upstream
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._http: HttpServer | None = None
        self._metrics_server: MetricsServer | None = None
        self.readiness: Readiness | None = None
        self.server: grpc.aio.Server | None = None
        self._stopped = False
        self._serving: bool | None = None        # what health says
        self._shared_grpc_port, self._http_socket = shared_grpc_port, http_socket
        self.on_refusal: Callable[[str | None], None] | None = None

    # --- start-up -------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        if self._defense is None:
            require_defense_choice(s)  # before the model is loaded or the upstream dialled
        if s.metrics_port >= 0:  # bound first: a port in use is one line, before anything is loaded
            self._metrics_server = metrics_server = await MetricsServer.open(s.metrics_host, s.metrics_port,
                                                                             self.metrics.registry)
            self.metrics_port = metrics_server.port
        if s.http_port >= 0:  # the REST port too (bound now, served once the data plane exists)
            from purifier_server.http_front import HttpServer

            self._http = HttpServer(s, self._http_socket)
        if self._upstream is None:
            if s.model is not None:  # embedded
                self._upstream = EmbeddedUpstream(s.model, s.model_name, s.device, large_rows=s.max_batch_rows)
            elif s.upstream is None or s.model_name is None or s.confidence_output is None:
                raise ConfigError("upstream: give --upstream with --model-name and --confidence-output, or --model")
            elif s.upstream_rest:
                from purifier_server.rest_upstream import RestUpstream

                self._upstream = RestUpstream(s.upstream, s.upstream_timeout_s, name=s.model_name,
                                              version=s.model_version, confidence_output=s.confidence_output)
            else:
                self._upstream = RemoteUpstream(s.upstream, s.upstream_service, s.upstream_timeout_s,
                                                name=s.model_name, version=s.model_version,
                                                confidence_output=s.confidence_output)
        upstream = self._upstream
        model_id = upstream.model_id or s.model_id
        if self._defense is None:
            self._defense = load_configured_defense(s, model_id)
        elif model_id and self._defense.model_id and self._defense.model_id != model_id:
            raise ConfigError(f"defense: fitted for model {self._defense.model_id[:12]}..., "
                              f"the upstream is {model_id[:12]}...")
        self.defense = self._defense
        self.undefended = self._defense.name == "none"
        self.metrics.defense_active.labels(self._defense.name).set(0 if self.undefended else 1)
        self.model_name = upstream.name
        self.model_version = upstream.version
        output = s.confidence_output or upstream.confidence_output
        self.check = ModelCheck(self.model_name, self.model_version, output, s.confidence_kind == "logits",
                                s.allow_outputs, vouched=bool(s.model_id and not s.embedded))
        self.readiness = Readiness(s, upstream, self._defense, self.check, self.metrics, s.upstream_encoding)
        self.readiness.description = self._description
        if s.embedded or await upstream.ready(self.model_name, self.model_version):
            await self.readiness.check_model(at_start=True)
        else:
            log.warning("upstream not ready at start-up: the model is checked when it becomes ready",
                        extra={"model": self.model_name, "upstream": s.upstream})
        limit, how = request_limit(s, upstream.inputs, self._defense)

        self.batcher = Batcher(self._defense, s.max_batch_rows, s.max_wait_ms / 1e3, self.metrics, s.max_queued_rows,
                               slice=s.max_defense_slice_ms / 1e3, gather=s.gather_ms / 1e3)
        self.batcher.start()
        tracing = None
        if s.otel:
            from purifier_server.tracing import Tracing

            tracing = Tracing()
        self.plane = DataPlane(s, self.model_name, output, upstream, self.batcher, self.metrics,
                               self.model_version, readiness=self.readiness, tracing=tracing)
        self.servicer = InferenceServicer(self.plane)
        token = read_token(s)
        credentials = server_credentials(s)
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", limit),
                   # the HTTP/2 receive window stays at its initial 64 KiB per stream: with BDP probing
                   # it grows to megabytes, and large payloads from callers without the token would be
                   # buffered although their calls are never read
                   ("grpc.http2.bdp_probe", 0),
                   # port 0 and fixed ports are never shared with another process, except by the workers
                   # of one supervisor, which checks that no other process listens there (workers.py)
                   ("grpc.so_reuseport", 1 if self._shared_grpc_port else 0),
                   ("grpc.max_concurrent_streams",
                    s.max_concurrent_rpcs + s.max_watch_streams + MAX_PENDING + OTHER_RPCS),
                   ("grpc.max_allowed_incoming_connections", s.max_connections)]
        self.server = grpc.aio.server(options=options,
                                      interceptors=[BearerAuth(token)] if token is not None else None)
        add_to_server(self.servicer, self.server)
        self.health = HealthServicer(s.max_watch_streams, s.watch_max_s)
        self.health.add_to(self.server)
        if s.reflection:
            from purifier_server.reflection import enable_reflection

            enable_reflection(self.server, SERVICE_NAME)
        address = f"{s.host}:{s.port}"
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ConfigError(f"port: cannot listen on {address} (in use, or not an address of this host); choose "
                              "another with --port (0 = any free port)")
        await self.server.start()
        if self._http is not None:
            from purifier_server.http_front import RestFront

            await self._http.start(RestFront(self.plane, token=token, max_body=limit))
            self.http_port = self._http.port
        await self._set_health(self.readiness.verified())
        self.readiness.on_health = self._set_health
        self.readiness.start()
        if self.undefended:
            log.warning(UNDEFENDED, extra={"defense": "none"})
        log.info("sidecar started", extra={"port": self.port, "http_port": self.http_port,
                                           "metrics_port": self.metrics_port,
                                           "model": self.model_name, "defense": self._defense.name,
                                           "upstream": s.upstream or s.model, "max_request_bytes": limit,
                                           "max_request_bytes_from": how})

    # --- health ---------------------------------------------------------------------------------

    async def _set_health(self, serving: bool) -> None:
        if self.on_refusal is not None and self.readiness is not None:
            self.on_refusal(self.readiness.own_refusal())
        if serving == self._serving:
            return
        self._serving = serving
        self.metrics.upstream_up.set(1 if serving else 0)
        status = SERVING if serving else NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        log.info("serving" if serving else "not serving", extra={"model": self.model_name})

    # --- shutdown -------------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within `grace` seconds."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_s if grace is None else grace
        if self.readiness is not None:
            await self.readiness.close()
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            stopping = [self.server.stop(grace)]
            if self._http is not None:
                stopping.append(self._http.stop())
            await asyncio.gather(*stopping)
        if getattr(self, "batcher", None) is not None:
            await self.batcher.close()
        if self._upstream is not None:
            await self._upstream.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        if self.port:
            log.info("sidecar stopped")


class BackgroundSidecar:
    """A sidecar on its own event loop in a daemon thread (tests, benchmarks, embedding).

        with BackgroundSidecar(settings) as sc:
            client = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{sc.port}")
    """

    def __init__(self, settings: Settings, **inject):
        self.sidecar = Sidecar(settings, **inject)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sidecar-loop", daemon=True)

    def __enter__(self) -> Sidecar:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.sidecar.start(), self.loop).result(timeout=60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.sidecar

    def __exit__(self, *exc) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.sidecar.stop(grace=1.0), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; then drain gracefully. Used by `purifier serve`; with
    `workers` above 1, a supervisor of that many serving processes (workers.py)."""
    configure_logging(settings.log_level)
    if settings.worker_count > 1:
        from purifier_server.workers import supervise

        return supervise(settings)
    limit_threads()  # in code, not left to the environment (purifier.threads says why)
    asyncio.run(serve(Sidecar(settings)))
    return 0


def announce(ready: dict) -> None:
    """The JSON ready line on stdout (what `purifier.serve_process` and deployments wait for)."""
    print(json.dumps(ready), flush=True)


async def serve(sidecar: Sidecar, stop: asyncio.Event | None = None,
                started: Callable[[dict], None] = announce) -> None:
    """Start `sidecar`, call `started` with the ready line, serve until SIGTERM/SIGINT (or until
    `stop` is set), then drain gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sidecar.start()
        ready = {"event": "serving", "port": sidecar.port, "http_port": sidecar.http_port,
                 "metrics_port": sidecar.metrics_port, "defense": sidecar.defense.name}
        if sidecar.undefended:
            ready["warning"] = UNDEFENDED
        started(ready)
        await stop.wait()
    finally:
        await sidecar.stop()
