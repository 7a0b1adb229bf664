"""Shadow models: the attacker's own copies of the target, trained on the attacker's pool.

Shokri et al. 2017 ("Membership Inference Attacks against Machine Learning Models") train
shadow models on data from the target's distribution whose membership the attacker knows, and
learn what member outputs look like from them. LiRA (Carlini et al. 2022, "Membership Inference
Attacks From First Principles") additionally includes each audited candidate in half of the
shadow models (IN) and leaves it out of the other half (OUT); the assignment is random and
independent of the candidate's true membership, which the attacker does not know.

Each example of (attacker pool + candidates) is drawn IN for floor(K/2) or ceil(K/2) of the K
shadow models; with `train_size` each model then keeps a random subset of that size of its IN
half (the target's training-set size), the rest counting as OUT.

A shadow model is trained by a *recipe*: `train(X (n, D) float32, y (n,) int64, n_classes, seed)
-> predict_proba`, a callable X (m, D) -> (m, n_classes) probabilities in class order. Built in:
`mlp` and `cnn` (torch, `purifier.models.training`), `logistic`, `random_forest`,
`gradient_boosting` (scikit-learn); any `module:function` with that signature is a user recipe.
Shadows mimic the target best when the recipe is the target's own model family.
`train_one_shadow` is a pure top-level function of its arguments (rows, recipe, seed, index), so
one shadow can be trained in another process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from purifier.errors import ConfigError
from purifier.progress import Progress

PredictProba = Callable[[np.ndarray], np.ndarray]
TORCH_RECIPES = ("mlp", "cnn")
SKLEARN_RECIPES = ("logistic", "random_forest", "gradient_boosting")
BUILTIN_RECIPES = (*TORCH_RECIPES, *SKLEARN_RECIPES)
DEFAULT_TORCH_EPOCHS = 100


@dataclass(frozen=True)
class ShadowRecipe:
    """How the attacker trains one shadow model (picklable: a name and numbers).

    Args:
        name: a built-in recipe (BUILTIN_RECIPES) or "module:function" (a user recipe).
        epochs: torch recipes only (default DEFAULT_TORCH_EPOCHS).
        image_shape: (c, h, w), the `cnn` recipe only.
    """

    name: str
    epochs: int | None = None
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.name not in BUILTIN_RECIPES and ":" not in self.name:
            raise ConfigError(f"shadow model: unknown recipe {self.name!r}; choose one of "
                              f"{', '.join(BUILTIN_RECIPES)} or module:function (your own training code)")
        if self.epochs is not None and self.name not in TORCH_RECIPES:
            raise ConfigError(f"shadow epochs: only the torch recipes ({', '.join(TORCH_RECIPES)}) train for "
                              f"epochs, not {self.name!r}")
        if self.name == "cnn" and self.image_shape is None:
            raise ConfigError("shadow model: the cnn recipe needs image records (an image shape)")
        if ":" in self.name:
            self.user_function()  # import errors surface before any query or training

    def user_function(self) -> Callable:
        module, _, attr = self.name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise ConfigError(f"shadow model: cannot import module {module!r} ({e}); is it on PYTHONPATH?") from None
        except AttributeError:
            raise ConfigError(f"shadow model: module {module!r} has no function {attr!r}") from None
        if not callable(fn):
            raise ConfigError(f"shadow model: {self.name} is not callable")
        return fn

    def describe(self) -> dict:
        return {"recipe": self.name, **({"epochs": self.epochs or DEFAULT_TORCH_EPOCHS}
                                        if self.name in TORCH_RECIPES else {})}

    def train(self, X: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> PredictProba:
        """Train on X (n, D) float32, y (n,) int64; returns X (m, D) -> (m, n_classes) float64."""
        if self.name in TORCH_RECIPES:
            from purifier.models.training import TrainConfig, train_classifier

            config = TrainConfig(arch=self.name, epochs=self.epochs or DEFAULT_TORCH_EPOCHS)
            model = train_classifier(X, y, n_classes, config, seed, self.image_shape, progress=False)
            return TorchPredictor(model)
        if self.name in SKLEARN_RECIPES:
            return SklearnPredictor(_sklearn_model(self.name, seed).fit(X, y), n_classes)
        return self.user_function()(X, y, n_classes, seed)


def _sklearn_model(name: str, seed: int):
    if name == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=2000)
    if name == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(random_state=seed)


class TorchPredictor:
    """predict_proba of a trained torch classifier (picklable, unlike a lambda)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, X: np.ndarray) -> np.ndarray:
        from purifier.models.training import predict_proba

        return predict_proba(self.model, X)


class SklearnPredictor:
    """predict_proba of a fitted scikit-learn classifier, widened to all `n_classes` columns (a
    shadow whose training rows lack a class would otherwise answer fewer columns)."""

    def __init__(self, model, n_classes: int):
        self.model, self.n_classes = model, n_classes

    def __call__(self, X: np.ndarray) -> np.ndarray:
        p = self.model.predict_proba(np.asarray(X, np.float32))
        out = np.zeros((len(X), self.n_classes))
        out[:, np.asarray(self.model.classes_, np.int64)] = p
        return out


def check_shadow_outputs(probs: np.ndarray, n_rows: int, n_classes: int, recipe: str) -> np.ndarray:
    """A recipe's answers as (n_rows, n_classes) float64 probability rows, or a ConfigError."""
    probs = np.asarray(probs, np.float64)
    if probs.shape != (n_rows, n_classes):
        raise ConfigError(f"shadow model {recipe}: predict_proba answered shape {probs.shape}, expected "
                          f"({n_rows}, {n_classes}): one column per class, in class order")
    if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ConfigError(f"shadow model {recipe}: predict_proba must answer probability rows (non-negative, "
                          "summing to 1)")
    return probs


