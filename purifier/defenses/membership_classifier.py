"""MemGuard's defender-side membership classifier `h` and its input gradient, batched in torch.

Jia, Salem, Backes, Zhang, Gong, "MemGuard: Defending against Black-Box Membership Inference
Attacks via Adversarial Examples", CCS 2019 (original code `jjy1994/MemGuard`,
`train_defense_model_defensemodel.py`): an MLP 256-128-64-1 (ReLU, sigmoid output) on the
target's probability vector sorted ascending, trained with binary cross-entropy to tell the
target's training members (label 1) from the defender's reference non-members (label 0); SGD,
learning rate 0.001, 400 epochs, batch 64.

Phase I needs `h`'s pre-sigmoid output and its gradient for thousands of rows per step. Autograd
would rebuild a graph at every step; the MLP is four affine maps, so the input gradient is written
out (`logit_and_grad`), which is also what makes the faithful solver cheap enough to batch.
The weights are plain arrays (saved as npz), never a pickled module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HIDDEN = (256, 128, 64)
# BLAS picks different kernels (different rounding) for row counts that are not a multiple of its
# tile, so one row's result would depend on the batch around it. Padding every matmul to a
# multiple of ROW_BLOCK rows keeps a row's output bit-identical whatever the batch
# (checked in tests/unit/defenses/test_memguard.py).
ROW_BLOCK = 16
LAYER_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4")


def resolve_device(device: str) -> torch.device:
    """auto -> cuda if available else cpu; cuda without CUDA -> ConfigError."""
    from purifier.errors import ConfigError

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device; use auto or cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class TrainSettings:
    """How `h` is trained. The defaults are the original's (SGD, lr 0.001, 400 epochs, batch 64)."""

    epochs: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "sgd"  # "sgd" (original) or "adam" (converges in far fewer epochs)


def rowwise_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, K) @ b (K, M) with every row computed the same way whatever N is."""
    n = a.shape[0]
    pad = (-n) % ROW_BLOCK
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
    return (a @ b)[:n]


class MembershipClassifier:
    """The fitted MLP as float64 tensors on one device.

    `weights` maps LAYER_NAMES to arrays: w1 (256, C), b1 (256,), w2 (128, 256), b2 (128,),
    w3 (64, 128), b3 (64,), w4 (1, 64), b4 (1,).
    """

    def __init__(self, weights: dict[str, np.ndarray], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.arrays = {k: np.asarray(weights[k], np.float64) for k in LAYER_NAMES}
        self.t = {k: torch.from_numpy(v).to(self.device) for k, v in self.arrays.items()}
        for i in range(1, 5):  # contiguous transposes: the forward pass multiplies by W.T
            self.t[f"w{i}T"] = self.t[f"w{i}"].T.contiguous()
        self.n_classes = int(self.arrays["w1"].shape[1])
        self.numpy_mlp = NumpyMLP(self.arrays)  # the CPU fast path (phase1_cpu) runs on these

    @classmethod
    def train(cls, member_probs: np.ndarray, reference_probs: np.ndarray, settings: TrainSettings,
              seed: int, device: torch.device | str = "cpu") -> MembershipClassifier:
        """Fit on members (M, C) -> 1 and reference non-members (R, C) -> 0, inputs sorted ascending.

        When M != R each class is weighted by the inverse of its size, so `h` is not just the
        base rate (the original had equal sizes; this keeps its decision boundary meaningful).
        """
        x = np.sort(np.concatenate([member_probs, reference_probs]), axis=1).astype(np.float32)
        y = np.r_[np.ones(len(member_probs)), np.zeros(len(reference_probs))].astype(np.float32)
        w = np.where(y == 1, 0.5 * len(y) / len(member_probs), 0.5 * len(y) / len(reference_probs))
        from purifier.models.training import torch_threads

        with torch.random.fork_rng(devices=[]), torch_threads(1):
            torch.manual_seed(seed)
            dims = (x.shape[1], *HIDDEN, 1)
            layers: list[torch.nn.Module] = []
            for i in range(4):
                layers.append(torch.nn.Linear(dims[i], dims[i + 1]))
                if i < 3:
                    layers.append(torch.nn.ReLU())
            net = torch.nn.Sequential(*layers).to(device)
            if settings.optimizer == "sgd":
                opt = torch.optim.SGD(net.parameters(), lr=settings.lr)
            else:
                opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
            xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            wt = torch.from_numpy(w.astype(np.float32)).to(device)
            gen = torch.Generator().manual_seed(seed + 1)
            for _ in range(settings.epochs):
                perm = torch.randperm(len(yt), generator=gen).to(device)
                for start in range(0, len(perm), settings.batch_size):
                    idx = perm[start:start + settings.batch_size]
                    opt.zero_grad()
                    out = net(xt[idx])[:, 0]
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(out, yt[idx], weight=wt[idx])
                    loss.backward()
                    opt.step()
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        weights = {}
        for i, lin in enumerate(linears, start=1):
            weights[f"w{i}"] = lin.weight.detach().cpu().double().numpy()
            weights[f"b{i}"] = lin.bias.detach().cpu().double().numpy()
        return cls(weights, device)

    def to(self, device: torch.device | str) -> MembershipClassifier:
        return MembershipClassifier(self.arrays, device)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C) float64 sorted probabilities -> (N,) pre-sigmoid output."""
        t = self.t
        a = torch.relu(rowwise_mm(x, t["w1T"]) + t["b1"])
        a = torch.relu(rowwise_mm(a, t["w2T"]) + t["b2"])
        a = torch.relu(rowwise_mm(a, t["w3T"]) + t["b3"])
        return rowwise_mm(a, t["w4T"])[:, 0] + t["b4"]

    def logit_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> (pre-sigmoid output (N,), its gradient with respect to x (N, C)).

        ReLU derivative at 0 is taken as 0, as in TensorFlow and torch.
        """
        t = self.t
        z1 = rowwise_mm(x, t["w1T"]) + t["b1"]
        z2 = rowwise_mm(torch.relu(z1), t["w2T"]) + t["b2"]
        z3 = rowwise_mm(torch.relu(z2), t["w3T"]) + t["b3"]
        out = rowwise_mm(torch.relu(z3), t["w4T"])[:, 0] + t["b4"]
        g3 = (z3 > 0).to(x.dtype) * t["w4"]  # (N, 64)
        g2 = rowwise_mm(g3, t["w3"]) * (z2 > 0).to(x.dtype)
        g1 = rowwise_mm(g2, t["w2"]) * (z1 > 0).to(x.dtype)
        return out, rowwise_mm(g1, t["w1"])

    def predict_member(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities in class order -> (N,) bool, h's membership guess."""
        x = torch.from_numpy(np.sort(np.asarray(probs, np.float64), axis=1)).to(self.device)
        with torch.no_grad():
            return (self.logit(x) > 0).cpu().numpy()


