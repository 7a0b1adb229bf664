"""MemGuard's Phase I, fast and in constant work: the smallest noise that carries a vector across
the defender's 0.5 boundary, found by a boundary search along three short paths, in numpy.

Jia et al., "MemGuard", CCS 2019 (docs/design.md#memguard-fast-solver). Rows p (N, C) float64 in class order
come back as (noised (N, C) in class order, success (N,) bool); a row that fails is its clean
self. The search works on the sorted vector (ascending; softmax is monotone, so sorted logits map
to sorted probabilities). A candidate succeeds when its top class is still on top (first index on
ties, as numpy's argmax) and `h`'s pre-sigmoid output, on the candidate re-sorted as an attacker
sorting the released vector sees it, has changed sign versus the clean vector (h * h0 <= 0).

Three paths t -> vector leave the clean sorted vector s (t = 0):

* the ray along h's steepest logit direction (the faithful solver's first step), logits
  re-sorted so the released vector keeps the clean ranking, t in (0, T_MAX];
* two order-keeping mixtures (1 - t) s + t v, t in (0, 1): towards the one-hot top (more
  confident) and towards the top two at 1/2 each (mass moved to the runner-up, what the faithful
  solver does on saturated rows). A third, towards the uniform vector, was dropped: on the
  digits and synthetic100 targets it was never the smallest crossing (0 of 1,200 rows).

A grid of 8 probes per path (multiples of the linearised boundary distance, and fixed fractions
of the path), all paths in one forward pass, brackets each path's first crossing; the path whose
grid crossing is nearest in L1 is narrowed by LEVELS rounds of bisection (2**-8 of its bracket)
and released. On the digits and synthetic100 targets this gives the L1 of the earlier solver
(ratio 0.987 and 1.001, 600 rows each) and every row it carried across.

**Constant work.** Every row takes exactly the same sequence of operations, whatever `h` says
about it: all three paths, the full grid and every bisection level, for rows that cross early,
late, never, or sit on the boundary (|sigmoid(h0) - 0.5| <= EARLY_EXIT: no noise) alike; results
are selected with masks, never by branching on a row's values. MemGuard's running time therefore
carries no trace of its membership verdict (an earlier solver tried the mixtures only for rows the
ray could not carry, i.e. mostly for rows `h` called members, and single-row latency through the
sidecar scored membership AUC 0.72: benchmarks/bench_timing.py). The only schedule choice is how
many bisection levels share one forward pass (four at batch 1, where a pass costs about the same
for 16 rows as for 1): it depends on the batch size alone, and the probe points are integer
multiples of 2**-LEVELS of the bracket, so every schedule computes bit-identical results.
Cost per row: one pass for h0 and its gradient, 24 grid probes, 8 bisection probes.

Rows are independent of the batch around them: `MembershipClassifier` pads every matmul to a
multiple of ROW_BLOCK rows and every other operation is row-wise (tests/unit/defenses/
test_memguard_fast.py checks both, and that the operation sequence is the same for every row).

The solver runs on the CPU in numpy. A torch/CUDA version of it existed and was removed: no GPU
measurement showed it winning; it can come back with one. `phase1_faithful` (torch) is the
original algorithm, the reference this solver is checked against.

Arrays: p (N, C); sorted probabilities s (N, C); paths P = 3; probes ts (N, P, K).
"""

from __future__ import annotations

import numpy as np

from purifier.defenses.membership_classifier import MembershipClassifier

STEP, MAX_STEPS = 0.1, 299  # the faithful solver's step length and step budget per c3 level
EARLY_EXIT = 1e-5  # |sigmoid(h0) - 0.5| at or below this: already on the boundary, no noise
LOG_FLOOR = 1e-30  # zero probabilities get logit log(1e-30): finite, and softmax barely moves them

