"""Shadow models at scale: local processes vs Ray, the cache, and LiRA's power as shadows grow.

LiRA's true-positive rate at low false-positive rates grows with the number of shadow models
(Carlini et al. 2022, "Membership Inference Attacks From First Principles", Fig. 9). For each
shadow count K (default 4, 16, 64) on the leaky benchmark target (`purchase_like` when this
checkout has it, else `synthetic100`):

* a cold audit (empty cache) with the shadows on local processes, and one on a local Ray started
  by the audit (its start-up inside the measured time: Ray's overhead is not hidden), LiRA
  online and offline plus the gap attack; both runs' shadow outputs must be identical;
* LiRA's TPR at 0.1% and 1% FPR with 95% bootstrap CIs, realized FPR and negatives;

then the full default audit at the largest K (on local processes, or on Ray when only Ray runs
it), cold and rerun warm (every shadow from the cache), and Ray's bare start/stop time. Shadow k
does not depend on K, so cache entries two runs share (e.g. the first 16 shadows of a local run
with 16 and a Ray run with 64) are compared bit for bit. The machine is shared: every run records the load
average before and after. Writes benchmarks/results/shadows.json.

    python benchmarks/bench_shadows.py [--dataset NAME] [--shadows 4 16 64] [--workers 2]
        [--ray-shadows 4 16] [--work build/bench-shadows]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import write_result  # noqa: E402

# The library imports live inside the functions: local executor workers are spawned, and a
# spawned child re-imports this script, which must stay cheap to import (the `purifier` CLI is).

LIRA = ("gap", "lira_online", "lira_offline")
FPRS = (0.001, 0.01)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def tpr_with_ci(scores: np.ndarray, membership: np.ndarray, fpr: float, n_boot: int) -> dict:
    from purifier import evaluation as ev

    t = ev.tpr_at_fpr(scores, membership, fpr)
    lo, hi = ev.bootstrap_ci(lambda s, m: ev.tpr_at_fpr(s, m, fpr).tpr, scores, membership, n_boot)
    return {"tpr": t.tpr, "ci95": [lo, hi], "fpr": t.fpr, "negatives": t.negatives, "measurable": t.measurable}


def timed_audit(target, attacks, k: int, executor, cache_dir: Path, n_boot: int):
    """One audit of the undefended target in process; (audit, facts about the run)."""
    from purifier.audit.runner import AuditConfig, run_audit
    from purifier.models.access import InProcessTarget

    before = load()
    t0 = time.perf_counter()
    audit = run_audit(target, InProcessTarget(target), AuditConfig(
        tuple(attacks), n_shadows=k, n_boot=n_boot, executor=executor, cache_dir=str(cache_dir)), "none")
    wall = time.perf_counter() - t0
    sh = audit.report.shadows
    return audit, {"shadows": k, "executor": sh.executor, "trained": sh.trained,
                   "from_cache": sh.from_cache, "wall_s": round(wall, 1),
                   "shadow_training_s": audit.report.timing.shadow_training,
                   "attack_s": {a: e.seconds for a, e in audit.report.attacks.items()},
                   "load_before": before, "load_after": load()}


def ray_start_stop(workers: int) -> dict:
    from purifier.executor import RayExecutor

    before = load()
    t0 = time.perf_counter()
    ex = RayExecutor(num_cpus=workers)
    started = time.perf_counter()
    ex.close()
    return {"start_s": round(started - t0, 1), "stop_s": round(time.perf_counter() - started, 1),
            "load_before": before, "load_after": load()}


def main(argv=None) -> int:
    from purifier.attacks import ADAPTIVE, DEFAULT_ATTACKS
    from purifier.data.datasets import LOADERS
    from purifier.executor import ExecutorSpec
    from purifier.models.target import Target, train_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="purchase_like" if "purchase_like" in LOADERS else "synthetic100")
    parser.add_argument("--shadows", type=int, nargs="+", default=[4, 16, 64], help="cold runs on local processes")
    parser.add_argument("--ray-shadows", type=int, nargs="*", default=[4, 16], help="cold runs on a local Ray")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--no-full-audit", action="store_true",
                        help="the largest run audits LiRA only (default: every default attack, then a warm "
                             "rerun)")
    parser.add_argument("--work", default="build/bench-shadows")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute only LiRA's figures from the shadows the last run cached under --work")
    args = parser.parse_args(argv)
    work = Path(args.work)
    if args.rescore:
        return rescore(work, args.dataset, args.bootstrap)
    work.mkdir(parents=True, exist_ok=True)
    tdir = work / f"target-{args.dataset}"
    t0 = time.perf_counter()
    target = Target.load(tdir) if (tdir / "model.json").exists() else train_target(args.dataset, tdir, seed=0)
    target_s = time.perf_counter() - t0

    shutil.rmtree(work / "cache", ignore_errors=True)  # every run of this script starts cold
    runs, power, identical, full = [], [], {}, None
    ray_overhead = ray_start_stop(args.workers) if args.ray_shadows else None
    largest = max(args.shadows + args.ray_shadows)
    full_on = "local" if largest in args.shadows else "ray"

    def write(done: bool) -> None:
        payload = {"dataset": args.dataset, "workers": args.workers, "target_training_s": round(target_s, 1),
                   "target_accuracy": target.manifest.get("accuracy"), "complete": done,
                   "ray_start_stop": ray_overhead, "runs": runs, "identical_local_vs_ray": identical,
                   "identical_shared_cache_entries": compare_cache_entries(work / "cache"),
                   "lira_power": power, "full_audit": full, "projection": projection(runs, args.workers)}
        payload["tables"] = tables(payload)
        print(f"wrote {write_result('shadows', payload)}", flush=True)

    for k in sorted(set(args.shadows) | set(args.ray_shadows)):
        audits = {}
        for name in ("local", "ray"):
            if k not in (args.shadows if name == "local" else args.ray_shadows):
                continue
            full_run = k == largest and name == full_on and not args.no_full_audit
            # the CLI's default audit of an undefended endpoint: adaptive attacks need a defense to adapt to
            attacks = (*(a for a in DEFAULT_ATTACKS if a not in ADAPTIVE), *LIRA) if full_run else LIRA
            cache = work / "cache" / f"{name}-{k}"
            audit, facts = timed_audit(target, attacks, k, ExecutorSpec(name, args.workers), cache, args.bootstrap)
            audits[name] = audit
            runs.append({**facts, "attacks": "default + LiRA" if full_run else "LiRA + gap", "cache": "cold"})
            print(f"K={k:3d} {name:5s} cold: {facts['wall_s']:7.1f} s (shadows {facts['shadow_training_s']:.1f} s) "
                  f"load {facts['load_before']} -> {facts['load_after']}", flush=True)
            if full_run:
                _, warm = timed_audit(target, attacks, k, ExecutorSpec(name, args.workers), cache, args.bootstrap)
                full = {"attacks": sorted(set(attacks)), "cold": facts, "warm": warm,
                        "warm_over_cold": round(warm["wall_s"] / facts["wall_s"], 3)}
                print(f"K={k:3d} {name:5s} warm: {warm['wall_s']:7.1f} s", flush=True)
        if len(audits) == 2:
            a, b = audits["local"], audits["ray"]
            identical[str(k)] = bool(np.array_equal(a.shadows.pool_probs, b.shadows.pool_probs)
                                     and np.array_equal(a.shadows.cand_probs, b.shadows.cand_probs)
                                     and all(np.array_equal(a.outcomes[n].scores, b.outcomes[n].scores) for n in LIRA))
        power += lira_power(next(iter(audits.values())), k, args.bootstrap)

        write(done=k == largest)  # after each shadow count: a run cut short keeps what it measured
    return 0


def lira_power(audit, k: int, n_boot: int) -> list[dict]:
    """LiRA online and offline of one audit: AUC, TPR at each FPR with a bootstrap CI, details."""
    return [{"shadows": k, "attack": name, "auc": audit.report.attacks[name].ranking.auc,
             "details": audit.outcomes[name].details,
             **{str(f): tpr_with_ci(audit.outcomes[name].scores, audit.membership, f, n_boot) for f in FPRS}}
            for name in LIRA[1:]]


def rescore(work: Path, dataset: str, n_boot: int) -> int:
    """LiRA's figures again, from the shadows an earlier run left in its caches (nothing trains),
    with this checkout's attacks; that run's timing rows are kept as they were measured."""
    import json

    from common import RESULTS

    from purifier.executor import ExecutorSpec
    from purifier.models.target import Target

    old = json.loads((RESULTS / "shadows.json").read_text())
    target = Target.load(work / f"target-{dataset}")
    power = []
    counts = sorted({int(d.name.rpartition("-")[2]) for d in (work / "cache").iterdir() if d.is_dir()})
    for k in counts:  # every count with a cache, also one whose timed run was cut short
        cache = next(d for d in sorted((work / "cache").glob(f"*-{k}")))
        audit, facts = timed_audit(target, LIRA, k, ExecutorSpec("local", 1), cache, n_boot)
        if facts["trained"]:
            raise SystemExit(f"{cache} lacks {facts['trained']} of the {k} shadows: rerun the whole benchmark")
        power += lira_power(audit, k, n_boot)
        print(f"K={k:3d} LiRA rescored from {cache.name}", flush=True)
    payload = {key: v for key, v in old.items() if key not in ("benchmark", "created", "machine", "tables")}
    payload["timing_run"] = old.get("timing_run") or {"created": old["created"], "machine": old["machine"]}
    payload["lira_power"] = power
    payload["identical_shared_cache_entries"] = compare_cache_entries(work / "cache")  # now with every count
    payload["tables"] = tables(payload)
    print(f"wrote {write_result('shadows', payload)}")
    return 0


def compare_cache_entries(root: Path) -> dict:
    """For each two cache directories of runs on different executors, the entries (shadows) they
    share by key and whether every shared shadow's outputs are equal to the bit."""
    dirs = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    entries = {d.name: {f.stem: f for f in d.glob("*/*.npz")} for d in dirs}
    out = {}
    for a in entries:
        for b in entries:
            if a < b and a.split("-")[0] != b.split("-")[0] and (shared := entries[a].keys() & entries[b].keys()):
                equal = True
                for key in sorted(shared):
                    with np.load(entries[a][key]) as x, np.load(entries[b][key]) as y:
                        equal &= bool(np.array_equal(x["probs"], y["probs"]))
                out[f"{a} vs {b}"] = {"shared_shadows": len(shared), "equal": equal}
    return out


