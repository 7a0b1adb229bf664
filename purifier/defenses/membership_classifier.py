"""MemGuard's defender-side membership classifier `h`: its weights, training, and its verdict.

Jia, Salem, Backes, Zhang, Gong, "MemGuard: Defending against Black-Box Membership Inference
Attacks via Adversarial Examples", CCS 2019 (original code `jjy1994/MemGuard`,
`train_defense_model_defensemodel.py`): an MLP 256-128-64-1 (ReLU, sigmoid output) on the
target's probability vector sorted ascending, trained with binary cross-entropy to tell the
target's training members (label 1) from the defender's reference non-members (label 0); SGD,
learning rate 0.001, 400 epochs, batch 64.

The weights are plain float64 arrays (saved as npz), never a pickled module: Phase I builds its
ONNX graph from them (`purifier.defenses.phase1`), the faithful solver a torch copy, and
`predict_member` (fit reports) runs them in numpy. This module imports torch only inside `train`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HIDDEN = (256, 128, 64)
# BLAS picks different kernels (different rounding) for row counts that are not a multiple of its
# tile, so one row's result would depend on the batch around it. Every matmul runs on a multiple
# of ROW_BLOCK rows (padding the last block): OpenBLAS rounds a row the same way for every row
# count that is a multiple of 8 (checked for 1 and 2 threads), so 16 keeps rows independent of the
# batch (tests/unit/defenses/test_memguard_fast.py). Blocks of at most BLOCK_ROWS rows keep the
# hidden activations (BLOCK_ROWS x 256 float64 = 2 MB) in cache on large inputs.
ROW_BLOCK = 16
BLOCK_ROWS = 1024
LAYER_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4")


@dataclass(frozen=True)
class TrainSettings:
    """How `h` is trained. The defaults are the original's (SGD, lr 0.001, 400 epochs, batch 64)."""

    epochs: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "sgd"  # "sgd" (original) or "adam" (converges in far fewer epochs)


class MembershipClassifier:
    """The fitted MLP as contiguous float64 numpy arrays.

    `weights` maps LAYER_NAMES to arrays: w1 (256, C), b1 (256,), w2 (128, 256), b2 (128,),
    w3 (64, 128), b3 (64,), w4 (1, 64), b4 (1,).
    """

    def __init__(self, weights: dict[str, np.ndarray]):
        self.arrays = {k: np.asarray(weights[k], np.float64) for k in LAYER_NAMES}
        a = self.arrays
        self.n_classes = int(a["w1"].shape[1])
        self._wt = [np.ascontiguousarray(a[f"w{i}"].T) for i in range(1, 4)]  # x @ W.T
        self._b = [a[f"b{i}"] for i in range(1, 4)]
        self._w4, self._b4 = a["w4"][0].copy(), float(a["b4"][0])

    @classmethod
    def train(cls, member_probs: np.ndarray, reference_probs: np.ndarray, settings: TrainSettings,
              seed: int, device: str = "cpu") -> MembershipClassifier:
        """Fit on members (M, C) -> 1 and reference non-members (R, C) -> 0, inputs sorted ascending.

        When M != R each class is weighted by the inverse of its size, so `h` is not just the
        base rate (the original had equal sizes; this keeps its decision boundary meaningful).
        Needs torch (the full install).
        """
        import torch

        from purifier.devices import torch_device
        from purifier.models.training import seeded, train_epochs

        dev = torch_device(device)
        x = np.sort(np.concatenate([member_probs, reference_probs]), axis=1).astype(np.float32)
        y = np.r_[np.ones(len(member_probs)), np.zeros(len(reference_probs))].astype(np.float32)
        w = np.where(y == 1, 0.5 * len(y) / len(member_probs), 0.5 * len(y) / len(reference_probs))
        with seeded(seed) as gen:
            dims = (x.shape[1], *HIDDEN, 1)
            layers: list[torch.nn.Module] = []
            for i in range(4):
                layers.append(torch.nn.Linear(dims[i], dims[i + 1]))
                if i < 3:
                    layers.append(torch.nn.ReLU())
            net = torch.nn.Sequential(*layers).to(dev)
            optimizer = torch.optim.SGD if settings.optimizer == "sgd" else torch.optim.Adam
            opt = optimizer(net.parameters(), lr=settings.lr)
            xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
            wt = torch.from_numpy(w.astype(np.float32)).to(dev)

            def step(idx):
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx])[:, 0], yt[idx],
                                                                            weight=wt[idx])
                loss.backward()
                opt.step()
                return {}

            train_epochs(step, len(yt), epochs=settings.epochs, batch_size=settings.batch_size, generator=gen,
                         device=dev)
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        weights = {}
        for i, lin in enumerate(linears, start=1):
            weights[f"w{i}"] = lin.weight.detach().cpu().double().numpy()
            weights[f"b{i}"] = lin.bias.detach().cpu().double().numpy()
        return cls(weights)

    def _blocks(self, x: np.ndarray):
        for start in range(0, x.shape[0], BLOCK_ROWS):
            block = x[start:start + BLOCK_ROWS]
            pad = (-block.shape[0]) % ROW_BLOCK
            if pad:
                block = np.concatenate([block, np.zeros((pad, block.shape[1]), block.dtype)])
            yield start, block

    def logit(self, x: np.ndarray) -> np.ndarray:
        """x (N, C) float64 sorted probabilities -> (N,) pre-sigmoid output."""
        n = x.shape[0]
        out = np.empty(n)
        for start, a in self._blocks(x):
            for w, b in zip(self._wt, self._b, strict=True):
                a = a @ w
                a += b
                np.maximum(a, 0.0, out=a)
            # the last layer as a row-wise sum, not a (64, 1) matmul: BLAS routes that to gemv,
            # whose rounding depends on the row count; numpy's row reduction does not
            stop = min(n, start + BLOCK_ROWS)
            out[start:stop] = (a[:stop - start] * self._w4).sum(axis=1) + self._b4
        return out

    def predict_member(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities in class order -> (N,) bool, h's membership guess."""
        return self.logit(np.sort(np.asarray(probs, np.float64), axis=1)) > 0
