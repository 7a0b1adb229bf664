"""The `Attack` contract shared by every membership inference attack in the harness.

Convention (docs/design.md#attacks): `score` is higher for records more likely to be members.
An attack is fitted on shadow outputs whose membership the attacker knows (Shokri et al. 2017)
and never on the evaluation membership; its hard decisions use `threshold`, also fitted on
shadow data, so the balanced accuracy it reports is one an attacker could actually achieve.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np

if TYPE_CHECKING:
    from purifier.attacks.shadow import ShadowSet

FAMILIES = ("confidence", "label_only", "adaptive", "repeated_query", "timing")


@dataclass
class AttackContext:
    """What the attacker has: shadow models and outputs, the data's shape, the defense's name.

    Attributes:
        shadows: the attacker's `ShadowSet` (models and outputs on pool and candidates).
        n_classes: C.
        kind: "image" or "tabular"; image_shape: (c, h, w) or None.
        feature_range: (lo, hi) per-feature bounds (D,) of valid inputs.
        candidate_labels: (N,) labels of the audited records, in the order `run` sees them
            (the records the shadow models were built around, for per-record attacks).
        defense_name: the defense algorithm the attacker assumes (adaptive attacks), or None.
        seed: the attacker's seed.
        defended_pool: (K, P, C) shadow pool outputs passed through the attacker's own copy of
            the defense, computed once per audit by `adaptive.defended_shadow_outputs`.
    """

    shadows: ShadowSet
    n_classes: int
    kind: str
    image_shape: tuple[int, int, int] | None
    feature_range: tuple[np.ndarray, np.ndarray]
    candidate_labels: np.ndarray | None = None
    defense_name: str | None = None
    seed: int = 0
    defended_pool: np.ndarray | None = field(default=None, repr=False)


class LabelOnly:
    """A label-only view of a target: exposes `labels` and the query counter, never scores."""

    def __init__(self, target):  # a purifier.audit.access.TargetAccess
        self._target = target
        self.n_classes = target.n_classes

    @property
    def queries(self) -> int:
        return self._target.queries

    def labels(self, X: np.ndarray) -> np.ndarray:
        return self._target.labels(X)


def fit_threshold(scores: np.ndarray, membership: np.ndarray) -> float:
    """The threshold that maximises balanced accuracy on shadow scores (member iff >= it)."""
    from purifier.evaluation import best_balanced_accuracy

    _, thr = best_balanced_accuracy(scores, membership)
    return float(thr)


class Attack(abc.ABC):
    """Base class: `fit(ctx)` on shadow data, then `run(target, X, y, outputs) -> (N,)` scores.

    Attributes:
        name: registry name; family: one of FAMILIES.
        threshold: member iff score >= threshold, fitted on shadow data in `fit`.
        queries: rows this attack asked the target about during `run`.
        details: extra JSON-able facts for the report (e.g. answer spread, budget).
    """

    name: ClassVar[str]
    family: ClassVar[str]

    def __init__(self, *, seed: int = 0):
        self.seed = seed
        self.threshold = 0.0
        self.queries = 0
        self.details: dict = {}

    @abc.abstractmethod
    def fit(self, ctx: AttackContext) -> Self:
        """Fit on shadow data only."""

    @abc.abstractmethod
    def run(self, target, X: np.ndarray, y: np.ndarray, outputs: np.ndarray | None) -> np.ndarray:
        """Attack the evaluation records X (N, D), labels y (N,); `outputs` (N, C) are the
        target's answers to one query per record when the target gives probabilities."""

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool member decisions from the shadow-fitted threshold."""
        return np.asarray(scores) >= self.threshold


class ConfidenceAttack(Attack):
    """Attacks on the confidence vector alone: `fit_outputs` on reference outputs with known
    membership, `score(outputs, labels)`; `run` reuses the one query per record."""

    family = "confidence"

    def fit(self, ctx: AttackContext) -> Self:
        probs, labels, membership = ctx.shadows.stacked()
        return self.fit_outputs(probs, labels, membership)

    def fit_outputs(self, probs: np.ndarray, labels: np.ndarray, membership: np.ndarray) -> Self:
        """probs (M, C), labels (M,), membership (M,) bool of reference (shadow) records."""
        self._fit_scorer(probs, labels, membership)
        self.threshold = fit_threshold(self.score(probs, labels), membership)
        return self

    def _fit_scorer(self, probs, labels, membership) -> None:
        """Learn whatever the score needs (default: nothing)."""

    @abc.abstractmethod
    def score(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """outputs (N, C), labels (N,) -> (N,) float, higher = member."""

    def run(self, target, X, y, outputs):
        if outputs is None:
            raise ValueError(f"attack {self.name} needs confidence outputs")
        self.queries = len(X)
        return self.score(outputs, y)
