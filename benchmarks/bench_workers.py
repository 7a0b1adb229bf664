"""More cores for one sidecar: `purifier serve --workers N`, N = 1 against N = 2 (and more).

Every cell is a sidecar in front of the embedded digits model, one row per request, measured side
by side in interleaved windows (purifier.bench) at concurrency 1 and 16: the identity sidecar and
every fitted defense given with --defense-dir, each at every --workers count. Each calling thread
has a gRPC connection of its own, since the kernel spreads connections over the workers
(SO_REUSEPORT), not calls: a client that sends everything over one connection reaches one worker.
Server CPU per request counts the supervisor and its workers.

    python benchmarks/bench_workers.py [--defense-dir DIR --secret-file F] [--workers 1 2] [--seconds 3]

Writes benchmarks/results/workers.json. The client runs on the same machine: with 2 cores, the
client's threads and the workers share them, so a second worker can at best take what the client
leaves; the figure for larger machines comes from a machine with cores to spare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_sidecar_flags,
    digits_target,
    secret_file_or_throwaway,
    write_result,
)
from purifier.bench.measure import Endpoint, compare  # noqa: E402
from purifier.serve_process import ServeProcess  # noqa: E402

KEYS = ("calls", "p50_ms", "p99_ms", "throughput_rps", "server_cpu_ms_per_request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sidecar_flags(parser)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts compared (default 1 2)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell and concurrency")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved windows per cell (default 3)")
    parser.add_argument("--out", default="workers", help="result name under benchmarks/results/ (default workers)")
    args = parser.parse_args()

    target = digits_target(args.target)
    X, _ = target.role("eval_nonmembers")
    x = np.ascontiguousarray(X[:64], np.float32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PURIFIER_")}
    defenses = [(json.loads((Path(d) / "defense.json").read_text())["defense"], d) for d in args.defense_dir]
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        secret = secret_file_or_throwaway(args.secret_file, Path(tmp), args.defense_dir)
        endpoints = []
        for name, flags in [("identity", ["--defense", "none"]),
                            *((n, ["--defense-dir", d, "--secret-file", str(secret)]) for n, d in defenses)]:
            for n in args.workers:
                sc = stack.enter_context(ServeProcess(["--model", str(target.directory), "--log-level", "warning",
                                                       "--metrics-port", "-1", "--http-port", "-1",
                                                       "--workers", str(n), *flags], env=env))
                endpoints.append(Endpoint(f"{name} x{n}", sc.endpoint, target.directory.name, server_pid=sc.pid,
                                          channel_per_thread=True))
        result = compare(endpoints, x, concurrency=(1, 16), rows=(1,), seconds=args.seconds, rounds=args.rounds,
                         output="probabilities")
    load_end = os.getloadavg()[0]
    cells: dict[str, dict] = {}
    for cell in result["cells"]:
        cells.setdefault(cell["endpoint"], {})[f"c{cell['concurrency']}"] = {k: cell[k] for k in KEYS}
    rows = []
    for label, cell in cells.items():
        name, n = label.rsplit(" x", 1)
        one = cells.get(f"{name} x{args.workers[0]}")
        ratio = cell["c16"]["throughput_rps"] / one["c16"]["throughput_rps"] if one else None
        rows.append([label, cell["c1"]["p50_ms"], cell["c1"]["server_cpu_ms_per_request"], cell["c16"]["p50_ms"],
                     cell["c16"]["p99_ms"], cell["c16"]["throughput_rps"], cell["c16"]["server_cpu_ms_per_request"],
                     "-" if ratio is None or n == str(args.workers[0]) else round(ratio, 2)])
    table = {
        "title": "purifier serve --workers N: one sidecar on more cores (1 row per request)",
        "columns": ["cell (defense x workers)", "c1 p50 ms", "c1 server CPU ms/req", "c16 p50 ms", "c16 p99 ms",
                    "c16 req/s", "c16 server CPU ms/req", f"c16 throughput vs x{args.workers[0]}"],
        "rows": rows,
        "note": f"Sidecars as separate processes measured side by side in {args.rounds} interleaved windows of "
                f"{args.seconds:g} s per concurrency; one gRPC connection per calling thread; client and servers "
                f"share the machine's {os.cpu_count()} CPUs (1-minute load average {load_start:.1f} at the start, "
                f"{load_end:.1f} at the end). Server CPU: the supervisor and its workers.",
    }
    path = write_result(args.out, {
        "tables": [table], "cells": cells,
        "config": {"workers": args.workers, "seconds_per_cell": args.seconds, "interleaved_rounds": args.rounds,
                   "rows_per_request": 1, "target": str(target.directory), "defenses": [d for _, d in defenses],
                   "clients": "purifier.bench: threads, one grpc channel (connection) each, pre-serialized requests"},
        "load_average_1m": {"start": load_start, "end": load_end},
    })
    print(f"{'cell':22s} {'c1 p50':>8s} {'c1 cpu':>8s} {'c16 p50':>8s} {'c16 p99':>8s} {'c16 rps':>8s} "
          f"{'c16 cpu':>8s} {'ratio':>6s}")
    for row in rows:
        print(f"{row[0]:22s} {row[1]:8.3f} {row[2]:8.3f} {row[3]:8.3f} {row[4]:8.3f} {row[5]:8.0f} {row[6]:8.3f} "
              f"{row[7]!s:>6s}")
    print(f"load average (1 min): {load_start:.1f} at the start, {load_end:.1f} at the end; wrote {path}")


if __name__ == "__main__":
    main()