def projection(runs: list[dict], workers: int) -> dict | None:
    """Measured: core-seconds per shadow from the largest cold local run. Projected: wall time of
    K shadows on N machines of `workers` cores, ceil(K / (N * workers)) rounds of one shadow per
    core (shadows are independent; data shipping and stragglers are not modelled)."""
    local = [r for r in runs if r["executor"]["executor"] == "local" and r["trained"] > 0]
    if not local:
        return None
    r = max(local, key=lambda r: r["trained"])
    per_shadow = r["shadow_training_s"] * workers / r["trained"]
    return {"measured_core_s_per_shadow": round(per_shadow, 1), "from_run": {k: r[k] for k in ("shadows", "wall_s",
                                                                                           "load_before")},
            "projected_wall_s": {f"{k} shadows on {n} machine(s)": round(math.ceil(k / (n * workers)) * per_shadow, 1)
                                 for k in (64, 256) for n in (1, 4, 16)}}


def _tpr_cell(t: dict) -> str:
    mark = "" if t["measurable"] else " (n/m)"
    return f"{t['tpr']:.4f} [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}] @{t['fpr']:.4f}/{t['negatives']}{mark}"


def tables(p: dict) -> list[dict]:
    by_k: dict[int, dict] = {}
    for r in p["runs"]:
        by_k.setdefault(r["shadows"], {})[r["executor"]["executor"]] = r
    rows = []
    for k, ex in sorted(by_k.items()):
        loc, ray = ex.get("local"), ex.get("ray")
        rows.append([k, loc["shadow_training_s"] if loc else "-", ray["shadow_training_s"] if ray else "-",
                     round(ray["shadow_training_s"] / loc["shadow_training_s"], 2) if loc and ray else "-",
                     f"{loc['wall_s']} ({loc['attacks']})" if loc else "-", ray["wall_s"] if ray else "-",
                     p["identical_local_vs_ray"].get(str(k), "-"),
                     "; ".join(f"{r['executor']['executor']} {r['load_before']} -> {r['load_after']}"
                               for r in (loc, ray) if r)])
    out = [{"title": f"Shadow training on {p['dataset']}, cold cache, {p['workers']} workers: local processes vs a "
                     "local Ray started by the audit",
            "columns": ["shadows", "local shadows s", "Ray shadows s", "Ray / local", "local audit s", "Ray audit s",
                        "identical", "load avg (1, 5, 15 min) before -> after"],
            "rows": rows,
            "note": "Shadow time includes starting the executor (worker processes, or Ray itself: "
                    f"bare Ray start {p['ray_start_stop']['start_s'] if p['ray_start_stop'] else '-'} s, stop "
                    f"{p['ray_start_stop']['stop_s'] if p['ray_start_stop'] else '-'} s). Audits run in process; "
                    "the Ray runs audit LiRA online, offline and the gap attack. 'identical': the two executors' "
                    "shadow outputs and attack scores are equal to the bit. Shared machine: see the load "
                    "averages."}]
    if shared := p.get("identical_shared_cache_entries"):
        out[0]["note"] += (" Shadows that runs on different executors share (shadow k does not depend on K), "
                           "equal to the bit: " + "; ".join(f"{pair} ({v['shared_shadows']} shadows): {v['equal']}"
                                                           for pair, v in shared.items()) + ".")
    timing = p.get("timing_run")
    if timing:
        out[0]["note"] += (f" Timings measured {timing['created']} at commit {timing['machine'].get('git_commit')}; "
                           "LiRA's figures below recomputed from the same cached shadows with this commit's attacks.")
    out.append({"title": f"LiRA on {p['dataset']} as shadows grow: TPR at low FPR [95% bootstrap CI] "
                         "@realized FPR/negatives",
                "columns": ["shadows", "attack", "AUC", "TPR at 0.1% FPR", "TPR at 1% FPR", "variant", "variance"],
                "rows": [[r["shadows"], r["attack"], round(r["auc"], 4), _tpr_cell(r["0.001"]), _tpr_cell(r["0.01"]),
                          r["details"].get("variant", "-"), r["details"].get("variance", "-")]
                         for r in p["lira_power"]]})
    if p["full_audit"]:
        f = p["full_audit"]
        out.append({"title": f"Full default audit of {p['dataset']} with {f['cold']['shadows']} shadows "
                             f"({p['workers']} workers, {f['cold']['executor']['executor']})",
                    "columns": ["run", "wall s", "shadow s", "trained", "from cache", "load avg before -> after"],
                    "rows": [[name, r["wall_s"], r["shadow_training_s"], r["trained"], r["from_cache"],
                              f"{r['load_before']} -> {r['load_after']}"] for name, r in (("cold", f["cold"]),
                                                                                          ("warm", f["warm"]))],
                    "note": f"Warm / cold = {f['warm_over_cold']}. Attacks: {', '.join(f['attacks'])}."})
        if "attack_s" in f["cold"]:
            out.append({"title": "Seconds per attack in that audit (wall, fit and run)",
                        "columns": ["attack", "cold", "warm"],
                        "rows": [[a, s, f["warm"].get("attack_s", {}).get(a, "-")]
                                 for a, s in f["cold"]["attack_s"].items()]})
    if p["projection"]:
        pr = p["projection"]
        out.append({"title": "Projected wall time on N machines (projection, not measured)",
                    "columns": ["case", "projected s"],
                    "rows": [[case, s] for case, s in pr["projected_wall_s"].items()],
                    "note": f"Measured: {pr['measured_core_s_per_shadow']} core-seconds per shadow (cold local run "
                            f"with {pr['from_run']['shadows']} shadows, load {pr['from_run']['load_before']}). "
                            f"Projected: ceil(K / (N x {p['workers']} cores)) rounds x that cost, assuming "
                            "machines like this one, one single-threaded shadow per core, and no data shipping "
                            "or straggler cost (a Ray cluster adds its start and the transfer of the records "
                            "to each node once)."})
    return out


if __name__ == "__main__":
    sys.exit(main())
