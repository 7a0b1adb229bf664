"""PURIFIER's label swapper: a keyed membership index and the top-class / runner-up swap.

Yang et al. (AAAI 2023) close the gap that no label-preserving defense can close (the "gap"
attack: member iff correctly classified, docs/design.md#label-only-floor) by moving some training
members' predicted label to their second most likely class. Swapping a fraction q of the
correctly classified members gives the gap attack a balanced accuracy of
0.5 + (a_m (1 - q) - a_n) / 2, which is 0.5 at q* = 1 - a_n / a_m.

Choices where the paper is silent:

* The index holds only the first 8 bytes of HMAC-SHA256(secret, model, canonical input row)
  (`KeyedPRF.digests`) as a sorted uint64 array: no raw rows, and without the secret the
  entries cannot be tested against candidate records. A non-member collides with probability
  about n_index / 2^64 per query.
* Only the members that will be swapped are indexed: a deterministic keyed subset (uniform
  below q) of the *correctly classified* members, so the realized fraction hits q* and the
  index reveals nothing about the others.
* Canonical row: float32, -0.0 -> +0.0 (adding +0.0), so byte-identical requests in FP32 or
  FP64 that hold the same float32 values match.
* The swapped answer is the purified (smooth) vector with two entries exchanged: never one-hot,
  which would itself reveal membership.
"""

from __future__ import annotations

import numpy as np

from purifier.defenses.keyed import KeyedPRF
from purifier.errors import ArtifactError, DefenseError

INDEX_PURPOSE, SELECT_PURPOSE, CHECK_PURPOSE = "purifier-member-index", "purifier-swap-select", "purifier-key-check"


def canonical_rows(inputs: np.ndarray) -> np.ndarray:
    """(N, D) numbers -> (N, D) float64 holding float32 values, with -0.0 made +0.0."""
    x = np.asarray(inputs)
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise DefenseError(f"input rows must be a numeric (N, D) array, got {x.dtype} {x.shape}")
    return (x.astype(np.float32) + np.float32(0.0)).astype(np.float64)


def row_keys(prf: KeyedPRF, inputs: np.ndarray) -> np.ndarray:
    """(N, D) input rows -> (N,) uint64 truncated keyed digests."""
    return prf.digests(canonical_rows(inputs), INDEX_PURPOSE)[:, :8].copy().view("<u8")[:, 0]


def key_check(prf: KeyedPRF) -> str:
    """A short keyed fingerprint saved with the index: loading with another secret is an error,
    not a swapper that silently matches nobody."""
    return prf.digests(np.zeros((1, 1)), CHECK_PURPOSE)[0, :8].tobytes().hex()


def swap_fraction(member_correct: np.ndarray, reference_correct: np.ndarray) -> float:
    """q* = 1 - a_n / a_m from member and non-member (reference) correctness, clipped to [0, 1]."""
    a_m, a_n = float(np.mean(member_correct)), float(np.mean(reference_correct))
    return 0.0 if a_m <= 0 else float(np.clip(1.0 - a_n / a_m, 0.0, 1.0))


def build_index(prf: KeyedPRF, member_inputs: np.ndarray, member_correct: np.ndarray,
                fraction: float) -> np.ndarray:
    """Sorted unique (K,) uint64 keys of the members to swap: the correctly classified members
    whose keyed uniform falls below `fraction`."""
    rows = canonical_rows(member_inputs)
    chosen = member_correct.astype(bool) & (prf.uniform(rows, SELECT_PURPOSE)[:, 0] < fraction)
    return np.unique(row_keys(prf, rows[chosen]))


def lookup(index: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(N,) bool: which keys are in the sorted index (vectorized binary search)."""
    if len(index) == 0:
        return np.zeros(len(keys), bool)
    pos = np.minimum(np.searchsorted(index, keys), len(index) - 1)
    return index[pos] == keys


def swap_top_two(q: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exchange the largest and second largest entries of q (N, C) on the rows selected by the
    (N,) bool `rows`; a tie at the top is broken by moving a sliver of mass so the runner-up class
    strictly wins. Returns a new array."""
    out = q.copy()
    if not rows.any():
        return out
    sub = out[rows]
    order = np.argsort(-sub, axis=1, kind="stable")
    i = np.arange(len(sub))
    top, second = order[:, 0], order[:, 1]
    a, b = sub[i, top].copy(), sub[i, second].copy()
    tie = a <= b
    # new runner-up mass a -> slightly less on ties, so the new label is unambiguous
    eps = np.where(tie, 1e-3 * a, 0.0)
    sub[i, top], sub[i, second] = b - eps, a + eps
    out[rows] = sub
    return out


def check_index(index: np.ndarray, expected_check: str, prf: KeyedPRF | None) -> None:
    if index.dtype != np.uint64 or index.ndim != 1 or (len(index) > 1 and (np.diff(index) <= 0).any()):
        raise ArtifactError("member index must be a sorted 1-D uint64 array of unique keys")
    if prf is not None and key_check(prf) != expected_check:
        raise ArtifactError("member index was built with another PRF secret; use the secret it was "
                            "fitted with or refit the defense")
