"""Every Prometheus object of the sidecar, on an injected registry.

Latency buckets start at 50 microseconds: the sidecar's own work is sub-millisecond, and the
default gRPC buckets (from 5 ms up) would put every request in the first bucket. Per-row
quantities (L1 distortion) are recorded batch-wise with numpy into a custom collector, so the hot
path never loops over rows in Python.

Triton's dashboards key on `nv_inference_*`: `TritonAliases` derives Triton's request counters
(success, failure, rows inferred, executions, cumulative duration in microseconds, labelled
model and version) from the `purifier_*` metrics when scraped, so the hot path records nothing
twice. They are exposed untyped: prometheus_client writes a counter's metadata under a `_total`
name, which Triton's names lack; PromQL's rate() reads them the same.

The endpoint (`MetricsServer`) answers `GET /metrics` and nothing else: 404 for every other path,
so nobody mistakes it for the model server (prometheus_client's own server answered every path
with the metrics text and 200, `GET /v2/models/X/ready` included).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from purifier.errors import ConfigError

LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 1e-2,
                   2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
L1_BUCKETS = (0.0, 1e-4, 1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


class BatchHistogram:
    """A histogram binned with numpy in bulk (np.searchsorted + bincount), exposed as a collector.

    `observe(value)` appends to a list and nothing else: no lock, no bucket search, so the hot path
    pays a few hundred nanoseconds per observation where prometheus_client's Histogram took two
    locks and a linear search over the buckets. Pending values are binned when scraped (every
    scrape sees every observation made before it) or once `FLUSH_AT` are pending.
    `observe_many(values)` bins a whole array at once. With `labelnames`, `labels(*values)` gives
    the child to observe into, as prometheus_client's metrics do.
    """

    FLUSH_AT = 4096

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry,
                 labelnames: tuple[str, ...] = ()):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._edges = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self._children: dict[tuple[str, ...], _Bins] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            root = self.labels()
            self.observe, self.observe_many = root.observe, root.observe_many
        registry.register(self)

    def labels(self, *values: str) -> _Bins:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        with self._lock:
            return self._children.setdefault(tuple(str(v) for v in values), _Bins(self.bounds))

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for values, child in children:
            counts, total = child.snapshot()
            family.add_metric(list(values), list(zip(self._edges, (int(c) for c in np.cumsum(counts)), strict=True)),
                              total)
        yield family

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]


class _Bins:
    """One labelled series of a BatchHistogram."""

    def __init__(self, bounds: np.ndarray):
        self.bounds = bounds
        self._pending: list[float] = []  # appended to without a lock; drained under it (GIL-atomic list ops)
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # last bin: +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        self._pending.append(value)
        if len(self._pending) >= BatchHistogram.FLUSH_AT:
            self._flush()

    def observe_many(self, values: np.ndarray) -> None:
        """values: (N,) float; each lands in the first bucket whose upper bound is >= it."""
        values = np.asarray(values, dtype=np.float64)
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def _flush(self) -> None:
        with self._lock:
            n = len(self._pending)
            if not n:
                return
            values = np.array(self._pending[:n], dtype=np.float64)
            del self._pending[:n]  # values appended meanwhile sit after the first n
        self.observe_many(values)

    def snapshot(self) -> tuple[np.ndarray, float]:
        self._flush()
        with self._lock:
            return self._counts.copy(), self._sum


class DefenseOutcomes:
    """What the defense released, per row: L1 distortion, rows with noise, rows with another label.

    Small calls (the hot path: one-row requests) are only queued and computed in bulk when
    scraped or once `FLUSH_ROWS` rows wait; registered before the metrics it feeds (`feed`), so a
    scrape flushes first and reads them current. Large calls are computed at once.
    """

    FLUSH_ROWS = 4096
    AT_ONCE_ROWS = 64

    def __init__(self, registry: CollectorRegistry):
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._lock = threading.Lock()
        registry.register(self)

    def feed(self, l1: BatchHistogram, noise_released: Counter, label_changed: Counter) -> None:
        self.l1, self.noise_released, self.label_changed = l1, noise_released, label_changed

    def record(self, clean: np.ndarray, defended: np.ndarray) -> None:
        if len(clean) >= self.AT_ONCE_ROWS:
            self._compute(clean, defended)
            return
        self._pending.append((clean, defended))
        self._pending_rows += len(clean)  # approximate under threads: it only decides when to flush
        if self._pending_rows >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            n = len(self._pending)
            if not n:
                return
            pairs = self._pending[:n]
            del self._pending[:n]
            self._pending_rows = 0
        by_width: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for pair in pairs:
            by_width.setdefault(pair[0].shape[1], []).append(pair)
        for group in by_width.values():
            self._compute(np.concatenate([c for c, _ in group]), np.concatenate([d for _, d in group]))

    def _compute(self, clean: np.ndarray, defended: np.ndarray) -> None:
        l1 = np.abs(np.subtract(defended, clean, dtype=np.float64)).sum(axis=1)
        self.l1.observe_many(l1)
        noisy = int(np.count_nonzero(l1 > 0))
        if noisy:
            self.noise_released.inc(noisy)
        changed = int(np.count_nonzero(defended.argmax(axis=1) != clean.argmax(axis=1)))
        if changed:
            self.label_changed.inc(changed)

    def collect(self):
        self.flush()
        return []

    def describe(self):
        return []


class SidecarMetrics:
    """The sidecar's metrics. `registry` is injected (tests and embedders use their own)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("purifier_requests_total", "ModelInfer requests by model and outcome (gRPC code)",
                                ["model", "outcome"], registry=r)
        self.stage = BatchHistogram("purifier_stage_seconds", "Time per stage of ModelInfer: upstream, defense, total",
                                    LATENCY_BUCKETS, r, labelnames=("stage",))
        self.batch_rows = BatchHistogram("purifier_defense_batch_rows", "Rows per defense call (after micro-batching)",
                                         BATCH_BUCKETS, r)
        # registered before the histogram and counters it feeds: a scrape brings them up to date first
        self._outcomes = DefenseOutcomes(r)
        self.l1 = BatchHistogram("purifier_l1_distortion", "L1 distance between defended and clean rows",
                                 L1_BUCKETS, r)
        self.noise_released = Counter("purifier_noise_released_rows_total",
                                      "Rows released with a defended vector different from the clean one",
                                      registry=r)
        self.label_changed = Counter("purifier_label_changed_rows_total",
                                     "Rows whose argmax the defense changed (label swapper only)", registry=r)
        self.upstream_up = Gauge("purifier_upstream_up", "1 if the upstream model was ready and verified at the "
                                 "last poll", registry=r)
        self.defense_active = Gauge("purifier_defense_active", "1 while a defense rewrites the confidence vectors; "
                                    "0 when serving undefended (--defense none)", ["defense"], registry=r)
        self.identity_probes = Counter("purifier_identity_probes_total", "Identity probes of the upstream model "
                                       "(fingerprint rows asked again while serving), by outcome: match, mismatch, "
                                       "failed (no answer)", ["outcome"], registry=r)
        self.queued_rows = Gauge("purifier_defense_queued_rows", "Rows waiting for the defense", registry=r)
        self.upstream_rejected = Counter("purifier_upstream_answers_rejected_total",
                                         "Upstream answers refused before the defense, by reason", ["reason"],
                                         registry=r)
        self._outcomes.feed(self.l1, self.noise_released, self.label_changed)
        self.triton = TritonAliases(self)
        r.register(self.triton)
        self.upstream_stage = self.stage.labels("upstream")
        self.defense_stage = self.stage.labels("defense")
        self.total_stage = self.stage.labels("total")

    def describe_model(self, name: str, version) -> None:
        """The model (name, and a callable giving the version) the nv_inference_* aliases are labelled with."""
        self.triton.model, self.triton.version = name, version

    def record_defense(self, clean: np.ndarray, defended: np.ndarray) -> None:
        """clean, defended: (N, C). Distortion, released-noise and changed-label counts, batch-wise
        (small calls in bulk at the next scrape: `DefenseOutcomes`)."""
        self._outcomes.record(clean, defended)


