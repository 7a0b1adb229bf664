"""The model fingerprint a fitted defense carries: chosen from the reference set, saved, checked."""

import numpy as np
import pytest

from purifier.defenses import FitData, IdentityDefense, load_defense
from purifier.defenses.fingerprint import CHECK_ROWS, DEFAULT_ROWS, Fingerprint
from purifier.errors import ArtifactError


def _fit_data(rng, n=600, d=5, c=3):
    probs = rng.dirichlet(np.ones(c), size=n)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = probs.argmax(1)
    return FitData(probs, probs[::-1].copy(), X, X[::-1].copy(), y, y[::-1].copy(), model_id="m")


def test_fit_takes_reference_rows_save_and_load_round_trip(tmp_path):
    data = _fit_data(np.random.default_rng(0))
    defense = IdentityDefense().fit(data)
    fp = defense.fingerprint
    assert fp.inputs.shape == (DEFAULT_ROWS, 5) and fp.probs.shape == (DEFAULT_ROWS, 3)
    # every probe row is a reference row with the model's answer to it, never a member's
    for x, p in zip(fp.inputs, fp.probs, strict=True):
        i = int(np.nonzero((data.reference_inputs == x).all(axis=1))[0][0])
        np.testing.assert_array_equal(p, data.reference_probs[i])
    defense.save(tmp_path / "d")
    loaded = load_defense(tmp_path / "d")
    np.testing.assert_array_equal(loaded.fingerprint.inputs, fp.inputs)
    np.testing.assert_array_equal(loaded.fingerprint.probs, fp.probs)
    assert loaded.fingerprint.mismatch(fp.probs) is None


def test_mismatch_names_the_difference():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=6)
    fp = Fingerprint.from_rows(rng.normal(size=(6, 2)), probs)
    assert fp.mismatch(probs.astype(np.float32)) is None  # FP32 serving of the same model
    other = probs.copy()
    other[0] = other[0][::-1]
    assert "differ" in fp.mismatch(other)
    assert "shape" in fp.mismatch(probs[:, :3])
    assert "NaN" in fp.mismatch(np.full_like(probs, np.nan))


def test_a_subset_of_the_rows_is_compared_with_its_own_answers():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=64)
    fp = Fingerprint.from_rows(rng.normal(size=(64, 2)), probs)
    rows = np.array([5, 0, 63])
    assert fp.mismatch(probs[rows], rows) is None
    assert "differ" in fp.mismatch(probs[[5, 1, 63]], rows)
    assert "shape" in fp.mismatch(probs[rows], rows[:2])


def test_a_fingerprint_of_eight_rows_fitted_before_still_loads(tmp_path):
    defense = IdentityDefense().fit(_fit_data(np.random.default_rng(4)))
    object.__setattr__(defense, "fingerprint", Fingerprint(defense.fingerprint.inputs[:8],
                                                           defense.fingerprint.probs[:8]))
    defense.save(tmp_path / "d")
    loaded = load_defense(tmp_path / "d").fingerprint
    assert loaded.inputs.shape == (8, 5) and loaded.mismatch(defense.fingerprint.probs) is None


def test_tampered_fingerprint_is_refused(tmp_path):
    IdentityDefense().fit(_fit_data(np.random.default_rng(2))).save(tmp_path / "d")
    np.savez(tmp_path / "d" / "fingerprint.npz", inputs=np.zeros((1, 5), np.float32), probs=np.ones((1, 3)) / 3)
    with pytest.raises(ArtifactError, match="sha256"):
        load_defense(tmp_path / "d")


@pytest.mark.parametrize("stored,check", [(DEFAULT_ROWS, CHECK_ROWS), (64, CHECK_ROWS), (8, 4), (2, 1)])
def test_the_check_asks_a_few_rows_and_probes_draw_only_from_the_others(stored, check):
    """What a (re)connect check asks (an upstream can recognise it: it follows ModelMetadata) is
    never a probe row, so remembering the check teaches the upstream nothing about the probes;
    fingerprints of 64 and 8 rows fitted before keep 56 and 4 probe rows."""
    rng = np.random.default_rng(5)
    fp = Fingerprint(rng.normal(size=(stored, 3)).astype(np.float32), rng.dirichlet(np.ones(4), size=stored))
    asked, probed = fp.check_rows(), fp.probe_rows()
    assert list(asked) == list(range(check)) and list(probed) == list(range(check, stored))
    # a model with a fixed batch of b rows: the check asks b rows, probes need b others (else all rows)
    assert len(fp.check_rows(batch=stored // 2)) == max(stored // 2, check)
    if stored >= 2 * max(check, 1) + 2:
        assert set(fp.probe_rows(batch=2)).isdisjoint(fp.check_rows(batch=2))
    assert list(fp.probe_rows(batch=stored)) == list(range(stored))
