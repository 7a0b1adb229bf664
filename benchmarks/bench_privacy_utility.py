"""Privacy-utility sweep: MemGuard, PURIFIER and the simple baselines on one target, in one run.

MemGuard and PURIFIER over their own budget grids (`Defense.knob`), and the baselines a skeptic
asks about at their tune-curve settings (`Defense.baseline_grid`): label only, top-k, rounding,
and keyed Laplace noise whose scale is chosen so that its mean L1 on the defender's reference
split matches the served MemGuard's and PURIFIER's there (never calibrated on the evaluation
records). Trains (or reuses) the target and both defenses under --work; the sweep itself is
`purifier.audit.sweep.sweep_points`, the one `purifier tune` runs: shadow models and attacks
fitted once, the label-only floor measured once, every setting audited in-process. Utility is
`purifier.evaluation.output_utility` on the evaluation records: L1 on non-members (real traffic)
and on members separately, Brier, ECE, rank agreement, distinct answers. Writes
benchmarks/results/privacy_utility_<dataset>.json.

    python benchmarks/bench_privacy_utility.py --dataset digits
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402


def matched_noise_scale(reference_probs: np.ndarray, target_l1: float, secret: bytes, model_id: str) -> float:
    """The Laplace scale whose mean L1 on the reference rows is `target_l1` (bisection in log scale;
    the mean L1 grows with the scale)."""
    from purifier.defenses.baselines import Noise

    def mean_l1(scale):
        noise = Noise(kind="laplace", scale=scale, secret=secret)
        noise.model_id = model_id
        return float(np.abs(noise.transform(reference_probs) - reference_probs).sum(axis=1).mean())

    lo, hi = 1e-6, 1.0
    for _ in range(40):
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if mean_l1(mid) < target_l1 else (lo, mid)
    return float(np.sqrt(lo * hi))


def main(argv=None) -> int:
    from purifier.audit.data import AuditData
    from purifier.audit.runner import AuditConfig
    from purifier.audit.sweep import CONFIDENCE_ATTACKS, sweep_points
    from purifier.defenses import defense_class, load_defense
    from purifier.defenses.keyed import load_secret
    from purifier.demo import prepare_defense, prepare_secret, prepare_target
    from purifier.models.access import InProcessTarget

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist5k", "purchase_like"])
    parser.add_argument("--work", default="build/bench-privacy", help="target/defense cache directory")
    parser.add_argument("--shadows", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0, load_start = time.perf_counter(), os.getloadavg()
    work = Path(args.work) / args.dataset
    (work / "defenses").mkdir(parents=True, exist_ok=True)
    target = prepare_target(work, args.dataset, args.seed)
    secret = load_secret(file=str(prepare_secret(work)))
    fitted = {name: load_defense(prepare_defense(name, target, work, secret, args.seed), secret=secret,
                                 model_id=target.model_id) for name in ("memguard", "purifier")}

    def baseline(name):
        defense = defense_class(name)(secret=secret)
        defense.model_id = target.model_id  # unfitted baselines still key their noise to the model
        return defense

    # the noise rows: keyed Laplace noise whose mean L1 on the defender's reference split matches
    # the served MemGuard's / PURIFIER's there (calibrated without looking at the evaluation records)
    reference = target.predict_proba(target.role("reference")[0]).astype(np.float64)
    noise_scales = {name: matched_noise_scale(
        reference, float(np.abs(d.transform(reference) - reference).sum(axis=1).mean()), secret, target.model_id)
        for name, d in fitted.items()}
    variants = [(name, v, d.with_budget(v)) for name, d in fitted.items() for v in d.knob.weakest_first(d.knob.grid)]
    for name in ("label_only", "top_k", "round"):
        variants += [(name, v, baseline(name).with_budget(v)) for v in defense_class(name).baseline_grid]
    variants += [("noise", scale, baseline("noise").with_budget(scale)) for scale in noise_scales.values()]
    config = AuditConfig(CONFIDENCE_ATTACKS, n_shadows=args.shadows, n_boot=20, seed=args.seed, progress=False)
    sweep = sweep_points(AuditData.from_target(target), InProcessTarget(target), variants, config)
    served = {"memguard": fitted["memguard"].epsilon, "purifier": fitted["purifier"].budget}
    noise_of = {scale: name for name, scale in noise_scales.items()}
    floor_auc = sweep.floor.auc.value

    def row(p):
        setting = p.label
        if p.defense == "noise":
            setting = f"laplace {p.setting:.4g} (L1 of {noise_of[p.setting]})"
        if p.defense in served and p.setting == served[p.defense]:
            setting += " (served default)"
        t = p.utility
        return [p.defense, setting, t.l1_nonmembers.mean, t.l1_nonmembers.p95, t.l1_members.mean,
                p.best_auc, p.best_tpr_1pct.value, floor_auc, t.brier.after, t.ece.after,
                "undefined" if t.true_class_rank_agreement is None else t.true_class_rank_agreement,
                t.distinct_fraction.after]

    u = sweep.undefended
    rows = [["undefended", "-", 0.0, 0.0, 0.0, u.best_auc, u.best_tpr_1pct.value, floor_auc,
             u.utility.brier.before, u.utility.ece.before, 1.0, u.utility.distinct_fraction.before]]
    rows += [row(p) for p in sweep.points]
    report = sweep.undefended_report
    path = write_result(f"privacy_utility_{args.dataset}", {
        "dataset": args.dataset, "model_id": target.model_id, "attacks": list(CONFIDENCE_ATTACKS),
        "n_shadows": args.shadows, "floor": sweep.floor.to_json(),
        "undefended": {"attacks": {n: a.to_json() for n, a in report.attacks.items()},
                       "gap_floor": report.gap_floor.to_json(), "point": u.to_json()},
        "points": [p.to_json() for p in sweep.points], "noise_scales": noise_scales,
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
        "tables": [{
            "title": f"Privacy against real-traffic utility on {args.dataset}: MemGuard, PURIFIER and the simple "
                     f"baselines ({report.n_members} + {report.n_nonmembers} evaluation records, "
                     f"{args.shadows} shadow models)",
            "columns": ["defense", "setting", "real-traffic L1 mean", "real-traffic L1 p95", "members L1 mean",
                        "best confidence AUC", "best TPR@1%FPR", f"label-only floor AUC ({sweep.floor.auc.attack})",
                        "Brier", "ECE", "true-class rank agreement", "distinct answers"],
            "rows": rows,
            "note": "Real-traffic L1 is measured on non-members, the members' figure beside it. Best confidence "
                    "AUC: the strongest of " + ", ".join(CONFIDENCE_ATTACKS) + " (thresholds and attack models "
                    "fitted once on shadow models; AUC is threshold-free); the floor is the strongest label-only "
                    "attack on the undefended answers, which no label-keeping defense can go below. Brier, ECE "
                    "(15 bins), rank agreement of the true-class probability (Spearman, undefined when the answers "
                    "are constant per class) and distinct answers per answer are on non-members. Noise rows: keyed "
                    "Laplace noise whose mean L1 on the reference split matches the served MemGuard / PURIFIER "
                    "there. In-process (no gRPC hop); the same defenses as served; `purifier.audit.sweep`, as "
                    "`purifier tune` runs it.",
        }],
    })
    print(f"wrote {path} in {time.perf_counter() - t0:.0f}s")
    for r in rows:
        print("  ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
