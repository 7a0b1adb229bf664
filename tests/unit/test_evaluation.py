import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from purifier import evaluation as ev


@given(st.integers(0, 10_000), st.integers(2, 60), st.integers(2, 60), st.booleans())
@settings(max_examples=60, deadline=None)
def test_auc_matches_sklearn_including_ties(seed, n_pos, n_neg, coarse):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n_pos + n_neg)
    if coarse:  # many ties
        scores = np.round(scores)
    membership = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    assert ev.roc_auc(scores, membership) == pytest.approx(roc_auc_score(membership, scores), abs=1e-12)


def test_roc_curve_matches_sklearn_points():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=300), 1)
    membership = rng.random(300) < 0.4
    fpr, tpr, _ = ev.roc_curve(scores, membership)
    sk_fpr, sk_tpr, _ = sk_roc_curve(membership, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(2)
    membership = rng.random(200) < 0.3
    pred = rng.random(200) < 0.5
    assert ev.balanced_accuracy(pred, membership) == pytest.approx(balanced_accuracy_score(membership, pred))


def test_tpr_at_fpr_hand_computed():
    # members 0.9 0.8 0.3, non-members 0.85 0.2 0.1 0.05
    scores = np.array([0.9, 0.8, 0.3, 0.85, 0.2, 0.1, 0.05])
    membership = np.array([1, 1, 1, 0, 0, 0, 0])
    r = ev.tpr_at_fpr(scores, membership, 0.0)
    assert (r.tpr, r.fpr, r.negatives) == (pytest.approx(1 / 3), 0.0, 4)
    assert not r.measurable  # 0 < 1/4
    r = ev.tpr_at_fpr(scores, membership, 0.2)  # below one false positive: still TPR at FPR 0
    assert (r.tpr, r.fpr, r.measurable) == (pytest.approx(1 / 3), 0.0, False)
    r = ev.tpr_at_fpr(scores, membership, 0.25)  # admitting 0.85 lets the threshold fall to 0.3
    assert (r.tpr, r.fpr, r.measurable) == (1.0, 0.25, True)


def test_tpr_at_low_fpr_flags_unmeasurable():
    rng = np.random.default_rng(3)
    membership = np.r_[np.ones(500), np.zeros(500)]
    r = ev.tpr_at_fpr(rng.normal(size=1000), membership, 0.001)
    assert r.negatives == 500 and not r.measurable and r.fpr == 0.0


def test_best_balanced_accuracy_and_gap_floor_formula():
    acc_m, acc_n = 0.98, 0.80
    correct = np.r_[np.arange(100) < 98, np.arange(100) < 80]
    membership = np.r_[np.ones(100), np.zeros(100)]
    floor = ev.gap_floor(correct, membership)
    assert floor["balanced_accuracy"] == pytest.approx(0.5 + (acc_m - acc_n) / 2)
    best, _ = ev.best_balanced_accuracy(correct.astype(float), membership)
    assert best == pytest.approx(floor["balanced_accuracy"])


def test_bootstrap_ci_brackets_estimate_and_is_seeded():
    rng = np.random.default_rng(4)
    membership = np.r_[np.ones(300), np.zeros(300)]
    scores = rng.normal(size=600) + 0.5 * membership
    lo, hi = ev.bootstrap_ci(ev.roc_auc, scores, membership, n_boot=200, seed=7)
    auc = ev.roc_auc(scores, membership)
    assert lo < auc < hi and hi - lo < 0.2
    assert (lo, hi) == ev.bootstrap_ci(ev.roc_auc, scores, membership, n_boot=200, seed=7)


def test_bootstrap_ci_is_the_percentile_interval_of_stratified_resamples():
    """The interval equals the textbook loop (members and non-members resampled with replacement
    from the same seeded draws, the metric on each resample), also with ties in the scores."""
    rng = np.random.default_rng(5)
    membership = np.r_[np.ones(400, bool), np.zeros(700, bool)]
    scores = np.round(rng.normal(size=1100) + 0.6 * membership, 1)  # many ties
    tpr = lambda s, m: ev.tpr_at_fpr(s, m, 0.01).tpr  # noqa: E731
    for metric in (ev.roc_auc, tpr):
        draws = np.random.default_rng(3)
        pos, neg = np.nonzero(membership)[0], np.nonzero(~membership)[0]
        values = []
        for _ in range(100):
            idx = np.r_[pos[draws.integers(0, len(pos), len(pos))], neg[draws.integers(0, len(neg), len(neg))]]
            values.append(metric(scores[idx], membership[idx]))
        expected = np.quantile(values, [0.025, 0.975])
        np.testing.assert_allclose(ev.bootstrap_ci(metric, scores, membership, n_boot=100, seed=3), expected,
                                   rtol=0, atol=1e-12)


def test_rejects_one_class_and_nan():
    with pytest.raises(ValueError, match="both members and non-members"):
        ev.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        ev.roc_auc([np.nan, 0.2], [1, 0])


# --- utility: clean vs defended vectors --------------------------------------------------------------

def test_brier_score_hand_computed():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    # row 0 (label 0): 0.3^2 + 0.2^2 + 0.1^2 = 0.14; row 1 (label 2): 0.2^2 + 0.5^2 + 0.7^2 = 0.78
    assert ev.brier_score(probs, np.array([0, 2])) == pytest.approx(0.46)
    assert ev.brier_score(np.eye(3), np.arange(3)) == 0.0


def test_expected_calibration_error_hand_computed():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.4, 0.3, 0.3], [0.5, 0.5, 0.0]])
    labels = np.array([0, 1, 0, 0, 1])
    # two bins (0, 0.5] and (0.5, 1]: high bin {0.9 ok, 0.8 wrong, 0.6 ok}: |2/3 - 0.7667| * 3/5;
    # low bin {0.4 ok, 0.5 wrong (predicts class 0)}: |1/2 - 0.45| * 2/5
    expected = abs(2 / 3 - 2.3 / 3) * 3 / 5 + abs(0.5 - 0.45) * 2 / 5
    assert ev.expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(expected)
    assert ev.expected_calibration_error(np.eye(4), np.arange(4)) == 0.0


