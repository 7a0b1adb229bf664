import numpy as np
import pytest

from purifier.defenses import Defense


class Flatten(Defense):
    """Deterministic, label-keeping, non-identity: p ** (1/T), renormalized (T > 1 flattens)."""

    name = "test-flatten"

    def __init__(self, *, temperature: float = 3.0, secret=None):
        super().__init__(secret=secret)
        self.temperature = temperature
        self.calls: list[int] = []

    def _transform(self, p, inputs):
        self.calls.append(len(p))
        q = p ** (1.0 / self.temperature)
        return q / q.sum(axis=1, keepdims=True), None


@pytest.fixture
def flatten():
    return Flatten()


@pytest.fixture
def probs():
    return np.random.default_rng(0).dirichlet(np.ones(10) * 0.3, size=64).astype(np.float32)
