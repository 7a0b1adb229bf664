"""Training in torch: the one seeded minibatch loop, and the target / shadow classifiers.

Every model Purifier trains (targets, shadow models, MemGuard's defender classifier, PURIFIER's
reformer, the NN attack's model) goes through `seeded` and `train_epochs`: initialisation draws
from a forked torch RNG seeded by the caller and shuffling from a generator seeded next to it, so
the caller's global RNG state is untouched and the same seed gives the same model on one machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from purifier.models.architectures import build_model
from purifier.progress import Progress
from purifier.threads import single_threaded


@contextlib.contextmanager
def seeded(seed: int):
    """A forked, seeded torch RNG on one thread for the duration: initialise the model inside.

    Yields the torch.Generator (seeded `seed + 1`) that `train_epochs` shuffles with and that any
    other draw of the training (e.g. reparameterisation noise) should use. The caller's global RNG
    state is untouched; the same seed gives the same model on one machine.
    """
    with torch.random.fork_rng(devices=[]), single_threaded():
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed + 1)


def train_epochs(step: Callable[[torch.Tensor], dict[str, float]], n_rows: int, *, epochs: int, batch_size: int,
                 generator: torch.Generator, device: torch.device | str = "cpu", label: str = "training",
                 progress: bool = False) -> None:
    """The one minibatch loop: per epoch a permutation of the n_rows row indices from `generator`,
    cut into batches of `batch_size`; `step(idx)` (idx (B,) int64 on `device`) takes one optimiser
    step and returns per-batch metrics, shown as their epoch means when `progress` is on. With
    batch_size >= n_rows every step sees all rows in order (full-batch training, no shuffling)."""
    full = torch.arange(n_rows).to(device) if batch_size >= n_rows else None
    with Progress(label, epochs, enabled=progress) as bar:
        for _ in range(epochs):
            perm = full if full is not None else torch.randperm(n_rows, generator=generator).to(device)
            totals: dict[str, float] = {}
            for start in range(0, n_rows, batch_size):
                idx = perm[start:start + batch_size]
                for name, value in step(idx).items():
                    totals[name] = totals.get(name, 0.0) + value * len(idx)
            bar.update(1, **{name: total / n_rows for name, total in totals.items()})


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
    with seeded(seed) as gen:
        model = build_model(config.arch, X.shape[1], n_classes, image_shape)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # copies: a read-only input (an executor's shared array) cannot back a torch tensor
        Xt, yt = torch.from_numpy(np.array(X, np.float32)), torch.from_numpy(np.array(y, np.int64))
        loss_fn = nn.CrossEntropyLoss()
        model.train()

        def step(idx):
            opt.zero_grad()
            loss = loss_fn(model(Xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            return {"loss": float(loss.detach())}

        train_epochs(step, len(yt), epochs=config.epochs, batch_size=config.batch_size, generator=gen,
                     label=label, progress=progress)
    model.eval()
    return model


@torch.no_grad()
def predict_labels(model: nn.Module, X: np.ndarray, batch: int = 4096) -> np.ndarray:
    """(N, D) -> (N,) int64 argmax of a torch classifier's logits (first index on ties), on one
    thread like the rest of the attack phase (docs/design.md#threads)."""
    out = np.empty(len(X), np.int64)
    with single_threaded():
        for i in range(0, len(X), batch):
            out[i:i + batch] = model(torch.from_numpy(np.array(X[i:i + batch], np.float32))).argmax(1).numpy()
    return out


@torch.no_grad()
def predict_proba(model: nn.Module, X: np.ndarray, batch: int = 4096) -> np.ndarray:
    """(N, D) -> (N, C) float64 softmax probabilities from a torch model."""
    outs = [torch.softmax(model(torch.from_numpy(np.array(X[i:i + batch], np.float32))), 1)
            for i in range(0, len(X), batch)]
    return torch.cat(outs).double().numpy()
