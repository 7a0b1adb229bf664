"""RMIA and LiRA's variance choice: the pairwise comparison against a brute-force count, the
tempered probability against softmax(logits / T), planted leakage, and what `details` records."""

import numpy as np
import pytest
from planted import PlantedTarget, context, planted_world

from purifier import evaluation as ev
from purifier.attacks import attack_class
from purifier.attacks.rmia import reference_prob, rmia_scores, tempered_true_prob


def test_rmia_scores_count_the_population_records_dominated():
    rng = np.random.default_rng(0)
    log_rx, log_rz = rng.normal(size=300), rng.normal(size=1000)
    for gamma in (1.0, 2.0):
        scores = rmia_scores(log_rx, log_rz, gamma)
        brute = (np.exp(log_rx)[:, None] / np.exp(log_rz)[None, :] > gamma).mean(axis=1)
        np.testing.assert_allclose(np.floor(scores * (len(log_rz) + 1)) / len(log_rz), brute)
        assert (0 < scores).all() and (scores < 1).all()
        # ties inside one 1/Z step are broken by the ratio itself: the ranking is the ratio's
        assert (np.diff(scores[np.argsort(log_rx)]) > 0).all()


def test_tempered_probability_is_softmax_of_scaled_logits():
    logits = np.array([[3.0, 1.0, -2.0], [0.5, 0.4, 0.1]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for t in (1.0, 2.0, 4.0):
        expected = np.exp(logits / t) / np.exp(logits / t).sum(1, keepdims=True)
        np.testing.assert_allclose(tempered_true_prob(p, np.array([0, 2]), t), expected[[0, 1], [0, 2]])
    stacked = tempered_true_prob(np.stack([p, p]), np.array([0, 2]), 2.0)
    assert stacked.shape == (2, 2)


def test_reference_probability_offline_correction_and_online_average():
    p = np.array([[0.2, 0.9], [0.4, 0.5], [0.9, 0.7]])
    in_mask = np.array([[False, True], [False, False], [True, False]])
    # record 0: OUT mean 0.3, IN mean 0.9; record 1: OUT mean 0.6, IN mean 0.9
    np.testing.assert_allclose(reference_prob(p, in_mask, 0.3, online=False),
                               [0.65 * 0.3 + 0.35, 0.65 * 0.6 + 0.35])
    np.testing.assert_allclose(reference_prob(p, in_mask, 0.3, online=True), [0.6, 0.75])


def _rmia_and_lira(n_shadows, seed=0, **rmia_kwargs):
    w = planted_world(n_shadows=n_shadows, n_pool=1200, n_cand=1000, difficulty=True, seed=seed)
    ctx = context(w.shadows, cand_y=w.cand_y)
    target = PlantedTarget(w)
    rmia = attack_class("rmia")(n_population=500, **rmia_kwargs).fit(ctx)
    X = np.zeros((len(w.cand_y), 4))
    scores = rmia.run(target, X, w.cand_y, w.target)
    lira = attack_class("lira_online")().fit(ctx).run(None, X, w.cand_y, w.target)
    return w, rmia, scores, target, lira


@pytest.mark.parametrize("n_shadows", [2, 4])
def test_rmia_finds_planted_leakage_near_lira(n_shadows):
    w, rmia, scores, target, lira = _rmia_and_lira(n_shadows)
    assert rmia.queries == len(w.cand_y) + 500 and target.queries == 500  # population records only
    auc, auc_lira = ev.roc_auc(scores, w.cand_member), ev.roc_auc(lira, w.cand_member)
    assert auc > 0.85, auc
    assert auc > auc_lira - 0.05, (auc, auc_lira)
    # the threshold comes from shadows scored against one reference model fewer than the target:
    # with 2 shadows that is 1 against 2, and the hard decisions lose more than the ranking
    assert ev.balanced_accuracy(rmia.predict(scores), w.cand_member) > (0.75 if n_shadows > 2 else 0.6)
    d = rmia.details
    assert d["population"] == 500 and d["shadows"] == n_shadows and "leave-one-shadow-out" in d["tuning"]
    assert d["variant"] == ("online" if n_shadows == 4 else "offline")  # 2 shadows: one IN, one OUT


def test_rmia_single_reference_model_uses_defaults_and_still_leaks():
    w, rmia, scores, _, _ = _rmia_and_lira(1)
    assert rmia.details["a"] == 0.3 and rmia.details["temperature"] == 1.0
    assert "one shadow" in rmia.details["tuning"]
    assert ev.roc_auc(scores, w.cand_member) > 0.75


def test_rmia_rejects_bad_settings_and_foreign_records():
    with pytest.raises(ValueError, match="positive"):
        attack_class("rmia")(gamma=0.0)
    w, rmia, _, target, _ = _rmia_and_lira(2, a=0.5, temperature=2.0)
    assert rmia.details["a"] == 0.5 and rmia.details["temperature"] == 2.0
    with pytest.raises(ValueError, match="candidates"):
        rmia.run(target, np.zeros((10, 4)), w.cand_y[:10], w.target[:10])
    with pytest.raises(ValueError, match="confidence outputs"):
        rmia.run(target, np.zeros((len(w.cand_y), 4)), w.cand_y, None)


@pytest.mark.parametrize("n_shadows,variance", [(4, "fixed (global)"), (16, "per-example")])
def test_lira_variance_follows_the_shadow_count(n_shadows, variance):
    w = planted_world(n_shadows=n_shadows, seed=4)
    ctx = context(w.shadows, cand_y=w.cand_y)
    lira = attack_class("lira_online")().fit(ctx)
    assert lira.details["variance"] == variance and f"{n_shadows} shadows" in lira.details["variance_reason"]
    forced = attack_class("lira_online")(fixed_variance=variance != "per-example").fit(ctx)
    np.testing.assert_allclose(lira.score(w.target, w.cand_y), forced.score(w.target, w.cand_y))
    sd = lira._cand_stats["sd_in"]
    assert (np.ptp(sd) > 0) == (variance == "per-example")


def test_leave_one_shadow_out_reference_from_sums_equals_the_direct_mean():
    """The tuning loop removes shadow i from all-shadow sums instead of re-averaging the other
    K-1 (O(K P) instead of O(K^2 P) per setting); it must equal reference_prob over the rest."""
    from purifier.attacks.rmia import _in_out_sums, _reference_from_sums, reference_prob

    rng = np.random.default_rng(3)
    p, m = rng.random((6, 40)), rng.random((6, 40)) < 0.5
    m[:, 0], m[:, 1] = True, False  # records with no OUT and no IN shadow at all
    sums = _in_out_sums(p, m)
    for online in (True, False):
        for i in range(6):
            rest = np.arange(6) != i
            held = _reference_from_sums(sums[0] - np.where(m[i], p[i], 0.0), sums[1] - m[i],
                                        sums[2] - np.where(m[i], 0.0, p[i]), sums[3] - ~m[i], 0.3, online)
            np.testing.assert_allclose(held, reference_prob(p[rest], m[rest], 0.3, online), rtol=1e-12)
