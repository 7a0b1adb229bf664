import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strong_secret import SECRET

from purifier.defenses import FitData, defense_class, load_defense
from purifier.defenses.baselines import LabelOnly, Noise, Rounded, TopK
from purifier.errors import ConfigError

DTYPES = [np.float16, np.float32, np.float64]


def rows(n, c, seed=0, dtype=np.float64, ties=False):
    p = np.random.default_rng(seed).dirichlet(np.ones(c) * 0.5, size=n)
    if ties:  # copy each row's top value onto a lower index, so the first-index rule decides
        top = p.argmax(1)
        j = np.maximum(top - 1, 0)
        p[np.arange(n), j] = p[np.arange(n), top]
        p /= p.sum(1, keepdims=True)
    p = p.astype(dtype)
    return p / p.sum(1, keepdims=True, dtype=np.float64).astype(dtype)


def all_baselines():
    return [LabelOnly(secret=SECRET), TopK(k=2, secret=SECRET), TopK(k=1, secret=SECRET),
            Rounded(decimals=0, secret=SECRET), Rounded(decimals=1, secret=SECRET), Rounded(decimals=2, secret=SECRET),
            Noise(kind="laplace", scale=0.1, secret=SECRET), Noise(kind="gaussian", scale=0.3, budget=0.2,
                                                                  secret=SECRET)]


def test_registered_under_their_names():
    for name, cls in [("label_only", LabelOnly), ("top_k", TopK), ("round", Rounded), ("noise", Noise)]:
        assert defense_class(name) is cls and cls.name == name


@pytest.mark.parametrize("defense", all_baselines(), ids=lambda d: f"{d.name}-{d.config()}")
@given(n=st.integers(1, 40), c=st.integers(2, 30), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 10_000),
       ties=st.booleans())
@settings(max_examples=25, deadline=None)
def test_invariants(defense, n, c, dtype, seed, ties):
    p = rows(n, c, seed, dtype, ties)
    out = defense.transform(p)
    assert out.dtype == dtype and out.shape == p.shape
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum(1, dtype=np.float64), 1.0, atol=max(1e-4, 4 * c * np.finfo(dtype).eps))
    np.testing.assert_array_equal(out.argmax(1), p.argmax(1))  # first index on ties, both sides
    # deterministic and independent of the rest of the batch
    perm = np.random.default_rng(seed).permutation(n)
    np.testing.assert_array_equal(defense.transform(p[perm]), out[perm])
    np.testing.assert_array_equal(defense.transform(p[-1:]), out[-1:])


def test_label_only_hand_computed():
    p = np.array([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8]])
    np.testing.assert_array_equal(LabelOnly().transform(p), [[0, 1, 0], [1, 0, 0], [0, 0, 1]])


