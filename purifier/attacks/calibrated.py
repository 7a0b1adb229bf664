"""Difficulty-calibrated label-only attack: correctness minus what shadow models expect.

The gap attack (member iff correctly labelled; Yeom et al. 2018) treats every correctly labelled
record alike, so it has no true positives below its own false-positive rate: easy non-members
are labelled correctly too. Difficulty calibration (Watson et al., ICLR 2022, "On the Importance
of Difficulty Calibration in Membership Inference Attacks") subtracts what the attacker's shadow
models say about the record when it was *not* in their training set; applied to the label-only
signal of Choquette-Choo et al. (ICML 2021, "Label-Only Membership Inference Attacks") this
exposes hard records that only a model which trained on them gets right.

The target is seen through its label only: c = 1[label == y]. The shadow models are the
attacker's own, so their full outputs may be used: a shadow's correctness is the sign of its
margin m = log p_y - log max_{j != y} p_j, and m is modelled per record as a Gaussian over the
shadows that did not train on it (OUT) and those that did (IN) (`gaussian_fits`, as in LiRA), so
the expected correctness is q = Phi(mu / sd), a smooth estimate even from two or three shadows.

* offline (OUT shadows only): score = c - q_out;
* online (IN and OUT shadows per record): the log likelihood ratio of the observed correctness,
  score = c log(q_in / q_out) + (1 - c) log((1 - q_in) / (1 - q_out)); it runs when enough
  shadows hold each record IN and OUT (`choose_online`), and `details` says which ran and why.

The threshold is fitted on the attacker's pool by leave-one-shadow-out, as LiRA's: each shadow
plays the target (its correctness on the pool) against the statistics of the other shadows.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_ndtr, ndtr

from purifier.attacks.base import Attack, Coverage, Family, LabelOnly, fit_threshold
from purifier.attacks.lira import PHI_CLIP
from purifier.attacks.reference_stats import (
    choose_online,
    choose_variance,
    gaussian_fits,
    leave_one_shadow_out,
)


def log_margin(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, C) or (K, N, C), (N,) -> (N,) or (K, N) m = log p_y - log max_{j != y} p_j, clipped
    to +-60; m > 0 iff the label y is the argmax."""
    if probs.ndim == 3:  # one shadow at a time bounds the (N, C) temporaries
        return np.stack([log_margin(p, labels) for p in probs])
    onehot = np.arange(probs.shape[-1]) == np.asarray(labels)[:, None]
    py = np.where(onehot, probs, 0.0).max(axis=-1)
    other = np.where(onehot, -np.inf, probs).max(axis=-1)
    m = np.log(np.maximum(py, 1e-300)) - np.log(np.maximum(other, 1e-300))
    return np.clip(m, -PHI_CLIP, PHI_CLIP)


def calibrated_correctness(correct: np.ndarray, fits: dict, online: bool) -> np.ndarray:
    """correct (..., N) bool, per-record margin Gaussians `fits` (N,) -> (..., N) scores."""
    c = np.asarray(correct, np.float64)
    z_out = fits["mu_out"] / fits["sd_out"]
    if not online:
        return c - ndtr(z_out)
    z_in = fits["mu_in"] / fits["sd_in"]
    right = log_ndtr(z_in) - log_ndtr(z_out)
    wrong = log_ndtr(-z_in) - log_ndtr(-z_out)
    return c * right + (1.0 - c) * wrong


class CalibratedLabelAttack(Attack):
    """Label-only correctness, calibrated per record by the attacker's shadow models.

    Args:
        online: force the online (True) or offline (False) variant; None chooses by how many
            shadows hold each record IN and OUT.
        fixed_variance: as LiRA's (None: global below 16 shadows, per-example from 16 on).
    """

    name = "label_calibrated"
    family = Family.LABEL_ONLY
    coverage = Coverage.LABEL_CALIBRATED

    def __init__(self, *, online: bool | None = None, fixed_variance: bool | None = None, seed: int = 0):
        super().__init__(seed=seed)
        self.online_requested, self.fixed_variance = online, fixed_variance

    def fit(self, ctx):
        sh = ctx.shadows
        if ctx.candidate_labels is None:
            raise ValueError("label_calibrated needs the candidates' labels (AttackContext.candidate_labels)")
        k = sh.n_shadows
        self.online, why = choose_online(sh.cand_in, self.online_requested)
        requested = None if self.fixed_variance is None else not self.fixed_variance
        per_example, var_why = choose_variance(k, requested)
        m_pool = log_margin(sh.pool_probs, sh.pool_y)
        loo = leave_one_shadow_out(k, sh.pool_in, lambda i, rest: calibrated_correctness(
            m_pool[i] > 0, gaussian_fits(m_pool[rest], sh.pool_in[rest], per_example), self.online))
        self.threshold = fit_threshold(*loo) if loo is not None else (0.0 if self.online else 0.5)
        self._cand_y = np.asarray(ctx.candidate_labels)
        self._fits = gaussian_fits(log_margin(sh.cand_probs, self._cand_y), sh.cand_in, per_example)
        no_out = int((self._fits["n_out"] == 0).sum())
        self.details = {"variant": "online" if self.online else "offline", "variant_reason": why,
                        "variance": "per-example" if per_example else "fixed (global)",
                        "variance_reason": var_why, "shadows": k,
                        "records_without_out_shadow": no_out,
                        "threshold_from": "leave-one-shadow-out on the attacker pool" if loo is not None
                        else "fixed rule (one shadow: nothing to hold out)"}
        return self

    def run(self, target, X, y, outputs):
        if len(y) != len(self._cand_y) or not np.array_equal(y, self._cand_y):
            raise ValueError("label_calibrated scores only the candidates its shadow models were trained for")
        if outputs is not None:  # the label of the one answer per record the audit already has
            labels = np.asarray(outputs).argmax(axis=1)
            self.queries = len(X)
        else:
            view = LabelOnly(target)
            before = view.queries
            labels = view.labels(X)
            self.queries = view.queries - before
        return calibrated_correctness(labels == y, self._fits, self.online)
