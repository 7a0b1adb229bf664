"""Audit reports: `report.json` (stable shape for other tools), `report.md`, `roc.png`, and the
table printed on stdout.

Honest reporting (Carlini et al. 2022): every TPR at a low FPR carries the FPR actually
realized and the number of negatives behind it, and is flagged when the target FPR is below
1/negatives; every attack sits next to the gap floor and the utility cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from purifier import tables
from purifier.artifacts import atomic_directory, write_json
from purifier.audit.assumptions import markdown_lines as assumptions_markdown


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _tpr_cell(entry: dict) -> str:
    cell = f"{entry['tpr']:.3f} @{entry['fpr']:.4f}/{entry['negatives']}"
    return cell + ("" if entry["measurable"] else " (n/m)")


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["attack", "family", "AUC [95% CI]", "bal.acc [95% CI]", "oracle b.a.", "floor b.a.",
              "TPR@0.1%FPR", "TPR@1%FPR", "queries", "s"]
    floor = report["gap_floor"]["balanced_accuracy"]
    rows = []
    for name, a in report["attacks"].items():
        ci_auc, ci_ba = a["ci95"]["auc"], a["ci95"]["balanced_accuracy"]
        rows.append([name, a["family"], f"{a['auc']:.3f} [{ci_auc[0]:.3f}, {ci_auc[1]:.3f}]",
                     f"{a['balanced_accuracy']:.3f} [{ci_ba[0]:.3f}, {ci_ba[1]:.3f}]",
                     f"{a['oracle_balanced_accuracy']:.3f}", f"{floor:.3f}",
                     _tpr_cell(a["tpr_at_fpr"]["0.001"]), _tpr_cell(a["tpr_at_fpr"]["0.01"]),
                     str(a["queries"]), f"{a['seconds']:.1f}"])
    return header, rows


def summary_lines(report: dict) -> list[str]:
    u, g = report["utility"], report["gap_floor"]
    lines = [
        f"dataset {report['dataset']}  defense {report['defense']}  "
        f"members {report['n_members']}  non-members {report['n_nonmembers']}  shadows {report['shadows']['n']}",
        f"utility: member acc {u['member_accuracy']:.4f}  non-member acc {u['nonmember_accuracy']:.4f}  "
        f"argmax agreement {_fmt(u['argmax_agreement'], 4)}  mean L1 {_fmt(u['mean_l1'], 4)}  "
        f"max L1 {_fmt(u['max_l1'], 4)}",
        f"gap floor (label-only, correctness): balanced accuracy {g['balanced_accuracy']:.4f}  AUC {g['auc']:.4f}",
    ]
    t = report["timing_s"]
    lines.append(f"time: audit without boundary attack {t['audit_without_boundary']:.1f}s "
                 f"(shadow training {t['shadow_training']:.1f}s)"
                 + ("" if t["boundary_attack"] is None else f"; boundary attack {t['boundary_attack']:.1f}s"))
    return lines


def text_table(report: dict) -> str:
    """The summary lines, the attack table and its legend, as printed by `purifier audit`."""
    legend = ("TPR cells: tpr @realized-FPR/negatives; (n/m) = not measurable with this many negatives. "
              "bal.acc uses the attack's shadow-fitted threshold; oracle b.a. sees the evaluation labels.")
    return "\n".join([*summary_lines(report), "", tables.text_table(*table_rows(report)), "", legend])


def markdown(report: dict) -> str:
    md = [f"# Membership inference audit: {report['dataset']}, defense `{report['defense']}`", ""]
    md += assumptions_markdown(report.get("assumptions"))
    md += [f"- {line}" for line in summary_lines(report)]
    md += ["", tables.markdown_table(*table_rows(report))]
    md += ["", "TPR cells: `tpr @realized-FPR/negatives`; *(n/m)*: the target FPR is below 1/negatives, so the "
           "value is the TPR at zero false positives. `bal.acc` uses the attack's own threshold fitted on "
           "shadow models; `oracle b.a.` picks the best threshold on the evaluation membership (upper bound). "
           "`floor b.a.` is the gap attack's balanced accuracy: no label-keeping defense goes below it.", ""]
    extra = {n: a["details"] for n, a in report["attacks"].items() if "details" in a}
    if extra:
        md += ["## Attack details", ""] + [f"- `{n}`: {d}" for n, d in extra.items()] + [""]
    md += ["![ROC curves](roc.png)", ""]
    return "\n".join(md)


def plot_roc(audit, path: Path) -> None:
    """Log-log ROC of every attack, with chance and the gap floor's operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from purifier import evaluation as ev

    m = audit.membership
    floor_fpr = 1.0 / (2 * int((~m).sum()))
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    grid = np.logspace(np.log10(floor_fpr), 0, 50)
    ax.plot(grid, grid, color="grey", ls=":", lw=1, label="chance")
    colors = plt.get_cmap("tab10").colors
    for i, (name, o) in enumerate(audit.outcomes.items()):
        fpr, tpr, _ = ev.roc_curve(o.scores, m)
        auc = audit.report["attacks"][name]["auc"]
        # more attacks than colours: the second ten are dashed
        ax.plot(np.maximum(fpr, floor_fpr), np.maximum(tpr, floor_fpr), lw=1.2, color=colors[i % 10],
                ls="-" if i < 10 else "--", label=f"{name} (AUC {auc:.3f})")
    gap = audit.outcomes.get("gap")
    if gap is not None:
        pred = gap.predicted
        ax.plot([max(pred[~m].mean(), floor_fpr)], [max(pred[m].mean(), floor_fpr)], "k*", ms=10,
                label="gap floor (point)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor_fpr, 1)
    ax.set_ylim(floor_fpr, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{audit.report['dataset']} / defense {audit.report['defense']}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(audit, out: str | Path) -> Path:
    """Write report.json, report.md and roc.png into `out` atomically."""
    with atomic_directory(out) as tmp:
        write_json(tmp / "report.json", audit.report)
        (tmp / "report.md").write_text(markdown(audit.report))
        plot_roc(audit, tmp / "roc.png")
    return Path(out)
