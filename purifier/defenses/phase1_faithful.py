"""MemGuard's Phase I as published, batched in torch: the reference the fast solver is held to.

Jia et al., "MemGuard", CCS 2019 (original `defense_framework.py`; docs/design.md#memguard-phase-1). On
the sorted logit vector e, loss `c1|h| + c2*hinge(top) + c3*||softmax(e) - s||_1`, fixed-length
normalized steps of 0.1, at most 299 steps per level, c3 escalating 0.1 -> 1e5 and keeping the
smallest-distortion (largest c3) success, stopping at the first failed level. Rows run in
lock-step with per-row masks. A row succeeds when its top class is still first and h's
pre-sigmoid output has changed sign versus the clean vector, as h sees softmax(e) in the sorted
start order (the original's view). Rows on the boundary (|sigmoid(h0) - 0.5| <= EARLY_EXIT) get
no noise.

Used for fitting reports, `--mode faithful` and tests; it needs torch (the full install), and it
stops early per row, so its running time is not constant: serve `fast` where timing matters.
Arrays: p (N, C) float64 in class order -> (noised (N, C) in class order, success (N,) bool).
"""

from __future__ import annotations

import numpy as np
import torch

from purifier.defenses.membership_classifier import LAYER_NAMES, ROW_BLOCK, MembershipClassifier
from purifier.defenses.phase1 import EARLY_EXIT, MAX_STEPS, STEP, sort_rows, unsort_rows

C1, C2 = 1.0, 10.0
C3_LEVELS = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def _rowwise_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, K) @ b (K, M) with every row computed the same way whatever N is (see ROW_BLOCK)."""
    n = a.shape[0]
    pad = (-n) % ROW_BLOCK
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
    return (a @ b)[:n]


class TorchMLP:
    """h's MLP as float64 tensors on one torch device, with its hand-written input gradient."""

    def __init__(self, h: MembershipClassifier, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        t = {k: torch.from_numpy(h.arrays[k]).to(self.device) for k in LAYER_NAMES}
        self.wT = [t[f"w{i}"].T.contiguous() for i in range(1, 5)]
        self.w = [t[f"w{i}"] for i in range(1, 5)]
        self.b = [t[f"b{i}"] for i in range(1, 5)]

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C) float64 sorted probabilities -> (N,) pre-sigmoid output."""
        a = x
        for i in range(3):
            a = torch.relu(_rowwise_mm(a, self.wT[i]) + self.b[i])
        return _rowwise_mm(a, self.wT[3])[:, 0] + self.b[3]

    def logit_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> (pre-sigmoid output (N,), its gradient with respect to x (N, C)).

        ReLU derivative at 0 is taken as 0, as in TensorFlow and torch.
        """
        z1 = _rowwise_mm(x, self.wT[0]) + self.b[0]
        z2 = _rowwise_mm(torch.relu(z1), self.wT[1]) + self.b[1]
        z3 = _rowwise_mm(torch.relu(z2), self.wT[2]) + self.b[2]
        out = _rowwise_mm(torch.relu(z3), self.wT[3])[:, 0] + self.b[3]
        g3 = (z3 > 0).to(x.dtype) * self.w[3]  # (N, 64)
        g2 = _rowwise_mm(g3, self.w[2]) * (z2 > 0).to(x.dtype)
        g1 = _rowwise_mm(g2, self.w[1]) * (z1 > 0).to(x.dtype)
        return out, _rowwise_mm(g1, self.w[0])


def crossed_and_kept(h: TorchMLP, e: torch.Tensor, top: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """(N, C) logits -> (N,) bool: top class still first and h's sign flipped."""
    return (e.argmax(dim=1) == top) & (h.logit(torch.softmax(e, dim=1)) * h0 <= 0)


def loss_grad(h: TorchMLP, e: torch.Tensor, s: torch.Tensor, top: torch.Tensor, c3: float) -> torch.Tensor:
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


def _faithful_rows(h: TorchMLP, E0, S, top, h0) -> tuple[torch.Tensor, torch.Tensor]:
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
def faithful_phase1(h: MembershipClassifier | TorchMLP, p: np.ndarray,
                    device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The original Phase I, batched. p (N, C) float64 -> (noised (N, C), success (N,))."""
    mlp = h if isinstance(h, TorchMLP) else TorchMLP(h, device)
    order, e0, top = sort_rows(p)
    E0 = torch.from_numpy(e0).to(mlp.device)
    S = torch.softmax(E0, dim=1)  # the anchor of the L1 term: exactly softmax(e0)
    h0 = mlp.logit(S)
    early = (torch.sigmoid(h0) - 0.5).abs() <= EARLY_EXIT
    T = torch.from_numpy(top).to(mlp.device)
    best, success = S.clone(), torch.zeros(len(p), dtype=torch.bool, device=E0.device)
    rows = (~early).nonzero()[:, 0]
    if len(rows):
        best[rows], success[rows] = _faithful_rows(mlp, E0[rows], S[rows], T[rows], h0[rows])
    return unsort_rows(best.cpu().numpy(), order), success.cpu().numpy()
