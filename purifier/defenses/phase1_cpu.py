"""MemGuard's fast Phase I on the CPU, in numpy: the same search as `phase1.fast_phase1`, cheaper.

Jia et al., "MemGuard", CCS 2019 (REFERENCE.md section 2); the solver is described in
`purifier.defenses.phase1`. On one CPU core the torch version spends most of a batch-1 call in
per-op overhead (~100 small torch ops at 5-10 us each); a numpy op costs ~1 us. This module runs
the identical algorithm (same grid, same BRANCHES-ary narrowing, same mixtures, float64
throughout) with numpy arrays, and avoids work whose result is known in advance:

* the ray's logits are sorted, and softmax is monotone, so its probabilities need no re-sort
  before `h` (the uniform and top-two mixtures likewise keep the sorted order);
* h0 and h's gradient at the clean vector come from one pass (`logit_and_grad`);
* every MLP pass is padded to a multiple of ROW_BLOCK rows (`NumpyMLP`), so a row's output is
  independent of the batch around it -- which makes the next two exact:
* on small batches, two narrowing passes run as one: the second pass's probes for each of the
  first pass's BRANCHES outcomes are known before the outcome is (3 + 4 * 3 = 15 probes, one
  padded block of 16 rows, instead of two blocks). 5 passes cost 3 forward passes;
* on larger batches probes are evaluated lazily, in order, and only for rows whose first
  crossing is still unknown. The first crossing among ascending probes does not depend on the
  probes after it, so the result equals evaluating every probe for every row.

Both are checked against the torch solver (equal crossings, vectors within 1e-12) and for batch
independence in tests/unit/defenses/test_memguard_cpu.py.

Arrays: p (N, C) float64 rows in class order; sorted logits e (N, C); probes ts (N, K).
"""

from __future__ import annotations

import numpy as np

from purifier.defenses.membership_classifier import NumpyMLP
from purifier.defenses.phase1 import (
    BRANCHES,
    EARLY_EXIT,
    GRID_ABSOLUTE,
    GRID_PREDICTED,
    LOG_FLOOR,
    PASSES,
    T_MAX,
    sort_rows,
    unsort_rows,
)

# rows x probes at or below which a pass evaluates all its probes at once: one padded block of
# rows costs about what one row does; above it compute dominates and probes are evaluated lazily
LAZY_BELOW = 16


