import numpy as np
import pytest

from purifier.defenses import IdentityDefense
from purifier.probabilities import served_undefended, softmax


def test_softmax_matches_formula_and_is_stable():
    z = np.array([[1000.0, 999.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    out = softmax(z)
    e = np.exp(np.array([0.0, -1.0, -1000.0]))
    np.testing.assert_allclose(out[0], e / e.sum(), rtol=1e-6)  # no overflow at 1000
    np.testing.assert_allclose(out[1], 1 / 3, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_softmax_returns_the_logits_dtype_computed_in_float64(dtype):
    z = np.random.default_rng(0).normal(scale=8.0, size=(50, 7))
    logits = z.astype(dtype)
    exact = np.exp(logits.astype(np.float64) - logits.astype(np.float64).max(1, keepdims=True))
    exact /= exact.sum(1, keepdims=True)
    before = logits.copy()
    out = softmax(logits)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, exact.astype(dtype))  # one rounding, at the end
    np.testing.assert_array_equal(logits, before)  # the input is left alone


def test_softmax_of_integer_logits_is_float64():
    out = softmax(np.array([[0, 1], [2, 2]], np.int64))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [[1 / (1 + np.e), np.e / (1 + np.e)], [0.5, 0.5]])


def test_undefended_rows_are_the_identity_sidecars_answer():
    """An undefended in-process model answers what `purifier serve --defense none` does: the rows
    renormalized once, which moves some float32 entries by one unit in the last place."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 6, (2000, 10))
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)  # float32 rows: sums not exactly 1
    served = served_undefended(p)
    assert served.dtype == np.float32
    np.testing.assert_array_equal(served, IdentityDefense().transform(p))
    assert not np.array_equal(served, p)  # the rows as the model wrote them are not the sidecar's answer
    np.testing.assert_allclose(served, p, rtol=1e-6, atol=0)


def test_rows_that_are_not_probabilities_come_back_unchanged_for_the_callers_check():
    logits = np.array([[2.0, -1.0, 0.5]], np.float32)
    assert served_undefended(logits) is logits
    empty = np.zeros((0, 3), np.float32)
    assert served_undefended(empty) is empty
