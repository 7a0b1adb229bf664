"""Real Triton directly versus the sidecar in front of it, measured with perf_analyzer and purifier bench.

Triton is the `tritonserver` inside nvidia-pytriton (.venv-triton) serving the digits target's ONNX
model through a Python function running onnxruntime (examples/upstreams/triton_onnx.py). In front
of it: `purifier serve --upstream` with the identity defense and every fitted defense given with
--defense-dir (MemGuard, PURIFIER). Every endpoint is measured at concurrency 1, 4 and 16, one row
per request, in interleaved windows (direct, identity, memguard, purifier, then the reverse order),
by two load generators in the same run:

* perf_analyzer (C++, `make perf-analyzer`), per-request latencies from its profile export pooled
  over the windows. perf_analyzer asks for `ModelConfig` before anything else; a sidecar that does
  not serve it yet is recorded with perf_analyzer's error instead of figures.
* `purifier bench` (purifier.bench.measure.compare: Python threads over one gRPC channel).

The identity sidecar is also measured over its REST front (`sidecar-identity-http`: perf_analyzer
`-i http`, purifier bench's HTTP connection) and its gRPC stream (`sidecar-identity-stream`:
perf_analyzer `--streaming`, one stream per concurrent caller), beside its unary gRPC front.

    python benchmarks/bench_perf_analyzer.py [--defense-dir DIR ...] [--secret-file F] [--seconds 6]

Writes benchmarks/results/perf_analyzer.json with machine info and load averages. Targets (issue
15): identity adds <= 0.5 ms p50 and <= 1.5 ms p99 at concurrency 1 on an idle machine; at
concurrency 16 it keeps >= 70% of direct throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_sidecar import sidecar, wait_ready  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_sidecar_flags,
    digits_target,
    secret_file_or_throwaway,
    write_result,
)
from purifier.bench.measure import Endpoint, compare, latency_summary  # noqa: E402
from purifier.machine import load_average  # noqa: E402
from purifier.serve_process import ServerProcess, clean_env, free_port  # noqa: E402

PERF_ANALYZER = ROOT / "build" / "perf-analyzer" / "perf_analyzer"
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
TOKEN_HEADER = "triton-grpc-protocol-triton-access-token"
MODEL = "digits"


PROTOCOLS = {"grpc": ("-i", "grpc"), "http": ("-i", "http"), "stream": ("-i", "grpc", "--streaming")}


def perf_analyzer_window(port: int, concurrency: int, window_ms: int, data: Path, out: Path,
                         headers: tuple[str, ...] = (), protocol: str = "grpc") -> dict:
    """One perf_analyzer run: {"latencies_s": [...], "seconds": span} or {"error": its message}."""
    csv, export = out.with_suffix(".csv"), out.with_suffix(".json")
    cmd = [str(PERF_ANALYZER), "-m", MODEL, "-u", f"127.0.0.1:{port}", *PROTOCOLS[protocol], "-b", "1",
           "--input-data", str(data), "--concurrency-range", str(concurrency), "--measurement-mode",
           "time_windows", "-p", str(window_ms), "--max-trials", "3", "--stability-percentage", "1000",
           "-f", str(csv), "--profile-export-file", str(export)]
    for header in headers:
        cmd += ["-H", header]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not export.exists():
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "rror" in line or "failed" in line]
        return {"error": (lines or [f"exit {done.returncode}"])[0].strip()}
    experiment = json.loads(export.read_text())["experiments"][0]
    latencies = [(r["response_timestamps"][-1] - r["timestamp"]) / 1e9 for r in experiment["requests"]
                 if r.get("response_timestamps")]
    bounds = experiment["window_boundaries"]
    return {"latencies_s": latencies, "seconds": (bounds[-1] - bounds[0]) / 1e9}


def input_data(X: np.ndarray, path: Path) -> Path:
    """perf_analyzer's --input-data JSON: one real row per request, cycled."""
    rows = [{"input": {"content": [float(v) for v in row], "shape": [X.shape[1]]}} for row in X]
    path.write_text(json.dumps({"data": rows}))
    return path