def test_spearman_hand_computed_and_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    assert ev.spearman(np.array([1, 2, 3, 4.0]), np.array([1, 3, 2, 4.0])) == pytest.approx(0.8)
    rng = np.random.default_rng(5)
    a, b = np.round(rng.normal(size=200), 1), np.round(rng.normal(size=200), 1)
    assert ev.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert ev.spearman(a, np.ones(200)) is None


def test_distinct_fraction_and_l1_summary():
    assert ev.distinct_fraction(np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])) == pytest.approx(2 / 3)
    s = ev.l1_summary(np.array([0.2, 0.5, 0.2, 0.4]))
    # p95 with linear interpolation: position 0.95 * 3 = 2.85 in [0.2, 0.2, 0.4, 0.5]
    assert s == ev.L1Summary(pytest.approx(0.325), pytest.approx(0.485), 0.5, 4)


def test_output_utility_hand_computed_two_class():
    clean = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8],  # non-members
                      [0.99, 0.01], [0.05, 0.95]])                      # members
    defended = np.array([[0.8, 0.2], [0.85, 0.15], [0.4, 0.6], [0.4, 0.6],
                         [0.98, 0.02], [0.55, 0.45]])                   # last row changes its label
    labels = np.array([0, 1, 1, 1, 0, 1])
    membership = np.array([0, 0, 0, 0, 1, 1])
    u = ev.output_utility(clean, defended, labels, membership)
    assert u.argmax_agreement == pytest.approx(5 / 6)
    assert u.l1_nonmembers == ev.L1Summary(pytest.approx(0.325), pytest.approx(0.485), 0.5, 4)
    assert u.l1_members == ev.L1Summary(pytest.approx(0.51), pytest.approx(0.951), 1.0, 2)
    # Brier on non-members: (0.02 + 0.72 + 0.18 + 0.08) / 4 before, (0.08 + 1.445 + 0.32 + 0.32) / 4 after
    assert u.brier == ev.BeforeAfter(pytest.approx(0.25), pytest.approx(0.54125))
    # class-1 score on non-members: before every positive outranks the negative (0.1); after, 0.15 < 0.2
    assert u.auroc == ev.BeforeAfter(1.0, pytest.approx(2 / 3))
    # true-class probability 0.9, 0.4, 0.7, 0.8 -> 0.8, 0.15, 0.6, 0.6: ranks 4,1,2,3 vs 4,1,2.5,2.5
    assert u.true_class_rank_agreement == pytest.approx(np.sqrt(0.9))
    assert u.distinct_fraction == ev.BeforeAfter(1.0, 0.75)
    assert u.ece.after == pytest.approx(ev.expected_calibration_error(defended[:4], labels[:4]))


def test_output_utility_multiclass_has_no_auroc_and_rejects_members_only():
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(5), size=20)
    u = ev.output_utility(p, p.astype(np.float32), rng.integers(0, 5, 20), np.arange(20) < 10)
    assert u.auroc is None and u.l1_nonmembers.max < 1e-6 and u.true_class_rank_agreement > 0.99
    with pytest.raises(ValueError, match="non-members"):
        ev.output_utility(p, p, np.zeros(20, int), np.ones(20))


def test_bootstrap_intervals_resample_like_bootstrap_ci():
    rng = np.random.default_rng(7)
    m = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    s = rng.normal(size=400) + 0.5 * m
    both = ev.bootstrap_intervals(lambda x, y: (ev.roc_auc(x, y), ev.tpr_at_fpr(x, y, 0.01).tpr), s, m, 40, 3)
    assert both[0] == ev.bootstrap_ci(ev.roc_auc, s, m, 40, 3)
    assert both[1] == ev.bootstrap_ci(lambda x, y: ev.tpr_at_fpr(x, y, 0.01).tpr, s, m, 40, 3)