class NumpyMLP:
    """h's 256-128-64-1 MLP as contiguous float64 numpy arrays, for the CPU fast path.

    Same arithmetic as `MembershipClassifier.logit(_and_grad)` (to rounding: numpy's BLAS, not
    torch's). The input is padded once to a multiple of ROW_BLOCK rows and the padding carried
    through the layers; OpenBLAS, like torch's BLAS, rounds a row the same way for every row
    count that is a multiple of 8 (checked for 1 and 2 threads), so 16 keeps rows independent.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.w = [np.ascontiguousarray(arrays[f"w{i}"].T, dtype=np.float64) for i in range(1, 5)]
        self.b = [np.asarray(arrays[f"b{i}"], np.float64) for i in range(1, 5)]
        self.wf = [np.ascontiguousarray(arrays[f"w{i}"], dtype=np.float64) for i in range(1, 4)]
        self.w4 = np.asarray(arrays["w4"], np.float64)[0]

    @staticmethod
    def _pad(x: np.ndarray) -> np.ndarray:
        pad = (-x.shape[0]) % ROW_BLOCK
        if pad:
            x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
        return x

    def logit(self, x: np.ndarray) -> np.ndarray:
        """x (N, C) sorted probabilities -> (N,) pre-sigmoid output."""
        n = x.shape[0]
        a = self._pad(x)
        for w, b in zip(self.w[:3], self.b[:3], strict=True):
            a = a @ w
            a += b
            np.maximum(a, 0.0, out=a)
        # the last layer as a row-wise sum, not a (64, 1) matmul: BLAS routes that to gemv, whose
        # rounding depends on the row count; numpy's row reduction does not
        return (a[:n] * self.w4).sum(axis=1) + self.b[3]

    def logit_and_grad(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (N, C) -> (pre-sigmoid output (N,), its gradient with respect to x (N, C)).

        ReLU derivative at 0 is 0, as in `MembershipClassifier.logit_and_grad`.
        """
        n = x.shape[0]
        z1 = self._pad(x) @ self.w[0] + self.b[0]
        z2 = np.maximum(z1, 0.0) @ self.w[1] + self.b[1]
        z3 = np.maximum(z2, 0.0) @ self.w[2] + self.b[2]
        out = (np.maximum(z3[:n], 0.0) * self.w4).sum(axis=1) + self.b[3]
        g3 = (z3 > 0) * self.w4
        g2 = (g3 @ self.wf[2]) * (z2 > 0)
        g1 = (g2 @ self.wf[1]) * (z1 > 0)
        return out, (g1 @ self.wf[0])[:n]
