"""`purifier serve` refuses a defense directory it cannot vouch for, before it serves anything:
one that changes nothing, one fitted with another secret, and a guessable secret (issue 21,
items 2 and 4: the checks live in `load_defense` / `load_secret`, which start-up calls)."""

from __future__ import annotations

import json

import pytest
from strong_secret import SECRET, strong_secret, write_secret

from purifier.defenses import FitData, IdentityDefense, defense_class
from purifier.errors import ConfigError
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.integration


def _settings(digits_target, defense_dir, secret_file) -> Settings:
    return Settings.resolve({"model": str(digits_target.directory), "host": "127.0.0.1", "port": 0,
                             "metrics_port": -1, "defense_dir": str(defense_dir), "secret_file": str(secret_file)},
                            env={})


@pytest.fixture(scope="module")
def top_k_dir(digits_target, tmp_path_factory):
    d = tmp_path_factory.mktemp("fitted") / "top_k"
    defense_class("top_k")(k=2, secret=SECRET).fit(FitData.from_target(digits_target)).save(d)
    return d


def _start(settings) -> None:
    with BackgroundSidecar(settings):
        pass


def test_a_directory_whose_setting_changes_nothing_does_not_start(digits_target, top_k_dir, tmp_path):
    secret = write_secret(tmp_path / "secret")
    _start(_settings(digits_target, top_k_dir, secret))  # the fitted setting starts
    manifest = json.loads((top_k_dir / "defense.json").read_text())
    (top_k_dir / "defense.json").write_text(json.dumps({**manifest, "config": {"k": 10}}))
    try:
        with pytest.raises(ConfigError, match=r"the top_k defense with k=10 \(default 3\) leaves 256 of 256 reference "
                                              r"vectors unchanged .* purifier tune top_k --write-to .* --defense none"):
            _start(_settings(digits_target, top_k_dir, secret))
    finally:
        (top_k_dir / "defense.json").write_text(json.dumps(manifest))


def test_another_secret_or_a_guessable_one_does_not_start(digits_target, top_k_dir, tmp_path):
    other = write_secret(tmp_path / "other", "another deployment")
    with pytest.raises(ConfigError, match=r"fitted with another PRF secret .* serve it with the secret it was fitted "
                                          r"with, or refit it"):
        _start(_settings(digits_target, top_k_dir, other))
    weak = tmp_path / "weak"
    weak.write_text("changemechangeme\n")
    with pytest.raises(ConfigError, match=r"secret: the secret in .* is guessable: .* head -c 32 /dev/urandom"):
        _start(_settings(digits_target, top_k_dir, weak))
    assert strong_secret("another deployment") != SECRET


def test_a_directory_that_says_none_is_not_served_without_defense_none(digits_target, tmp_path):
    """`--defense none` is the only way to serve undefended: a directory whose defense.json says
    none (IdentityDefense().save, or one line edited by hand: none needs no key check value and no
    files) is refused with --defense-dir alone, naming the flag, before anything is served."""
    directory = IdentityDefense().save(tmp_path / "defense")
    assert json.loads((directory / "defense.json").read_text())["defense"] == "none"
    secret = write_secret(tmp_path / "secret")
    with pytest.raises(ConfigError, match=r"holds the 'none' defense, which serves the model's clean confidence "
                                          r"vectors; serve undefended on purpose with --defense none"):
        _start(_settings(digits_target, directory, secret))
    # the same edit in a fitted directory: still refused, not served as none
    fitted = tmp_path / "edited"
    defense_class("top_k")(k=2, secret=SECRET).fit(FitData.from_target(digits_target)).save(fitted)
    manifest = json.loads((fitted / "defense.json").read_text())
    (fitted / "defense.json").write_text(json.dumps({**manifest, "defense": "none", "config": {}}))
    with pytest.raises(ConfigError, match="holds the 'none' defense"):
        _start(_settings(digits_target, fitted, secret))
