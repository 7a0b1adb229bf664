"""The audit: run membership inference attacks against a target and measure them honestly.

Records (`purifier.audit.data.AuditData`): evaluation members and non-members, and the attacker's
pool, from a target directory's splits or from the user's record files. The attacker's shadow
models train on the pool (plus the candidates, IN/OUT at random, for LiRA) with a recipe;
every attack is fitted on shadow data only, and its balanced accuracy uses its own shadow-fitted
threshold (the oracle best threshold is reported beside it, labelled as such). Every number sits
next to the label-only floor (the strongest label-only attack per metric; the gap attack of Yeom
et al. 2018 is one of them) and the utility cost on real traffic, and the verdict in words
(`purifier.audit.verdict`) is part of the report (`purifier.audit.results.Report`). Metrics come
from `purifier.evaluation` only. `run_audit` is four steps: query the records, get the shadow
models, run the attacks, assemble the report. Attack catalogue: docs/design.md#attacks.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace

import numpy as np

from purifier import evaluation as ev
from purifier.attacks import ADAPTIVE, REGISTRY, AttackContext, RememberedLabels, attack_class
from purifier.attacks.base import Coverage, Family
from purifier.attacks.shadow import DEFAULT_SHADOWS, ShadowRecipe, ShadowSet, train_shadows
from purifier.attacks.shadow_cache import ShadowCache
from purifier.audit.assumptions import assumptions
from purifier.audit.data import AuditData
from purifier.audit.results import (
    FPR_TARGETS,
    AttackResult,
    GapFloor,
    Ranking,
    Report,
    RocPoints,
    ShadowInfo,
    Source,
    Strongest,
    Timing,
    Tpr,
    Utility,
)
from purifier.audit.verdict import verdict
from purifier.errors import ConfigError, InvalidProbabilities
from purifier.executor import ExecutorSpec
from purifier.progress import Progress

NOTES = (
    "balanced_accuracy uses each attack's own threshold fitted on shadow models; "
    "oracle_balanced_accuracy picks the best threshold on the evaluation membership (an upper bound)",
    "tpr: 'fpr' is the realized FPR; 'measurable' is false when target FPR < 1/negatives "
    "(then the value is the TPR at zero false positives)",
)


@dataclass(frozen=True)
class AuditConfig:
    attacks: tuple[str, ...]
    n_shadows: int = DEFAULT_SHADOWS
    shadow_epochs: int | None = None  # default: the recipe's
    shadow_model: str | None = None  # a recipe name (purifier.attacks.shadow); default: the data's
    boundary_budget: int = 1000
    n_boot: int = 200
    seed: int = 0
    progress: bool = True
    executor: ExecutorSpec = ExecutorSpec()  # where shadows train: local processes (default) or Ray
    cache: bool = True  # reuse shadows an earlier audit trained (purifier.attacks.shadow_cache)
    cache_dir: str | None = None  # default: $PURIFIER_CACHE_DIR or ~/.cache/purifier/shadows

    def __post_init__(self):
        for name in self.attacks:
            attack_class(name)
        if self.n_shadows < 1:
            raise ConfigError(f"shadows: need at least 1 shadow model, got {self.n_shadows}")


@dataclass
class AttackOutcome:
    """One attack's scores on the evaluation records, its shadow-fitted decisions and costs."""

    name: str
    family: Family
    coverage: Coverage
    scores: np.ndarray
    predicted: np.ndarray
    threshold: float
    queries: int
    seconds: float
    details: dict = field(default_factory=dict)


@dataclass
class Audit:
    """The result: the typed `report`; outcomes and membership feed the plots; `outputs` (N, C)
    are the endpoint's answers to the evaluation records (an undefended audit's are the clean
    answers a later audit of a defended endpoint compares with)."""

    report: Report
    membership: np.ndarray
    outcomes: dict[str, AttackOutcome]
    shadows: ShadowSet | None = None  # the ShadowSet used, reusable by a later audit of the same target
    fitted: dict = field(default_factory=dict)  # name -> Attack fitted on `shadows`, reusable likewise
    outputs: np.ndarray | None = None


