"""Fail closed under abuse: identity overhead, memory under unauthenticated abuse, fairness, a Watch flood.

Four measurements against real `purifier serve` processes (embedded ONNX target, digits):

1. Identity overhead at concurrency 1 (single-row requests): a bare OIP server running the same
   ONNX model in the same grpc.aio stack (bench_sidecar's) vs the identity sidecar, in
   purifier.bench's interleaved windows, with each server's process CPU time per request (far
   less sensitive to a loaded machine than latency). With `--baseline-src DIR` (a checkout of another commit,
   e.g. main) that commit's sidecar runs in the same windows, so "before" and "after" share the
   machine's load. Target (issue 14): added p50 <= 0.3 ms, p99 <= 1.0 ms.
2. Memory under unauthenticated abuse: the sidecar requires a bearer token; after its idle RSS is
   read, `--abusers` threads without the token send gzip bombs (32 MB of zeros, ~32 KB on the
   wire) and 8 MB random payloads for `--seconds`. RSS is sampled every 20 ms; VmHWM gives the
   peak. Target: peak <= 2 x idle + the request bound (max_request_bytes, from the ready log).
3. Fairness: four clients send maximum-size requests (max_request_rows rows) back to back while
   one client sends one-row requests for `--seconds` (measured by purifier.bench's window): the one-row client's p50/p99 and codes, the
   large clients' rows/s and codes. Target: one-row p99 <= 50 ms. Repeated for every
   `--defense-dir` given.
4. Health Watch flood: the sidecar requires a bearer token; an authorized one-row client's
   p50/p99 and codes (purifier.bench's window) first alone, then while `--watch-streams` (140)
   health Watch streams opened without the token are held open. Watch streams have their own
   limit (max_watch_streams), so the authorized calls must not see RESOURCE_EXHAUSTED.

    python benchmarks/bench_abuse.py [--target DIR] [--defense-dir DIR ...] [--seconds 10]

Writes benchmarks/results/abuse.json. Client, sidecar and upstream share the machine's cores:
record the load average (the JSON has it) and rerun on a quiet machine for headline figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_sidecar import wait_ready  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_sidecar_flags,
    baseline_server,
    commit_of,
    digits_target,
    secret_file_or_throwaway,
    write_result,
)
from purifier.bench import measure  # noqa: E402
from purifier.errors import ConfigError  # noqa: E402
from purifier.serve_process import ServeProcess, ServerProcess  # noqa: E402

BARE_SERVER = [sys.executable, str(ROOT / "benchmarks" / "bench_sidecar.py"), "--bare-server"]


def memory_mb(pid: int, key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


def started_bound_bytes(sidecar: ServerProcess) -> int:
    """The receive limit the sidecar derived (max_request_bytes in its 'sidecar started' log line)."""
    line = next(ln for ln in sidecar.log_text().splitlines() if "sidecar started" in ln)
    return int(json.loads(line)["max_request_bytes"])


def defense_args(defense_dir: str | None, secret_file: Path) -> list[str]:
    if defense_dir is None:
        return ["--defense", "none"]
    return ["--defense-dir", defense_dir, "--secret-file", str(secret_file)]


# --- 1. identity overhead ---------------------------------------------------------------------


def overhead(target: Path, x: np.ndarray, seconds: float, rounds: int, baseline: Path | None) -> dict:
    """purifier.bench's interleaved windows at concurrency 1, one row per request: the bare server
    first (the baseline of every comparison), then the identity sidecar(s); server CPU per request."""
    sidecar_args = ["--model", str(target), "--defense", "none", "--log-level", "warning"]
    with contextlib.ExitStack() as stack:
        bare = stack.enter_context(ServerProcess([*BARE_SERVER, str(target)]))
        wait_ready(bare.port, bare.ready["model"])
        servers = {"direct": bare, "sidecar-identity": stack.enter_context(ServeProcess(sidecar_args))}
        if baseline is not None:
            servers["sidecar-identity (baseline)"] = stack.enter_context(baseline_server(baseline, sidecar_args))
        endpoints = [measure.Endpoint(name, proc.endpoint, bare.ready["model"], server_pid=proc.pid)
                     for name, proc in servers.items()]
        result = measure.compare(endpoints, x, concurrency=(1,), rows=(1,), seconds=seconds, rounds=rounds,
                         output="probabilities")
    added = {c["endpoint"]: c for c in result["comparisons"]}
    return {c["endpoint"]: {"p50_ms": c["p50_ms"], "p99_ms": c["p99_ms"], "calls": c["calls"],
                            "server_cpu_ms_per_request": c["server_cpu_ms_per_request"],
                            "added_p50_ms": added.get(c["endpoint"], {}).get("added_p50_ms", 0.0),
                            "added_p99_ms": added.get(c["endpoint"], {}).get("added_p99_ms", 0.0)}
            for c in result["cells"]}


# --- 2. memory under unauthenticated abuse ----------------------------------------------------


def send(port: int, payload: bytes, gzip: bool) -> str:
    """An arbitrary message as a ModelInfer call without the token, optionally gzip-compressed: its status."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)],
                               compression=grpc.Compression.Gzip if gzip else None) as channel:
        try:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(payload, timeout=60)
        except grpc.RpcError as e:
            return e.code().name
    return "OK"


