"""Reports built from planted scores by the runner's own code (`attack_result`, `assemble`'s pieces),
for the verdict, html and sweep tests."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from purifier.attacks import attack_class
from purifier.audit.results import (
    Assumptions,
    AttackResult,
    GapFloor,
    Ranking,
    Report,
    ShadowInfo,
    Source,
    Strongest,
    Timing,
    Tpr,
    Utility,
)
from purifier.audit.runner import AttackOutcome, attack_result
from purifier.audit.verdict import verdict


def outcome(name: str, scores: np.ndarray, cls_name: str | None = None, details: dict | None = None) -> AttackOutcome:
    """The outcome of attack `name` (family and coverage of the registered attack `cls_name or name`)."""
    cls = attack_class(cls_name or name)
    thr = float(np.median(scores))
    return AttackOutcome(name, cls.family, cls.coverage, scores, scores >= thr, thr, len(scores), 0.1, details or {})


def entry(name: str, scores: np.ndarray, membership: np.ndarray, cls_name: str | None = None, n_boot: int = 50,
          details: dict | None = None):
    """An `AttackResult` from planted scores, as the runner computes it."""
    return attack_result(outcome(name, scores, cls_name, details), membership, n_boot, 0)


def figures(name: str, auc: float, tpr1: float, tpr01: float, negatives: int = 4000, half: float = 0.01,
            queries: int = 8000) -> AttackResult:
    """An `AttackResult` with these figures, each with a 95% interval of +-`half` (TPRs: +-half/2)."""
    cls = attack_class(name)

    def tpr(value, fpr):
        return Tpr(value, fpr, negatives, fpr * negatives >= 1, (max(0.0, value - half / 2), value + half / 2))

    r = Ranking(auc, (auc - half, auc + half), tpr(tpr1, 0.01), tpr(tpr01, 0.001))
    return AttackResult(name, cls.family, cls.coverage, r, 0.5, (0.49, 0.51), 0.5, queries, 1.0)


def shadows(n: int = 4, fallbacks: dict | None = None) -> ShadowInfo:
    return ShadowInfo(n=n, recipe="mlp", epochs=150, seed=0, target_family="mlp", pool_size=5000, train_size=400,
                      reused=False,
                      executor={"executor": "local", "workers": 2}, trained=n, from_cache=0, cache={"enabled": True},
                      retrained_for_label_queries=(), notes=(), in_shadows_per_record={"min": 0, "median": 2, "max": 4},
                      fallbacks=fallbacks or {})


def planted_report(attacks: dict, membership: np.ndarray | None = None, defense: str = "memguard",
                   n_shadows: int = 4, cost=None, dataset: str = "digits", correct: np.ndarray | None = None,
                   baseline: Report | None = None, fallbacks: dict | None = None, curves: dict | None = None) -> Report:
    """A `Report` around `attacks` (name -> AttackResult) with the floor and the verdict computed
    (`membership` None: 4,000 members and as many non-members)."""
    m = np.r_[np.ones(4000, bool), np.zeros(4000, bool)] if membership is None else np.asarray(membership, bool)
    n_m, n_n = int(m.sum()), int((~m).sum())
    gap = GapFloor(0.55, 0.55) if correct is None else GapFloor(
        0.5 * (correct[m].mean() + (~correct[~m]).mean()), 0.55)
    report = Report(
        dataset=dataset, defense=defense, model_id="ab" * 32, records="00" * 32, n_members=n_m, n_nonmembers=n_n,
        source=Source("127.0.0.1:8001", "digits"), utility=Utility(0.99, 0.95, cost), gap_floor=gap,
        attacks=dict(attacks), label_only_floor=Strongest.among(a for a in attacks.values() if a.label_only),
        shadows=shadows(n_shadows, fallbacks), timing=Timing(20.0, 31.0),
        assumptions=Assumptions(n_m, n_n, 5000, 400, "mlp", "mlp", True, ("queries",), ()),
        notes=("thresholds are fitted on shadow models",), baseline=baseline, curves=curves or {})
    return replace(report, verdict=verdict(report))
