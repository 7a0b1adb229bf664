"""Budget sweeps: the choice rule on planted attack results, setting order, and copies of fitted defenses."""

import numpy as np
import pytest
from strong_secret import SECRET

from purifier.audit.sweep import (
    KNOBS,
    Floor,
    SweepPoint,
    at_setting,
    attacker_view,
    choose,
    knob,
    label_only_floor,
)
from purifier.defenses.baselines import Noise, Rounded, TopK
from purifier.errors import ConfigError

FLOOR = Floor("gap", 0.515, (0.507, 0.524), 0.0)


def planted(defense, setting, auc, agreement=1.0):
    utility = {"argmax_agreement": agreement, "l1_nonmembers": {"mean": 0.0 if setting is None else 0.01},
               "l1_members": None}
    return SweepPoint(defense, setting, f"{setting}", "loss", auc, (auc - 0.03, auc + 0.03),
                      {"tpr": 0.0, "fpr": 0.0, "negatives": 400, "attack": "loss"}, {"loss": auc}, utility)


def test_the_weakest_setting_within_the_floor_interval_is_chosen():
    points = [planted("memguard", 0.01, 0.58), planted("memguard", 0.1, 0.530),
              planted("memguard", 0.5, 0.5239),  # the first at or below the interval's upper end 0.524
              planted("memguard", 1.0, 0.516), planted("memguard", 2.0, 0.519),
              planted("label_only", None, 0.50)]  # another defense never counts
    chosen, closest = choose(points, FLOOR, "memguard")
    assert chosen.setting == 0.5
    assert closest.setting == 1.0


def test_a_setting_that_changes_labels_is_not_eligible():
    points = [planted("purifier", 0.05, 0.52, agreement=0.98), planted("purifier", 0.1, 0.523)]
    chosen, _ = choose(points, FLOOR, "purifier")
    assert chosen.setting == 0.1


def test_a_grid_that_never_reaches_the_floor_reports_the_closest():
    points = [planted("memguard", 0.01, 0.58), planted("memguard", 0.1, 0.53), planted("memguard", 1.0, 0.53)]
    chosen, closest = choose(points, FLOOR, "memguard")
    assert chosen is None
    assert closest.setting == 0.1  # ties go to the weaker setting


def test_the_floor_is_the_strongest_label_only_attack():
    def entry(family, auc):
        return {"family": family, "auc": auc, "ci95": {"auc": [auc - 0.01, auc + 0.01]},
                "tpr_at_fpr": {"0.01": {"tpr": 0.02}}}

    report = {"attacks": {"gap": entry("confidence", 0.515), "label_augment": entry("label_only", 0.53),
                          "loss": entry("confidence", 0.6)}}
    assert label_only_floor(report) == Floor("label_augment", 0.53, (0.52, 0.54), 0.02)
    del report["attacks"]["label_augment"]
    assert label_only_floor(report).attack == "gap"
    runner_floor = {"auc": {"attack": "label_calibrated", "value": 0.54, "ci95": [0.53, 0.55], "inverted": False},
                    "0.01": {"attack": "label_calibrated", "value": 0.03, "tpr": 0.03}}
    assert label_only_floor({**report, "label_only_floor": runner_floor}) == \
        Floor("label_calibrated", 0.54, (0.53, 0.55), 0.03)  # the runner's own floor wins where it has one
    with pytest.raises(ConfigError, match="no label-only attack"):
        label_only_floor({"attacks": {"loss": entry("confidence", 0.6)}})


@pytest.mark.parametrize(("name", "text", "order"), [
    ("memguard", "1,0.01,0.1,0.1", [0.01, 0.1, 1.0]),
    ("top_k", "1,3,2", [3, 2, 1]),  # fewer scores kept = stronger
    ("round", "0,3", [3, 0]),
    ("purifier", "none,0.5,0.05", [0.05, 0.5, None]),  # no cap is the strongest
])
def test_grids_run_from_the_weakest_setting(name, text, order):
    assert knob(name).parse(text) == order


@pytest.mark.parametrize(("name", "text", "message"), [
    ("top_k", "2,x", "'x' is not an integer"),
    ("memguard", "nan", "not a finite number"),
    ("memguard", " , ", "at least one epsilon"),
])
def test_bad_grid_text_is_named(name, text, message):
    with pytest.raises(ConfigError, match=message):
        knob(name).parse(text)


def test_label_only_has_no_budget():
    with pytest.raises(ConfigError, match="label_only has no budget to tune"):
        knob("label_only")


def test_at_setting_copies_and_checks_with_the_defenses_own_rules():
    top = TopK(k=3)
    two = at_setting(top, 2)
    assert (top.k, two.k) == (3, 2)
    p = np.array([[0.5, 0.3, 0.15, 0.05]])
    np.testing.assert_allclose(two.transform(p), [[0.625, 0.375, 0.0, 0.0]])
    with pytest.raises(ConfigError, match=r"k: must be an integer >= 1"):
        at_setting(top, 0)
    with pytest.raises(ConfigError, match=r"decimals: must be an integer in 0\.\.15"):
        at_setting(Rounded(), -1)
    noise = Noise(kind="gaussian", scale=0.01, secret=SECRET)
    louder = at_setting(noise, 0.1)
    assert (louder.kind, louder.scale, noise.scale) == ("gaussian", 0.1, 0.01)
    assert set(KNOBS) == {"memguard", "purifier", "top_k", "round", "noise"}


def test_an_inverted_signal_counts_flipped_as_an_attacker_would_use_it():
    from types import SimpleNamespace

    from purifier import evaluation as ev

    rng = np.random.default_rng(0)
    membership = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    scores = rng.normal(size=600) - 0.5 * membership  # members score lower: a signal with the wrong sign
    auc = ev.roc_auc(scores, membership)
    lo, hi = ev.bootstrap_ci(ev.roc_auc, scores, membership, 50, 0)
    assert hi < 0.5
    t = ev.tpr_at_fpr(scores, membership, 0.01)
    entry = {"auc": auc, "ci95": {"auc": [lo, hi]},
             "tpr_at_fpr": {"0.01": {"tpr": t.tpr, "fpr": t.fpr, "negatives": 300}}}
    audit = SimpleNamespace(outcomes={"nn": SimpleNamespace(scores=scores)}, membership=membership)
    value, ci, tpr, flipped = attacker_view("nn", entry, audit)
    assert flipped and value == pytest.approx(ev.roc_auc(-scores, membership)) and value > 0.6
    assert ci == pytest.approx((1 - hi, 1 - lo))
    assert tpr["tpr"] == ev.tpr_at_fpr(-scores, membership, 0.01).tpr > t.tpr
    entry["ci95"]["auc"] = [0.45, 0.51]  # an interval that reaches 0.5: no real signal to flip
    assert attacker_view("nn", entry, audit) == (auc, (0.45, 0.51), entry["tpr_at_fpr"]["0.01"], False)
