"""Budget sweeps: audit one fitted defense at many settings of its budget, against the label-only floor.

A defense that keeps the predicted label cannot push membership inference below what the label
alone gives away (Yeom et al. 2018; Choquette-Choo et al. 2021, "Label-Only Membership Inference
Attacks"); the budget worth serving is the smallest one at which the best confidence attack is no
stronger than that floor, within its 95% bootstrap interval. This module measures the curve:

* the undefended model's answers are asked once per row set (`AnswerCache`) and every setting
  is a defense applied here to those answers (`DefendedAccess`), as the sidecar would apply it;
* the attacker's shadow models train once, in the first (undefended) audit, and are reused;
* the floor is measured once, on the undefended answers, by the label-only attacks (which see only
  labels, and every swept defense keeps them; a setting that changes a label is flagged);
* each setting is a `SweepPoint`: the best confidence attack's AUC with its interval, TPR at 1%
  FPR with the FPR realized, and `purifier.evaluation.output_utility` (L1 on non-members = real
  traffic, members separately, Brier, ECE, rank agreement, distinct answers).

`purifier tune`, `purifier demo` and `benchmarks/bench_privacy_utility.py` sweep through `sweep_points`;
the settings come from each defense's own `Defense.knob` and `Defense.with_budget`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from purifier import evaluation as ev
from purifier.attacks import DEFAULT_ATTACKS, attack_class
from purifier.attacks.base import Family
from purifier.audit.results import Best, Report, Result, Strongest
from purifier.audit.runner import Audit, AuditConfig, run_audit
from purifier.errors import ConfigError
from purifier.models.access import TargetAccess

# the confidence attacks of a sweep, fitted once on the shadows: the metric attacks and NN cost no
# extra query per setting, RMIA (the strongest of them on digits: docs/tune.md's example output,
# docs/results.md#demo_digits) asks about its population records too
CONFIDENCE_ATTACKS = ("confidence", "entropy", "mentr", "loss", "nn", "rmia")


def floor_attacks() -> tuple[str, ...]:
    """The label-only attacks that set the floor: the gap attack and every label-only attack of the
    default audit (the query-hungry boundary attack is not in it)."""
    return ("gap", *(n for n in DEFAULT_ATTACKS if n != "gap" and attack_class(n).family == Family.LABEL_ONLY))


def label_only_floor(report: Report) -> Strongest:
    """The label-only floor of an audit report (the strongest label-only attack per metric); the
    one place a sweep reads it from."""
    if report.label_only_floor is None:
        raise ConfigError("the audit ran no label-only attack, so there is no floor to tune against")
    return report.label_only_floor


def _digest(X: np.ndarray) -> str:
    return hashlib.blake2b(str(X.shape).encode() + np.ascontiguousarray(X).tobytes(), digest_size=16).hexdigest()


class AnswerCache:
    """The undefended model's answers (N, C) float64, asked once per distinct row set."""

    def __init__(self, access: TargetAccess):
        self.access = access
        self._answers: dict[str, np.ndarray] = {}

    def __call__(self, X: np.ndarray, key: str) -> np.ndarray:
        if key not in self._answers:
            self._answers[key] = self.access.query(X)
        return self._answers[key]


class DefendedAccess(TargetAccess):
    """A defense applied in this process to cached undefended answers (None: the answers as they are).

    Defenses are deterministic per row, so a repeated row set gets the same answers; they are
    cached too, which lets the sweep read the utility of exactly what the attacks saw."""

    def __init__(self, clean: AnswerCache, defense=None):
        super().__init__()
        inner = clean.access
        self.clean, self.defense = clean, defense
        self.n_classes, self.n_features, self.model_id = inner.n_classes, inner.n_features, inner.model_id
        self.description = f"{inner.description or 'the model'} with {getattr(defense, 'name', 'no')} defense"
        self._answers: dict[str, np.ndarray] = {}

    def _query(self, X):
        key = _digest(X)
        if key not in self._answers:
            p = self.clean(X, key)
            if self.defense is not None:
                p = self.defense.transform(p, X if self.defense.needs_inputs else None)
            self._answers[key] = np.asarray(p, np.float64)
        return self._answers[key]


def setting_label(defense_name: str, value) -> str:
    """How a setting is written: the defense's own `Knob.setting`, "-" for one without a knob."""
    from purifier.defenses import defense_class

    knob = defense_class(defense_name).knob if defense_name != "none" else None
    return "-" if knob is None else knob.setting(value)


