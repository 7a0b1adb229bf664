"""Latency of Open Inference Protocol endpoints, side by side: `purifier bench`.

Measures what a deployment's clients see: p50/p99 latency and throughput of `ModelInfer` calls on
endpoints serving the same model (typically the model server directly and the Purifier sidecar in
front of it) and the latency the second adds. Windows alternate between the endpoints (A B, then
B A, ...) at every concurrency level and request size, and are pooled per cell: background load on
a shared machine drifts within a minute, and one long run per endpoint would credit that drift to
whichever endpoint ran second.

Requests are built once from real records or random rows of the model's input width, encoded raw
(little-endian bytes, as tritonclient sends them) or typed, and serialized once; `concurrency`
threads then call back to back over one gRPC channel per endpoint with the bytes as they are, so
the client's own cost per call is one unary call and no protobuf work. The first answer of every
window is decoded and checked (the requested output, one row per input row); an error status
stops the run with that status.

An endpoint with `protocol="http"` is measured over the protocol's REST front instead: the same
requests as binary tensors (Triton's extension, outputs asked for binary), POSTed to
`/v2/models/{name}/infer` over one keep-alive HTTP/1.1 connection per thread (http.client), so
REST and gRPC fronts of one server can be compared cell by cell.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from purifier.errors import ConfigError
from purifier.machine import process_tree_cpu_seconds

DEFAULT_SERVICE = "inference.GRPCInferenceService"
MAX_MESSAGE = 2**31 - 1
# numpy dtypes of the input datatypes a request can be built in
INPUT_DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}
TYPED_FIELDS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100): the smallest of the values with at least q%
    of them at or below it (numpy's `method="inverted_cdf"`), so always a latency that was observed."""
    ordered = np.sort(np.asarray(values, np.float64))
    if not 0 < q <= 100 or not len(ordered):
        raise ValueError(f"percentile {q} of {len(ordered)} values")
    return float(ordered[max(math.ceil(q * len(ordered) / 100), 1) - 1])


def latency_summary(times: Sequence[float] | np.ndarray) -> dict:
    """Per-call seconds -> calls, mean_ms, p50_ms, p99_ms (`percentile`: nearest rank)."""
    n = len(times)
    if n == 0:
        return {"calls": 0, "mean_ms": None, "p50_ms": None, "p99_ms": None}
    return {"calls": n, "mean_ms": 1e3 * float(np.mean(times)), "p50_ms": 1e3 * percentile(times, 50),
            "p99_ms": 1e3 * percentile(times, 99)}


def _messages():
    """OIP v2 message classes (tritonclient's copy: the library never imports the server)."""
    from tritonclient.grpc import service_pb2

    return service_pb2


@dataclass(frozen=True)
class Endpoint:
    """One OIP v2 gRPC endpoint to measure. `label` names it in tables ("direct", "sidecar")."""

    label: str
    address: str
    model_name: str
    model_version: str = ""
    service: str = DEFAULT_SERVICE
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token_file: str | None = None
    server_pid: int | None = None  # a local server process: its CPU time (its children's too) per request is reported
    # gRPC: one channel (one TCP connection) per calling thread instead of one for all; a server of
    # several processes behind one port (`purifier serve --workers N`) spreads connections, not calls
    channel_per_thread: bool = False
    protocol: str = "grpc"         # or "http": the REST front at the same HOST:PORT form (plaintext)

    def __post_init__(self):
        if self.protocol not in ("grpc", "http"):
            raise ConfigError(f"{self.label}: protocol {self.protocol!r} is not grpc or http")
        if self.protocol == "http" and (self.tls_ca or self.token_file):
            raise ConfigError(f"{self.label}: the REST measurement speaks plaintext without a token")
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{self.label}: {self.address!r} is not HOST:PORT (e.g. 127.0.0.1:8001)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key: mutual TLS needs both the client certificate and its key")
        if self.tls_cert and not self.tls_ca:
            raise ConfigError("--tls-cert/--tls-key: mutual TLS also needs --tls-ca (the server's CA)")
        for flag, path in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--token-file", self.token_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag}: {path} does not exist")


