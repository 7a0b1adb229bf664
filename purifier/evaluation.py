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
    from scipy.stats import rankdata  # here, not at import: the slim serving install has no scipy
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
    return bootstrap_intervals(lambda s, m: (metric(s, m),), scores, membership, n_boot, seed, level)[0]


def bootstrap_intervals(metrics: Callable[[np.ndarray, np.ndarray], tuple[float, ...]], scores, membership,
                        n_boot: int = 200, seed: int = 0, level: float = 0.95) -> list[tuple[float, float]]:
    """`bootstrap_ci` of several figures computed together on each resample (one sort serves an
    AUC and the TPRs): `metrics(scores, membership)` returns a tuple, one interval comes back per
    entry. The resamples are those of `bootstrap_ci` with the same seed."""
    scores, membership = _check(scores, membership)
    rng = np.random.default_rng(seed)
    # Each resample is handed to `metrics` in score order: the same records as drawn (the metrics
    # here do not depend on row order), and their own sort then meets sorted input, which a stable
    # sort finishes in one pass instead of n log n.
    order = np.argsort(scores, kind="stable")
    rank = np.empty(len(scores), np.int64)
    rank[order] = np.arange(len(scores))
    s_sorted, m_sorted = scores[order], membership[order]
    pos, neg = rank[membership], rank[~membership]  # the positions of members / non-members after sorting
    every = np.arange(len(scores))
    values = []
    for _ in range(n_boot):
        drawn = np.r_[pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]]
        idx = np.repeat(every, np.bincount(drawn, minlength=len(scores)))  # sorted, without a sort
        values.append(metrics(s_sorted[idx], m_sorted[idx]))
    alpha = (1.0 - level) / 2
    bounds = np.quantile(np.asarray(values, np.float64), [alpha, 1.0 - alpha], axis=0)
    return [(float(lo), float(hi)) for lo, hi in bounds.T]


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


# --- utility as users feel it (clean vs defended confidence vectors) -------------------------------
#
# Real traffic is mostly non-members, whose vectors a defense moves the most (members are already
# confident): every quality figure below is measured on non-members, and the L1 distortion is
# reported for non-members and members separately, never averaged over the evaluation mix.


def argmax_agreement(clean: np.ndarray, defended: np.ndarray) -> float:
    """Fraction of rows (N, C) whose predicted label (first index on ties) is unchanged."""
    return float((np.asarray(clean).argmax(axis=1) == np.asarray(defended).argmax(axis=1)).mean())


@dataclass(frozen=True)
class L1Summary:
    """Mean, 95th percentile (linear interpolation) and max of N distances, with N."""

    mean: float
    p95: float
    max: float
    n: int


def l1_summary(l1: np.ndarray) -> L1Summary:
    l1 = np.asarray(l1, np.float64)
    return L1Summary(float(l1.mean()), float(np.percentile(l1, 95)), float(l1.max()), int(len(l1)))


@dataclass(frozen=True)
class BeforeAfter:
    """One quality figure on the clean answers and on the defended ones."""

    before: float
    after: float


@dataclass(frozen=True)
class OutputUtility:
    """What a defense costs the people using the model (`output_utility`).

    Attributes:
        argmax_agreement: share of all rows whose predicted label is unchanged.
        l1_nonmembers: L1 change on non-members, the real-traffic figure; l1_members: on training
            members (None without members), never averaged with it.
        brier, ece: on non-members; auroc: of the class-1 score for 2-class models (None
            otherwise, or when non-members hold one class only).
        true_class_rank_agreement: Spearman of the true-class probability before vs after on
            non-members (None if either side is constant).
        distinct_fraction: distinct answers / answers on non-members.
    """

    argmax_agreement: float
    l1_nonmembers: L1Summary
    l1_members: L1Summary | None
    brier: BeforeAfter
    ece: BeforeAfter
    auroc: BeforeAfter | None
    true_class_rank_agreement: float | None
    distinct_fraction: BeforeAfter

    POPULATION = "quality figures on non-members (real traffic); L1 separately on non-members and members"

    def as_dict(self) -> dict:
        return asdict(self)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score (Brier 1950): mean over rows of sum_c (p_c - 1[c = y])^2, in [0, 2].

    probs: (N, C); labels: (N,) class indices. Lower is better.
    """
    p = np.asarray(probs, np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(p)), np.asarray(labels)] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al., ICML 2017).

    Rows fall into `n_bins` equal-width bins ((m-1)/M, m/M] by their confidence max_c p_c;
    ECE = sum over bins of (rows in bin / N) * |accuracy in bin - mean confidence in bin|.
    probs: (N, C); labels: (N,). Lower is better.
    """
    p = np.asarray(probs, np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, conf, n_bins))
    return float(gap.sum() / count.sum())


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation of two (N,) arrays (Pearson on mid-ranks); None when either is
    constant (the correlation is undefined)."""
    from scipy.stats import rankdata  # here, not at import: the slim serving install has no scipy
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return None if denom == 0 else float((ra * rb).sum() / denom)


def distinct_fraction(probs: np.ndarray) -> float:
    """Distinct rows of (N, C) divided by N: 1 when every answer differs, 1/N when all collapse
    onto one vector (exact equality in the array's own dtype)."""
    p = np.ascontiguousarray(probs)
    return float(len(np.unique(p, axis=0)) / len(p))


def output_utility(clean: np.ndarray, defended: np.ndarray, labels: np.ndarray,
                   membership: np.ndarray) -> OutputUtility:
    """What a defense costs the people using the model (`OutputUtility`).

    Args:
        clean: (N, C) undefended confidence vectors; defended: (N, C) the same rows defended.
        labels: (N,) true class indices; membership: (N,) 1 for training members, 0 otherwise.
    """
    clean, defended = np.asarray(clean, np.float64), np.asarray(defended)
    labels = np.asarray(labels).astype(np.int64)
    membership = np.asarray(membership).astype(bool)
    if clean.shape != defended.shape or clean.ndim != 2 or labels.shape != (len(clean),) \
            or membership.shape != labels.shape:
        raise ValueError(f"shapes differ: clean {clean.shape}, defended {defended.shape}, labels {labels.shape}, "
                         f"membership {membership.shape}")
    if membership.all():
        raise ValueError("output_utility needs non-members (the real-traffic rows)")
    l1 = l1_distortion(clean, defended)
    real = ~membership
    c, d, y = clean[real], defended[real].astype(np.float64), labels[real]
    auroc = None
    if clean.shape[1] == 2 and 0 < y.sum() < len(y):
        auroc = BeforeAfter(roc_auc(c[:, 1], y == 1), roc_auc(d[:, 1], y == 1))
    rows = np.arange(len(y))
    return OutputUtility(
        argmax_agreement=argmax_agreement(clean, defended),
        l1_nonmembers=l1_summary(l1[real]),
        l1_members=l1_summary(l1[membership]) if membership.any() else None,
        brier=BeforeAfter(brier_score(c, y), brier_score(d, y)),
        ece=BeforeAfter(expected_calibration_error(c, y), expected_calibration_error(d, y)),
        auroc=auroc,
        true_class_rank_agreement=spearman(c[rows, y], d[rows, y]),
        distinct_fraction=BeforeAfter(distinct_fraction(c), distinct_fraction(defended[real])),
    )
