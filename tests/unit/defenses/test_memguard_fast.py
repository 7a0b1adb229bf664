"""MemGuard's fast Phase I (`phase1.fast_phase1`): constant work (the same operations for every
row, whatever h says), rows independent of the batch and of the bisection schedule, and the
numpy MLP against the torch one the faithful reference runs on."""

import numpy as np
import pytest
import torch
from random_h import random_weights

from purifier.defenses.membership_classifier import MembershipClassifier
from purifier.defenses.phase1 import LEVELS, _levels_per_pass, fast_phase1, softmax, sort_rows
from purifier.defenses.phase1_faithful import TorchMLP


def classifier(n_classes, seed):
    """A real (untrained, seeded) 256-128-64-1 classifier, its output bias set so that its 0.5
    boundary cuts the rows of `rows(..., n_classes, seed)` in half (else nothing can cross)."""
    weights = random_weights(n_classes, seed)
    out = MembershipClassifier(weights).logit(np.sort(rows(12, n_classes, seed), axis=1))
    weights["b4"] = weights["b4"] - np.median(out)
    return MembershipClassifier(weights)


def rows(n, c, seed):
    """Dirichlet rows from flat to saturated, plus a tied top, a uniform row and a one-hot row."""
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.dirichlet(np.full(c, a), size=n) for a in (0.05, 0.3, 3.0)])
    tied = np.full(c, 0.1 / max(c - 2, 1))
    tied[:2] = 0.45 if c > 2 else 0.5
    onehot = np.zeros(c)
    onehot[c // 2] = 1.0
    extra = np.stack([tied, np.full(c, 1.0 / c), onehot])
    return np.concatenate([p, extra / extra.sum(1, keepdims=True)])


class Recorder:
    """h behind a log of every forward pass it is asked for: (method, rows)."""

    def __init__(self, h):
        self.h, self.calls = h, []

    def logit(self, x):
        self.calls.append(("logit", x.shape))
        return self.h.logit(x)

    def logit_and_grad(self, x):
        self.calls.append(("logit_and_grad", x.shape))
        return self.h.logit_and_grad(x)


def trace(h, p):
    rec = Recorder(h)
    fast_phase1(rec, p)
    return rec.calls


@pytest.mark.parametrize("c", [2, 10, 100])
def test_every_row_takes_the_same_forward_passes_whatever_h_says(c):
    h = classifier(c, 1)
    p = rows(4, c, 1)
    h0 = h.logit(softmax(sort_rows(p)[1]))
    assert (h0 > 0).any() and (h0 < 0).any()  # member-like and non-member-like rows both present
    out, ok = fast_phase1(h, p)
    assert ok.any()
    # one row at a time: member-like, non-member-like, saturated, tied, uniform, one-hot rows
    # (rows that cross early, late, on another path, or never) ask h exactly the same questions
    traces = {tuple(trace(h, p[i:i + 1])) for i in range(len(p))}
    assert len(traces) == 1
    # a batch's passes depend on its size alone, not on which rows are in it
    member_like, other = p[h0 > 0][:3], p[h0 < 0][:3]
    assert trace(h, member_like) == trace(h, other) == trace(h, p[-3:])


@pytest.mark.parametrize("c", [3, 10])
def test_row_result_independent_of_batch_and_bisection_schedule(c):
    h = classifier(c, 5)
    p = rows(25, c, 5)  # 78 rows
    assert len({_levels_per_pass(n) for n in (1, 2, 3, len(p))}) >= 3  # several schedules exercised
    full, ok = fast_phase1(h, p)
    assert ok.sum() > 0.5 * len(p) and not np.array_equal(full, p)
    for i in (0, 7, 30, len(p) - 2, len(p) - 1):
        one, one_ok = fast_phase1(h, p[i:i + 1])
        np.testing.assert_array_equal(one[0], full[i])
        assert one_ok[0] == ok[i]
    perm = np.random.default_rng(0).permutation(len(p))
    np.testing.assert_array_equal(fast_phase1(h, p[perm])[0], full[perm])
    for n in (2, 3, 5):
        np.testing.assert_array_equal(fast_phase1(h, p[:n])[0], full[:n])


def test_success_means_crossed_with_the_top_kept():
    h = classifier(10, 2)
    p = rows(30, 10, 2)
    out, ok = fast_phase1(h, p)
    before = h.predict_member(p)
    after = h.predict_member(out)
    assert ok.sum() > 0.5 * len(p)
    assert (after[ok] != before[ok]).all()  # as an attacker sorting the released vector sees it
    np.testing.assert_array_equal(out[~ok], p[~ok])
    assert np.array_equal(out.argmax(1), p.argmax(1))
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)


def test_bisection_settles_all_levels():
    assert _levels_per_pass(1) > 1 and _levels_per_pass(10_000) == 1
    assert all(1 <= _levels_per_pass(n) <= LEVELS for n in range(1, 40))


def test_numpy_mlp_matches_torch_mlp():
    h = classifier(10, 7)
    x = np.sort(rows(10, 10, 7), axis=1)
    out, grad = h.logit_and_grad(x)
    ref_out, ref_grad = TorchMLP(h).logit_and_grad(torch.from_numpy(x))
    np.testing.assert_allclose(out, ref_out.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(h.logit(x), out)  # one h0, whichever pass computes it