class TritonAliases:
    """Triton's nv_inference_* request metrics, read from SidecarMetrics when scraped."""

    FAMILIES = (
        ("nv_inference_request_success", "Number of successful inference requests, all batch sizes"),
        ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes"),
        ("nv_inference_count", "Number of inferences performed (rows defended)"),
        ("nv_inference_exec_count", "Number of model executions performed (defense calls)"),
        ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds "
                                             "(successful requests)"),
    )

    def __init__(self, metrics: SidecarMetrics):
        self.metrics = metrics
        self.model: str | None = None
        self.version = lambda: ""

    def _values(self) -> dict[str, float]:
        ok = failed = 0.0
        for family in self.metrics.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total") and s.labels.get("model") == self.model:
                    if s.labels["outcome"] == "OK":
                        ok += s.value
                    else:
                        failed += s.value
        rows = executions = duration = 0.0
        for family in self.metrics.batch_rows.collect():
            for s in family.samples:
                if s.name.endswith("_sum"):
                    rows = s.value
                elif s.name.endswith("_count"):
                    executions = s.value
        for family in self.metrics.stage.collect():
            for s in family.samples:
                if s.name.endswith("_sum") and s.labels.get("stage") == "total":
                    duration = s.value
        return {"nv_inference_request_success": ok, "nv_inference_request_failure": failed,
                "nv_inference_count": rows, "nv_inference_exec_count": executions,
                "nv_inference_request_duration_us": round(duration * 1e6)}

    def collect(self):
        if self.model is None:
            return
        values = self._values()
        labels = {"model": self.model, "version": self.version()}
        for name, documentation in self.FAMILIES:
            family = Metric(name, documentation, "unknown")
            family.add_sample(name, labels, values[name])
            yield family

    def describe(self):
        return [Metric(name, documentation, "unknown") for name, documentation in self.FAMILIES]


