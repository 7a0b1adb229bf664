"""Repeated-query attack: expose per-query randomness in a defense.

MemGuard's Phase II releases the noisy vector with probability p; if that coin (or any noise)
is re-drawn per query, repeating a query reveals the clean vector, and the spread between
answers itself leaks membership (docs/design.md#keyed-randomness; Jia et al. 2019 assume one query).
This attack asks about each record `repeats` times unchanged and `repeats` times with tiny
input perturbations (noise of `jitter` times the feature scale, which a deterministic defense
keyed on the row may still answer differently), keeps per record the answer with the largest
scaled confidence phi (the least defended-looking one, LiRA's statistic), and thresholds it as
fitted on the shadow models. The report also carries the mean L1 spread between answers to
identical queries: 0 for a deterministic defense.
"""

from __future__ import annotations

import numpy as np

from purifier.attacks.base import Attack, Family, fit_threshold
from purifier.attacks.lira import scaled_confidence


class RepeatedQueryAttack(Attack):
    name = "repeated_query"
    family = Family.REPEATED_QUERY

    def __init__(self, *, repeats: int = 4, jitter: float = 1e-3, seed: int = 0):
        super().__init__(seed=seed)
        self.repeats, self.jitter = repeats, jitter

    def fit(self, ctx):
        probs, labels, membership = ctx.shadows.stacked()
        self.scale = ctx.shadows.pool_X.std(axis=0) + 1e-6
        self.lo, self.hi = ctx.feature_range
        self.threshold = fit_threshold(scaled_confidence(probs, labels), membership)
        return self

    def run(self, target, X, y, outputs):
        rng = np.random.default_rng(self.seed)
        n, r = len(X), self.repeats
        same = np.broadcast_to(X, (r, *X.shape))
        jittered = np.clip(X[None] + self.jitter * self.scale * rng.standard_normal((r, *X.shape)),
                           self.lo, self.hi)
        before = target.queries
        answers = target.query(np.concatenate([same, jittered]).reshape(-1, X.shape[1]).astype(np.float32))
        self.queries = target.queries - before
        answers = answers.reshape(2 * r, n, -1)
        phi = np.stack([scaled_confidence(answers[i], y) for i in range(2 * r)])  # 2r batched calls
        spread = np.abs(answers[1:r] - answers[:1]).sum(axis=2)
        self.details = {"repeats": r, "jittered_repeats": r,
                        "mean_l1_spread_identical_queries": float(spread.mean()) if r > 1 else 0.0,
                        "max_l1_spread_identical_queries": float(spread.max()) if r > 1 else 0.0}
        return phi.max(axis=0)
