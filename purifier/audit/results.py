"""What an audit found, as typed values: an attack's result, the label-only floor, the verdict,
and the report that holds them, each a frozen dataclass with `to_json` / `from_json`.

`report.json` is `Report.to_json()` with a `schema_version`; `Report.from_json` reads this
version and refuses another in one line that names both. Metrics come from `purifier.evaluation`
(the runner computes them); everything here only holds and reads them, so report.md,
report.html, the sweep and the demo read the same attributes. TPR at a low FPR always carries
the FPR realized and the non-members behind it (Carlini et al. 2022).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path

from purifier.attacks.base import Coverage, Family
from purifier.errors import ConfigError
from purifier.evaluation import BeforeAfter, L1Summary, OutputUtility  # noqa: F401 - field types, read by from_json

SCHEMA_VERSION = 2  # 1: the untyped report.json (no schema_version key)


class Metric(StrEnum):
    """The figures an attack is judged on: AUC, and TPR at 1% and at 0.1% FPR."""

    AUC = "auc"
    TPR_1PCT = "tpr_at_1pct_fpr"
    TPR_01PCT = "tpr_at_01pct_fpr"

    @property
    def fpr(self) -> float | None:
        return {"auc": None, "tpr_at_1pct_fpr": 0.01, "tpr_at_01pct_fpr": 0.001}[self.value]

    @property
    def words(self) -> str:
        return {"auc": "AUC", "tpr_at_1pct_fpr": "TPR at 1% FPR", "tpr_at_01pct_fpr": "TPR at 0.1% FPR"}[self.value]


TPR_METRICS = (Metric.TPR_1PCT, Metric.TPR_01PCT)
FPR_TARGETS = tuple(fpr for m in TPR_METRICS if (fpr := m.fpr) is not None)


class Result:
    """JSON for the dataclasses below: `to_json()` gives plain JSON types, `from_json(d)` reads
    them back through the field types."""

    def to_json(self) -> dict:
        return _encode(self)

    @classmethod
    def from_json(cls, data: dict):
        return _decode(cls, data)


@dataclass(frozen=True)
class Tpr(Result):
    """TPR at one target FPR: the FPR realized, the non-members behind it, and whether the target
    is at least 1/negatives (else the figure is the TPR at zero false positives); its 95% interval."""

    tpr: float
    fpr: float
    negatives: int
    measurable: bool
    ci95: tuple[float, float]


@dataclass(frozen=True)
class Ranking(Result):
    """The threshold-free figures of one score on the evaluation records."""

    auc: float
    auc_ci95: tuple[float, float]
    tpr_1pct: Tpr
    tpr_01pct: Tpr

    def tpr(self, metric: Metric) -> Tpr:
        return self.tpr_1pct if metric == Metric.TPR_1PCT else self.tpr_01pct

    def value(self, metric: Metric) -> float:
        return self.auc if metric == Metric.AUC else self.tpr(metric).tpr

    def ci95(self, metric: Metric) -> tuple[float, float]:
        return self.auc_ci95 if metric == Metric.AUC else self.tpr(metric).ci95


@dataclass(frozen=True)
class AttackResult(Result):
    """One attack on the evaluation records.

    Attributes:
        ranking: its scores' AUC and TPRs; flipped: the same of the negated scores when the AUC
            interval lies below 0.5 (a real signal with the wrong sign, which an attacker flips).
        balanced_accuracy: at the attack's own threshold fitted on shadow models (with its 95%
            interval); oracle_balanced_accuracy: at the best threshold on the evaluation
            membership, an upper bound.
        queries: rows it asked the target about; seconds: its fit and run time.
        details: facts the attack recorded (variants chosen, budgets).
    """

    name: str
    family: Family
    coverage: Coverage
    ranking: Ranking
    balanced_accuracy: float
    balanced_accuracy_ci95: tuple[float, float]
    oracle_balanced_accuracy: float
    queries: int
    seconds: float
    details: dict = field(default_factory=dict)
    flipped: Ranking | None = None

    @property
    def label_only(self) -> bool:
        return self.family == Family.LABEL_ONLY

    @property
    def inverted(self) -> bool:
        return self.flipped is not None

    @property
    def attacker(self) -> Ranking:
        """The figures as an attacker uses them: flipped when the signal is inverted."""
        return self.flipped or self.ranking


@dataclass(frozen=True)
class RocPoints(Result):
    """An attack's ROC (as an attacker uses it: flipped when inverted), sampled for plots: the
    (fpr, tpr) steps at a log-spaced grid of false-positive rates from 1/negatives, plus a linear
    one, so both the whole curve and its low-FPR corner redraw without the scores."""

    fpr: tuple[float, ...]
    tpr: tuple[float, ...]


@dataclass(frozen=True)
class Best(Result):
    """The strongest attack on one metric, as an attacker uses it; `tpr` (TPR metrics) carries
    the FPR realized and the non-members."""

    attack: str
    value: float
    ci95: tuple[float, float]
    flipped: bool
    tpr: Tpr | None = None

    @property
    def measurable(self) -> bool:
        return self.tpr is None or self.tpr.measurable

    @property
    def rate(self) -> Tpr:
        """`tpr` of a TPR metric's figure (an AUC's has none: ValueError)."""
        if self.tpr is None:
            raise ValueError(f"{self.attack}: an AUC figure has no TPR")
        return self.tpr

    @property
    def label(self) -> str:
        return self.attack + (" (flipped)" if self.flipped else "")


@dataclass(frozen=True)
class Strongest(Result):
    """Per metric, the strongest of a group of attacks. Over the label-only attacks it is the
    label-only floor: what the predicted label alone reveals, which no defense that keeps the
    label can push an attack below (Yeom et al. 2018; Choquette-Choo et al. 2021)."""

    auc: Best
    tpr_1pct: Best
    tpr_01pct: Best

    def of(self, metric: Metric) -> Best:
        return {Metric.AUC: self.auc, Metric.TPR_1PCT: self.tpr_1pct, Metric.TPR_01PCT: self.tpr_01pct}[metric]

    @classmethod
    def among(cls, attacks: Iterable[AttackResult]) -> Strongest | None:
        """None when `attacks` is empty."""
        attacks = list(attacks)
        if not attacks:
            return None
        best = {}
        for metric in Metric:
            a = max(attacks, key=lambda r: r.attacker.value(metric))
            r = a.attacker
            best[metric] = Best(a.name, r.value(metric), r.ci95(metric), a.inverted,
                                None if metric == Metric.AUC else r.tpr(metric))
        return cls(best[Metric.AUC], best[Metric.TPR_1PCT], best[Metric.TPR_01PCT])


@dataclass(frozen=True)
class GapFloor(Result):
    """The gap attack's hard decision (member iff correctly classified): balanced accuracy and AUC."""

    balanced_accuracy: float
    auc: float


