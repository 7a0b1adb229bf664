"""The timing attack: latency of single-row requests as a membership score, measured from outside.

A planted side channel (an endpoint that works longer on some rows) must be found, one without it
must score at chance; requests go one row at a time in a fresh random order per pass; the
threshold comes from the attacker's pool rows; an in-process target is refused in one line."""

import time

import numpy as np
import pytest

from purifier.attacks import DEFAULT_ATTACKS, FAMILIES, REGISTRY, attack_class
from purifier.attacks.timing import TimingAttack, aggregate_latencies, single_row_latencies
from purifier.errors import ConfigError
from purifier.evaluation import roc_auc
from purifier.models.access import RemoteTarget


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class SlowOnFlaggedRows(RemoteTarget):
    """A remote target without a connection: answers uniform vectors, slower when x[0] > 0."""

    def __init__(self, extra_s: float):
        self.queries, self.n_classes, self.description = 0, 3, "fake endpoint"
        self.extra_s, self.seen = extra_s, []

    def _query(self, X):
        self.seen.append(X.copy())
        busy(self.extra_s if X[0, 0] > 0 else 0.0)
        return np.full((len(X), 3), 1 / 3)

    def close(self):
        pass


def rows(n, seed=0):
    X = np.random.default_rng(seed).normal(size=(2 * n, 4)).astype(np.float32)
    X[:n, 0], X[n:, 0] = 1.0, -1.0  # the first n are the "members" a leaky defense is slower on
    return X, np.r_[np.ones(n, bool), np.zeros(n, bool)]


@pytest.mark.parametrize("extra_s,expect_signal", [(2e-3, True), (0.0, False)])
def test_finds_a_planted_latency_signal_and_none_without_one(extra_s, expect_signal):
    X, membership = rows(40)
    target = SlowOnFlaggedRows(extra_s)
    pool = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    pool[:, 0] = -1.0  # known non-members: fast
    attack = TimingAttack(passes=3, pool_rows=30, warmup=5)
    attack.pool_X = pool
    scores = attack.run(target, X, None, None)
    auc = roc_auc(scores, membership)
    if expect_signal:
        assert auc > 0.95 and attack.predict(scores)[membership].mean() > 0.9
    else:
        assert 0.25 < auc < 0.75  # chance, within what 80 noisy rows allow
    assert attack.queries == 5 + 3 * (len(X) + len(pool)) == target.queries
    assert all(len(q) == 1 for q in target.seen)  # single-row requests only
    assert attack.latencies.shape == (3, len(X) + len(pool))


def test_each_pass_visits_every_row_once_in_a_fresh_order():
    seen = []
    X = np.arange(12, dtype=np.float32)[:, None]
    lat = single_row_latencies(lambda row: seen.append(int(row[0, 0])), X, passes=3, seed=4)
    assert lat.shape == (3, 12) and (lat > 0).all()
    passes = [seen[i * 12:(i + 1) * 12] for i in range(3)]
    assert all(sorted(p) == list(range(12)) for p in passes)
    assert passes[0] != list(range(12)) and passes[0] != passes[1]  # interleaved, re-drawn per pass


def test_aggregates():
    lat = np.array([[3.0, 1.0], [1.0, 5.0], [2.0, 2.0]])
    np.testing.assert_array_equal(aggregate_latencies(lat, "min"), [1.0, 1.0])
    np.testing.assert_array_equal(aggregate_latencies(lat, "median"), [2.0, 2.0])
    with pytest.raises(ConfigError, match="aggregate"):
        aggregate_latencies(lat, "mean")


def test_in_process_target_is_refused_in_one_line(digits_target):
    from purifier.models.access import InProcessTarget

    attack = TimingAttack()
    attack.pool_X = np.zeros((2, 64), np.float32)
    with pytest.raises(ConfigError, match="needs a remote endpoint") as info:
        attack.run(InProcessTarget(digits_target), np.zeros((2, 64), np.float32), None, None)
    assert "\n" not in str(info.value)


def test_registered_outside_the_default_audit():
    assert attack_class("timing") is TimingAttack and "timing" in REGISTRY
    assert "timing" not in DEFAULT_ATTACKS and TimingAttack.family in FAMILIES
    with pytest.raises(ConfigError, match="passes"):
        TimingAttack(passes=0)
