"""Label-only attacks on planted margins: a linear two-class oracle where members lie far from
the decision boundary and non-members close to it, so the true distances are known."""

import numpy as np
import pytest
from planted import LinearLabeler, context, planted_margin_data

from purifier import evaluation as ev
from purifier.attacks.label_only import (
    AugmentationAttack,
    BoundaryAttack,
    boundary_distance,
    image_augmentations,
)
from purifier.attacks.shadow import ShadowSet
from purifier.errors import ConfigError
from purifier.models.access import TargetAccess
from purifier.models.training import predict_proba

D = 8


class TorchTarget(TargetAccess):
    """A torch model behind the TargetAccess protocol (counts queries like any endpoint)."""

    def __init__(self, model, n_classes):
        super().__init__()
        self.model, self.n_classes, self.description = model, n_classes, "torch"

    def _query(self, X):
        return predict_proba(self.model, X)


def _setup(seed=0, n=200):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=D)
    model = LinearLabeler(w)
    pool_member = np.arange(n) % 2 == 0
    pool_X, pool_y, _ = planted_margin_data(n, D, pool_member, rng, w)
    ev_member = np.arange(n) % 2 == 1
    X, y, true_dist = planted_margin_data(n, D, ev_member, rng, w)
    probs = predict_proba(model, pool_X)[None]
    sh = ShadowSet([lambda X: predict_proba(model, X)], pool_X, pool_y, probs, pool_member[None], probs[:, :0], pool_member[None, :0])
    return model, sh, X, y, ev_member, true_dist


def test_boundary_distance_finds_the_true_margin_within_budget():
    model, sh, X, y, member, true_dist = _setup()
    oracle = sh.labels_fn(0)
    lo, hi = np.full(D, -8.0), np.full(D, 8.0)
    dist, spent = boundary_distance(oracle, X, y, 300, lo, hi, seed=0)
    assert spent.max() <= 300 and spent.min() > 30
    assert (dist >= true_dist - 1e-3).all()  # a found label change is never closer than the boundary
    assert np.median(dist / true_dist) < 1.3
    # already misclassified records are at distance 0 and cost one query
    d0, s0 = boundary_distance(oracle, X[:5], 1 - y[:5], 300, lo, hi)
    np.testing.assert_array_equal(d0, 0.0)
    np.testing.assert_array_equal(s0, 1)


@pytest.mark.parametrize("cls,kwargs", [(BoundaryAttack, {"budget": 200}), (AugmentationAttack, {"radius": 0.8})])
def test_label_only_attacks_beat_chance_and_count_queries(cls, kwargs):
    model, sh, X, y, member, _ = _setup(seed=1)
    ctx = context(sh)
    ctx.feature_range = (np.full(D, -8.0), np.full(D, 8.0))
    attack = cls(seed=0, **kwargs).fit(ctx)
    target = TorchTarget(model, 2)
    scores = attack.run(target, X, y, None)
    assert target.queries == attack.queries > len(X)
    if cls is BoundaryAttack:
        assert attack.details["max_queries_per_record"] <= 200
    assert ev.roc_auc(scores, member) > 0.9
    assert ev.balanced_accuracy(attack.predict(scores), member) > 0.8


def test_boundary_budget_is_validated():
    with pytest.raises(ConfigError, match="budget"):
        BoundaryAttack(budget=5)


def test_image_augmentations_shift_and_rotate():
    img = np.zeros((1, 1, 5, 5), np.float32)
    img[0, 0, 2, 2] = 1.0
    aug = image_augmentations(img.reshape(1, -1), (1, 5, 5), max_shift=1, angles=(90.0,))
    assert aug.shape == (9, 1, 25)  # 8 shifts + 1 rotation
    moved = aug[:8, 0].reshape(8, 5, 5)
    assert all(m.sum() == 1.0 and m[2, 2] == 0.0 for m in moved)  # every shift moves the pixel
    np.testing.assert_allclose(aug[8, 0].reshape(5, 5), img[0, 0], atol=1e-6)  # centre is rotation-invariant


