"""Red-team: guessable secrets that `load_secret` accepts because of how they are encoded.

`guess_bits` prices every character at 8 bits as soon as one byte is outside printable ASCII, and
finds words only in ASCII letters. So the secrets it refuses as text are accepted once they are
written as UTF-16 (what Windows PowerShell 5's `echo changemechangeme > secret.txt` writes: a BOM
and a NUL after every letter) or are words of a language written outside ASCII (UTF-8 Cyrillic
"парольпароль", "passwordpassword" in Russian, at 16 bits a letter). A famous sentence is priced
like a random passphrase. Expected: refused like their ASCII spellings, with the generation
command.
"""

import pytest

from purifier.defenses import load_secret
from purifier.defenses.keyed import GENERATE_SECRET, guess_bits
from purifier.errors import ConfigError

WEAK = {
    "changemechangeme, UTF-16 with BOM (PowerShell 5 echo >)": "changemechangeme".encode("utf-16"),
    "passwordpassword, UTF-16-LE": "passwordpassword".encode("utf-16-le"),
    "парольпароль (password twice, Russian), UTF-8": "парольпароль".encode(),
    "the best-known pangram": b"The quick brown fox jumps over the lazy dog",
}


@pytest.mark.parametrize("secret", WEAK.values(), ids=WEAK.keys())
def test_guessable_secrets_are_refused_whatever_their_encoding(secret, tmp_path):
    (tmp_path / "secret.txt").write_bytes(secret)
    with pytest.raises(ConfigError) as refused:
        load_secret(file=tmp_path / "secret.txt")
        pytest.fail(f"accepted: estimated at {guess_bits(secret.strip())[0]:.0f} bits")
    assert GENERATE_SECRET in str(refused.value)
