import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strong_secret import SECRET

from purifier.defenses import IdentityDefense, load_defense
from purifier.defenses.base import finalize
from purifier.defenses.keyed import KeyedPRF
from purifier.errors import ArtifactError, ConfigError, InvalidProbabilities
from purifier.probabilities import check_probabilities


def dirichlet(n, c, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).dirichlet(np.ones(c) * 0.3, size=n).astype(dtype)


@pytest.mark.parametrize("bad,msg", [
    (np.array([[0.5, np.nan]]), "row 0 contains NaN"),
    (np.array([[0.5, 0.5], [np.inf, 0.0]]), "row 1 contains NaN or Inf"),
    (np.array([[-np.inf, 1.0]]), "row 0 contains NaN or Inf"),
    (np.array([[np.inf, -np.inf]]), "row 0 contains NaN or Inf"),
    (np.array([[0.5, 0.5], [0.7, 0.3], [0.6, 0.6]]), "row 2 sums to 1.2"),
    (np.array([[0.6, 0.4], [1.2, -0.2]]), "row 1 has negative"),
    (np.array([[0.6, 0.3]]), "row 0 sums to 0.9"),
    (np.array([[1.0]]), "shape"),
    (np.array([[1, 0]]), "float16/32/64"),
])
def test_check_probabilities_names_row_and_problem(bad, msg):
    with pytest.raises(InvalidProbabilities, match=msg):
        check_probabilities(bad)


def test_class_count_mismatch():
    d = IdentityDefense()
    d.n_classes = 10
    with pytest.raises(InvalidProbabilities, match="fitted for 10"):
        d.transform(dirichlet(3, 4))


@given(st.integers(2, 200), st.integers(1, 50), st.sampled_from([np.float16, np.float32, np.float64]),
       st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_identity_invariants(c, n, dtype, seed):
    p = dirichlet(n, c, seed)
    p = (p / p.sum(1, keepdims=True)).astype(dtype)
    p = p / p.sum(1, keepdims=True, dtype=np.float64).astype(dtype)
    out = IdentityDefense().transform(p)
    assert out.dtype == dtype and out.shape == p.shape
    assert (out >= 0).all() and np.isfinite(out).all()
    assert np.array_equal(out.argmax(1), p.argmax(1))


def test_finalize_releases_clean_row_when_label_would_flip_or_nan():
    clean = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]], np.float32)
    defended = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [np.nan, 0.5, 0.5]])
    out = finalize(clean, defended)
    np.testing.assert_allclose(out[0], [0.6, 0.3, 0.1], rtol=1e-6)
    np.testing.assert_allclose(out[1:], clean[1:])  # flipped label / NaN: clean row
    assert out.dtype == np.float32


@given(st.integers(1, 12), st.integers(2, 6), st.sampled_from([np.float16, np.float32, np.float64]),
       st.integers(0, 10_000), st.booleans())
@settings(max_examples=200, deadline=None)
def test_finalize_answers_each_row_as_alone(n, c, dtype, seed, labels):
    """A batch of valid rows takes finalize's short path, a batch with one bad row the general one:
    every row's answer is bit for bit its answer alone, whichever path its batch took."""
    rng = np.random.default_rng(seed)
    clean = rng.dirichlet(np.ones(c), n).astype(dtype)
    defended = rng.dirichlet(np.ones(c), n) * rng.choice([0.5, 1.0, 3.0], (n, 1))
    bad = rng.random((n, c)) < 0.1
    defended[bad] = rng.choice([np.nan, np.inf, -np.inf, -0.2, 0.0, -0.0], bad.sum())
    keep = rng.random(n) < 0.5 if labels else None
    out = finalize(clean, defended, keep)
    for i in range(n):
        alone = finalize(clean[i:i + 1], defended[i:i + 1], None if keep is None else keep[i:i + 1])
        assert out.dtype == alone.dtype == dtype
        assert out[i].tobytes() == alone[0].tobytes()


