"""Difficulty-calibrated label-only attacks: the score against a hand-computed case, the
online/offline choice, and power at low FPR where the uncalibrated gap attack has none."""

import numpy as np
import pytest
from planted import LinearLabeler, context, planted_world
from scipy.stats import norm

from purifier import evaluation as ev
from purifier.attacks import attack_class
from purifier.attacks.calibrated import calibrated_correctness, log_margin
from purifier.attacks.label_only import (
    CalibratedAugmentationAttack,
    out_mean,
    tabular_augmentations,
)
from purifier.attacks.reference_stats import gaussian_fits
from purifier.attacks.shadow import ShadowSet
from purifier.models.access import TargetAccess
from purifier.models.training import predict_proba


def _softmax(logits):
    e = np.exp(np.asarray(logits, np.float64))
    return e / e.sum(axis=-1, keepdims=True)


class FixedAnswers(TargetAccess):
    """Answers fixed probability rows in order (counts queries like any endpoint)."""

    def __init__(self, probs):
        super().__init__()
        self.probs, self.n_classes, self.description = probs, probs.shape[1], "fixed"

    def _query(self, X):
        return self.probs[: len(X)]


def _hand_case():
    """3 shadows, 2 candidates. Margins m = logit_y - max other logit:
    record 0 (label 0): shadows 0, 1 OUT with m = 2, 1; shadow 2 IN with m = 4;
    record 1 (label 1): shadow 0 OUT with m = -1; shadows 1, 2 IN with m = 3, 5."""
    logits = np.array([
        [[2, 0, 0], [0, -1, 0]],
        [[1, 0, 0], [0, 3, 0]],
        [[4, 0, 0], [0, 5, 0]],
    ], np.float64)
    cand_in = np.array([[False, False], [False, True], [True, True]])
    y = np.array([0, 1])
    probs = _softmax(logits)
    sh = ShadowSet([], np.zeros((2, 3), np.float32), y, probs, cand_in, probs, cand_in)
    # the target gets record 0 right and record 1 wrong
    target = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]])
    return sh, y, target


def test_label_calibrated_matches_hand_computation():
    sh, y, target = _hand_case()
    # OUT means 1.5 and -1, IN means 4 and 4; residuals +-0.5, 0 | 0, +-1: global sd sqrt(2.5 / 6)
    sd = np.sqrt(2.5 / 6)
    mu_out, mu_in = np.array([1.5, -1.0]), np.array([4.0, 4.0])
    offline = attack_class("label_calibrated")(online=False).fit(context(sh, n_classes=3, cand_y=y))
    scores = offline.run(None, np.zeros((2, 3)), y, target)
    np.testing.assert_allclose(scores, [1 - norm.cdf(1.5 / sd), 0 - norm.cdf(-1.0 / sd)], rtol=1e-9)
    assert offline.queries == 2 and offline.details["variant"] == "offline"

    online = attack_class("label_calibrated")(online=True)
    online.fit(context(sh, n_classes=3, cand_y=y))
    # 3 shadows cannot give every record 2 IN and 2 OUT: the online request falls back, saying why
    assert online.details["variant"] == "offline" and "online needs" in online.details["variant_reason"]
    margins = np.array([[2.0, -1.0], [1.0, 3.0], [4.0, 5.0]])
    np.testing.assert_allclose(log_margin(sh.cand_probs, y), margins, atol=1e-12)
    fits = gaussian_fits(margins, sh.cand_in, per_example_variance=False)
    np.testing.assert_allclose(fits["mu_out"], mu_out)
    np.testing.assert_allclose(fits["mu_in"], mu_in)
    np.testing.assert_allclose(fits["sd_out"], sd)
    lr = calibrated_correctness(np.array([True, False]), fits, online=True)
    zi, zo = mu_in / sd, mu_out / sd
    np.testing.assert_allclose(lr, [np.log(norm.cdf(zi[0]) / norm.cdf(zo[0])),
                                    np.log(norm.sf(zi[1]) / norm.sf(zo[1]))], rtol=1e-9)


