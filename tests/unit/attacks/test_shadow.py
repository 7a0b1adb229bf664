import numpy as np

from purifier.attacks.shadow import balanced_in_masks, train_shadows
from purifier.data import load_dataset


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
    kwargs = dict(n_classes=10, arch="mlp", epochs=5, n_shadows=2, seed=3, progress=False, train_size=120)
    a = train_shadows(pool_X, pool_y, cand_X, cand_y, **kwargs)
    b = train_shadows(pool_X, pool_y, cand_X, cand_y, **kwargs)
    assert a.pool_probs.shape == (2, 300, 10) and a.cand_probs.shape == (2, 100, 10)
    assert ((a.pool_in.sum(axis=1) + a.cand_in.sum(axis=1)) == 120).all()
    np.testing.assert_array_equal(a.pool_in, b.pool_in)
    np.testing.assert_allclose(a.pool_probs, b.pool_probs)  # injected seeds: reproducible
    probs, labels, member = a.stacked()
    assert probs.shape == (600, 10) and labels.shape == member.shape == (600,)
    np.testing.assert_array_equal(a.labels_fn(0)(pool_X), a.pool_probs[0].argmax(axis=1))