def shadow_seed(seed: int, index: int) -> int:
    return seed * 1000 + 17 * index + 1


def train_one_shadow(train_X: np.ndarray, train_y: np.ndarray, query_X: np.ndarray, n_classes: int,
                     recipe: ShadowRecipe, seed: int, index: int) -> tuple[np.ndarray, PredictProba]:
    """Train shadow `index` on its rows and answer the query rows.

    Args:
        train_X, train_y: (n, D) float32, (n,) int64, the shadow's IN rows.
        query_X: (Q, D) float32, every row whose output the attack needs (pool + candidates).
    Returns:
        (probs (Q, C) float64, predict_proba callable of the trained shadow).
    """
    from purifier.models.training import torch_threads

    with torch_threads(1):
        predict = recipe.train(train_X, train_y, n_classes, shadow_seed(seed, index))
        return check_shadow_outputs(predict(query_X), len(query_X), n_classes, recipe.name), predict


@dataclass
class ShadowSet:
    """Shadow models and their outputs.

    Shapes: pool_X (P, D) float32, pool_y (P,) int64, pool_probs (K, P, C) float64,
    pool_in (K, P) bool; cand_probs (K, N, C), cand_in (K, N) bool for the N candidates.
    `models` are the K shadows' predict_proba callables (X (m, D) -> (m, C)).
    """

    models: list
    pool_X: np.ndarray
    pool_y: np.ndarray
    pool_probs: np.ndarray
    pool_in: np.ndarray
    cand_probs: np.ndarray
    cand_in: np.ndarray

    @property
    def n_shadows(self) -> int:
        return int(self.pool_probs.shape[0])

    def stacked(self, probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All shadows' pool outputs as one reference set with known membership.

        probs: optional (K, P, C) replacement outputs (e.g. defended by the attacker's copy).
        Returns (probs (K*P, C), labels (K*P,), membership (K*P,) bool).
        """
        probs = self.pool_probs if probs is None else probs
        k = probs.shape[0]
        return probs.reshape(-1, probs.shape[-1]), np.tile(self.pool_y, k), self.pool_in.reshape(-1)

    def labels_fn(self, k: int):
        """A label oracle for shadow model k: X (N, D) -> (N,) predicted labels."""
        model = self.models[k]
        return lambda X: model(X).argmax(axis=1)


def balanced_in_masks(n_shadows: int, n_examples: int, rng: np.random.Generator) -> np.ndarray:
    """(K, n) bool: each example IN for floor/ceil(K/2) shadows, chosen at random."""
    if n_shadows == 1:
        return rng.random((1, n_examples)) < 0.5
    order = np.argsort(rng.random((n_shadows, n_examples)), axis=0)
    ranks = np.argsort(order, axis=0)
    parity = rng.integers(0, 2, n_examples)  # odd K: which examples get the extra IN
    return ranks < (n_shadows // 2 + (n_shadows % 2) * parity)


def shadow_masks(n_shadows: int, n_examples: int, seed: int, train_size: int | None = None) -> np.ndarray:
    """(K, n) bool training masks: balanced IN halves, each cut to `train_size` rows if given."""
    rng = np.random.default_rng(seed)
    masks = balanced_in_masks(n_shadows, n_examples, rng)
    if train_size is not None:
        for k in range(n_shadows):  # per model, not per row
            chosen = np.nonzero(masks[k])[0]
            if len(chosen) > train_size:
                masks[k, rng.permutation(chosen)[train_size:]] = False
    return masks


def train_shadows(pool_X: np.ndarray, pool_y: np.ndarray, cand_X: np.ndarray, cand_y: np.ndarray,
                  n_classes: int, recipe: ShadowRecipe, n_shadows: int = 4, seed: int = 0,
                  progress: bool = True, train_size: int | None = None) -> ShadowSet:
    """Train `n_shadows` models with `recipe`, model k on its IN half of pool + candidates.

    Args:
        pool_X, pool_y: (P, D), (P,) the attacker's pool.
        cand_X, cand_y: (N, D), (N,) the audited records (inputs and labels the attacker has).
        train_size: if given, each shadow trains on a random subset of this size of its IN half
            (the rest count as OUT), so shadows overfit like a target trained on that many
            records (Shokri et al. mimic the target's training set size); also cheaper.
    """
    if n_shadows < 1:
        raise ConfigError(f"shadows: need at least 1 shadow model, got {n_shadows}")
    n_pool = len(pool_y)
    masks = shadow_masks(n_shadows, n_pool + len(cand_y), seed, train_size)
    X_all = np.concatenate([pool_X, cand_X]).astype(np.float32)
    y_all = np.concatenate([pool_y, cand_y]).astype(np.int64)
    models, probs = [], []
    with Progress(f"shadow models ({recipe.name})", n_shadows, enabled=progress) as bar:
        for k in range(n_shadows):  # a handful of models: the loop is over models, not rows
            m = masks[k]
            p, model = train_one_shadow(X_all[m], y_all[m], X_all, n_classes, recipe, seed, k)
            models.append(model)
            probs.append(p)
            bar.update(1, train_acc=float((p[m].argmax(1) == y_all[m]).mean()))
    probs = np.stack(probs)
    return ShadowSet(models, pool_X.astype(np.float32), pool_y.astype(np.int64), probs[:, :n_pool],
                     masks[:, :n_pool], probs[:, n_pool:], masks[:, n_pool:])