def _calibrated_world(seed=2, n=300, k=4):
    """k linear shadows (the target's hyperplane, tilted) with IN/OUT masks over the candidates."""
    from purifier.attacks.shadow import balanced_in_masks

    rng = np.random.default_rng(seed)
    w = rng.normal(size=D)
    member = np.arange(n) % 2 == 0
    pool_X, pool_y, _ = planted_margin_data(n, D, member, rng, w)
    X, y, _ = planted_margin_data(n, D, ~member, rng, w)
    shadows = [LinearLabeler(w + rng.normal(0, 0.3, D)) for _ in range(k)]
    probs = np.stack([predict_proba(m, pool_X) for m in shadows])
    cand = np.stack([predict_proba(m, X) for m in shadows])
    sh = ShadowSet([lambda Z, m=m: predict_proba(m, Z) for m in shadows], pool_X, pool_y, probs,
                   balanced_in_masks(k, n, rng), cand, balanced_in_masks(k, n, rng))
    ctx = context(sh, n_classes=2, cand_y=y)
    ctx.feature_range = (np.full(D, -8.0), np.full(D, 8.0))
    return LinearLabeler(w), sh, ctx, X, y, ~member


def test_calibrated_augmentation_is_the_target_fraction_minus_the_out_shadows_fraction():
    """Copies made once per chunk and shown to the target and every shadow, shadows skipped where
    they are IN: the same scores as labelling each model's copies on its own."""
    from purifier.attacks.label_only import CalibratedAugmentationAttack

    model, sh, ctx, X, y, member = _calibrated_world()
    attack = CalibratedAugmentationAttack(radius=0.8, calibration_size=200)
    attack.CHUNK = 64  # several chunks, so offsets and per-chunk skips matter
    attack.fit(ctx)
    scores = attack.run(TorchTarget(model, 2), X, y, None)

    def fraction(fn):
        out = []
        for s in range(0, len(X), attack.CHUNK):
            copies = attack.augment(X[s:s + attack.CHUNK], s)
            pred = fn(copies.reshape(-1, D)).reshape(len(copies), -1)
            out.append((pred == y[None, s:s + attack.CHUNK]).mean(axis=0))
        return np.concatenate(out)

    target_frac = fraction(lambda Z: predict_proba(model, Z).argmax(1))
    shadow_frac = np.stack([fraction(sh.labels_fn(k)) for k in range(sh.n_shadows)])
    out = ~sh.cand_in
    expected = target_frac - (shadow_frac * out).sum(0) / out.sum(0)
    np.testing.assert_allclose(scores, expected)
    assert attack.queries == 11 * len(X) and np.isfinite(scores).all()


def test_augmentation_attacks_of_one_audit_send_their_common_copies_once():
    from purifier.attacks.base import RememberedLabels
    from purifier.attacks.label_only import CalibratedAugmentationAttack

    model, sh, ctx, X, y, member = _calibrated_world()
    target = TorchTarget(model, 2)
    asked = RememberedLabels(target)
    plain = AugmentationAttack(radius=0.8).fit(ctx)
    calibrated = CalibratedAugmentationAttack(radius=0.8, calibration_size=200).fit(ctx)
    raw = plain.run(asked, X, y, None)
    calibrated.run(asked, X, y, None)
    # each attack reports the rows it asked; the target saw them once
    assert plain.queries == calibrated.queries == 11 * len(X)
    assert asked.queries == 22 * len(X) and asked.rows_sent == target.queries == 11 * len(X)
    np.testing.assert_array_equal(raw, AugmentationAttack(radius=0.8).fit(ctx).run(TorchTarget(model, 2), X, y, None))
    # other rows are asked anew; probability queries always reach the target
    np.testing.assert_array_equal(asked.labels(X[:7] + 1.0), predict_proba(model, X[:7] + 1.0).argmax(1))
    asked.query(X[:5])
    asked.query(X[:5])
    assert target.queries == 11 * len(X) + 7 + 10 and asked.n_classes == 2
