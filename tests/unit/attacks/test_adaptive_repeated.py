"""Adaptive attacks fit their own copy of the defense; the repeated-query attack exposes
per-query randomness."""

import sys

import numpy as np
import pytest
from planted import context, planted_shadows

from purifier import evaluation as ev
from purifier.attacks import attack_class
from purifier.defenses import REGISTRY as DEFENSES
from purifier.defenses.base import Defense
from purifier.errors import ConfigError
from purifier.models.access import TargetAccess


class Flatten(Defense):
    """A label-keeping, deterministic defense: p^(1/T) renormalized (a temperature)."""

    name = "test_flatten"

    def __init__(self, *, temperature: float = 4.0, secret=None):
        super().__init__(secret=secret)
        self.temperature = temperature

    def _transform(self, p, inputs):
        q = p ** (1.0 / self.temperature)
        return q / q.sum(axis=1, keepdims=True), None


class NeedsInputs(Flatten):
    name = "test_needs_inputs"
    needs_inputs = True
    seen = []

    def _transform(self, p, inputs):
        assert inputs is not None and len(inputs) == len(p)
        NeedsInputs.seen.append(inputs.shape)
        return super()._transform(p, inputs)


@pytest.fixture
def registered(monkeypatch):
    module = sys.modules[__name__].__name__
    monkeypatch.setitem(DEFENSES, "test_flatten", f"{module}:Flatten")
    monkeypatch.setitem(DEFENSES, "test_needs_inputs", f"{module}:NeedsInputs")


@pytest.mark.parametrize("name", ["adaptive_nn", "adaptive_mentr"])
def test_adaptive_attack_recovers_leakage_through_its_own_defense_copy(registered, name):
    sh, cand_y, member, target = planted_shadows(seed=3)
    defended_target = Flatten().transform(target)
    X = np.zeros((len(cand_y), 4))
    naive = attack_class("mentr")().fit(context(sh))
    naive_ba = ev.balanced_accuracy(naive.predict(naive.run(None, X, cand_y, defended_target)), member)
    adaptive = attack_class(name)().fit(context(sh, defense_name="test_flatten"))
    scores = adaptive.run(None, X, cand_y, defended_target)
    ba = ev.balanced_accuracy(adaptive.predict(scores), member)
    assert adaptive.family == "adaptive" and adaptive.details["defense_copy"] == "test_flatten"
    assert ba > 0.75 and ba > naive_ba + 0.1, (ba, naive_ba)


def test_adaptive_with_identity_defense_and_inputs(registered):
    sh, cand_y, member, target = planted_shadows(seed=4)
    a = attack_class("adaptive_mentr")().fit(context(sh, defense_name="none"))
    b = attack_class("mentr")().fit(context(sh))
    np.testing.assert_allclose(a.class_thresholds, b.class_thresholds)  # identity: same fit
    NeedsInputs.seen.clear()
    attack_class("adaptive_mentr")().fit(context(sh, defense_name="test_needs_inputs"))
    assert NeedsInputs.seen == [(sh.n_shadows * len(sh.pool_y), 4)]  # every shadow row, one batched call


def test_adaptive_reference_is_a_seeded_sample_of_every_shadows_rows(registered, monkeypatch):
    """Past REFERENCE_ROWS the copy defends a sample drawn over all shadows (not the first ones),
    the same for the same seed, with each row's own label and membership."""
    from purifier.attacks import adaptive

    monkeypatch.setattr(adaptive, "REFERENCE_ROWS", 1000)
    sh, *_ = planted_shadows(n_shadows=8, seed=6)
    probs, labels, member = adaptive.defended_reference(context(sh, defense_name="test_flatten"))
    all_probs, all_labels, all_member = sh.stacked()
    rows = np.nonzero((Flatten().transform(all_probs)[:, None] == probs[None]).all(axis=2))[0]
    assert len(probs) == 1000 and len(np.unique(rows)) == 1000
    np.testing.assert_array_equal(labels, all_labels[rows])
    np.testing.assert_array_equal(member, all_member[rows])
    assert len(np.unique(rows // len(sh.pool_y))) == 8  # drawn from every shadow
    again, *_ = adaptive.defended_reference(context(sh, defense_name="test_flatten"))
    np.testing.assert_array_equal(again, probs)


def test_adaptive_needs_a_defense_name():
    sh, *_ = planted_shadows()
    with pytest.raises(ConfigError, match="defense"):
        attack_class("adaptive_nn")().fit(context(sh))
    with pytest.raises(ConfigError, match="unknown defense 'nope'"):
        attack_class("adaptive_nn")().fit(context(sh, defense_name="nope"))


class PlantedTarget(TargetAccess):
    """Row i (feature 0 = i) answers planted outputs; with `coin`, each query releases the clean
    row or a flattened one at random (a per-query coin: the bug the attack exposes)."""

    def __init__(self, clean, coin: bool, seed=0):
        super().__init__()
        self.clean, self.coin, self.n_classes = clean, coin, clean.shape[1]
        self.flat = Flatten(temperature=8.0).transform(clean)
        self.rng = np.random.default_rng(seed)
        self.description = "planted"

    def _query(self, X):
        i = np.rint(X[:, 0]).astype(int)
        if not self.coin:
            return self.flat[i]
        heads = self.rng.random(len(i)) < 0.5
        return np.where(heads[:, None], self.clean[i], self.flat[i])


def test_repeated_queries_expose_a_per_query_coin():
    sh, cand_y, member, clean = planted_shadows(seed=5)
    X = np.c_[np.arange(len(cand_y)), np.zeros((len(cand_y), 3))].astype(np.float32)
    ctx = context(sh)
    ctx.feature_range = (np.r_[0.0, -10, -10, -10], np.r_[1e6, 10, 10, 10])
    results = {}
    for coin in (False, True):
        target = PlantedTarget(clean, coin)
        attack = attack_class("repeated_query")(repeats=4, jitter=0.0).fit(ctx)
        scores = attack.run(target, X, cand_y, None)
        assert attack.queries == target.queries == 8 * len(cand_y)
        results[coin] = (ev.balanced_accuracy(attack.predict(scores), member), attack.details)
    assert results[False][1]["mean_l1_spread_identical_queries"] == 0.0
    assert results[True][1]["mean_l1_spread_identical_queries"] > 0.1
    assert results[True][0] > 0.8 and results[True][0] > results[False][0] + 0.15, results
