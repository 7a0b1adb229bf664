"""Training classifiers in torch: the target, and (in the audit) the attacker's shadow models.

Seeds are injected: initialisation and shuffling draw from a forked torch RNG seeded here, so the
caller's global RNG state is untouched and the same seed gives the same model on one machine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from purifier.models.architectures import build_model
from purifier.progress import Progress


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run small torch work on `n` intra-op threads, restoring the setting afterwards.

    Every model Purifier trains is small (targets, shadow and attack models, MemGuard's defender
    classifier, PURIFIER's reformer): with two threads on a busy 2-core machine the threads spin
    against each other (measured 19.5 s vs 2.7 s for 400 steps of a 64-64 MLP on 2,400 rows), so
    training runs single-threaded.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class TrainConfig:
    """Defaults train to (near) zero training loss without regularisation: deployed models
    overfit like this, and a target that does not leak demonstrates nothing."""

    arch: str = "mlp"
    epochs: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0


def train_classifier(X: np.ndarray, y: np.ndarray, n_classes: int, config: TrainConfig, seed: int,
                     image_shape: tuple[int, int, int] | None = None, label: str = "training",
                     progress: bool = True) -> nn.Module:
    """Train on X (N, D) float32, y (N,) int64; returns the model in eval mode (CPU)."""
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(seed)
        model = build_model(config.arch, X.shape[1], n_classes, image_shape)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # copies: a read-only input (an executor's shared array) cannot back a torch tensor
        Xt, yt = torch.from_numpy(np.array(X, np.float32)), torch.from_numpy(np.array(y, np.int64))
        gen = torch.Generator().manual_seed(seed + 1)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        with Progress(label, config.epochs, enabled=progress) as bar:
            for _ in range(config.epochs):
                perm = torch.randperm(len(yt), generator=gen)
                total = 0.0
                for start in range(0, len(perm), config.batch_size):
                    idx = perm[start:start + config.batch_size]
                    opt.zero_grad()
                    loss = loss_fn(model(Xt[idx]), yt[idx])
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                bar.update(1, loss=total / len(yt))
    model.eval()
    return model


@torch.no_grad()
def predict_proba(model: nn.Module, X: np.ndarray, batch: int = 4096) -> np.ndarray:
    """(N, D) -> (N, C) float64 softmax probabilities from a torch model."""
    outs = [torch.softmax(model(torch.from_numpy(np.array(X[i:i + batch], np.float32))), 1)
            for i in range(0, len(X), batch)]
    return torch.cat(outs).double().numpy()
