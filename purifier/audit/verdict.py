"""The audit's verdict: the label-only floor, inverted signals, and what a defense achieved, in words.

A defense that keeps the predicted label cannot hide what the label itself reveals, so the
honest yardstick is the *strongest* label-only attack, per metric (Yeom et al. 2018; Choquette-
Choo et al., ICML 2021; with difficulty calibration, Watson et al., ICLR 2022): the best of gap,
calibrated, augmentation and boundary attacks on AUC, on TPR at 1% FPR and on TPR at 0.1% FPR
(Carlini et al. 2022 ask for the low-FPR figures). Every other attack is judged against it:
"confidence leakage removed" only when the best non-label attack's AUC and TPR at 1% FPR lie
within the floor's 95% interval.

An attack whose AUC interval lies below 0.5 has found a real signal with the wrong sign; an
attacker flips it, so its flipped figures (`inverted` in its report entry, computed on the negated
scores by the runner) count towards the best attack.

Everything here reads the `report.json` document only, so report.md, report.html and the demo
print the same sentences.
"""

from __future__ import annotations

LABEL_ONLY = "label_only"
TPR_KEYS = ("0.01", "0.001")
METRICS = ("auc", *TPR_KEYS)


def is_inverted(entry: dict) -> bool:
    """The attack's AUC 95% interval lies entirely below 0.5."""
    return entry["ci95"]["auc"][1] < 0.5


def strength(entry: dict) -> dict:
    """The attack's figures as an attacker would use them: flipped when its signal is inverted.
    Returns {"auc", "auc_ci", "0.01", "0.001" (tpr_at_fpr entries), "tpr_ci" {"0.01": [lo, hi]},
    "inverted"}."""
    src = entry.get("inverted") if is_inverted(entry) and "inverted" in entry else entry
    return {"auc": src["auc"], "auc_ci": src["ci95"]["auc"], **{k: src["tpr_at_fpr"][k] for k in TPR_KEYS},
            "tpr_ci": {k: src["ci95"][f"tpr_at_{k}"] for k in TPR_KEYS if f"tpr_at_{k}" in src["ci95"]},
            "inverted": src is not entry}


def _value(s: dict, metric: str) -> float:
    return s["auc"] if metric == "auc" else s[metric]["tpr"]


def best_per_metric(attacks: dict, label_only: bool) -> dict | None:
    """Per metric, the strongest attack of the label-only family (label_only=True) or of all the
    others: {metric: {"attack", "value", "ci95", ...the tpr entry for TPR metrics}}; None if no
    attack of that kind ran."""
    chosen = {n: strength(a) for n, a in attacks.items() if (a["family"] == LABEL_ONLY) == label_only}
    if not chosen:
        return None
    out = {}
    for metric in METRICS:
        name = max(chosen, key=lambda n: _value(chosen[n], metric))
        s = chosen[name]
        if metric == "auc":
            out[metric] = {"attack": name, "value": s["auc"], "ci95": s["auc_ci"], "inverted": s["inverted"]}
        else:
            out[metric] = {"attack": name, "value": s[metric]["tpr"], "ci95": s["tpr_ci"].get(metric),
                           "inverted": s["inverted"], **s[metric]}
    return out


def strongest(attacks: dict, metric: str, label_only: bool | None = None) -> dict | None:
    """The strongest attack on `metric` ("auc", "0.01", "0.001") among all attacks (None), the
    label-only ones (True) or the others (False): an entry of `best_per_metric`; None if no such
    attack ran."""
    flags = (True, False) if label_only is None else (label_only,)
    found = [b[metric] for b in (best_per_metric(attacks, flag) for flag in flags) if b is not None]
    return max(found, key=lambda e: e["value"]) if found else None


def label_only_floor(attacks: dict) -> dict | None:
    """The label-only floor: the strongest label-only attack per metric (see module docstring)."""
    return best_per_metric(attacks, label_only=True)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _tpr_words(t: dict) -> str:
    """'7.1% of members (realized FPR 0.10%, 10,000 non-members)' or 'not measurable ...'."""
    if not t["measurable"]:
        return f"not measurable with {t['negatives']:,} non-members"
    return f"{_pct(t['value'])} of members (realized FPR {100 * t['fpr']:.2f}%, {t['negatives']:,} non-members)"


def _within(best: dict, floor: dict) -> bool | None:
    """best's value is no higher than the top of floor's 95% interval; None when not measurable."""
    if not best.get("measurable", True) or not floor.get("measurable", True) or floor["ci95"] is None:
        return None
    return best["value"] <= floor["ci95"][1]


def fallback_lines(attacks: dict) -> list[str]:
    """Attacks that ran a weaker variant than they are named for, because of too few shadows."""
    lines = []
    for name, a in attacks.items():
        reason = a.get("details", {}).get("variant_reason", "")
        if reason.startswith("offline: only"):
            lines.append(f"{name} ran its offline variant ({reason.removeprefix('offline: ')}); more shadow "
                         "models (--shadows 8 or more) allow the online one.")
    return lines


