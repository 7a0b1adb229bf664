"""The simple alternatives every defense must beat: label only, top-k, rounding and plain noise.

A skeptic's first question about MemGuard or PURIFIER is whether answering the label only, the
top-k scores, rounded scores or noised scores protects as well for the same utility cost. These
are the output post-processors of Shokri et al. (S&P 2017, section VII: top-k, rounding to d
digits) and of IBM ART (`ClassLabels`, `HighConfidence`, `Rounded`, `GaussianNoise`), written
here under the `Defense` contract so they are served, swept and audited exactly like the others:
same dtype out, rows on the simplex, argmax kept (first index on ties), deterministic per row,
batched numpy without per-row loops, saved as `defense.json` only.

They need no training: `fit` only records the class count, model identity and fingerprint (the
base class), so a generic fit command can fit them like any other defense.
"""

from __future__ import annotations

import math

import numpy as np

from purifier.defenses.base import Defense, Knob
from purifier.defenses.keyed import KeyedPRF
from purifier.defenses.repair import blend_to_budget, repair_top
from purifier.errors import ConfigError

MAX_DECIMALS = 15  # 10**15 units still count exactly in float64 (< 2**53)
NOISE_KINDS = ("laplace", "gaussian")


class LabelOnly(Defense):
    """Answer the predicted label only: the one-hot vector of the argmax (first index on ties).

    Confidence attacks lose everything beyond the label; label-only attacks are untouched. The
    strongest privacy any label-keeping defense can reach, at the largest utility cost."""

    name = "label_only"
    baseline_grid = (None,)

    def _transform(self, p, inputs):
        out = np.zeros_like(p)
        out[np.arange(len(p)), p.argmax(axis=1)] = 1.0
        return out, None


class TopK(Defense):
    """Keep the k largest probabilities of each row, zero the rest, renormalize.

    Args:
        k: how many scores survive, an integer >= 1 (k = 1 is `label_only`; k >= C changes nothing).
    Ties at the k-th place keep the lower class index, so the argmax (first index) always survives.
    """

    name = "top_k"
    knob = Knob("k", (5, 3, 2, 1), "smaller", int, "k")
    baseline_grid = (3, 2)  # k = 1 is label_only

    def __init__(self, *, k: int = 3, secret: bytes | None = None):
        super().__init__(secret=secret)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k: must be an integer >= 1 (1 answers the label only), got {k!r}")
        self.k = k

    def _transform(self, p, inputs):
        if self.k >= p.shape[1]:
            return p, None
        order = np.argsort(-p, axis=1, kind="stable")  # stable: lower index first among equals
        keep = np.zeros(p.shape, bool)
        np.put_along_axis(keep, order[:, :self.k], True, axis=1)
        out = np.where(keep, p, 0.0)
        return out / out.sum(axis=1, keepdims=True), None

    def config(self) -> dict:
        return {"k": self.k}


class Rounded(Defense):
    """Round every probability to `decimals` decimal places, keeping a probability vector.

    Each row becomes integers units u (1 unit = 10^-d) summing to exactly 10^d by largest-remainder
    rounding (floor every entry, then give the missing units to the largest remainders, lower
    index first among equals), so the answer is a vector of d-decimal numbers that sums to 1;
    plain `round` would not (0.33, 0.33, 0.33). Rounding can tie or overtake the top class
    (0.46, 0.45 at d = 1 gives 0.5, 0.5, and the first index would win); then every other class
    that ties or beats it gives it one unit, which makes it the strict winner again (those classes
    hold at most one unit more than the top class, see `_keep_top`).

    Args:
        decimals: d, an integer in 0..15 (0 answers the label only).
    """

    name = "round"
    knob = Knob("decimals", (3, 2, 1, 0), "smaller", int, "decimals")
    baseline_grid = (3, 2, 1)  # 0 decimals is label_only

    def __init__(self, *, decimals: int = 1, secret: bytes | None = None):
        super().__init__(secret=secret)
        if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= MAX_DECIMALS:
            raise ConfigError(f"decimals: must be an integer in 0..{MAX_DECIMALS} "
                              f"(0 answers the label only), got {decimals!r}")
        self.decimals = decimals

    def _transform(self, p, inputs):
        total = 10 ** self.decimals
        scaled = p * total
        units = np.floor(scaled)
        missing = np.rint(total - units.sum(axis=1)).astype(np.int64)  # 0 .. C-1 per row
        order = np.argsort(-(scaled - units), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(p.shape[1])[None, :], axis=1)
        units += rank < missing[:, None]
        units = _keep_top(units, p.argmax(axis=1))
        return units / total, None

    def config(self) -> dict:
        return {"decimals": self.decimals}


