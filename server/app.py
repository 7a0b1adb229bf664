"""Build and run the sidecar: gRPC server, health, reflection, metrics endpoint, graceful stop.

Operations follow the conventions of OIP v2 model servers (REFERENCE.md section 5):
grpc.health.v1 reports SERVING for "" and `inference.GRPCInferenceService` only while the
defense is loaded and the upstream model answers ModelReady (polled, and dropped at once when a
request finds the upstream unavailable); reflection is off unless asked for; SIGTERM marks the
server NOT_SERVING, refuses new calls and lets in-flight ones finish within `grace_s`; Prometheus
metrics live on their own HTTP port, bound to 127.0.0.1 unless configured otherwise. TLS, mutual
TLS and bearer tokens are in security.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from purifier.defenses import Defense, IdentityDefense, load_defense
from purifier.defenses.keyed import load_secret
from purifier.errors import ConfigError
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.batcher import Batcher
from purifier_server.metrics import SidecarMetrics
from purifier_server.security import BearerAuth, read_token, server_credentials
from purifier_server.servicer import InferenceServicer
from purifier_server.settings import Settings
from purifier_server.upstream import INT32_MAX, EmbeddedUpstream, RemoteUpstream

log = logging.getLogger("purifier_server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
    ("grpc.so_reuseport", 0),  # port 0 and fixed ports must never be shared with another process
]


def load_configured_defense(settings: Settings, model_id: str | None) -> Defense:
    """The defense named in settings, bound to the model identity (mismatch: ArtifactError)."""
    if settings.defense == "none":
        return IdentityDefense()
    secret = load_secret(file=settings.secret_file)
    defense = load_defense(settings.defense_dir, secret, model_id)
    if defense.name != settings.defense:
        raise ConfigError(f"defense: {settings.defense_dir} holds a {defense.name!r} defense, "
                          f"not {settings.defense!r}")
    return defense


class Sidecar:
    """The sidecar's parts, started and stopped together on the running event loop.

    `defense`, `upstream` and `registry` may be injected (tests, embedders); otherwise they are
    built from `settings`. After `start()`, `port` and `metrics_port` hold the bound ports.
    """

    def __init__(self, settings: Settings, *, defense: Defense | None = None, upstream=None,
                 registry=None):
        self.settings = settings
        self.metrics = SidecarMetrics(registry)
        self._defense, self._upstream = defense, upstream
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None
        self._poller: asyncio.Task | None = None
        self.server: grpc.aio.Server | None = None
        self._stopped = False

    async def start(self) -> None:
        s = self.settings
        if self._upstream is None:
            if s.embedded:
                self._upstream = EmbeddedUpstream(s.model, s.model_name, s.device)
            else:
                self._upstream = RemoteUpstream(s.upstream, s.upstream_service, s.upstream_timeout_s)
        upstream = self._upstream
        model_id = getattr(upstream, "model_id", None) or s.model_id
        if self._defense is None:
            self._defense = load_configured_defense(s, model_id)
        elif model_id and self._defense.model_id and self._defense.model_id != model_id:
            raise ConfigError(f"defense: fitted for model {self._defense.model_id[:12]}..., "
                              f"the upstream is {model_id[:12]}...")
        if s.embedded:
            name, version = upstream.name, upstream.version
            output = s.confidence_output or upstream.confidence_output
            specs = {o.name: o for o in upstream.outputs}
            if output not in specs:
                raise ConfigError(f"confidence_output: the model has no output {output!r}; "
                                  f"choose from {', '.join(specs)}")
            classes = specs[output].shape[-1] if specs[output].shape else -1
            if self._defense.n_classes and classes > 0 and classes != self._defense.n_classes:
                raise ConfigError(f"defense: fitted for {self._defense.n_classes} classes, the model's "
                                  f"{output!r} has {classes}")
        else:
            name, version, output = s.model_name, s.model_version, s.confidence_output
            if s.defense != "none" and not model_id:
                log.warning("no model_id given: cannot check that the defense was fitted for the upstream's "
                            "model (set --model-id to the ONNX sha256)", extra={"model": name})
        self.model_name, self.model_version = name, version
        self.defense = self._defense

        self.batcher = Batcher(self._defense, s.max_batch_rows, s.max_wait_ms / 1e3, self.metrics)
        self.batcher.start()
        self.servicer = InferenceServicer(s, name, output, upstream, self.batcher, self.metrics, version)
        self.servicer.on_upstream_unavailable = lambda: self._set_health(False)

        token = read_token(s)
        credentials = server_credentials(s)
        self.server = grpc.aio.server(options=SERVER_OPTIONS,
                                      interceptors=[BearerAuth(token)] if token is not None else None)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
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
            raise ConfigError(f"port: cannot listen on {address} (in use, or not an address of this host)")
        await self.server.start()
        self._upstream_ready = None
        await self._set_health(await upstream.ready(name, version))
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="upstream-health")
        if s.metrics_port >= 0:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(s.metrics_port, s.metrics_host, self.metrics.registry)
            self.metrics_port = self._metrics_server.server_address[1]
        log.info("sidecar started", extra={"port": self.port, "metrics_port": self.metrics_port,
                                           "model": name, "defense": self._defense.name,
                                           "upstream": s.upstream or s.model})

    async def _set_health(self, ready: bool) -> None:
        if ready == self._upstream_ready:
            return
        self._upstream_ready = ready
        self.metrics.upstream_up.set(1 if ready else 0)
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        log.info("upstream ready" if ready else "upstream not ready", extra={"model": self.model_name})

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_poll_s)
            with contextlib.suppress(Exception):
                await self._set_health(await self._upstream.ready(self.model_name, self.model_version))

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within `grace` seconds."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_s if grace is None else grace
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
        if getattr(self, "batcher", None) is not None:
            await self.batcher.close()
        if self._upstream is not None:
            await self._upstream.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the record's `extra` fields."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        doc.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("purifier_server")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; then drain gracefully. Used by `purifier serve`."""
    configure_logging(settings.log_level)
    # One BLAS/OpenMP thread: the defense runs batched on one worker thread, and OpenBLAS's idle
    # workers spin beside it and the gRPC threads (MemGuard sidecar: 3.7 ms CPU per one-row request
    # with the default pool, 2.05 ms with one thread). Sized here, in code, not by environment.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)

    async def main() -> None:
        sidecar = Sidecar(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await sidecar.start()
            print(json.dumps({"event": "serving", "port": sidecar.port, "metrics_port": sidecar.metrics_port}),
                  flush=True)
            await stop.wait()
        finally:
            await sidecar.stop()

    asyncio.run(main())
    return 0