@dataclass(frozen=True)
class Utility(Result):
    """Accuracy on members and non-members; `cost`: the defense's cost to users, measured against
    the undefended answers (None when those were not available)."""

    member_accuracy: float
    nonmember_accuracy: float
    cost: OutputUtility | None = None


@dataclass(frozen=True)
class ShadowInfo(Result):
    """How the attacker's shadow models were made.

    Attributes:
        n, recipe, epochs: count and training recipe; target_family: the target's, if known.
        pool_size: the attacker's records; train_size: rows per shadow if the target's is known.
        reused: taken from an earlier audit of the same records.
        executor: where they trained (`purifier.executor`), trained / from_cache: how many each
            way, cache: the cache's statistics.
        retrained_for_label_queries, notes: shadows retrained in this process and warnings.
        in_shadows_per_record: min / median / max shadows holding an audited record IN (LiRA).
        fallbacks: {attack: why} for attacks that ran a weaker variant for want of shadows.
    """

    n: int
    recipe: str
    epochs: int | None
    seed: int
    target_family: str | None
    pool_size: int
    train_size: int | None
    reused: bool
    executor: dict | None
    trained: int
    from_cache: int
    cache: dict
    retrained_for_label_queries: tuple[int, ...]
    notes: tuple[str, ...]
    in_shadows_per_record: dict
    fallbacks: dict[str, str]

    def origin(self) -> str:
        """Where the shadow models came from: "12 trained on ray (2 workers), 52 from the cache"."""
        if self.reused:
            return "reused from an earlier audit of the same records"
        ex = self.executor
        if ex is None:
            return ""
        where = f"{ex['executor']} ({ex['workers']} workers)" if ex.get("workers") else ex["executor"]
        parts = [f"{self.trained} trained on {where}",
                 f"{self.from_cache} from the cache" if self.cache.get("enabled") else "cache off"]
        if self.cache.get("corrupt_retrained"):
            parts.append(f"{len(self.cache['corrupt_retrained'])} corrupt cache entries retrained")
        if self.retrained_for_label_queries:
            parts.append(f"{len(self.retrained_for_label_queries)} retrained here for label queries")
        return ", ".join(parts)

    @property
    def described(self) -> str:
        return self.recipe + (f", {self.epochs} epochs" if self.epochs else "")


@dataclass(frozen=True)
class Timing(Result):
    """Seconds: shadow training, the audit without the boundary attack, the boundary attack."""

    shadow_training: float
    audit_without_boundary: float
    boundary_attack: float | None = None