def test_keyed_prf_deterministic_batch_independent_and_keyed():
    rows = dirichlet(64, 10)
    prf = KeyedPRF(SECRET, "model-a")
    u = prf.uniform(rows, "coin")
    assert u.shape == (64, 1) and ((0 <= u) & (u < 1)).all()
    np.testing.assert_array_equal(prf.uniform(rows[[5, 1, 3]], "coin"), u[[5, 1, 3]])
    assert not np.array_equal(KeyedPRF(SECRET, "model-b").uniform(rows, "coin"), u)
    assert not np.array_equal(KeyedPRF(SECRET + b"x", "model-a").uniform(rows, "coin"), u)
    assert not np.array_equal(prf.uniform(rows, "noise"), u)
    # one row (its own path in `uniform`: Python ints) gives the bits the batch gives, every size
    for size in (1, 3, 4, 5, 9):
        batch = prf.uniform(rows, "coin", size)
        alone = np.concatenate([prf.uniform(rows[i:i + 1], "coin", size) for i in range(len(rows))])
        assert alone.shape == batch.shape == (64, size) and alone.dtype == batch.dtype == np.float64
        assert alone.tobytes() == batch.tobytes()
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        KeyedPRF(b"short", "m")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_identity_answers_the_checked_row_renormalized_once(dtype):
    probs = np.array([[0.2, -0.0, 0.3, 0.5], [0.1, 0.2, 0.3, 0.4000001]], dtype)
    out = IdentityDefense().transform(probs)
    p = probs.astype(np.float64)
    expected = np.maximum(p / p.sum(axis=1, keepdims=True), 0.0).astype(dtype)
    assert out.dtype == dtype and out.tobytes() == expected.tobytes()
    assert not np.signbit(out).any()  # -0.0 answered as +0.0, as finalize writes it
    with pytest.raises(InvalidProbabilities, match="row 0"):
        IdentityDefense().transform(np.array([[0.5, -0.1, 0.6]], dtype))


def test_identity_subclass_with_its_own_transform_keeps_it():
    class Halved(IdentityDefense):
        name = "test-halved"

        def _transform(self, p, inputs):
            return np.concatenate([p[:, :1] * 0.5, p[:, 1:]], axis=1), None  # finalize renormalizes it

    probs = np.array([[0.2, 0.8]])
    np.testing.assert_allclose(Halved().transform(probs), [[0.1 / 0.9, 0.8 / 0.9]])


@pytest.mark.parametrize("key_bytes", [16, 32, 64, 65, 200])
def test_keyed_prf_digests_are_hmac_sha256(key_bytes):
    """The PRF writes HMAC out from hashlib's SHA-256 (RFC 2104); it must give hmac.new's digests,
    also for keys longer than SHA-256's block, which HMAC hashes first."""
    import hashlib
    import hmac

    secret = bytes(range(7, 7 + key_bytes))
    rows = np.random.default_rng(key_bytes).dirichlet(np.ones(5), size=4)
    prf = KeyedPRF(secret, "model-x")
    got = prf.digests(rows, "coin", blocks=3)
    for i, row in enumerate(rows):
        mac = hmac.new(secret, b"purifier-prf-v1\x00model-x\x00coin\x005\x00" + row.tobytes(), hashlib.sha256)
        for b in range(3):
            block = mac.copy()
            block.update(b.to_bytes(4, "little"))
            assert got[i, 32 * b:32 * (b + 1)].tobytes() == block.digest()


def test_keyed_prf_distributions():
    rows = dirichlet(4000, 10, seed=9)
    prf = KeyedPRF(SECRET, "m")
    u = prf.uniform(rows, "u", size=5).ravel()
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    z = prf.normal(rows, "z", size=7)
    assert z.shape == (4000, 7) and abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03


def test_identity_save_load_roundtrip_and_tamper(tmp_path):
    d = IdentityDefense()
    d.n_classes, d.model_id = 10, "abc"
    d.save(tmp_path / "def")
    loaded = load_defense(tmp_path / "def")
    assert isinstance(loaded, IdentityDefense) and loaded.n_classes == 10
    with pytest.raises(ArtifactError, match="fitted for model"):
        load_defense(tmp_path / "def", model_id="other")
    (tmp_path / "def" / "defense.json").write_text("[]")
    with pytest.raises(ArtifactError, match="JSON object"):
        load_defense(tmp_path / "def")
