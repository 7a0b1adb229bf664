"""RMIA, the robust membership inference attack (Zarifzadeh, Liu, Shokri, ICML 2024, "Low-Cost
High-Power Membership Inference Attacks").

For a record x with label y_x, Pr(x | theta) = p_theta(y_x | x) is the target's probability of
the true label and Pr(x) the same probability averaged over reference (shadow) models. RMIA
compares x with population records z (non-members of the target, here from the attacker's pool)
through the pairwise likelihood ratio

    LR(x, z) = (Pr(x | theta) / Pr(x)) / (Pr(z | theta) / Pr(z)),

and scores x by the fraction of z with LR(x, z) > gamma (docs/design.md#attacks-rmia).

* offline (OUT reference models only): Pr(x) = ((1 + a) / 2) p_out(x) + (1 - a) / 2, the
  paper's linear approximation of the IN/OUT average from OUT models; `a` is tuned on the
  reference models (leave-one-shadow-out AUC on the pool), 0.3 with a single shadow;
* online (IN and OUT reference models per record, when `choose_online` finds enough of them):
  Pr(x) = (p_in(x) + p_out(x)) / 2; records still lacking a side use the offline formula.

Pr(x | theta) is the softmax probability at a temperature T (ML Privacy Meter's `temp`), here
computed from the returned probability vector: p_T(y) = p_y^(1/T) / sum_j p_j^(1/T), which is
softmax(logits / T). An overfit model answers 1 - 1e-6 for members and 1 - 1e-3 for easy
non-members; at T = 1 both are "1" next to the reference models' spread, at T = 2 they differ
(docs/design.md#attacks-rmia). T and a are tuned together on the
reference models (leave-one-shadow-out on the pool): the pair with the best TPR at 1% FPR when
the held-out pool has at least 1,000 non-members, else the best AUC.

The comparison with all z is vectorized without an (N, Z) matrix: LR(x, z) > gamma iff
log r_z < log r_x - log gamma, so the fraction is a binary search of log r_x - log gamma in the
sorted log r_z. Since that fraction moves in steps of 1/Z, ties inside one step are broken by
r_x itself (score = (count + u(r_x)) / (Z + 1), u increasing in (0, 1)), so the ranking at low
FPR keeps its resolution.
The decision threshold is fitted by leave-one-shadow-out on the pool, as LiRA's.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from purifier.attacks.base import Attack, Family, fit_threshold
from purifier.attacks.metric import true_class_prob
from purifier.attacks.reference_stats import choose_online, leave_one_shadow_out

A_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
T_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 8.0)
A_DEFAULT, T_DEFAULT = 0.3, 1.0  # ML Privacy Meter's defaults, used when there is nothing to tune on
TUNE_FPR, TUNE_MIN_NEGATIVES = 0.01, 1000
_TINY = 1e-300


def tempered_true_prob(probs: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) or (K, N, C), (N,) -> (N,) or (K, N) softmax(log p / T) at the true label."""
    if probs.ndim == 3:  # one model at a time bounds the (N, C) temporaries
        return np.stack([tempered_true_prob(p, labels, temperature) for p in probs])
    logp = np.log(np.maximum(probs, _TINY)) / temperature
    return np.exp(true_class_prob(logp, labels) - logsumexp(logp, axis=1))


def reference_prob(p: np.ndarray, in_mask: np.ndarray, a: float, online: bool) -> np.ndarray:
    """Pr(x) from reference models: p, in_mask (K, N) -> (N,).

    Offline: ((1 + a) / 2) mean_OUT + (1 - a) / 2; online: (mean_IN + mean_OUT) / 2 where a
    record has both, the offline formula otherwise. A record with no OUT model uses the IN mean.
    """
    return _reference_from_sums(*_in_out_sums(p, in_mask), a, online)


def _in_out_sums(p: np.ndarray, in_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """p, in_mask (K, N) -> (N,) sum and count over IN models, then over OUT models."""
    sum_in = np.where(in_mask, p, 0.0).sum(axis=0)
    n_in = in_mask.sum(axis=0)
    return sum_in, n_in, p.sum(axis=0) - sum_in, len(p) - n_in


def _reference_from_sums(sum_in, n_in, sum_out, n_out, a: float, online: bool) -> np.ndarray:
    mean_in, mean_out = sum_in / np.maximum(n_in, 1), sum_out / np.maximum(n_out, 1)
    offline = np.where(n_out > 0, (1.0 + a) / 2.0 * mean_out + (1.0 - a) / 2.0, mean_in)
    if not online:
        return offline
    return np.where((n_in > 0) & (n_out > 0), 0.5 * (mean_in + mean_out), offline)


def rmia_scores(log_ratio_x: np.ndarray, log_ratio_z: np.ndarray, gamma: float) -> np.ndarray:
    """(N,), (Z,) log Pr(.|theta)/Pr(.) -> (N,) fraction of z with LR(x, z) > gamma, ties
    within one 1/Z step broken by log_ratio_x (strictly monotone in it)."""
    z = np.sort(log_ratio_z)
    count = np.searchsorted(z, log_ratio_x - np.log(gamma), side="left")
    tie_break = 0.5 + np.arctan(log_ratio_x) / np.pi  # in (0, 1), increasing
    return (count + tie_break) / (len(z) + 1)  # in (0, 1)


def _log_ratio(p_target: np.ndarray, p_ref: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p_target, _TINY)) - np.log(np.maximum(p_ref, _TINY))


