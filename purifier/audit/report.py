"""Audit reports: `report.json` (`Report.to_json`, schema-versioned), `report.md`, `report.html` (the
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
from purifier.audit.html import ReportPage, headline_rows, title
from purifier.audit.results import TPR_METRICS, Best, Report, Tpr


def tpr_cell(t: Tpr, value: float | None = None) -> str:
    """'0.071 @0.0010/10000' (TPR @realized FPR/negatives), or 'not measurable (N neg.)': with
    fewer than 1/FPR non-members there is no figure to give."""
    if not t.measurable:
        return f"not measurable ({t.negatives} neg.)"
    return f"{t.tpr if value is None else value:.3f} @{t.fpr:.4f}/{t.negatives}"


def _versus(value: float, floor: Best | None) -> str:
    return "" if floor is None else f" ({value - floor.value:+.3f})"


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """One row per attack, each figure beside its difference from the label-only floor; an
    inverted attack (AUC interval below 0.5) also shows its flipped AUC."""
    header = ["attack", "family", "AUC [95% CI] (vs floor)", "TPR@1%FPR (vs floor)", "TPR@0.1%FPR (vs floor)",
              "bal.acc [95% CI]", "oracle b.a.", "queries", "s"]
    floor = report.label_only_floor
    rows = []
    for name, a in report.attacks.items():
        r = a.ranking
        (lo, hi), (blo, bhi) = r.auc_ci95, a.balanced_accuracy_ci95
        auc = f"{r.auc:.3f} [{lo:.3f}, {hi:.3f}]{_versus(r.auc, None if floor is None else floor.auc)}"
        if a.flipped is not None:
            auc += f"; inverted, flipped {a.flipped.auc:.3f}"
        tprs = [tpr_cell(r.tpr(m)) + (_versus(r.value(m), None if floor is None else floor.of(m)) if r.tpr(m).measurable else "")
                for m in TPR_METRICS]
        rows.append([name, a.family.value, auc, *tprs, f"{a.balanced_accuracy:.3f} [{blo:.3f}, {bhi:.3f}]",
                     f"{a.oracle_balanced_accuracy:.3f}", str(a.queries), f"{a.seconds:.1f}"])
    return header, rows


def floor_lines(report: Report) -> list[str]:
    """The label-only floor per metric, in one line each."""
    floor = report.label_only_floor
    if floor is None:
        return ["label-only floor: no label-only attack was run"]
    auc = floor.auc
    lines = [f"label-only floor (strongest label-only attack per metric): AUC {auc.value:.3f} "
             f"[{auc.ci95[0]:.3f}, {auc.ci95[1]:.3f}] ({auc.attack})"]
    for metric, words in zip(TPR_METRICS, ("1%", "0.1%"), strict=True):
        b = floor.of(metric)
        lines.append(f"  TPR at {words} FPR: {tpr_cell(b.rate, b.value)} ({b.attack})")
    return lines


def summary_lines(report: Report) -> list[str]:
    u, g, s = report.utility, report.gap_floor, report.shadows
    lines = [
        f"dataset {report.dataset}  defense {report.defense if not report.undefended else 'none (undefended)'}  "
        f"members {report.n_members}  non-members {report.n_nonmembers}  shadows {s.n}",
        f"utility: member acc {u.member_accuracy:.4f}  non-member acc {u.nonmember_accuracy:.4f}"
        + ("" if u.cost is None else f"  argmax agreement {u.cost.argmax_agreement:.4f}"),
        f"gap attack (correctness): balanced accuracy {g.balanced_accuracy:.4f}  AUC {g.auc:.4f}",
        *floor_lines(report),
    ]
    if origin := s.origin():
        lines.append(f"shadow models: {origin}")
    if u.cost is not None:
        lines.append(distortion_line(u.cost))
    t = report.timing
    lines.append(f"time: audit without boundary attack {t.audit_without_boundary:.1f}s "
                 f"(shadow training {t.shadow_training:.1f}s)"
                 + ("" if t.boundary_attack is None else f"; boundary attack {t.boundary_attack:.1f}s"))
    return lines


def distortion_line(cost) -> str:
    """The confidence vectors' change, real traffic (non-members) first, members beside it."""
    n, m = cost.l1_nonmembers, cost.l1_members
    line = f"real-traffic distortion (non-members): L1 mean {n.mean:.4f}  p95 {n.p95:.4f}  max {n.max:.4f}"
    return line + ("" if m is None else f"; members: L1 mean {m.mean:.4f}")


