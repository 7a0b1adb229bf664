"""Where the sidecar's CPU goes at concurrency 16, one row per request: a text summary.

Two views, written one after the other:

1. The serving processes from outside. The bare model server of `bench_sidecar.py` ("direct":
   the same ONNX model in the same grpc.aio stack, none of the sidecar's checks) and the sidecar
   (identity defense `--defense none`, and MemGuard when `--defense-dir` is given) each take 16
   callers (purifier.bench's client: threads over one channel, pre-serialized requests) for
   `--seconds`; the server's CPU per request comes from /proc, and py-spy (when installed:
   `pip install py-spy`; it is not a dependency of the project) samples the server meanwhile.
   The samples are put into categories by the innermost frame that names one (the model,
   the defense, the codec, metrics, the batcher, the data plane, logging, thread hand-offs, the
   event loop, REST); samples whose innermost frame is asyncio's `Handle._run` or a thread's
   `run` are the gRPC core and its Cython bindings, which py-spy cannot see into. The identity
   sidecar's REST front is sampled the same way.
2. The sidecar's own work without any transport: `DataPlane.infer` on parsed requests over an
   upstream that answers at once with the embedded model's answers (computed beforehand), one
   call after another, the thread's CPU microseconds per call (the best of five runs: stable on a
   busy machine), plus cProfile's top functions by own time.

    python -m benchmarks.profile_sidecar [--defense-dir DIR --secret-file F] [--seconds 6] [--out FILE]

The machine's load average is printed beside the figures: on a shared machine py-spy also samples
threads that wait for a core, so the shares are indicative; CPU per request is what counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.bench_sidecar import wait_ready
from benchmarks.common import ROOT, add_sidecar_flags, digits_target, secret_file_or_throwaway
from purifier.bench.measure import Endpoint, build_requests, connect, run_window
from purifier.machine import process_cpu_seconds
from purifier.serve_process import ServeProcess, ServerProcess

# (category, path fragments of a frame that put a sample in it), tried from the innermost frame out
CATEGORIES = (
    ("model (onnxruntime)", ("onnxruntime",)),
    ("defense (purifier/defenses)", ("purifier/defenses/", "purifier/models/")),
    ("metrics (prometheus_client, metrics.py)", ("server/metrics.py", "prometheus_client")),
    ("codec: decode, validate the answer, build the response", ("server/codec.py", "server/rest_codec.py",
                                                                 "server/outputs.py")),
    ("batcher hand-off", ("server/batcher.py",)),
    ("readiness, identity checks", ("server/readiness.py", "server/preflight.py")),
    ("logging", ("logging/", "server/logs.py")),
    ("tracing hooks", ("server/tracing.py", "opentelemetry")),
    ("REST front (uvicorn, httptools)", ("uvicorn", "httptools", "h11", "server/http_front.py")),
    ("data plane and gRPC adapter: validation, admission, ids", ("server/dataplane.py", "server/servicer.py",
                                                                 "server/upstream.py", "contextlib.py",
                                                                 "bench_sidecar.py")),
    ("thread hand-offs (executor queues, locks, wake-ups)", ("concurrent/futures", "threading.py", "queue.py")),
    ("event loop (asyncio, selectors)", ("asyncio/", "selectors.py")),
)
GRPC_CORE = "gRPC core and Cython bindings (below asyncio callbacks and gRPC's poller thread)"
# innermost frames that are C code py-spy does not see into: asyncio callbacks run grpc.aio's
# Cython, and gRPC's completion-queue poller is a Python thread running C
OPAQUE = ("Handle._run (asyncio/events.py", "Thread.run (threading.py")


def categorize(frames: list[str]) -> str:
    if frames and frames[-1].startswith(OPAQUE):
        return GRPC_CORE
    for frame in reversed(frames):
        for name, fragments in CATEGORIES:
            if any(f in frame for f in fragments):
                return name
    return "other"


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def sample(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "250", "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_samples(path: Path, cpu_ms: float, top: int) -> list[str]:
    by_category, leaves, total = Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = [f for f in stack.split(";") if f], int(count)
        total += n
        by_category[categorize(frames)] += n
        leaves[frames[-1] if frames else "?"] += n
    if not total:
        return ["  (no samples)"]
    lines = [f"  {'share':>6s}  {'~ms/req':>7s}  category ({total} samples)"]
    lines += [f"  {100 * n / total:5.1f}%  {cpu_ms * n / total:7.3f}  {name}" for name, n in by_category.most_common()]
    lines += ["", f"  top {top} innermost frames:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame[:110]}" for frame, n in leaves.most_common(top)]
    return lines


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of a process so far (Linux)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
    return total


def measure(name: str, endpoint: Endpoint, x: np.ndarray, seconds: float, concurrency: int, work: Path,
            top: int) -> tuple[list[str], dict]:
    """One server under `concurrency` callers: CPU per request, throughput, and py-spy's summary."""
    conn = connect(endpoint)
    try:
        spec = conn.describe()
        payloads = build_requests(endpoint, spec, "probabilities", x, 1, False)
        run_window(conn, payloads, concurrency, 1.0, 0.5)  # warm-up
        raw = work / f"{name.replace('/', '_')}.raw"
        spy = sample(endpoint.server_pid, seconds, raw)
        cpu0, switches0 = process_cpu_seconds(endpoint.server_pid), context_switches(endpoint.server_pid)
        times, elapsed, _, calls = run_window(conn, payloads, concurrency, seconds, 0.0)
        cpu_ms = 1e3 * (process_cpu_seconds(endpoint.server_pid) - cpu0) / calls
        switches = (context_switches(endpoint.server_pid) - switches0) / calls
        if spy is not None:
            spy.wait(timeout=seconds + 60)
    finally:
        conn.close()
    figures = {"requests_per_s": len(times) / elapsed, "server_cpu_ms_per_request": cpu_ms,
               "p50_ms": 1e3 * float(np.median(times)), "context_switches_per_request": switches}
    head = (f"{name}: {figures['requests_per_s']:.0f} requests/s, server CPU {cpu_ms:.3f} ms per request, "
            f"p50 {figures['p50_ms']:.2f} ms, {switches:.1f} context switches per request (all threads)")
    if spy is None:
        return [head, "  (py-spy not installed: pip install py-spy for the sampled breakdown)"], figures
    if not raw.exists():
        return [head, "  (py-spy wrote no samples: it needs ptrace permission on the server)"], figures
    return [head, *summarize_samples(raw, cpu_ms, top)], figures


