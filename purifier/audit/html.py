"""`report.html`: the audit as one self-contained page that a privacy officer can read and sign.

The first screen answers three questions in plain words: what is protected, what is not, and
against which attacker (the verdict lines, computed once by the audit against the strongest
label-only attack, are inputs here); then four headline numbers before and after the defense,
beside the label-only floor; then what this defense cannot protect. The details follow: the ROC
and privacy-utility pictures (`purifier.audit.figures`), every attack, the cost to users measured
on non-members (`purifier.evaluation.output_utility`), and how the audit was run.

Self-contained: styles inline, pictures as inline SVG with embedded glyphs, no script, nothing
fetched over the network. Honest reporting as in `report.md`: every TPR at a low FPR carries the
FPR realized and the number of non-members behind it (Carlini et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

import numpy as np

from purifier.audit.figures import RocCurve, TradeoffPoint, roc_figure, to_svg, tradeoff_figure
from purifier.audit.results import FPR_TARGETS, TPR_METRICS, Best, Metric, Report, Tpr
from purifier.evaluation import OutputUtility
from purifier.tables import html_table

STYLE = """
body{font-family:system-ui,"DejaVu Sans",Arial,sans-serif;color:#1b1b1b;max-width:1180px;margin:0 auto;
padding:14px 24px;line-height:1.4;font-size:15px}
h1{font-size:23px;margin:4px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#555;margin:0 0 10px;font-size:13px}
.verdict{background:#eaf2fb;border-left:6px solid #1f6fb2;padding:8px 16px;margin:8px 0 12px}
.verdict p{margin:5px 0}
table{border-collapse:collapse;margin:6px 0 10px;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
table.headline{width:100%}table.headline td:first-child{width:40%}
table.headline td{font-variant-numeric:tabular-nums}
table.headline td:not(:first-child){font-size:17px}
td small{color:#555;font-size:12px;line-height:1.25;display:inline-block}
.cannot{background:#fdf1e7;border-left:6px solid #e67e22;padding:6px 16px;margin:8px 0}
.cannot h2{border:0;margin:4px 0}.cannot ul{margin:4px 0 6px}
.small{color:#555;font-size:13px}svg{max-width:100%;height:auto}
"""


@dataclass(frozen=True)
class ReportPage:
    """Everything the page shows: the `Report` (with its `baseline`, the undefended model's report
    on the same records, when audited) and the audited settings of this and other defenses for the
    privacy-utility picture (one marked served)."""

    report: Report
    tradeoff: tuple[TradeoffPoint, ...] = ()

    @property
    def before(self) -> Report | None:
        return self.report if self.report.undefended else self.report.baseline

    def columns(self) -> list[tuple[str, Report | None, bool | None]]:
        """(header, report, label_only) per figure column: before, after (a defended report's own
        column), the label-only floor."""
        r = self.report
        if r.undefended:
            return [("Undefended", r, None), ("Label-only floor", r, True)]
        return [("Without defense", r.baseline, None), (f"With {defense_words(r)}", r, None),
                ("Label-only floor", r, True)]


def defense_words(r: Report) -> str:
    """The audited endpoint's defense as a column header says it: "memguard", "the endpoint's defense"."""
    if r.undefended:
        return "no defense"
    return "the endpoint's defense" if r.defense == "unknown" else r.defense


def title(r: Report) -> str:
    """What was audited, for titles: "digits, undefended", "digits, defense memguard", "..., defense not named"."""
    what = "undefended" if r.undefended else "defense not named" if r.defense == "unknown" else f"defense {r.defense}"
    return f"{r.source.model_name or r.dataset}, {what}"


def _best(report: Report, metric: Metric, label_only: bool | None = None) -> Best | None:
    strongest = report.strongest(label_only)
    return None if strongest is None else strongest.of(metric)


def _auc_cell(report: Report | None, label_only: bool | None = None) -> tuple[str, str] | str:
    if report is None:
        return "not audited", "audit with --baseline (the undefended endpoint, or its earlier report)"
    b = _best(report, Metric.AUC, label_only)
    if b is None:
        return "no such attack run"
    return f"{b.value:.3f}", f"attack: {b.attack}" + (" (score flipped)" if b.flipped else "")


def _tpr_text(t: Tpr, value: float | None = None) -> tuple[str, str]:
    """(share of members found, what it was measured at); no number when not measurable."""
    if not t.measurable:
        return "not measurable", f"{t.negatives} non-members are too few for this false-positive rate"
    return (f"{100 * (t.tpr if value is None else value):.1f}%",
            f"at {100 * t.fpr:.2f}% false positives, {t.negatives} non-members")


def _tpr_cell(report: Report | None, metric: Metric, label_only: bool | None = None) -> tuple[str, str] | str:
    if report is None:
        return "not audited", "audit with --baseline"
    b = _best(report, metric, label_only)
    if b is None:
        return "no such attack run"
    value, where = _tpr_text(b.rate, b.value)
    return value, f"{where}; attack: {b.attack}"


def headline_rows(page: ReportPage) -> list[list]:
    """The headline numbers per column (before, after, the label-only floor: the strongest
    label-only attack per metric). Cells are text or (text, note) pairs."""
    columns = page.columns()
    rows = [[("Best attack AUC", "How well the strongest attack tells training records from others: "
                                 "0.5 is a coin flip, 1 is certainty."),
             *(_auc_cell(rep, flag) for _, rep, flag in columns)]]
    for metric, fpr, words in zip(TPR_METRICS, FPR_TARGETS, ("1 in 100", "1 in 1,000"), strict=True):
        rows.append([(f"Members found at {100 * fpr:g}% false positives",
                      f"Share of training records the strongest attack exposes while wrongly accusing {words} "
                      "people who were not in the training set."),
                     *(_tpr_cell(rep, metric, flag) for _, rep, flag in columns)])
    cost = page.report.utility.cost
    if not page.report.undefended:
        rows.append([("Real-traffic distortion (mean L1, non-members)",
                      "How much the confidence scores that ordinary users (non-members) receive change: "
                      "0 = unchanged, 2 = completely different. The predicted label never changes."),
                     "0", ("not measured", "audit with --baseline to compare with the undefended answers")
                     if cost is None else
                     (f"{cost.l1_nonmembers.mean:.3f}", f"95% of answers move at most {cost.l1_nonmembers.p95:.3f}, "
                      f"the worst {cost.l1_nonmembers.max:.3f}"
                      + ("" if cost.l1_members is None else
                         f"; training members move {cost.l1_members.mean:.3f} on average")),
                     ("n/a", "needs no change to the scores")])
    return rows


def _utility_rows(page: ReportPage) -> list[list[str]]:
    u, acc = page.report.utility.cost, page.report.utility
    accuracy = ["accuracy on members / non-members", "", f"{acc.member_accuracy:.4f} / {acc.nonmember_accuracy:.4f}"]
    if u is None:
        return [accuracy]
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    l1 = lambda d: "-" if d is None else f"{d.mean:.4f} / {d.p95:.4f} / {d.max:.4f} (n={d.n})"  # noqa: E731
    rows = [["label unchanged (argmax agreement)", "1", f(u.argmax_agreement)],
            ["L1 change, non-members (real traffic): mean / p95 / max", "0", l1(u.l1_nonmembers)],
            ["L1 change, training members: mean / p95 / max", "0", l1(u.l1_members)],
            ["Brier score (lower is better)", f(u.brier.before), f(u.brier.after)],
            ["expected calibration error (lower is better)", f(u.ece.before), f(u.ece.after)]]
    if u.auroc is not None:
        rows.append(["diagnostic AUROC of the class-1 score (2 classes)", f(u.auroc.before), f(u.auroc.after)])
    rows += [["rank agreement of the true-class score (Spearman)", "1", f(u.true_class_rank_agreement)],
             ["distinct answers / answers", f(u.distinct_fraction.before), f(u.distinct_fraction.after)], accuracy]
    return rows


def _attack_rows(page: ReportPage) -> list[list]:
    before = {} if page.report.baseline is None else page.report.baseline.attacks
    rows = []
    for name, a in page.report.attacks.items():
        r = a.ranking
        lo, hi = r.auc_ci95
        after = f"{r.auc:.3f} [{lo:.3f}, {hi:.3f}]" + (
            f"; below a coin flip, flipped: {a.flipped.auc:.3f}" if a.flipped is not None else "")
        rows.append([name, a.family.value, f"{before[name].ranking.auc:.3f}" if name in before else "-",
                     after, _tpr_text(r.tpr_1pct), _tpr_text(r.tpr_01pct), str(a.queries)])
    return rows


def _setup_items(r: Report) -> list[str]:
    s, t = r.shadows, r.timing
    model = f"model {r.model_id[:16]}..." if r.model_id else "model identity unknown (an endpoint)"
    items = [f"Dataset {r.dataset}; {model}; {r.n_members} training members and "
             f"{r.n_nonmembers} non-members evaluated.",
             f"Attacker: {s.n} shadow models ({s.described}) trained on its own "
             f"pool of {s.pool_size} records; thresholds fitted on shadow models only."
             + (f" Shadows: {origin}." if (origin := s.origin()) else ""),
             f"Time: {t.audit_without_boundary:.0f} s (shadow training {t.shadow_training:.0f} s)."]
    if r.source.endpoint:
        items.insert(1, f"Audited through the endpoint {r.source.endpoint} (model {r.source.model_name or '?'}).")
    if r.baseline is not None:
        b = r.baseline
        same = (b.shadows.n, b.shadows.recipe, b.shadows.seed) == (s.n, s.recipe, s.seed)
        items.insert(2, f"Without defense: the undefended model ({b.source.endpoint or r.source.baseline_endpoint}), "
                        "the same records" + (", attacks and shadow models" if same else
                                              f"; its attacker had {b.shadows.n} shadow models ({b.shadows.recipe}, "
                                              f"seed {b.shadows.seed})") + ".")
    warnings = [f"Warning: {w}" for w in (r.assumptions.warnings if r.assumptions else ())]
    return items + warnings + list(r.notes)


def _curve(report: Report, b: Best | None, role: str, column: str, points=()) -> RocCurve | None:
    if b is None or (pts := report.curves.get(b.attack)) is None:
        return None
    return RocCurve(f"{column}: {b.label}", np.asarray(pts.fpr), np.asarray(pts.tpr), role, tuple(points))


def roc_curves(page: ReportPage) -> tuple[list[RocCurve], list[RocCurve]]:
    """(whole, corner): per column, the curve of the attack behind its AUC figure, and the curve
    behind its lowest measurable TPR figure with every headline TPR point marked, so the picture
    shows the attacks the table names."""
    roles = {"Undefended": "before", "Without defense": "before", "Label-only floor": "floor"}
    whole, corner = [], []
    for header, rep, flag in page.columns():
        if rep is None:
            continue
        role = roles.get(header, "after")
        column = "label-only floor" if role == "floor" else header.lower()
        auc = _best(rep, Metric.AUC, flag)
        if (c := _curve(rep, auc, role, f"{column}, AUC {auc.value:.3f}" if auc else column)) is not None:
            whole.append(c)
        tprs = [b for m in TPR_METRICS if (b := _best(rep, m, flag)) is not None and b.measurable]
        if not tprs:
            continue
        points = [(b.rate.fpr, b.value, f"{column}: {b.label}, {100 * b.value:.1f}% at {100 * b.rate.fpr:.2f}% FPR")
                  for b in tprs]
        if (c := _curve(rep, tprs[-1], role, column, points)) is not None:
            corner.append(c)
    order = {"before": 0, "after": 1, "floor": 2}  # the floor drawn last: visible on top of an equal curve
    return sorted(whole, key=lambda c: order[c.role]), sorted(corner, key=lambda c: order[c.role])


def _figures(page: ReportPage) -> str:
    parts = []
    whole, corner = roc_curves(page)
    if whole:
        fig = roc_figure(whole, corner, page.report.n_nonmembers)
        parts.append("<h3>The attacks behind the headline figures, before and after, against the label-only floor</h3>"
                     + to_svg(fig))
    if page.tradeoff:
        before = None if page.before is None else _best(page.before, Metric.AUC)
        floor = _best(page.report, Metric.AUC, label_only=True)
        fig = tradeoff_figure(page.tradeoff, None if floor is None else floor.value,
                              None if before is None else before.value)
        parts.append("<h3>Privacy against the cost to real users, for this defense and the simple "
                     "alternatives</h3>" + to_svg(fig))
    return "\n".join(parts)


def render_html(page: ReportPage) -> str:
    """The whole page as one string (UTF-8 HTML5)."""
    r, v = page.report, page.report.verdict
    assert v is not None  # an assembled report has its verdict
    heading = f"Privacy audit: {title(r)}"
    e = escape
    cannot = "".join(f"<li>{e(line)}</li>" for line in v.cannot_protect)
    header = ["", *(h for h, _, _ in page.columns())]
    body = [
        f"<h1>{e(heading)}</h1>",
        f'<p class="sub">Membership inference audit: can an outsider tell whether a person\'s record was used '
        f"to train this model? Dataset {e(r.dataset)}, {r.n_members} members and {r.n_nonmembers} "
        "non-members evaluated.</p>",
        '<section class="verdict">',
        f"<p><strong>Protected:</strong> {e(v.protected)}</p>",
        f"<p><strong>Not protected:</strong> {e(v.not_protected)}</p>",
        f"<p><strong>Against:</strong> {e(v.attacker)}</p>",
        *(f'<p class="small">{e(note)}</p>' for note in v.notes),
        "</section>",
        html_table(header, headline_rows(page), "headline"),
        '<p class="small">Inverted signals (an attack that scores members lower) are counted flipped, as an '
        "attacker would use them; \"not measurable\": too few non-members for that false-positive rate.</p>",
        f'<section class="cannot"><h2>What this defense cannot protect</h2><ul>{cannot}</ul></section>',
        "<h2>Pictures</h2>", _figures(page),
        "<h2>Every attack</h2>",
        html_table(["attack", "family", "AUC before", "AUC after [95% CI]", "members found at 1% FP",
                    "members found at 0.1% FP", "queries"], _attack_rows(page)),
        "<h2>Cost to users</h2>",
        f"<p class=\"small\">{e(OutputUtility.POPULATION if r.utility.cost else 'no undefended answers to compare with')}.</p>",
        html_table(["measure", "before", "after"], _utility_rows(page)),
        "<h2>How the audit was run</h2>",
        "<ul>" + "".join(f"<li>{e(item)}</li>" for item in _setup_items(r)) + "</ul>",
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{e(heading)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