@dataclass(frozen=True)
class Queried:
    """The evaluation records (members first), their membership and the endpoint's answers (N, C);
    `clean` are the undefended answers when a baseline was queried."""

    X: np.ndarray
    y: np.ndarray
    membership: np.ndarray
    outputs: np.ndarray
    clean: np.ndarray | None


def ranking(scores: np.ndarray, membership: np.ndarray, n_boot: int, seed: int) -> Ranking:
    """AUC and TPR at each of FPR_TARGETS (realized FPR, negatives, measurable), each with its 95%
    bootstrap interval (one resampling serves all three)."""
    def figures(s, m):
        return (ev.roc_auc(s, m), *(ev.tpr_at_fpr(s, m, f).tpr for f in FPR_TARGETS))

    auc_ci, *tpr_cis = ev.bootstrap_intervals(figures, scores, membership, n_boot, seed)
    tprs = [ev.tpr_at_fpr(scores, membership, f) for f in FPR_TARGETS]
    return Ranking(ev.roc_auc(scores, membership), auc_ci,
                   *(Tpr(t.tpr, t.fpr, t.negatives, t.measurable, ci) for t, ci in zip(tprs, tpr_cis, strict=True)))


def attack_result(o: AttackOutcome, membership: np.ndarray, n_boot: int, seed: int) -> AttackResult:
    """The report entry of one attack (all metrics from purifier.evaluation). An attack whose AUC
    interval lies below 0.5 also gets `flipped`: the same metrics of its negated score, which is
    what an attacker would use (`purifier.audit.verdict`)."""
    thr = o.threshold
    own_ba = lambda s, m: ev.balanced_accuracy(s >= thr, m)  # noqa: E731
    r = ranking(o.scores, membership, n_boot, seed)
    return AttackResult(
        o.name, o.family, o.coverage, r, ev.balanced_accuracy(o.predicted, membership),
        ev.bootstrap_ci(own_ba, o.scores, membership, n_boot, seed),
        ev.best_balanced_accuracy(o.scores, membership)[0], int(o.queries), round(o.seconds, 3), dict(o.details),
        ranking(-o.scores, membership, n_boot, seed) if r.auc_ci95[1] < 0.5 else None)


def _check_outputs(outputs: np.ndarray, where: str) -> None:
    from purifier.models.access import not_probabilities
    from purifier.probabilities import check_probabilities

    try:
        check_probabilities(outputs)
    except InvalidProbabilities as e:
        raise not_probabilities(where, str(e)) from None


def records_digest(X: np.ndarray, y: np.ndarray, membership: np.ndarray) -> str:
    """Identity of the evaluation records in order (features as float32, labels, membership)."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(X, np.float32), np.asarray(y, np.int64), np.asarray(membership, np.bool_)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def evaluation_records(data: AuditData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X (N, D), y (N,) and membership (N,) of the evaluation records, members first."""
    X, y = np.concatenate([data.members.X, data.nonmembers.X]), np.concatenate([data.members.y, data.nonmembers.y])
    return X, y, np.r_[np.ones(len(data.members), bool), np.zeros(len(data.nonmembers), bool)]


def query(data: AuditData, access, baseline=None, clean: np.ndarray | None = None) -> Queried:
    """Step 1: the endpoint's answers to every evaluation record, and the undefended ones: `clean`
    as given (an earlier audit's), or asked of `baseline`."""
    X, y, membership = evaluation_records(data)
    outputs = access.query(X)
    _check_outputs(outputs, access.description or "the endpoint")
    if clean is None and baseline is not None:
        clean = baseline.query(X)
        _check_outputs(clean, "the baseline endpoint")
    return Queried(X, y, membership, outputs, clean)


