"""Output guarantees shared by reformer-style defenses: minimal argmax repair and L1 budget blending.

Used by PURIFIER (Yang et al., AAAI 2023 / arXiv 2005.03915): the learned reformer may move the
top class or spend more distortion than allowed; these two batched functions restore the label
with the least L1 movement and pull each row back toward the clean vector just enough to fit a
per-row budget.
"""

from __future__ import annotations

import numpy as np

REPAIR_MARGIN = 2.0 ** -7


def repair_top(g: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Minimal repair: (N, C) rows g, (N,) wanted top classes -> rows whose argmax is `top`.

    Rows already correct are returned unchanged. Otherwise find the level c with
    g_k + sum_{j != k} max(0, g_j - c) = c (1 + margin) (water-filling over the others sorted
    descending), clip the others at c and put the removed mass on k. Mass is conserved.
    """
    n, C = g.shape
    rows = np.arange(n)
    out = g.copy()
    bad = g.argmax(axis=1) != top
    if not bad.any():
        return out
    sub, k = g[bad], top[bad]
    i = np.arange(len(sub))
    gk = sub[i, k]
    others = sub.copy()
    others[i, k] = -np.inf
    srt = -np.sort(-others, axis=1)[:, :C - 1]  # (n, C-1) descending, k excluded
    r = np.arange(1, C)
    levels = (gk[:, None] + np.cumsum(srt, axis=1)) / (r + 1.0 + REPAIR_MARGIN)  # clip top r
    # the right r is the largest one whose r-th entry still lies above its level
    valid = srt > levels
    r_star = C - 2 - np.argmax(valid[:, ::-1], axis=1)  # last True index (row 0 True: g_j > g_k)
    c = levels[i, r_star]
    fixed = np.minimum(sub, c[:, None])
    fixed[i, k] = c * (1.0 + REPAIR_MARGIN)
    out[rows[bad]] = fixed
    return out


def blend_to_budget(s: np.ndarray, g: np.ndarray, budget: float) -> np.ndarray:
    """(N, C) clean s and reformed g -> s + t (g - s), t = min(1, budget / ||g - s||_1) per row."""
    dist = np.abs(g - s).sum(axis=1, keepdims=True)
    t = np.minimum(1.0, budget / np.where(dist > 0, dist, 1.0))
    return s + t * (g - s)
