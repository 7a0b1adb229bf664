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
        r = self.repeats
        X32 = np.ascontiguousarray(X, np.float32)
        before = target.queries
        # one pass of N rows at a time (r unchanged, then r jittered): the (2r, N, D) block of
        # queries is never built; the noise is drawn in the same order as one (r, N, D) draw
        passes = [target.query(X32) for _ in range(r)]
        for _ in range(r):
            noise = rng.standard_normal(X.shape)
            passes.append(target.query(np.clip(X + self.jitter * self.scale * noise, self.lo, self.hi)))
        self.queries = target.queries - before
        answers = np.stack(passes)  # (2r, N, C)
        phi = np.stack([scaled_confidence(answers[i], y) for i in range(2 * r)])  # 2r batched calls
        spread = np.abs(answers[1:r] - answers[:1]).sum(axis=2)
        self.details = {"repeats": r, "jittered_repeats": r,
                        "mean_l1_spread_identical_queries": float(spread.mean()) if r > 1 else 0.0,
                        "max_l1_spread_identical_queries": float(spread.max()) if r > 1 else 0.0}
        return phi.max(axis=0)
