"""MemGuard's numpy fast Phase I (`phase1_cpu`) against the torch solver it replaces on the CPU:
same crossings and the same vectors to rounding, rows independent of the batch in every pass
layout (one block, speculative two-pass narrowing, lazy probe columns), and the numpy MLP against
the torch one."""

import numpy as np
import pytest
import torch

from purifier.defenses.membership_classifier import HIDDEN, MembershipClassifier
from purifier.defenses.phase1 import fast_phase1, fast_phase1_torch
from purifier.defenses.phase1_cpu import LAZY_BELOW, fast_phase1_cpu


def classifier(n_classes, seed):
    """A real (untrained, seeded) 256-128-64-1 classifier, its output bias set so that its 0.5
    boundary cuts the rows of `rows(..., n_classes, seed)` in half (else nothing can cross)."""
    rng = np.random.default_rng(seed)
    dims = (n_classes, *HIDDEN, 1)
    weights = {}
    for i in range(4):
        weights[f"w{i + 1}"] = rng.normal(0, 1 / np.sqrt(dims[i]), (dims[i + 1], dims[i]))
        weights[f"b{i + 1}"] = rng.normal(0, 0.1, dims[i + 1])
    out = MembershipClassifier(weights).numpy_mlp.logit(np.sort(rows(12, n_classes, seed), axis=1))
    weights["b4"] = weights["b4"] - np.median(out)
    return MembershipClassifier(weights)


def rows(n, c, seed):
    """Dirichlet rows from flat to saturated, plus a tied top, a uniform row and a one-hot row
    (the rows the ray cannot carry across go to the mixture search)."""
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.dirichlet(np.full(c, a), size=n) for a in (0.05, 0.3, 3.0)])
    tied = np.full(c, 0.1 / max(c - 2, 1))
    tied[:2] = 0.45 if c > 2 else 0.5
    onehot = np.zeros(c)
    onehot[c // 2] = 1.0
    extra = np.stack([tied, np.full(c, 1.0 / c), onehot])
    return np.concatenate([p, extra / extra.sum(1, keepdims=True)])


@pytest.mark.parametrize("c,seed", [(2, 0), (10, 1), (10, 2), (100, 3)])
def test_numpy_solver_equals_torch_solver(c, seed):
    h = classifier(c, seed)
    p = rows(12, c, seed)
    with torch.random.fork_rng(devices=[]):
        ref, ref_ok = fast_phase1_torch(h, p)
    out, ok = fast_phase1_cpu(h.numpy_mlp, p)
    assert ok.sum() > 0.5 * len(p)  # the comparison is not vacuous
    np.testing.assert_array_equal(ok, ref_ok)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    assert np.array_equal(out.argmax(1), p.argmax(1))
    np.testing.assert_array_equal(fast_phase1(h, p)[0], out)  # the CPU dispatch takes this path


@pytest.mark.parametrize("c", [3, 10])
def test_row_result_independent_of_batch_and_pass_layout(c):
    h = classifier(c, 5)
    p = rows(25, c, 5)  # 78 rows: lazy probe columns; one row: one block and speculative passes
    assert len(p) * 3 > LAZY_BELOW
    full, ok = fast_phase1_cpu(h.numpy_mlp, p)
    assert ok.any() and not np.array_equal(full, p)
    for i in (0, 7, 30, len(p) - 2, len(p) - 1):
        one, one_ok = fast_phase1_cpu(h.numpy_mlp, p[i:i + 1])
        np.testing.assert_array_equal(one[0], full[i])
        assert one_ok[0] == ok[i]
    perm = np.random.default_rng(0).permutation(len(p))
    np.testing.assert_array_equal(fast_phase1_cpu(h.numpy_mlp, p[perm])[0], full[perm])
    np.testing.assert_array_equal(fast_phase1_cpu(h.numpy_mlp, p[:5])[0], full[:5])


def test_numpy_mlp_matches_torch_mlp():
    h = classifier(10, 7)
    x = np.sort(rows(10, 10, 7), axis=1)
    out, grad = h.numpy_mlp.logit_and_grad(x)
    ref_out, ref_grad = h.logit_and_grad(torch.from_numpy(x))
    np.testing.assert_allclose(out, ref_out.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(h.numpy_mlp.logit(x), out)  # one h0, whichever pass computes it