@dataclass(frozen=True)
class Assumptions(Result):
    """What the audit assumed (`purifier.audit.assumptions`): sizes per role, the shadow recipe
    against the target's family, what the attacker knows, and warnings."""

    evaluation_members: int
    evaluation_nonmembers: int
    attacker_pool: int
    target_training_set: int | None
    shadow_recipe: str
    target_family: str | None
    recipe_matches_target_family: bool | None
    attacker_knows: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Verdict(Result):
    """The verdict in words (`purifier.audit.verdict`), computed once per audit.

    Attributes:
        lines: the sentences, in order (report.md, the CLI and the demo print these).
        protected, not_protected, attacker, cannot_protect: report.html's first screen.
        confidence_leakage_removed: True / False, or None when the audit cannot decide (no floor,
            or within it with an attack family missing: `provisional`).
        notes: inverted signals, the distortion asymmetry, weaker variants and what is missing, said once.
        coverage: the attack families (`Coverage` kinds) run; missing: those a "removed" needs and
            that did not run.
        criteria: per `Metric`, the strongest non-label attack within the floor's 95% interval
            (true), above it (false), or not judged (null: not measurable).
    """

    lines: tuple[str, ...]
    protected: str
    not_protected: str
    attacker: str
    cannot_protect: tuple[str, ...]
    confidence_leakage_removed: bool | None
    notes: tuple[str, ...] = ()
    coverage: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    provisional: bool = False
    criteria: dict[str, bool | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Source(Result):
    """What was audited: `endpoint` is HOST:PORT or "in-process"; the model's name and output
    there, or the ONNX file; the undefended endpoint compared with, if any."""

    endpoint: str | None = None
    model_name: str | None = None
    output_name: str | None = None
    model: str | None = None
    baseline_endpoint: str | None = None


@dataclass(frozen=True)
class Report(Result):
    """One audit of one endpoint.

    Attributes:
        defense: the defense the endpoint is known to run ("none": undefended; "unknown").
        records: digest of the evaluation records (features, labels, membership, in order), so
            two reports can be checked to be on the same records.
        attacks: name -> result, in the order run; label_only_floor: the strongest label-only
            attack per metric (None when none ran).
        skipped: attacks left out and why.
        curves: the ROC of every attack a headline figure comes from (`RocPoints`, by attack name).
        baseline: the report of the same records on the undefended model (the "before"), when
            audited with `--baseline`; None otherwise.
    """

    dataset: str
    defense: str
    model_id: str | None
    records: str
    n_members: int
    n_nonmembers: int
    source: Source
    utility: Utility
    gap_floor: GapFloor
    attacks: dict[str, AttackResult]
    label_only_floor: Strongest | None
    shadows: ShadowInfo
    timing: Timing
    assumptions: Assumptions | None = None
    verdict: Verdict | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    curves: dict[str, RocPoints] = field(default_factory=dict)
    baseline: Report | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def undefended(self) -> bool:
        return self.defense == "none"

    def strongest(self, label_only: bool | None = None) -> Strongest | None:
        """Per metric, the strongest attack among all (None), the label-only ones (True) or the others."""
        return Strongest.among(a for a in self.attacks.values() if label_only is None or a.label_only == label_only)

    def headline(self) -> list[Best]:
        """Every `Best` a headline figure or the verdict reads: per metric over all attacks, the
        non-label ones and the label-only floor."""
        groups = (self.strongest(), self.strongest(label_only=False), self.label_only_floor)
        return [g.of(m) for g in groups if g is not None for m in Metric]

    @classmethod
    def from_json(cls, data: dict, where: str = "report.json") -> Report:
        """Read this schema version; another one fails in one line naming both."""
        version = data.get("schema_version", 1) if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise ConfigError(f"{where}: schema version {version} is not supported (this purifier reads version "
                              f"{SCHEMA_VERSION}); audit again with this purifier")
        try:
            return _decode(cls, data)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: not a report of schema version {SCHEMA_VERSION} ({e!r})") from None

    @classmethod
    def read(cls, path: str | Path) -> Report:
        """A report.json file, or a report directory holding one."""
        path = Path(path)
        path = path / "report.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the report ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not a report.json ({e.msg} at line {e.lineno})") from None
        return cls.from_json(data, str(path))


def _encode(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(tp, value):
    """`value` (plain JSON) as type `tp`: dataclasses field by field, enums by value, tuples and
    dicts item by item; fields missing from `value` take their defaults."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{tp.__name__}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _decode(hints[f.name], value[f.name])
                     for f in dataclasses.fields(tp) if f.init and f.name in value})
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        return tuple(_decode(a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        _, vt = typing.get_args(tp)
        return {k: _decode(vt, v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    return value


__all__ = ["FPR_TARGETS", "SCHEMA_VERSION", "TPR_METRICS", "Assumptions", "AttackResult", "Best", "GapFloor",
           "Metric", "Ranking", "Report", "Result", "RocPoints", "ShadowInfo", "Source", "Strongest", "Timing", "Tpr",
           "Utility", "Verdict"]
