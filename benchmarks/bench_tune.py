"""`purifier tune memguard` on digits, as a user runs it: wall time, CPU time, the chosen epsilon and
its real-traffic L1.

Runs the command in a subprocess (fresh interpreter, imports included) on the privacy benchmark's
digits target (trained here if missing), with the defaults: MemGuard fitted by the command, its
default epsilon grid, the four baselines, 4 shadow models. The target is <= 3 minutes on 2 cores;
the load average before and after is recorded because the development machine is shared.
Writes benchmarks/results/tune_digits.json.

    python benchmarks/bench_tune.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402


def main(argv=None) -> int:
    from purifier.demo import prepare_secret, prepare_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="build/bench-privacy", help="target cache directory (shared with "
                                                                      "bench_privacy_utility.py)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = Path(args.work) / "digits"
    work.mkdir(parents=True, exist_ok=True)
    target = prepare_target(work, "digits", args.seed)
    secret = prepare_secret(work)
    out = Path("build/bench-tune/digits")
    command = [sys.executable, "-m", "purifier.cli", "tune", "memguard", "--target", str(target.directory),
               "--out", str(out), "--force", "--secret-file", str(secret), "--quiet"]
    load_start = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
        return proc.returncode
    from purifier.tuning import Tuning

    raw = json.loads((out / "tune.json").read_text())
    result = Tuning.from_json(raw)
    pick = result.chosen or result.closest
    l1, floor = pick.utility.l1_nonmembers, result.floor.auc
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = ["memguard", "reached" if result.reached_floor else "not reached (closest shown)", pick.label,
           round(pick.best_auc, 4), f"[{pick.best.ci95[0]:.3f}, {pick.best.ci95[1]:.3f}]",
           round(floor.value, 4), f"[{floor.ci95[0]:.3f}, {floor.ci95[1]:.3f}]",
           round(l1.mean, 4), round(l1.p95, 4), round(wall, 1), round(cpu, 1),
           f"{load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}"]
    path = write_result("tune_digits", {
        "command": " ".join(command[1:]), "exit_status": proc.returncode, "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1), "target_seconds": 180, "tune": raw,
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
        "tables": [{
            "title": "purifier tune memguard on digits (defaults: fitted by the command, 9 epsilons, the four "
                     "baselines, 4 shadow models)",
            "columns": ["defense", "floor", "setting", "best attack AUC", "95% CI", "floor AUC", "floor 95% CI",
                        "real-traffic L1 mean", "real-traffic L1 p95", "wall s", "CPU s", "load average (1 min)"],
            "rows": [row],
            "note": "Wall time of the whole command in a fresh interpreter (imports, fitting MemGuard, shadow "
                    "training, 19 audits); the target is <= 180 s on 2 cores. The machine is shared: read the "
                    "wall time with the load average beside it. Setting rule: the smallest epsilon whose best "
                    "confidence attack AUC is at most the upper end of the label-only floor's 95% interval.",
        }],
    })
    print(f"wrote {path}: {pick['label']} ({'chosen' if result['chosen'] else 'closest'}), real-traffic L1 "
          f"{l1['mean']:.4f}, {wall:.0f}s wall, {cpu:.0f}s CPU, load {load_start[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