def test_top_k_hand_computed():
    p = np.array([[0.5, 0.3, 0.2, 0.0], [0.4, 0.2, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_allclose(TopK(k=2).transform(p),
                               [[0.625, 0.375, 0, 0], [2 / 3, 1 / 3, 0, 0], [0, 0, 3 / 7, 4 / 7]])
    np.testing.assert_array_equal(TopK(k=1).transform(p), LabelOnly().transform(p))
    np.testing.assert_allclose(TopK(k=4).transform(p), p)


def test_round_hand_computed():
    p = np.array([
        [0.46, 0.45, 0.09],   # floors 4,4,0; 2 units to the largest remainders (0.9, 0.6)
        [1 / 3, 1 / 3, 1 / 3],  # floors 3,3,3; the missing unit goes to the first index
        [0.39, 0.41, 0.20],   # floors 3,4,2; the unit goes to class 0, tying the top (class 1) at 4;
                              # class 0 comes first, so it gives the unit back: 3,5,2
        [0.41, 0.39, 0.20],   # 4,4,2 after rounding: a tie the top (class 0) wins by coming first
    ])
    np.testing.assert_allclose(Rounded(decimals=1).transform(p),
                               [[0.5, 0.4, 0.1], [0.4, 0.3, 0.3], [0.3, 0.5, 0.2], [0.4, 0.4, 0.2]])
    np.testing.assert_allclose(Rounded(decimals=2).transform(np.array([[0.123, 0.456, 0.421]])),
                               [[0.12, 0.46, 0.42]])
    np.testing.assert_array_equal(Rounded(decimals=0).transform(p), LabelOnly().transform(p))


@given(c=st.integers(2, 50), d=st.integers(0, 4), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_round_gives_d_decimals_summing_to_one_and_moves_little(c, d, seed):
    p = rows(30, c, seed, ties=seed % 2 == 0)
    out = Rounded(decimals=d).transform(p)
    units = out * 10 ** d
    np.testing.assert_allclose(units, np.rint(units), atol=1e-6)
    np.testing.assert_array_equal(np.rint(units).sum(1), 10 ** d)
    # each entry moves by less than one unit, plus at most the argmax repair (one unit per class)
    assert (np.abs(out - p) <= (c + 1) * 10.0 ** -d).all()


def test_noise_budget_respected_and_noise_moves_rows():
    p = rows(500, 10, seed=3)
    for budget in (0.0, 0.05, 0.3):
        out = Noise(kind="gaussian", scale=0.5, budget=budget, secret=SECRET).transform(p)
        l1 = np.abs(out - p).sum(1)
        assert l1.max() <= budget + 1e-9
        if budget > 0:  # strong noise: nearly every row spends its whole budget
            assert np.median(l1) == pytest.approx(budget, rel=1e-6)
    np.testing.assert_allclose(Noise(scale=0.0, secret=SECRET).transform(p), p)
    assert np.abs(Noise(scale=0.05, secret=SECRET).transform(p) - p).sum(1).min() > 0


def test_noise_is_keyed():
    p = rows(50, 5, seed=4)
    a = Noise(secret=SECRET).transform(p)
    assert not np.array_equal(a, Noise(secret=SECRET + b"x").transform(p))
    assert not np.array_equal(a, Noise(kind="gaussian", secret=SECRET).transform(p))
    other = Noise(secret=SECRET)
    other.model_id = "another-model"
    assert not np.array_equal(a, other.transform(p))
    with pytest.raises(ConfigError, match="secret"):
        Noise().transform(p)


def test_noise_draws_have_the_stated_distributions():
    p = rows(4000, 8, seed=5)
    lap = Noise(kind="laplace", secret=SECRET)._noise(p).ravel()
    gau = Noise(kind="gaussian", secret=SECRET)._noise(p).ravel()
    assert np.isfinite(lap).all() and abs(lap.mean()) < 0.05 and lap.var() == pytest.approx(2.0, rel=0.05)
    assert abs(gau.mean()) < 0.03 and gau.var() == pytest.approx(1.0, rel=0.05)
    excess_kurtosis = lambda z: ((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3  # noqa: E731
    assert excess_kurtosis(lap) == pytest.approx(3.0, abs=0.6)  # Laplace: 3, normal: 0
    assert abs(excess_kurtosis(gau)) < 0.2


@pytest.mark.parametrize("make,msg", [
    (lambda: TopK(k=0), r"k: must be an integer >= 1"),
    (lambda: TopK(k=2.5), r"k: must be an integer >= 1"),
    (lambda: Rounded(decimals=-1), r"decimals: must be an integer in 0\.\.15"),
    (lambda: Rounded(decimals=16), r"decimals: must be an integer in 0\.\.15"),
    (lambda: Noise(budget=-0.1), r"budget: must be a finite L1 distance >= 0"),
    (lambda: Noise(scale=float("nan")), r"scale: must be a finite number >= 0"),
    (lambda: Noise(kind="uniform"), r"kind: 'uniform' is not one of laplace, gaussian"),
])
def test_bad_config_one_line_error_naming_the_range(make, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        make()
    assert "\n" not in str(e.value)


def fit_data(c=4, n=20):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(c), size=n)
    X = rng.normal(size=(n, 3)).astype(np.float32)
    y = rng.integers(0, c, n)
    return FitData(probs, probs, X, X, y, y, model_id="model-sha")


@pytest.mark.parametrize("defense", all_baselines(), ids=lambda d: f"{d.name}-{d.config()}")
def test_fit_save_load_roundtrip(defense, tmp_path):
    defense.fit(fit_data())
    assert defense.n_classes == 4 and defense.model_id == "model-sha" and defense.fingerprint is not None
    defense.save(tmp_path / "d")
    loaded = load_defense(tmp_path / "d", secret=SECRET, model_id="model-sha")
    assert type(loaded) is type(defense) and loaded.config() == defense.config()
    assert loaded.n_classes == 4 and loaded.fingerprint is not None
    p = rows(30, 4, seed=6)
    np.testing.assert_array_equal(loaded.transform(p), defense.transform(p))