def _keep_top(units: np.ndarray, top: np.ndarray) -> np.ndarray:
    """(N, C) non-negative integer-valued units, (N,) wanted top classes -> units whose first
    argmax is `top`, with the same row sums.

    Largest-remainder rounding moves each entry by less than one unit, so an entry that ties or
    beats the top class's (a "violator") holds at most one unit more. Every violator holding a
    unit gives one to the top class: then each violator has at most the top's old count and the
    top gained at least one. (If the top holds 0 units a positive violator exists, as the row sum
    is positive, so the top always gains.)
    """
    n, c = units.shape
    cols = np.arange(c)[None, :]
    u_top = units[np.arange(n), top][:, None]
    before = cols < top[:, None]
    violator = np.where(before, units >= u_top, units > u_top) & (cols != top[:, None])
    give = violator & (units >= 1)
    out = units - give
    out[np.arange(n), top] += give.sum(axis=1)
    return out


class Noise(Defense):
    """Add keyed Laplace or Gaussian noise to each probability, repair the argmax, cap the L1 move.

    Per row s (C,): z = scale * noise(KeyedPRF(secret, model).uniform(s)) (the same query always
    gets the same noise, so repeating it reveals nothing); g = clip(s + z, 0) renormalized (the
    clean row if every entry clipped to 0); if argmax g is not argmax s, the least-L1 repair of
    `purifier.defenses.repair.repair_top`; then s + t (g - s) with t = min(1, budget / ||g - s||_1),
    so ||out - s||_1 <= budget on every row (both ends keep the top class, so the blend does).

    Args:
        kind: "laplace" (density exp(-|x|/scale) / (2 scale)) or "gaussian" (standard deviation scale).
        scale: noise scale, a finite number >= 0 (0 changes nothing).
        budget: per-row L1 cap, a finite number >= 0, or None for no cap.
        secret: the PRF key (required before `transform`).
    """

    name = "noise"
    knob = Knob("scale", (0.005, 0.01, 0.02, 0.05, 0.1, 0.2), "larger", float, "scale")
    baseline_grid = (0.003, 0.01, 0.03)

    def __init__(self, *, kind: str = "laplace", scale: float = 0.05, budget: float | None = None,
                 secret: bytes | None = None):
        super().__init__(secret=secret)
        if kind not in NOISE_KINDS:
            raise ConfigError(f"kind: {kind!r} is not one of {', '.join(NOISE_KINDS)}")
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
            raise ConfigError(f"scale: must be a finite number >= 0, got {scale!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                                   or not math.isfinite(budget) or budget < 0):
            raise ConfigError(f"budget: must be a finite L1 distance >= 0 (or None for no cap), got {budget!r}")
        self.kind, self.scale = kind, float(scale)
        self.budget = None if budget is None else float(budget)
        self._prf: KeyedPRF | None = None

    def _noise(self, p: np.ndarray) -> np.ndarray:
        """(N, C) standard draws of the configured kind, keyed by the clean rows."""
        if self.secret is None:
            raise ConfigError("secret: the noise defense needs the PRF secret; set PURIFIER_SECRET, "
                              "PURIFIER_SECRET_FILE or --secret-file")
        if self._prf is None or self._prf.model_id != self.model_id:
            self._prf = KeyedPRF(self.secret, self.model_id)
        purpose = f"noise-{self.kind}"
        if self.kind == "gaussian":
            return self._prf.normal(p, purpose, p.shape[1])
        # inverse CDF of the standard Laplace on a uniform moved off 0 by half a step, so the
        # logarithm stays finite
        v = self._prf.uniform(p, purpose, p.shape[1]) + 2.0 ** -54 - 0.5
        return -np.sign(v) * np.log1p(-2.0 * np.abs(v))

    def _transform(self, p, inputs):
        g = np.clip(p + self.scale * self._noise(p), 0.0, None)
        s = g.sum(axis=1, keepdims=True)
        g = np.where(s > 0, g / np.where(s > 0, s, 1.0), p)
        g = repair_top(g, p.argmax(axis=1))
        if self.budget is not None:
            g = blend_to_budget(p, g, self.budget)
        return g, None

    def config(self) -> dict:
        return {"kind": self.kind, "scale": self.scale, "budget": self.budget}
