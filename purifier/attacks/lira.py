"""LiRA, the likelihood-ratio attack (Carlini et al. 2022, "Membership Inference Attacks From
First Principles").

The statistic is the scaled confidence phi = log p_y - log sum_{i != y} p_i, computed from the
sum of the other classes (not 1 - p_y, which rounds to 0 for confident rows). Per candidate,
Gaussians are fitted to phi under shadow models that trained on it (IN) and did not (OUT).

* online: score = log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out);
* offline: the one-sided test against OUT only, score = (phi - mu_out) / s_out;
* fixed variance (default): one global standard deviation instead of per-candidate ones, which
  the paper finds works best with few shadow models.

The decision threshold is fitted on the attacker's pool by leave-one-shadow-out: each shadow
model plays the target in turn, scored against the statistics of the other shadows.
"""

from __future__ import annotations

import numpy as np

from purifier.attacks.base import ConfidenceAttack, fit_threshold
from purifier.attacks.metric import true_class_prob

PHI_CLIP = 60.0


def scaled_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, C), (N,) -> (N,) phi = log p_y - log sum_{i != y} p_i, clipped to +-60."""
    py = true_class_prob(probs, labels)
    mask = np.ones_like(probs, dtype=bool)
    np.put_along_axis(mask, labels[:, None].astype(np.int64), False, axis=1)
    others = np.where(mask, probs, 0.0).sum(axis=1)  # summed directly: no cancellation
    phi = np.log(np.maximum(py, 1e-300)) - np.log(np.maximum(others, 1e-300))
    return np.clip(phi, -PHI_CLIP, PHI_CLIP)


def _masked_stats(phi: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """phi, mask (K, N) -> per-column mean, variance, count over rows where mask is True."""
    n = mask.sum(axis=0)
    s = np.where(mask, phi, 0.0).sum(axis=0)
    mean = s / np.maximum(n, 1)
    var = np.where(mask, (phi - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n - 1, 1)
    return mean, var, n


def _normal_logpdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma)


class LiRA(ConfidenceAttack):
    """LiRA over the candidates the shadow models were built for.

    Args:
        online: use IN and OUT Gaussians (True) or OUT only (False).
        fixed_variance: one global standard deviation (recommended with < 16 shadow models).
    """

    name = "lira_online"

    def __init__(self, *, online: bool = True, fixed_variance: bool = True, seed: int = 0):
        super().__init__(seed=seed)
        self.online, self.fixed_variance = online, fixed_variance

    def _stats(self, phi: np.ndarray, in_mask: np.ndarray) -> dict:
        """phi, in_mask (K, N) -> per-candidate Gaussian parameters (N,) each."""
        mu_in, var_in, n_in = _masked_stats(phi, in_mask)
        mu_out, var_out, n_out = _masked_stats(phi, ~in_mask)
        both = (n_in > 0) & (n_out > 0)
        delta = float(np.mean((mu_in - mu_out)[both])) if both.any() else 0.0
        # candidates with no IN (or OUT) model borrow the global IN-OUT shift
        mu_in = np.where(n_in > 0, mu_in, mu_out + delta)
        mu_out = np.where(n_out > 0, mu_out, mu_in - delta)
        pooled = np.where(np.r_[in_mask.ravel(), ~in_mask.ravel()],
                          np.r_[(phi - mu_in).ravel(), (phi - mu_out).ravel()], np.nan)
        global_sd = float(np.sqrt(np.nanmean(pooled ** 2))) if np.isfinite(pooled).any() else 1.0
        global_sd = max(global_sd, 1e-3)
        if self.fixed_variance:
            sd_in = sd_out = np.full(phi.shape[1], global_sd)
        else:
            sd_in = np.where(n_in > 1, np.sqrt(var_in), global_sd)
            sd_out = np.where(n_out > 1, np.sqrt(var_out), global_sd)
        return {"mu_in": mu_in, "mu_out": mu_out, "sd_in": np.maximum(sd_in, 1e-3),
                "sd_out": np.maximum(sd_out, 1e-3)}

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
        phi_pool = np.stack([scaled_confidence(pool_probs[i], pool_y) for i in range(k)])
        if k >= 2:
            scores, members = [], []
            for i in range(k):  # leave one shadow out: K is a handful of models
                rest = np.arange(k) != i
                st = self._stats(phi_pool[rest], pool_in[rest])
                scores.append(self._score_phi(phi_pool[i], st))
                members.append(pool_in[i])
            self.threshold = fit_threshold(np.concatenate(scores), np.concatenate(members))
        else:
            self.threshold = 0.0
        phi_cand = np.stack([scaled_confidence(cand_probs[i], cand_y) for i in range(k)])
        self._cand_stats = self._stats(phi_cand, cand_in)
        self._cand_y = np.asarray(cand_y)
        return self

    def score(self, outputs, labels):
        if len(labels) != len(self._cand_y) or not np.array_equal(labels, self._cand_y):
            raise ValueError("LiRA scores only the candidates its shadow models were trained for")
        return self._score_phi(scaled_confidence(outputs, labels), self._cand_stats)


class LiRAOffline(LiRA):
    name = "lira_offline"

    def __init__(self, *, fixed_variance: bool = True, seed: int = 0):
        super().__init__(online=False, fixed_variance=fixed_variance, seed=seed)
