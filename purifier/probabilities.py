"""Logits to probability rows: the one softmax behind `--logits`, in `serve` and `audit` alike.

The dtype rule: the softmax is computed in float64 (shifted by the row maximum, so large logits
do not overflow) and returned in the logits' own floating dtype (FP16, FP32 or FP64 as the model
answered; a non-float array comes back as float64). The sidecar answers in the datatype the model
used, so an in-process audit of the same model with `--logits` sees, row for row and bit for bit,
what a client of the sidecar sees. A model's own softmax (inside its ONNX graph, or torch's in
`purifier.models.training`) is part of that model and stays where it is.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits -> (N, C) probability rows, by the dtype rule above; the input is not changed."""
    logits = np.asarray(logits)
    dtype = logits.dtype if np.issubdtype(logits.dtype, np.floating) else np.dtype(np.float64)
    z = np.array(logits, np.float64)  # a copy, also when the logits are float64
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(dtype, copy=False)
