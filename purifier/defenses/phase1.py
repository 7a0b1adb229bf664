"""MemGuard Phase I: the smallest noise that carries a vector across the defender's 0.5 boundary.

Jia et al., "MemGuard", CCS 2019 (original `defense_framework.py`; REFERENCE.md section 2).
Both solvers take validated probability rows p (N, C) float64 in class order and return
(noised (N, C) float64 in class order, success (N,) bool); a row that fails is its clean self.
They work on the sorted *logit* vector e (ascending; softmax is monotone, so sorted logits map to
sorted probabilities) and ask `h` about softmax(e). A row succeeds when its top class is still on
top (first index on ties, as numpy/torch argmax) and h's pre-sigmoid output has changed sign
versus the clean vector (h * h0 <= 0, i.e. the sigmoid crossed 0.5).

`faithful_phase1` is the original algorithm, batched: loss
`c1|h| + c2*hinge(top) + c3*||softmax(e) - s||_1`, fixed-length normalized steps of 0.1, at most
299 steps per level, c3 escalating 0.1 -> 1e5 and keeping the smallest-distortion (largest c3)
success, stopping at the first failed level. Rows run in lock-step with per-row masks.

`fast_phase1` solves the same problem with one gradient evaluation and a handful of batched
forward passes: a search for the first boundary crossing along h's steepest logit direction
(re-sorted, so the released vector keeps the clean ranking and the top class, and h judges the
vector exactly as an attacker who sorts it will), a grid in one forward pass then BRANCHES-ary
narrowing instead of bisection so the whole batch moves together. Rows that ray cannot carry
across (saturated or tied rows) try three order-keeping mixtures (towards uniform, one-hot,
top-two) and keep the smallest L1; rows still left are released clean. On the CPU it runs in
numpy (`phase1_cpu`, the same search at a fraction of torch's per-op overhead); the torch
version (`fast_phase1_torch`) serves CUDA.
"""

from __future__ import annotations

import numpy as np
import torch

from purifier.defenses.membership_classifier import MembershipClassifier

C1, C2 = 1.0, 10.0
C3_LEVELS = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
STEP, MAX_STEPS = 0.1, 299
EARLY_EXIT = 1e-5  # |sigmoid(h0) - 0.5| at or below this: already on the boundary, no noise
LOG_FLOOR = 1e-30  # zero probabilities get logit log(1e-30): finite, and softmax barely moves them

# fast solver: a ray is probed at GRID_PREDICTED multiples of the linear prediction of the boundary
# distance and at GRID_ABSOLUTE steps (up to the faithful solver's longest path), in one batched
# forward pass, then the bracket of the first crossing is cut into BRANCHES parts PASSES times
# (4**5 = 1024x narrower, as 10 bisections, in half as many sequential passes: at small batches a
# pass costs the same for 3 points as for 1, since matmuls are padded to 16 rows anyway).
T_MAX = STEP * MAX_STEPS
GRID_PREDICTED = np.geomspace(0.5, 8.0, 8)
GRID_ABSOLUTE = np.geomspace(1e-2, T_MAX, 8)
BRANCHES, PASSES = 4, 5


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


def crossed_and_kept(h: MembershipClassifier, e: torch.Tensor, top: torch.Tensor,
                     h0: torch.Tensor) -> torch.Tensor:
    """(N, C) logits -> (N,) bool: top class still first and h's sign flipped."""
    return (e.argmax(dim=1) == top) & (h.logit(torch.softmax(e, dim=1)) * h0 <= 0)


def attacker_view_logit(h: MembershipClassifier, e: torch.Tensor) -> torch.Tensor:
    """h's pre-sigmoid output on softmax(e) re-sorted, as anyone sorting the released vector sees it.

    The faithful solver, like the original, asks h about softmax(e) in its sorted-start order; a
    step can reorder small entries, and then the released vector's sorted view may not cross. The
    fast solver checks crossings on the re-sorted vector instead.
    """
    return h.logit(torch.softmax(e, dim=1).sort(dim=1).values)


def loss_grad(h: MembershipClassifier, e: torch.Tensor, s: torch.Tensor, top: torch.Tensor,
              c3: float) -> torch.Tensor:
    """Gradient (N, C) of the original loss with respect to the sorted logits e (N, C).

    d|x|/dx at 0 and the hinge's derivative at 0 are 0, as in TensorFlow.
    """
    p = torch.softmax(e, dim=1)
    out, gp = h.logit_and_grad(p)
    gp = C1 * torch.sign(out)[:, None] * gp + c3 * torch.sign(p - s)
    ge = p * (gp - (gp * p).sum(dim=1, keepdim=True))  # back through softmax
    others = e.scatter(1, top[:, None], float("-inf"))
    rival = others.argmax(dim=1, keepdim=True)
    hinge_active = (others.gather(1, rival) - e.gather(1, top[:, None])) > 0
    push = C2 * hinge_active.to(e.dtype)
    return ge.scatter_add(1, rival, push).scatter_add(1, top[:, None], -push)