def headline_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """report.html's headline numbers (before, after, floor) as plain cells."""
    page = ReportPage(report)

    def flat(cell) -> str:
        return cell if isinstance(cell, str) else f"{cell[0]} ({cell[1]})"

    return ["", *(h for h, _, _ in page.columns())], [[flat(row[0][0]), *map(flat, row[1:])]
                                                     for row in headline_rows(page)]


def text_table(report: Report) -> str:
    """The verdict, the headline figures, the summary lines, the attack table and its legend, as
    printed by `purifier audit`."""
    legend = ("TPR cells: tpr @realized-FPR/negatives; 'not measurable' = fewer non-members than 1/FPR. "
              "(vs floor): difference from the label-only floor. bal.acc uses the attack's shadow-fitted "
              "threshold; oracle b.a. sees the evaluation labels.")
    return "\n".join([*verdict_lines(report), "", tables.text_table(*headline_table(report)), "",
                      *summary_lines(report), "", tables.text_table(*table_rows(report)), "", legend])


def verdict_lines(report: Report) -> list[str]:
    """The verdict sentences (`purifier.audit.verdict`), headed by what was audited."""
    v = report.verdict
    head = "verdict" + (" (provisional)" if v is not None and v.provisional else "")
    return [] if v is None else [f"{head}, {title(report)}:", *(f"- {line}" for line in v.lines)]


def markdown(report: Report) -> str:
    """report.md; what came from outside (the endpoint's names, the records' name) shows as the
    characters it is (`purifier.untrusted.markdown_text`)."""
    from dataclasses import fields, replace

    from purifier.untrusted import markdown_text

    source = replace(report.source, **{f.name: markdown_text(v) for f in fields(report.source)
                                       if isinstance(v := getattr(report.source, f.name), str)})
    report = replace(report, dataset=markdown_text(report.dataset), source=source)
    md = [f"# Membership inference audit: {title(report)}", ""]
    if report.verdict is not None:
        md += ["## Verdict" + (" (provisional)" if report.verdict.provisional else ""), "",
               *(f"- {line}" for line in report.verdict.lines), "",
               tables.markdown_table(*headline_table(report)), "",
               "What this defense cannot protect:", "",
               *(f"- {line}" for line in report.verdict.cannot_protect), ""]
    md += assumptions_markdown(report.assumptions)
    md += [f"- {line}" for line in summary_lines(report)]
    md += ["", tables.markdown_table(*table_rows(report))]
    md += ["", "TPR cells: `tpr @realized-FPR/negatives`; *not measurable*: the target FPR is below "
           "1/negatives, so there is no figure. *(vs floor)*: the difference from the label-only floor, the "
           "strongest label-only attack on that metric, which no label-keeping defense can push attacks below. "
           "`bal.acc` uses the attack's own threshold fitted on shadow models; `oracle b.a.` picks the best "
           "threshold on the evaluation membership (upper bound).", ""]
    extra = {n: a.details for n, a in report.attacks.items() if a.details}
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

    m, report = audit.membership, audit.report
    floor_fpr = 1.0 / (2 * int((~m).sum()))
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    grid = np.logspace(np.log10(floor_fpr), 0, 50)
    ax.plot(grid, grid, color="grey", ls=":", lw=1, label="chance")
    colors = plt.get_cmap("tab10")(np.arange(10))
    for i, (name, o) in enumerate(audit.outcomes.items()):
        fpr, tpr, _ = ev.roc_curve(o.scores, m)
        # more attacks than colours: the second ten are dashed
        ax.plot(np.maximum(fpr, floor_fpr), np.maximum(tpr, floor_fpr), lw=1.2, color=colors[i % 10],
                ls="-" if i < 10 else "--", label=f"{name} (AUC {report.attacks[name].ranking.auc:.3f})")
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
    ax.set_title(f"{report.dataset} / defense {report.defense}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(audit, out: str | Path, tradeoff=()) -> Path:
    """Write report.json, report.md, report.html and roc.png into `out` atomically.

    The "before" column and curves come from the report's own `baseline`; tradeoff:
    `TradeoffPoint`s for report.html's privacy-utility picture."""
    from purifier.audit.html import render_html

    with atomic_directory(out) as tmp:
        write_json(tmp / "report.json", audit.report.to_json())
        (tmp / "report.md").write_text(markdown(audit.report))
        (tmp / "report.html").write_text(render_html(ReportPage(audit.report, tuple(tradeoff))), encoding="utf-8")
        plot_roc(audit, tmp / "roc.png")
    return Path(out)
