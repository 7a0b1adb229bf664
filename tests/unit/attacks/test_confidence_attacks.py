"""Metric, NN and LiRA attacks: formulas against hand-computed values, planted leakage, and
thresholds that come from shadow data only."""

import numpy as np
import pytest
from planted import context, planted_probs, planted_shadows

from purifier import evaluation as ev
from purifier.attacks import DEFAULT_ATTACKS, FAMILIES, REGISTRY, attack_class, parse_attacks
from purifier.attacks.lira import scaled_confidence
from purifier.attacks.metric import confidence, neg_entropy, neg_loss, neg_modified_entropy
from purifier.errors import ConfigError

P = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
Y = np.array([0, 1])


def test_metric_formulas_match_hand_computation():
    np.testing.assert_allclose(confidence(P, Y), [0.7, 0.3])
    ent = [-(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)),
           -(0.1 * np.log(0.1) + 0.3 * np.log(0.3) + 0.6 * np.log(0.6))]
    np.testing.assert_allclose(neg_entropy(P, Y), -np.array(ent))
    # Mentr = -(1-p_y) log p_y - sum_{i!=y} p_i log(1-p_i)
    m0 = -(0.3 * np.log(0.7)) - (0.2 * np.log(0.8) + 0.1 * np.log(0.9))
    m1 = -(0.7 * np.log(0.3)) - (0.1 * np.log(0.9) + 0.6 * np.log(0.4))
    np.testing.assert_allclose(neg_modified_entropy(P, Y), [-m0, -m1])
    np.testing.assert_allclose(neg_loss(P, Y), np.log([0.7, 0.3]))
    np.testing.assert_allclose(scaled_confidence(P, Y), [np.log(0.7 / 0.3), np.log(0.3 / 0.7)])


def test_scaled_confidence_stays_finite_and_ordered_for_confident_rows():
    # 1 - p_y rounds to 0 here; summing the other classes does not
    p = np.array([[1 - 2e-17, 1e-17, 1e-17], [1 - 2e-12, 1e-12, 1e-12]])
    phi = scaled_confidence(p, np.array([0, 0]))
    assert np.isfinite(phi).all() and phi[0] > phi[1] > 25


@pytest.mark.parametrize("name", ["gap", "confidence", "entropy", "mentr", "loss", "entropy_global",
                                  "mentr_global", "loss_global", "nn", "nn_label", "lira_online", "lira_offline"])
def test_confidence_attack_beats_chance_on_planted_leakage(name):
    sh, cand_y, member, target = planted_shadows()
    attack = attack_class(name)(seed=0).fit(context(sh, cand_y=cand_y))
    scores = attack.run(None, np.zeros((len(cand_y), 4)), cand_y, target)
    assert scores.shape == (len(cand_y),) and np.isfinite(scores).all()
    assert attack.queries == len(cand_y)
    auc = ev.roc_auc(scores, member)
    ba = ev.balanced_accuracy(attack.predict(scores), member)
    if name == "gap":  # members always right, non-members right ~97%: the weak floor signal
        assert 0.5 < ba < 0.6
    else:
        assert auc > 0.85, auc
        assert ba > 0.75, ba


def test_classwise_thresholds_follow_each_class():
    # class 0 members have p_y ~0.95, non-members ~0.85; class 1 members ~0.6, non-members ~0.4
    rng = np.random.default_rng(0)
    n = 400
    y = np.repeat([0, 1], n)
    member = np.tile(np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)], 2)
    center = np.where(y == 0, np.where(member, 0.95, 0.85), np.where(member, 0.6, 0.4))
    py = np.clip(center + rng.normal(0, 0.02, 2 * n), 0.01, 0.99)
    probs = np.stack([np.where(y == 0, py, 1 - py), np.where(y == 0, 1 - py, py)], axis=1)
    a = attack_class("confidence")().fit_outputs(probs, y, member)
    assert 0.85 < a.class_thresholds[0] < 0.95 and 0.4 < a.class_thresholds[1] < 0.6
    assert ev.balanced_accuracy(a.predict(a.score(probs, y)), member) > 0.95
    # one global threshold cannot separate both classes this well
    assert ev.best_balanced_accuracy(py, member)[0] < 0.8