def shadow_models(data: AuditData, q: Queried, recipe: ShadowRecipe, config: AuditConfig) -> ShadowSet:
    """Step 2: the attacker's shadow models, trained on its pool and the candidates (or cached)."""
    cache = ShadowCache(config.cache_dir, enabled=config.cache)
    shadows = train_shadows(data.pool.X, data.pool.y, q.X, q.y, data.n_classes, recipe, config.n_shadows, config.seed,
                            progress=config.progress, train_size=data.train_size, executor=config.executor,
                            cache=cache)
    shadows.provenance["cache"] = cache.stats.report()
    return shadows


def run_attacks(data: AuditData, access, q: Queried, shadows: ShadowSet, config: AuditConfig,
                defense_name: str | None, fitted: dict | None) -> tuple[dict[str, AttackOutcome], dict]:
    """Step 3: every attack of `config`, fitted on the shadows (or taken fitted from `fitted`,
    except the adaptive ones), run against `access`. Returns (outcomes, the fitted attacks)."""
    assert data.feature_range is not None  # AuditData fills it in
    ctx = AttackContext(shadows, data.n_classes, data.kind, data.image_shape, data.feature_range,
                        candidate_labels=q.y, defense_name=defense_name, seed=config.seed)
    outcomes: dict[str, AttackOutcome] = {}
    fitted_now: dict = {}
    asked = RememberedLabels(access)  # the augmentation attacks ask the same copies: sent once
    with Progress("attacks", len(config.attacks), enabled=config.progress) as bar:
        for name in config.attacks:
            cls = attack_class(name)
            t0 = time.perf_counter()
            attack = (fitted or {}).get(name) if name not in ADAPTIVE else None
            if attack is None:
                kwargs = {"budget": config.boundary_budget} if name == "label_boundary" else {}
                attack = cls(seed=config.seed, **kwargs)
                attack.fit(ctx)
            fitted_now[name] = attack
            scores = np.asarray(attack.run(asked, q.X, q.y, q.outputs), np.float64)
            outcomes[name] = AttackOutcome(name, cls.family, cls.coverage, scores, attack.predict(scores),
                                           attack.threshold, attack.queries, time.perf_counter() - t0, attack.details)
            bar.update(1, last=name)
    return outcomes, fitted_now


def roc_points(scores: np.ndarray, membership: np.ndarray) -> RocPoints:
    """The ROC of `scores` sampled at a log grid of false-positive rates from 1/negatives and a
    linear one: at each, the last ROC point whose FPR does not exceed it (a step of the curve)."""
    fpr, tpr, _ = ev.roc_curve(scores, membership)
    negatives = int((~membership).sum())
    grid = np.r_[0.0, np.logspace(np.log10(1.0 / negatives), 0.0, 80), np.linspace(0.0, 1.0, 41)]
    idx = np.unique(np.searchsorted(fpr, np.sort(grid) + 1e-12, side="right") - 1)
    return RocPoints(tuple(round(float(v), 6) for v in fpr[idx]), tuple(round(float(v), 6) for v in tpr[idx]))


def headline_curves(report: Report, outcomes: dict[str, AttackOutcome], membership: np.ndarray) -> dict:
    """The ROC of every attack a headline figure comes from, as an attacker uses it."""
    names = dict.fromkeys(b.attack for b in report.headline())
    return {n: roc_points(-outcomes[n].scores if report.attacks[n].inverted else outcomes[n].scores, membership)
            for n in names}


