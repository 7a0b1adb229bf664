"""Audit reports: `report.json` (stable shape for other tools), `report.md`, `report.html` (the
page a privacy officer reads, `purifier.audit.html`), `roc.png`, and the table printed on stdout;
each leads with the same verdict lines (`purifier.audit.verdict`).

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


def tpr_cell(entry: dict) -> str:
    """'0.071 @0.0010/10000' (TPR @realized FPR/negatives), or 'not measurable (N neg.)': with
    fewer than 1/FPR non-members there is no figure to give."""
    if not entry["measurable"]:
        return f"not measurable ({entry['negatives']} neg.)"
    return f"{entry['tpr']:.3f} @{entry['fpr']:.4f}/{entry['negatives']}"


def _versus(value: float, floor: float | None) -> str:
    return "" if floor is None else f" ({value - floor:+.3f})"


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """One row per attack, each figure beside its difference from the label-only floor; an
    inverted attack (AUC interval below 0.5) also shows its flipped AUC."""
    header = ["attack", "family", "AUC [95% CI] (vs floor)", "TPR@1%FPR (vs floor)", "TPR@0.1%FPR (vs floor)",
              "bal.acc [95% CI]", "oracle b.a.", "queries", "s"]
    floor = report.get("label_only_floor") or {}
    f = {m: floor[m]["value"] if m in floor else None for m in ("auc", "0.01", "0.001")}
    rows = []
    for name, a in report["attacks"].items():
        ci_auc, ci_ba = a["ci95"]["auc"], a["ci95"]["balanced_accuracy"]
        auc = f"{a['auc']:.3f} [{ci_auc[0]:.3f}, {ci_auc[1]:.3f}]{_versus(a['auc'], f['auc'])}"
        if "inverted" in a:
            auc += f"; inverted, flipped {a['inverted']['auc']:.3f}"
        tprs = [tpr_cell(a["tpr_at_fpr"][k]) + (_versus(a["tpr_at_fpr"][k]["tpr"], f[k])
                                                 if a["tpr_at_fpr"][k]["measurable"] else "")
                for k in ("0.01", "0.001")]
        rows.append([name, a["family"], auc, *tprs, f"{a['balanced_accuracy']:.3f} [{ci_ba[0]:.3f}, {ci_ba[1]:.3f}]",
                     f"{a['oracle_balanced_accuracy']:.3f}", str(a["queries"]), f"{a['seconds']:.1f}"])
    return header, rows


def shadow_origin(shadows: dict) -> str:
    """Where the shadow models came from: "12 trained on ray (2 workers), 52 from the cache"."""
    if shadows.get("reused_from_earlier_audit"):
        return "reused from an earlier audit of the same records"
    ex = shadows.get("executor")
    if ex is None:
        return ""
    where = f"{ex['executor']} ({ex['workers']} workers)" if ex.get("workers") else ex["executor"]
    cache = shadows.get("cache", {})
    parts = [f"{shadows.get('trained', 0)} trained on {where}"]
    parts.append(f"{shadows.get('from_cache', 0)} from the cache" if cache.get("enabled") else "cache off")
    if cache.get("corrupt_retrained"):
        parts.append(f"{len(cache['corrupt_retrained'])} corrupt cache entries retrained")
    if shadows.get("retrained_for_label_queries"):
        parts.append(f"{len(shadows['retrained_for_label_queries'])} retrained here for label queries")
    return ", ".join(parts)


def floor_lines(report: dict) -> list[str]:
    """The label-only floor per metric, in one line each."""
    floor = report.get("label_only_floor")
    if floor is None:
        return ["label-only floor: no label-only attack was run"]
    auc = floor["auc"]
    lines = [f"label-only floor (strongest label-only attack per metric): AUC {auc['value']:.3f} "
             f"[{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}] ({auc['attack']})"]
    for key, words in (("0.01", "1%"), ("0.001", "0.1%")):
        lines.append(f"  TPR at {words} FPR: {tpr_cell(floor[key])} ({floor[key]['attack']})")
    return lines


def summary_lines(report: dict) -> list[str]:
    u, g = report["utility"], report["gap_floor"]
    lines = [
        f"dataset {report['dataset']}  defense {report['defense']}  "
        f"members {report['n_members']}  non-members {report['n_nonmembers']}  shadows {report['shadows']['n']}",
        f"utility: member acc {u['member_accuracy']:.4f}  non-member acc {u['nonmember_accuracy']:.4f}  "
        f"argmax agreement {_fmt(u['argmax_agreement'], 4)}  mean L1 {_fmt(u['mean_l1'], 4)}  "
        f"max L1 {_fmt(u['max_l1'], 4)}",
        f"gap attack (correctness): balanced accuracy {g['balanced_accuracy']:.4f}  AUC {g['auc']:.4f}",
        *floor_lines(report),
    ]
    origin = shadow_origin(report["shadows"])
    if origin:
        lines.append(f"shadow models: {origin}")
    if "output_utility" in report:
        l1 = report["output_utility"]["l1_nonmembers"]
        lines.append(f"real-traffic distortion (non-members): L1 mean {l1['mean']:.4f}  p95 {l1['p95']:.4f}  "
                     f"max {l1['max']:.4f}")
    if fallbacks := report["shadows"].get("fallbacks"):
        lines.append(f"too few shadow models for full strength: {', '.join(fallbacks)} fell back "
                     f"({next(iter(fallbacks.values()))}; more under Attack details)")
    t = report["timing_s"]
    lines.append(f"time: audit without boundary attack {t['audit_without_boundary']:.1f}s "
                 f"(shadow training {t['shadow_training']:.1f}s)"
                 + ("" if t["boundary_attack"] is None else f"; boundary attack {t['boundary_attack']:.1f}s"))
    return lines


def text_table(report: dict) -> str:
    """The summary lines, the attack table and its legend, as printed by `purifier audit`."""
    legend = ("TPR cells: tpr @realized-FPR/negatives; 'not measurable' = fewer non-members than 1/FPR. "
              "(vs floor): difference from the label-only floor. bal.acc uses the attack's shadow-fitted "
              "threshold; oracle b.a. sees the evaluation labels.")
    return "\n".join([*verdict_lines(report), "", *summary_lines(report), "", tables.text_table(*table_rows(report)),
                      "", legend])


def verdict_lines(report: dict) -> list[str]:
    """The verdict sentences (`purifier.audit.verdict`), headed by the endpoint's defense."""
    v = report.get("verdict")
    return [] if v is None else [f"verdict ({report['defense']}):", *(f"- {line}" for line in v["lines"])]


