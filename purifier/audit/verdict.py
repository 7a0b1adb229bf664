"""The audit's verdict: the label-only floor, the attacks' coverage, inverted signals, and what a
defense achieved, in words.

A defense that keeps the predicted label cannot hide what the label itself reveals, so the
honest yardstick is the *strongest* label-only attack, per metric (Yeom et al. 2018; Choquette-
Choo et al., ICML 2021; with difficulty calibration, Watson et al., ICLR 2022): the best of gap,
calibrated, augmentation and boundary attacks on AUC, on TPR at 1% FPR and on TPR at 0.1% FPR
(Carlini et al. 2022 ask for the low-FPR figures). The rule:

* "confidence leakage removed" only when the best other attack lies within the floor's 95%
  interval on each of AUC, TPR at 1% FPR and TPR at 0.1% FPR (a TPR criterion is skipped, and
  said so, when too few non-members make it unmeasurable), and every family in `REQUIRED` ran:
  confidence attacks, adaptive ones (for a defended endpoint) and the label-only gap, calibrated
  and augmentation attacks. Within the floor with a family missing, the verdict is provisional
  and names what is missing; above it on any criterion, leakage remains whatever else ran.
* a record-level sentence (members found at 0.1% false positives) only from attacks that beat
  chance: an AUC interval above 0.5, or a TPR interval at 0.1% FPR above the FPR realized.
* an attack whose AUC interval lies below 0.5 found a real signal with the wrong sign; an
  attacker flips it, so its flipped figures (`AttackResult.flipped`) count.

Everything here reads the typed `Report` only, so report.md, report.html and the demo print the
same sentences.
"""

from __future__ import annotations

from purifier.attacks.base import Coverage
from purifier.attacks.shadow import DEFAULT_SHADOWS, QUICK_SHADOWS
from purifier.audit.results import AttackResult, Best, Metric, Report, Strongest, Verdict

# the attack families a "removed" verdict needs (adaptive only where there is a defense to adapt to)
REQUIRED = (Coverage.CONFIDENCE, Coverage.ADAPTIVE, Coverage.LABEL_GAP, Coverage.LABEL_CALIBRATED,
            Coverage.LABEL_AUGMENTATION)
WORDS = {Coverage.CONFIDENCE: "confidence", Coverage.ADAPTIVE: "adaptive (needs --defense-name)",
         Coverage.LABEL_GAP: "label-only gap", Coverage.LABEL_CALIBRATED: "label-only calibrated",
         Coverage.LABEL_AUGMENTATION: "label-only augmentation"}
# members' and non-members' mean L1 change this far apart (and the larger at least this large):
# the distortion itself separates them
ASYMMETRY_RATIO, ASYMMETRY_MIN_L1 = 3.0, 0.05


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _words(b: Best) -> str:
    """'7.1% of members (realized FPR 0.10%, 10,000 non-members)' or 'not measurable ...'."""
    t = b.rate
    if not t.measurable:
        return f"not measurable with {t.negatives:,} non-members"
    return f"{_pct(b.value)} of members (realized FPR {100 * t.fpr:.2f}%, {t.negatives:,} non-members)"


def within(best: Best, floor: Best) -> bool | None:
    """best's value is no higher than the top of floor's 95% interval; None when not measurable."""
    if not best.measurable or not floor.measurable:
        return None
    return best.value <= floor.ci95[1]


def required(report: Report) -> tuple[Coverage, ...]:
    return tuple(c for c in REQUIRED if not (c == Coverage.ADAPTIVE and report.undefended))


def missing_families(report: Report) -> tuple[Coverage, ...]:
    ran = {a.coverage for a in report.attacks.values()}
    return tuple(c for c in required(report) if c not in ran)


def above_chance(a: AttackResult) -> bool:
    """The attack tells members apart better than a coin flip: its AUC interval (as an attacker
    uses it) lies above 0.5, or its TPR interval at 0.1% FPR lies above the FPR realized."""
    r = a.attacker
    t = r.tpr_01pct
    return r.auc_ci95[0] > 0.5 or (t.measurable and t.ci95 is not None and t.ci95[0] > t.fpr)


def shadow_advice(report: Report) -> str | None:
    """The one sentence about attacks that ran weaker for want of shadow models."""
    fallbacks = report.shadows.fallbacks
    if not fallbacks:
        return None
    return (f"Too few shadow models for full strength: with {report.shadows.n}, {', '.join(fallbacks)} ran a weaker "
            f"variant ({next(iter(fallbacks.values()))}); more shadow models run them at full strength (--shadows; "
            f"the default is {DEFAULT_SHADOWS}, --quick uses {QUICK_SHADOWS}).")