def run_perf_analyzer(endpoints: dict[str, tuple], concurrency: list[int], seconds: float,
                      rounds: int, data: Path, work: Path) -> dict:
    """endpoints: label -> (port, headers[, protocol]). Each label x concurrency pooled over `rounds` windows."""
    window_ms = max(200, int(1e3 * seconds / rounds / 3))  # perf_analyzer measures 3 trials per window
    pooled = {(label, c): {"latencies_s": [], "seconds": 0.0, "error": None} for label in endpoints for c in concurrency}
    for k in range(rounds):
        order = list(endpoints.items())
        if k % 2:
            order.reverse()
        for c in concurrency:
            for label, (port, headers, *protocol) in order:
                cell = pooled[label, c]
                if cell["error"]:
                    continue
                got = perf_analyzer_window(port, c, window_ms, data, work / f"pa-{label}-{c}-{k}", headers,
                                           *protocol)
                if "error" in got:
                    cell["error"] = got["error"]
                    print(f"perf_analyzer {label} c{c}: {got['error']}", file=sys.stderr)
                    continue
                cell["latencies_s"] += got["latencies_s"]
                cell["seconds"] += got["seconds"]
    cells = []
    for (label, c), cell in pooled.items():
        if cell["error"]:
            cells.append({"endpoint": label, "concurrency": c, "rows": 1, "error": cell["error"]})
        else:
            rps = len(cell["latencies_s"]) / cell["seconds"] if cell["seconds"] else 0.0
            cells.append({"endpoint": label, "concurrency": c, "rows": 1, **latency_summary(cell["latencies_s"]),
                          "throughput_rps": rps})
    return {"cells": cells, "comparisons": comparisons(cells, next(iter(endpoints)))}


def comparisons(cells: list[dict], baseline: str) -> list[dict]:
    by = {(x["endpoint"], x["concurrency"]): x for x in cells}
    out = []
    for x in cells:
        base = by[baseline, x["concurrency"]]
        if x["endpoint"] == baseline or "error" in x or "error" in base:
            continue
        out.append({"endpoint": x["endpoint"], "baseline": baseline, "concurrency": x["concurrency"], "rows": 1,
                    "added_p50_ms": x["p50_ms"] - base["p50_ms"], "added_p99_ms": x["p99_ms"] - base["p99_ms"],
                    "throughput_ratio": x["throughput_rps"] / base["throughput_rps"]})
    return out


