"""The default audit of the leaky benchmark through gRPC, timed per attack and per phase.

Trains (or reuses) the `purchase_like` target, serves it with the embedded sidecar (`purifier
serve`, defense `none` or a fitted MemGuard), and runs the CLI's default audit against it through
tritonclient exactly as `purifier audit --endpoint` does. For every attack it records the fit and
run phases separately: wall seconds, this process's CPU seconds and the sidecar's CPU seconds;
for the shadow models, wall seconds and the CPU seconds of the worker processes. With --profile
the whole audit also runs under cProfile (the .prof file and a text summary of the hottest
functions go to --work). Per-attack strength (AUC, TPR at 1% and 0.1% FPR with 95% bootstrap
intervals) is stored beside the times, and every attack's scores go to --work as an .npz, so two
runs on the same seed can be compared score for score.

    python benchmarks/bench_audit.py [--shadows 32] [--defense none|memguard] [--cold | --warm]
        [--profile] [--attacks NAME ...] [--name audit_speed] [--work build/bench-audit]

Writes benchmarks/results/<name>.json (load average before and after: the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

# library imports stay inside functions: spawned executor workers re-import this script


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class PhaseClock:
    """Wall, own-process CPU and sidecar CPU per (attack, phase)."""

    def __init__(self, sidecar_pid: int):
        self.pid, self.rows = sidecar_pid, {}

    @contextlib.contextmanager
    def phase(self, attack: str, phase: str):
        from purifier.machine import process_cpu_seconds

        w, c, s = time.perf_counter(), time.process_time(), process_cpu_seconds(self.pid)
        try:
            yield
        finally:
            row = self.rows.setdefault(attack, {})
            row[phase] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(time.process_time() - c, 2),
                          "sidecar_cpu_s": round(process_cpu_seconds(self.pid) - s, 2)}

    def timed(self, cls):
        clock = self

        class Timed(cls):
            def fit(self, ctx):
                with clock.phase(cls.name, "fit"):
                    return super().fit(ctx)

            def run(self, target, X, y, outputs):
                with clock.phase(cls.name, "run"):
                    return super().run(target, X, y, outputs)

        Timed.__name__ = Timed.__qualname__ = cls.__name__
        return Timed


def profile_summary(prof: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def strength(r) -> dict:
    """AUC and TPR at 1% and 0.1% FPR with their 95% intervals, from a results.Ranking."""
    return {"auc": round(r.auc, 4), "auc_ci95": [round(v, 4) for v in r.auc_ci95],
            "tpr_at_0.01": round(r.tpr_1pct.tpr, 4), "tpr_at_0.01_ci95": [round(v, 4) for v in r.tpr_1pct.ci95],
            "tpr_at_0.001": round(r.tpr_01pct.tpr, 4), "tpr_at_0.001_ci95": [round(v, 4) for v in r.tpr_01pct.ci95]}


def phases(r: dict, key: str) -> float:
    """One attack's `key` ("cpu_s" or "sidecar_cpu_s") over its fit and run phases."""
    return sum(r.get(phase, {}).get(key, 0) for phase in ("fit", "run"))


def audit_table(payload: dict) -> dict:
    """The results page's table: per attack, its time (fit + run) and strength."""
    rows = []
    for a, r in payload["per_attack"].items():
        rows.append([a, r["seconds"], round(phases(r, "cpu_s"), 1), round(phases(r, "sidecar_cpu_s"), 1),
                     f"{r['auc']:.4f} [{r['auc_ci95'][0]:.4f}, {r['auc_ci95'][1]:.4f}]",
                     f"{r['tpr_at_0.01']:.4f}", f"{r['tpr_at_0.001']:.4f} [{r['tpr_at_0.001_ci95'][0]:.4f}, "
                     f"{r['tpr_at_0.001_ci95'][1]:.4f}]"])
    t = payload["totals"]
    return {"title": f"Default audit of {payload['dataset']} through gRPC, defense {payload['defense']}, "
                     f"{payload['shadows']} shadows ({payload['shadows_trained']} trained, "
                     f"{payload['shadows_from_cache']} from the cache)",
            "columns": ["attack", "wall s", "audit CPU s", "sidecar CPU s", "AUC [95% CI]", "TPR at 1% FPR",
                        "TPR at 0.1% FPR [95% CI]"],
            "rows": rows,
            "note": f"Whole audit {t['wall_s']} s wall (shadow training {payload['shadow_training_s']} s); CPU: "
                    f"audit process {t['cpu_s']} s, shadow workers {t['shadow_workers_cpu_s']} s, sidecar "
                    f"{t['sidecar_cpu_s']} s. Attack seconds include their fit on shadow outputs. Load average "
                    f"(1, 5, 15 min) before {t['load_before']}, after {t['load_after']}."}


