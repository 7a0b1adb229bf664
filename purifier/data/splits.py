"""Seeded, disjoint splits with fixed roles, saved as `splits.npz` + `splits.json`.

Roles (indices into the dataset):

* `train`: the target's training set, i.e. the members.
* `reference`: non-members the defender owns; defenses are fitted on them (with `train`).
* `eval_members`: a subset of `train` the audit evaluates on.
* `eval_nonmembers`: non-members the audit evaluates on, disjoint from `reference`, so a defense
  is never evaluated on the records it was fitted on.
* `attacker`: the attacker's pool for shadow models, disjoint from everything the target or the
  defender saw.

Default sizes keep the target training set small so the target overfits the way deployed models
do (members ~100% accurate, non-members clearly lower): a target that leaks nothing demonstrates
nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from purifier.artifacts import check_file_hash, read_json, require_keys, sha256_file, write_json
from purifier.data.datasets import Dataset
from purifier.errors import ArtifactError, ConfigError

ROLES = ("train", "reference", "eval_members", "eval_nonmembers", "attacker")

# dataset -> (train, reference, eval_nonmembers); the attacker pool gets the rest.
DEFAULT_SIZES: dict[str, tuple[int, int, int]] = {
    "digits": (500, 300, 400),
    "mnist5k": (1000, 800, 1000),
    "breast_cancer": (150, 100, 150),
    "synthetic100": (4000, 3000, 4000),
    "purchase_like": (5000, 5000, 10000),
}


@dataclass(frozen=True)
class SplitSizes:
    train: int
    reference: int
    eval_nonmembers: int
    eval_members: int | None = None  # default: min(train, eval_nonmembers), a balanced audit
    attacker: int | None = None  # default: everything left

    @classmethod
    def default(cls, dataset: Dataset) -> SplitSizes:
        if dataset.name in DEFAULT_SIZES:
            return cls(*DEFAULT_SIZES[dataset.name])
        n = len(dataset.y)
        return cls(int(0.28 * n), int(0.17 * n), int(0.22 * n))


def dataset_fingerprint(dataset: Dataset) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(dataset.X).tobytes())
    h.update(np.ascontiguousarray(dataset.y).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Splits:
    dataset: str
    seed: int
    indices: dict[str, np.ndarray]
    fingerprint: str

    def size(self, role: str) -> int:
        return int(len(self.indices[role]))

    def take(self, data: Dataset, role: str) -> tuple[np.ndarray, np.ndarray]:
        """(X (n, D) float32, y (n,) int64) of one role."""
        if role not in ROLES:
            raise ConfigError(f"split role {role!r} unknown; choose one of {', '.join(ROLES)}")
        if data.name != self.dataset:
            raise ArtifactError(f"splits are for dataset {self.dataset!r}, not {data.name!r}")
        idx = self.indices[role]
        return data.X[idx], data.y[idx]

    def save(self, directory: Path) -> None:
        npz = directory / "splits.npz"
        np.savez(npz, allow_pickle=False, **self.indices)
        write_json(directory / "splits.json", {
            "dataset": self.dataset,
            "seed": self.seed,
            "sizes": {r: self.size(r) for r in ROLES},
            "dataset_sha256": self.fingerprint,
            "splits_sha256": sha256_file(npz),
        })

    @classmethod
    def load(cls, directory: str | Path, dataset: Dataset | None = None) -> Splits:
        directory = Path(directory)
        manifest = read_json(directory / "splits.json", "splits.json")
        require_keys(manifest, ("dataset", "seed", "dataset_sha256", "splits_sha256"), "splits.json")
        check_file_hash(directory / "splits.npz", manifest["splits_sha256"], "splits.json")
        with np.load(directory / "splits.npz", allow_pickle=False) as z:
            missing = [r for r in ROLES if r not in z.files]
            if missing:
                raise ArtifactError(f"{directory}/splits.npz lacks role(s) {', '.join(missing)}")
            indices = {r: z[r].astype(np.int64) for r in ROLES}
        splits = cls(manifest["dataset"], int(manifest["seed"]), indices, manifest["dataset_sha256"])
        if dataset is not None and dataset_fingerprint(dataset) != splits.fingerprint:
            raise ArtifactError(
                f"{directory}: splits were made from a different version of dataset {dataset.name!r}"
            )
        return splits


def make_splits(dataset: Dataset, seed: int = 0, sizes: SplitSizes | None = None) -> Splits:
    """Draw disjoint role index sets with a seeded permutation."""
    sizes = sizes or SplitSizes.default(dataset)
    n = len(dataset.y)
    fixed = sizes.train + sizes.reference + sizes.eval_nonmembers
    attacker = n - fixed if sizes.attacker is None else sizes.attacker
    for field in ("train", "reference", "eval_nonmembers"):
        if getattr(sizes, field) <= 0:
            raise ConfigError(f"split size {field} must be positive")
    if attacker <= 0 or fixed + attacker > n:
        raise ConfigError(
            f"split sizes need {fixed + max(attacker, 1)} records, dataset {dataset.name!r} has {n}"
        )
    eval_members = sizes.eval_members or min(sizes.train, sizes.eval_nonmembers)
    if eval_members > sizes.train:
        raise ConfigError(f"eval_members ({eval_members}) cannot exceed train ({sizes.train})")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    bounds = np.cumsum([sizes.train, sizes.reference, sizes.eval_nonmembers, attacker])
    train, reference, eval_non, attack = np.split(perm, bounds)[:4]
    members = np.sort(rng.choice(train, eval_members, replace=False))
    indices = {
        "train": np.sort(train), "reference": np.sort(reference), "eval_members": members,
        "eval_nonmembers": np.sort(eval_non), "attacker": np.sort(attack),
    }
    return Splits(dataset.name, seed, indices, dataset_fingerprint(dataset))
