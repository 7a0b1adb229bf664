"""MemGuard: adversarial noise against the defender's own membership classifier, under an L1 budget.

Jia, Salem, Backes, Zhang, Gong, "MemGuard: Defending against Black-Box Membership Inference
Attacks via Adversarial Examples", CCS 2019; docs/design.md#memguard has the algorithm, the
original hyper-parameters and the pitfalls of other reimplementations.

Per query (all of it batched over rows, with per-row masks for rows that have finished):

* **Phase I** finds a noised vector `s'` whose sorted version crosses the defender classifier
  `h`'s 0.5 boundary with the top class kept. `mode="fast"` (serving) is a boundary search whose
  work is the same for every row, so latency says nothing about h's verdict, run as one
  onnxruntime graph per batch (`phase1.Phase1Solver`); `mode="faithful"` is the original algorithm in torch
  (`phase1_faithful.faithful_phase1`), the reference.
* **Phase II** releases `s'` with probability `min(eps / ||s' - s||_1, 1)`, else the clean `s`,
  so `E||out - s||_1 <= eps`. The coin is a keyed PRF of the clean row and the model identity
  (`KeyedPRF(secret, model_id).uniform(row, "memguard-coin")`): the same query always gets the
  same answer. A re-flipped coin would expose the clean vector to an attacker who repeats a query,
  and the difference between the two answers leaks membership.

Serving needs numpy and onnxruntime only: torch is imported when `h` is trained (`fit`) or the
faithful solver runs, never by loading a fitted defense for fast mode. Loading one for faithful mode without
torch installed is a one-line ConfigError.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from purifier.defenses.base import Defense, FitData, Knob
from purifier.defenses.keyed import KeyedPRF
from purifier.defenses.membership_classifier import LAYER_NAMES, MembershipClassifier, TrainSettings
from purifier.defenses.phase1 import Phase1Solver
from purifier.devices import check_device
from purifier.errors import ArtifactError, ConfigError, DefenseError

if TYPE_CHECKING:
    from purifier.defenses.phase1_faithful import TorchMLP

MODES = ("fast", "faithful")
OPTIMIZERS = ("sgd", "adam")
WEIGHTS_FILE = "membership_classifier.npz"
# Default utility budget, chosen by measurement (benchmarks/bench_privacy_utility.py,
# docs/results.md#privacy_utility_digits): the setting that brings the best attack's threshold-free
# AUC to the label-only floor on digits. Balanced accuracy with shadow-fitted thresholds reaches 0.5
# at far smaller budgets, but only because the noise breaks the attacker's thresholds, not the
# signal. Phase I's distortion is small, so a large budget rarely binds.
DEFAULT_EPSILON = 1.0
# Rows per Phase I call: bounds the solver's working memory (onnxruntime keeps its arena at the
# largest call's size) at 1,000 classes and 100,000-row batches; past ~64 rows a row costs the same.
CHUNK_ELEMENTS, MAX_CHUNK_ROWS = 1 << 21, 256


class MemGuard(Defense):
    """MemGuard with a faithful (original) or fast Phase I and a keyed Phase II coin.

    Args:
        epsilon: expected L1 distortion budget per query (Phase II), >= 0.
        mode: "fast" (default, for serving) or "faithful" (the original Phase I).
        device: "cpu" (default), "cuda" or "auto" (`purifier.devices`) for training `h` and for
            the faithful solver; the fast solver runs on the CPU unless `serve_on` says otherwise.
        epochs, batch_size, lr, optimizer: training of the defender's classifier. The original
            schedule is `optimizer="sgd", epochs=400` (lr 0.001, batch 64); the default is Adam
            for 50 epochs (same lr and batch), 8x fewer steps, because the original schedule
            makes a fit too slow to run on a small, shared machine.
        seed: initialisation and shuffling seed of the classifier.
        secret: the PRF key for the release coin (required before `transform`).
    """

    name = "memguard"
    # epsilon 2 releases Phase I's noise on every row (no L1 distance exceeds 2): the strongest setting
    knob = Knob("epsilon", (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), "larger", float, "eps")

    def __init__(self, *, epsilon: float = DEFAULT_EPSILON, mode: str = "fast", device: str = "cpu",
                 epochs: int = 50, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
                 seed: int = 0, secret: bytes | None = None):
        super().__init__(secret=secret)
        if not isinstance(epsilon, int | float) or not math.isfinite(epsilon) or epsilon < 0:
            raise ConfigError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
        if mode not in MODES:
            raise ConfigError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        check_device(device)
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        for field, value in (("epochs", epochs), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field}: must be a positive integer, got {value!r}")
        if not (isinstance(lr, int | float) and lr > 0):
            raise ConfigError(f"lr: must be a positive number, got {lr!r}")
        self.epsilon = float(epsilon)
        self.mode = mode
        self.device = device
        self.train_settings = TrainSettings(epochs, batch_size, float(lr), optimizer)
        self.seed = int(seed)
        self.classifier: MembershipClassifier | None = None
        self._prf: KeyedPRF | None = None
        self._torch_mlp: TorchMLP | None = None  # the faithful solver's torch copy of h, built on first use
        self._solver: Phase1Solver | None = None  # the fast solver's graphs of h (built on load or first use)
        self._kept_epsilons: tuple[int, float, np.ndarray] | None = None  # `_epsilons`' last array
        self.serve_device = "cpu"  # where the fast solver runs (serve_on)

    # --- fitting ---------------------------------------------------------------------------

    def fit(self, data: FitData) -> MemGuard:
        super().fit(data)
        self.classifier = MembershipClassifier.train(
            data.member_probs, data.reference_probs, self.train_settings, self.seed, self.device)
        self._torch_mlp = None
        return self

    def fit_summary(self, data: FitData) -> tuple[dict, list[str]]:
        """The defender classifier's accuracy on its training data and what the defense does to the
        reference set (Phase I success, distortion, release rate): for defense.json and the CLI."""
        h = self.classifier
        if h is None:
            raise DefenseError("MemGuard is not fitted: call fit() first")
        member_ok = h.predict_member(data.member_probs)
        reference_ok = ~h.predict_member(data.reference_probs)
        train_acc = 0.5 * (member_ok.mean() + reference_ok.mean())
        ref = data.reference_probs
        defended = self.transform(ref)
        noised, success = self.phase1(ref)
        l1 = np.abs(defended - ref).sum(axis=1)
        released = l1 > 1e-9  # clean rows differ only by renormalization rounding
        phase1_l1 = float(np.abs(noised - ref).sum(axis=1).mean())
        report = {
            "defender_accuracy": {"train_balanced": float(train_acc), "train_members": float(member_ok.mean()),
                                  "train_reference": float(reference_ok.mean())},
            "reference_set": {"rows": len(ref), "phase1_success_rate": float(success.mean()),
                              "phase1_mean_l1": phase1_l1, "realized_mean_l1": float(l1.mean()),
                              "noise_release_rate": float(released.mean())},
        }
        lines = [f"mode {self.mode}, epsilon {self.epsilon:g}",
                 f"defender classifier accuracy (train, balanced)  {train_acc:.4f}",
                 f"reference set: Phase I success {success.mean():.4f}, Phase I mean L1 {phase1_l1:.4f}",
                 f"reference set: realized mean L1 {l1.mean():.4f}, noise release rate {released.mean():.4f}"]
        return report, lines

    # --- transform -------------------------------------------------------------------------

    def _coin_prf(self) -> KeyedPRF:
        if self.secret is None:
            raise ConfigError("secret: MemGuard needs the PRF secret for its release coin; set "
                              "PURIFIER_SECRET, PURIFIER_SECRET_FILE or --secret-file")
        if self._prf is None:
            self._prf = KeyedPRF(self.secret, self.model_id)
        return self._prf

    def phase1(self, p: np.ndarray, mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Phase I on validated rows p (N, C) float64 in class order.

        Returns (noised (N, C) float64 in class order, success (N,) bool); rows that failed are
        the clean row. Rows are processed in chunks that bound memory; results do not depend on
        the chunking.
        """
        solver = self._faithful if (mode or self.mode) == "faithful" else self._fast
        if self.classifier is not None and not len(p):
            return np.empty_like(p), np.empty(0, bool)
        return self._chunked(p, solver)

    def _chunked(self, p: np.ndarray, solve, *per_row: np.ndarray) -> tuple:
        """solve(h, rows, *their per_row entries) -> a tuple of arrays, one row per row of p, run
        over chunks of p's rows that bound memory (results do not depend on the chunking). p has rows."""
        h = self.classifier
        if h is None:
            raise DefenseError("MemGuard is not fitted: call fit() or load a fitted defense")
        n, c = p.shape
        chunk = max(1, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // (c * 64)))
        if n <= chunk:  # the serving path: one call, nothing to assemble
            return solve(h, p, *per_row)
        parts = [solve(h, p[a:a + chunk], *(x[a:a + chunk] for x in per_row))
                 for a in range(0, n, chunk)]  # chunks of rows, not rows: bounded memory on huge batches
        return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))

    def _fast(self, h: MembershipClassifier, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._fast_solver(h)(p)

    def _fast_solver(self, h: MembershipClassifier) -> Phase1Solver:
        if self._solver is None or self._solver.h is not h:
            self._solver = Phase1Solver(h, self.serve_device)
        return self._solver

    def _faithful(self, h: MembershipClassifier, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from purifier.defenses.phase1_faithful import TorchMLP, faithful_phase1
        from purifier.devices import torch_device

        if self._torch_mlp is None:
            self._torch_mlp = TorchMLP(h, torch_device(self.device))
        return faithful_phase1(self._torch_mlp, p)

    def release_probability(self, p: np.ndarray, noised: np.ndarray, success: np.ndarray) -> np.ndarray:
        """(N,) probability of releasing the noised row: min(eps / ||r||_1, 1), 0 where Phase I failed."""
        dist = np.abs(noised - p).sum(axis=1)
        safe = np.where(dist > 0, dist, 1.0)
        return np.where(success & (dist > 0), np.minimum(self.epsilon / safe, 1.0), 0.0)

    def _transform(self, p, inputs):
        coin = self._coin_prf().uniform(p, "memguard-coin")[:, 0]
        if self.mode == "fast":  # the coin is tossed in the solver's graph, in the same run

            def solve(h, rows, u):
                return (self._fast_solver(h).released(rows, u, self._epsilons(len(rows))),)

            return self._chunked(p, solve, coin)[0], None
        noised, success = self.phase1(p)
        release = coin < self.release_probability(p, noised, success)
        return np.where(release[:, None], noised, p), None

    def _epsilons(self, n: int) -> np.ndarray:
        """epsilon for each of n rows, (n,) float64, read-only: the solver graph's input (per row:
        `Phase1Solver.released`). The last one is kept, so one-row requests (the hot path) reuse it
        instead of filling a new array per call (about 6 us of CPU each in the serving process)."""
        kept, epsilon = self._kept_epsilons, float(self.epsilon)
        if kept is None or kept[0] != n or kept[1] != epsilon:
            array = np.full(n, epsilon)
            array.flags.writeable = False
            kept = self._kept_epsilons = (n, epsilon, array)
        return kept[2]

    # --- persistence -----------------------------------------------------------------------

    def config(self) -> dict:
        s = self.train_settings
        return {"epsilon": self.epsilon, "mode": self.mode, "device": self.device, "epochs": s.epochs,
                "batch_size": s.batch_size, "lr": s.lr, "optimizer": s.optimizer, "seed": self.seed}

    def _save_arrays(self, directory: Path) -> list[str]:
        if self.classifier is None:
            raise DefenseError("MemGuard is not fitted: nothing to save")
        np.savez(directory / WEIGHTS_FILE, allow_pickle=False, **self.classifier.arrays)
        return [WEIGHTS_FILE]

    def _load_arrays(self, directory: Path) -> None:
        path = directory / WEIGHTS_FILE
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in LAYER_NAMES if k not in z.files]
            if missing:
                raise ArtifactError(f"{path}: missing array(s) {', '.join(missing)}")
            weights = {k: z[k] for k in LAYER_NAMES}
        if weights["w1"].shape[1] != self.n_classes:
            raise ArtifactError(f"{path}: classifier takes {weights['w1'].shape[1]} classes, "
                                f"defense.json says {self.n_classes}")
        if self.mode == "faithful":
            _require_torch()
        self.classifier = MembershipClassifier(weights)
        self._torch_mlp = None
        # a loaded defense is about to serve: build the solver's sessions now, not on the first request
        self._solver = Phase1Solver(self.classifier, self.serve_device) if self.mode == "fast" else None

    def serve_on(self, device: str) -> None:
        """The fast solver's graph on `device` (onnxruntime's CUDA provider for cuda); the faithful
        solver and training keep `device`."""
        check_device(device)
        if device != self.serve_device:
            self.serve_device = device
            if self.classifier is not None and self.mode == "fast":
                self._solver = Phase1Solver(self.classifier, device)


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError("mode: this MemGuard defense was fitted with --mode faithful, which needs torch "
                          "(pip install 'purifier[full]'); refit it with --mode fast to serve without torch") from None


__all__ = ["DEFAULT_EPSILON", "MODES", "MemGuard"]