def table(title: str, result: dict, note: str) -> dict:
    comp = {(x["endpoint"], x["concurrency"]): x for x in result["comparisons"]}
    rows = []
    for x in result["cells"]:
        if "error" in x:
            rows.append([x["endpoint"], x["concurrency"], "-", "-", "-", "-", "-", "-", x["error"]])
            continue
        c = comp.get((x["endpoint"], x["concurrency"]), {})
        rows.append([x["endpoint"], x["concurrency"], x["p50_ms"], x["p99_ms"], x["throughput_rps"],
                     c.get("added_p50_ms", "-"), c.get("added_p99_ms", "-"), c.get("throughput_ratio", "-"), ""])
    return {"title": title, "columns": ["endpoint", "concurrency", "p50 ms", "p99 ms", "req/s", "added p50 ms",
                                        "added p99 ms", "throughput ratio", "error"], "rows": rows, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sidecar_flags(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell and tool")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved windows per cell")
    args = parser.parse_args()
    for path, fix in ((PERF_ANALYZER, "make perf-analyzer"), (TRITON_PYTHON, "make venv-triton")):
        if not path.exists():
            sys.exit(f"{path} is missing: run `{fix}`")

    target = digits_target(args.target)
    X, _ = target.role("eval_nonmembers")
    X = np.ascontiguousarray(X[:256], np.float32)
    defenses = [(json.loads((Path(d) / "defense.json").read_text())["defense"], d) for d in args.defense_dir]
    token = secrets.token_urlsafe(24)
    load_start = load_average()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        secret_file = secret_file_or_throwaway(args.secret_file, work, args.defense_dir)
        grpc_port = free_port()
        stack.enter_context(ServerProcess([str(TRITON_PYTHON), str(ROOT / "examples" / "upstreams" / "triton_onnx.py"),
                                           str(target.onnx_path), "--name", MODEL, "--grpc-port", str(grpc_port),
                                           "--http-port", str(free_port()), "--access-token", token],
                                          ready_line=False))  # pytriton logs on stdout before the ready line
        wait_ready(grpc_port, MODEL)
        ports = {"direct": (grpc_port, (f"{TOKEN_HEADER}:{token}",))}
        backend = ["--upstream", f"127.0.0.1:{grpc_port}", "--model-name", MODEL, "--confidence-output",
                   "probabilities", "--model-id", target.model_id]
        for name, d in [("identity", None), *((n, (n, d)) for n, d in defenses)]:
            sc = stack.enter_context(sidecar(backend, d, secret_file, clean_env()))
            ports[f"sidecar-{name}"] = (sc.port, ())
            if name == "identity":
                ports["sidecar-identity-http"] = (sc.http_port, (), "http")
                ports["sidecar-identity-stream"] = (sc.port, (), "stream")
        data = input_data(X, work / "rows.json")
        pa = run_perf_analyzer(ports, args.concurrency, args.seconds, args.rounds, data, work)
        endpoints = [Endpoint(label, f"127.0.0.1:{port}", MODEL, protocol="http" if protocol == ["http"] else "grpc")
                     for label, (port, _, *protocol) in ports.items() if protocol != ["stream"]]
        own = compare(endpoints, X, concurrency=args.concurrency, rows=[1], seconds=args.seconds,
                      rounds=args.rounds, output="probabilities")
    load_end = load_average()
    load_text = f"{load_start[0]:.1f} -> {load_end[0]:.1f}" if load_start and load_end else "not recorded"
    note = (f"Triton 2.51 (nvidia-pytriton, Python backend running onnxruntime) and the sidecars as separate "
            f"processes; one row per request, {args.rounds} interleaved windows per cell, {args.seconds:g} s per "
            f"cell; client, sidecar and Triton share the machine's cores (1-minute load average {load_text}). "
            "Targets: identity adds <= 0.5 ms p50 and <= 1.5 ms p99 at concurrency 1; >= 70% of direct "
            "throughput at concurrency 16.")
    path = write_result("perf_analyzer", {
        "tables": [table("Triton directly vs through the sidecar: perf_analyzer", pa, note),
                   table("Triton directly vs through the sidecar: purifier bench", own, note)],
        "load_average": {"start": load_start, "end": load_end},
        "config": {"concurrency": args.concurrency, "seconds_per_cell": args.seconds, "rounds": args.rounds,
                   "rows_per_request": 1, "target": str(target.directory), "defenses": [d for _, d in defenses],
                   "perf_analyzer": "perf-analyzer 2.60.0 wheel through Debian 13's glibc (make perf-analyzer)"},
        "perf_analyzer": pa, "purifier_bench": own,
        "targets": {"added_p50_ms_c1": 0.5, "added_p99_ms_c1": 1.5, "throughput_ratio_c16": 0.7},
    })
    for name, result in (("perf_analyzer", pa), ("purifier bench", own)):
        print(f"== {name}")
        for x in result["cells"]:
            figures = x.get("error") or f"p50 {x['p50_ms']:.3f} ms  p99 {x['p99_ms']:.3f} ms  {x['throughput_rps']:.0f} req/s"
            print(f"{x['endpoint']:20s} c{x['concurrency']:<3d} {figures}")
        for x in result["comparisons"]:
            print(f"{x['endpoint']:20s} c{x['concurrency']:<3d} added p50 {x['added_p50_ms']:+.3f} ms, "
                  f"p99 {x['added_p99_ms']:+.3f} ms, throughput x{x['throughput_ratio']:.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
