"""The audit's verdict: the label-only floor, inverted signals, and what a defense achieved, in words.

A defense that keeps the predicted label cannot hide what the label itself reveals, so the
honest yardstick is the *strongest* label-only attack, per metric (Yeom et al. 2018; Choquette-
Choo et al., ICML 2021; with difficulty calibration, Watson et al., ICLR 2022): the best of gap,
calibrated, augmentation and boundary attacks on AUC, on TPR at 1% FPR and on TPR at 0.1% FPR
(Carlini et al. 2022 ask for the low-FPR figures). Every other attack is judged against it:
"confidence leakage removed" only when the best non-label attack's AUC and TPR at 1% FPR lie
within the floor's 95% interval.

An attack whose AUC interval lies below 0.5 has found a real signal with the wrong sign; an
attacker flips it, so its flipped figures (`AttackResult.flipped`, computed on the negated scores
by the runner) count towards the best attack.

Everything here reads the typed `Report` only, so report.md, report.html and the demo print the
same sentences.
"""

from __future__ import annotations

from purifier.audit.results import AttackResult, Best, Metric, Report, Strongest, Tpr, Verdict


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _tpr_words(value: float, t: Tpr) -> str:
    """'7.1% of members (realized FPR 0.10%, 10,000 non-members)' or 'not measurable ...'."""
    if not t.measurable:
        return f"not measurable with {t.negatives:,} non-members"
    return f"{_pct(value)} of members (realized FPR {100 * t.fpr:.2f}%, {t.negatives:,} non-members)"


def _best_words(b: Best) -> str:
    return _tpr_words(b.value, b.tpr)


def _within(best: Best, floor: Best) -> bool | None:
    """best's value is no higher than the top of floor's 95% interval; None when not measurable."""
    if not best.measurable or not floor.measurable or floor.ci95 is None:
        return None
    return best.value <= floor.ci95[1]


def fallback_lines(attacks: dict[str, AttackResult]) -> list[str]:
    """Attacks that ran a weaker variant than they are named for, because of too few shadows."""
    lines = []
    for name, a in attacks.items():
        reason = str(a.details.get("variant_reason", ""))
        if reason.startswith("offline: only"):
            lines.append(f"{name} ran its offline variant ({reason.removeprefix('offline: ')}); more shadow "
                         "models (--shadows 8 or more) allow the online one.")
    return lines


def inverted_lines(attacks: dict[str, AttackResult]) -> list[str]:
    lines = []
    for name, a in attacks.items():
        if a.flipped is not None:
            lo, hi = a.ranking.auc_ci95
            lines.append(f"Inverted signal: {name} scores AUC {a.ranking.auc:.3f} [{lo:.3f}, {hi:.3f}], below a coin "
                         f"flip; an attacker who flips its score gets AUC {a.flipped.auc:.3f}, counted so.")
    return lines


def verdict(report: Report) -> Verdict:
    """The verdict of one audited endpoint, from its report (the `verdict` field is not read)."""
    attacks, defense = report.attacks, report.defense
    floor, best = report.label_only_floor, report.strongest(label_only=False)
    undefended = report.undefended
    lines: list[str] = []
    removed = None
    if floor is None:
        confidence = "No label-only attack was run, so nothing says what the label alone reveals."
    elif best is None:
        confidence = "Only label-only attacks were run: the confidence scores were not tested."
    else:
        b, f = best.auc, floor.auc
        b1, f1 = best.tpr_1pct, floor.tpr_1pct
        auc_ok, tpr_ok = _within(b, f), _within(b1, f1)
        removed = bool(auc_ok) and tpr_ok is not False
        if removed:
            confidence = (f"Confidence leakage removed: the strongest attacks on the scores reach AUC "
                          f"{b.value:.3f} ({b.attack}) and find {_best_words(b1)} at 1% false positives "
                          f"({b1.attack}), within the 95% interval of the label-only floor (AUC {f.value:.3f} "
                          f"[{f.ci95[0]:.3f}, {f.ci95[1]:.3f}] by {f.attack}).")
            if tpr_ok is None:
                confidence += " The 1% false-positive comparison is not measurable with these non-members."
        else:
            more = [f"AUC {b.value:.3f} against the floor's {f.value:.3f} ({f.attack}; +{b.value - f.value:.3f})"]
            if tpr_ok is False:
                more.append(f"{_pct(b1.value)} of members found at 1% false positives ({b1.attack}) "
                            f"against {_pct(f1.value)} ({f1.attack})")
            confidence = (f"Confidence leakage {'present' if undefended else 'remains'}: {b.attack} leaks more "
                          f"than the predicted label alone: " + "; ".join(more) + ".")
    lines.append(confidence)
    record = _record_line(best, floor)
    if record is not None:
        lines.append(record)
    notes = inverted_lines(attacks) + fallback_lines(attacks)
    lines += notes

    s = report.shadows
    queries = sum(a.queries for a in attacks.values())
    attacker = (f"An outsider who sends the endpoint {queries:,} queries in all, sees its answers (or only their "
                f"labels), and trains {s.n} shadow models ({s.recipe}) on {s.pool_size:,} records of "
                "the same kind; it never sees the training set.")
    if undefended:
        protected = "Nothing: this endpoint returns the model's own confidence scores."
    elif removed:
        protected = confidence
    elif removed is None:
        protected = "Undecided: " + confidence
    else:
        who = "this endpoint" if defense == "unknown" else f"the {defense} defense"
        protected = f"Not the confidence scores: {who} leaves leakage beyond the predicted label (below)."
    not_protected = " ".join(x for x in (None if removed else confidence, record) if x)
    cannot = []
    if floor is not None:
        cannot.append(f"What the predicted label reveals: the label-only floor is AUC {floor.auc.value:.3f} "
                      f"({floor.auc.attack}), {_best_words(floor.tpr_1pct)} at 1% false positives "
                      f"({floor.tpr_1pct.attack}) and {_best_words(floor.tpr_01pct)} at 0.1% "
                      f"({floor.tpr_01pct.attack}); any defense that keeps the label leaves this.")
    if record is not None:
        cannot.append(record)
    if "timing" not in attacks:
        cannot.append("Response time was not measured by this audit: run `purifier audit --attacks timing` "
                      "against the endpoint.")
    return Verdict(tuple(lines), protected, not_protected, attacker, tuple(cannot), removed, tuple(notes))


def _record_line(best: Strongest | None, floor: Strongest | None) -> str | None:
    """The record-level sentence: members found at 0.1% false positives by the strongest attack."""
    top = (best or floor)
    if top is None:
        return None
    top = top.tpr_01pct
    if floor is not None and best is not None and floor.tpr_01pct.value > best.tpr_01pct.value:
        top = floor.tpr_01pct
    if not top.measurable:
        return (f"Record-level exposure (members found at 0.1% false positives) is not measurable with "
                f"{top.tpr.negatives:,} non-members: it needs at least 1,000.")
    record = (f"Record-level exposure remains: the strongest attack ({top.attack}) finds "
              f"{_best_words(top)} at 0.1% false positives")
    if floor is not None and floor.tpr_01pct.measurable:
        record += f"; the label alone ({floor.tpr_01pct.attack}) finds {_pct(floor.tpr_01pct.value)}"
    return record + ". A defense that keeps the predicted label cannot remove what the label reveals."


__all__ = ["Metric", "fallback_lines", "inverted_lines", "verdict"]
