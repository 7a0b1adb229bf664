import pickle

import numpy as np
import pytest

from purifier.attacks.shadow import (
    BUILTIN_RECIPES,
    ShadowRecipe,
    balanced_in_masks,
    train_one_shadow,
    train_shadows,
)
from purifier.data import load_dataset
from purifier.errors import ConfigError


def test_balanced_in_masks():
    rng = np.random.default_rng(0)
    m = balanced_in_masks(4, 1000, rng)
    assert m.shape == (4, 1000) and (m.sum(axis=0) == 2).all()
    m3 = balanced_in_masks(3, 1000, rng)
    assert set(np.unique(m3.sum(axis=0))) == {1, 2}
    assert 0.4 < balanced_in_masks(1, 1000, rng).mean() < 0.6


def test_train_shadows_shapes_sizes_and_seeds():
    data = load_dataset("digits")
    pool_X, pool_y, cand_X, cand_y = data.X[:300], data.y[:300], data.X[300:400], data.y[300:400]
    kwargs = dict(n_classes=10, recipe=ShadowRecipe("mlp", epochs=5), n_shadows=2, seed=3, progress=False, train_size=120)
    a = train_shadows(pool_X, pool_y, cand_X, cand_y, **kwargs)
    b = train_shadows(pool_X, pool_y, cand_X, cand_y, **kwargs)
    assert a.pool_probs.shape == (2, 300, 10) and a.cand_probs.shape == (2, 100, 10)
    assert ((a.pool_in.sum(axis=1) + a.cand_in.sum(axis=1)) == 120).all()
    np.testing.assert_array_equal(a.pool_in, b.pool_in)
    np.testing.assert_allclose(a.pool_probs, b.pool_probs)  # injected seeds: reproducible
    probs, labels, member = a.stacked()
    assert probs.shape == (600, 10) and labels.shape == member.shape == (600,)
    np.testing.assert_array_equal(a.labels_fn(0)(pool_X), a.pool_probs[0].argmax(axis=1))


def _tabular(n=240, d=6, c=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0)


@pytest.mark.parametrize("name", ["logistic", "random_forest", "gradient_boosting"])
def test_sklearn_recipes_answer_every_class_even_when_training_rows_lack_some(name):
    X, y = _tabular()
    keep = y != 3  # this shadow never sees class 3
    probs, predict = train_one_shadow(X[keep], y[keep], X, 4, ShadowRecipe(name), seed=1, index=0)
    assert probs.shape == (240, 4) and np.allclose(probs.sum(axis=1), 1) and (probs[:, 3] == 0).all()
    assert (probs[keep].argmax(1) == y[keep]).mean() > 0.8  # it learned the training rows
    # picklable: a shadow can be trained in another process and shipped back
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(predict))(X), probs)
    again, _ = train_one_shadow(X[keep], y[keep], X, 4, ShadowRecipe(name), seed=1, index=0)
    np.testing.assert_array_equal(again, probs)  # same seed and index, same shadow


def test_user_recipe_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_recipes.py").write_text(
        "import numpy as np\n"
        "def centroid(X, y, n_classes, seed):\n"
        "    mu = np.stack([X[y == k].mean(0) for k in range(n_classes)])\n"
        "    def predict(Z):\n"
        "        s = -((Z[:, None, :] - mu[None]) ** 2).sum(-1)\n"
        "        e = np.exp(s - s.max(1, keepdims=True))\n"
        "        return e / e.sum(1, keepdims=True)\n"
        "    return predict\n"
        "def bad(X, y, n_classes, seed):\n"
        "    return lambda Z: np.ones((len(Z), n_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    X, y = _tabular()
    probs, _ = train_one_shadow(X, y, X[:10], 4, ShadowRecipe("my_recipes:centroid"), seed=0, index=0)
    assert probs.shape == (10, 4)
    with pytest.raises(ConfigError, match="must answer probability rows"):
        train_one_shadow(X, y, X[:10], 4, ShadowRecipe("my_recipes:bad"), seed=0, index=0)
    with pytest.raises(ConfigError, match="module 'my_recipes' has no function 'nope'"):
        ShadowRecipe("my_recipes:nope")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_x'"):
        ShadowRecipe("no_such_module_x:f")


def test_recipe_names_and_epochs_are_checked():
    with pytest.raises(ConfigError, match="unknown recipe 'svm'; choose one of " + ", ".join(BUILTIN_RECIPES)):
        ShadowRecipe("svm")
    with pytest.raises(ConfigError, match="only the torch recipes"):
        ShadowRecipe("random_forest", epochs=5)
    with pytest.raises(ConfigError, match="cnn recipe needs image records"):
        ShadowRecipe("cnn")
