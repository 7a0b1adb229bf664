"""A frozen copy of the numpy Phase I solver that served MemGuard's fast mode until commit b07f2d6
(`purifier/defenses/phase1.py` there), with the numpy MLP it ran on. Not library code: the ONNX
solver that replaced it is checked against it row for row (test_memguard_fast.py). Do not edit.
"""

from __future__ import annotations

import numpy as np

STEP, MAX_STEPS = 0.1, 299
EARLY_EXIT = 1e-5
LOG_FLOOR = 1e-30
T_MAX = STEP * MAX_STEPS
MIX_T_MAX = 1.0 - 1e-9
GRID_PREDICTED = np.geomspace(0.5, 8.0, 4)
GRID_ABSOLUTE = np.geomspace(1e-2 / T_MAX, 1.0, 4)
LEVELS = 8
SPECULATE_ROWS = 16
N_PATHS = 3
ROW_BLOCK = 16


class NumpyMLP:
    """h (MembershipClassifier.arrays) in float64 numpy, every matmul on a multiple of ROW_BLOCK rows."""

    def __init__(self, arrays):
        a = arrays
        self._wt = [np.ascontiguousarray(a[f"w{i}"].T) for i in range(1, 4)]
        self._w = [np.ascontiguousarray(a[f"w{i}"]) for i in range(1, 4)]
        self._b = [a[f"b{i}"] for i in range(1, 4)]
        self._w4, self._b4 = a["w4"][0].copy(), float(a["b4"][0])

    @staticmethod
    def _pad(x):
        pad = (-x.shape[0]) % ROW_BLOCK
        return np.concatenate([x, np.zeros((pad, x.shape[1]))]) if pad else x

    def logit(self, x):
        n = x.shape[0]
        a = self._pad(x)
        for w, b in zip(self._wt, self._b, strict=True):
            a = a @ w
            a += b
            np.maximum(a, 0.0, out=a)
        return (a[:n] * self._w4).sum(axis=1) + self._b4

    def logit_and_grad(self, x):
        n = x.shape[0]
        a = self._pad(x)
        z1 = a @ self._wt[0] + self._b[0]
        z2 = np.maximum(z1, 0.0) @ self._wt[1] + self._b[1]
        z3 = np.maximum(z2, 0.0) @ self._wt[2] + self._b[2]
        out = (np.maximum(z3[:n], 0.0) * self._w4).sum(axis=1) + self._b4
        g2 = ((z3 > 0) * self._w4) @ self._w[2] * (z2 > 0)
        g1 = (g2 @ self._w[1]) * (z1 > 0)
        return out, (g1 @ self._w[0])[:n]


def sort_rows(p):
    order = np.argsort(p, axis=1, kind="stable")
    s = np.take_along_axis(p, order, axis=1)
    return order, np.log(np.maximum(s, LOG_FLOOR)), s.argmax(axis=1)


def unsort_rows(sorted_rows, order):
    out = np.empty_like(sorted_rows)
    np.put_along_axis(out, order, sorted_rows, axis=1)
    return out


def softmax(e):
    z = e - e.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class Paths:
    def __init__(self, e0, s, top, h0, gp):
        n, c = s.shape
        sign = -np.sign(h0)[:, None]
        ge = s * (gp - (gp * s).sum(axis=1, keepdims=True))
        norm = np.sqrt((ge * ge).sum(axis=1))
        self.e0, self.d = e0, sign * ge / np.where(norm > 0, norm, 1.0)[:, None]
        targets = np.zeros((n, 2, c))
        targets[np.arange(n), 0, top] = 1.0
        targets[:, 1, -2:] = 0.5
        self.s, self.v = s, targets
        slope = np.concatenate([norm[:, None], (sign * (gp[:, None, :] * (targets - s[:, None, :])).sum(axis=2))],
                               axis=1)
        self.t_pred = np.abs(h0)[:, None] / np.where(slope > 0, slope, 1e-300)
        self.t_max = np.array([T_MAX, MIX_T_MAX, MIX_T_MAX])

    def at(self, ts):
        t = ts[..., None]
        ray = softmax(np.sort(self.e0[:, None, :] + t[:, 0] * self.d[:, None, :], axis=-1))
        mix = (1.0 - t[:, 1:]) * self.s[:, None, None, :] + t[:, 1:] * self.v[:, :, None, :]
        return np.concatenate([ray[:, None], mix], axis=1)

    def grid(self):
        n = len(self.t_pred)
        predicted = np.minimum(self.t_pred[..., None] * GRID_PREDICTED, self.t_max[:, None])
        absolute = np.broadcast_to(self.t_max[:, None] * GRID_ABSOLUTE, (n, N_PATHS, len(GRID_ABSOLUTE)))
        return np.sort(np.concatenate([predicted, absolute], axis=2), axis=2)


