"""Shadow models: the attacker's own copies of the target, trained on the attacker's pool.

Shokri et al. 2017 ("Membership Inference Attacks against Machine Learning Models") train
shadow models on data from the target's distribution whose membership the attacker knows, and
learn what member outputs look like from them. LiRA (Carlini et al. 2022, "Membership Inference
Attacks From First Principles") additionally includes each audited candidate in half of the
shadow models (IN) and leaves it out of the other half (OUT); the assignment is random and
independent of the candidate's true membership, which the attacker does not know.

Shadows come in complementary pairs: shadow 2j trains on a random half of (attacker pool +
candidates), shadow 2j+1 on the other half, so each example is IN for exactly K/2 of K shadows
(floor or ceil for odd K) and shadow k does not depend on K: `--shadows 64` after
`--shadows 16` reuses the first 16 from the cache. With `train_size` each model then keeps a
random subset of that size of its IN half (the target's training-set size), the rest counting
as OUT.

Shadows train as independent tasks on an executor (`purifier.executor`: local processes or Ray)
behind a cache of their outputs (`purifier.attacks.shadow_cache`); for a given seed the outputs do
not depend on either.

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
from dataclasses import dataclass, field

import numpy as np

from purifier.attacks.shadow_cache import ShadowCache, cached_map, entry_key
from purifier.errors import ConfigError
from purifier.executor import ExecutorSpec
from purifier.progress import Progress

PredictProba = Callable[[np.ndarray], np.ndarray]
TORCH_RECIPES = ("mlp", "cnn")
SKLEARN_RECIPES = ("logistic", "random_forest", "gradient_boosting")
BUILTIN_RECIPES = (*TORCH_RECIPES, *SKLEARN_RECIPES)
DEFAULT_TORCH_EPOCHS = 100
# The default audit's shadow count: enough for LiRA, RMIA and the calibrated label attack to run
# their online variants on the evaluation records, and for the leaky benchmark's TPR at 0.1% FPR
# to read what 64 shadows find (measured by benchmarks/bench_shadow_count.py; the figures are in
# docs/audit.md, "The default count"). QUICK_SHADOWS is `--quick`'s.
DEFAULT_SHADOWS = 32
QUICK_SHADOWS = 4


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

    def cache_identity(self) -> dict:
        """What about the recipe determines a trained shadow; a user recipe adds the sha256 of its
        module's file, so editing the training code retrains instead of reusing stale shadows."""
        ident = {**self.describe(), "image_shape": self.image_shape}
        if ":" in self.name:
            import inspect

            from purifier.artifacts import sha256_file

            source = inspect.getsourcefile(importlib.import_module(self.name.partition(":")[0]))
            ident["source_sha256"] = sha256_file(source) if source else None
        return ident

    def model_arrays(self, predict: PredictProba) -> dict[str, np.ndarray]:
        """A trained shadow as arrays for the cache: a torch recipe's weights; {} for recipes whose
        models have no array form (scikit-learn, user code: only pickle would store them)."""
        if not isinstance(predict, TorchPredictor):
            return {}
        return {f"model/{k}": v.detach().cpu().numpy() for k, v in predict.model.state_dict().items()}

    def model_from_arrays(self, arrays: dict[str, np.ndarray], n_features: int, n_classes: int
                          ) -> PredictProba | None:
        """The shadow `model_arrays` stored, rebuilt exactly; None if there are none."""
        weights = {k.removeprefix("model/"): v for k, v in arrays.items() if k.startswith("model/")}
        if not weights or self.name not in TORCH_RECIPES:
            return None
        import torch

        from purifier.models.architectures import build_model

        model = build_model(self.name, n_features, n_classes, self.image_shape)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        return TorchPredictor(model.eval())

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

    def labels(self, X: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) predicted labels: the argmax of the logits (what the softmax's argmax
        is), without the softmax and float64 copy that label-only queries do not need."""
        from purifier.models.training import predict_labels

        return predict_labels(self.model, X)


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
    from purifier.threads import single_threaded

    with single_threaded():
        predict = recipe.train(train_X, train_y, n_classes, shadow_seed(seed, index))
        return check_shadow_outputs(predict(query_X), len(query_X), n_classes, recipe.name), predict


def shadow_entry(X_all: np.ndarray, y_all: np.ndarray, n_classes: int, recipe: ShadowRecipe, seed: int,
                 mask: np.ndarray, index: int) -> dict[str, np.ndarray]:
    """One shadow as an executor task and a cache entry: trained on the rows `mask` selects.

    Returns {"probs": (Q, C) answers on all of X_all (Q, D), float32 when that is exact (torch
    models answer float32), else float64; "model/<name>": weights of an array-form model}.
    """
    probs, predict = train_one_shadow(X_all[mask], y_all[mask], X_all, n_classes, recipe, seed, index)
    p32 = probs.astype(np.float32)
    return {"probs": p32 if np.array_equal(p32, probs) else probs, **recipe.model_arrays(predict)}


class ShadowModels:
    """The K shadows' predict_proba callables, made on first use: rebuilt from cached weights, or
    (recipes without an array form) retrained in this process from the same rows and seed, and
    checked against the shadow's recorded outputs. Only the few shadows that attacks query on new
    inputs (label-only augmentation and boundary searches) are ever made."""

    CHECK_ROWS = 256  # rows on which a retrained shadow must answer as it did when it was trained

    def __init__(self, entries: list[dict], X_all: np.ndarray, y_all: np.ndarray, masks: np.ndarray,
                 n_classes: int, recipe: ShadowRecipe, seed: int):
        # keep the weights and a few recorded answers, not every shadow's (Q, C) outputs
        self._entries = [{k: (v[:self.CHECK_ROWS].copy() if k == "probs" else v) for k, v in e.items()}
                         for e in entries]
        self._X, self._y, self._masks = X_all, y_all, masks
        self._n_classes, self._recipe, self._seed = n_classes, recipe, seed
        self._made: dict[int, PredictProba] = {}
        self.retrained: list[int] = []
        self.notes: list[str] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, k: int) -> PredictProba:
        if k not in self._made:
            self._made[k] = self._make(k)
        return self._made[k]

    def _make(self, k: int) -> PredictProba:
        model = self._recipe.model_from_arrays(self._entries[k], self._X.shape[1], self._n_classes)
        if model is not None:
            return model
        m = self._masks[k]
        probs, model = train_one_shadow(self._X[m], self._y[m], self._X[:self.CHECK_ROWS], self._n_classes,
                                        self._recipe, self._seed, k)
        self.retrained.append(k)
        if not np.allclose(probs, self._entries[k]["probs"], atol=1e-6):
            self.notes.append(f"shadow {k} retrained for label queries answers differently from its recorded "
                              f"outputs: recipe {self._recipe.name} is not deterministic for a given seed")
        return model


@dataclass
class ShadowSet:
    """Shadow models and their outputs.

    Shapes: pool_X (P, D) float32, pool_y (P,) int64, pool_probs (K, P, C) float64,
    pool_in (K, P) bool; cand_probs (K, N, C), cand_in (K, N) bool for the N candidates.
    `models` are the K shadows' predict_proba callables (X (m, D) -> (m, C)); `provenance` says
    how they were made (executor, cache hits) for the report.
    """

    models: ShadowModels | list
    pool_X: np.ndarray
    pool_y: np.ndarray
    pool_probs: np.ndarray
    pool_in: np.ndarray
    cand_probs: np.ndarray
    cand_in: np.ndarray
    provenance: dict = field(default_factory=dict)

    @property
    def n_shadows(self) -> int:
        return int(self.pool_probs.shape[0])

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All shadows' pool outputs as one reference set with known membership.

        Returns (probs (K*P, C), labels (K*P,), membership (K*P,) bool); probs is a view when
        pool_probs is contiguous (as `train_shadows` makes it).
        """
        k, _, c = self.pool_probs.shape
        return self.pool_probs.reshape(-1, c), np.tile(self.pool_y, k), self.pool_in.reshape(-1)

    def labels_fn(self, k: int):
        """A label oracle for shadow model k: X (N, D) -> (N,) predicted labels."""
        model = self.models[k]
        return model.labels if hasattr(model, "labels") else lambda X: model(X).argmax(axis=1)