def assemble(data: AuditData, q: Queried, config: AuditConfig, recipe: ShadowRecipe, shadows: ShadowSet,
             outcomes: dict[str, AttackOutcome], defense_name: str | None, source: Source, reused: bool,
             timing: Timing, skipped: dict[str, str] | None = None, baseline: Report | None = None) -> Report:
    """Step 4: the report: metrics of every attack, the floor, utility, provenance, assumptions,
    the headline curves, the undefended audit's report beside it (`baseline`), and the verdict
    computed once from them."""
    attacks = {name: attack_result(o, q.membership, config.n_boot, config.seed) for name, o in outcomes.items()}
    correct = q.outputs.argmax(axis=1) == q.y
    cost = None if q.clean is None else ev.output_utility(q.clean, q.outputs, q.y, q.membership)
    desc = recipe.describe()
    models = shadows.models
    n_in = shadows.cand_in.sum(axis=0)  # per audited record: the shadows that trained on it (LiRA's IN)
    prov = shadows.provenance
    info = ShadowInfo(
        n=config.n_shadows if not reused else shadows.n_shadows, recipe=desc["recipe"], epochs=desc.get("epochs"),
        seed=config.seed,
        target_family=data.model_family, pool_size=len(data.pool), train_size=data.train_size, reused=reused,
        executor=prov.get("executor"), trained=prov.get("trained", 0), from_cache=prov.get("from_cache", 0),
        cache=prov.get("cache", {}), retrained_for_label_queries=tuple(getattr(models, "retrained", ())),
        notes=tuple(getattr(models, "notes", ())),
        in_shadows_per_record={"min": int(n_in.min()), "median": float(np.median(n_in)), "max": int(n_in.max())},
        fallbacks=shadow_fallbacks(outcomes))
    report = Report(
        dataset=data.name, defense=defense_name or "unknown", model_id=data.model_id,
        records=records_digest(q.X, q.y, q.membership), n_members=int(q.membership.sum()),
        n_nonmembers=int((~q.membership).sum()), source=source,
        utility=Utility(float(correct[q.membership].mean()), float(correct[~q.membership].mean()), cost),
        gap_floor=GapFloor(**ev.gap_floor(correct, q.membership)), attacks=attacks,
        label_only_floor=Strongest.among(a for a in attacks.values() if a.label_only), shadows=info,
        timing=timing, assumptions=None, skipped=dict(skipped or {}), notes=NOTES, baseline=baseline)
    report = replace(report, assumptions=assumptions(report, data, defense_name),
                     curves=headline_curves(report, outcomes, q.membership))
    return replace(report, verdict=verdict(report))


def run_audit(data, access, config: AuditConfig, defense_name: str | None = None,
              baseline=None, source: Source | None = None, shadows: ShadowSet | None = None,
              fitted: dict | None = None, skipped: dict[str, str] | None = None,
              before: Audit | Report | None = None) -> Audit:
    """Audit `access` (a TargetAccess answering for the model behind `data`).

    Args:
        data: the `AuditData` (records per role, what is known about the target); a `Target`
            directory is converted with `AuditData.from_target`.
        access: the endpoint (possibly defended) under audit.
        defense_name: the defense algorithm the attacker assumes (adaptive attacks).
        baseline: optional undefended TargetAccess for argmax agreement and L1 distortion.
        source: what was audited (endpoint, model name), for the report.
        shadows: a `ShadowSet` from an earlier audit of the same records (`Audit.shadows`), reused
            instead of training new shadow models (the attacker's models do not depend on the
            defense under audit; adaptive attacks apply their defense copy to them).
        fitted: `Audit.fitted` of that earlier audit: its attacks, fitted on those shadow models,
            are reused instead of fitted again, except the adaptive ones (they fit on the shadows'
            outputs through the defense under audit). A budget sweep fits each attack once.
        skipped: attacks left out and why, for the report.
        before: the undefended model's audit on the same records: its report becomes this one's
            `baseline` (the "before"); an `Audit` also lends its answers (the cost to users), its
            shadows and its fitted attacks; a `Report` (read from an earlier report.json) only
            itself. Either is checked to be on the same records.
    """
    if not isinstance(data, AuditData):
        data = AuditData.from_target(data)
    before_report = before.report if isinstance(before, Audit) else before
    if before_report is not None:
        check_same_records(before_report, data)
    if isinstance(before, Audit):
        shadows, fitted = shadows or before.shadows, fitted or before.fitted
    t_start = time.perf_counter()
    if access.n_classes != data.n_classes:
        raise ConfigError(f"class-count mismatch: the endpoint answers {access.n_classes} classes, "
                          f"the records have {data.n_classes}")
    wanted_adaptive = [a for a in config.attacks if a in ADAPTIVE]
    if wanted_adaptive and not defense_name:
        raise ConfigError(f"attacks {', '.join(wanted_adaptive)} need --defense-name (the defense "
                          "algorithm the attacker assumes)")
    recipe = data.recipe(config.shadow_model, config.shadow_epochs)
    q = query(data, access, baseline, before.outputs if isinstance(before, Audit) else None)
    t0 = time.perf_counter()
    reused = shadows is not None
    if shadows is None:
        shadows = shadow_models(data, q, recipe, config)
    shadow_seconds = time.perf_counter() - t0
    outcomes, fitted_now = run_attacks(data, access, q, shadows, config, defense_name, fitted if reused else None)
    boundary_s = outcomes["label_boundary"].seconds if "label_boundary" in outcomes else None
    timing = Timing(round(shadow_seconds, 2), round(time.perf_counter() - t_start - (boundary_s or 0.0), 2),
                    None if boundary_s is None else round(boundary_s, 2))
    report = assemble(data, q, config, recipe, shadows, outcomes, defense_name, source or Source(), reused, timing,
                      skipped, before_report)
    return Audit(report, q.membership, outcomes, shadows, fitted_now, q.outputs)