def test_label_calibrated_without_outputs_asks_for_labels_only():
    sh, y, target = _hand_case()
    attack = attack_class("label_calibrated")().fit(context(sh, n_classes=3, cand_y=y))
    endpoint = FixedAnswers(target)
    with_labels = attack.run(endpoint, np.zeros((2, 3), np.float32), y, None)
    np.testing.assert_array_equal(with_labels, attack.run(None, np.zeros((2, 3)), y, target))
    assert endpoint.queries == 2 and attack.family == "label_only"
    with pytest.raises(ValueError, match="candidates"):
        attack.run(None, np.zeros((1, 3)), y[:1], target[:1])


def test_label_calibrated_finds_members_at_low_fpr_where_gap_cannot():
    """Per-record difficulty: hard records are right only when trained on. The gap attack ties
    every correct record; calibration ranks the hard-but-correct ones first."""
    w = planted_world(n_shadows=4, n_pool=2000, n_cand=4000, difficulty=True, seed=3)
    ctx = context(w.shadows, cand_y=w.cand_y)
    gap = attack_class("gap")().fit(ctx).score(w.target, w.cand_y)
    cal = attack_class("label_calibrated")().fit(ctx)
    scores = cal.run(None, np.zeros((len(w.cand_y), 4)), w.cand_y, w.target)
    tpr_gap = ev.tpr_at_fpr(gap, w.cand_member, 0.01)
    tpr_cal = ev.tpr_at_fpr(scores, w.cand_member, 0.01)
    assert tpr_cal.measurable and tpr_gap.tpr == 0.0
    assert tpr_cal.tpr > 0.04, tpr_cal  # four times chance (0.01)
    assert ev.roc_auc(scores, w.cand_member) > ev.roc_auc(gap, w.cand_member) + 0.05
    # every record is IN for 2 of the 4 shadows: the online variant runs
    assert cal.details["variant"] == "online" and cal.details["records_without_out_shadow"] == 0
    assert 0.6 < ev.balanced_accuracy(cal.predict(scores), w.cand_member)


def test_binary_columns_are_flipped_and_the_rest_noised():
    rng = np.random.default_rng(0)
    X = np.c_[rng.integers(0, 2, (500, 40)), rng.normal(size=(500, 2))].astype(np.float32)
    binary = np.r_[np.ones(40, bool), np.zeros(2, bool)]
    copies = tabular_augmentations(X, np.ones(42), n_copies=6, radius=0.1, seed=1, binary=binary, flip_prob=0.05)
    flipped = copies[:, :, :40] != X[None, :, :40]
    assert set(np.unique(copies[:, :, :40])) == {0.0, 1.0}
    assert abs(flipped.mean() - 0.05) < 0.005
    moved = np.abs(copies[:, :, 40:] - X[None, :, 40:])
    assert moved.max() <= 0.1 + 1e-6 and moved.mean() > 0.02


def test_calibrated_augmentation_subtracts_the_out_shadows_fraction():
    """Target and shadows are linear labellers with different boundaries; the score is the
    target's fraction of correct copies minus the mean over each record's OUT shadows."""
    rng = np.random.default_rng(0)
    d, n = 6, 300
    w = rng.normal(size=d)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X @ w > 0).astype(np.int64)
    models = [LinearLabeler(w + rng.normal(0, s, d)) for s in (0.5, 1.0, 1.5)]
    cand_in = rng.random((3, n)) < 0.4
    pool_in = rng.random((3, n)) < 0.4
    probs = np.stack([predict_proba(m, X) for m in models])
    predictors = [lambda rows, m=m: predict_proba(m, rows) for m in models]  # ShadowSet holds callables
    sh = ShadowSet(predictors, X, y, probs, pool_in, probs, cand_in)
    ctx = context(sh, n_classes=2, cand_y=y)
    attack = CalibratedAugmentationAttack(radius=0.5, calibration_size=n).fit(ctx)
    endpoint = FixedAnswers(np.zeros((0, 2)))
    target_model = LinearLabeler(w)
    endpoint._query = lambda rows: predict_proba(target_model, rows)
    scores = attack.run(endpoint, X, y, None)
    assert endpoint.queries == attack.queries == 11 * n
    frac = lambda model: (predict_proba(model, attack.augment(X).reshape(-1, d)).argmax(1)  # noqa: E731
                          .reshape(11, n) == y).mean(axis=0)
    expected = frac(target_model) - out_mean(np.stack([frac(m) for m in models]), cand_in)
    np.testing.assert_allclose(scores, expected)
    assert attack.details["shadows_used"] == 3 and attack.details["copies_per_record"] == 11
