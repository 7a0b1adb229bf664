"""The `Attack` contract shared by every membership inference attack in the harness.

Convention (docs/design.md#attacks): `score` is higher for records more likely to be members.
An attack is fitted on shadow outputs whose membership the attacker knows (Shokri et al. 2017)
and never on the evaluation membership; its hard decisions use `threshold`, also fitted on
shadow data, so the balanced accuracy it reports is one an attacker could actually achieve.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np

if TYPE_CHECKING:
    from purifier.attacks.shadow import ShadowSet



class Family(StrEnum):
    """What an attack sees of the target: the confidence vector, the predicted label only, the
    answers of a named defense it imitates, repeated answers, or response times."""

    CONFIDENCE = "confidence"
    LABEL_ONLY = "label_only"
    ADAPTIVE = "adaptive"
    REPEATED_QUERY = "repeated_query"
    TIMING = "timing"


FAMILIES = tuple(Family)


class Coverage(StrEnum):
    """The kinds of attack the verdict counts when it says which were run (`purifier.audit.verdict`):
    the label-only family splits by technique, because each finds a different part of what the
    label reveals (Yeom et al. 2018; Choquette-Choo et al. 2021; Watson et al. 2022)."""

    CONFIDENCE = "confidence"
    ADAPTIVE = "adaptive"
    LABEL_GAP = "label_gap"
    LABEL_CALIBRATED = "label_calibrated"
    LABEL_AUGMENTATION = "label_augmentation"
    LABEL_BOUNDARY = "label_boundary"
    REPEATED_QUERY = "repeated_query"
    TIMING = "timing"


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
        defended_reference: shadow pool outputs passed through the attacker's own copy of the
            defense, with their labels and membership, computed once per audit by
            `adaptive.defended_reference`.
    """

    shadows: ShadowSet
    n_classes: int
    kind: str
    image_shape: tuple[int, int, int] | None
    feature_range: tuple[np.ndarray, np.ndarray]
    candidate_labels: np.ndarray | None = None
    defense_name: str | None = None
    seed: int = 0
    defended_reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)


class LabelOnly:
    """A label-only view of a target: exposes `labels` and the query counter, never scores."""

    def __init__(self, target):  # a purifier.models.access.TargetAccess
        self._target = target
        self.n_classes = target.n_classes

    @property
    def queries(self) -> int:
        return self._target.queries

    def labels(self, X: np.ndarray) -> np.ndarray:
        return self._target.labels(X)


class RememberedLabels:
    """The target as one audit's attacks see it: a label query for exactly the rows of an earlier
    label query in this audit is answered from memory instead of asked again.

    The augmentation attacks and their calibrated variant ask the same copies of every record
    (same seed, same chunks); label answers are a function of the input for the defenses audited
    here (they keep the argmax), and an attacker may reuse an answer it holds. `query` always
    reaches the target: repeating a query is what some attacks measure. `queries` counts every
    row the attacks asked, answered from memory or not, so each attack reports its own cost;
    `rows_sent` counts the rows that reached the target.
    """

    def __init__(self, target):  # a purifier.audit.access.TargetAccess
        self._target = target
        self._answers: dict[bytes, np.ndarray] = {}
        self.queries = 0

    def __getattr__(self, name):  # n_classes, description, ... of the target
        return getattr(self._target, name)

    @property
    def rows_sent(self) -> int:
        return self._target.queries

    def query(self, X: np.ndarray) -> np.ndarray:
        self.queries += len(X)
        return self._target.query(X)

    def labels(self, X: np.ndarray) -> np.ndarray:
        import hashlib

        X = np.ascontiguousarray(X, np.float32)
        self.queries += len(X)
        key = hashlib.blake2b(X.tobytes(), digest_size=20, person=str(X.shape).encode()[:16]).digest()
        if key not in self._answers:
            self._answers[key] = self._target.labels(X)
        return self._answers[key].copy()


def fit_threshold(scores: np.ndarray, membership: np.ndarray) -> float:
    """The threshold that maximises balanced accuracy on shadow scores (member iff >= it)."""
    from purifier.evaluation import best_balanced_accuracy

    _, thr = best_balanced_accuracy(scores, membership)
    return float(thr)


class Attack(abc.ABC):
    """Base class: `fit(ctx)` on shadow data, then `run(target, X, y, outputs) -> (N,)` scores.

    Attributes:
        name: registry name; family: a `Family`; coverage: the `Coverage` kind the verdict counts
            it under (defaults to the family's own, set it on label-only attacks).
        threshold: member iff score >= threshold, fitted on shadow data in `fit`.
        queries: rows this attack asked the target about during `run`.
        details: extra JSON-able facts for the report (e.g. answer spread, budget).
    """

    name: ClassVar[str]
    family: ClassVar[Family]
    coverage: ClassVar[Coverage]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__ and "coverage" not in cls.__dict__:
            if cls.family == Family.LABEL_ONLY:  # the verdict needs to know which label-only technique
                raise TypeError(f"{cls.__name__}: a label-only attack names its Coverage kind")
            cls.coverage = Coverage(cls.family.value)

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

    family = Family.CONFIDENCE

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