@dataclass(frozen=True)
class InputSpec:
    """What ModelMetadata says about the model's one input and its outputs."""

    name: str
    datatype: str
    n_features: int | None
    outputs: tuple[str, ...]


class Connection:
    """One channel to an endpoint; `infer(bytes) -> bytes` sends a serialized ModelInferRequest."""

    THREAD_CHANNELS = 64

    def __init__(self, endpoint: Endpoint, timeout_s: float = 30.0):
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.channel = self._open_channel()
        self._local = threading.local()  # with channel_per_thread: each calling thread's channel
        self._threads: list[tuple[grpc.Channel, object]] = []
        self._taken = 0
        self._lock = threading.Lock()
        self.metadata: tuple[tuple[str, str], ...] = ()
        if endpoint.token_file:
            token = Path(endpoint.token_file).read_text().strip()
            if not token:
                raise ConfigError(f"--token-file: {endpoint.token_file} is empty")
            self.metadata = (("authorization", f"Bearer {token}"),)
        prefix = f"/{endpoint.service}/"
        self._infer = self.channel.unary_unary(prefix + "ModelInfer")  # bytes in, bytes out
        pb = _messages()
        self._meta = self.channel.unary_unary(prefix + "ModelMetadata",
                                              request_serializer=pb.ModelMetadataRequest.SerializeToString,
                                              response_deserializer=pb.ModelMetadataResponse.FromString)

    def _open_channel(self) -> grpc.Channel:
        endpoint = self.endpoint
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        if endpoint.channel_per_thread:  # else channels to one address share one connection
            options.append(("grpc.use_local_subchannel_pool", 1))
        if endpoint.tls_ca:
            def read(path):
                return Path(path).read_bytes() if path else None

            credentials = grpc.ssl_channel_credentials(read(endpoint.tls_ca), read(endpoint.tls_key),
                                                       read(endpoint.tls_cert))
            return grpc.secure_channel(endpoint.address, credentials, options=options)
        return grpc.insecure_channel(endpoint.address, options=options)

    def _thread_infer(self):
        """The calling thread's ModelInfer: on a channel of its own, up to THREAD_CHANNELS channels,
        then taken in turn (every window starts new threads)."""
        call = getattr(self._local, "infer", None)
        if call is None:
            with self._lock:
                self._taken += 1
                if len(self._threads) < self.THREAD_CHANNELS:
                    channel = self._open_channel()
                    self._threads.append((channel, channel.unary_unary(f"/{self.endpoint.service}/ModelInfer")))
                call = self._local.infer = self._threads[(self._taken - 1) % len(self._threads)][1]
        return call

    def failure(self, what: str, e: grpc.RpcError) -> ConfigError:
        ep = self.endpoint
        hint = {grpc.StatusCode.UNAVAILABLE: "; is it running, and does it speak plaintext or TLS as given?",
                grpc.StatusCode.UNAUTHENTICATED: "; pass or check --token-file",
                grpc.StatusCode.UNIMPLEMENTED: f"; is {ep.service} the right service (--*-service)?"}.get(e.code(), "")
        return ConfigError(f"{ep.label} {ep.address}: {what} failed: {e.code().name}: {e.details()}{hint}")

    def describe(self, input_name: str | None = None) -> InputSpec:
        """The model's one input from ModelMetadata; `input_name` (FP32) when it declares none (TorchServe)."""
        ep = self.endpoint
        try:
            meta = self._meta(_messages().ModelMetadataRequest(name=ep.model_name, version=ep.model_version),
                              timeout=self.timeout_s, metadata=self.metadata or None)
        except grpc.RpcError as e:
            raise self.failure(f"ModelMetadata for {ep.model_name!r}", e) from None
        outputs = tuple(o.name for o in meta.outputs)
        if not meta.inputs and input_name:
            return InputSpec(input_name, "FP32", None, outputs)
        if len(meta.inputs) != 1:
            raise ConfigError(f"{ep.label} {ep.address}: model {ep.model_name!r} declares {len(meta.inputs)} "
                              "inputs; the benchmark builds requests for exactly one (N, D) input (none declared: give --input-name)")
        tensor = meta.inputs[0]
        width = int(tensor.shape[-1]) if len(tensor.shape) >= 2 and tensor.shape[-1] > 0 else None
        return InputSpec(tensor.name, tensor.datatype, width, outputs)

    def infer(self, payload: bytes) -> bytes:
        call = self._thread_infer() if self.endpoint.channel_per_thread else self._infer
        return call(payload, timeout=self.timeout_s, metadata=self.metadata or None)

    def close(self) -> None:
        for channel, _ in self._threads:
            channel.close()
        self.channel.close()


