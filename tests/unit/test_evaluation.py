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


def test_rejects_one_class_and_nan():
    with pytest.raises(ValueError, match="both members and non-members"):
        ev.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        ev.roc_auc([np.nan, 0.2], [1, 0])
