"""The audit: run membership inference attacks against a target and measure them honestly.

Records (`purifier.audit.data.AuditData`): evaluation members and non-members, and the attacker's
pool, from a target directory's splits or from the user's record files. The attacker's shadow
models train on the pool (plus the candidates, IN/OUT at random, for LiRA) with a recipe;
every attack is fitted on shadow data only, and its balanced accuracy uses its own shadow-fitted
threshold (the oracle best threshold is reported beside it, labelled as such). Every number sits
next to the label-only floor (the strongest label-only attack per metric; the gap attack of Yeom
et al. 2018 is one of them) and the utility cost on real traffic, and the verdict in words
(`purifier.audit.verdict`) is part of the report. Metrics come from `purifier.evaluation` only.
Attack catalogue: docs/design.md#attacks.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from purifier import evaluation as ev
from purifier.attacks import ADAPTIVE, REGISTRY, AttackContext, attack_class
from purifier.attacks.reference_stats import PER_EXAMPLE_VARIANCE_MIN
from purifier.attacks.shadow import train_shadows
from purifier.attacks.shadow_cache import ShadowCache
from purifier.audit.assumptions import assumptions
from purifier.audit.data import AuditData
from purifier.audit.verdict import label_only_floor, verdict
from purifier.errors import ConfigError, InvalidProbabilities
from purifier.executor import ExecutorSpec
from purifier.progress import Progress

FPR_TARGETS = (0.001, 0.01)


@dataclass(frozen=True)
class AuditConfig:
    attacks: tuple[str, ...]
    n_shadows: int = 4
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
    family: str
    scores: np.ndarray
    predicted: np.ndarray
    threshold: float
    queries: int
    seconds: float
    details: dict = field(default_factory=dict)


@dataclass
class Audit:
    """The result: `report` is the JSON document; outcomes and membership feed the plots."""

    report: dict
    membership: np.ndarray
    outcomes: dict[str, AttackOutcome]
    shadows: object = None  # the ShadowSet used, reusable by a later audit of the same target
    fitted: dict = field(default_factory=dict)  # name -> Attack fitted on `shadows`, reusable likewise


def ranking_metrics(scores: np.ndarray, membership: np.ndarray, n_boot: int, seed: int) -> dict:
    """AUC, TPR at each of FPR_TARGETS (with realized FPR, negatives, measurable) and their 95%
    bootstrap intervals (the TPR interval at 1% FPR is what the verdict compares with the floor)."""
    tprs = {}
    for target_fpr in FPR_TARGETS:
        t = ev.tpr_at_fpr(scores, membership, target_fpr)
        tprs[str(target_fpr)] = {"tpr": t.tpr, "fpr": t.fpr, "negatives": t.negatives, "measurable": t.measurable}
    tpr_1 = lambda s, m: ev.tpr_at_fpr(s, m, 0.01).tpr  # noqa: E731
    return {"auc": ev.roc_auc(scores, membership), "tpr_at_fpr": tprs,
            "ci95": {"auc": list(ev.bootstrap_ci(ev.roc_auc, scores, membership, n_boot, seed)),
                     "tpr_at_0.01": list(ev.bootstrap_ci(tpr_1, scores, membership, n_boot, seed))}}


def attack_metrics(o: AttackOutcome, membership: np.ndarray, n_boot: int, seed: int) -> dict:
    """The report entry of one attack (all metrics from purifier.evaluation). An attack whose AUC
    interval lies below 0.5 also gets `inverted`: the same metrics of its negated score, which is
    what an attacker would use (`purifier.audit.verdict`)."""
    thr = o.threshold
    own_ba = lambda s, m: ev.balanced_accuracy(s >= thr, m)  # noqa: E731
    ranking = ranking_metrics(o.scores, membership, n_boot, seed)
    entry = {
        "family": o.family,
        "auc": ranking["auc"],
        "balanced_accuracy": ev.balanced_accuracy(o.predicted, membership),
        "oracle_balanced_accuracy": ev.best_balanced_accuracy(o.scores, membership)[0],
        "tpr_at_fpr": ranking["tpr_at_fpr"],
        "ci95": {**ranking["ci95"],
                 "balanced_accuracy": list(ev.bootstrap_ci(own_ba, o.scores, membership, n_boot, seed))},
        "queries": int(o.queries),
        "seconds": round(o.seconds, 3),
        "threshold_from": "shadow models",
        **({"details": o.details} if o.details else {}),
    }
    if entry["ci95"]["auc"][1] < 0.5:
        entry["inverted"] = ranking_metrics(-o.scores, membership, n_boot, seed)
    return entry


def _check_outputs(outputs: np.ndarray, where: str) -> None:
    from purifier.defenses.base import check_probabilities

    try:
        check_probabilities(outputs)
    except InvalidProbabilities as e:
        raise ConfigError(f"{where} does not answer probability vectors ({e}); "
                          "choose the probabilities output with --output-name") from None


def utility(outputs: np.ndarray, y: np.ndarray, membership: np.ndarray,
            baseline: np.ndarray | None) -> dict:
    """Member / non-member accuracy; argmax agreement and L1 distortion versus the baseline."""
    correct = outputs.argmax(axis=1) == y
    out = {"member_accuracy": float(correct[membership].mean()),
           "nonmember_accuracy": float(correct[~membership].mean()),
           "argmax_agreement": None, "mean_l1": None, "max_l1": None}
    if baseline is not None:
        l1 = ev.l1_distortion(baseline, outputs)
        out.update(argmax_agreement=float((baseline.argmax(axis=1) == outputs.argmax(axis=1)).mean()),
                   mean_l1=float(l1.mean()), max_l1=float(l1.max()))
    return out


def run_audit(data, access, config: AuditConfig, defense_name: str | None = None,
              baseline=None, info: dict | None = None, shadows=None, fitted: dict | None = None) -> Audit:
    """Audit `access` (a TargetAccess answering for the model behind `data`).

    Args:
        data: the `AuditData` (records per role, what is known about the target); a `Target`
            directory is converted with `AuditData.from_target`.
        access: the endpoint (possibly defended) under audit.
        defense_name: the defense algorithm the attacker assumes (adaptive attacks).
        baseline: optional undefended TargetAccess for argmax agreement and L1 distortion.
        info: extra top-level report fields (endpoint, model name, ...).
        shadows: a `ShadowSet` from an earlier audit of the same records (`Audit.shadows`), reused
            instead of training new shadow models (the attacker's models do not depend on the
            defense under audit; adaptive attacks apply their defense copy to them).
        fitted: `Audit.fitted` of that earlier audit: its attacks, fitted on those shadow models,
            are reused instead of fitted again, except the adaptive ones (they fit on the shadows'
            outputs through the defense under audit). A budget sweep fits each attack once.
    """
    if not isinstance(data, AuditData):
        data = AuditData.from_target(data)
    t_start = time.perf_counter()
    if access.n_classes != data.n_classes:
        raise ConfigError(f"class-count mismatch: the endpoint answers {access.n_classes} classes, "
                          f"the records have {data.n_classes}")
    wanted_adaptive = [a for a in config.attacks if a in ADAPTIVE]
    if wanted_adaptive and not defense_name:
        raise ConfigError(f"attacks {', '.join(wanted_adaptive)} need --defense-name (the defense "
                          "algorithm the attacker assumes)")
    recipe = data.recipe(config.shadow_model, config.shadow_epochs)
    X, y = np.concatenate([data.members.X, data.nonmembers.X]), np.concatenate([data.members.y, data.nonmembers.y])
    membership = np.r_[np.ones(len(data.members), bool), np.zeros(len(data.nonmembers), bool)]
    outputs = access.query(X)
    _check_outputs(outputs, access.description or "the endpoint")
    base_out = None
    if baseline is not None:
        base_out = baseline.query(X)
        _check_outputs(base_out, "the baseline endpoint")
    util = utility(outputs, y, membership, base_out)
    users = None if base_out is None else ev.output_utility(base_out, outputs, y, membership)
    floor = ev.gap_floor(outputs.argmax(axis=1) == y, membership)

    pool = data.pool
    t0 = time.perf_counter()
    reused = shadows is not None
    if not reused:
        cache = ShadowCache(config.cache_dir, enabled=config.cache)
        shadows = train_shadows(pool.X, pool.y, X, y, data.n_classes, recipe, config.n_shadows, config.seed,
                                progress=config.progress, train_size=data.train_size, executor=config.executor,
                                cache=cache)
        shadows.provenance["cache"] = cache.stats.report()
    shadow_seconds = time.perf_counter() - t0
    ctx = AttackContext(shadows, data.n_classes, data.kind, data.image_shape, data.feature_range,
                        candidate_labels=y, defense_name=defense_name, seed=config.seed)

    outcomes: dict[str, AttackOutcome] = {}
    fitted_now: dict = {}
    with Progress("attacks", len(config.attacks), enabled=config.progress) as bar:
        for name in config.attacks:
            cls = attack_class(name)
            t0 = time.perf_counter()
            attack = (fitted or {}).get(name) if reused and name not in ADAPTIVE else None
            if attack is None:
                kwargs = {"budget": config.boundary_budget} if name == "label_boundary" else {}
                attack = cls(seed=config.seed, **kwargs)
                attack.fit(ctx)
            fitted_now[name] = attack
            scores = np.asarray(attack.run(access, X, y, outputs), np.float64)
            outcomes[name] = AttackOutcome(name, cls.family, scores, attack.predict(scores), attack.threshold,
                                           attack.queries, time.perf_counter() - t0, attack.details)
            bar.update(1, last=name)

    fallbacks = shadow_fallbacks(outcomes)
    if fallbacks and config.progress:  # the report and its summary always say so; sweeps run quiet
        print(f"purifier: {shadows.n_shadows} shadow models are too few for {', '.join(fallbacks)} at full strength, "
              f"which fell back ({next(iter(fallbacks.values()))}); more --shadows lift this (LiRA needs "
              f"{PER_EXAMPLE_VARIANCE_MIN} or more; report: shadows.fallbacks)", file=sys.stderr, flush=True)
    attacks = {name: attack_metrics(o, membership, config.n_boot, config.seed) for name, o in outcomes.items()}
    confidence = [n for n, o in outcomes.items() if o.family == "confidence"]
    strongest = max(confidence, key=lambda n: attacks[n]["auc"]) if confidence else None
    boundary_s = outcomes["label_boundary"].seconds if "label_boundary" in outcomes else None
    report = {
        "defense": defense_name or "unknown",
        "dataset": data.name,
        **(info or {}),
        "model_id": data.model_id,
        "n_members": int(membership.sum()),
        "n_nonmembers": int((~membership).sum()),
        "utility": util,
        **({"output_utility": users} if users is not None else {}),
        "gap_floor": floor,
        "label_only_floor": label_only_floor(attacks),
        "attacks": attacks,
        "strongest_confidence_attack": strongest,
        "shadows": {"n": config.n_shadows, **recipe.describe(), "target_family": data.model_family,
                    "pool_size": len(pool), "train_size": data.train_size,
                    "reused_from_earlier_audit": reused,
                    "candidates_in_shadow_training": "random, independent of membership (LiRA)",
                    **shadow_provenance(shadows), "fallbacks": fallbacks},
        "timing_s": {
            "shadow_training": round(shadow_seconds, 2),
            "audit_without_boundary": round(time.perf_counter() - t_start - (boundary_s or 0.0), 2),
            "boundary_attack": None if boundary_s is None else round(boundary_s, 2),
        },
        "notes": [
            "balanced_accuracy uses each attack's own threshold fitted on shadow models; "
            "oracle_balanced_accuracy picks the best threshold on the evaluation membership (an upper bound)",
            "tpr_at_fpr: 'fpr' is the realized FPR; 'measurable' is false when target FPR < 1/negatives "
            "(then the value is the TPR at zero false positives)",
        ],
    }
    report["assumptions"] = assumptions(report, data, defense_name)
    report["verdict"] = verdict(report)
    return Audit(report, membership, outcomes, shadows, fitted_now)


def shadow_provenance(shadows) -> dict:
    """How the shadows were made, for the report: executor, cache hits, shadows retrained in this
    process for label queries (recipes without an array form), any warning about them, and how
    many shadows hold each audited record IN (K/2 before the cut to the target's training-set
    size; about K * train_size / (pool + records) after it)."""
    models = shadows.models
    n_in = shadows.cand_in.sum(axis=0)  # per audited record: the shadows that trained on it (LiRA's IN)
    return {**shadows.provenance, "retrained_for_label_queries": list(getattr(models, "retrained", [])),
            "notes": list(getattr(models, "notes", [])),
            "in_shadows_per_record": {"min": int(n_in.min()), "median": float(np.median(n_in)),
                                      "max": int(n_in.max())}}


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


__all__ = ["FPR_TARGETS", "REGISTRY", "Audit", "AuditConfig", "AttackOutcome", "attack_metrics", "run_audit",
           "utility"]
