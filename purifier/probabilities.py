"""Probability rows: the one softmax behind `--logits`, and the one check and renormalization of
probability rows, in `serve`, the defenses and `audit` alike.

The dtype rule: the softmax is computed in float64 (shifted by the row maximum, so large logits
do not overflow) and returned in the logits' own floating dtype (FP16, FP32 or FP64 as the model
answered; a non-float array comes back as float64). The sidecar answers in the datatype the model
used, so an in-process audit of the same model with `--logits` sees, row for row and bit for bit,
what a client of the sidecar sees. A model's own softmax (inside its ONNX graph, or torch's in
`purifier.models.training`) is part of that model and stays where it is.
"""

from __future__ import annotations

import functools

import numpy as np

from purifier.errors import InvalidProbabilities


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits -> (N, C) probability rows, by the dtype rule above; the input is not changed."""
    logits = np.asarray(logits)
    dtype = logits.dtype if np.issubdtype(logits.dtype, np.floating) else np.dtype(np.float64)
    z = np.array(logits, np.float64)  # a copy, also when the logits are float64
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(dtype, copy=False)


@functools.cache
def sum_tolerance(dtype: np.dtype, n_classes: int) -> float:
    """How far a row of this dtype may be from summing to 1 and still count as a probability."""
    return max(1e-4, 4 * n_classes * float(np.finfo(dtype).eps))


def check_probabilities(probs: np.ndarray, n_classes: int | None = None) -> None:
    """Raise `InvalidProbabilities` unless `probs` is an (N, C) float array of probability rows."""
    checked_rows(probs, n_classes)


def checked_rows(probs: np.ndarray, n_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`check_probabilities`, returning what it computed: (probs as float64 (N, C), row sums (N, 1)).

    A valid batch costs four numpy calls (the hot path answers one-row requests); only a batch
    that fails looks for the first bad row to name it.
    """
    if not isinstance(probs, np.ndarray) or probs.dtype not in (np.float16, np.float32, np.float64):
        got = getattr(probs, "dtype", type(probs).__name__)
        raise InvalidProbabilities(f"confidence vectors must be float16/32/64 arrays, got {got}")
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise InvalidProbabilities(f"confidence vectors must have shape (N, C>=2), got {probs.shape}")
    if n_classes is not None and probs.shape[1] != n_classes:
        raise InvalidProbabilities(
            f"confidence vectors have {probs.shape[1]} classes, the defense was fitted for {n_classes}"
        )
    p = probs.astype(np.float64)
    sums = np.add.reduce(p, axis=1, keepdims=True)
    if not len(p):
        return p, sums
    tol = sum_tolerance(probs.dtype, probs.shape[1])
    # NaN fails both comparisons, +Inf the sum's, -Inf the minimum's: a batch passing them is finite
    if least(p) >= 0 and 1.0 - tol <= least(sums) and greatest(sums) <= 1.0 + tol:
        return p, sums
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise InvalidProbabilities(f"row {int(np.argmax(bad))} contains NaN or Inf")
    bad = (probs < 0).any(axis=1)
    if bad.any():
        raise InvalidProbabilities(f"row {int(np.argmax(bad))} has negative entries")
    bad = (sums[:, 0] < 1.0 - tol) | (sums[:, 0] > 1.0 + tol)
    i = int(np.argmax(bad))
    raise InvalidProbabilities(f"row {i} sums to {sums[i, 0]:.6g}, not 1 (tolerance {tol:.1g})")


def least(a: np.ndarray):
    """The smallest element of a non-empty array, NaN when it holds one.

    A ufunc reduction, not argmin: in a loop argmin costs a fifth, but in the serving process,
    where every call runs on cold caches, argmin took 11 us per call and this 4.4 us, since it
    runs the reduction machinery that the row sums just ran (one-row requests, digits target)."""
    return np.minimum.reduce(a, axis=None)


def greatest(a: np.ndarray):
    """The largest element of a non-empty array, NaN when it holds one (see `least`)."""
    return np.maximum.reduce(a, axis=None)


def renormalized(p: np.ndarray, sums: np.ndarray, dtype) -> np.ndarray:
    """Checked rows `p` (N, C) float64 and their sums (`checked_rows`) -> the rows divided by their
    sums once, -0.0 as +0.0, cast to `dtype`: the undefended sidecar's answer (`IdentityDefense`).
    Works in place on `p`, which `checked_rows` made a copy."""
    p /= sums
    np.maximum(p, 0.0, out=p)
    return p.astype(dtype)


def served_undefended(probs: np.ndarray) -> np.ndarray:
    """What `purifier serve --defense none` answers for these rows (`renormalized`: a float32 entry
    can move by one unit in the last place), so an undefended in-process audit sees what a client of
    the undefended sidecar sees. Rows that are not probability vectors come back as they are, for the
    caller's check to name the problem and its fix (`purifier.models.access.not_probabilities`)."""
    try:
        p, sums = checked_rows(probs, None)
    except InvalidProbabilities:
        return probs
    return renormalized(p, sums, probs.dtype) if len(p) else probs
