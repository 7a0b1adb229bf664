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

`purifier tune` and `benchmarks/bench_privacy_utility.py` both sweep through `sweep_points`.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from purifier import evaluation as ev
from purifier.attacks import DEFAULT_ATTACKS, attack_class
from purifier.audit.access import TargetAccess
from purifier.audit.runner import AuditConfig, run_audit
from purifier.errors import ConfigError

# the confidence attacks of a sweep, fitted once on the shadows: the metric attacks and NN cost no
# extra query per setting, RMIA (the strongest on digits: AUC 0.606 undefended, 0.542 under MemGuard
# at epsilon 1, where the best of the others reads 0.524) asks about its population records too
CONFIDENCE_ATTACKS = ("confidence", "entropy", "mentr", "loss", "nn", "rmia")


def floor_attacks() -> tuple[str, ...]:
    """The label-only attacks that set the floor: the gap attack and every label-only attack of the
    default audit (the query-hungry boundary attack is not in it)."""
    return ("gap", *(n for n in DEFAULT_ATTACKS if n != "gap" and attack_class(n).family == "label_only"))


@dataclass(frozen=True)
class Floor:
    """The strongest label-only attack of an audit: its name, AUC and 95% bootstrap interval."""

    attack: str
    auc: float
    ci95: tuple[float, float]
    tpr_at_1pct_fpr: float

    def as_dict(self) -> dict:
        return asdict(self)


def label_only_floor(report: dict) -> Floor:
    """The label-only floor of an audit report: the runner's own `label_only_floor` where the report
    has one (the strongest label-only attack per metric), else the largest AUC among the label-only
    attacks it ran (the gap attack included). The one place a sweep reads the floor from."""
    runner = report.get("label_only_floor")
    if isinstance(runner, dict) and "auc" in runner:
        auc, tpr = runner["auc"], runner.get("0.01") or {}
        return Floor(auc["attack"], auc["value"], tuple(auc["ci95"]), tpr.get("value", 0.0))
    entries = {n: a for n, a in report["attacks"].items() if n == "gap" or a["family"] == "label_only"}
    if not entries:
        raise ConfigError("the audit ran no label-only attack, so there is no floor to tune against")
    name = max(entries, key=lambda n: entries[n]["auc"])
    a = entries[name]
    return Floor(name, a["auc"], tuple(a["ci95"]["auc"]), a["tpr_at_fpr"]["0.01"]["tpr"])


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


@dataclass(frozen=True)
class Knob:
    """The budget of one defense: its constructor keyword, a default grid, and which way protects
    more. `weakest_first` orders settings from the least distortion to the most."""

    param: str
    grid: tuple
    stronger_when: str  # "larger" (MemGuard epsilon, noise scale, PURIFIER budget) or "smaller" (k, decimals)
    kind: type = float
    label: str = ""

    def weakest_first(self, values: Iterable) -> list:
        values = list(dict.fromkeys(values))
        if self.param == "budget":  # PURIFIER: None = no cap, the strongest
            capped = sorted(v for v in values if v is not None)
            return capped + [None] * (None in values)
        return sorted(values, reverse=self.stronger_when == "smaller")

    def parse(self, text: str) -> list:
        """A comma-separated grid from the command line, weakest first (the values themselves are
        checked by the defense's own constructor, `at_setting`)."""
        values = []
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            if self.param == "budget" and item.lower() == "none":
                values.append(None)
                continue
            try:
                value = self.kind(item)
            except ValueError:
                raise ConfigError(f"--grid: {item!r} is not {'an integer' if self.kind is int else 'a number'} "
                                  f"({self.param})") from None
            if self.kind is float and not math.isfinite(value):
                raise ConfigError(f"--grid: {item!r} is not a finite number ({self.param})")
            values.append(value)
        if not values:
            raise ConfigError(f"--grid: give at least one {self.param} value, e.g. {','.join(map(str, self.grid))}")
        return self.weakest_first(values)


