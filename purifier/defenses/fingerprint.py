"""Model identity without hand-copied hashes: a few probe inputs and the model's answers to them.

A defense is fitted for one model: its thresholds, classifier or reformer learned what that
model's confidence vectors look like on members and non-members. Behind a remote model server the
sidecar cannot hash the model file, so a fitted defense stores a *fingerprint*: a handful of
probe inputs (rows of the defender's reference set, never members) and the model's confidence
vectors on them. Whoever serves the defense asks the model the same questions and compares the
answers; a different model with the same class count answers differently and is refused.

The sidecar asks these questions again at random times while it serves, a few rows at a time,
in requests that look like any client's. The rows are split in two (`check_rows`, `probe_rows`):
the check after every (re)connection, which an upstream can recognise (it follows a ModelMetadata
call), asks only the first few; the probes while serving draw from the others, which no check
ever hands over, so an upstream that remembers what the check asked learns nothing about the
probes. Probes take each probe row once before any row comes back, so an upstream that remembers
inputs and answers the ones it sees again with the fitted model is still caught by each row's
first use: the more rows are stored, the longer that lasts. Defenses fit 256 rows (8 for the
check, 248 for probes); those fitted before kept 64 (8 and 56) or 8 (4 and 4) and still load,
with a probe pool that is used up (every row seen once) 4 or 60 times sooner.

Arrays: inputs (K, D) float32; probs (K, C) float64 probability rows (after a softmax when the
model answers logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from purifier.errors import ArtifactError

FILE = "fingerprint.npz"
DEFAULT_ROWS = 256
CHECK_ROWS = 8  # rows the (re)connect check asks; at most half of a fingerprint's
# Largest absolute difference between stored and fresh probabilities that still counts as the same
# model: FP32 versus FP64 serving of one model differs by ~1e-7; another model with the same
# classes (even the same recipe retrained with another seed) differs by far more than 1e-3.
# FP16 serving can need 1e-2.
DEFAULT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Fingerprint:
    inputs: np.ndarray
    probs: np.ndarray
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self):
        if self.inputs.ndim != 2 or self.probs.ndim != 2 or len(self.inputs) != len(self.probs) or not len(self.inputs):
            raise ArtifactError(f"fingerprint: inputs {self.inputs.shape} and probs {self.probs.shape} "
                                "must be (K, D) and (K, C) with the same K >= 1")

    @classmethod
    def from_rows(cls, inputs: np.ndarray, probs: np.ndarray, rows: int = DEFAULT_ROWS,
                  tolerance: float = DEFAULT_TOLERANCE) -> Fingerprint:
        """Pick `rows` evenly spaced rows of (R, D) inputs and their (R, C) model outputs."""
        idx = np.unique(np.linspace(0, len(inputs) - 1, min(rows, len(inputs))).round().astype(np.int64))
        return cls(np.ascontiguousarray(inputs[idx], np.float32), np.asarray(probs[idx], np.float64), tolerance)

    def check_rows(self, batch: int | None = None) -> np.ndarray:
        """(k,) indices of the rows the model check after a (re)connection asks: the first
        CHECK_ROWS (at most half of them), or `batch` rows for a model with a fixed batch size."""
        k = max(min(CHECK_ROWS, len(self.inputs) // 2), 1)
        return np.arange(min(max(k, batch or 0), len(self.inputs)))

    def probe_rows(self, batch: int | None = None) -> np.ndarray:
        """(m,) indices the identity probes draw from: every row the check does not ask, unless
        they are fewer than a fixed `batch` (then all rows, the check's too)."""
        rest = np.arange(len(self.check_rows(batch)), len(self.inputs))
        return rest if len(rest) >= (batch or 1) else np.arange(len(self.inputs))

    @property
    def n_features(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1])

    def mismatch(self, probs: np.ndarray, rows: np.ndarray | None = None) -> str | None:
        """None if `probs`, the model's answers to `inputs[rows]` (all rows when None), match the
        stored answers; else why not, in words. probs: (len(rows), C); rows: (k,) int indices."""
        probs = np.asarray(probs, np.float64)
        expected = self.probs if rows is None else self.probs[rows]
        if probs.shape != expected.shape:
            return f"the model answered shape {list(probs.shape)} to the probe inputs, expected {list(expected.shape)}"
        if not np.isfinite(probs).all():
            return "the model answered NaN or Inf to the probe inputs"
        diff = float(np.abs(probs - expected).max())
        if diff > self.tolerance:
            return (f"the model's answers to the {len(probs)} probe inputs differ from the fitted model's by up to "
                    f"{diff:.3g} (tolerance {self.tolerance:g})")
        return None

    def save(self, directory: Path) -> tuple[list[str], dict]:
        """Write FILE into `directory`; returns (files written, the manifest entry)."""
        np.savez(directory / FILE, inputs=self.inputs, probs=self.probs)
        return [FILE], {"file": FILE, "rows": int(len(self.inputs)), "tolerance": self.tolerance}

    @classmethod
    def load(cls, directory: Path, entry: dict) -> Fingerprint:
        """Read the file named by a manifest entry (already hash-checked by the caller)."""
        path = Path(directory) / entry.get("file", FILE)
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["inputs"].astype(np.float32), z["probs"].astype(np.float64),
                           float(entry.get("tolerance", DEFAULT_TOLERANCE)))
        except (OSError, KeyError, ValueError) as e:
            raise ArtifactError(f"{path}: cannot read the model fingerprint ({e})") from None
