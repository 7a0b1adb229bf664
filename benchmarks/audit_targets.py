"""Full in-process audits of the undefended digits and mnist5k targets: the attack table and
how long it takes.

For each dataset: train (or reuse) the target, run every attack but the boundary attack with 4
shadow models, then the boundary attack on its own (time and queries reported separately), and
write benchmarks/results/audit_<dataset>.json plus the report directory under build/.

    .venv/bin/python benchmarks/audit_targets.py [--datasets digits mnist5k] [--shadows 4]
        [--boundary-budget 1000] [--boundary-records 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from purifier.attacks import DEFAULT_ATTACKS  # noqa: E402
from purifier.audit.report import text_table, write_report  # noqa: E402
from purifier.audit.results import Source  # noqa: E402
from purifier.audit.runner import AuditConfig, run_audit  # noqa: E402
from purifier.models.access import InProcessTarget  # noqa: E402
from purifier.models.target import Target, train_target  # noqa: E402

BUILD = Path(__file__).resolve().parents[1] / "build" / "bench"


def audit_table(name: str, payload: dict, report, boundary=None) -> dict:
    """The results table of one undefended audit (a `Report`): every attack next to the gap floor."""
    attacks = dict(report.attacks)
    if boundary is not None:
        attacks["label_boundary"] = boundary.attacks["label_boundary"]
    rows = []
    for attack, m in attacks.items():
        t = m.ranking.tpr_1pct
        rows.append([attack, m.family.value, m.ranking.auc, m.balanced_accuracy, m.oracle_balanced_accuracy,
                     f"{t.tpr:.3f} (fpr {t.fpr:.4f}, n={t.negatives})", m.queries])
    floor = report.gap_floor
    return {
        "title": f"Undefended {name} target: every attack ({report.n_members} members + "
                 f"{report.n_nonmembers} non-members, {payload['shadows']} shadow models)",
        "columns": ["attack", "family", "AUC", "bal.acc (own threshold)", "bal.acc (oracle)", "TPR@1%FPR",
                    "queries"],
        "rows": rows,
        "note": f"Gap floor: balanced accuracy {floor.balanced_accuracy:.4f}, AUC {floor.auc:.4f}. "
                f"Full audit without the boundary attack {payload['audit_wall_s']:.0f} s"
                + (f"; boundary attack {payload['boundary']['wall_s_including_shadows']:.0f} s" if "boundary" in payload
                   else "") + ". In-process queries; thresholds fitted on shadow models only.",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    ap.add_argument("--shadows", type=int, default=4)
    ap.add_argument("--boundary-budget", type=int, default=1000)
    ap.add_argument("--skip-boundary", action="store_true")
    args = ap.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        tdir = BUILD / f"target-{name}"
        t0 = time.perf_counter()
        if (tdir / "model.json").is_file():
            target = Target.load(tdir)
        else:
            target = train_target(name, tdir, seed=0)  # trains single-threaded itself
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        audit = run_audit(target, InProcessTarget(target), AuditConfig(DEFAULT_ATTACKS, n_shadows=args.shadows),
                          "none", source=Source("in-process"))
        full_s = time.perf_counter() - t0
        write_report(audit, BUILD / f"report-{name}")
        print(text_table(audit.report))
        payload = {"dataset": name, "target_train_or_load_s": round(train_s, 2), "audit_wall_s": round(full_s, 2),
                   "shadows": args.shadows, "report": audit.report.to_json()}
        b = None
        if not args.skip_boundary:
            t0 = time.perf_counter()
            b = run_audit(target, InProcessTarget(target),
                          AuditConfig(("gap", "label_boundary"), n_shadows=args.shadows,
                                      boundary_budget=args.boundary_budget), "none")
            payload["boundary"] = {"wall_s_including_shadows": round(time.perf_counter() - t0, 2),
                                   "attack": b.report.attacks["label_boundary"].to_json(),
                                   "gap_floor": b.report.gap_floor.to_json()}
            print(text_table(b.report))
        payload["tables"] = [audit_table(name, payload, audit.report, None if b is None else b.report)]
        print(f"wrote {write_result(f'audit_{name}', payload)}")


if __name__ == "__main__":
    main()