def inverted_lines(attacks: dict[str, AttackResult]) -> list[str]:
    lines = []
    for name, a in attacks.items():
        if a.flipped is not None:
            lo, hi = a.ranking.auc_ci95
            lines.append(f"Inverted signal: {name} scores AUC {a.ranking.auc:.3f} [{lo:.3f}, {hi:.3f}], below a coin "
                         f"flip; an attacker who flips its score gets AUC {a.flipped.auc:.3f}, counted so.")
    return lines


def asymmetry_line(report: Report) -> str | None:
    """Flagged when the defense moves members' and non-members' vectors by very different amounts."""
    cost = report.utility.cost
    if cost is None or cost.l1_members is None:
        return None
    m, n = cost.l1_members.mean, cost.l1_nonmembers.mean
    if max(m, n) < ASYMMETRY_MIN_L1 or max(m, n) < ASYMMETRY_RATIO * min(m, n):
        return None
    return (f"Distortion asymmetry: the defense moves members' confidence vectors by {m:.3f} and non-members' by "
            f"{n:.3f} (mean L1); the size of the change itself tells them apart, which an attack that reads it "
            "(an inverted or adaptive one) can use.")


def missing_before(report: Report) -> list[str]:
    """What a defended report lacks without the undefended model beside it."""
    if report.baseline is None:
        return ["No undefended baseline was audited: the \"before\" figures and curves and the cost to users are "
                "missing; audit with --baseline HOST:PORT (the undefended endpoint: the same attacks and shadow "
                "models run against both) or --baseline DIR (its earlier report on the same records)."]
    out = []
    b, s = report.baseline.shadows, report.shadows
    if (b.n, b.recipe, b.seed) != (s.n, s.recipe, s.seed):
        out.append(f"The \"before\" comes from another attacker: {b.n} shadow models ({b.recipe}, seed {b.seed}) "
                   f"against this audit's {s.n} ({s.recipe}, seed {s.seed}); compare the columns with care.")
    if report.utility.cost is None:
        out.append("The undefended model was given as an earlier report, not as an endpoint: the cost to users (the "
                   "change of their confidence vectors) is not measured; --baseline HOST:PORT measures it.")
    return out


def _criteria_words(best: Strongest, floor: Strongest, checks: dict[Metric, bool | None]) -> list[str]:
    out = []
    for metric, ok in checks.items():
        if ok is not False:
            continue
        b, f = best.of(metric), floor.of(metric)
        if metric == Metric.AUC:
            out.append(f"AUC {b.value:.3f} ({b.label}) against the floor's {f.value:.3f} ({f.label}; "
                       f"+{b.value - f.value:.3f})")
        else:
            words = "1%" if metric == Metric.TPR_1PCT else "0.1%"
            out.append(f"{_pct(b.value)} of members found at {words} false positives ({b.label}) against "
                       f"{_pct(f.value)} ({f.label})")
    return out


def _skipped(checks: dict[Metric, bool | None], floor: Strongest) -> str:
    gone = [m for m, ok in checks.items() if ok is None]
    if not gone:
        return ""
    return (" " + " and ".join(m.words for m in gone) + f" not judged: not measurable with "
            f"{floor.tpr_1pct.rate.negatives:,} non-members.")


def criteria(report: Report) -> dict[Metric, bool | None]:
    """Per metric: the strongest non-label attack within the floor's 95% interval (True), above it
    (False), or not judged (None: not measurable); empty without a floor or another attack."""
    floor, best = report.label_only_floor, report.strongest(label_only=False)
    if floor is None or best is None:
        return {}
    return {m: within(best.of(m), floor.of(m)) for m in Metric}


def _confidence_sentence(report: Report, missing: tuple[Coverage, ...],
                         checks: dict[Metric, bool | None]) -> tuple[str, bool | None]:
    """(the sentence on confidence leakage, removed: True / False / None = undecided)."""
    floor, best = report.label_only_floor, report.strongest(label_only=False)
    if floor is None:
        return "No label-only attack was run, so nothing says what the label alone reveals.", None
    if best is None:
        return "Only label-only attacks were run: the confidence scores were not tested.", None
    above = _criteria_words(best, floor, checks)
    if above:
        first = next(m for m, ok in checks.items() if ok is False)
        state = "present" if report.undefended else "remains"
        return (f"Confidence leakage {state}: {best.of(first).label} leaks more than the predicted label alone: "
                + "; ".join(above) + "."), False
    b, f = best.auc, floor.auc
    figures = (f"the strongest attacks on the scores reach AUC {b.value:.3f} ({b.label}), find "
               f"{_words(best.tpr_1pct)} at 1% false positives ({best.tpr_1pct.label}) and {_words(best.tpr_01pct)} "
               f"at 0.1% ({best.tpr_01pct.label}), within the 95% intervals of the label-only floor (AUC "
               f"{f.value:.3f} [{f.ci95[0]:.3f}, {f.ci95[1]:.3f}] by {f.attack}).") + _skipped(checks, floor)
    if missing:
        return (f"Provisional: {figures} Not shown to be removed: the "
                f"{', '.join(WORDS[c] for c in missing)} attacks were not run."), None
    if report.undefended:
        return f"No confidence leakage beyond the label: {figures}", True
    return f"Confidence leakage removed: {figures}", True


