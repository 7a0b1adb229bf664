"""A defense that does nothing is refused: at fit time, and again whenever a fitted directory is loaded.

`memguard --epsilon 0`, `top_k` with k = the class count, `round` with 15 decimals, `noise` with
scale 0 (and any future defense at a setting that changes nothing) would serve the model's own
confidence vectors while the deployment believes it is defended. One rule covers them all,
without knowing any defense: apply the defense to a fixed sample of the reference rows it was
fitted on (`ReferenceSample`, saved in the directory and hashed in defense.json like its other
files) and refuse when it leaves `NO_OP_SHARE` (99%) or more of them unchanged. `none` is exempt:
it is chosen by name, on purpose.

"Unchanged" means every entry within UNCHANGED_ATOL = 2**-23 (about 1.2e-7) of the clean row's:
one float32 step at 1.0, the precision at which a client of a float32 model (the common case, and
what the sidecar answers such a model with) reads the entries that carry the answer. Bitwise
identity at float32 is not enough: float32 keeps 7 significant digits of a 1e-11 entry, so rounding
to 15 decimals, which moves entries by 5e-16 and leaves the answer as it was, would count as a
change on any confident model. A tolerance of one float32 step refuses that and every other setting
whose changes are all smaller (`round` with 7 or more decimals, noise of scale 1e-9), and
nothing that moves an entry by more: how much a larger change protects is for `purifier tune` to
measure, not for this rule. The clean row is compared after the renormalization every defense
applies, so renormalization alone is never a change.

Directories fitted before the sample existed fall back to the rows of their model fingerprint
(`purifier.defenses.fingerprint`, a handful of reference rows); a directory with neither is refused
by `load_defense`, so the rule cannot be skipped by deleting the rows it is checked on. Rows the
library would draw itself (seeded probability vectors of the class count) were considered as a
floor and left out: they are not the model's answers, and on them MemGuard at its smallest tuned
epsilon leaves most rows unchanged (its release coin depends on how far a row is from the
membership classifier's boundary), so they would refuse settings the real sample accepts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from purifier.errors import ArtifactError, ConfigError


class Defense(Protocol):
    """What the no-op rule asks of a defense (`purifier.defenses.base.Defense` has it); a protocol
    here because `base` calls this module, so importing `base` back would make a cycle."""

    @property
    def name(self) -> str: ...

    @property
    def needs_inputs(self) -> bool: ...

    def transform(self, probs: np.ndarray, inputs: np.ndarray | None = None) -> np.ndarray: ...

    def config(self) -> dict[str, Any]: ...

SAMPLE_FILE = "reference_sample.npz"
SAMPLE_ROWS = 256
NO_OP_SHARE = 0.99
UNCHANGED_ATOL = 2.0 ** -23  # one float32 step at 1.0 (see the module docstring)


@dataclass(frozen=True)
class ReferenceSample:
    """Reference rows a defense was fitted on: `probs` (K, C) float64, the model's answers, and
    `inputs` (K, D) float32 for defenses that read the request's rows (else None)."""

    probs: np.ndarray
    inputs: np.ndarray | None = None

    def __post_init__(self):
        if self.probs.ndim != 2 or not len(self.probs) or (
                self.inputs is not None and (self.inputs.ndim != 2 or len(self.inputs) != len(self.probs))):
            raise ArtifactError(f"reference sample: probs {self.probs.shape} and inputs "
                                f"{None if self.inputs is None else self.inputs.shape} must be (K, C) and (K, D)")

    @classmethod
    def from_rows(cls, probs: np.ndarray, inputs: np.ndarray | None = None, rows: int = SAMPLE_ROWS) -> ReferenceSample:
        """`rows` evenly spaced rows of (R, C) reference answers and, if given, their (R, D) inputs."""
        idx = np.unique(np.linspace(0, len(probs) - 1, min(rows, len(probs))).round().astype(np.int64))
        return cls(np.asarray(probs[idx], np.float64),
                   None if inputs is None else np.ascontiguousarray(inputs[idx], np.float32))

    def save(self, directory: Path) -> tuple[list[str], dict]:
        """Write SAMPLE_FILE into `directory`; returns (files written, the manifest entry)."""
        if self.inputs is None:
            np.savez(directory / SAMPLE_FILE, probs=self.probs)
        else:
            np.savez(directory / SAMPLE_FILE, probs=self.probs, inputs=self.inputs)
        return [SAMPLE_FILE], {"file": SAMPLE_FILE, "rows": int(len(self.probs))}

    @classmethod
    def load(cls, directory: Path, entry: dict) -> ReferenceSample:
        """Read the file a manifest entry names (already hash-checked by the caller)."""
        path = Path(directory) / str(entry.get("file", SAMPLE_FILE))
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["probs"].astype(np.float64), z["inputs"].astype(np.float32) if "inputs" in z.files else None)
        except (OSError, KeyError, ValueError) as e:
            raise ArtifactError(f"{path}: cannot read the reference sample ({e})") from None


def unchanged_rows(defense: Defense, probs: np.ndarray, inputs: np.ndarray | None = None) -> np.ndarray:
    """(K,) bool: the rows of `probs` (K, C) that `defense` leaves unchanged, every entry within
    UNCHANGED_ATOL of the clean (renormalized) row."""
    clean = probs / probs.sum(axis=1, keepdims=True)
    out = np.asarray(defense.transform(probs, inputs if defense.needs_inputs else None), np.float64)
    return np.abs(out - clean).max(axis=1) <= UNCHANGED_ATOL


def changed_settings(defense: Defense) -> str:
    """The settings that differ from the defense's defaults, its budget (`Defense.knob`) first, e.g.
    "epsilon=0 (default 1)"."""
    params = inspect.signature(type(defense).__init__).parameters

    def text(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    knob = getattr(type(defense), "knob", None)
    config = sorted(defense.config().items(), key=lambda kv: knob is None or kv[0] != knob.param)  # the budget first
    changed = [f"{k}={text(v)} (default {text(params[k].default)})" for k, v in config
               if k in params and params[k].default is not inspect.Parameter.empty and v != params[k].default]
    return ", ".join(changed) if changed else "its default settings"


def refuse_no_op(defense: Defense, sample: ReferenceSample | None, where: str, fix: str) -> None:
    """ConfigError, naming the settings and `fix`, if `defense` leaves NO_OP_SHARE or more of the
    sample's rows unchanged (`unchanged_rows`); `none` and a missing sample pass."""
    if defense.name == "none" or sample is None:
        return
    same = unchanged_rows(defense, sample.probs, sample.inputs)
    if same.mean() >= NO_OP_SHARE:
        raise ConfigError(f"{where}: the {defense.name} defense with {changed_settings(defense)} leaves {int(same.sum())} "
                          f"of {len(same)} reference vectors unchanged (every entry within 1.2e-7), so it would serve the "
                          f"model's own confidence vectors; {fix}, or serve --defense none if undefended answers are "
                          "what you want")