def abuse(target: Path, seconds: float, abusers: int) -> dict:
    token = Path(tempfile.mkdtemp(prefix="purifier-abuse-")) / "token"
    token.write_text(secrets.token_hex(16))
    with ServeProcess(["--model", str(target), "--defense", "none", "--auth-token-file", str(token)]) as sidecar:
        time.sleep(1.0)
        idle = memory_mb(sidecar.pid, "VmRSS")
        bomb, big = b"\0" * (32 << 20), os.urandom(8 << 20)
        codes: Counter = Counter()
        stop = threading.Event()
        samples: list[float] = []

        def abuser(i: int) -> None:
            while not stop.is_set():
                codes[send(sidecar.port, *((bomb, True) if i % 2 == 0 else (big, False)))] += 1

        threads = [threading.Thread(target=abuser, args=(i,), daemon=True) for i in range(abusers)]
        for t in threads:
            t.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples.append(memory_mb(sidecar.pid, "VmRSS"))
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        peak = memory_mb(sidecar.pid, "VmHWM")
        after = memory_mb(sidecar.pid, "VmRSS")
        bound = started_bound_bytes(sidecar) / 2**20
    return {"idle_rss_mb": idle, "peak_rss_mb": peak, "max_sampled_rss_mb": max(samples), "rss_after_mb": after,
            "abusive_requests": dict(codes), "abusers": abusers, "seconds": seconds, "request_bound_mb": bound,
            "target_peak_mb": 2 * idle + bound}


# --- 3. fairness ------------------------------------------------------------------------------


def fairness(target: Path, rows: np.ndarray, seconds: float, large_rows: int, defense_dir: str | None,
             secret_file: Path) -> dict:
    """The one-row client is measured by purifier.bench's window (concurrency 1) while four threads,
    each on its own channel, send `large_rows`-row requests back to back (the pressure, not measured
    beyond their status codes and rows answered)."""
    import grpc

    args = ["--model", str(target), "--log-level", "warning", *defense_args(defense_dir, secret_file)]
    with ServeProcess(args) as sidecar:
        endpoint = measure.Endpoint("sidecar", sidecar.endpoint, target.name, server_pid=sidecar.pid)
        small_conn = measure.Connection(endpoint, timeout_s=60)
        spec = small_conn.describe()
        small = measure.build_requests(endpoint, spec, "probabilities", rows, 1)
        large = measure.build_requests(endpoint, spec, "probabilities", rows, large_rows, limit=1)
        stop = threading.Event()
        large_codes: Counter = Counter()

        def large_client() -> None:
            conn = measure.Connection(endpoint, timeout_s=60)
            try:
                while not stop.is_set():
                    try:
                        conn.infer(large[0])
                        large_codes["OK"] += 1
                    except grpc.RpcError as e:
                        large_codes[e.code().name] += 1
                        time.sleep(0.01)
            finally:
                conn.close()

        threads = [threading.Thread(target=large_client, daemon=True) for _ in range(4)]
        try:
            for t in threads:
                t.start()
            time.sleep(1.0)                                       # the large requests are queued
            start = time.monotonic()
            try:
                times, _, _, _ = measure.run_window(small_conn, small, 1, seconds, warmup_s=0.5)
                one_row = {**measure.latency_summary(times), "codes": {"OK": len(times)}}
            except ConfigError as e:                              # a one-row call failed: that is the result
                one_row = {"calls": 0, "codes": {"error": str(e)}}
            elapsed = time.monotonic() - start
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
            small_conn.close()
    name = "none" if defense_dir is None else json.loads((Path(defense_dir) / "defense.json").read_text())["defense"]
    return {"defense": name, "one_row": one_row,
            "large": {"rows_per_request": large_rows, "clients": 4, "codes": dict(large_codes),
                      "rows_per_s": large_codes["OK"] * large_rows / elapsed}}