def _record_sentence(report: Report) -> str | None:
    """Members found at 0.1% false positives by the strongest attack that beats chance."""
    if not report.attacks:
        return None
    real = [a for a in report.attacks.values() if above_chance(a)]
    if not real:
        return ("No attack in this audit beats a coin flip (every AUC 95% interval reaches 0.5, and no TPR at 0.1% "
                "false positives lies above it): no record-level exposure was found by the attacks run.")
    strongest = Strongest.among(real)
    assert strongest is not None  # among attacks, not none
    top = strongest.tpr_01pct
    if not top.measurable:
        return (f"Record-level exposure (members found at 0.1% false positives) is not measurable with "
                f"{top.rate.negatives:,} non-members: it needs at least 1,000.")
    line = (f"Record-level exposure remains: the strongest attack ({top.label}) finds {_words(top)} at 0.1% "
            "false positives")
    label = Strongest.among(a for a in real if a.label_only)
    if label is not None and label.tpr_01pct.measurable:
        line += f"; the label alone ({label.tpr_01pct.label}) finds {_pct(label.tpr_01pct.value)}"
    return line + ". A defense that keeps the predicted label cannot remove what the label reveals."


def verdict(report: Report) -> Verdict:
    """The verdict of one audited endpoint, from its report (the `verdict` field is not read)."""
    attacks, defense = report.attacks, report.defense
    floor = report.label_only_floor
    missing = missing_families(report)
    checks = criteria(report)
    confidence, removed = _confidence_sentence(report, missing, checks)
    record = _record_sentence(report)
    coverage = (f"Attack families run: {', '.join(sorted({a.coverage.value for a in attacks.values()}))}"
                + (f"; not run: {', '.join(WORDS[c] for c in missing)}" if missing else "") + ".")
    notes = [coverage, *inverted_lines(attacks)]
    for line in (asymmetry_line(report), shadow_advice(report)):
        if line:
            notes.append(line)
    if not report.undefended:
        notes += missing_before(report)
    lines = [confidence, *([record] if record else []), *notes]

    s = report.shadows
    queries = sum(a.queries for a in attacks.values())
    attacker = (f"An outsider who sends the endpoint {queries:,} queries in all, sees its answers (or only their "
                f"labels), and trains {s.n} shadow models ({s.recipe}) on {s.pool_size:,} records of "
                "the same kind; it never sees the training set.")
    if report.undefended:
        protected = "Nothing: this endpoint returns the model's own confidence scores."
    elif removed:
        protected = confidence
    elif removed is None:
        protected = confidence if missing and floor is not None else "Undecided: " + confidence
    else:
        who = "this endpoint" if defense == "unknown" else f"the {defense} defense"
        protected = f"Not the confidence scores: {who} leaves leakage beyond the predicted label (below)."
    not_protected = " ".join(x for x in (None if removed else confidence, record) if x)
    cannot = []
    if floor is not None:
        cannot.append(f"What the predicted label reveals: the label-only floor is AUC {floor.auc.value:.3f} "
                      f"({floor.auc.attack}), {_words(floor.tpr_1pct)} at 1% false positives "
                      f"({floor.tpr_1pct.attack}) and {_words(floor.tpr_01pct)} at 0.1% "
                      f"({floor.tpr_01pct.attack}); any defense that keeps the label leaves this.")
    if record is not None and record.startswith("Record-level exposure remains"):
        cannot.append(record)
    if not any(a.coverage == Coverage.TIMING for a in attacks.values()):
        cannot.append("Response time was not measured by this audit: run `purifier audit --attacks timing` "
                      "against the endpoint.")
    return Verdict(tuple(lines), protected, not_protected, attacker, tuple(cannot), removed, tuple(notes),
                   coverage=tuple(sorted({a.coverage.value for a in attacks.values()})),
                   missing=tuple(c.value for c in missing), provisional=bool(missing),
                   criteria={m.value: ok for m, ok in checks.items()})


__all__ = ["ASYMMETRY_MIN_L1", "ASYMMETRY_RATIO", "REQUIRED", "above_chance", "asymmetry_line", "criteria",
           "inverted_lines", "missing_before", "missing_families", "shadow_advice", "verdict", "within"]
