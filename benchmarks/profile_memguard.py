"""Where a MemGuard (fast mode) call spends its CPU on the digits target: per-call CPU at 1, 16 and
256 rows, a short cProfile summary per batch size, and onnxruntime's own profile of the solver
graph at one row (operators run, and kernel time by operator type).

Run: `.venv/bin/python -m benchmarks.profile_memguard [--out FILE]` (writes a text summary; the
target and the defense are built under build/ when missing). One BLAS and one onnxruntime thread,
as the sidecar runs the defense. The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import base64
import collections
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, digits_target
from purifier.defenses import load_defense, load_secret
from purifier.defenses.base import FitData
from purifier.threads import limit_threads

BATCHES = (1, 16, 256)
def fitted_memguard(target_dir: Path, defense_dir: Path):
    target = digits_target(str(target_dir))
    secret_file = defense_dir.parent / "profile-secret"  # kept beside the defense, which is bound to it
    if not secret_file.is_file():
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret_file.write_bytes(base64.b64encode(os.urandom(32)))
    if not (defense_dir / "defense.json").is_file():
        subprocess.run([sys.executable, "-m", "purifier.cli", "fit-defense", "memguard", "--target", str(target_dir),
                        "--out", str(defense_dir), "--secret-file", str(secret_file)], check=True)
    data = FitData.from_target(target)
    rows = np.r_[data.member_probs, data.reference_probs]
    return load_defense(defense_dir, load_secret(file=secret_file), target.model_id), rows


def cpu_per_call(defense, rows: np.ndarray, batch: int, min_seconds: float) -> tuple[float, float, int]:
    """(mean CPU ms per call, p50 wall ms, calls), cycling through different rows."""
    starts = list(range(0, len(rows) - batch + 1, batch)) or [0]
    defense.transform(rows[:batch])
    walls, calls = [], 0
    cpu0, t_end = time.process_time(), time.perf_counter() + min_seconds
    while calls < 5 or time.perf_counter() < t_end:
        start = starts[calls % len(starts)]
        t0 = time.perf_counter()
        defense.transform(rows[start:start + batch])
        walls.append(time.perf_counter() - t0)
        calls += 1
    return (time.process_time() - cpu0) / calls * 1e3, float(np.median(walls)) * 1e3, calls


def profile(defense, rows: np.ndarray, batch: int, calls: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for i in range(calls):
        start = (i * batch) % max(1, len(rows) - batch)
        defense.transform(rows[start:start + batch])
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return "\n".join([lines[0].strip(), *lines[start:]])


def graph_profile(defense, rows: np.ndarray, runs: int) -> str:
    """onnxruntime's profiler on the solver graph, one row per run: operators executed per run and
    kernel time per run by operator type. The profiler adds a few microseconds to every operator,
    so the shares matter more than the absolute times."""
    import onnxruntime as ort

    from purifier.defenses.phase1 import build_graph

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "phase1")
        session = ort.InferenceSession(build_graph(defense.classifier).model_bytes(), opts,
                                       providers=["CPUExecutionProvider"])
        for i in range(runs):
            row = rows[i % len(rows)][None].astype(np.float64)
            session.run(None, {"probs": row / row.sum(), "coin": np.full(1, 0.5), "epsilon": np.full(1, defense.epsilon)})
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    model_runs = [e["dur"] for e in events if e.get("name") == "model_run"]
    by_type, count = collections.Counter(), collections.Counter()
    for e in kernels:
        by_type[e["args"]["op_name"]] += e["dur"]
        count[e["args"]["op_name"]] += 1
    total = sum(by_type.values())
    lines = [f"{len(kernels) / runs:.0f} operators per run; profiled run {np.median(model_runs):.0f} us median, "
             f"kernel time {total / runs:.0f} us per run",
             "operator          per run  kernel us/run  share"]
    lines += [f"{op:16s}  {count[op] / runs:7.0f}  {t / runs:13.1f}  {t / total:5.1%}" for op, t in by_type.most_common()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=str(ROOT / "build" / "targets" / "digits"))
    parser.add_argument("--defense-dir", default=str(ROOT / "build" / "defenses" / "memguard-digits-profile"))
    parser.add_argument("--out", help="write the summary here (else stdout only)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per batch size")
    parser.add_argument("--top", type=int, default=12, help="functions per cProfile table")
    args = parser.parse_args()
    limit_threads()
    defense, rows = fitted_memguard(Path(args.target), Path(args.defense_dir))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    report = [f"MemGuard fast mode on the digits target ({defense.n_classes} classes, {len(rows)} target rows), "
              f"commit {commit}, one BLAS/ORT thread", f"load average at start: {os.getloadavg()}"]
    report.append("rows/call  CPU ms/call  CPU us/row  p50 wall ms  calls")
    for batch in BATCHES:
        cpu, p50, calls = cpu_per_call(defense, rows, batch, args.seconds)
        report.append(f"{batch:9d}  {cpu:11.3f}  {cpu * 1e3 / batch:10.1f}  {p50:11.3f}  {calls:5d}")
    report.append(f"load average at end: {os.getloadavg()}")
    for batch in BATCHES:
        calls = max(3, 600 // batch)
        report += ["", f"--- cProfile, {calls} calls of {batch} row(s), top {args.top} by own time ---",
                   profile(defense, rows, batch, calls, args.top)]
    report += ["", "--- onnxruntime's profile of the solver graph, 500 runs of 1 row ---",
               graph_profile(defense, rows, 500)]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