# --- 4. health Watch flood ------------------------------------------------------------------------


def watch_flood(target: Path, rows: np.ndarray, seconds: float, streams: int) -> dict:
    """Authorized one-row latency alone and while `streams` unauthenticated Watch streams are open."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    token = Path(tempfile.mkdtemp(prefix="purifier-watch-")) / "token"
    token.write_text(secrets.token_hex(16))
    with ServeProcess(["--model", str(target), "--defense", "none", "--log-level", "warning",
                       "--auth-token-file", str(token)]) as sidecar:
        endpoint = measure.Endpoint("sidecar", sidecar.endpoint, target.name, token_file=str(token))
        conn = measure.Connection(endpoint, timeout_s=60)
        small = measure.build_requests(endpoint, conn.describe(), "probabilities", rows, 1)
        cells: dict = {}

        def one_row(label: str) -> None:
            try:
                times, _, _, _ = measure.run_window(conn, small, 1, seconds, warmup_s=0.5)
                cells[label] = {**measure.latency_summary(times), "codes": {"OK": len(times)}}
            except ConfigError as e:                              # an authorized call failed: that is the result
                cells[label] = {"calls": 0, "codes": {"error": str(e)}}

        one_row("alone")
        channels = [grpc.insecure_channel(sidecar.endpoint) for _ in range(4)]
        opened, codes, lock = [0], Counter(), threading.Lock()

        def hold(stream) -> None:
            try:
                for _ in stream:
                    with lock:
                        opened[0] += 1
            except grpc.RpcError as e:
                with lock:
                    codes[e.code().name] += 1

        held = [health_pb2_grpc.HealthStub(channels[i % 4]).Watch(health_pb2.HealthCheckRequest(service=""))
                for i in range(streams)]
        try:
            for stream in held:
                threading.Thread(target=hold, args=(stream,), daemon=True).start()
            deadline = time.monotonic() + 30
            while opened[0] + sum(codes.values()) < streams and time.monotonic() < deadline:
                time.sleep(0.05)
            watch_codes = {"open": opened[0], **codes}
            one_row(f"{streams} Watch streams open")
        finally:
            for stream in held:
                stream.cancel()
            for ch in channels:
                ch.close()
            conn.close()
    return {"streams": streams, "watch_streams": watch_codes, "one_row": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sidecar_flags(parser, defense_help="also measure fairness with this defense")
    parser.add_argument("--baseline-src", default=None, help="a checkout whose sidecar is measured beside this one")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per abuse and fairness run")
    parser.add_argument("--overhead-seconds", type=float, default=6.0, help="seconds per overhead cell")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved overhead windows (default 3)")
    parser.add_argument("--abusers", type=int, default=8, help="unauthenticated clients (default 8)")
    parser.add_argument("--large-rows", type=int, default=4096, help="rows per large request (max_request_rows)")
    parser.add_argument("--watch-streams", type=int, default=140, help="unauthenticated Watch streams (default 140)")
    args = parser.parse_args()

    target = digits_target(args.target)
    X, _ = target.role("eval_nonmembers")
    rows = np.ascontiguousarray(X, np.float32)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        secret_file = secret_file_or_throwaway(args.secret_file, Path(tmp), args.defense_dir)
        baseline = Path(args.baseline_src).resolve() if args.baseline_src else None
        cells = overhead(target.directory, rows[:64], args.overhead_seconds, args.rounds, baseline)
        memory = abuse(target.directory, args.seconds, args.abusers)
        fair = [fairness(target.directory, rows, args.seconds, args.large_rows, d, secret_file)
                for d in [None, *args.defense_dir]]
        watch = watch_flood(target.directory, rows, args.seconds, args.watch_streams)
    load_end = os.getloadavg()
    load = load_end[0]
    baseline_commit = None
    if baseline is not None:
        baseline_commit = commit_of(baseline)
    loads = (f"Load average (1, 5, 15 min) start {tuple(round(v, 1) for v in load_start)}, "
             f"end {tuple(round(v, 1) for v in load_end)}")
    tables = [
        {"title": "Identity sidecar overhead at concurrency 1 (embedded, one row per request)",
         "columns": ["cell", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "process CPU ms/request"],
         "rows": [[k, c["p50_ms"], c["p99_ms"], c["added_p50_ms"], c["added_p99_ms"], c["server_cpu_ms_per_request"]]
                  for k, c in cells.items()],
         "note": f"purifier.bench: interleaved windows ({args.rounds} x {args.overhead_seconds / args.rounds:g} s per "
                 "cell) against a bare OIP server running the same ONNX model in the same grpc.aio stack; process "
                 "CPU = the server's CPU time over its windows / calls answered; (baseline) is the sidecar of commit "
                 f"{baseline_commit or '-'}. Target added p50 <= 0.3 ms, p99 <= 1.0 ms on an idle machine. {loads} "
                 "(latency differences below ~2 ms are noise at a high load)."},
        {"title": "Memory under unauthenticated abuse (gzip bombs and 8 MB payloads without the token)",
         "columns": ["idle RSS MB", "peak RSS MB", "target MB (2 x idle + request bound)", "abusive requests"],
         "rows": [[memory["idle_rss_mb"], memory["peak_rss_mb"], memory["target_peak_mb"],
                   sum(memory["abusive_requests"].values())]],
         "note": f"{args.abusers} clients for {args.seconds:g} s; codes {memory['abusive_requests']}; request "
                 f"bound (derived max_request_bytes) {memory['request_bound_mb']:.2f} MB. {loads}."},
        {"title": "One-row client beside four clients sending maximum-size requests",
         "columns": ["defense", "one-row p50 ms", "one-row p99 ms", "one-row codes", "large rows/s", "large codes"],
         "rows": [[f["defense"], f["one_row"].get("p50_ms", "-"), f["one_row"].get("p99_ms", "-"),
                   json.dumps(f["one_row"]["codes"]), f["large"]["rows_per_s"], json.dumps(f["large"]["codes"])]
                  for f in fair],
         "note": f"{args.large_rows}-row requests, {args.seconds:g} s; target one-row p99 <= 50 ms. Large requests "
                 "are defended in max_batch_rows chunks alternating with small requests, so a one-row request waits "
                 f"for at most one chunk: with an expensive defense that chunk's cost is the floor. {loads}."},
        {"title": "Authorized one-row client while unauthenticated health Watch streams are open",
         "columns": ["cell", "p50 ms", "p99 ms", "codes"],
         "rows": [[label, c.get("p50_ms", "-"), c.get("p99_ms", "-"), json.dumps(c["codes"])]
                  for label, c in watch["one_row"].items()],
         "note": f"The sidecar requires a bearer token; {args.watch_streams} Watch streams opened without it "
                 f"({json.dumps(watch['watch_streams'])}: max_watch_streams are let in, the rest refused), held open "
                 f"while the one-row client runs for {args.seconds:g} s. Target: no RESOURCE_EXHAUSTED for the "
                 f"authorized client, p99 close to the client alone. {loads}."},
    ]
    path = write_result("abuse", {"tables": tables, "load_average_start": load_start, "load_average_end": load_end,
                                  "load_average_1m_end": load, "overhead": cells,
                                  "memory": memory, "fairness": fair, "watch_flood": watch,
                                  "config": {"target": str(target.directory), "baseline_src": args.baseline_src,
                                             "baseline_commit": baseline_commit,
                                             "seconds": args.seconds, "abusers": args.abusers,
                                             "large_rows": args.large_rows, "watch_streams": args.watch_streams}})
    print(json.dumps({"overhead": {k: {"added_p50_ms": c["added_p50_ms"], "added_p99_ms": c["added_p99_ms"],
                                       "cpu_ms": c["server_cpu_ms_per_request"]} for k, c in cells.items()},
                      "memory": memory, "fairness": [{"defense": f["defense"], **f["one_row"]} for f in fair],
                      "watch_flood": watch,
                      "load": load}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
