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
    same = {**label, "lira_offline": entry("lira_offline", scores["label_calibrated"].copy(), m)}
    v = planted_report(same, m).verdict
    assert v.confidence_leakage_removed is True
    assert v.lines[0].startswith("Confidence leakage removed") and v.protected == v.lines[0]
    # a much stronger one: the verdict names it and the margin over the floor
    strong = {**label, "lira_offline": entry("lira_offline", rng.normal(size=2 * N) + 2.0 * m, m)}
    v = planted_report(strong, m).verdict
    a = strong["lira_offline"].ranking
    assert v.confidence_leakage_removed is False
    assert v.lines[0].startswith("Confidence leakage remains: lira_offline leaks more")
    assert f"AUC {a.auc:.3f} against the floor's {floor.auc.value:.3f}" in v.lines[0]
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
    v = planted_report({"gap": entry("gap", gap, m), "lira_online": lira}, m).verdict
    record = next(line for line in v.lines if line.startswith("Record-level exposure"))
    assert record == ("Record-level exposure (members found at 0.1% false positives) is not measurable with "
                      "300 non-members: it needs at least 1,000.")
    assert any(line.startswith("lira_online ran its offline variant") and "--shadows" in line for line in v.lines)
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
