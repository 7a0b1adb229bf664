import pickle

import numpy as np
import pytest

from purifier.attacks.shadow import (
    BUILTIN_RECIPES,
    ShadowRecipe,
    balanced_in_masks,
    shadow_masks,
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


def test_shadow_masks_are_balanced_pairs_independent_of_the_shadow_count():
    m = shadow_masks(4, 1001, seed=0)
    assert m.shape == (4, 1001) and (m.sum(axis=0) == 2).all()  # every example IN for exactly K/2
    assert (m[0] ^ m[1]).all() and (m[2] ^ m[3]).all()  # complementary pairs
    assert abs(m[0].sum() - m[1].sum()) <= 1 and not np.array_equal(m[0], m[2])
    assert set(np.unique(shadow_masks(3, 1001, seed=0).sum(axis=0))) == {1, 2}
    np.testing.assert_array_equal(shadow_masks(16, 1001, seed=0)[:4], m)  # shadow k does not depend on K
    assert not np.array_equal(shadow_masks(4, 1001, seed=1), m)
    cut = shadow_masks(6, 1001, seed=0, train_size=300)
    assert (cut.sum(axis=1) == 300).all() and not (cut & ~shadow_masks(6, 1001, seed=0)).any()
    np.testing.assert_array_equal(shadow_masks(2, 1001, seed=0, train_size=300), cut[:2])


def test_train_shadows_shapes_sizes_and_seeds():
    data = load_dataset("digits")
    pool_X, pool_y, cand_X, cand_y = data.X[:300], data.y[:300], data.X[300:400], data.y[300:400]
    from purifier.executor import ExecutorSpec

    kwargs = dict(n_classes=10, recipe=ShadowRecipe("mlp", epochs=5), n_shadows=2, seed=3, progress=False,
                  train_size=120, executor=ExecutorSpec(workers=1))
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


def _small_digits():
    data = load_dataset("digits")
    return data.X[:300], data.y[:300], data.X[300:400], data.y[300:400]


def _train(executor=None, cache=None, n_shadows=2, recipe=None, seed=3):
    from purifier.executor import ExecutorSpec

    return train_shadows(*_small_digits(), n_classes=10, recipe=recipe or ShadowRecipe("mlp", epochs=5),
                         n_shadows=n_shadows, seed=seed, progress=False, train_size=120,
                         executor=executor or ExecutorSpec(workers=1), cache=cache)


@pytest.fixture(scope="module")
def in_process_shadows():
    return _train()


def _assert_same_shadows(a, b):
    np.testing.assert_array_equal(a.pool_probs, b.pool_probs)
    np.testing.assert_array_equal(a.cand_probs, b.cand_probs)
    np.testing.assert_array_equal(a.pool_in, b.pool_in)
    X = _small_digits()[0]
    for k in range(a.n_shadows):
        np.testing.assert_array_equal(a.labels_fn(k)(X), b.labels_fn(k)(X))


def test_shadows_are_identical_on_local_processes(in_process_shadows):
    from purifier.executor import ExecutorSpec

    pooled = _train(ExecutorSpec(workers=2))
    _assert_same_shadows(in_process_shadows, pooled)
    assert pooled.provenance["executor"] == {"executor": "local", "workers": 2, "opened": True}


def test_shadows_are_identical_on_ray(in_process_shadows, ray_executor):
    from purifier.executor import ExecutorSpec

    on_ray = _train(ExecutorSpec("ray", workers=2))
    _assert_same_shadows(in_process_shadows, on_ray)
    assert on_ray.provenance["executor"]["executor"] == "ray" and on_ray.provenance["trained"] == 2


def test_a_warm_rerun_trains_nothing_and_equals_the_cold_run(tmp_path, in_process_shadows):
    from purifier.attacks.shadow_cache import ShadowCache

    cold_cache = ShadowCache(tmp_path)
    cold = _train(cache=cold_cache)
    _assert_same_shadows(in_process_shadows, cold)
    assert (cold_cache.stats.misses, cold_cache.stats.written, cold.provenance["trained"]) == (2, 2, 2)
    warm_cache = ShadowCache(tmp_path)
    warm = _train(cache=warm_cache)
    assert warm.provenance == {"executor": {"executor": "local", "workers": 1, "opened": False},
                               "from_cache": 2, "trained": 0}
    _assert_same_shadows(cold, warm)  # the label oracles are rebuilt from cached weights
    assert warm.models.retrained == []
    more = _train(cache=ShadowCache(tmp_path), n_shadows=3)  # shadow k does not depend on K
    assert (more.provenance["from_cache"], more.provenance["trained"]) == (2, 1)
    other = _train(cache=ShadowCache(tmp_path), seed=4)
    assert other.provenance["from_cache"] == 0


def test_a_corrupt_entry_is_retrained_and_reported(tmp_path, in_process_shadows):
    from purifier.attacks.shadow_cache import ShadowCache

    _train(cache=ShadowCache(tmp_path))
    entry = sorted(tmp_path.glob("*/*.npz"))[0]
    raw = bytearray(entry.read_bytes())
    raw[-40] ^= 0x01
    entry.write_bytes(bytes(raw))
    notes: list[str] = []
    cache = ShadowCache(tmp_path, notify=notes.append)
    again = _train(cache=cache)
    assert len(cache.stats.corrupt) == 1 and again.provenance == {
        "executor": {"executor": "local", "workers": 1, "opened": True}, "from_cache": 1, "trained": 1}
    assert len(notes) == 1 and "retraining" in notes[0]
    _assert_same_shadows(in_process_shadows, again)


def test_models_without_an_array_form_are_retrained_on_demand(tmp_path):
    from purifier.attacks.shadow_cache import ShadowCache

    recipe = ShadowRecipe("logistic")
    cold = _train(cache=ShadowCache(tmp_path), recipe=recipe)
    warm = _train(cache=ShadowCache(tmp_path), recipe=recipe)
    assert warm.provenance["trained"] == 0 and warm.models.retrained == []
    X = _small_digits()[0]
    np.testing.assert_array_equal(warm.labels_fn(1)(X), cold.labels_fn(1)(X))
    assert warm.models.retrained == [1] and warm.models.notes == []  # seeded: the same model
