"""The verdict: the label-only floor is the best label-only attack per metric, inverted signals
are flagged and count flipped, and the sentences follow from planted numbers."""

import numpy as np
import pytest
from planted_reports import entry, planted_report

from purifier.audit.results import Metric, Strongest
from purifier.audit.verdict import verdict

N = 4000  # per side: 4,000 non-members make TPR at 0.1% FPR measurable (4 false positives)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    m = np.r_[np.ones(N, bool), np.zeros(N, bool)]
    # gap: ties at two values (no power at low FPR); calibrated: a weak but graded signal; a
    # label-only attack strong in the tail only (a few members far out)
    gap = np.where(m, rng.random(2 * N) < 0.98, rng.random(2 * N) < 0.70).astype(float)
    calibrated = rng.normal(size=2 * N) + 0.3 * m
    tail = rng.normal(size=2 * N) + np.where(m & (rng.random(2 * N) < 0.1), 6.0, 0.0)
    return rng, m, {"gap": gap, "label_calibrated": calibrated, "label_augment": tail}


def test_floor_is_the_best_label_only_attack_per_metric(world):
    rng, m, scores = world
    attacks = {n: entry(n, s, m) for n, s in scores.items()}
    attacks["mentr"] = entry("mentr", rng.normal(size=2 * N) + 2.0 * m, m)  # not label-only
    report = planted_report(attacks, m)
    floor = report.label_only_floor
    label = [a for a in attacks.values() if a.label_only]
    assert floor.auc.value == max(a.ranking.auc for a in label)
    for metric in (Metric.TPR_1PCT, Metric.TPR_01PCT):
        assert floor.of(metric).value == max(a.ranking.tpr(metric).tpr for a in label)
        assert floor.of(metric).tpr.negatives == N and floor.of(metric).measurable
    # different attacks set different metrics: the gap attack has the higher AUC, the tail
    # attack exposes members at 0.1% FPR, where the gap attack's TPR is 0
    assert floor.auc.attack == "gap" and floor.tpr_01pct.attack == "label_augment"
    assert attacks["gap"].ranking.tpr_01pct.tpr == 0.0
    assert report.strongest().auc.attack == "mentr"  # the floor excludes the confidence attack


def test_inverted_signal_is_flagged_and_counts_flipped(world):
    rng, m, scores = world
    upside_down = -(rng.normal(size=2 * N) + 1.5 * m)  # members score lower
    attacks = {"gap": entry("gap", scores["gap"], m), "nn": entry("nn", upside_down, m),
               "mentr": entry("mentr", rng.normal(size=2 * N) + 0.3 * m, m)}
    nn = attacks["nn"]
    assert nn.ranking.auc_ci95[1] < 0.5 and nn.inverted and not attacks["mentr"].inverted
    assert nn.flipped.auc == pytest.approx(1 - nn.ranking.auc)
    assert nn.flipped.tpr_1pct.tpr > 0.1 > nn.ranking.tpr_1pct.tpr
    best = Strongest.among(a for a in attacks.values() if not a.label_only)
    assert best.auc.attack == "nn" and best.auc.flipped and best.auc.value > 0.8
    lines = planted_report(attacks, m).verdict.lines
    flagged = [line for line in lines if line.startswith("Inverted signal: nn")]
    assert len(flagged) == 1 and f"{1 - nn.ranking.auc:.3f}" in flagged[0]


def test_verdict_removed_only_within_the_floors_interval(world):
    rng, m, scores = world
    label = {n: entry(n, s, m) for n, s in scores.items()}
    floor = Strongest.among(label.values())
    # a confidence attack exactly as strong as the calibrated label attack: within the interval
    same = {**label, "lira_offline": entry("lira_offline", scores["label_calibrated"].copy(), m),
            "adaptive_mentr": entry("adaptive_mentr", scores["label_calibrated"].copy(), m)}
    v = planted_report(same, m).verdict
    assert v.confidence_leakage_removed is True
    assert v.lines[0].startswith("Confidence leakage removed") and v.protected == v.lines[0]
    # a much stronger one: the verdict names it and the margin over the floor
    strong = {**label, "lira_offline": entry("lira_offline", rng.normal(size=2 * N) + 2.0 * m, m)}
    v = planted_report(strong, m).verdict
    a = strong["lira_offline"].ranking
    assert v.confidence_leakage_removed is False
    assert v.lines[0].startswith("Confidence leakage remains: lira_offline leaks more")
    assert f"AUC {a.auc:.3f} (lira_offline) against the floor's {floor.auc.value:.3f}" in v.lines[0]
    assert f"+{a.auc - floor.auc.value:.3f}" in v.lines[0]
    assert v.protected.startswith("Not the confidence scores")
    # the record-level figure always remains, with realized FPR and negatives
    record = next(line for line in v.lines if line.startswith("Record-level exposure remains"))
    assert "0.1% false positives" in record and f"{N:,} non-members" in record
    assert "cannot remove what the label reveals" in record
    assert any("Response time was not measured" in c for c in v.cannot_protect)
    # the undefended endpoint is named as such
    assert planted_report(strong, m, defense="none").verdict.protected.startswith("Nothing")


