"""Budget sweeps: the choice rule on planted attack results, setting order, and copies of fitted defenses."""

import numpy as np
import pytest
from strong_secret import SECRET

from purifier import evaluation as ev
from purifier.audit.results import Best, Strongest, Tpr
from purifier.audit.sweep import SweepPoint, choose, label_only_floor
from purifier.defenses import baseline_defenses, defense_class, tunable_defenses
from purifier.defenses.baselines import Noise, Rounded, TopK
from purifier.errors import ConfigError

TPR = Tpr(0.0, 0.0, 400, True, (0.0, 0.01))
FLOOR = Strongest(Best("gap", 0.515, (0.507, 0.524), False), Best("gap", 0.0, (0.0, 0.01), False, TPR),
                  Best("gap", 0.0, (0.0, 0.01), False, TPR))


def utility(l1: float, agreement: float = 1.0) -> ev.OutputUtility:
    s, ba = ev.L1Summary(l1, l1, l1, 400), ev.BeforeAfter(0.1, 0.1)
    return ev.OutputUtility(agreement, s, s, ba, ba, None, 1.0, ba)


def planted(defense, setting, auc, agreement=1.0):
    return SweepPoint(defense, setting, f"{setting}", Best("loss", auc, (auc - 0.03, auc + 0.03), False),
                      Best("loss", 0.0, None, False, TPR), {"loss": auc},
                      utility(0.0 if setting is None else 0.01, agreement))


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


def test_the_floor_is_the_runners_strongest_label_only_attack():
    from types import SimpleNamespace

    assert label_only_floor(SimpleNamespace(label_only_floor=FLOOR)) is FLOOR
    with pytest.raises(ConfigError, match="no label-only attack"):
        label_only_floor(SimpleNamespace(label_only_floor=None))


@pytest.mark.parametrize(("name", "text", "order"), [
    ("memguard", "1,0.01,0.1,0.1", [0.01, 0.1, 1.0]),
    ("top_k", "1,3,2", [3, 2, 1]),  # fewer scores kept = stronger
    ("round", "0,3", [3, 0]),
    ("purifier", "none,0.5,0.05", [0.05, 0.5, None]),  # no cap is the strongest
])
def test_grids_run_from_the_weakest_setting(name, text, order):
    assert defense_class(name).knob.parse(text) == order


@pytest.mark.parametrize(("name", "text", "message"), [
    ("top_k", "2,x", "'x' is not an integer"),
    ("memguard", "nan", "not a finite number"),
    ("memguard", " , ", "at least one epsilon"),
])
def test_bad_grid_text_is_named(name, text, message):
    with pytest.raises(ConfigError, match=message):
        defense_class(name).knob.parse(text)


def test_each_defense_carries_its_budget_facts():
    assert set(tunable_defenses()) == {"memguard", "purifier", "top_k", "round", "noise"}
    assert set(baseline_defenses()) == {"label_only", "top_k", "round", "noise"}
    assert defense_class("label_only").knob is None and defense_class("none").knob is None
    for name, cls in tunable_defenses().items():  # every default grid is valid for its own defense
        for value in cls.knob.grid:
            assert getattr(cls(**{cls.knob.param: value}), cls.knob.param) == value, name
    for cls in baseline_defenses().values():
        for value in cls.baseline_grid:
            cls().with_budget(value)


def test_with_budget_copies_and_checks_with_the_defenses_own_rules():
    top = TopK(k=3)
    two = top.with_budget(2)
    assert (top.k, two.k) == (3, 2)
    p = np.array([[0.5, 0.3, 0.15, 0.05]])
    np.testing.assert_allclose(two.transform(p), [[0.625, 0.375, 0.0, 0.0]])
    with pytest.raises(ConfigError, match=r"k: must be an integer >= 1"):
        top.with_budget(0)
    with pytest.raises(ConfigError, match=r"decimals: must be an integer in 0\.\.15"):
        Rounded().with_budget(-1)
    noise = Noise(kind="gaussian", scale=0.01, secret=SECRET)
    louder = noise.with_budget(0.1)
    assert (louder.kind, louder.scale, noise.scale) == ("gaussian", 0.1, 0.01)
    with pytest.raises(ConfigError, match="label_only: this defense has no budget"):
        defense_class("label_only")().with_budget(2)


def test_an_inverted_signal_counts_flipped_as_an_attacker_would_use_it():
    from planted_reports import entry

    rng = np.random.default_rng(0)
    membership = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    scores = rng.normal(size=600) - 0.5 * membership  # members score lower: a signal with the wrong sign
    nn = entry("nn", scores, membership)
    lo, hi = nn.ranking.auc_ci95
    assert hi < 0.5 and nn.inverted
    best = Strongest.among([nn])
    assert best.auc.flipped and best.auc.value == pytest.approx(ev.roc_auc(-scores, membership))
    assert best.auc.value > 0.6
    assert best.auc.label == "nn (flipped)"
    assert best.tpr_1pct.value == ev.tpr_at_fpr(-scores, membership, 0.01).tpr > nn.ranking.tpr_1pct.tpr
    weak = entry("nn", rng.normal(size=600), membership)  # an interval that reaches 0.5: no real signal to flip
    assert not weak.inverted and Strongest.among([weak]).auc.value == weak.ranking.auc