@dataclass(frozen=True)
class SweepPoint(Result):
    """One audited setting: `best` is the strongest confidence attack by AUC and `best_tpr_1pct`
    the one finding most members at 1% FPR, each as an attacker uses it (an inverted signal
    flipped, and named so); `auc` per attack likewise; `utility` what users pay."""

    defense: str
    setting: float | int | None
    label: str
    best: Best
    best_tpr_1pct: Best
    auc: dict[str, float]
    utility: ev.OutputUtility

    @property
    def best_auc(self) -> float:
        return self.best.value

    @property
    def real_traffic_l1(self) -> float:
        return self.utility.l1_nonmembers.mean

    @property
    def keeps_labels(self) -> bool:
        return self.utility.argmax_agreement == 1.0

    def within(self, floor: Strongest) -> bool:
        """The best confidence attack is no stronger than the floor's AUC 95% interval reaches."""
        return self.best.value <= floor.auc.ci95[1]


def point_from_audit(audit: Audit, defense_name: str, setting, clean: np.ndarray, defended: np.ndarray,
                     labels: np.ndarray) -> SweepPoint:
    """A `SweepPoint` from an audit and the answers it audited (N, C)."""
    report = audit.report
    conf = [a for a in report.attacks.values() if a.family == Family.CONFIDENCE]
    if not conf:
        raise ConfigError("the sweep ran no confidence attack")
    strongest = Strongest.among(conf)
    assert strongest is not None  # among attacks, not none
    return SweepPoint(defense_name, setting, setting_label(defense_name, setting), strongest.auc,
                      strongest.tpr_1pct, {a.name: a.attacker.auc for a in conf},
                      ev.output_utility(clean, defended, labels, audit.membership))


@dataclass
class Sweep:
    """The undefended audit (with the floor) and the points."""

    undefended: SweepPoint
    undefended_report: Report
    floor: Strongest
    points: list[SweepPoint]


def _eval_rows(data) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation records in the runner's order (members, then non-members): X (N, D), y (N,)."""
    return np.concatenate([data.members.X, data.nonmembers.X]), np.concatenate([data.members.y, data.nonmembers.y])


def sweep_points(data, access: TargetAccess, variants: Sequence[tuple[str, object, object]], config: AuditConfig,
                 progress=None, shadows=None, undefended: Audit | None = None) -> Sweep:
    """Audit the undefended model once (confidence and label-only attacks: the floor), then every
    variant with the confidence attacks of `config` and the same shadow models.

    Args:
        data: `AuditData` (evaluation members, non-members, attacker pool).
        access: the undefended model (in process or an endpoint); asked once per row set.
        variants: (defense name, setting, fitted Defense at that setting: `Defense.with_budget`),
            in the order to report.
        config: the attacks (confidence ones; the floor's are added to the first audit), shadows,
            bootstrap and seed.
        progress: optional callable(done, total, label) after each audit.
        shadows: a `ShadowSet` from an earlier audit of the same records, reused if given.
        undefended: an audit of the undefended model on the same records, already run with the
            floor's attacks (the demo's): used instead of auditing it again, its shadows and fitted
            attacks too.
    """
    cache = AnswerCache(access)
    X, y = _eval_rows(data)
    total = len(variants) + 1
    if undefended is None:
        first = replace(config, attacks=tuple(dict.fromkeys((*config.attacks, *floor_attacks()))))
        undefended = run_audit(data, DefendedAccess(cache), first, "none", shadows=shadows)
    clean = DefendedAccess(cache).query(X)
    point = point_from_audit(undefended, "none", None, clean, clean, y)
    floor = label_only_floor(undefended.report)
    if progress:
        progress(1, total, "undefended")
    points = []
    for i, (name, setting, defense) in enumerate(variants, start=2):
        access_i = DefendedAccess(cache, defense)
        audit = run_audit(data, access_i, config, name, shadows=undefended.shadows, fitted=undefended.fitted)
        points.append(point_from_audit(audit, name, setting, clean, access_i.query(X), y))
        if progress:
            progress(i, total, f"{name} {setting_label(name, setting)}")
    return Sweep(point, undefended.report, floor, points)


def choose(points: Sequence[SweepPoint], floor: Strongest, defense_name: str) -> tuple[SweepPoint | None, SweepPoint]:
    """(the weakest setting of `defense_name` within the floor's interval, or None if no setting
    reaches it; the setting with the weakest best attack, ties to the weakest setting).

    `points` of that defense must come weakest first (`Knob.weakest_first`); a setting that changed
    a predicted label is not eligible (the floor assumes labels are kept)."""
    own = [p for p in points if p.defense == defense_name]
    if not own:
        raise ValueError(f"no sweep point of {defense_name}")
    chosen = next((p for p in own if p.keeps_labels and p.within(floor)), None)
    best = min(own, key=lambda p: p.best_auc)  # min keeps the first (weakest) among equals
    return chosen, best


__all__ = ["CONFIDENCE_ATTACKS", "AnswerCache", "DefendedAccess", "Sweep", "SweepPoint", "choose", "floor_attacks",
           "label_only_floor", "point_from_audit", "setting_label", "sweep_points"]