def check_same_records(before: Report, data: AuditData) -> None:
    """The undefended report was made on these evaluation records (by digest), else one line."""
    digest = records_digest(*evaluation_records(data))
    if before.records != digest:
        raise ConfigError(f"--baseline: that report was audited on other evaluation records (digest "
                          f"{before.records[:12]}..., these records {digest[:12]}...); audit the undefended model on "
                          "these records, or give its report on them")
    if not before.undefended:
        raise ConfigError(f"--baseline: that report audited an endpoint with defense {before.defense!r}, not the "
                          "undefended model (its report says defense none)")


def run_before_after(data, access, undefended, config: AuditConfig, defense_name: str | None,
                     source: Source | None = None, skipped: dict[str, str] | None = None) -> tuple[Audit, Audit]:
    """The undefended model (`undefended`, a TargetAccess) and the defended endpoint (`access`),
    the same attacks with the same shadow models: (before, after); after's report holds before's
    as its `baseline`. The adaptive attacks run on the defended endpoint only (there is nothing
    to adapt to before)."""
    source = source or Source()
    plain = replace(config, attacks=tuple(a for a in config.attacks if a not in ADAPTIVE))
    where = source.endpoint if source.endpoint == "in-process" else source.baseline_endpoint
    before = run_audit(data, undefended, plain, "none", source=Source(
        where, getattr(undefended, "model_name", source.model_name), getattr(undefended, "output_name", None),
        source.model))
    after = run_audit(data, access, config, defense_name, source=source, skipped=skipped, before=before)
    return before, after


def shadow_fallbacks(outcomes: dict[str, AttackOutcome]) -> dict[str, str]:
    """{attack: why} for the attacks that ran a weaker variant because the shadow models were too
    few, read from the choices each recorded in its details (`purifier.attacks.reference_stats`:
    one global variance, offline instead of online, a fixed threshold with nothing to hold out)."""
    out = {}
    for name, o in outcomes.items():
        d, why = o.details, []
        chosen = "chosen by the caller"
        if d.get("variance") == "fixed (global)" and d.get("variance_reason", chosen) != chosen:
            why.append(d["variance_reason"])
        if d.get("variant") == "offline" and str(d.get("variant_reason", "")).startswith("offline: only"):
            why.append(d["variant_reason"])
        if str(d.get("threshold_from", "")).startswith("fixed"):
            why.append(f"threshold: {d['threshold_from']}")
        if why:
            out[name] = "; ".join(why)
    return out


__all__ = ["REGISTRY", "Audit", "AuditConfig", "AttackOutcome", "Queried", "assemble", "attack_result",
           "check_same_records", "evaluation_records", "headline_curves", "query", "ranking", "records_digest",
           "roc_points", "run_attacks", "run_audit", "run_before_after", "shadow_models"]
