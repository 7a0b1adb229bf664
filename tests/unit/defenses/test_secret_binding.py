"""A fitted defense is bound to its PRF secret: defense.json holds the secret's key check value,
never the secret, and loading the defense with another secret is refused."""

import json
import logging

import numpy as np
import pytest
from strong_secret import SECRET, strong_secret

from purifier.defenses import FitData, IdentityDefense, load_defense
from purifier.defenses.baselines import Noise, Rounded
from purifier.defenses.keyed import key_check_value
from purifier.errors import ConfigError


def fit_data(c=4, n=200):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(c), size=n)
    X = rng.normal(size=(n, 3)).astype(np.float32)
    return FitData(probs, probs, X, X, probs.argmax(1), probs.argmax(1), model_id="model-sha")


def test_defense_json_holds_the_key_check_value_not_the_secret(tmp_path):
    Noise(scale=0.1, secret=SECRET).fit(fit_data()).save(tmp_path / "d")
    text = (tmp_path / "d" / "defense.json").read_text()
    assert json.loads(text)["secret_check"] == key_check_value(SECRET)
    for f in (tmp_path / "d").iterdir():
        assert SECRET not in f.read_bytes() and SECRET.decode() not in text


def test_another_secret_is_refused_in_one_line_naming_the_fix(tmp_path):
    Noise(scale=0.1, secret=SECRET).fit(fit_data()).save(tmp_path / "d")
    assert load_defense(tmp_path / "d", secret=SECRET).secret == SECRET
    with pytest.raises(ConfigError, match="fitted with another PRF secret") as e:
        load_defense(tmp_path / "d", secret=strong_secret("another"))
    assert "the secret it was fitted with, or refit it" in str(e.value) and "\n" not in str(e.value)
    # an audit in process with a throwaway secret says so and is not refused
    assert load_defense(tmp_path / "d", secret=strong_secret("throwaway"), check_secret=False).name == "noise"


def test_saving_needs_the_secret_except_for_no_defense(tmp_path):
    with pytest.raises(ConfigError, match="bound to the PRF secret"):
        Rounded(decimals=1).fit(fit_data()).save(tmp_path / "r")
    assert not (tmp_path / "r").exists()
    IdentityDefense().fit(fit_data()).save(tmp_path / "none")  # `none` serves without a secret
    assert "secret_check" not in json.loads((tmp_path / "none" / "defense.json").read_text())


def test_a_defense_fitted_before_key_check_values_loads_with_a_warning(tmp_path, caplog):
    Rounded(decimals=1, secret=SECRET).fit(fit_data()).save(tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "defense.json").read_text())
    del manifest["secret_check"]
    (tmp_path / "d" / "defense.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="purifier.defenses"):
        loaded = load_defense(tmp_path / "d", secret=strong_secret("any"))
    assert loaded.name == "round"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "cannot be checked" in caplog.records[0].getMessage()