def verdict(report: dict) -> dict:
    """The verdict of one audited endpoint, from its report document.

    Returns {"lines": [sentences], "protected", "not_protected", "attacker", "cannot_protect":
    [sentences], "confidence_leakage_removed": True/False/None (None: not decidable)}.
    """
    attacks, defense = report["attacks"], report["defense"]
    floor, best = report.get("label_only_floor"), best_per_metric(attacks, label_only=False)
    undefended = defense == "none"
    lines: list[str] = []
    removed = None
    if floor is None:
        confidence = "No label-only attack was run, so nothing says what the label alone reveals."
    elif best is None:
        confidence = "Only label-only attacks were run: the confidence scores were not tested."
    else:
        b, f = best["auc"], floor["auc"]
        b1, f1 = best["0.01"], floor["0.01"]
        auc_ok, tpr_ok = _within(b, f), _within(b1, f1)
        removed = bool(auc_ok) and tpr_ok is not False
        if removed:
            confidence = (f"Confidence leakage removed: the strongest attacks on the scores reach AUC "
                          f"{b['value']:.3f} ({b['attack']}) and find {_tpr_words(b1)} at 1% false positives "
                          f"({b1['attack']}), within the 95% "
                          f"interval of the label-only floor (AUC {f['value']:.3f} [{f['ci95'][0]:.3f}, "
                          f"{f['ci95'][1]:.3f}] by {f['attack']}).")
            if tpr_ok is None:
                confidence += " The 1% false-positive comparison is not measurable with these non-members."
        else:
            more = [f"AUC {b['value']:.3f} against the floor's {f['value']:.3f} ({f['attack']}; "
                    f"+{b['value'] - f['value']:.3f})"]
            if tpr_ok is False:
                more.append(f"{_pct(b1['value'])} of members found at 1% false positives ({b1['attack']}) "
                            f"against {_pct(f1['value'])} ({f1['attack']})")
            confidence = (f"Confidence leakage {'present' if undefended else 'remains'}: {b['attack']} leaks more "
                          f"than the predicted label alone: " + "; ".join(more) + ".")
    lines.append(confidence)
    top = (best or floor or {}).get("0.001")
    if floor is not None and best is not None and floor["0.001"]["value"] > best["0.001"]["value"]:
        top = floor["0.001"]
    record = None
    if top is not None:
        if not top["measurable"]:
            record = (f"Record-level exposure (members found at 0.1% false positives) is not measurable with "
                      f"{top['negatives']:,} non-members: it needs at least 1,000.")
        else:
            record = (f"Record-level exposure remains: the strongest attack ({top['attack']}) finds "
                      f"{_tpr_words(top)} at 0.1% false positives")
            if floor is not None and floor["0.001"]["measurable"]:
                record += f"; the label alone ({floor['0.001']['attack']}) finds {_pct(floor['0.001']['value'])}"
            record += (". A defense that keeps the predicted label cannot remove what the label reveals.")
        lines.append(record)
    for name, a in attacks.items():
        if is_inverted(a) and "inverted" in a:
            lo, hi = a["ci95"]["auc"]
            lines.append(f"Inverted signal: {name} scores AUC {a['auc']:.3f} [{lo:.3f}, {hi:.3f}], below a coin "
                         f"flip; an attacker who flips its score gets AUC {a['inverted']['auc']:.3f}, counted so.")
    lines += fallback_lines(attacks)

    s = report["shadows"]
    queries = sum(a["queries"] for a in attacks.values())
    attacker = (f"An outsider who sends the endpoint {queries:,} queries in all, sees its answers (or only their "
                f"labels), and trains {s['n']} shadow models ({s['recipe']}) on {s['pool_size']:,} records of "
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
        cannot.append(f"What the predicted label reveals: the label-only floor is AUC {floor['auc']['value']:.3f} "
                      f"({floor['auc']['attack']}), {_tpr_words(floor['0.01'])} at 1% false positives "
                      f"({floor['0.01']['attack']}) and {_tpr_words(floor['0.001'])} at 0.1% "
                      f"({floor['0.001']['attack']}); any defense that keeps the label leaves this.")
    if record is not None:
        cannot.append(record)
    if "timing" not in attacks:
        cannot.append("Response time was not measured by this audit: run `purifier audit --attacks timing` "
                      "against the endpoint.")
    return {"lines": lines, "protected": protected, "not_protected": not_protected, "attacker": attacker,
            "cannot_protect": cannot, "confidence_leakage_removed": removed}


__all__ = ["LABEL_ONLY", "best_per_metric", "fallback_lines", "is_inverted", "label_only_floor", "strength",
           "strongest", "verdict"]