# The ray is probed up to the faithful solver's longest path; a mixture up to (almost) its target.
T_MAX = STEP * MAX_STEPS
MIX_T_MAX = 1.0 - 1e-9
# Grid per path, all paths in one forward pass: GRID_PREDICTED multiples of the linearised boundary
# distance and GRID_ABSOLUTE fractions of the path's length (neighbouring probes ~2.5x apart).
GRID_PREDICTED = np.geomspace(0.5, 8.0, 4)
GRID_ABSOLUTE = np.geomspace(1e-2 / T_MAX, 1.0, 4)
# Bisection levels on the chosen path: the crossing to 2**-8 of its grid bracket (~0.6% of t).
LEVELS = 8
# Probe rows per forward pass up to which bisection levels are evaluated speculatively together
# (2**k - 1 probes settle k levels): one padded block of rows costs about what one row does.
SPECULATE_ROWS = 16
N_PATHS = 3


def sort_rows(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p (N, C) -> (order (N, C) stable ascending argsort, sorted logits e0 (N, C), top (N,)).

    The stable sort puts the original first-index argmax first among tied maxima, so the sorted
    top position `top` is exactly the class the output must keep.
    """
    order = np.argsort(p, axis=1, kind="stable")
    s = np.take_along_axis(p, order, axis=1)
    return order, np.log(np.maximum(s, LOG_FLOOR)), s.argmax(axis=1)


def unsort_rows(sorted_rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(sorted_rows)
    np.put_along_axis(out, order, sorted_rows, axis=1)
    return out


def softmax(e: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the row maximum (as torch computes it)."""
    z = e - e.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class Paths:
    """The three paths of a batch. `at(ts)` maps parameters ts (N, P, K) to vectors (N, P, K, C)."""

    def __init__(self, e0: np.ndarray, s: np.ndarray, top: np.ndarray, h0: np.ndarray, gp: np.ndarray):
        n, c = s.shape
        sign = -np.sign(h0)[:, None]
        # the ray: h's gradient carried back through softmax to the logits, towards the boundary
        ge = s * (gp - (gp * s).sum(axis=1, keepdims=True))
        norm = np.sqrt((ge * ge).sum(axis=1))
        self.e0, self.d = e0, sign * ge / np.where(norm > 0, norm, 1.0)[:, None]
        # the mixtures' targets (N, 2, C): one-hot top, top two (the last two positions)
        targets = np.zeros((n, 2, c))
        targets[np.arange(n), 0, top] = 1.0
        targets[:, 1, -2:] = 0.5
        self.s, self.v = s, targets
        # linearised distance to the boundary along each path (the grid's unit): |h0| / slope
        slope = np.concatenate([norm[:, None], (sign * (gp[:, None, :] * (targets - s[:, None, :])).sum(axis=2))],
                               axis=1)
        self.t_pred = np.abs(h0)[:, None] / np.where(slope > 0, slope, 1e-300)
        self.t_max = np.array([T_MAX, MIX_T_MAX, MIX_T_MAX])

    def at(self, ts: np.ndarray) -> np.ndarray:
        t = ts[..., None]
        # sorted logits: the released vector keeps the clean ranking, and softmax keeps the order
        ray = softmax(np.sort(self.e0[:, None, :] + t[:, 0] * self.d[:, None, :], axis=-1))
        mix = (1.0 - t[:, 1:]) * self.s[:, None, None, :] + t[:, 1:] * self.v[:, :, None, :]
        return np.concatenate([ray[:, None], mix], axis=1)

    def grid(self) -> np.ndarray:
        """(N, P, 8) ascending probe parameters, clipped to each path's length."""
        n = len(self.t_pred)
        predicted = np.minimum(self.t_pred[..., None] * GRID_PREDICTED, self.t_max[:, None])
        absolute = np.broadcast_to(self.t_max[:, None] * GRID_ABSOLUTE, (n, N_PATHS, len(GRID_ABSOLUTE)))
        return np.sort(np.concatenate([predicted, absolute], axis=2), axis=2)


def _crossed(h: MembershipClassifier, vectors: np.ndarray, h0: np.ndarray) -> np.ndarray:
    """vectors (N, ..., C) -> (N, ...) bool: h's sign flipped versus h0 (N,) on the re-sorted
    vector (as anyone sorting the released vector sees it)."""
    q = np.sort(vectors.reshape(-1, vectors.shape[-1]), axis=1)
    out = h.logit(q).reshape(vectors.shape[:-1])
    return out * h0.reshape((-1,) + (1,) * (out.ndim - 1)) <= 0


def _levels_per_pass(n: int) -> int:
    """Bisection levels settled per forward pass for a batch of n rows (batch size alone decides)."""
    k = 1
    while k < LEVELS and n * (2 ** (k + 1) - 1) <= SPECULATE_ROWS:
        k += 1
    return k


def _bisect(h: MembershipClassifier, path, h0: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """LEVELS rounds of bisection on brackets [lo, hi] (N,) whose hi has crossed and lo has not.

    `path(ts)` maps parameters (N, K) to vectors (N, K, C). The probe points are
    lo + (hi - lo) * (k / 2**LEVELS) for integers k, whatever the schedule; returns the integer
    k (N,) of the narrowed bracket's crossed end.
    """
    n = lo.shape[0]
    width, scale = hi - lo, 1.0 / 2 ** LEVELS
    k_lo = np.zeros(n, np.int64)
    done, per_pass = 0, _levels_per_pass(n)
    rows = np.arange(n)
    while done < LEVELS:
        levels = min(per_pass, LEVELS - done)
        unit = 2 ** (LEVELS - done - levels)  # spacing of this pass's probes, in steps of k
        ks = k_lo[:, None] + unit * np.arange(1, 2 ** levels)  # (N, 2**levels - 1)
        crossed = _crossed(h, path(lo[:, None] + width[:, None] * (ks * scale)), h0)
        # settle the levels in order from the speculative probes: the current bracket's midpoint
        # is probe number offset + half (in units) from this pass's k_lo
        offset = np.zeros(n, np.int64)
        for j in range(levels):
            half = 2 ** (levels - j - 1)
            offset = np.where(crossed[rows, offset + half - 1], offset, offset + half)
        k_lo = k_lo + unit * offset
        done += levels
    return k_lo + 1


def fast_phase1(h: MembershipClassifier, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Constant-work boundary search. p (N, C) float64 -> (noised (N, C), success (N,))."""
    order, e0, top = sort_rows(p)
    s = softmax(e0)  # the anchor: exactly softmax(e0)
    h0, gp = h.logit_and_grad(s)
    on_boundary = np.abs(1.0 / (1.0 + np.exp(-h0)) - 0.5) <= EARLY_EXIT
    paths = Paths(e0, s, top, h0, gp)
    n = len(p)
    rows = np.arange(n)
    # 1. the grid, every path in one pass: the first crossing on each path brackets it
    grid = paths.grid()
    crossed = _crossed(h, paths.at(grid), h0)
    first = crossed.argmax(axis=2)[..., None]
    hi = np.take_along_axis(grid, first, axis=2)[..., 0]  # (N, P)
    lo = np.where(first[..., 0] > 0, np.take_along_axis(grid, np.maximum(first - 1, 0), axis=2)[..., 0], 0.0)
    # 2. the path whose grid crossing is nearest in L1 (top class kept), for every row
    at_hi = paths.at(hi[..., None])[:, :, 0]  # (N, P, C)
    ok = crossed.any(axis=2) & (at_hi.argmax(axis=2) == top[:, None]) & ~on_boundary[:, None]
    best = np.where(ok, np.abs(at_hi - s[:, None, :]).sum(axis=2), np.inf).argmin(axis=1)
    success = ok[rows, best]

    def chosen(ts):  # (N, K) -> the chosen path's vectors (N, K, C)
        return paths.at(np.broadcast_to(ts[:, None, :], (n, N_PATHS, ts.shape[1])))[rows, best]

    # 3. bisection on the chosen path of every row (failed rows narrow a bracket nobody uses)
    lo_b, hi_b = lo[rows, best], hi[rows, best]
    k = _bisect(h, chosen, h0, lo_b, hi_b)
    refined = chosen((lo_b + (hi_b - lo_b) * (k * (1.0 / 2 ** LEVELS)))[:, None])[:, 0]
    kept = refined.argmax(axis=1) == top  # else the grid point, which kept it
    noised = np.where((success & kept)[:, None], refined, np.where(success[:, None], at_hi[rows, best], s))
    return unsort_rows(noised, order), success