class CallFailed(Exception):
    """A REST call answered with an HTTP error status."""


class HttpConnection:
    """The REST counterpart of `Connection`: one keep-alive HTTP/1.1 connection per calling thread.
    `infer(payload)` POSTs a body from `build_requests` and returns the answer's body."""

    def __init__(self, endpoint: Endpoint, timeout_s: float = 30.0):
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.host, _, port = endpoint.address.rpartition(":")
        self.port = int(port)
        version = f"/versions/{endpoint.model_version}" if endpoint.model_version else ""
        self.path = f"/v2/models/{endpoint.model_name}{version}"
        self._local = threading.local()

    def _request(self, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, dict, bytes]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            conn.connect()
            # http.client sends the headers and the body in two writes: without TCP_NODELAY the body
            # waits for the server's delayed ACK (40 ms), which curl and tritonclient never do
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._local.conn = None
            raise

    def failure(self, what: str, e: Exception) -> ConfigError:
        ep = self.endpoint
        return ConfigError(f"{ep.label} http://{ep.address}: {what} failed: {e}")

    def describe(self, input_name: str | None = None) -> InputSpec:
        try:
            status, _, body = self._request("GET", self.path)
        except (OSError, http.client.HTTPException) as e:
            raise self.failure("model metadata", e) from None
        if status != 200:
            raise self.failure("model metadata", CallFailed(f"HTTP {status}: {body[:200]!r}"))
        meta = json.loads(body)
        outputs = tuple(o["name"] for o in meta.get("outputs") or ())
        inputs = meta.get("inputs") or []
        if not inputs and input_name:
            return InputSpec(input_name, "FP32", None, outputs)
        if len(inputs) != 1:
            raise ConfigError(f"{self.endpoint.label}: the benchmark builds requests for exactly one (N, D) input")
        shape = inputs[0]["shape"]
        width = int(shape[-1]) if len(shape) >= 2 and shape[-1] > 0 else None
        return InputSpec(inputs[0]["name"], inputs[0]["datatype"], width, outputs)

    def infer(self, payload: tuple[bytes, dict]) -> bytes:
        status, headers, body = self._request("POST", self.path + "/infer", *payload)
        if status != 200:
            raise CallFailed(f"HTTP {status}: {body[:300]!r}")
        length = headers.get("Inference-Header-Content-Length") or headers.get("inference-header-content-length")
        return body[:int(length)] if length else body

    def close(self) -> None:
        pass  # the threads' connections close with them


def connect(endpoint: Endpoint, timeout_s: float = 30.0) -> Connection | HttpConnection:
    return HttpConnection(endpoint, timeout_s) if endpoint.protocol == "http" else Connection(endpoint, timeout_s)