def main(argv=None) -> int:
    import numpy as np

    from purifier.attacks import ADAPTIVE, DEFAULT_ATTACKS, parse_attacks
    from purifier.audit import runner
    from purifier.audit.results import Source
    from purifier.audit.runner import AuditConfig, run_audit
    from purifier.demo import prepare_defense, prepare_secret, prepare_target, start_sidecar
    from purifier.executor import ExecutorSpec
    from purifier.models.access import RemoteTarget

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="purchase_like")
    ap.add_argument("--shadows", type=int, default=None, help="default: the audit's default")
    ap.add_argument("--defense", default="none", choices=("none", "memguard"))
    ap.add_argument("--attacks", nargs="+", default=None, help="default: the CLI's default audit")
    ap.add_argument("--workers", type=int, default=None)
    cache = ap.add_mutually_exclusive_group()
    cache.add_argument("--cold", action="store_true", help="empty the shadow cache under --work first")
    cache.add_argument("--warm", action="store_true", help="fail unless every shadow comes from the cache")
    ap.add_argument("--profile", action="store_true", help="run the audit under cProfile")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="results file name (default audit_<dataset>_<defense>_k<K>)")
    ap.add_argument("--work", default="build/bench-audit")
    args = ap.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    if args.cold:
        shutil.rmtree(cache_dir, ignore_errors=True)
    (work / args.dataset).mkdir(exist_ok=True)
    t0 = time.perf_counter()
    target = prepare_target(work / args.dataset, args.dataset, args.seed)
    target_s = time.perf_counter() - t0
    secret_file = prepare_secret(work / args.dataset)
    defense_dir = None
    if args.defense != "none":
        from purifier.defenses.keyed import load_secret

        (work / args.dataset / "defenses").mkdir(exist_ok=True)
        defense_dir = prepare_defense(args.defense, target, work / args.dataset,
                                      load_secret(file=str(secret_file)), args.seed)
    attacks = parse_attacks(args.attacks)
    if args.attacks is None and args.defense == "none":
        attacks = [a for a in DEFAULT_ATTACKS if a not in ADAPTIVE]  # as the CLI: nothing to adapt to
    shadows = {"n_shadows": args.shadows} if args.shadows else {}
    config = AuditConfig(tuple(attacks), **shadows, n_boot=args.bootstrap, seed=args.seed,
                         executor=ExecutorSpec("local", args.workers), cache_dir=str(cache_dir))

    (work / "logs").mkdir(exist_ok=True)
    with start_sidecar(target.directory, args.defense, defense_dir, secret_file,
                       work / "logs" / f"sidecar-{args.defense}.log") as sidecar:
        clock = PhaseClock(sidecar.pid)
        real_attack_class = runner.attack_class
        runner.attack_class = lambda name: clock.timed(real_attack_class(name))
        prof = cProfile.Profile() if args.profile else None
        before, cpu0, kids0 = load(), time.process_time(), children_cpu()
        from purifier.machine import process_cpu_seconds

        side0 = process_cpu_seconds(sidecar.pid)
        w0 = time.perf_counter()
        try:
            with contextlib.closing(RemoteTarget(sidecar.endpoint, target.directory.name,
                                                 n_classes=target.n_classes, timeout_s=600.0)) as access:
                if prof is not None:
                    prof.enable()
                audit = run_audit(target, access, config, args.defense,
                                  source=Source(sidecar.endpoint, target.directory.name))
                if prof is not None:
                    prof.disable()
        finally:
            runner.attack_class = real_attack_class
        wall = time.perf_counter() - w0
        totals = {"wall_s": round(wall, 1), "cpu_s": round(time.process_time() - cpu0, 1),
                  "shadow_workers_cpu_s": round(children_cpu() - kids0, 1),
                  "sidecar_cpu_s": round(process_cpu_seconds(sidecar.pid) - side0, 1),
                  "load_before": before, "load_after": load()}

    report = audit.report
    if args.warm and report.shadows.trained:
        raise SystemExit(f"--warm: {report.shadows.trained} shadows were trained, not read from the cache")
    k = report.shadows.n
    name = args.name or f"audit_{args.dataset}_{args.defense}_k{k}"
    np.savez_compressed(work / f"{name}-scores.npz", membership=audit.membership,
                        **{a: o.scores for a, o in audit.outcomes.items()})
    (work / f"{name}-report.json").write_text(json.dumps(report.to_json(), indent=1, default=str))
    if prof is not None:
        prof.dump_stats(work / f"{name}.prof")
        (work / f"{name}-profile.txt").write_text(profile_summary(prof, 40))

    per_attack = {a: {"seconds": round(entry.seconds, 2), **clock.rows.get(a, {}), **strength(entry.ranking),
                      "queries": entry.queries, "details": entry.details}
                  for a, entry in report.attacks.items()}
    payload = {"dataset": args.dataset, "defense": args.defense, "shadows": k, "seed": args.seed,
               "attacks": attacks, "target_prepare_s": round(target_s, 1),
               "shadow_training_s": report.timing.shadow_training,
               "shadows_trained": report.shadows.trained, "shadows_from_cache": report.shadows.from_cache,
               "executor": report.shadows.executor, "fallbacks": report.shadows.fallbacks,
               "totals": totals, "per_attack": per_attack, "profiled": bool(args.profile)}
    payload["tables"] = [audit_table(payload)]
    path = write_result(name, payload)
    print(f"{'attack':26s} {'wall s':>8s} {'cpu s':>8s} {'side s':>8s} {'AUC':>7s} {'TPR1%':>7s} {'TPR.1%':>7s}")
    for a, r in per_attack.items():
        print(f"{a:26s} {r['seconds']:8.1f} {phases(r, 'cpu_s'):8.1f} "
              f"{phases(r, 'sidecar_cpu_s'):8.1f} {r['auc']:7.4f} {r['tpr_at_0.01']:7.4f} "
              f"{r['tpr_at_0.001']:7.4f}")
    print(f"shadows {payload['shadow_training_s']} s ({payload['shadows_trained']} trained); total {totals}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
