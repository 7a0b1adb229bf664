"""How many shadow models the default audit needs: the shadow-based attacks' power as K grows.

On the leaky benchmark target (undefended, in process: the numbers an undefended sidecar
answers), trains the largest K shadows once (the shadow cache under --work keeps them; shadow k
does not depend on K, so every smaller K reuses the first ones), then audits with each K the
attacks whose strength depends on the shadow count: LiRA (online, offline), RMIA and the
calibrated label attack. Per K and attack: AUC and TPR at 1% and 0.1% FPR with 95% bootstrap
intervals, the variant that ran (online or offline, per-example or global variance) and the
attack's CPU seconds; the time to train the largest K. Reported: the counts that meet the target
(the best TPR at 0.1% FPR inside the largest K's 95% interval of its best attack at that metric,
with LiRA, RMIA and label_calibrated on their online variants); `DEFAULT_SHADOWS` in
purifier/attacks/shadow.py is chosen among them, and its comment says why.

    python benchmarks/bench_shadow_count.py [--shadows 4 8 16 24 32 64] [--work build/bench-audit]

Writes benchmarks/results/shadow_count.json (load average before and after each run).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

# library imports stay inside functions: spawned executor workers re-import this script

ATTACKS = ("lira_online", "lira_offline", "rmia", "label_calibrated")
RULE = ("the best TPR at 0.1% FPR lies in the largest count's 95% interval (of its best attack), with LiRA, RMIA "
        "and label_calibrated on their online variants")
FPRS = ("0.01", "0.001")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def figures(scores, membership, n_boot: int, seed: int) -> dict:
    from purifier import evaluation as ev

    out = {"auc": round(ev.roc_auc(scores, membership), 4),
           "auc_ci95": [round(v, 4) for v in ev.bootstrap_ci(ev.roc_auc, scores, membership, n_boot, seed)]}
    for f in FPRS:
        t = ev.tpr_at_fpr(scores, membership, float(f))
        ci = ev.bootstrap_ci(lambda s, m, f=float(f): ev.tpr_at_fpr(s, m, f).tpr, scores, membership, n_boot, seed)
        out[f] = {"tpr": round(t.tpr, 4), "ci95": [round(v, 4) for v in ci], "fpr": t.fpr, "negatives": t.negatives}
    return out


def main(argv=None) -> int:
    import numpy as np

    from purifier.attacks import AttackContext, attack_class
    from purifier.attacks.shadow import train_shadows
    from purifier.attacks.shadow_cache import ShadowCache
    from purifier.audit.data import AuditData
    from purifier.demo import prepare_target
    from purifier.executor import ExecutorSpec
    from purifier.models.access import InProcessTarget

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="purchase_like")
    ap.add_argument("--shadows", type=int, nargs="+", default=[4, 8, 16, 24, 32, 64])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="build/bench-audit")
    args = ap.parse_args(argv)

    work = Path(args.work)
    (work / args.dataset).mkdir(parents=True, exist_ok=True)
    target = prepare_target(work / args.dataset, args.dataset, args.seed)
    data = AuditData.from_target(target)
    X = np.concatenate([data.members.X, data.nonmembers.X])
    y = np.concatenate([data.members.y, data.nonmembers.y])
    membership = np.r_[np.ones(len(data.members), bool), np.zeros(len(data.nonmembers), bool)]
    access = InProcessTarget(target)
    outputs = access.query(X)
    cache = ShadowCache(work / "cache")
    recipe = data.recipe()

    def shadows(k: int):
        return train_shadows(data.pool.X, data.pool.y, X, y, data.n_classes, recipe, k, args.seed, progress=True,
                             train_size=data.train_size, executor=ExecutorSpec("local", args.workers), cache=cache)

    largest = max(args.shadows)
    before, w0, c0 = load(), time.perf_counter(), children_cpu()
    trained = shadows(largest).provenance
    training = {"shadows": largest, **trained, "wall_s": round(time.perf_counter() - w0, 1),
                "workers_cpu_s": round(children_cpu() - c0, 1), "load_before": before, "load_after": load()}
    rows = []
    for k in sorted(args.shadows):
        sh = shadows(k)
        ctx = AttackContext(sh, data.n_classes, data.kind, data.image_shape, data.feature_range, candidate_labels=y,
                            seed=args.seed)
        for name in ATTACKS:
            before, c0 = load(), time.process_time()
            attack = attack_class(name)(seed=args.seed).fit(ctx)
            scores = attack.run(access, X, y, outputs)
            cpu = time.process_time() - c0
            d = attack.details
            rows.append({"shadows": k, "attack": name, **figures(scores, membership, args.bootstrap, args.seed),
                         "variant": d.get("variant"), "variance": d.get("variance"), "cpu_s": round(cpu, 2),
                         "load": before})
            r = rows[-1]
            print(f"K={k:3d} {name:17s} AUC {r['auc']:.4f} TPR@1% {r['0.01']['tpr']:.4f} TPR@0.1% "
                  f"{r['0.001']['tpr']:.4f} {r['0.001']['ci95']} {r['variant']} {r['variance']} {cpu:.1f} cpu-s",
                  flush=True)
    ref = max((r for r in rows if r["shadows"] == largest), key=lambda r: r["0.001"]["tpr"])
    lo, hi = ref["0.001"]["ci95"]
    meets = []
    for k in sorted(args.shadows):
        at_k = [r for r in rows if r["shadows"] == k]
        best = max(r["0.001"]["tpr"] for r in at_k)
        online = all(r["variant"] == "online" for r in at_k if r["attack"] != "lira_offline")
        if lo <= best <= hi and online:
            meets.append(k)
    payload = {"dataset": args.dataset, "seed": args.seed, "training": training, "rows": rows,
               "reference": {"shadows": largest, "attack": ref["attack"], "tpr_at_0.001": ref["0.001"]["tpr"],
                             "ci95": [lo, hi]},
               "meet_target": meets, "target": RULE,
               "tables": [{"title": f"Shadow-based attacks on {args.dataset} (undefended) as shadows grow: AUC, TPR at "
                                    "1% and 0.1% FPR [95% bootstrap CI]",
                           "columns": ["shadows", "attack", "AUC", "TPR@1%FPR", "TPR@0.1%FPR", "variant", "variance",
                                       "attack CPU s"],
                           "rows": [[r["shadows"], r["attack"], r["auc"],
                                     f"{r['0.01']['tpr']:.4f} [{r['0.01']['ci95'][0]:.4f}, {r['0.01']['ci95'][1]:.4f}]",
                                     f"{r['0.001']['tpr']:.4f} [{r['0.001']['ci95'][0]:.4f}, "
                                     f"{r['0.001']['ci95'][1]:.4f}]", r["variant"], r["variance"], r["cpu_s"]]
                                    for r in rows],
                           "note": f"Counts that meet the target ({RULE}): {meets}. Shadow training: {training}."}]}
    print(f"meet the target: {meets}; reference {payload['reference']}")
    print(f"wrote {write_result('shadow_count', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
