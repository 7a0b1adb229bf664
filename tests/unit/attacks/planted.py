"""Planted leakage: synthetic confidence vectors and a linear label oracle whose membership
signal is known, so every attack has something real to find."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from purifier.attacks.base import AttackContext
from purifier.attacks.shadow import ShadowSet, balanced_in_masks
from purifier.models.access import TargetAccess


def planted_probs(labels: np.ndarray, member: np.ndarray, rng: np.random.Generator, n_classes: int,
                  difficulty: np.ndarray | None = None) -> np.ndarray:
    """(N, C) softmax rows: members get a larger true-class logit (and are always correct);
    `difficulty` (N,) shifts an example's logit the same way whether member or not (LiRA's case)."""
    n = len(labels)
    logits = rng.normal(0.0, 1.0, size=(n, n_classes))
    boost = np.where(member, 7.0, 3.5) + rng.normal(0.0, 1.0, n)
    if difficulty is not None:
        boost = boost + difficulty
    logits[np.arange(n), labels] += boost
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


@dataclass
class PlantedWorld:
    """Planted shadows and target: `target` answers the candidates, `population(idx)` the
    target's (non-member) answers for pool records idx."""

    shadows: ShadowSet
    cand_y: np.ndarray
    cand_member: np.ndarray
    target: np.ndarray
    pool_difficulty: np.ndarray | None
    n_classes: int
    seed: int

    def population(self, idx: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed + 1)
        diff = None if self.pool_difficulty is None else self.pool_difficulty[idx]
        return planted_probs(self.shadows.pool_y[idx], np.zeros(len(idx), bool), rng, self.n_classes, diff)


def planted_world(n_shadows=4, n_pool=600, n_cand=400, n_classes=10, seed=0, difficulty=False) -> PlantedWorld:
    rng = np.random.default_rng(seed)
    pool_y = rng.integers(0, n_classes, n_pool)
    cand_y = rng.integers(0, n_classes, n_cand)
    pool_in = balanced_in_masks(n_shadows, n_pool, rng)
    cand_in = balanced_in_masks(n_shadows, n_cand, rng)
    diff_pool = rng.normal(0, 3, n_pool) if difficulty else None
    diff_cand = rng.normal(0, 3, n_cand) if difficulty else None
    pool_probs = np.stack([planted_probs(pool_y, pool_in[k], rng, n_classes, diff_pool) for k in range(n_shadows)])
    cand_probs = np.stack([planted_probs(cand_y, cand_in[k], rng, n_classes, diff_cand) for k in range(n_shadows)])
    cand_member = np.arange(n_cand) % 2 == 0
    target = planted_probs(cand_y, cand_member, rng, n_classes, diff_cand)
    sh = ShadowSet([], rng.normal(size=(n_pool, 4)).astype(np.float32), pool_y, pool_probs, pool_in,
                   cand_probs, cand_in)
    return PlantedWorld(sh, cand_y, cand_member, target, diff_pool, n_classes, seed)


def planted_shadows(n_shadows=4, n_pool=600, n_cand=400, n_classes=10, seed=0, difficulty=False):
    """A ShadowSet with planted outputs and the evaluation candidates' true membership.

    Returns (shadows, cand_y, cand_member, target_outputs (n_cand, C)).
    """
    w = planted_world(n_shadows, n_pool, n_cand, n_classes, seed, difficulty)
    return w.shadows, w.cand_y, w.cand_member, w.target


class PlantedTarget(TargetAccess):
    """Answers the world's pool rows (by their row in pool_X) as the target would: non-members."""

    def __init__(self, world: PlantedWorld):
        super().__init__()
        self.world, self.n_classes, self.description = world, world.n_classes, "planted"
        self._row = {row.tobytes(): i for i, row in enumerate(world.shadows.pool_X)}

    def _query(self, X):
        return self.world.population(np.array([self._row[r.tobytes()] for r in X]))


def context(shadows, n_classes=10, defense_name=None, kind="tabular", cand_y=None):
    d = shadows.pool_X.shape[1]
    return AttackContext(shadows, n_classes, kind, None, (np.full(d, -10.0), np.full(d, 10.0)),
                         candidate_labels=cand_y, defense_name=defense_name, seed=0)


class LinearLabeler(torch.nn.Module):
    """Two classes split by the hyperplane w.x = 0: logits (-w.x, w.x) * 5."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.w = torch.nn.Parameter(torch.from_numpy(w.astype(np.float32)), requires_grad=False)

    def forward(self, x):
        s = 5.0 * (x @ self.w)
        return torch.stack([-s, s], dim=1)


def planted_margin_data(n, d, member, rng, w):
    """Rows correctly labelled by sign(w.x); members lie 2-3 units from the boundary, non-members
    0.05-0.4 units. Returns X (n, d) float32, y (n,), true distance (n,)."""
    wn = w / np.linalg.norm(w)
    base = rng.normal(size=(n, d))
    base -= (base @ wn)[:, None] * wn  # on the hyperplane
    dist = np.where(member, rng.uniform(2.0, 3.0, n), rng.uniform(0.05, 0.4, n))
    y = rng.integers(0, 2, n)
    X = base + (np.where(y == 1, 1.0, -1.0) * dist)[:, None] * wn
    return X.astype(np.float32), y.astype(np.int64), dist