def softmax(e: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed as torch does (shifted by the row maximum)."""
    z = e - e.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def _crossed(mlp: NumpyMLP, path, h0: np.ndarray, idx: np.ndarray, ts: np.ndarray,
             presorted: bool) -> np.ndarray:
    """(len(idx), K) bool: h's sign flipped versus h0 (N,) at the probes ts (len(idx), K).

    `path(idx, ts)` gives the logits (len(idx), K, C) of rows idx at ts.
    """
    m, k = ts.shape
    q = softmax(path(idx, ts)).reshape(m * k, -1)
    if not presorted:  # h judges the vector as anyone sorting it sees it
        q.sort(axis=1)
    return (mlp.logit(q) * np.repeat(h0[idx], k) <= 0).reshape(m, k)


def _first_crossing(mlp: NumpyMLP, path, h0: np.ndarray, ts: np.ndarray, start: np.ndarray,
                    presorted: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First probe among the ascending ts (N, K) at which h's sign has flipped.

    Returns (that t (N,), the probe before it (`start` (N,) for the first probe), found (N,)).
    Probe columns are evaluated in order, as many per pass as fill one padded block of rows
    (a whole small batch in one pass), each for the rows still without a crossing. Rows without one get t = ts[:, 0].
    """
    n, k = ts.shape
    first = np.full(n, -1)
    pending = np.arange(n)
    group = max(1, LAZY_BELOW // n)  # probes per pass: up to one padded block of rows
    for j in range(0, k, group):
        crossed = _crossed(mlp, path, h0, pending, ts[pending, j:j + group], presorted)
        hit = crossed.any(axis=1)
        first[pending[hit]] = j + crossed[hit].argmax(axis=1)
        pending = pending[~hit]
        if len(pending) == 0:
            break
    found = first >= 0
    at = np.where(found, first, 0)
    rows = np.arange(n)
    before = np.where(at > 0, ts[rows, np.maximum(at - 1, 0)], start)
    return ts[rows, at], before, found


def _narrowed(lo: np.ndarray, hi: np.ndarray, inner: np.ndarray, crossed: np.ndarray):
    """One BRANCHES-ary narrowing of [lo, hi] (N,) given which inner probes (N, B-1) crossed."""
    hit = crossed.any(axis=1)
    at = crossed.argmax(axis=1)
    rows = np.arange(len(lo))
    before = np.where(at > 0, inner[rows, np.maximum(at - 1, 0)], lo)
    # no inner probe crossed: the crossing lies between the last probe and hi
    return np.where(hit, before, inner[:, -1]), np.where(hit, inner[rows, at], hi)


def _narrow_two(mlp: NumpyMLP, path, h0: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                presorted: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two narrowing passes in one forward pass: the second pass's probes for each of the first
    pass's BRANCHES outcomes are computed (with the same floating-point operations as after the
    outcome is known) and probed speculatively, B-1 + B(B-1) = 15 probes, one padded block."""
    m = len(lo)
    frac = np.arange(1, BRANCHES) / BRANCHES
    inner = lo[:, None] + (hi - lo)[:, None] * frac
    lo_next = np.concatenate([lo[:, None], inner], axis=1)  # outcome j: first crossing at probe j,
    hi_next = np.concatenate([inner, hi[:, None]], axis=1)  # or none (j = B-1)
    inner2 = lo_next[..., None] + (hi_next - lo_next)[..., None] * frac  # (m, B, B-1)
    crossed = _crossed(mlp, path, h0, np.arange(m), np.concatenate([inner, inner2.reshape(m, -1)], axis=1),
                       presorted)
    c1 = crossed[:, :BRANCHES - 1]
    outcome = np.where(c1.any(axis=1), c1.argmax(axis=1), BRANCHES - 1)
    rows = np.arange(m)
    c2 = crossed[:, BRANCHES - 1:].reshape(m, BRANCHES, BRANCHES - 1)[rows, outcome]
    return _narrowed(lo_next[rows, outcome], hi_next[rows, outcome], inner2[rows, outcome], c2)


def _path_search(mlp: NumpyMLP, path, top: np.ndarray, h0: np.ndarray, t_pred: np.ndarray,
                 t_max: float, presorted: bool) -> tuple[np.ndarray, np.ndarray]:
    """First boundary crossing along a path t -> logits, t in (0, t_max] (as phase1._path_search).

    Returns (t (N,), success (N,)). Rows without a crossing on the grid are not narrowed: their
    t is never used.
    """
    n = len(t_pred)
    grid = np.sort(np.concatenate([np.minimum(t_pred[:, None] * GRID_PREDICTED, t_max),
                                   np.broadcast_to(t_max * (GRID_ABSOLUTE / T_MAX), (n, len(GRID_ABSOLUTE)))],
                                  axis=1), axis=1)
    hi, lo, found = _first_crossing(mlp, path, h0, grid, np.zeros(n), presorted)
    rows = found.nonzero()[0]
    if len(rows) == 0:
        return hi, found

    def sub_path(idx, ts):
        return path(rows[idx], ts)

    h, lo_r, g0 = hi[rows], lo[rows], h0[rows]
    frac = np.arange(1, BRANCHES) / BRANCHES
    done = 0
    while done < PASSES:
        if PASSES - done >= 2 and len(rows) * BRANCHES * (BRANCHES - 1) <= LAZY_BELOW:
            lo_r, h = _narrow_two(mlp, sub_path, g0, lo_r, h, presorted)
            done += 2
            continue
        inner = lo_r[:, None] + (h - lo_r)[:, None] * frac
        t, before, hit = _first_crossing(mlp, sub_path, g0, inner, lo_r, presorted)
        # no inner probe crossed: the crossing lies between the last probe and hi
        h, lo_r = np.where(hit, t, h), np.where(hit, before, inner[:, -1])
        done += 1
    hi[rows] = h
    found[rows] = path(rows, h[:, None])[:, 0].argmax(axis=1) == top[rows]
    return hi, found


def _mix_search(mlp: NumpyMLP, s: np.ndarray, gp: np.ndarray, top: np.ndarray,
                h0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phase1._mix_search: mixtures of the sorted s (N, C) with uniform, one-hot top and top-two
    targets; returns the smallest-L1 crossing (N, C) and success (N,)."""
    n, c = s.shape
    top2 = np.zeros_like(s)
    top2[:, -2:] = 0.5
    onehot = np.zeros_like(s)
    onehot[np.arange(n), top] = 1.0
    # uniform and top-two mixtures keep the ascending order (a monotone map of each entry, or the
    # same amount added to the last two); the one-hot top does not when the top is tied
    targets = ((np.full_like(s, 1.0 / c), True), (onehot, False), (top2, True))
    floor = float(np.log(LOG_FLOOR))
    best, best_l1 = s.copy(), np.full(n, np.inf)
    for v, presorted in targets:
        slope = -np.sign(h0) * (gp * (v - s)).sum(axis=1)

        def mix(rows, ts, v=v):
            t = ts[..., None]
            return np.maximum(np.log((1 - t) * s[rows, None, :] + t * v[rows, None, :]), floor)

        t, ok = _path_search(mlp, mix, top, h0, np.abs(h0) / np.where(slope > 0, slope, 1e-300),
                             1.0 - 1e-9, presorted)
        cand = softmax(mix(np.arange(n), t[:, None])[:, 0])
        l1 = np.where(ok, np.abs(cand - s).sum(axis=1), np.inf)
        better = l1 < best_l1
        best, best_l1 = np.where(better[:, None], cand, best), np.where(better, l1, best_l1)
    return best, np.isfinite(best_l1)


def fast_phase1_cpu(mlp: NumpyMLP, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phase1.fast_phase1 in numpy. p (N, C) float64 -> (noised (N, C), success (N,))."""
    order, e0, top = sort_rows(p)
    s = softmax(e0)  # the anchor: exactly softmax(e0)
    # h0 and the gradient in one pass (the gradient of early-exit rows is not used)
    h0, gp = mlp.logit_and_grad(s)
    early = np.abs(1.0 / (1.0 + np.exp(-h0)) - 0.5) <= EARLY_EXIT
    best, success = s.copy(), np.zeros(len(p), bool)
    rows = (~early).nonzero()[0]
    if len(rows) == 0:
        return unsort_rows(best, order), success
    e0, s, t0, g0, gp = e0[rows], s[rows], top[rows], h0[rows], gp[rows]
    # 1. the ray along the steepest logit direction of |h| (the faithful solver's first step)
    ge = s * (gp - (gp * s).sum(axis=1, keepdims=True))
    norm = np.sqrt((ge * ge).sum(axis=1))
    d = -np.sign(g0)[:, None] * ge / np.where(norm > 0, norm, 1.0)[:, None]

    def ray(idx, ts):
        # sorted logits: the released vector keeps the clean ranking, and softmax keeps the order
        return np.sort(e0[idx, None, :] + ts[..., None] * d[idx, None, :], axis=-1)

    t, found = _path_search(mlp, ray, t0, g0, np.abs(g0) / np.where(norm > 0, norm, 1e-300), T_MAX, True)
    noised = softmax(ray(np.arange(len(rows)), t[:, None])[:, 0])
    retry = (~found).nonzero()[0]
    if len(retry):
        noised[retry], found[retry] = _mix_search(mlp, s[retry], gp[retry], t0[retry], g0[retry])
    best[rows] = np.where(found[:, None], noised, s)
    success[rows] = found
    return unsort_rows(best, order), success