def markdown(report: dict) -> str:
    md = [f"# Membership inference audit: {report['dataset']}, defense `{report['defense']}`", ""]
    if report.get("verdict"):
        md += ["## Verdict", "", *(f"- {line}" for line in report["verdict"]["lines"]), "",
               "What this defense cannot protect:", "",
               *(f"- {line}" for line in report["verdict"]["cannot_protect"]), ""]
    md += assumptions_markdown(report.get("assumptions"))
    md += [f"- {line}" for line in summary_lines(report)]
    md += ["", tables.markdown_table(*table_rows(report))]
    md += ["", "TPR cells: `tpr @realized-FPR/negatives`; *not measurable*: the target FPR is below "
           "1/negatives, so there is no figure. *(vs floor)*: the difference from the label-only floor, the "
           "strongest label-only attack on that metric, which no label-keeping defense can push attacks below. "
           "`bal.acc` uses the attack's own threshold fitted on shadow models; `oracle b.a.` picks the best "
           "threshold on the evaluation membership (upper bound).", ""]
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


def best_roc(audit, label: str, label_only: bool | None = None):
    """The ROC of the audit's strongest attack by AUC (score negated when its signal is inverted)
    among all attacks (None), the label-only ones (True) or the others; None if there is none."""
    from purifier import evaluation as ev
    from purifier.audit.figures import RocCurve
    from purifier.audit.verdict import strongest

    b = strongest(audit.report["attacks"], "auc", label_only)
    if b is None:
        return None
    scores = audit.outcomes[b["attack"]].scores
    fpr, tpr, _ = ev.roc_curve(-scores if b["inverted"] else scores, audit.membership)
    return RocCurve(f"{label}: {b['attack']}" + (" (flipped)" if b["inverted"] else ""), fpr, tpr, b["value"])


def report_page(audit, undefended=None, tradeoff=()):
    """The `ReportPage` of a defended audit, beside the undefended audit of the same model if any."""
    from purifier.audit.html import ReportPage, Verdict
    from purifier.audit.verdict import strongest

    r = audit.report
    floor = r.get("label_only_floor")
    floor_attack = floor["auc"]["attack"] if floor else strongest(r["attacks"], "auc")["attack"]
    return ReportPage(r, Verdict.from_report(r), floor_attack, r.get("output_utility"),
                      None if undefended is None else undefended.report,
                      None if undefended is None else best_roc(undefended, "no defense"),
                      best_roc(audit, f"defense {r['defense']}"), best_roc(audit, "label-only floor", True),
                      tuple(tradeoff))


def write_report(audit, out: str | Path, undefended=None, tradeoff=()) -> Path:
    """Write report.json, report.md, report.html and roc.png into `out` atomically.

    undefended: the `Audit` of the same model without defense (report.html's "before" column and
    curve); tradeoff: `TradeoffPoint`s for report.html's privacy-utility picture."""
    from purifier.audit.html import render_html

    with atomic_directory(out) as tmp:
        write_json(tmp / "report.json", audit.report)
        (tmp / "report.md").write_text(markdown(audit.report))
        (tmp / "report.html").write_text(render_html(report_page(audit, undefended, tradeoff)), encoding="utf-8")
        plot_roc(audit, tmp / "roc.png")
    return Path(out)
