"""`purifier serve --workers N`: N serving processes behind one gRPC, one REST and one metrics port.

One sidecar process answers from one event loop: the gRPC and REST fronts, the data plane and
the hand-offs to the model and the defense all hold one interpreter lock, so it uses about one
core whatever the machine has (docs/serving.md#workers gives the measurements). More cores need
more processes. The supervisor (this module, in the process `purifier serve` started) loads no
model and serves no request:

1. It binds every port before a worker starts (a port in use is one line naming its flag): for
   gRPC a guard socket with SO_REUSEPORT, bound and never listening, which resolves port 0 and
   keeps every process that does not ask for SO_REUSEPORT off the port; the workers' gRPC
   servers bind the same port with SO_REUSEPORT and the kernel spreads connections over them.
   The REST socket is bound and listening once and inherited by every worker (they accept from
   one queue). The metrics port is the supervisor's own: each scrape asks every worker's
   private loopback endpoint and answers their series with a `worker` label ("0" .. "N-1").
2. It starts the workers (`python -m purifier_server.workers`), each a whole sidecar (app.py) with
   the same settings, hence the same defense directory, secret and model: every worker answers a
   query bit for bit the same. Worker 0 starts alone first, so a configuration error is one line,
   not N; then, once its model check has taken the model's description (what clients are told in
   ModelMetadata and ModelConfig: model_description), the others start together, given that
   description to compare their checks with (a worker that took its own after worker 0 had
   forwarded requests could be told the clean vector of one of them by a hostile upstream).
3. SO_REUSEPORT lets any process of the same user join the port and take a share of the
   connections, which a single sidecar refuses (`grpc.so_reuseport` 0). So the supervisor checks
   that nothing but its workers listens on the gRPC port (/proc/net/tcp{,6} against the workers'
   socket inodes), before it says "serving" and every `CHECK_S` seconds after: another process
   there stops the sidecar with one line. (Linux only.)
4. Identity and readiness stay one: a worker whose model check or identity probe refuses the
   upstream model tells the supervisor, which tells every other worker, and they all refuse
   (readiness.Readiness.set_peer_refusal) until none does.
5. SIGTERM or SIGINT: every worker gets SIGTERM and drains within `grace_s` (health NOT_SERVING,
   new calls refused, in-flight calls answered); the supervisor waits for all of them. A worker
   that exits on its own stops the sidecar (exit status 1): the orchestrator restarts it whole. A
   worker whose supervisor is gone (its control pipe closes) drains and exits too.

Control messages are JSON lines: a worker writes its ready line and `{"event": "refusal", "why":
...}` on stdout; the supervisor writes `{"peer_refusal": ...}` on the worker's stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from purifier.errors import ConfigError, PurifierError
from purifier_server.app import Sidecar, announce, serve
from purifier_server.http_front import bind_http
from purifier_server.logs import LOGGER, configure_logging
from purifier_server.metrics import MetricsServer
from purifier_server.model_description import Description, description_from_json, description_json
from purifier_server.settings import Settings

log = logging.getLogger("purifier_server")
CHECK_S = 2.0
START_TIMEOUT_S = 180.0
SCRAPE_TIMEOUT_S = 5.0
STOP_MARGIN_S = 15.0


# --- the gRPC port: guarded, shared by the workers only -------------------------------------------


def bind_guard(settings: Settings) -> socket.socket:
    """A socket bound (never listening) to the gRPC port with SO_REUSEPORT: it resolves port 0 and
    keeps off every process that does not share ports on purpose."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        guard = socket.socket(family, kind, proto)
        guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        guard.bind(address)
    except OSError as e:
        raise ConfigError(f"port: cannot listen on {settings.host}:{settings.port} ({e.strerror or e}); choose "
                          "another with --port (0 = any free port)") from None
    return guard