def balanced_in_masks(n_shadows: int, n_examples: int, rng: np.random.Generator) -> np.ndarray:
    """(K, n) bool in complementary pairs: shadow 2j gets a random half (exactly) of the examples,
    shadow 2j+1 the rest, so each example is IN for K/2 shadows (floor or ceil for odd K). Pairs
    are drawn in order, so row k does not depend on K."""
    masks = np.zeros((n_shadows, n_examples), bool)
    for k in range(0, n_shadows, 2):  # a loop over models, not rows
        half = rng.permutation(n_examples) < (n_examples + 1) // 2
        masks[k] = half
        if k + 1 < n_shadows:
            masks[k + 1] = ~half
    return masks


def shadow_masks(n_shadows: int, n_examples: int, seed: int, train_size: int | None = None) -> np.ndarray:
    """(K, n) bool training masks: balanced complementary pairs, each cut to `train_size` rows (by
    the shadow's own seed) if given; row k is the same whatever K is."""
    masks = balanced_in_masks(n_shadows, n_examples, np.random.default_rng(seed))
    if train_size is not None:
        for k in range(n_shadows):  # per model, not per row
            chosen = np.nonzero(masks[k])[0]
            if len(chosen) > train_size:
                masks[k, np.random.default_rng([seed, k]).permutation(chosen)[train_size:]] = False
    return masks


