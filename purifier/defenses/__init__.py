"""Defenses: the `Defense` contract and a name -> class registry.

Heavy defenses are imported lazily so that `purifier.defenses` stays cheap to import.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from purifier.defenses.base import Defense, FitData, IdentityDefense, Knob, read_defense_manifest
from purifier.defenses.fingerprint import Fingerprint
from purifier.defenses.keyed import load_secret
from purifier.defenses.no_op import ReferenceSample, refuse_no_op
from purifier.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

# name -> "module:Class"; a defense is listed here only once it is implemented.
REGISTRY: dict[str, str] = {
    "none": "purifier.defenses.base:IdentityDefense",
    "memguard": "purifier.defenses.memguard:MemGuard",
    "purifier": "purifier.defenses.purifier_net:PurifierNet",
    "label_only": "purifier.defenses.baselines:LabelOnly",
    "top_k": "purifier.defenses.baselines:TopK",
    "round": "purifier.defenses.baselines:Rounded",
    "noise": "purifier.defenses.baselines:Noise",
}


def defense_class(name: str) -> type[Defense]:
    if name not in REGISTRY:
        raise ConfigError(f"defense: unknown defense {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def tunable_defenses() -> dict[str, type[Defense]]:
    """name -> class of every registered defense with a budget to tune (`Defense.knob`)."""
    return {n: c for n, c in ((n, defense_class(n)) for n in REGISTRY) if c.knob is not None}


def baseline_defenses() -> dict[str, type[Defense]]:
    """name -> class of the simple alternatives on every tune curve (`Defense.baseline_grid`)."""
    return {n: c for n, c in ((n, defense_class(n)) for n in REGISTRY) if c.baseline_grid}


def load_defense(directory: str | Path, secret: bytes | None = None,
                 model_id: str | None = None, *, check_secret: bool = True, config: dict | None = None) -> Defense:
    """Load a fitted defense from `directory` (checks hashes, class count, model identity and secret),
    and refuse it if it changes nothing (`purifier.defenses.no_op`).

    Args:
        secret: the PRF key for defenses that use keyed randomness; refused (ConfigError) if it is
            not the secret the defense was fitted with (its key check value in defense.json).
        model_id: if given, the sha256 of the model the defense must have been fitted for.
        check_secret: False for a throwaway secret that is meant to differ (an audit in process
            without the served secret: the privacy figures hold for any secret).
        config: settings to load it with instead of the saved ones (what `purifier tune --write-to`
            is about to write), checked like the saved ones.
    A defense fitted before defense.json recorded the key check value loads with a WARNING: its
    secret cannot be checked.
    """
    manifest = read_defense_manifest(directory)
    if model_id is not None and manifest["model_id"] and manifest["model_id"] != model_id:
        raise ArtifactError(
            f"{directory}: defense was fitted for model {manifest['model_id'][:12]}..., "
            f"not {model_id[:12]}... (refit it for this model)"
        )
    if manifest["defense"] != "none" and check_secret:
        _check_secret(directory, manifest, secret)
    if config:
        manifest = {**manifest, "config": {**manifest["config"], **config}}
    cls = defense_class(manifest["defense"])
    defense = cls.from_manifest(Path(directory), manifest, secret)
    if isinstance(manifest.get("fingerprint"), dict):  # defenses fitted before fingerprints have none
        defense.fingerprint = Fingerprint.load(Path(directory), manifest["fingerprint"])
    defense.reference_sample = _reference_sample(Path(directory), manifest, defense)
    refuse_no_op(defense, defense.reference_sample, str(directory),
                 f"refit it with a setting that changes them, or write one into it with purifier tune "
                 f"{defense.name} --write-to {directory}")
    return defense


def _reference_sample(directory: Path, manifest: dict, defense: Defense) -> ReferenceSample | None:
    """The saved reference sample; for directories fitted before it existed, the fingerprint's rows.
    A defense (other than `none`) with neither is refused: the no-op rule must not be skipped by
    deleting the rows it is checked on."""
    if isinstance(manifest.get("reference_sample"), dict):
        return ReferenceSample.load(directory, manifest["reference_sample"])
    fp = defense.fingerprint
    if fp is None and defense.name != "none":
        raise ConfigError(f"{directory}: defense.json lists no reference sample (nor fingerprint) to check that the "
                          f"{defense.name} defense changes the model's answers (written by hand, or edited); refit it "
                          f"with purifier fit-defense {defense.name}")
    return None if fp is None else ReferenceSample(fp.probs, fp.inputs if defense.needs_inputs else None)


def _check_secret(directory, manifest: dict, secret: bytes | None) -> None:
    """Refuse a secret whose key check value differs from the one the defense was fitted with."""
    from purifier.defenses.keyed import key_check_value

    recorded = manifest.get("secret_check")
    if recorded is None:
        log.warning("%s was fitted before defenses recorded their secret's key check value: the secret it is "
                    "loaded with cannot be checked against the one it was fitted with; refit it to bind it",
                    directory)
    elif secret is not None and key_check_value(secret) != recorded:
        raise ConfigError(f"secret: {directory} was fitted with another PRF secret (its key check value differs); "
                          "serve it with the secret it was fitted with, or refit it with this one")


__all__ = ["Defense", "FitData", "Fingerprint", "IdentityDefense", "Knob", "REGISTRY", "baseline_defenses",
           "defense_class", "load_defense", "load_secret", "tunable_defenses"]
