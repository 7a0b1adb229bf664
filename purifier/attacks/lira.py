"""LiRA, the likelihood-ratio attack (Carlini et al. 2022, "Membership Inference Attacks From
First Principles").

The statistic is the scaled confidence phi = log p_y - log sum_{i != y} p_i, computed from the
sum of the other classes (not 1 - p_y, which rounds to 0 for confident rows). Per candidate,
Gaussians are fitted to phi under shadow models that trained on it (IN) and did not (OUT)
(`reference_stats.gaussian_fits`).

* online: score = log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out);
* offline: the one-sided test against OUT only, score = (phi - mu_out) / s_out; `lira_online`
  falls back to it when too few shadows hold each candidate IN and OUT (`choose_online`: with 4
  shadows only ~38% of records have two of each), and `details["variant_reason"]` says so;
* variance: one global standard deviation below 16 shadow models (the paper finds it works best
  with few models), per-example standard deviations from 16 on; `details` says which ran.

The decision threshold is fitted on the attacker's pool by leave-one-shadow-out: each shadow
model plays the target in turn, scored against the statistics of the other shadows.
"""

from __future__ import annotations

import numpy as np

from purifier.attacks.base import ConfidenceAttack, fit_threshold
from purifier.attacks.reference_stats import (
    choose_online,
    choose_variance,
    gaussian_fits,
    leave_one_shadow_out,
)

PHI_CLIP = 60.0


def scaled_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, C) or (K, N, C), (N,) -> (N,) or (K, N) phi = log p_y - log sum_{i != y} p_i,
    clipped to +-60."""
    if probs.ndim == 3:  # one shadow at a time bounds the (N, C) temporaries
        return np.stack([scaled_confidence(p, labels) for p in probs])
    onehot = np.arange(probs.shape[-1]) == np.asarray(labels)[:, None]
    py = np.where(onehot, probs, 0.0).sum(axis=-1)
    others = np.where(onehot, 0.0, probs).sum(axis=-1)  # summed directly: no cancellation
    phi = np.log(np.maximum(py, 1e-300)) - np.log(np.maximum(others, 1e-300))
    return np.clip(phi, -PHI_CLIP, PHI_CLIP)


def _normal_logpdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma)


class LiRA(ConfidenceAttack):
    """LiRA over the candidates the shadow models were built for.

    Args:
        online: use IN and OUT Gaussians (True) or OUT only (False).
        fixed_variance: one global standard deviation (True), per-example ones (False), or
            chosen by the shadow count (None: fixed below 16 shadows).
    """

    name = "lira_online"

    def __init__(self, *, online: bool = True, fixed_variance: bool | None = None, seed: int = 0):
        super().__init__(seed=seed)
        self.online_requested, self.online, self.fixed_variance = online, online, fixed_variance

    def _score_phi(self, phi: np.ndarray, st: dict) -> np.ndarray:
        if self.online:
            return _normal_logpdf(phi, st["mu_in"], st["sd_in"]) - _normal_logpdf(phi, st["mu_out"], st["sd_out"])
        return (phi - st["mu_out"]) / st["sd_out"]

    def fit(self, ctx):
        sh = ctx.shadows
        return self.fit_shadow_outputs(sh.pool_probs, sh.pool_y, sh.pool_in, sh.cand_probs, sh.cand_in,
                                       ctx.candidate_labels)

    def fit_shadow_outputs(self, pool_probs, pool_y, pool_in, cand_probs, cand_in, cand_y) -> LiRA:
        """pool_probs (K, P, C), pool_y (P,), pool_in (K, P); cand_probs (K, N, C), cand_in (K, N),
        cand_y (N,): the labels of the candidates, in the order `score` will see them."""
        k = pool_probs.shape[0]
        # online needs IN and OUT shadows per record; with too few it falls back and says so
        self.online, variant_why = choose_online(cand_in, self.online_requested)
        requested = None if self.fixed_variance is None else not self.fixed_variance
        per_example, why = choose_variance(k, requested)
        phi_pool = scaled_confidence(pool_probs, pool_y)
        loo = leave_one_shadow_out(k, pool_in, lambda i, rest: self._score_phi(
            phi_pool[i], gaussian_fits(phi_pool[rest], pool_in[rest], per_example)))
        self.threshold = fit_threshold(*loo) if loo is not None else 0.0
        self._cand_stats = gaussian_fits(scaled_confidence(cand_probs, cand_y), cand_in, per_example)
        self._cand_y = np.asarray(cand_y)
        self.details = {"variant": "online" if self.online else "offline", "variant_reason": variant_why,
                        "variance": "per-example" if per_example else "fixed (global)",
                        "variance_reason": why, "shadows": k,
                        "threshold_from": "leave-one-shadow-out on the attacker pool" if loo is not None
                        else "fixed 0 (one shadow: nothing to hold out)"}
        return self

    def score(self, outputs, labels):
        if len(labels) != len(self._cand_y) or not np.array_equal(labels, self._cand_y):
            raise ValueError("LiRA scores only the candidates its shadow models were trained for")
        return self._score_phi(scaled_confidence(outputs, labels), self._cand_stats)


class LiRAOffline(LiRA):
    name = "lira_offline"

    def __init__(self, *, fixed_variance: bool | None = None, seed: int = 0):
        super().__init__(online=False, fixed_variance=fixed_variance, seed=seed)