def shadow_key_parts(X_all: np.ndarray, y_all: np.ndarray, n_pool: int, n_classes: int, recipe: ShadowRecipe,
                     seed: int, masks: np.ndarray) -> list[dict]:
    """Per shadow, everything that determines it (the cache address): the pool's and the
    candidates' contents, the shadow's own training rows, recipe, seed, index, library versions."""
    from purifier.artifacts import library_versions
    from purifier.attacks.shadow_cache import array_digest

    versions = {k: v for k, v in library_versions("scikit-learn").items() if k != "onnxruntime"}
    common = {"pool": array_digest(X_all[:n_pool], y_all[:n_pool]),
              "candidates": array_digest(X_all[n_pool:], y_all[n_pool:]), "n_classes": n_classes,
              "recipe": recipe.cache_identity(), "seed": seed, "versions": versions}
    return [{**common, "index": k, "train_rows": array_digest(np.packbits(m))} for k, m in enumerate(masks)]


def train_shadows(pool_X: np.ndarray, pool_y: np.ndarray, cand_X: np.ndarray, cand_y: np.ndarray,
                  n_classes: int, recipe: ShadowRecipe, n_shadows: int = DEFAULT_SHADOWS, seed: int = 0,
                  progress: bool = True, train_size: int | None = None, executor: ExecutorSpec | None = None,
                  cache: ShadowCache | None = None) -> ShadowSet:
    """Train `n_shadows` models with `recipe`, model k on its IN half of pool + candidates.

    Args:
        pool_X, pool_y: (P, D), (P,) the attacker's pool.
        cand_X, cand_y: (N, D), (N,) the audited records (inputs and labels the attacker has).
        train_size: if given, each shadow trains on a random subset of this size of its IN half
            (the rest count as OUT), so shadows overfit like a target trained on that many
            records (Shokri et al. mimic the target's training set size); also cheaper.
        executor: where the shadows that miss the cache train (default: local processes, one per
            core); opened only if some do.
        cache: the shadow cache (default: none).
    """
    if n_shadows < 1:
        raise ConfigError(f"shadows: need at least 1 shadow model, got {n_shadows}")
    executor = executor or ExecutorSpec()
    cache = cache or ShadowCache(enabled=False)
    n_pool = len(pool_y)
    masks = shadow_masks(n_shadows, n_pool + len(cand_y), seed, train_size)
    X_all = np.concatenate([pool_X, cand_X]).astype(np.float32)
    y_all = np.concatenate([pool_y, cand_y]).astype(np.int64)
    parts = shadow_key_parts(X_all, y_all, n_pool, n_classes, recipe, seed, masks) if cache.enabled else None
    keys = [entry_key(p) for p in parts] if parts else [""] * n_shadows
    hits_before = cache.stats.hits
    with Progress(f"shadow models ({recipe.name})", n_shadows, enabled=progress) as bar:
        entries, used = cached_map(cache, executor, shadow_entry, [(m, k) for k, m in enumerate(masks)], keys,
                                   shared=(X_all, y_all, n_classes, recipe, seed),
                                   expected={"probs": (len(y_all), n_classes)}, parts=parts, progress=bar)
    # filled in place, pool and candidates apart: each contiguous, so `stacked` is a view, not a copy
    pool_probs, cand_probs = np.empty((n_shadows, n_pool, n_classes)), np.empty((n_shadows, len(cand_y), n_classes))
    for k, e in enumerate(entries):
        pool_probs[k], cand_probs[k] = e["probs"][:n_pool], e["probs"][n_pool:]
    models = ShadowModels(entries, X_all, y_all, masks, n_classes, recipe, seed)
    del entries
    provenance = {"executor": used, "from_cache": cache.stats.hits - hits_before,
                  "trained": n_shadows - (cache.stats.hits - hits_before)}
    return ShadowSet(models, pool_X.astype(np.float32), pool_y.astype(np.int64), pool_probs,
                     masks[:, :n_pool], cand_probs, masks[:, n_pool:], provenance)
