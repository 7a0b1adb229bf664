"""Per-record statistics from reference (shadow) models, shared by the calibrated attacks.

LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles") fits, per
audited record, a Gaussian to a statistic of the shadow models' outputs over the shadows that
trained on it (IN) and over those that did not (OUT). Difficulty calibration (Watson et al.,
ICLR 2022, "On the Importance of Difficulty Calibration in Membership Inference Attacks") and
RMIA (Zarifzadeh, Liu, Shokri, ICML 2024) use the same IN/OUT split of the shadows. This module
holds what they share:

* `gaussian_fits`: per-record IN/OUT means and standard deviations; a fixed (global) standard
  deviation with few shadows, per-record ones from `PER_EXAMPLE_VARIANCE_MIN` shadows on (the
  paper's finding: per-example variances need many models);
* `choose_online`: whether enough shadows hold each record IN and OUT for an online attack;
* `leave_one_shadow_out`: scores with known membership for fitting thresholds and
  hyper-parameters on shadow data only: each shadow plays the target against the others.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PER_EXAMPLE_VARIANCE_MIN = 16  # shadows; Carlini et al. use per-example variances with >= 16 (Fig. 9)
ONLINE_MIN_PER_SIDE = 2  # IN and OUT shadows a record needs for its own IN/OUT estimates
ONLINE_MIN_COVERAGE = 0.9  # share of records that must have them for the online variant
MIN_SD = 1e-3


def masked_stats(stat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """stat, mask (K, N) -> per-column mean, unbiased variance, count over rows where mask is True."""
    n = mask.sum(axis=0)
    mean = np.where(mask, stat, 0.0).sum(axis=0) / np.maximum(n, 1)
    var = np.where(mask, (stat - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n - 1, 1)
    return mean, var, n


def gaussian_fits(stat: np.ndarray, in_mask: np.ndarray, per_example_variance: bool) -> dict:
    """Per-record Gaussians of `stat` under IN and OUT shadows.

    Args:
        stat: (K, N) a statistic of each shadow's output on each record.
        in_mask: (K, N) bool, shadow k trained on record n.
        per_example_variance: per-record standard deviations (records with fewer than two IN
            or OUT values use the global one) instead of one global standard deviation.
    Returns:
        {"mu_in", "mu_out", "sd_in", "sd_out", "n_in", "n_out"}, each (N,). A record without
        IN (or OUT) shadows borrows the mean IN-OUT shift of the records that have both.
    """
    mu_in, var_in, n_in = masked_stats(stat, in_mask)
    mu_out, var_out, n_out = masked_stats(stat, ~in_mask)
    both = (n_in > 0) & (n_out > 0)
    shift = float(np.mean((mu_in - mu_out)[both])) if both.any() else 0.0
    mu_in = np.where(n_in > 0, mu_in, mu_out + shift)
    mu_out = np.where(n_out > 0, mu_out, mu_in - shift)
    resid = np.where(in_mask, stat - mu_in, stat - mu_out)  # every value has one side
    global_sd = max(float(np.sqrt(np.mean(resid ** 2))), MIN_SD) if resid.size else 1.0
    if per_example_variance:
        sd_in = np.where(n_in > 1, np.sqrt(var_in), global_sd)
        sd_out = np.where(n_out > 1, np.sqrt(var_out), global_sd)
    else:
        sd_in = sd_out = np.full(stat.shape[1], global_sd)
    return {"mu_in": mu_in, "mu_out": mu_out, "sd_in": np.maximum(sd_in, MIN_SD),
            "sd_out": np.maximum(sd_out, MIN_SD), "n_in": n_in, "n_out": n_out}


def choose_variance(n_shadows: int, requested: bool | None) -> tuple[bool, str]:
    """(per_example_variance, why) from the shadow count, unless the caller chose."""
    if requested is not None:
        return requested, "chosen by the caller"
    if n_shadows >= PER_EXAMPLE_VARIANCE_MIN:
        return True, f"{n_shadows} shadows >= {PER_EXAMPLE_VARIANCE_MIN}: per-example variances"
    return False, f"{n_shadows} shadows < {PER_EXAMPLE_VARIANCE_MIN}: one global variance"


def choose_online(in_mask: np.ndarray, requested: bool | None) -> tuple[bool, str]:
    """(online, why): online when at least ONLINE_MIN_COVERAGE of the records have
    ONLINE_MIN_PER_SIDE shadows IN and as many OUT (in_mask (K, N)); offline otherwise. An
    explicit `requested=True` that the shadows cannot support falls back to offline, saying so."""
    n_in = in_mask.sum(axis=0)
    n_out = in_mask.shape[0] - n_in
    covered = float(np.mean((n_in >= ONLINE_MIN_PER_SIDE) & (n_out >= ONLINE_MIN_PER_SIDE)))
    facts = (f"{covered:.0%} of records have >= {ONLINE_MIN_PER_SIDE} IN and OUT shadows "
             f"({in_mask.shape[0]} shadows)")
    if requested is False:
        return False, "offline chosen by the caller"
    if covered >= ONLINE_MIN_COVERAGE:
        return True, f"online: {facts}"
    return False, f"offline: only {facts}, online needs {ONLINE_MIN_COVERAGE:.0%}"


def leave_one_shadow_out(n_shadows: int, pool_in: np.ndarray,
                         score_shadow: Callable[[int, np.ndarray], np.ndarray]
                         ) -> tuple[np.ndarray, np.ndarray] | None:
    """Shadow-data scores with known membership: shadow i plays the target, scored by
    `score_shadow(i, rest)` where rest (K,) bool selects the other shadows; membership is
    pool_in[i]. Returns (scores (K*P,), membership (K*P,)) or None with fewer than 2 shadows."""
    if n_shadows < 2:
        return None
    scores, members = [], []
    for i in range(n_shadows):  # a loop over models, not rows
        rest = np.arange(n_shadows) != i
        scores.append(score_shadow(i, rest))
        members.append(pool_in[i])
    return np.concatenate(scores), np.concatenate(members)
