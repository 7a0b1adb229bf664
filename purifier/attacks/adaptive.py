"""Adaptive attacks: the attacker knows the defense algorithm and trains against it.

Following MemGuard's own evaluation (Jia et al. 2019, section 5: the attacker trains its attack
on defended shadow outputs) and PURIFIER's adaptive attack (Yang et al. 2020): the attacker
builds its own copy of the named defense (`defense_class(name)(secret=<its own secret>)`),
fits it on a `FitData` made from shadow model 0's outputs (its IN records as members, its OUT
records as the reference set), defends every shadow model's outputs with it, and then fits an
ordinary attack on those defended outputs. The target's answers are already defended by the
real defense and are scored as they come.

Simplification: one defense copy (fitted for shadow 0) defends all shadows' outputs, rather than
one fitted copy per shadow model; for defenses whose fit is a function of the outputs' profile
(not of a single model's weights) this is close, and it costs one fit instead of K.

The copy defends a random sample of the shadows' pool rows (`REFERENCE_ROWS`, drawn over all
shadows), not all K x P of them: a defense's cost grows with the rows it defends (MemGuard does
the same work for every row), and the attacks fitted on them use no more than the sample (the NN
attack trains on 20,000 rows; the class-wise thresholds get 400 rows per class of 100, as the
whole pool of the earlier 4-shadow default gave them).
"""

from __future__ import annotations

import hashlib

import numpy as np

from purifier.attacks.base import ConfidenceAttack, Family
from purifier.attacks.metric import ModifiedEntropyThreshold
from purifier.attacks.nn import NNLabelAttack
from purifier.errors import ConfigError


def attacker_secret(seed: int) -> bytes:
    """The attacker's own PRF key (it cannot know the defender's)."""
    return hashlib.sha256(f"purifier-audit-attacker-{seed}".encode()).hexdigest().encode()


REFERENCE_ROWS = 40_000


def defended_reference(ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shadow pool outputs through the attacker's copy of the defense, cached on `ctx`: a seeded
    sample of at most REFERENCE_ROWS (shadow, record) pairs, in stacked order.

    Returns (probs (M, C) float64, labels (M,), membership (M,) bool)."""
    if ctx.defended_reference is not None:
        return ctx.defended_reference
    from purifier.defenses import FitData, defense_class

    if not ctx.defense_name:
        raise ConfigError("adaptive attacks need the defense's algorithm name (--defense-name); "
                          "choose one of the registered defenses")
    sh = ctx.shadows
    defense = defense_class(ctx.defense_name)(secret=attacker_secret(ctx.seed))
    m = sh.pool_in[0]
    fit = FitData(member_probs=sh.pool_probs[0][m], reference_probs=sh.pool_probs[0][~m],
                  member_inputs=sh.pool_X[m], reference_inputs=sh.pool_X[~m],
                  member_labels=sh.pool_y[m], reference_labels=sh.pool_y[~m],
                  model_id="attacker-shadow-0")
    defense.fit(fit)
    probs, labels, membership = sh.stacked()
    rows = np.sort(np.random.default_rng([ctx.seed, 7]).permutation(len(labels))[:REFERENCE_ROWS])
    inputs = sh.pool_X[rows % len(sh.pool_y)] if defense.needs_inputs else None
    defended = defense.transform(probs[rows], inputs).astype(np.float64)  # one batched call
    ctx.defended_reference = (defended, labels[rows], membership[rows])
    return ctx.defended_reference


class _Adaptive(ConfidenceAttack):
    family = Family.ADAPTIVE

    def fit(self, ctx):
        probs, labels, membership = defended_reference(ctx)
        self.details = {"defense_copy": ctx.defense_name, "defended_shadow_rows": len(labels)}
        return self.fit_outputs(probs, labels, membership)


class AdaptiveNN(_Adaptive, NNLabelAttack):
    """NSH-style attack model trained on defended shadow outputs."""

    name = "adaptive_nn"


class AdaptiveMentr(_Adaptive, ModifiedEntropyThreshold):
    """Class-wise modified-entropy thresholds fitted on defended shadow outputs."""

    name = "adaptive_mentr"
