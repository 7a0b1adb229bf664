"""Membership inference attacks: the `Attack` contract and a name -> class registry.

Each attack is constructed with keyword hyper-parameters (all defaulted) and `seed=`.
"""

from __future__ import annotations

import importlib

from purifier.attacks.base import (
    FAMILIES,
    Attack,
    AttackContext,
    ConfidenceAttack,
    Coverage,
    Family,
    LabelOnly,
    RememberedLabels,
)
from purifier.errors import ConfigError

# name -> "module:Class", in report order
REGISTRY: dict[str, str] = {
    "gap": "purifier.attacks.metric:GapAttack",
    "confidence": "purifier.attacks.metric:ConfidenceThreshold",
    "entropy": "purifier.attacks.metric:EntropyThreshold",
    "mentr": "purifier.attacks.metric:ModifiedEntropyThreshold",
    "loss": "purifier.attacks.metric:LossThreshold",
    "entropy_global": "purifier.attacks.metric:GlobalEntropyThreshold",
    "mentr_global": "purifier.attacks.metric:GlobalModifiedEntropyThreshold",
    "loss_global": "purifier.attacks.metric:GlobalLossThreshold",
    "nn": "purifier.attacks.nn:NNAttack",
    "nn_label": "purifier.attacks.nn:NNLabelAttack",
    "lira_online": "purifier.attacks.lira:LiRA",
    "lira_offline": "purifier.attacks.lira:LiRAOffline",
    "rmia": "purifier.attacks.rmia:RMIA",
    "label_calibrated": "purifier.attacks.calibrated:CalibratedLabelAttack",
    "label_augment": "purifier.attacks.label_only:AugmentationAttack",
    "label_augment_calibrated": "purifier.attacks.label_only:CalibratedAugmentationAttack",
    "label_boundary": "purifier.attacks.label_only:BoundaryAttack",
    "adaptive_nn": "purifier.attacks.adaptive:AdaptiveNN",
    "adaptive_mentr": "purifier.attacks.adaptive:AdaptiveMentr",
    "repeated_query": "purifier.attacks.repeated:RepeatedQueryAttack",
    "timing": "purifier.attacks.timing:TimingAttack",
}

ADAPTIVE = ("adaptive_nn", "adaptive_mentr")
# the default audit: everything but the (query-hungry) boundary attack and the timing attack
# (remote endpoints only, several passes of single-row requests)
DEFAULT_ATTACKS = tuple(n for n in REGISTRY if n not in ("label_boundary", "timing"))


def attack_class(name: str) -> type[Attack]:
    if name not in REGISTRY:
        raise ConfigError(f"attack: unknown attack {name!r}; choose from {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def parse_attacks(spec: list[str] | str | None) -> list[str]:
    """Attack names from a list or comma-separated string; 'all' = every attack; None = default."""
    if spec is None:
        return list(DEFAULT_ATTACKS)
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    names = [s.strip() for s in items if s.strip()]
    if names == ["all"]:
        return list(REGISTRY)
    for n in names:
        attack_class(n)
    if not names:
        raise ConfigError(f"attacks: empty list; choose from {', '.join(REGISTRY)}")
    return list(dict.fromkeys(names))


__all__ = ["ADAPTIVE", "DEFAULT_ATTACKS", "FAMILIES", "REGISTRY", "Attack", "AttackContext",
           "ConfidenceAttack", "Coverage", "Family", "LabelOnly", "RememberedLabels", "attack_class", "parse_attacks"]