def _clean_start(h: MembershipClassifier, p: np.ndarray):
    order, e0, top = sort_rows(p)
    dev = h.device
    E0 = torch.from_numpy(e0).to(dev)
    S = torch.softmax(E0, dim=1)  # the anchor of the L1 term: exactly softmax(e0)
    h0 = h.logit(S)
    early = (torch.sigmoid(h0) - 0.5).abs() <= EARLY_EXIT
    return order, E0, S, torch.from_numpy(top).to(dev), h0, early


def _finish(best: torch.Tensor, success: torch.Tensor, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return unsort_rows(best.cpu().numpy(), order), success.cpu().numpy()


def _faithful_rows(h, E0, S, top, h0) -> tuple[torch.Tensor, torch.Tensor]:
    """The original c3 escalation on rows given as sorted logits; returns (best (N, C), success)."""
    n = E0.shape[0]
    best = S.clone()
    success = torch.zeros(n, dtype=torch.bool, device=E0.device)
    alive = torch.ones(n, dtype=torch.bool, device=E0.device)
    for c3 in C3_LEVELS:
        idx = alive.nonzero()[:, 0]
        if len(idx) == 0:
            break
        e, s, t, g0 = E0[idx].clone(), S[idx], top[idx], h0[idx]
        running = torch.ones(len(idx), dtype=torch.bool, device=E0.device)
        for _ in range(MAX_STEPS):  # steps, each batched over the rows still running
            r = running.nonzero()[:, 0]
            if len(r) == 0:
                break
            g = loss_grad(h, e[r], s[r], t[r], c3)
            norm = g.norm(dim=1, keepdim=True)
            e[r] = e[r] - STEP * g / torch.where(norm > 0, norm, 1.0)
            done = crossed_and_kept(h, e[r], t[r], g0[r])
            running[r[done]] = False
        ok = ~running  # a row stops running exactly when it has crossed with the top kept
        best[idx[ok]] = torch.softmax(e[ok], dim=1)
        success[idx[ok]] = True
        alive[idx[~ok]] = False
    return best, success


@torch.no_grad()
def faithful_phase1(h: MembershipClassifier, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The original Phase I, batched. p (N, C) float64 -> (noised (N, C), success (N,))."""
    order, E0, S, top, h0, early = _clean_start(h, p)
    best, success = S.clone(), torch.zeros(len(p), dtype=torch.bool, device=E0.device)
    rows = (~early).nonzero()[:, 0]
    if len(rows):
        best[rows], success[rows] = _faithful_rows(h, E0[rows], S[rows], top[rows], h0[rows])
    return _finish(best, success, order)


def _first_crossing(h, path, h0, ts, start) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probe the path at the ascending parameters ts (N, K) in one forward pass.

    `path(ts)` gives the logits (N, K, C). Returns (first t at which h's sign has flipped (N,),
    the probe before it (`start` for the first probe), found (N,)).
    """
    e = path(ts)
    n, k, c = e.shape
    crossed = (attacker_view_logit(h, e.reshape(n * k, c)) * h0.repeat_interleave(k) <= 0).reshape(n, k)
    first = crossed.to(torch.int8).argmax(dim=1, keepdim=True)
    prev = torch.cat([start[:, None], ts[:, :-1]], dim=1)
    return ts.gather(1, first)[:, 0], prev.gather(1, first)[:, 0], crossed.any(dim=1)


def _path_search(h, path, top, h0, t_pred, t_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First boundary crossing along a path t -> logits, t in (0, t_max].

    t_pred (N,) is the linearized parameter of the boundary. A grid of candidate t in one forward
    pass brackets the first crossing of h's sign, PASSES rounds of BRANCHES-ary search narrow
    it (one forward pass over the batch each). Returns (t (N,), success (N,)): at t the row has
    crossed, and success also requires the top class to be kept there.
    """
    n = t_pred.shape[0]
    dt = t_pred.dtype
    grid = torch.cat([(t_pred[:, None] * torch.from_numpy(GRID_PREDICTED).to(t_pred)).clamp(max=t_max),
                      (t_max * torch.from_numpy(GRID_ABSOLUTE / T_MAX).to(t_pred)).expand(n, len(GRID_ABSOLUTE))],
                     dim=1).sort(dim=1).values
    hi, lo, found = _first_crossing(h, path, h0, grid, torch.zeros(n, dtype=dt, device=grid.device))
    frac = torch.from_numpy(np.arange(1, BRANCHES) / BRANCHES).to(t_pred)
    for _ in range(PASSES):
        inner = lo[:, None] + (hi - lo)[:, None] * frac[None, :]
        t, before, hit = _first_crossing(h, path, h0, inner, lo)
        # no inner probe crossed: the crossing lies between the last probe and hi
        hi, lo = torch.where(hit, t, hi), torch.where(hit, before, inner[:, -1])
    kept = path(hi[:, None])[:, 0].argmax(dim=1) == top
    return hi, found & kept


def _mix_search(h, s, gp, top, h0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows the logit ray could not carry across (saturated rows, ties at the top): mix the sorted
    vector s (N, C) with a target v, p(t) = (1 - t) s + t v, for three targets that keep the sorted
    order and the top class for t < 1: the uniform vector (less confident), the one-hot top (more
    confident) and the top two at 1/2 each (mass moved to the runner-up, what the faithful solver
    does on saturated rows). Returns the smallest-L1 crossing (N, C) and success (N,).
    """
    n, c = s.shape
    top2 = torch.zeros_like(s)
    top2[:, -2:] = 0.5  # ascending sort: the top two positions are the last two
    targets = (torch.full_like(s, 1.0 / c), torch.zeros_like(s).scatter(1, top[:, None], 1.0), top2)
    floor = float(np.log(LOG_FLOOR))
    best, best_l1 = s.clone(), torch.full((n,), torch.inf, dtype=s.dtype, device=s.device)
    for v in targets:
        slope = -torch.sign(h0) * (gp * (v - s)).sum(dim=1)

        def mix(ts, v=v):
            return torch.log((1 - ts[..., None]) * s[:, None, :] + ts[..., None] * v[:, None, :]).clamp(min=floor)

        t, ok = _path_search(h, mix, top, h0, h0.abs() / torch.where(slope > 0, slope, 1e-300), 1.0 - 1e-9)
        cand = torch.softmax(mix(t[:, None])[:, 0], dim=1)
        l1 = torch.where(ok, (cand - s).abs().sum(dim=1), torch.inf)
        better = l1 < best_l1
        best, best_l1 = torch.where(better[:, None], cand, best), torch.where(better, l1, best_l1)
    return best, torch.isfinite(best_l1)


def fast_phase1(h: MembershipClassifier, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundary search along two short paths. p (N, C) -> (noised (N, C), success (N,)).

    On the CPU this runs the numpy implementation (`phase1_cpu`, same algorithm, a fraction of
    the per-op overhead); on CUDA the torch one (`fast_phase1_torch`).
    """
    if h.device.type == "cpu":
        from purifier.defenses.phase1_cpu import fast_phase1_cpu  # imports this module's constants

        return fast_phase1_cpu(h.numpy_mlp, p)
    return fast_phase1_torch(h, p)


@torch.no_grad()
def fast_phase1_torch(h: MembershipClassifier, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fast solver in torch (any device). p (N, C) -> (noised (N, C), success (N,))."""
    order, E0, S, top, h0, early = _clean_start(h, p)
    n = len(p)
    best, success = S.clone(), torch.zeros(n, dtype=torch.bool, device=E0.device)
    rows = (~early).nonzero()[:, 0]
    if len(rows) == 0:
        return _finish(best, success, order)
    e0, s, t0, g0 = E0[rows], S[rows], top[rows], h0[rows]
    sign = -torch.sign(g0)[:, None]
    # 1. the ray along the steepest logit direction of |h| (the faithful solver's first step)
    _, gp = h.logit_and_grad(s)
    ge = s * (gp - (gp * s).sum(dim=1, keepdim=True))
    norm = ge.norm(dim=1)
    d = sign * ge / torch.where(norm > 0, norm, 1.0)[:, None]

    def ray(ts):
        # re-sorted, so the released vector keeps the clean vector's ranking (the top included)
        # and h judges exactly what anyone sorting the released vector will see
        return (e0[:, None, :] + ts[..., None] * d[:, None, :]).sort(dim=-1).values

    t, found = _path_search(h, ray, t0, g0, g0.abs() / torch.where(norm > 0, norm, 1e-300), T_MAX)
    noised = torch.softmax(ray(t[:, None])[:, 0], dim=1)
    retry = (~found).nonzero()[:, 0]
    if len(retry):
        noised[retry], found[retry] = _mix_search(h, s[retry], gp[retry], t0[retry], g0[retry])
    # Rows no path carries across are released clean. A faithful fallback for them costs 299
    # steps per row and, on the digits targets, never found a crossing the paths had missed.
    best[rows] = torch.where(found[:, None], noised, s)
    success[rows] = found
    return _finish(best, success, order)
