"""`load_secret`: the secret as bytes, str or a path; an explicit source wins over the environment."""

from pathlib import Path

import pytest

from purifier.defenses import load_secret
from purifier.errors import ConfigError

KEY = "a-secret-of-at-least-16-bytes"


def test_forms_and_precedence(tmp_path, monkeypatch):
    (tmp_path / "s.txt").write_text(KEY + "\n")
    (tmp_path / "env.txt").write_text("environment-secret-0123456789")
    monkeypatch.setenv("PURIFIER_SECRET_FILE", str(tmp_path / "env.txt"))
    assert load_secret(KEY) == load_secret(KEY.encode()) == load_secret(Path(tmp_path / "s.txt")) == KEY.encode()
    assert load_secret(file=str(tmp_path / "s.txt")) == KEY.encode()  # the flag beats the environment
    assert load_secret() == b"environment-secret-0123456789"
    monkeypatch.setenv("PURIFIER_SECRET", "env-value-secret-0123456789")
    assert load_secret() == b"env-value-secret-0123456789"
    assert load_secret(file=tmp_path / "s.txt") == KEY.encode()


def test_missing_and_short(tmp_path, monkeypatch):
    monkeypatch.delenv("PURIFIER_SECRET", raising=False)
    monkeypatch.delenv("PURIFIER_SECRET_FILE", raising=False)
    assert load_secret(required=False) is None
    with pytest.raises(ConfigError, match="no PRF secret configured"):
        load_secret()
    with pytest.raises(ConfigError, match="does not exist"):
        load_secret(tmp_path / "nope")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_secret(b"short")