KNOBS: dict[str, Knob] = {
    # epsilon 2 releases Phase I's noise on every row (no L1 distance exceeds 2): MemGuard's strongest
    "memguard": Knob("epsilon", (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), "larger", float, "eps"),
    "purifier": Knob("budget", (0.02, 0.05, 0.1, 0.2, 0.5, None), "larger", float, "L1 budget"),
    "top_k": Knob("k", (5, 3, 2, 1), "smaller", int, "k"),
    "round": Knob("decimals", (3, 2, 1, 0), "smaller", int, "decimals"),
    "noise": Knob("scale", (0.005, 0.01, 0.02, 0.05, 0.1, 0.2), "larger", float, "scale"),
}
# the simple alternatives on every tune curve (trimmed grids: k = 1 and d = 0 are label_only)
BASELINE_GRIDS: dict[str, tuple] = {"label_only": (None,), "top_k": (3, 2), "round": (3, 2, 1),
                                    "noise": (0.003, 0.01, 0.03)}


def knob(defense_name: str) -> Knob:
    if defense_name not in KNOBS:
        if defense_name == "label_only":
            raise ConfigError("label_only has no budget to tune (it always answers the label only); it is on "
                              "every tune curve as a baseline")
        raise ConfigError(f"defense: {defense_name!r} has no budget to tune; choose one of {', '.join(KNOBS)}")
    return KNOBS[defense_name]


def at_setting(defense, value):
    """A copy of a fitted defense with its budget set to `value` (fitted state shared, not copied).

    The value is checked by the defense's own constructor, so a bad setting fails with the
    defense's message (e.g. `k: must be an integer >= 1`)."""
    if defense.name not in KNOBS:
        return defense
    param = KNOBS[defense.name].param
    type(defense)(**{param: value})  # validation only
    if hasattr(defense, "with_options"):  # PURIFIER: budget=None means "keep", so set it directly
        twin = defense.with_options()
        twin.budget = value
        return twin
    twin = copy.copy(defense)
    setattr(twin, param, value if param != "epsilon" else float(value))
    return twin


def setting_label(defense_name: str, value) -> str:
    if defense_name not in KNOBS:
        return "-"
    k = KNOBS[defense_name]
    return f"{k.label} {'none' if value is None else f'{value:g}'}"


@dataclass(frozen=True)
class SweepPoint:
    """One audited setting. `best_*` is the strongest confidence attack by AUC (TPR at 1% FPR is
    the largest over the confidence attacks), each as an attacker uses it (`attacker_view`: an
    inverted signal is flipped, and named so); `auc` per attack likewise; `utility` is
    `evaluation.output_utility`."""

    defense: str
    setting: object
    label: str
    best_attack: str
    best_auc: float
    best_auc_ci95: tuple[float, float]
    best_tpr_at_1pct_fpr: dict
    auc: dict
    utility: dict

    @property
    def real_traffic_l1(self) -> float:
        return self.utility["l1_nonmembers"]["mean"]

    @property
    def keeps_labels(self) -> bool:
        return self.utility["argmax_agreement"] == 1.0

    def within(self, floor: Floor) -> bool:
        """The best confidence attack is no stronger than the floor's 95% interval reaches."""
        return self.best_auc <= floor.ci95[1]

    def as_dict(self) -> dict:
        return asdict(self)


def attacker_view(name: str, entry: dict, audit) -> tuple[float, tuple[float, float], dict, bool]:
    """(AUC, its 95% interval, TPR at 1% FPR entry, flipped) of one attack as an attacker uses it.

    An attack whose AUC interval lies below 0.5 found a real signal with the wrong sign (MemGuard's
    noise does this to the NN attack); an attacker flips it, so its negated score counts. The
    runner's `inverted` entry is used where the report has one; otherwise the flipped figures come
    from the scores (AUC and its interval mirror exactly; TPR is recomputed)."""
    lo, hi = entry["ci95"]["auc"]
    if hi >= 0.5:
        return entry["auc"], (lo, hi), entry["tpr_at_fpr"]["0.01"], False
    if "inverted" in entry:
        src = entry["inverted"]
        return src["auc"], tuple(src["ci95"]["auc"]), src["tpr_at_fpr"]["0.01"], True
    t = ev.tpr_at_fpr(-audit.outcomes[name].scores, audit.membership, 0.01)
    return 1.0 - entry["auc"], (1.0 - hi, 1.0 - lo), {"tpr": t.tpr, "fpr": t.fpr, "negatives": t.negatives}, True


