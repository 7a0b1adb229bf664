"""Membership-inference metrics: the only place they are computed.

Convention: a score is higher for records more likely to be members; `membership` is 1 for
members and 0 for non-members. TPR at a low FPR is reported with the FPR actually realized and
the number of negatives behind it, because with 500 negatives a "TPR at 0.1% FPR" is the TPR at
zero false positives (Carlini et al. 2022, "Membership Inference Attacks From First Principles").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata


def _check(scores: np.ndarray, membership: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    membership = np.asarray(membership).ravel().astype(bool)
    if scores.shape != membership.shape:
        raise ValueError(f"scores {scores.shape} and membership {membership.shape} differ in length")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    if membership.all() or not membership.any():
        raise ValueError("membership needs both members and non-members")
    return scores, membership


def roc_curve(scores, membership) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points over all distinct thresholds, predicting member iff score >= threshold.

    Returns (fpr, tpr, thresholds), each (K+1,), starting at (0, 0) with threshold +inf.
    """
    scores, membership = _check(scores, membership)
    order = np.argsort(-scores, kind="mergesort")
    s, m = scores[order], membership[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]  # ties move together
    tp = np.cumsum(m)[last_of_run]
    fp = np.cumsum(~m)[last_of_run]
    tpr = np.r_[0.0, tp / m.sum()]
    fpr = np.r_[0.0, fp / (~m).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def roc_auc(scores, membership) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    scores, membership = _check(scores, membership)
    ranks = rankdata(scores)
    n_pos, n_neg = int(membership.sum()), int((~membership).sum())
    return float((ranks[membership].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_accuracy(predicted_member, membership) -> float:
    """Mean of TPR and TNR for hard member / non-member predictions."""
    pred = np.asarray(predicted_member).ravel().astype(bool)
    _, membership = _check(np.zeros(len(pred)), membership)
    return float(0.5 * (pred[membership].mean() + (~pred[~membership]).mean()))


def best_balanced_accuracy(scores, membership) -> tuple[float, float]:
    """The best balanced accuracy over all thresholds, and that threshold.

    This is an oracle (the threshold sees the evaluation membership): an upper bound on what a
    threshold attack achieves, never a substitute for a threshold fitted on shadow data.
    """
    fpr, tpr, thr = roc_curve(scores, membership)
    ba = 0.5 * (tpr + 1.0 - fpr)
    i = int(np.argmax(ba))
    return float(ba[i]), float(thr[i])


@dataclass(frozen=True)
class TprAtFpr:
    """TPR at the largest threshold-set whose realized FPR does not exceed the target."""

    target_fpr: float
    tpr: float
    fpr: float  # the FPR actually realized (<= target_fpr)
    negatives: int
    measurable: bool  # False when target_fpr < 1 / negatives: then this is TPR at zero FPR

    def as_dict(self) -> dict:
        return asdict(self)


def tpr_at_fpr(scores, membership, target_fpr: float) -> TprAtFpr:
    fpr, tpr, _ = roc_curve(scores, membership)
    negatives = int((~np.asarray(membership).astype(bool)).sum())
    ok = fpr <= target_fpr + 1e-12
    i = int(np.nonzero(ok)[0][-1])  # fpr is non-decreasing; index 0 (0, 0) always qualifies
    return TprAtFpr(float(target_fpr), float(tpr[i]), float(fpr[i]), negatives,
                    bool(target_fpr * negatives >= 1.0))


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], scores, membership,
                 n_boot: int = 200, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(scores, membership)`, resampling members and
    non-members separately (stratified) so every resample stays balanced."""
    scores, membership = _check(scores, membership)
    rng = np.random.default_rng(seed)
    pos, neg = np.nonzero(membership)[0], np.nonzero(~membership)[0]
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        values[b] = metric(scores[idx], membership[idx])
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def gap_floor(correct, membership) -> dict:
    """The label-only floor: the gap attack (member iff correctly classified).

    A defense that keeps the argmax cannot push attacks below this. Its balanced accuracy is
    0.5 + (acc_members - acc_nonmembers) / 2 (Yeom et al. 2018).
    """
    correct = np.asarray(correct).astype(bool)
    return {
        "balanced_accuracy": balanced_accuracy(correct, membership),
        "auc": roc_auc(correct.astype(np.float64), membership),
    }


def l1_distortion(clean: np.ndarray, defended: np.ndarray) -> np.ndarray:
    """(N,) L1 distance between clean and defended confidence rows."""
    return np.abs(np.asarray(defended, np.float64) - np.asarray(clean, np.float64)).sum(axis=1)