def _rest_payload(request, blob: bytes) -> tuple[bytes, dict]:
    tensor = request.inputs[0]
    head = json.dumps({"id": request.id, "parameters": {"binary_data_output": True},
                       "inputs": [{"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": o.name} for o in request.outputs]}).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def build_requests(endpoint: Endpoint, spec: InputSpec, output: str, X: np.ndarray, rows: int,
                   typed: bool = False, limit: int = 64) -> list:
    """Up to `limit` serialized requests of `rows` rows each, taken in turn from X (M, D)."""
    if spec.datatype not in INPUT_DTYPES:
        raise ConfigError(f"{endpoint.label}: input {spec.name!r} is {spec.datatype}; the benchmark builds "
                          f"{', '.join(INPUT_DTYPES)} inputs")
    if typed and spec.datatype not in TYPED_FIELDS:
        raise ConfigError(f"{endpoint.label}: {spec.datatype} travels raw only; drop --typed")
    pb = _messages()
    dtype = INPUT_DTYPES[spec.datatype]
    count = max(1, min(limit, len(X) // rows))
    payloads = []
    for i in range(count):
        index = np.arange(i * rows, (i + 1) * rows) % len(X)
        batch = np.ascontiguousarray(X[index], dtype)
        request = pb.ModelInferRequest(model_name=endpoint.model_name, model_version=endpoint.model_version,
                                       id=f"bench-{i}")
        tensor = request.inputs.add(name=spec.name, datatype=spec.datatype, shape=batch.shape)
        if typed:
            getattr(tensor.contents, TYPED_FIELDS[spec.datatype]).extend(batch.ravel())
        else:
            request.raw_input_contents.append(batch.tobytes())
        request.outputs.add(name=output)
        if endpoint.protocol == "http":
            payloads.append(_rest_payload(request, batch.tobytes()))
        else:
            payloads.append(request.SerializeToString())
    return payloads


def check_response(endpoint: Endpoint, data: bytes, output: str, rows: int) -> None:
    """The answer holds `output` with one row per request row (else ConfigError)."""
    if endpoint.protocol == "http":
        tensors = [(t["name"], t["shape"]) for t in json.loads(data)["outputs"]]
    else:
        tensors = [(t.name, list(t.shape)) for t in _messages().ModelInferResponse.FromString(data).outputs]
    names = [name for name, _ in tensors]
    if output not in names:
        raise ConfigError(f"{endpoint.label}: the answer lacks output {output!r} (it has {names})")
    shape = list(tensors[names.index(output)][1])
    if not shape or shape[0] != rows:
        raise ConfigError(f"{endpoint.label}: output {output!r} has shape {shape} for {rows} row(s)")


@dataclass
class Cell:
    """Pooled windows of one endpoint at one (concurrency, rows)."""

    times: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    calls: int = 0  # every call in the windows, warm-up included (what the server's CPU time paid for)
    server_cpu_s: float | None = None
    windows: list[dict] = field(default_factory=list)  # each window's own throughput and CPU per request

    def add(self, times: list[float], elapsed: float, calls: int, cpu_s: float | None) -> None:
        """Pool one window's measurements (cpu_s: the server's CPU seconds over it, None: unknown)."""
        self.times += times
        self.elapsed += elapsed
        self.calls += calls
        if cpu_s is not None:
            self.server_cpu_s = (self.server_cpu_s or 0.0) + cpu_s
        self.windows.append({"throughput_rps": len(times) / elapsed if elapsed > 0 else 0.0,
                             "server_cpu_ms_per_request": None if cpu_s is None else 1e3 * cpu_s / max(1, calls)})

    def summary(self, rows: int) -> dict:
        s = latency_summary(self.times)
        rps = len(self.times) / self.elapsed if self.elapsed > 0 else 0.0
        cpu = None if self.server_cpu_s is None else 1e3 * self.server_cpu_s / max(1, self.calls)
        return {**s, "throughput_rps": rps, "rows_per_s": rps * rows, "seconds": self.elapsed,
                "server_cpu_ms_per_request": cpu, "windows": list(self.windows)}


def run_window(conn: Connection | HttpConnection, payloads: Sequence, concurrency: int, seconds: float,
               warmup_s: float) -> tuple[list[float], float, bytes, int]:
    """`concurrency` threads calling back to back: (per-call seconds, elapsed, one answer, calls made
    including the untimed ones)."""
    per_thread: list[list[float]] = [[] for _ in range(concurrency)]
    untimed = [0] * concurrency
    errors: list[Exception] = []
    answer: list[bytes] = []
    probed, started = threading.Barrier(concurrency + 1), threading.Barrier(concurrency + 1)
    bounds: dict[str, float] = {}

    def worker(k: int) -> None:
        times = per_thread[k]
        i = k
        try:
            # one untimed call first (connection set-up, lazy model loading), kept for the answer check
            data = conn.infer(payloads[i % len(payloads)])
            if k == 0:
                answer.append(data)
        except (grpc.RpcError, CallFailed, OSError, http.client.HTTPException) as e:
            errors.append(e)
        probed.wait()
        started.wait()
        try:
            while time.perf_counter() < bounds["warm"]:
                i += 1
                conn.infer(payloads[i % len(payloads)])
                untimed[k] += 1
            while True:
                t0 = time.perf_counter()
                if t0 >= bounds["stop"]:
                    break
                i += 1
                conn.infer(payloads[i % len(payloads)])
                times.append(time.perf_counter() - t0)
        except (grpc.RpcError, CallFailed, OSError, http.client.HTTPException) as e:
            errors.append(e)
            bounds["warm"] = bounds["stop"] = 0.0  # the other threads stop too

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    probed.wait()
    now = time.perf_counter()
    bounds["warm"], bounds["stop"] = (now, now) if errors else (now + warmup_s, now + warmup_s + seconds)
    started.wait()
    for t in threads:
        t.join()
    if errors:
        raise conn.failure("ModelInfer", errors[0])
    # throughput over the measured span: from the end of warm-up to the last call's end
    elapsed = max(seconds, time.perf_counter() - bounds["warm"]) if any(per_thread) else 0.0
    times = [t for ts in per_thread for t in ts]
    return times, elapsed, answer[0], len(times) + sum(untimed) + concurrency


def compare(endpoints: Sequence[Endpoint], X: np.ndarray, *, concurrency: Sequence[int] = (1, 4, 16),
            rows: Sequence[int] = (1,), seconds: float = 10.0, rounds: int = 5, output: str | None = None,
            typed: bool = False, warmup_s: float = 1.0, timeout_s: float = 30.0, input_name: str | None = None,
            progress=None) -> dict:
    """Measure every endpoint at every (concurrency, rows) in interleaved windows.

    Args:
        endpoints: the first is the baseline the others are compared against.
        X: (M, D) rows the requests are built from (cycled through).
        seconds: measured seconds per cell in total, split into `rounds` windows.
        output: the output to request; default "probabilities" if served, else the only output.
        input_name: the FP32 input of a model whose metadata declares none (TorchServe).
    Returns:
        {"cells": [...], "comparisons": [...], "output": name, "inputs": {label: spec}} with p50/p99
        in ms, throughput in requests/s, and each non-baseline endpoint's added p50/p99 and
        throughput ratio against the baseline.
    """
    if not endpoints:
        raise ConfigError("give at least one endpoint")
    if min(concurrency) < 1 or min(rows) < 1 or seconds <= 0 or rounds < 1:
        raise ConfigError("--concurrency and --rows must be >= 1, --seconds > 0, --rounds >= 1")
    conns = [connect(e, timeout_s) for e in endpoints]
    try:
        specs = [c.describe(input_name) for c in conns]
        output = output or _default_output(endpoints[0], specs[0].outputs)
        for e, spec in zip(endpoints, specs, strict=True):
            if spec.outputs and output not in spec.outputs:  # MLServer may declare none: the answer is checked
                raise ConfigError(f"{e.label}: model {e.model_name!r} has no output {output!r}; "
                                  f"choose --output-name from {', '.join(spec.outputs)}")
            if spec.n_features is not None and spec.n_features != X.shape[1]:
                raise ConfigError(f"{e.label}: the model takes {spec.n_features} features, the rows have "
                                  f"{X.shape[1]}")
        payloads = {(e.label, r): build_requests(e, s, output, X, r, typed)
                    for e, s in zip(endpoints, specs, strict=True) for r in rows}
        cells = {(e.label, c, r): Cell() for e in endpoints for c in concurrency for r in rows}
        window = seconds / rounds
        for k in range(rounds):
            order = list(zip(endpoints, conns, strict=True))
            if k % 2:
                order.reverse()
            for c in concurrency:
                for r in rows:
                    for e, conn in order:
                        pid = e.server_pid
                        cpu0 = None if pid is None else process_tree_cpu_seconds(pid)
                        times, elapsed, answer, calls = run_window(conn, payloads[e.label, r], c, window,
                                                                   warmup_s if k == 0 else min(warmup_s, 0.2))
                        check_response(e, answer, output, r)
                        cpu_s = None if pid is None or cpu0 is None else process_tree_cpu_seconds(pid) - cpu0
                        cells[e.label, c, r].add(times, elapsed, calls, cpu_s)
                        if progress is not None:
                            progress(k, e.label, c, r, times)
    finally:
        for conn in conns:
            conn.close()
    for (label, c, r), cell in cells.items():
        if not cell.times:
            raise ConfigError(f"{label}: no call at concurrency {c} with {r} row(s) finished inside the measured "
                              f"windows of {window:g} s; calls take longer: raise --seconds or lower --rounds")
    out_cells = [{"endpoint": label, "concurrency": c, "rows": r, **cell.summary(r)}
                 for (label, c, r), cell in cells.items()]
    base = endpoints[0].label
    by_key = {(x["endpoint"], x["concurrency"], x["rows"]): x for x in out_cells}
    comparisons = []
    for e in endpoints[1:]:
        for c in concurrency:
            for r in rows:
                a, b = by_key[base, c, r], by_key[e.label, c, r]
                comparisons.append({"endpoint": e.label, "baseline": base, "concurrency": c, "rows": r,
                                    "added_p50_ms": b["p50_ms"] - a["p50_ms"],
                                    "added_p99_ms": b["p99_ms"] - a["p99_ms"],
                                    "throughput_ratio": b["throughput_rps"] / a["throughput_rps"],
                                    # the same ratio window by window (windows of one round are adjacent in time)
                                    "throughput_ratio_by_window": window_ratios(b, a, "throughput_rps")})
    return {"cells": out_cells, "comparisons": comparisons, "output": output,
            "inputs": {e.label: {"name": s.name, "datatype": s.datatype, "n_features": s.n_features}
                       for e, s in zip(endpoints, specs, strict=True)}}


def window_ratios(cell: dict, baseline: dict, key: str) -> list[float | None]:
    """cell's figure `key` over baseline's, window by window (both measured in the same rounds): how
    much the pooled ratio moves between adjacent windows. None where a figure is missing or 0."""
    return [x[key] / y[key] if x[key] is not None and y[key] else None
            for x, y in zip(cell["windows"], baseline["windows"], strict=True)]


def _default_output(endpoint: Endpoint, outputs: Sequence[str]) -> str:
    if "probabilities" in outputs:
        return "probabilities"
    if len(outputs) == 1:
        return outputs[0]
    listed = f"has outputs {', '.join(outputs)}" if outputs else "declares no outputs"
    raise ConfigError(f"{endpoint.label}: model {endpoint.model_name!r} {listed}; choose one with --output-name")


def random_rows(n_features: int, count: int = 256, seed: int = 0) -> np.ndarray:
    """(count, n_features) float32 rows uniform in [0, 1): requests of the right shape, no data needed."""
    return np.random.default_rng(seed).random((count, n_features), dtype=np.float32)