def test_too_few_negatives_give_no_number_and_fallbacks_are_said():
    rng = np.random.default_rng(3)
    m = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    gap = np.where(m, rng.random(600) < 0.99, rng.random(600) < 0.9).astype(float)
    lira = entry("lira_online", rng.normal(size=600) + 1.0 * m, m,
                 details={"variant": "offline", "variant_reason": "offline: only 38% of records have >= 2 IN and "
                                                                   "OUT shadows (4 shadows), online needs 90%"})
    v = planted_report({"gap": entry("gap", gap, m), "lira_online": lira}, m,
                       fallbacks={"lira_online": lira.details["variant_reason"]}).verdict
    record = next(line for line in v.lines if line.startswith("Record-level exposure"))
    assert record == ("Record-level exposure (members found at 0.1% false positives) is not measurable with "
                      "300 non-members: it needs at least 1,000.")
    assert any(line.startswith("Too few shadow models") and "lira_online ran a weaker variant" in line
               and "the default is 32, --quick uses 4" in line for line in v.lines)
    assert any("not measurable with 300 non-members at 0.1%" in c for c in v.cannot_protect)


def test_no_label_only_attack_is_said_not_guessed(world):
    from purifier.audit.html import ReportPage, headline_rows, render_html

    rng, m, _ = world
    r = planted_report({"mentr": entry("mentr", rng.normal(size=2 * N) + m, m)}, m)
    assert r.label_only_floor is None and r.verdict.confidence_leakage_removed is None
    assert r.verdict.lines[0] == "No label-only attack was run, so nothing says what the label alone reveals."
    page = ReportPage(r)
    rows = headline_rows(page)
    assert rows[0][3] == "no such attack run" and rows[3][2][0] == "not measured"
    assert "No label-only attack was run" in render_html(page)


def test_the_verdict_is_computed_from_the_report_alone(world):
    rng, m, scores = world
    r = planted_report({n: entry(n, s, m) for n, s in scores.items()}, m)
    assert verdict(r) == r.verdict


# --- the rule: coverage and each criterion --------------------------------------------------------
# The floor: gap (AUC), calibrated (TPR at 1%), augmentation (TPR at 0.1%), each with a 95% interval
# of +-0.01 on AUC and +-0.005 on the TPRs; the other attacks sit exactly at the floor unless a case
# lifts one figure above the interval's top.
FLOOR_ATTACKS = {"gap": (0.60, 0.02, 0.002), "label_calibrated": (0.58, 0.05, 0.004),
                 "label_augment": (0.59, 0.03, 0.010)}


def rule_report(defense="memguard", conf=(0.60, 0.05, 0.010), adaptive=(0.60, 0.05, 0.010), drop=(), **kw):
    from planted_reports import figures

    attacks = {n: figures(n, *v) for n, v in FLOOR_ATTACKS.items()}
    attacks["lira_online"] = figures("lira_online", *conf)
    attacks["adaptive_nn"] = figures("adaptive_nn", *adaptive)
    return planted_report({n: a for n, a in attacks.items() if n not in drop}, defense=defense, **kw)


def test_within_the_floor_on_every_criterion_with_every_family_is_removed():
    v = rule_report().verdict
    assert v.confidence_leakage_removed is True and not v.provisional and v.missing == ()
    assert v.criteria == {"auc": True, "tpr_at_1pct_fpr": True, "tpr_at_01pct_fpr": True}
    assert v.lines[0].startswith("Confidence leakage removed")


@pytest.mark.parametrize(("metric", "lifted", "words"), [
    ("auc", (0.62, 0.05, 0.010), "AUC 0.620 (lira_online) against the floor's 0.600"),
    ("tpr_at_1pct_fpr", (0.60, 0.062, 0.010), "6.2% of members found at 1% false positives (lira_online)"),
    ("tpr_at_01pct_fpr", (0.60, 0.05, 0.021), "2.1% of members found at 0.1% false positives (lira_online)"),
])
def test_each_criterion_alone_keeps_the_leakage(metric, lifted, words):
    """One figure above the floor's interval, the other two within: never "removed". Dropping any
    of the three conditions from the rule makes its case here read "removed"."""
    v = rule_report(conf=lifted).verdict
    assert v.confidence_leakage_removed is False and v.criteria[metric] is False
    assert sum(ok is False for ok in v.criteria.values()) == 1
    assert v.lines[0].startswith("Confidence leakage remains: lira_online leaks more") and words in v.lines[0]
    assert v.protected.startswith("Not the confidence scores: the memguard defense")


@pytest.mark.parametrize(("drop", "missing"), [
    (("lira_online",), "confidence"), (("adaptive_nn",), "adaptive"), (("gap",), "label_gap"),
    (("label_calibrated",), "label_calibrated"), (("label_augment",), "label_augmentation"),
])
def test_a_missing_family_makes_the_verdict_provisional(drop, missing):
    weak = (0.58, 0.02, 0.002)  # within the floor whichever label-only attack is left out
    v = rule_report(drop=drop, conf=weak, adaptive=weak).verdict
    assert v.confidence_leakage_removed is None and v.provisional and v.missing == (missing,)
    assert v.lines[0].startswith("Provisional:") and "were not run" in v.lines[0]
    assert any(line.startswith("Attack families run:") and "not run:" in line for line in v.lines)
    # a leak found stands, whatever did not run; the verdict still says what was missing
    v = rule_report(drop=drop, adaptive=(0.65, 0.05, 0.01), conf=(0.65, 0.05, 0.01)).verdict
    assert v.confidence_leakage_removed is False and v.provisional