class MetricsServer:
    """`GET /metrics` on (host, port), served on the sidecar's event loop; every other path is 404.

    The endpoint is often bound beyond loopback (the Dockerfile's 0.0.0.0) and needs no token, so
    what a caller can hold is bounded: a connection costs a coroutine, not a thread (idle ones used
    to hold a thread each, with no timeout); its request head must arrive within READ_TIMEOUT_S
    and fit in MAX_HEAD_BYTES; at most MAX_CONNECTIONS are open, and a new one closes the oldest
    that is still waiting for its head (a scraper sends its request with the connection, so idle
    callers cannot keep it out); one answer per connection. The metrics text is generated on one
    thread of its own, off the loop.

    `await MetricsServer.open(host, port, registry)` binds: a port in use is a ConfigError naming
    --metrics-port. `port` is the bound port (port 0 picks a free one).
    """

    READ_TIMEOUT_S = 10.0
    MAX_HEAD_BYTES = 16 << 10
    MAX_CONNECTIONS = 64

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry
        self._server: asyncio.Server | None = None
        self._render = ThreadPoolExecutor(1, thread_name_prefix="metrics")
        self._open: set[asyncio.StreamWriter] = set()
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # open and still reading their head, oldest first
        self.port = 0

    @property
    def connections(self) -> int:
        return len(self._open)

    @classmethod
    async def open(cls, host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
        self = cls(registry)
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=self.MAX_HEAD_BYTES,
                                                      reuse_port=False)
        except OSError as e:
            self._render.shutdown(wait=False)
            raise ConfigError(f"metrics_port: cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                              "with --metrics-port (0 = any free port, -1 = no metrics endpoint)") from None
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self.MAX_CONNECTIONS:
            if not self._waiting:
                writer.close()
                return
            oldest = next(iter(self._waiting))  # its read ends when its transport closes
            del self._waiting[oldest]
            oldest.close()
        self._open.add(writer)
        self._waiting[writer] = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.READ_TIMEOUT_S)
            finally:
                self._waiting.pop(writer, None)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + [""]
            if method not in ("GET", "HEAD"):
                status, kind, body = "405 Method Not Allowed", "text/plain", b"only GET /metrics is served here\n"
            elif path.partition("?")[0] != "/metrics":
                status, kind, body = "404 Not Found", "text/plain", b"only /metrics is served here\n"
            else:
                body = await asyncio.get_running_loop().run_in_executor(self._render, generate_latest, self._registry)
                status, kind = "200 OK", CONTENT_TYPE_LATEST
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode("latin-1") + (b"" if method == "HEAD" else body))
            await asyncio.wait_for(writer.drain(), self.READ_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a slow, idle, oversized or vanished caller: the connection just ends
        finally:
            self._open.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):  # idle callers must not hold the shutdown
                writer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._render.shutdown(wait=False)