# --- the sidecar's own work, in-process --------------------------------------------------------


def in_process(target_dir: str, x: np.ndarray, defense_args: dict, calls: int, top: int) -> list[str]:
    """The data plane's CPU per request over an upstream that answers at once (the embedded model's
    answers, computed beforehand): what the sidecar itself adds, without transport, model or threads."""
    from threadpoolctl import threadpool_limits

    from purifier_server._proto import grpc_service_pb2 as pb
    from purifier_server.app import Sidecar
    from purifier_server.settings import Settings

    threadpool_limits(1)

    def request(i: int) -> bytes:
        r = pb.ModelInferRequest(model_name=Path(target_dir).name, id=f"req-{i}")
        r.inputs.add(name="input", datatype="FP32", shape=[1, x.shape[1]])
        r.outputs.add(name="probabilities")
        r.raw_input_contents.append(x[i % len(x)][None].tobytes())
        return r.SerializeToString()

    payloads = [request(i) for i in range(len(x))]

    async def main() -> list[str]:
        settings = Settings(model=target_dir, port=0, http_port=-1, metrics_port=-1, log_level="error",
                            **defense_args)
        sidecar = Sidecar(settings)
        await sidecar.start()
        plane, upstream = sidecar.plane, sidecar._upstream
        answers = []  # the embedded model's answers: output arrays, never encoded (codec.Decoded)
        for data in payloads:
            answer, _ = await upstream.infer(pb.ModelInferRequest.FromString(data), None, ())
            answers.append(answer)
        served = iter(range(1 << 62))

        async def at_once(request, timeout, metadata):
            return answers[next(served) % len(answers)], ()

        async def bare(request, timeout, metadata):
            return await at_once(request, timeout, metadata)

        upstream.infer = at_once

        async def per_call(fn) -> float:
            requests = [pb.ModelInferRequest.FromString(payloads[i % len(payloads)]) for i in range(calls)]
            cpu0 = time.thread_time()
            for r in requests:  # the answer's serialization is gRPC's work, left out of both
                await fn(r, None, ())
            return 1e6 * (time.thread_time() - cpu0) / calls

        try:
            await per_call(plane.infer)  # warm-up
            floor = min([await per_call(bare) for _ in range(5)])
            plane_us = min([await per_call(plane.infer) for _ in range(5)])
            profile = cProfile.Profile(time.thread_time)
            profile.enable()
            await per_call(plane.infer)
            profile.disable()
        finally:
            await sidecar.stop(0)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
        rows = [line for line in text.getvalue().splitlines() if line.strip()]
        start = next(i for i, line in enumerate(rows) if "ncalls" in line)
        root = str(ROOT) + "/"
        return [f"  DataPlane.infer over an upstream answering at once: {plane_us - floor:6.1f} us CPU per request "
                f"(min of 5 runs of {calls}; the upstream stub itself, {floor:.1f} us, subtracted)",
                "", f"  cProfile (thread CPU) of DataPlane.infer, {calls} calls, top {top} by own time:",
                *("  " + line.replace(root, "") for line in rows[start:])]

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sidecar_flags(parser, defense_help="a fitted MemGuard directory, profiled beside the identity sidecar")
    parser.add_argument("--seconds", type=float, default=6.0, help="sampled seconds per server (default 6)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--calls", type=int, default=3000, help="calls per in-process measurement")
    parser.add_argument("--top", type=int, default=12, help="frames and functions listed per table")
    parser.add_argument("--out", help="also write the summary to this file")
    args = parser.parse_args()

    target = digits_target(args.target)
    X, _ = target.role("eval_nonmembers")
    x = np.ascontiguousarray(X[:64], np.float32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PURIFIER_")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    report = [f"Sidecar CPU profile: digits target, one row per request, concurrency {args.concurrency}, "
              f"{args.seconds:g} s per server, commit {commit}, {os.cpu_count()} CPUs",
              f"load average at start: {tuple(round(v, 2) for v in os.getloadavg())}", ""]
    figures = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        secret = secret_file_or_throwaway(args.secret_file, work, args.defense_dir)
        bare = stack.enter_context(ServerProcess([sys.executable, str(ROOT / "benchmarks" / "bench_sidecar.py"),
                                                  "--bare-server", str(target.directory)], env=env))
        wait_ready(bare.port, bare.ready["model"])
        cells = [("direct (bare model server)", Endpoint("direct", f"127.0.0.1:{bare.port}", bare.ready["model"],
                                                         server_pid=bare.pid))]
        served = [("identity", ["--defense", "none"])]
        served += [("memguard", ["--defense-dir", d, "--secret-file", str(secret)]) for d in args.defense_dir]
        for name, flags in served:
            sc = stack.enter_context(ServeProcess(["--model", str(target.directory), "--log-level", "warning",
                                                   *flags], env=env))
            model = target.directory.name
            cells.append((f"sidecar {name} (gRPC)", Endpoint(name, f"127.0.0.1:{sc.port}", model, server_pid=sc.pid)))
            if name == "identity":
                cells.append(("sidecar identity (REST)", Endpoint("identity-rest", f"127.0.0.1:{sc.http_port}", model,
                                                                  server_pid=sc.pid, protocol="http")))
        for name, endpoint in cells:
            lines, figures[name] = measure(name, endpoint, x, args.seconds, args.concurrency, work, args.top)
            report += [*lines, ""]
    report.append(f"load average after the servers: {tuple(round(v, 2) for v in os.getloadavg())}")
    report += ["", "The sidecar's own work in-process (no transport, no model), identity defense:"]
    report += in_process(str(target.directory), x, {"defense": "none"}, args.calls, args.top)
    if args.defense_dir:
        report += ["", "The same with MemGuard:"]
        report += in_process(str(target.directory), x, {"defense_dir": args.defense_dir[0],
                                                       "secret_file": args.secret_file}, args.calls, args.top)
    report.append(f"load average at end: {tuple(round(v, 2) for v in os.getloadavg())}")
    report.append("figures: " + json.dumps({k: {m: round(v, 3) for m, v in f.items()} for k, f in figures.items()}))
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
