"""What an audit runs on: the records of each role and what is known about the target.

Roles (Shokri et al. 2017; Carlini et al. 2022 for the evaluation discipline):

* `members`: evaluation records that were in the target's training set;
* `nonmembers`: evaluation records that were not (disjoint from the members);
* `pool`: the attacker's own records from the same distribution, disjoint from both, on which
  the shadow models train.

`AuditData` comes either from a target directory made by `purifier train-target` (its splits) or
from the user's record files (`purifier.data.records`); the runner does not know which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from purifier.attacks.shadow import BUILTIN_RECIPES, TORCH_RECIPES, ShadowRecipe
from purifier.data.records import Records, check_disjoint
from purifier.errors import ConfigError


@dataclass(frozen=True)
class AuditData:
    """Records per role and the facts about the target the attacker is assumed to know.

    Attributes:
        members, nonmembers, pool: `Records` (X (N, D) float32, y (N,) int64).
        n_classes: C, the target's output width.
        name: what the records are (a dataset name, or "records").
        kind: "image" or "tabular"; image_shape (c, h, w) for images.
        feature_range: (lo, hi) each (D,): the valid input box (images [0, 1]; tabular: the
            pool's per-feature min and max, which is all the attacker knows).
        model_family: the target's model family if known (a recipe name such as "mlp"), else None.
        model_id: the target's identity if known (ONNX sha256), else None.
        train_size: the target's training-set size if known (shadows then train on as many rows).
        default_recipe: the shadow recipe used when the audit names none.
    """

    members: Records
    nonmembers: Records
    pool: Records
    n_classes: int
    name: str = "records"
    kind: str = "tabular"
    image_shape: tuple[int, int, int] | None = None
    feature_range: tuple[np.ndarray, np.ndarray] | None = None
    model_family: str | None = None
    model_id: str | None = None
    train_size: int | None = None
    default_recipe: ShadowRecipe | None = None

    def __post_init__(self):
        if self.kind not in ("image", "tabular"):
            raise ConfigError(f"kind: {self.kind!r} is not 'image' or 'tabular'")
        for records in (self.members, self.nonmembers, self.pool):
            records.check_model(None, self.n_classes)
        widths = {r.n_features for r in (self.members, self.nonmembers, self.pool)}
        if len(widths) != 1:
            raise ConfigError(f"the record files have different feature counts ({', '.join(map(str, sorted(widths)))}); "
                              "members, non-members and the attacker pool must share one layout")
        if self.image_shape is not None and int(np.prod(self.image_shape)) != self.members.n_features:
            raise ConfigError(f"image shape {self.image_shape} does not hold {self.members.n_features} features")
        if self.feature_range is None:
            lo, hi = ((np.zeros(self.n_features), np.ones(self.n_features)) if self.kind == "image" else
                      (self.pool.X.min(axis=0).astype(np.float64), self.pool.X.max(axis=0).astype(np.float64)))
            object.__setattr__(self, "feature_range", (lo, hi))

    @property
    def n_features(self) -> int:
        return self.members.n_features

    def check_disjoint(self) -> None:
        """Evaluation members and non-members, and the pool and both, share no record."""
        check_disjoint(self.members, self.nonmembers)
        check_disjoint(self.pool, self.members)
        check_disjoint(self.pool, self.nonmembers)

    def recipe(self, name: str | None = None, epochs: int | None = None) -> ShadowRecipe:
        """The shadow recipe `name` (None: the default for this target) with `epochs` if given."""
        default = self.default_recipe or ShadowRecipe(self.model_family if self.model_family in BUILTIN_RECIPES
                                                      and self.model_family != "cnn" else "mlp")
        name = name or default.name
        if name == default.name and name in TORCH_RECIPES:
            epochs = epochs or default.epochs
        return ShadowRecipe(name, epochs, self.image_shape if name == "cnn" else None)

    @classmethod
    def from_target(cls, target) -> AuditData:
        """The roles of a target directory's splits (`purifier.models.target.Target`)."""
        from purifier.models.target import RECIPES

        data = target.dataset
        roles = {}
        for role in ("eval_members", "eval_nonmembers", "attacker"):
            X, y = target.role(role)
            roles[role] = Records(X, y, f"{target.directory} ({role} split)")
        arch, epochs = RECIPES.get(data.name, ("mlp", 100))
        return cls(roles["eval_members"], roles["eval_nonmembers"], roles["attacker"], target.n_classes,
                   name=data.name, kind=data.kind, image_shape=data.image_shape,
                   model_family=target.manifest.get("architecture", arch), model_id=target.model_id,
                   train_size=target.splits.size("train"),
                   default_recipe=ShadowRecipe(arch, epochs, data.image_shape if arch == "cnn" else None))