def _crossed(h, vectors, h0):
    q = np.sort(vectors.reshape(-1, vectors.shape[-1]), axis=1)
    out = h.logit(q).reshape(vectors.shape[:-1])
    return out * h0.reshape((-1,) + (1,) * (out.ndim - 1)) <= 0


def _levels_per_pass(n):
    k = 1
    while k < LEVELS and n * (2 ** (k + 1) - 1) <= SPECULATE_ROWS:
        k += 1
    return k


def _bisect(h, path, h0, lo, hi):
    n = lo.shape[0]
    width, scale = hi - lo, 1.0 / 2 ** LEVELS
    k_lo = np.zeros(n, np.int64)
    done, per_pass = 0, _levels_per_pass(n)
    rows = np.arange(n)
    while done < LEVELS:
        levels = min(per_pass, LEVELS - done)
        unit = 2 ** (LEVELS - done - levels)
        ks = k_lo[:, None] + unit * np.arange(1, 2 ** levels)
        crossed = _crossed(h, path(lo[:, None] + width[:, None] * (ks * scale)), h0)
        offset = np.zeros(n, np.int64)
        for j in range(levels):
            half = 2 ** (levels - j - 1)
            offset = np.where(crossed[rows, offset + half - 1], offset, offset + half)
        k_lo = k_lo + unit * offset
        done += levels
    return k_lo + 1


def numpy_phase1(arrays, p):
    """The frozen solver on h's weights `arrays`: p (N, C) float64 -> (noised (N, C), success (N,))."""
    h = NumpyMLP(arrays)
    order, e0, top = sort_rows(p)
    s = softmax(e0)
    h0, gp = h.logit_and_grad(s)
    on_boundary = np.abs(1.0 / (1.0 + np.exp(-h0)) - 0.5) <= EARLY_EXIT
    paths = Paths(e0, s, top, h0, gp)
    n = len(p)
    rows = np.arange(n)
    grid = paths.grid()
    crossed = _crossed(h, paths.at(grid), h0)
    first = crossed.argmax(axis=2)[..., None]
    hi = np.take_along_axis(grid, first, axis=2)[..., 0]
    lo = np.where(first[..., 0] > 0, np.take_along_axis(grid, np.maximum(first - 1, 0), axis=2)[..., 0], 0.0)
    at_hi = paths.at(hi[..., None])[:, :, 0]
    ok = crossed.any(axis=2) & (at_hi.argmax(axis=2) == top[:, None]) & ~on_boundary[:, None]
    best = np.where(ok, np.abs(at_hi - s[:, None, :]).sum(axis=2), np.inf).argmin(axis=1)
    success = ok[rows, best]

    def chosen(ts):
        return paths.at(np.broadcast_to(ts[:, None, :], (n, N_PATHS, ts.shape[1])))[rows, best]

    lo_b, hi_b = lo[rows, best], hi[rows, best]
    k = _bisect(h, chosen, h0, lo_b, hi_b)
    refined = chosen((lo_b + (hi_b - lo_b) * (k * (1.0 / 2 ** LEVELS)))[:, None])[:, 0]
    kept = refined.argmax(axis=1) == top
    noised = np.where((success & kept)[:, None], refined, np.where(success[:, None], at_hi[rows, best], s))
    return unsort_rows(noised, order), success