class RMIA(Attack):
    """RMIA against the candidates the shadow models were built for.

    Args:
        gamma: the pairwise likelihood-ratio threshold (ML Privacy Meter uses 1).
        n_population: population records z drawn from the attacker pool; the target is queried
            on them once (at most half the pool, so leave-one-shadow-out keeps records to score).
        a: the offline correction; None tunes it on the shadows.
        online: force the online (True) or offline (False) variant; None chooses.
    """

    name = "rmia"
    family = Family.CONFIDENCE

    def __init__(self, *, gamma: float = 1.0, n_population: int = 5000, a: float | None = None,
                 temperature: float | None = None, online: bool | None = None, seed: int = 0):
        super().__init__(seed=seed)
        if gamma <= 0 or (temperature is not None and temperature <= 0):
            raise ValueError(f"rmia: gamma and temperature must be positive, got {gamma}, {temperature}")
        self.gamma, self.n_population, self.online_requested = gamma, n_population, online
        self.a, self.temperature = a, temperature

    def fit(self, ctx):
        from purifier.evaluation import roc_auc, tpr_at_fpr

        sh = ctx.shadows
        if ctx.candidate_labels is None:
            raise ValueError("rmia needs the candidates' labels (AttackContext.candidate_labels)")
        k, n_pool = sh.n_shadows, len(sh.pool_y)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(n_pool)
        n_z = max(1, min(self.n_population, n_pool // 2))
        z_idx, x_idx = np.sort(order[:n_z]), np.sort(order[n_z:])
        self.online, why = choose_online(sh.cand_in, self.online_requested)

        def held_out(p_pool, a):  # p_pool (K, P): each shadow plays the target; its z are its non-members
            # sums over all shadows once, minus shadow i's own term: O(K P) per setting, not O(K^2 P)
            sum_in, n_in, sum_out, n_out = _in_out_sums(p_pool, sh.pool_in)

            def score_shadow(i, rest):
                own_in, own = sh.pool_in[i], p_pool[i]
                p_ref = _reference_from_sums(sum_in - np.where(own_in, own, 0.0), n_in - own_in,
                                             sum_out - np.where(own_in, 0.0, own), n_out - ~own_in,
                                             a, self.online)
                r = _log_ratio(own, p_ref)
                return rmia_scores(r[x_idx], r[z_idx[~sh.pool_in[i, z_idx]]], self.gamma)
            return leave_one_shadow_out(k, sh.pool_in[:, x_idx], score_shadow)

        # tune on TPR at 1% FPR (AUC breaking ties) when the held-out pool has enough non-members
        by_tpr = int((~sh.pool_in[:, x_idx]).sum()) >= TUNE_MIN_NEGATIVES
        grid = [(float(t), float(a)) for t in (T_GRID if self.temperature is None else (self.temperature,))
                for a in (A_GRID if self.a is None else (self.a,))]
        if k < 2:
            self.t_used = T_DEFAULT if self.temperature is None else self.temperature
            self.a_used = A_DEFAULT if self.a is None else self.a
            tuning = "one shadow: nothing to tune on; unset values take ML Privacy Meter's defaults"
        elif len(grid) == 1:
            (self.t_used, self.a_used), tuning = grid[0], "given by the caller"
        else:
            tuned, p_t, t_of_p = {}, None, None
            for t, a in grid:  # t-major: one tempered (K, P) array at a time
                if t != t_of_p:
                    p_t, t_of_p = tempered_true_prob(sh.pool_probs, sh.pool_y, t), t
                scores, membership = held_out(p_t, a)
                tuned[t, a] = (tpr_at_fpr(scores, membership, TUNE_FPR).tpr if by_tpr else 0.0,
                               roc_auc(scores, membership))
            self.t_used, self.a_used = max(tuned, key=lambda ta: tuned[ta])
            tuning = (f"best leave-one-shadow-out {'TPR at 1% FPR' if by_tpr else 'AUC'} on the attacker pool "
                      f"over T in {sorted({t for t, _ in grid})}, a in {sorted({a for _, a in grid})}")
        p_pool = tempered_true_prob(sh.pool_probs, sh.pool_y, self.t_used)
        loo = held_out(p_pool, self.a_used)
        self.threshold = fit_threshold(*loo) if loo is not None else 0.5
        self._cand_y = np.asarray(ctx.candidate_labels)
        p_cand = tempered_true_prob(sh.cand_probs, self._cand_y, self.t_used)
        self._p_ref_cand = reference_prob(p_cand, sh.cand_in, self.a_used, self.online)
        self._p_ref_z = reference_prob(p_pool[:, z_idx], sh.pool_in[:, z_idx], self.a_used, self.online)
        self._z_X, self._z_y = sh.pool_X[z_idx], sh.pool_y[z_idx]
        self.details = {"variant": "online" if self.online else "offline", "variant_reason": why,
                        "a": self.a_used, "temperature": self.t_used, "tuning": tuning,
                        "gamma": self.gamma, "population": int(n_z), "shadows": k}
        return self

    def run(self, target, X, y, outputs):
        if outputs is None:
            raise ValueError("attack rmia needs confidence outputs")
        if len(y) != len(self._cand_y) or not np.array_equal(y, self._cand_y):
            raise ValueError("rmia scores only the candidates its shadow models were trained for")
        before = target.queries
        p_z = tempered_true_prob(target.query(self._z_X), self._z_y, self.t_used)  # the target on non-members
        self.queries = len(X) + (target.queries - before)
        log_r_z = _log_ratio(p_z, self._p_ref_z)
        log_r_x = _log_ratio(tempered_true_prob(outputs, y, self.t_used), self._p_ref_cand)
        return rmia_scores(log_r_x, log_r_z, self.gamma)