def test_an_undefended_endpoint_needs_no_adaptive_attack():
    v = rule_report(defense="none", drop=("adaptive_nn",)).verdict
    assert v.missing == () and v.confidence_leakage_removed is True
    assert v.lines[0].startswith("No confidence leakage beyond the label")
    assert v.protected.startswith("Nothing")


def test_an_unmeasurable_tpr_is_skipped_and_said():
    from planted_reports import figures

    attacks = {n: figures(n, *v, negatives=400) for n, v in FLOOR_ATTACKS.items()}
    attacks |= {"lira_online": figures("lira_online", 0.60, 0.05, 0.5, negatives=400),
                "adaptive_nn": figures("adaptive_nn", 0.60, 0.05, 0.01, negatives=400)}
    v = planted_report(attacks, np.r_[np.ones(400, bool), np.zeros(400, bool)]).verdict
    assert v.criteria["tpr_at_01pct_fpr"] is None and v.confidence_leakage_removed is True
    assert "TPR at 0.1% FPR not judged: not measurable with 400 non-members" in v.lines[0]


def test_a_timing_only_audit_writes_no_record_level_sentence():
    from planted_reports import figures

    at_chance = figures("timing", 0.50, 0.011, 0.001, half=0.02)
    v = planted_report({"timing": at_chance}).verdict
    assert not any(line.startswith("Record-level exposure remains") for line in v.lines)
    assert any(line.startswith("No attack in this audit beats a coin flip") for line in v.lines)
    assert not any("finds" in c for c in v.cannot_protect)
    assert v.provisional and set(v.missing) == {"confidence", "adaptive", "label_gap", "label_calibrated",
                                                "label_augmentation"}


def test_the_record_level_figure_comes_from_an_attack_above_chance():

    v = rule_report(conf=(0.60, 0.05, 0.030)).verdict  # lira_online leads at 0.1% FPR, well above chance
    record = next(line for line in v.lines if line.startswith("Record-level exposure remains"))
    assert "(lira_online) finds 3.0% of members" in record and "the label alone (label_augment) finds 1.0%" in record


def test_fallback_advice_is_said_once_and_the_same_everywhere():
    fallbacks = {"lira_online": "4 shadows < 16: one global variance",
                 "rmia": "offline: only 38% of records have >= 2 IN and OUT shadows (4 shadows), online needs 90%"}
    r = rule_report(fallbacks=fallbacks)
    advice = [line for line in r.verdict.lines if "--shadows" in line]
    assert advice == ["Too few shadow models for full strength: with 4, lira_online, rmia ran a weaker variant "
                      "(4 shadows < 16: one global variance); more shadow models run them at full strength "
                      "(--shadows; the default is 32, --quick uses 4)."]
    from purifier.audit.report import markdown, text_table

    for text in (text_table(r), markdown(r)):
        assert text.count("--shadows") == 1, text


def test_a_large_member_nonmember_distortion_asymmetry_is_flagged():
    from purifier import evaluation as ev

    def cost(members, nonmembers):
        ba = ev.BeforeAfter(0.1, 0.1)
        return ev.OutputUtility(1.0, ev.L1Summary(nonmembers, nonmembers, nonmembers, 4000),
                                ev.L1Summary(members, members, members, 4000), ba, ba, None, 1.0, ba)

    flagged = rule_report(cost=cost(0.02, 0.34)).verdict
    line = next(line for line in flagged.lines if line.startswith("Distortion asymmetry"))
    assert "members' confidence vectors by 0.020 and non-members' by 0.340" in line
    for even in (cost(0.30, 0.34), cost(0.002, 0.02)):  # alike, or both too small to matter
        assert not any(line.startswith("Distortion asymmetry") for line in rule_report(cost=even).verdict.lines)


def test_a_defended_report_without_a_baseline_says_what_is_missing():
    v = rule_report().verdict
    assert any(line.startswith("No undefended baseline was audited") and "--baseline" in line for line in v.lines)
    with_before = rule_report(baseline=rule_report(defense="none", drop=("adaptive_nn",))).verdict
    assert any(line.startswith("The undefended model was given as an earlier report") for line in with_before.lines)


def test_a_before_from_another_attacker_is_said():
    from dataclasses import replace

    before = rule_report(defense="none", drop=("adaptive_nn",))
    other = replace(before, shadows=replace(before.shadows, n=16))
    lines = rule_report(baseline=other).verdict.lines
    assert any(line.startswith("The \"before\" comes from another attacker: 16 shadow models") for line in lines)
    assert not any("another attacker" in line for line in rule_report(baseline=before).verdict.lines)
