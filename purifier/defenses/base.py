"""The `Defense` contract and the invariants every defense output obeys (the probability checks
themselves are `purifier.probabilities`'s).

A defense rewrites a batch of confidence vectors (N, C) so that members and non-members of the
target's training set look alike. Every defense, whatever its algorithm:

* rejects rows that are not probability vectors (`InvalidProbabilities`, naming the row);
* returns the same dtype as its input (FP16, FP32, FP64), rows non-negative, summing to 1
  within the dtype's precision, finite;
* keeps the argmax of every row (first index on ties); a row whose defended version would change
  it is released clean instead (subclasses that document a label-changing option excepted);
* is deterministic: the same row gives the same output whatever else is in the batch;
* saves as arrays + JSON (+ ONNX) with a `defense.json`, never pickle.

Subclasses implement `_transform(p, inputs)` on float64 rows that are already validated and
normalized; `transform` wraps it with the checks above (`finalize`).
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from purifier.artifacts import (
    atomic_directory,
    library_versions,
    read_json,
    require_keys,
    write_json,
)
from purifier.defenses.fingerprint import Fingerprint
from purifier.defenses.no_op import ReferenceSample, refuse_no_op
from purifier.devices import check_device
from purifier.errors import ArtifactError, ConfigError, InvalidProbabilities
from purifier.probabilities import check_probabilities, checked_rows, greatest, least, renormalized

FORMAT_VERSION = 1


def finalize(clean: np.ndarray, defended: np.ndarray, keep_label: np.ndarray | None = None) -> np.ndarray:
    """Enforce the output invariants and cast back to the input dtype.

    Args:
        clean: (N, C) validated input rows in their original dtype.
        defended: (N, C) float64 defended rows.
        keep_label: optional (N,) bool; rows where it is False are allowed a different argmax
            (a documented label-changing option such as PURIFIER's swapper). Default: all True.
    Returns:
        (N, C) array in `clean.dtype`. Rows whose defended version is non-finite or would change
        the argmax (after the cast) are the clean row, renormalized in float64 then cast.
    """
    dtype = clean.dtype
    sums = np.add.reduce(defended, axis=1, keepdims=True)
    if len(clean) and least(defended) >= 0 and 0 < least(sums) and greatest(sums) < np.inf:
        # every row finite, non-negative, with a positive sum (NaN fails the comparisons): what
        # the general path below computes, in fewer numpy calls (the hot path defends one row)
        out = (np.maximum(defended, 0.0) / sums).astype(dtype)
        invalid = None
    else:
        q = np.where(np.isfinite(defended), defended, -1.0)
        invalid = (q < 0).any(axis=1)
        q = np.maximum(q, 0.0)
        s = q.sum(axis=1, keepdims=True)
        invalid |= s[:, 0] <= 0
        out = (q / np.where(s > 0, s, 1.0)).astype(dtype)
    bad = out.argmax(axis=1) != clean.argmax(axis=1)
    if keep_label is not None:
        bad &= keep_label
    if invalid is not None:
        bad |= invalid
    if np.count_nonzero(bad):
        c64 = clean.astype(np.float64)
        c64 /= c64.sum(axis=1, keepdims=True)
        out[bad] = c64[bad].astype(dtype)
    return out


def softmaxed_probabilities(q: np.ndarray, tol: float = 1e-6) -> bool:
    """True if every row of `q` (N, C), a softmax output, is the softmax of a probability vector:
    what `--logits` makes of an output that already holds probabilities.

    A softmax drops one constant per row, so its input z comes back as log q + c; z can have been
    a probability vector iff log q - mean(log q) + 1/C (the candidate with the sum 1) is
    non-negative. Real logits, which spread by far more than 1/C below their mean, never pass on
    every row."""
    if not len(q):
        return False
    logq = np.log(np.clip(np.asarray(q, np.float64), np.finfo(np.float64).tiny, None))
    return bool((logq - logq.mean(axis=1, keepdims=True) + 1.0 / q.shape[1] >= -tol).all())


@dataclass(frozen=True)
class FitData:
    """What a defense may be fitted on: the target's outputs with known membership.

    Shapes: `member_probs` (M, C), `reference_probs` (R, C) float64; inputs (M, D) / (R, D)
    float32; labels (M,) / (R,) int64. Members are the target's training records; the reference
    set holds non-members owned by the defender, disjoint from the audit's evaluation set.
    """

    member_probs: np.ndarray
    reference_probs: np.ndarray
    member_inputs: np.ndarray
    reference_inputs: np.ndarray
    member_labels: np.ndarray
    reference_labels: np.ndarray
    model_id: str

    @property
    def n_classes(self) -> int:
        return int(self.member_probs.shape[1])

    @classmethod
    def from_target(cls, target) -> FitData:
        """Query the target's ONNX model on its `train` (members) and `reference` splits."""
        Xm, ym = target.role("train")
        Xr, yr = target.role("reference")
        return cls(target.predict_proba(Xm), target.predict_proba(Xr), Xm, Xr, ym, yr, target.model_id)

    @classmethod
    def from_model(cls, model, members, reference) -> FitData:
        """Ask `model` about the member and reference records.

        Args:
            model: anything with `query(X (N, D)) -> (N, C)` probabilities and a `model_id`
                (`purifier.models.access.OnnxTarget` or `RemoteTarget`: in process or an endpoint).
            members, reference: `purifier.data.records.Records` (X (N, D), y (N,)).
        Raises ConfigError if the model does not answer probability vectors.
        """
        from purifier.models.access import not_probabilities

        probs = []
        for records in (members, reference):
            p = model.query(records.X)
            try:
                check_probabilities(p)
            except InvalidProbabilities as e:
                raise not_probabilities(f"{getattr(model, 'description', 'the model')}, on {records.source},",
                                        str(e)) from None
            if getattr(model, "logits", False) and softmaxed_probabilities(p):
                raise ConfigError(f"--logits: {getattr(model, 'description', 'the model')} already answers "
                                  f"probability vectors on {records.source} (rows non-negative and summing to 1 "
                                  "before the softmax), which --logits would flatten toward uniform; drop --logits")
            probs.append(p)
        return cls(probs[0], probs[1], members.X, reference.X, members.y, reference.y,
                   getattr(model, "model_id", "") or "")


@dataclass(frozen=True)
class Knob:
    """A defense's budget: the constructor keyword (also the attribute that holds it), the default
    grid a sweep tries, and which way protects more. `None` as a value means "no cap", the
    strongest (PURIFIER's L1 budget)."""

    param: str
    grid: tuple
    stronger_when: str  # "larger" (MemGuard epsilon, noise scale, PURIFIER budget) or "smaller" (k, decimals)
    kind: type = float
    label: str = ""

    def weakest_first(self, values: Iterable) -> list:
        """The distinct values ordered from the least distortion to the most."""
        values = list(dict.fromkeys(values))
        capped = sorted((v for v in values if v is not None), reverse=self.stronger_when == "smaller")
        return capped + [None] * (None in values)

    def parse(self, text: str, flag: str = "--grid") -> list:
        """A comma-separated grid from the command line, weakest first (the values themselves are
        checked by the defense's own constructor, `Defense.with_budget`)."""
        values: list = []
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            if item.lower() == "none" and None in self.grid:
                values.append(None)
                continue
            try:
                value = self.kind(item)
            except ValueError:
                raise ConfigError(f"{flag}: {item!r} is not {'an integer' if self.kind is int else 'a number'} "
                                  f"({self.param})") from None
            if self.kind is float and not math.isfinite(value):
                raise ConfigError(f"{flag}: {item!r} is not a finite number ({self.param})")
            values.append(value)
        if not values:
            raise ConfigError(f"{flag}: give at least one {self.param} value, e.g. "
                              f"{','.join('none' if v is None else str(v) for v in self.grid)}")
        return self.weakest_first(values)

    def setting(self, value) -> str:
        """How a setting is written in tables: "eps 0.1", "k 2", "L1 budget none"."""
        return f"{self.label or self.param} {'none' if value is None else f'{value:g}'}"


class Defense(abc.ABC):
    """Base class: `fit` -> `transform` -> `save` / `load`.

    Attributes:
        name: registry name written to `defense.json`.
        needs_inputs: True if `transform` uses the request's input rows (the label swapper);
            callers may pass `inputs=None` to defenses where it is False.
        n_classes: class count the defense was fitted for (None: any).
        model_id: identity of the protected model (the ONNX sha256), or "" if unbound.
        fingerprint: probe inputs and the fitted model's answers (`purifier.defenses.fingerprint`),
            set by `fit` from the reference set and saved with the defense; None for unfitted ones.
        reference_sample: reference rows the defense was fitted on (`purifier.defenses.no_op`),
            set by `fit` and saved with the defense, which `save` and `load_defense` apply to
            refuse a setting that changes nothing; None for unfitted ones.
        knob: the budget a sweep tunes (`Knob`), None for a defense without one.
        baseline_grid: the settings at which it stands on every tune curve as a simple alternative
            (`(None,)`: its one setting); empty for a defense that is not a baseline.
    """

    name: ClassVar[str]
    knob: ClassVar[Knob | None] = None
    baseline_grid: ClassVar[tuple] = ()

    n_classes: int | None = None
    model_id: str = ""
    fingerprint: Fingerprint | None = None
    reference_sample: ReferenceSample | None = None

    @property
    def needs_inputs(self) -> bool:
        return False

    def __init__(self, *, secret: bytes | None = None):
        """Every defense is constructible with keyword hyper-parameters that all have defaults,
        plus `secret` (the PRF key; required by defenses with keyed randomness before
        `transform`). The secret is never part of `config()` or of anything saved."""
        self.secret = secret

    def fit(self, data: FitData) -> Self:
        self.n_classes = data.n_classes
        self.model_id = data.model_id
        self.fingerprint = Fingerprint.from_rows(data.reference_inputs, data.reference_probs)
        self.reference_sample = ReferenceSample.from_rows(data.reference_probs,
                                                          data.reference_inputs if self.needs_inputs else None)
        return self

    def fit_summary(self, data: FitData) -> tuple[dict, list[str]]:
        """After `fit(data)`: facts for defense.json and report lines for `purifier fit-defense`."""
        return {}, []

    def transform(self, probs: np.ndarray, inputs: np.ndarray | None = None) -> np.ndarray:
        """Defend a batch. probs: (N, C) float16/32/64 -> (N, C) same dtype.

        inputs: (N, D) request rows, used only by defenses with `needs_inputs`.
        Raises InvalidProbabilities for rows that are not probability vectors.
        """
        p, sums = checked_rows(probs, self.n_classes)
        if len(probs) == 0:
            return probs.copy()
        p /= sums
        defended, keep_label = self._transform(p, inputs)
        return finalize(probs, defended, keep_label)

    def serve_on(self, device: str) -> None:
        """Run what `transform` computes on `device` (`purifier.devices`: cpu, cuda, auto; cuda
        without a usable CUDA device is a ConfigError). Defenses computed in numpy ignore it."""
        check_device(device)

    @abc.abstractmethod
    def _transform(self, p: np.ndarray, inputs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """p: (N, C) float64 normalized rows -> (defended (N, C) float64, keep_label (N,) bool | None)."""

    def with_budget(self, value) -> Self:
        """A copy at budget `value`, sharing the fitted state (nothing is refitted). The value is
        checked by the defense's own constructor, so a bad one fails with its message
        (`k: must be an integer >= 1`); `None` for a defense without a knob gives itself."""
        knob = type(self).knob
        if knob is None:
            if value is None:
                return self
            raise ConfigError(f"{self.name}: this defense has no budget to set")
        checked = type(self)(**{**self.config(), knob.param: value})
        twin = copy.copy(self)
        setattr(twin, knob.param, getattr(checked, knob.param))
        return twin

    # --- persistence -------------------------------------------------------------------------

    def config(self) -> dict:
        """JSON-serializable hyper-parameters, written to defense.json."""
        return {}

    def _save_arrays(self, directory: Path) -> list[str]:
        """Write the fitted state into `directory`; return the file names written."""
        return []

    def _load_arrays(self, directory: Path) -> None:  # noqa: B027 - optional hook
        """Restore the fitted state from `directory` (files already hash-checked)."""

    @classmethod
    def _from_config(cls, config: dict, secret: bytes | None) -> Self:
        """Construct from the saved config; defenses with keyed randomness take the secret."""
        return cls(**config, secret=secret)

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict, secret: bytes | None) -> Self:
        try:
            obj = cls._from_config(manifest["config"], secret)
        except TypeError as e:
            raise ArtifactError(f"{directory}/defense.json: config does not fit {cls.__name__} ({e})") from None
        obj.n_classes = manifest["n_classes"]
        obj.model_id = manifest["model_id"]
        obj._load_arrays(directory)
        return obj

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write the defense atomically (missing parent directories are created): state files
        plus `defense.json` with hashes and the key check value of the secret (`secret_check`),
        which binds the defense to that secret. Every defense but `none` needs its secret here.
        A setting that leaves the reference sample unchanged is refused (`no_op.refuse_no_op`)."""
        from purifier.artifacts import sha256_file
        from purifier.defenses.keyed import GENERATE_SECRET, key_check_value

        if self.name != "none" and self.secret is None:
            raise ConfigError(f"secret: a fitted {self.name} defense is bound to the PRF secret it will be served "
                              f"with; construct it with secret=load_secret(...) (make one with {GENERATE_SECRET})")
        refuse_no_op(self, self.reference_sample, str(directory),
                     f"choose a setting that changes them (purifier tune {self.name} measures what each costs and buys)")
        Path(directory).resolve().parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(directory) as tmp:
            files = self._save_arrays(tmp)
            identity = {}
            if self.fingerprint is not None:
                written, identity["fingerprint"] = self.fingerprint.save(tmp)
                files = [*files, *written]
            if self.reference_sample is not None:
                written, identity["reference_sample"] = self.reference_sample.save(tmp)
                files = [*files, *written]
            manifest = {
                "format_version": FORMAT_VERSION,
                "defense": self.name,
                "config": self.config(),
                "n_classes": self.n_classes,
                "model_id": self.model_id,
                **({"secret_check": key_check_value(self.secret)} if self.secret is not None and self.name != "none" else {}),
                "files": {f: sha256_file(tmp / f) for f in files},
                "versions": library_versions(),
                **identity,
                **(extra or {}),
            }
            write_json(tmp / "defense.json", manifest)
        return Path(directory)


def read_defense_manifest(directory: str | Path) -> dict:
    """Read and check `defense.json` and the hashes of the files it lists."""
    from purifier.artifacts import check_file_hash

    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"defense directory {directory} does not exist")
    manifest = read_json(directory / "defense.json", "defense.json")
    require_keys(manifest, ("format_version", "defense", "config", "n_classes", "model_id", "files"),
                 f"{directory}/defense.json")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory}/defense.json: format_version {manifest['format_version']} is not supported "
            f"(this purifier reads {FORMAT_VERSION})"
        )
    for name, digest in manifest["files"].items():
        check_file_hash(directory / name, digest, f"{directory}/defense.json")
    return manifest


class IdentityDefense(Defense):
    """No defense: the validated input, renormalized. The baseline every defense is measured against."""

    name = "none"

    def transform(self, probs: np.ndarray, inputs: np.ndarray | None = None) -> np.ndarray:
        """The checked rows, renormalized once in float64 (-0.0 as +0.0, as `finalize` writes it)
        and cast back to their dtype: `finalize`'s checks, which decide between a defended row and
        the clean one, have nothing to decide here, and the identity sidecar answers every request
        with this. (`finalize` divided by the row sums a second time: float64 answers differ from
        that in the last bits.) A subclass with its own `_transform` gets `Defense.transform`."""
        if type(self) is not IdentityDefense:
            return super().transform(probs, inputs)
        p, sums = checked_rows(probs, self.n_classes)
        if not len(p):
            return probs.copy()
        return renormalized(p, sums, probs.dtype)

    def _transform(self, p, inputs):
        return p, None