def listening_inodes(port: int) -> set[int]:
    """Socket inodes listening on TCP `port` at any address of this network namespace."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def check_port_owners(settings: Settings, port: int, pids: list[int]) -> None:
    """ConfigError when a process other than `pids` listens on the gRPC port."""
    ours = set().union(*(socket_inodes(pid) for pid in pids))
    if listening_inodes(port) - ours:
        raise ConfigError(f"port: {settings.host}:{port} is also served by another process (it listens with "
                          "SO_REUSEPORT, so it would take a share of the connections); stop it, or choose another "
                          "port with --port")


# --- metrics: the workers' series with a worker label ---------------------------------------------


class WorkerMetrics(CollectorRegistry):
    """What the supervisor's metrics endpoint serves: every worker's /metrics, merged, each series
    with a `worker` label."""

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self.ports: list[int] = []

    def collect(self):
        from prometheus_client.core import Metric
        from prometheus_client.parser import text_string_to_metric_families
        from prometheus_client.samples import Sample

        merged: dict[str, Metric] = {}
        for index, port in enumerate(self.ports):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as answer:
                    text = answer.read().decode()
            except OSError:
                continue  # a worker that does not answer is missing from this scrape
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
                into.samples += [Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar)
                                 for s in family.samples]
        yield from merged.values()


# --- the supervisor ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    ready: dict | None = None
    refusal: str | None = None
    told: str | None = None  # the peer refusal this worker was last told
    description: dict | None = None  # the model's description its model check took (JSON)


def supervise(settings: Settings) -> int:
    """Run `settings.worker_count` workers until SIGTERM/SIGINT; the exit status."""
    if not Path("/proc/net/tcp").exists():
        raise ConfigError("workers: several workers need Linux (/proc/net/tcp), to check that only they share the "
                          "gRPC port; run with --workers 1")
    return asyncio.run(_Supervisor(settings).run())


class _Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.workers: list[_Worker] = []
        self.events: asyncio.Queue = asyncio.Queue()
        self.stop = asyncio.Event()
        self.exited: tuple | None = None  # the exit event of a worker that stopped before serving

    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        guard = bind_guard(s)
        port = guard.getsockname()[1]
        check_port_owners(s, port, [])  # nobody may listen there yet: another sidecar's workers, say
        http = bind_http(s) if s.http_port >= 0 else None
        metrics = WorkerMetrics()
        metrics_server = await MetricsServer.open(s.metrics_host, s.metrics_port, metrics) if s.metrics_port >= 0 \
            else None
        child = s.replace(workers="1", port=port, http_port=-1 if http is None else http.getsockname()[1],
                          metrics_host="127.0.0.1", metrics_port=0 if metrics_server else -1)
        try:
            status = await self._serve(child, port, http, metrics, metrics_server)
        finally:
            await self._stop_workers()
            guard.close()
            if http is not None:
                http.close()
            if metrics_server is not None:
                await metrics_server.close()
        return status

    async def _serve(self, child: Settings, port: int, http, metrics: WorkerMetrics, metrics_server) -> int:
        n = self.settings.worker_count
        await self._start(child, 0, http)
        if not await self._until_ready([0]) or (n > 1 and not await self._until_described(self.workers[0])):
            return self._failed_status()
        for index in range(1, n):
            await self._start(child, index, http, self.workers[0].description)
        if not await self._until_ready(list(range(1, n))):
            return self._failed_status()
        readies = [w.ready or {} for w in self.workers]  # every one set by _until_ready
        metrics.ports = [r["metrics_port"] for r in readies if r.get("metrics_port")]
        check_port_owners(self.settings, port, [w.process.pid for w in self.workers])
        ready = {k: v for k, v in readies[0].items() if k not in ("worker", "pid")}
        announce({**ready, "port": port, "metrics_port": metrics_server.port if metrics_server else None,
                  "workers": n, "pids": [w.process.pid for w in self.workers]})
        log.info("workers serving", extra={"workers": n, "port": port})
        while not self.stop.is_set():
            event = await self._next_event(CHECK_S)
            if event is None:
                check_port_owners(self.settings, port, [w.process.pid for w in self.workers])
            elif event[0] == "exit" and not self.stop.is_set():  # (a terminal's Ctrl-C reaches the workers too)
                worker = self.workers[event[1]]
                log.error("a worker exited; stopping the sidecar",
                          extra={"worker": worker.index, "pid": worker.process.pid, "status": event[2]})
                return 1
            elif event[0] == "refusal":
                await self._relay_refusals()
        return 0

    async def _start(self, child: Settings, index: int, http: socket.socket | None,
                     description: dict | None = None) -> None:
        spec = {"settings": dataclasses.asdict(child), "index": index,
                "http_fd": None if http is None else http.fileno(), "description": description}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "purifier_server.workers", json.dumps(spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            pass_fds=() if http is None else (http.fileno(),))
        worker = _Worker(index, process)
        self.workers.append(worker)
        asyncio.get_running_loop().create_task(self._read(worker))

    async def _read(self, worker: _Worker) -> None:
        """The worker's control lines, then its exit."""
        assert worker.process.stdout is not None
        async for line in worker.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "serving":
                worker.ready = message
                self.events.put_nowait(("ready", worker.index))
            elif message.get("event") == "refusal":
                worker.refusal = message.get("why")
                self.events.put_nowait(("refusal", worker.index))
            elif message.get("event") == "described" and worker.description is None:
                worker.description = message.get("description")
                self.events.put_nowait(("described", worker.index))
        self.events.put_nowait(("exit", worker.index, await worker.process.wait()))

    async def _next_event(self, timeout: float):
        """The next worker event; None after `timeout` seconds or once stopping."""
        getter = asyncio.ensure_future(self.events.get())
        stopping = asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait({getter, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        return None

    async def _until_ready(self, indices: list[int]) -> bool:
        """Until every worker of `indices` is serving; False when one exits first or the supervisor stops."""
        def waiting() -> list[int]:
            return [i for i in indices if self.workers[i].ready is None]

        return await self._until(lambda: not waiting(),
                                 lambda: f"workers: {len(waiting())} worker(s) did not start within "
                                         f"{START_TIMEOUT_S:g} s")

    async def _until_described(self, worker: _Worker) -> bool:
        """Until `worker`'s model check has taken the model's description (no deadline: an
        upstream down at start-up is checked when it is back, and the worker serves meanwhile);
        False when a worker exits first or the supervisor stops."""
        return await self._until(lambda: worker.description is not None)

    async def _until(self, done: Callable[[], bool], late: Callable[[], str] | None = None) -> bool:
        """Until `done()` (the readers record what workers say on the _Worker before its event),
        relaying refusals meanwhile; False when a worker exits first or the supervisor stops.
        With `late`, past START_TIMEOUT_S seconds: ConfigError(late())."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not done():
            if self.stop.is_set():
                return False
            if late is not None and loop.time() > deadline:
                raise ConfigError(late())
            event = await self._next_event(1.0)
            if event is None:
                continue
            if event[0] == "exit":
                self.exited = event
                return False
            if event[0] == "refusal":
                await self._relay_refusals()
        return True

    def _failed_status(self) -> int:
        """A worker that exited before serving printed why on stderr; its status is the sidecar's."""
        if self.exited is None:
            return 0  # stopped while starting
        return self.exited[2] or 1

    async def _relay_refusals(self) -> None:
        for worker in self.workers:
            peer = next((w.refusal for w in self.workers if w is not worker and w.refusal), None)
            if peer != worker.told and worker.process.stdin is not None and worker.process.returncode is None:
                worker.told = peer
                worker.process.stdin.write(json.dumps({"peer_refusal": peer}).encode() + b"\n")
                with contextlib.suppress(ConnectionError):
                    await worker.process.stdin.drain()

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker; wait for their drains (grace_s), then kill what is left."""
        running = [w.process for w in self.workers if w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)),
                                   self.settings.grace_s + STOP_MARGIN_S)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*(p.wait() for p in running))


# --- a worker ------------------------------------------------------------------------------------


def _settings_from(fields: dict[str, Any]) -> Settings:
    """The Settings the supervisor sent as JSON (its tuples arrive as lists)."""
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return Settings(**values)


class _WorkerField(logging.Filter):
    """Every log line of a worker says which one it is."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def worker_main(spec: dict) -> int:
    from purifier.threads import limit_threads

    settings = _settings_from(spec["settings"])
    index = spec["index"]
    configure_logging(settings.log_level)
    for handler in logging.getLogger(LOGGER).handlers:
        handler.addFilter(_WorkerField(index))
    limit_threads()
    http = None if spec["http_fd"] is None else socket.socket(fileno=spec["http_fd"])

    given = spec.get("description")

    async def main() -> None:
        sidecar = Sidecar(settings, shared_grpc_port=True, http_socket=http,
                          description=None if given is None else description_from_json(given))
        stop = asyncio.Event()
        told: list[str | None] = [None]

        def on_refusal(why: str | None) -> None:
            if why != told[0]:
                told[0] = why
                print(json.dumps({"event": "refusal", "why": why}), flush=True)

        async def control() -> None:
            """The supervisor's messages on stdin; its end of the pipe closing means it is gone."""
            reader = asyncio.StreamReader()
            loop = asyncio.get_running_loop()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            async for line in reader:
                with contextlib.suppress(ValueError):
                    message = json.loads(line)
                    if sidecar.readiness is not None and "peer_refusal" in message:
                        await sidecar.readiness.set_peer_refusal(message["peer_refusal"])
            stop.set()

        def described(description: Description) -> None:
            print(json.dumps({"event": "described", "description": description_json(description)}), flush=True)

        def started(ready: dict) -> None:
            sidecar.on_refusal = on_refusal
            on_refusal(sidecar.readiness.own_refusal() if sidecar.readiness else None)
            if sidecar.readiness is not None:
                if sidecar.readiness.description is not None:
                    described(sidecar.readiness.description)
                else:  # the upstream was not ready at start-up: taken at the check when it is
                    sidecar.readiness.on_described = described
            tasks.append(asyncio.get_running_loop().create_task(control()))
            announce({**ready, "worker": index, "pid": os.getpid()})

        tasks: list[asyncio.Task] = []
        try:
            await serve(sidecar, stop, started)
        finally:
            for task in tasks:
                task.cancel()

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m purifier_server.workers SPEC`: one worker, as the supervisor starts it."""
    from purifier.untrusted import printable

    args = sys.argv[1:] if argv is None else argv
    try:
        return worker_main(json.loads(args[0]))
    except PurifierError as e:
        print(f"purifier: error: {printable(e, None)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
