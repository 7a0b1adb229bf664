"""`load_secret`: the secret as bytes, str or a path; an explicit source wins over the environment;
short, low-entropy and well-known secrets are refused with the command that makes a strong one."""

import base64
import os
import random
import secrets
import string
import uuid
from pathlib import Path

import pytest
from strong_secret import strong_secret

from purifier.defenses import load_secret
from purifier.defenses.keyed import GENERATE_SECRET, guess_bits, key_check_value, secret_weakness
from purifier.errors import ConfigError

KEY = strong_secret("load-secret").decode()


def test_forms_and_precedence(tmp_path, monkeypatch):
    env_file, env_value = strong_secret("env-file"), strong_secret("env-value")
    (tmp_path / "s.txt").write_text(KEY + "\n")
    (tmp_path / "env.txt").write_bytes(env_file)
    monkeypatch.setenv("PURIFIER_SECRET_FILE", str(tmp_path / "env.txt"))
    assert load_secret(KEY) == load_secret(KEY.encode()) == load_secret(Path(tmp_path / "s.txt")) == KEY.encode()
    assert load_secret(file=str(tmp_path / "s.txt")) == KEY.encode()  # the flag beats the environment
    assert load_secret() == env_file
    monkeypatch.setenv("PURIFIER_SECRET", env_value.decode())
    assert load_secret() == env_value
    assert load_secret(file=tmp_path / "s.txt") == KEY.encode()


def test_missing_and_short(tmp_path, monkeypatch):
    monkeypatch.delenv("PURIFIER_SECRET", raising=False)
    monkeypatch.delenv("PURIFIER_SECRET_FILE", raising=False)
    assert load_secret(required=False) is None
    with pytest.raises(ConfigError, match="no PRF secret configured"):
        load_secret()
    with pytest.raises(ConfigError, match="does not exist"):
        load_secret(tmp_path / "nope")
    with pytest.raises(ConfigError, match="at least 16 random bytes"):
        load_secret(b"short")


WEAK = {
    "16 x a": b"a" * 16,
    "16 NUL bytes": b"\0" * 16,
    "changemechangeme": b"changemechangeme",
    "a repeated pattern": b"abcabcabcabcabcabc",
    "a sequence": b"0123456789abcdef",
    "a sequence twice": b"0123456789abcdef0123456789abcdef",
    "a keyboard row": b"qwertyuiopasdfgh",
    "dictionary words": b"correcthorsebatterystaple",
    "capitalized words": b"CorrectHorseBatteryStaple1!",
    "words and digits": b"0123456789abcdef-test-secret",
    "a password twice": b"passwordpassword",
    "a season twice": b"Summer2024!Summer2024!",
}


@pytest.mark.parametrize("secret", WEAK.values(), ids=WEAK.keys())
def test_weak_secrets_are_refused_with_the_generation_command(secret, tmp_path, monkeypatch):
    (tmp_path / "s.txt").write_bytes(secret)
    for load in (lambda: load_secret(secret), lambda: load_secret(file=tmp_path / "s.txt")):
        with pytest.raises(ConfigError) as e:
            load()
        message = str(e.value)
        assert GENERATE_SECRET in message and "guessable" in message and "\n" not in message
        assert secret.decode("latin-1") not in message  # the refused secret is never echoed
    if b"\0" in secret:
        return  # an environment variable cannot hold NUL bytes
    monkeypatch.setenv("PURIFIER_SECRET", secret.decode("latin-1"))
    with pytest.raises(ConfigError, match=r"\$PURIFIER_SECRET is guessable"):
        load_secret()


# Written in another encoding than ASCII, or in another script: judged as the characters a person
# wrote (PowerShell 5's `echo changemechangeme > secret.txt` writes UTF-16 with a BOM).
WEAK_ENCODED = {
    "changemechangeme, UTF-16 with BOM (PowerShell 5 echo >)": "changemechangeme".encode("utf-16"),
    "passwordpassword, UTF-16-LE": "passwordpassword".encode("utf-16-le"),
    "passwordpassword, UTF-16-BE": "passwordpassword".encode("utf-16-be"),
    "changemechangeme, UTF-8 with BOM": "changemechangeme".encode("utf-8-sig"),
    "парольпароль (password twice, Russian), UTF-8": "парольпароль".encode(),
    "парольпароль, UTF-16 with BOM": "парольпароль".encode("utf-16"),
    "the best-known pangram": b"The quick brown fox jumps over the lazy dog",
    "the pangram without spaces": b"thequickbrownfoxjumpsoverthelazydog",
    "a Russian pangram": "Съешь же ещё этих мягких французских булок да выпей чаю".encode(),
}


@pytest.mark.parametrize("secret", WEAK_ENCODED.values(), ids=WEAK_ENCODED.keys())
def test_guessable_secrets_are_refused_whatever_their_encoding(secret, tmp_path):
    (tmp_path / "secret.txt").write_bytes(secret)
    with pytest.raises(ConfigError) as refused:
        load_secret(file=tmp_path / "secret.txt")
        pytest.fail(f"accepted: estimated at {guess_bits(secret.strip())[0]:.0f} bits")
    assert GENERATE_SECRET in str(refused.value) and "guessable" in str(refused.value)


GENERATED = {
    "README command (32 bytes, base64)": lambda: base64.b64encode(os.urandom(32)),
    "openssl rand -hex 16": lambda: os.urandom(16).hex().encode(),
    "uuid4": lambda: str(uuid.uuid4()).encode(),
    "32 raw random bytes": lambda: secrets.token_bytes(32),
    "token_urlsafe(32)": lambda: secrets.token_urlsafe(32).encode(),
}


@pytest.mark.parametrize("make", GENERATED.values(), ids=GENERATED.keys())
def test_generated_secrets_are_accepted(make):
    for _ in range(200):
        secret = make()
        assert secret_weakness(secret.strip()) is None, guess_bits(secret)


def test_key_check_value_binds_without_revealing():
    a, b = strong_secret("a"), strong_secret("b")
    assert key_check_value(a) == key_check_value(a) != key_check_value(b)
    assert len(key_check_value(a)) == 16 and a.hex() not in key_check_value(a)


def test_random_letters_and_digits_are_rarely_mistaken_for_words():
    """Short letter runs occur by chance in random strings; pricing them as words refused one in
    four random 16-character letters-and-digits secrets. Seeded, so the shares are fixed."""
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits

    def refused_share(length: int, n: int = 400) -> float:
        drawn = ("".join(rng.choice(alphabet) for _ in range(length)).encode() for _ in range(n))
        return sum(secret_weakness(s) is not None for s in drawn) / n

    assert refused_share(16) <= 0.06
    assert refused_share(20) <= 0.01
