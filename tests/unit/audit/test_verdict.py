"""The verdict: the label-only floor is the best label-only attack per metric, inverted signals
are flagged and count flipped, and the sentences follow from planted numbers."""

import numpy as np
import pytest

from purifier.audit.runner import AttackOutcome, attack_metrics
from purifier.audit.verdict import best_per_metric, label_only_floor, strongest, verdict

N = 4000  # per side: 4,000 non-members make TPR at 0.1% FPR measurable (4 false positives)


def entry(name, family, scores, membership):
    o = AttackOutcome(name, family, scores, scores >= np.median(scores), float(np.median(scores)), len(scores), 0.1)
    return attack_metrics(o, membership, n_boot=50, seed=0)


def report_of(attacks, defense="memguard", shadows=4):
    r = {"defense": defense, "attacks": attacks, "utility": {"argmax_agreement": 1.0},
         "shadows": {"n": shadows, "recipe": "mlp", "pool_size": 5000}}
    r["label_only_floor"] = label_only_floor(attacks)
    return r


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
    attacks = {n: entry(n, "label_only", s, m) for n, s in scores.items()}
    attacks["mentr"] = entry("mentr", "confidence", rng.normal(size=2 * N) + 2.0 * m, m)  # not label-only
    floor = label_only_floor(attacks)
    label = {n: a for n, a in attacks.items() if a["family"] == "label_only"}
    assert floor["auc"]["value"] == max(a["auc"] for a in label.values())
    for key in ("0.01", "0.001"):
        assert floor[key]["value"] == max(a["tpr_at_fpr"][key]["tpr"] for a in label.values())
        assert floor[key]["negatives"] == N and floor[key]["measurable"]
    # different attacks set different metrics: the gap attack has the higher AUC, the tail
    # attack exposes members at 0.1% FPR, where the gap attack's TPR is 0
    assert floor["auc"]["attack"] == "gap" and floor["0.001"]["attack"] == "label_augment"
    assert attacks["gap"]["tpr_at_fpr"]["0.001"]["tpr"] == 0.0
    assert strongest(attacks, "auc")["attack"] == "mentr"  # the floor excludes the confidence attack


def test_inverted_signal_is_flagged_and_counts_flipped(world):
    rng, m, scores = world
    upside_down = -(rng.normal(size=2 * N) + 1.5 * m)  # members score lower
    attacks = {"gap": entry("gap", "label_only", scores["gap"], m),
               "nn": entry("nn", "confidence", upside_down, m),
               "mentr": entry("mentr", "confidence", rng.normal(size=2 * N) + 0.3 * m, m)}
    nn = attacks["nn"]
    assert nn["ci95"]["auc"][1] < 0.5 and "inverted" in nn and "inverted" not in attacks["mentr"]
    assert nn["inverted"]["auc"] == pytest.approx(1 - nn["auc"])
    assert nn["inverted"]["tpr_at_fpr"]["0.01"]["tpr"] > 0.1 > nn["tpr_at_fpr"]["0.01"]["tpr"]
    best = best_per_metric(attacks, label_only=False)
    assert best["auc"]["attack"] == "nn" and best["auc"]["inverted"] and best["auc"]["value"] > 0.8
    lines = verdict(report_of(attacks))["lines"]
    flagged = [line for line in lines if line.startswith("Inverted signal: nn")]
    assert len(flagged) == 1 and f"{1 - nn['auc']:.3f}" in flagged[0]


def test_verdict_removed_only_within_the_floors_interval(world):
    rng, m, scores = world
    label = {n: entry(n, "label_only", s, m) for n, s in scores.items()}
    floor = label_only_floor(label)
    # a confidence attack exactly as strong as the calibrated label attack: within the interval
    same = {**label, "lira_offline": entry("lira_offline", "confidence", scores["label_calibrated"].copy(), m)}
    v = verdict(report_of(same))
    assert v["confidence_leakage_removed"] is True
    assert v["lines"][0].startswith("Confidence leakage removed") and v["protected"] == v["lines"][0]
    # a much stronger one: the verdict names it and the margin over the floor
    strong = {**label, "lira_offline": entry("lira_offline", "confidence", rng.normal(size=2 * N) + 2.0 * m, m)}
    v = verdict(report_of(strong))
    a = strong["lira_offline"]
    assert v["confidence_leakage_removed"] is False
    assert v["lines"][0].startswith("Confidence leakage remains: lira_offline leaks more")
    assert f"AUC {a['auc']:.3f} against the floor's {floor['auc']['value']:.3f}" in v["lines"][0]
    assert f"+{a['auc'] - floor['auc']['value']:.3f}" in v["lines"][0]
    assert v["protected"].startswith("Not the confidence scores")
    # the record-level figure always remains, with realized FPR and negatives
    record = next(line for line in v["lines"] if line.startswith("Record-level exposure remains"))
    assert "0.1% false positives" in record and f"{N:,} non-members" in record
    assert "cannot remove what the label reveals" in record
    assert any("Response time was not measured" in c for c in v["cannot_protect"])
    # the undefended endpoint is named as such
    assert verdict(report_of(strong, defense="none"))["protected"].startswith("Nothing")


def test_too_few_negatives_give_no_number_and_fallbacks_are_said():
    rng = np.random.default_rng(3)
    m = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    gap = np.where(m, rng.random(600) < 0.99, rng.random(600) < 0.9).astype(float)
    lira = entry("lira_online", "confidence", rng.normal(size=600) + 1.0 * m, m)
    lira["details"] = {"variant": "offline", "variant_reason": "offline: only 38% of records have >= 2 IN and "
                                                               "OUT shadows (4 shadows), online needs 90%"}
    v = verdict(report_of({"gap": entry("gap", "label_only", gap, m), "lira_online": lira}))
    record = next(line for line in v["lines"] if line.startswith("Record-level exposure"))
    assert record == ("Record-level exposure (members found at 0.1% false positives) is not measurable with "
                      "300 non-members: it needs at least 1,000.")
    assert any(line.startswith("lira_online ran its offline variant") and "--shadows" in line for line in v["lines"])
    assert any("not measurable with 300 non-members at 0.1%" in c for c in v["cannot_protect"])


def test_no_label_only_attack_is_said_not_guessed(world):
    from purifier.audit.html import ReportPage, Verdict, headline_rows, render_html

    rng, m, _ = world
    r = report_of({"mentr": entry("mentr", "confidence", rng.normal(size=2 * N) + m, m)})
    r.update(dataset="d", n_members=N, n_nonmembers=N, utility={"member_accuracy": 1.0, "nonmember_accuracy": 0.8,
                                                               "argmax_agreement": None},
             timing_s={"audit_without_boundary": 1.0, "shadow_training": 1.0})
    r["verdict"] = verdict(r)
    assert r["label_only_floor"] is None and r["verdict"]["confidence_leakage_removed"] is None
    assert r["verdict"]["lines"][0] == "No label-only attack was run, so nothing says what the label alone reveals."
    page = ReportPage(r, Verdict.from_report(r), "mentr", None)
    rows = headline_rows(page)
    assert rows[0][3] == "no such attack run" and rows[3][2][0] == "not measured"
    assert "No label-only attack was run" in render_html(page)