@pytest.mark.parametrize("name", ["loss", "mentr", "entropy"])
def test_global_threshold_variant_ranks_by_the_metric_and_beats_noisy_class_thresholds(name):
    """Many classes with few shadow rows each: class-wise thresholds fitted on a handful of rows
    are noisy and scramble the ranking of a signal that is the same for every class; the global
    variant ranks by the metric itself and keeps it."""
    rng = np.random.default_rng(3)
    n_classes, n = 50, 4000

    def rows(member):
        y = rng.integers(0, n_classes, len(member))
        return planted_probs(y, member, rng, n_classes), y  # the same signal in every class
    shadow_member = rng.random(600) < 0.5  # 12 shadow rows per class
    probs, y = rows(shadow_member)
    member = rng.random(n) < 0.5
    target, ty = rows(member)
    wise = attack_class(name)().fit_outputs(probs, y, shadow_member)
    glob = attack_class(f"{name}_global")().fit_outputs(probs, y, shadow_member)
    assert attack_class(f"{name}_global").family == "confidence" and f"{name}_global" in DEFAULT_ATTACKS
    s_glob = glob.score(target, ty)
    metric = type(wise).metric
    assert ev.roc_auc(s_glob, member) == pytest.approx(ev.roc_auc(metric(target, ty), member))
    auc_wise, auc_glob = ev.roc_auc(wise.score(target, ty), member), ev.roc_auc(s_glob, member)
    assert auc_glob > auc_wise + 0.02, (auc_glob, auc_wise)
    assert np.isfinite(s_glob).all()


def test_threshold_comes_from_shadows_not_from_evaluation_membership():
    """Shadow members are planted with a different confidence level than the evaluation ones:
    the attack's own threshold must then be worse than the oracle, and scores must not depend
    on which evaluation records are members."""
    sh, cand_y, member, target = planted_shadows(seed=1)
    attack = attack_class("confidence")(seed=0).fit(context(sh))
    thresholds = attack.class_thresholds.copy()
    scores = attack.run(None, np.zeros((len(cand_y), 4)), cand_y, target)
    # flatten the evaluation outputs: the real target is less confident than the shadows
    flat = target ** 0.3
    flat /= flat.sum(axis=1, keepdims=True)
    s_flat = attack.run(None, np.zeros((len(cand_y), 4)), cand_y, flat)
    np.testing.assert_array_equal(attack.class_thresholds, thresholds)  # running never refits
    own = ev.balanced_accuracy(attack.predict(s_flat), member)
    oracle = ev.best_balanced_accuracy(s_flat, member)[0]
    assert own < oracle - 0.1, (own, oracle)  # the shadow threshold does not fit this target
    assert ev.roc_auc(s_flat, member) > 0.85  # though the ranking still leaks
    assert np.isfinite(scores).all()


def test_lira_online_uses_per_example_difficulty():
    """With per-example difficulty, calibrating on IN/OUT shadows beats a global threshold."""
    sh, cand_y, member, target = planted_shadows(difficulty=True, n_shadows=8, seed=2)
    ctx = context(sh, cand_y=cand_y)
    lira = attack_class("lira_online")().fit(ctx)
    conf = attack_class("confidence")().fit(ctx)
    auc_lira = ev.roc_auc(lira.score(target, cand_y), member)
    auc_conf = ev.roc_auc(conf.score(target, cand_y), member)
    assert auc_lira > auc_conf + 0.05, (auc_lira, auc_conf)


def test_lira_rejects_records_it_has_no_shadows_for():
    sh, cand_y, member, target = planted_shadows()
    lira = attack_class("lira_offline")().fit(context(sh, cand_y=cand_y))
    with pytest.raises(ValueError, match="candidates"):
        lira.score(target[:10], cand_y[:10])


def test_registry_and_parsing():
    assert "label_boundary" not in DEFAULT_ATTACKS and set(DEFAULT_ATTACKS) < set(REGISTRY)
    assert parse_attacks(["gap,loss", "nn"]) == ["gap", "loss", "nn"]
    assert parse_attacks("all") == list(REGISTRY)
    for name in REGISTRY:
        cls = attack_class(name)
        assert cls.name == name and cls.family in FAMILIES
    with pytest.raises(ConfigError, match="unknown attack 'lira2'.*choose from gap"):
        parse_attacks("gap,lira2")