def point_from_audit(audit, defense_name: str, setting, clean: np.ndarray, defended: np.ndarray,
                     labels: np.ndarray) -> SweepPoint:
    """A `SweepPoint` from an audit (`runner.Audit`) and the answers it audited (N, C)."""
    attacks = audit.report["attacks"]
    conf = [n for n, a in attacks.items() if a["family"] == "confidence" and n != "gap"]
    if not conf:
        raise ConfigError("the sweep ran no confidence attack")
    views = {n: attacker_view(n, attacks[n], audit) for n in conf}
    best = max(conf, key=lambda n: views[n][0])
    top = max(conf, key=lambda n: views[n][2]["tpr"])
    t = views[top][2]
    return SweepPoint(defense_name, setting, setting_label(defense_name, setting),
                      best + (" (flipped)" if views[best][3] else ""), views[best][0], views[best][1],
                      {"tpr": t["tpr"], "fpr": t["fpr"], "negatives": t["negatives"],
                       "attack": top + (" (flipped)" if views[top][3] else "")},
                      {n: views[n][0] for n in conf},
                      ev.output_utility(clean, defended, labels, audit.membership))


@dataclass
class Sweep:
    """The undefended audit (with the floor) and the points; `shadows` for later audits."""

    undefended: SweepPoint
    undefended_report: dict
    floor: Floor
    points: list[SweepPoint]


def _eval_rows(data) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation records in the runner's order (members, then non-members): X (N, D), y (N,)."""
    return np.concatenate([data.members.X, data.nonmembers.X]), np.concatenate([data.members.y, data.nonmembers.y])


def sweep_points(data, access: TargetAccess, variants: Sequence[tuple[str, object, object]], config: AuditConfig,
                 progress=None, shadows=None) -> Sweep:
    """Audit the undefended model once (confidence and label-only attacks: the floor), then every
    variant with the confidence attacks of `config` and the same shadow models.

    Args:
        data: `AuditData` (evaluation members, non-members, attacker pool).
        access: the undefended model (in process or an endpoint); asked once per row set.
        variants: (defense name, setting, fitted Defense at that setting), in the order to report.
        config: the attacks (confidence ones; the floor's are added to the first audit), shadows,
            bootstrap and seed.
        progress: optional callable(done, total, label) after each audit.
        shadows: a `ShadowSet` from an earlier audit of the same records, reused if given.
    """
    from dataclasses import replace

    cache = AnswerCache(access)
    X, y = _eval_rows(data)
    total = len(variants) + 1
    first = replace(config, attacks=tuple(dict.fromkeys((*config.attacks, *floor_attacks()))))
    base = run_audit(data, DefendedAccess(cache), first, None, shadows=shadows)
    clean = DefendedAccess(cache).query(X)
    undefended = point_from_audit(base, "none", None, clean, clean, y)
    floor = label_only_floor(base.report)
    if progress:
        progress(1, total, "undefended")
    points = []
    for i, (name, setting, defense) in enumerate(variants, start=2):
        access_i = DefendedAccess(cache, defense)
        audit = run_audit(data, access_i, config, name, shadows=base.shadows, fitted=base.fitted)
        points.append(point_from_audit(audit, name, setting, clean, access_i.query(X), y))
        if progress:
            progress(i, total, f"{name} {setting_label(name, setting)}")
    return Sweep(undefended, base.report, floor, points)


def choose(points: Sequence[SweepPoint], floor: Floor, defense_name: str) -> tuple[SweepPoint | None, SweepPoint]:
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


__all__ = ["BASELINE_GRIDS", "CONFIDENCE_ATTACKS", "KNOBS", "AnswerCache", "DefendedAccess", "Floor", "Knob",
           "Sweep", "SweepPoint", "at_setting", "choose", "floor_attacks", "knob", "label_only_floor",
           "attacker_view", "point_from_audit", "setting_label", "sweep_points"]
