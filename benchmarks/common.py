"""Shared benchmark plumbing: machine info, timing, and JSON results under benchmarks/results/.

Benchmarks compare A against B in one process and report ratios next to absolute figures; the
JSON they write carries the machine it ran on. Nothing in the package or the tests imports this.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from purifier import machine
from purifier.bench.measure import latency_summary
from purifier.machine import process_cpu_seconds  # noqa: F401 - benchmarks import it from here
from purifier.serve_process import ServerProcess, serve_command

ROOT = Path(__file__).resolve().parents[1]

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """purifier.machine's record (platform, CPUs, load average, versions) plus the git commit."""
    info = machine.machine_info("onnxruntime-gpu")
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def time_calls(fn: Callable[[], object], min_seconds: float = 0.5, min_calls: int = 5,
               max_calls: int = 100_000) -> list[float]:
    """Per-call wall times in seconds, after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def thread_cpu_per_row(run: Callable[[dict], object], feeds: list[dict], buffers: dict, passes: int,
                       seed: int):
    """Thread CPU ns of `run(buffers)` per row, (passes, rows) array: every row once per pass, in a
    random order per pass, its feed copied into `buffers` (the same arrays for every row, so no row
    has addresses of its own: rows of one array would put two halves of it at different cache sets)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ns = np.zeros((passes, len(feeds)))
    for p in range(passes):
        for i in rng.permutation(len(feeds)):
            for name, buf in buffers.items():
                buf[...] = feeds[i][name]
            t0 = time.thread_time_ns()
            run(buffers)
            ns[p, i] = time.thread_time_ns() - t0
    return ns


def summarize(times: list[float]) -> dict:
    """p50 / p99 / mean in milliseconds plus the call count (purifier.bench's definition)."""
    return latency_summary(times)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def write_result(name: str, payload: dict) -> Path:
    """Write benchmarks/results/<name>.json with machine info and a UTC timestamp."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"benchmark": name, "created": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": machine_info(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def add_sidecar_flags(parser, defense_help: str = "fitted defense directory (repeatable)") -> None:
    """--target, --defense-dir, --secret-file: what every sidecar benchmark serves."""
    parser.add_argument("--target", default=str(ROOT / "build" / "targets" / "digits"),
                        help="target directory (trained here if missing)")
    parser.add_argument("--defense-dir", action="append", default=[], help=defense_help)
    parser.add_argument("--secret-file", default=None, help="the PRF secret the defenses were fitted with (required with --defense-dir)")


def digits_target(directory: str):
    """The Target in `directory`, trained there on digits first when it is missing."""
    from purifier.models.target import Target, train_target

    if not Path(directory).is_dir():
        Path(directory).parent.mkdir(parents=True, exist_ok=True)
        train_target("digits", directory)
    return Target.load(directory)


def secret_file_or_throwaway(secret_file: str | None, work: Path, defense_dirs=()) -> Path:
    """The given secret file, or (with no fitted defense to serve) a fresh random secret written
    into the temporary `work` directory: a fitted defense is served with the secret it was fitted
    with, or not at all."""
    if secret_file:
        return Path(secret_file)
    if defense_dirs:
        raise SystemExit("--defense-dir: pass --secret-file, the secret the defenses were fitted with "
                         "(serving refuses another)")
    path = work / "secret"
    path.write_text(secrets.token_hex(32))
    return path


def baseline_server(src: Path, args: list[str]) -> ServerProcess:
    """`purifier serve ARGS` from the checkout at `src` (an older commit, measured beside this one
    in the same run), in this interpreter: a shim directory maps its `server/` to the
    `purifier_server` import name. No REST front (`--http-port -1` where the checkout has one; an
    older one rejects the flag)."""
    shim = Path(tempfile.mkdtemp(prefix="purifier-baseline-"))
    (shim / "purifier").symlink_to(src / "purifier")
    (shim / "purifier_server").symlink_to(src / "server")
    argv = serve_command(args, rest=False)[3:]          # after `python -m purifier.cli`
    if "http_port" in (src / "server" / "settings.py").read_text():  # it has a REST front: keep it off
        argv += ["--http-port", "-1"]
    code = (f"import runpy, sys; sys.path.insert(0, {str(shim)!r}); sys.argv = ['purifier', *{argv!r}]; "
            "runpy.run_module('purifier.cli', run_name='__main__')")
    return ServerProcess([sys.executable, "-c", code])


def commit_of(src: Path) -> str:
    """The short commit hash of the checkout at `src`."""
    return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()

