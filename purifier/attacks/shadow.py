"""Shadow models: the attacker's own copies of the target, trained on the attacker's pool.

Shokri et al. 2017 ("Membership Inference Attacks against Machine Learning Models") train
shadow models on data from the target's distribution whose membership the attacker knows, and
learn what member outputs look like from them. LiRA (Carlini et al. 2022, "Membership Inference
Attacks From First Principles") additionally includes each audited candidate in half of the
shadow models (IN) and leaves it out of the other half (OUT); the assignment is random and
independent of the candidate's true membership, which the attacker does not know.

Each example of (attacker pool + candidates) is drawn IN for floor(K/2) or ceil(K/2) of the K
shadow models; with `train_size` each model then keeps a random subset of that size of its IN
half (the target's training-set size), the rest counting as OUT. The target's recipe
(architecture and epochs, `purifier.models.target.RECIPES`) is used by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from purifier.errors import ConfigError
from purifier.progress import Progress


@dataclass
class ShadowSet:
    """Shadow models and their outputs.

    Shapes: pool_X (P, D) float32, pool_y (P,) int64, pool_probs (K, P, C) float64,
    pool_in (K, P) bool; cand_probs (K, N, C), cand_in (K, N) bool for the N candidates.
    """

    models: list
    pool_X: np.ndarray
    pool_y: np.ndarray
    pool_probs: np.ndarray
    pool_in: np.ndarray
    cand_probs: np.ndarray
    cand_in: np.ndarray

    @property
    def n_shadows(self) -> int:
        return int(self.pool_probs.shape[0])

    def stacked(self, probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All shadows' pool outputs as one reference set with known membership.

        probs: optional (K, P, C) replacement outputs (e.g. defended by the attacker's copy).
        Returns (probs (K*P, C), labels (K*P,), membership (K*P,) bool).
        """
        probs = self.pool_probs if probs is None else probs
        k = probs.shape[0]
        return probs.reshape(-1, probs.shape[-1]), np.tile(self.pool_y, k), self.pool_in.reshape(-1)

    def labels_fn(self, k: int):
        """A label oracle for shadow model k: X (N, D) -> (N,) predicted labels."""
        from purifier.models.training import predict_proba

        model = self.models[k]
        return lambda X: predict_proba(model, X).argmax(axis=1)


def balanced_in_masks(n_shadows: int, n_examples: int, rng: np.random.Generator) -> np.ndarray:
    """(K, n) bool: each example IN for floor/ceil(K/2) shadows, chosen at random."""
    if n_shadows == 1:
        return rng.random((1, n_examples)) < 0.5
    order = np.argsort(rng.random((n_shadows, n_examples)), axis=0)
    ranks = np.argsort(order, axis=0)
    parity = rng.integers(0, 2, n_examples)  # odd K: which examples get the extra IN
    return ranks < (n_shadows // 2 + (n_shadows % 2) * parity)


def train_shadows(pool_X: np.ndarray, pool_y: np.ndarray, cand_X: np.ndarray, cand_y: np.ndarray,
                  n_classes: int, arch: str, epochs: int, n_shadows: int = 4, seed: int = 0,
                  image_shape: tuple[int, int, int] | None = None, progress: bool = True,
                  train_size: int | None = None) -> ShadowSet:
    """Train `n_shadows` models, model k on its IN half of pool + candidates.

    Args:
        pool_X, pool_y: (P, D), (P,) the attacker's pool.
        cand_X, cand_y: (N, D), (N,) the audited records (inputs and labels the attacker has).
        train_size: if given, each shadow trains on a random subset of this size of its IN half
            (the rest count as OUT), so shadows overfit like a target trained on that many
            records (Shokri et al. mimic the target's training set size); also cheaper.
    """
    from purifier.models.training import TrainConfig, predict_proba, torch_threads, train_classifier

    if n_shadows < 1:
        raise ConfigError(f"shadows: need at least 1 shadow model, got {n_shadows}")
    rng = np.random.default_rng(seed)
    n_pool = len(pool_y)
    masks = balanced_in_masks(n_shadows, n_pool + len(cand_y), rng)
    if train_size is not None:
        for k in range(n_shadows):  # per model, not per row
            chosen = np.nonzero(masks[k])[0]
            if len(chosen) > train_size:
                masks[k, rng.permutation(chosen)[train_size:]] = False
    X_all = np.concatenate([pool_X, cand_X]).astype(np.float32)
    y_all = np.concatenate([pool_y, cand_y]).astype(np.int64)
    config = TrainConfig(arch=arch, epochs=epochs)
    models, probs = [], []
    with torch_threads(1), Progress("shadow models", n_shadows, enabled=progress) as bar:
        for k in range(n_shadows):  # a handful of models: the loop is over models, not rows
            m = masks[k]
            model = train_classifier(X_all[m], y_all[m], n_classes, config, seed=seed * 1000 + 17 * k + 1,
                                     image_shape=image_shape, label=f"shadow {k + 1}/{n_shadows}",
                                     progress=False)
            models.append(model)
            probs.append(predict_proba(model, X_all))
            bar.update(1, train_acc=float((probs[-1][m].argmax(1) == y_all[m]).mean()))
    probs = np.stack(probs)
    return ShadowSet(models, pool_X.astype(np.float32), pool_y.astype(np.int64), probs[:, :n_pool],
                     masks[:, :n_pool], probs[:, n_pool:], masks[:, n_pool:])
