"""A real (untrained, seeded) MemGuard defender classifier h for class counts no target has here."""

import numpy as np

from purifier.defenses.membership_classifier import HIDDEN


def random_weights(n_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """256-128-64-1 MLP weights (LAYER_NAMES), N(0, 1/fan_in) matrices and N(0, 0.01) biases."""
    rng = np.random.default_rng(seed)
    dims = (n_classes, *HIDDEN, 1)
    weights = {}
    for i in range(4):
        weights[f"w{i + 1}"] = rng.normal(0, 1 / np.sqrt(dims[i]), (dims[i + 1], dims[i]))
        weights[f"b{i + 1}"] = rng.normal(0, 0.1, dims[i + 1])
    return weights
