"""Keyed per-input randomness for defenses.

A served defense must answer the same query with the same vector: if a coin or a noise draw were
re-sampled per query, an attacker could repeat a query until the clean vector shows, and the
difference between answers itself leaks membership (docs/design.md#keyed-randomness). So every
random quantity a defense uses is a deterministic function of

    HMAC-SHA256(secret, model_id || purpose || dtype || row bytes)

where `secret` comes from configuration (never logged), `model_id` names the protected model
(the sha256 of its ONNX file or a configured identity), `purpose` separates independent streams
(the release coin, latent noise, ...), and the row is the clean confidence vector as float64.

Without the secret the outputs are unpredictable; with it they are reproducible. The secret must be
strong (`load_secret` refuses short, repeated, sequential or dictionary-like ones), and a fitted
defense is bound to it: its `defense.json` records the secret's key check value
(`key_check_value`), and loading it with another secret is refused. The per-row HMAC
is a Python-level loop over rows, which is the price of a standard, auditable PRF; everything
after the digests is vectorized. HMAC is computed as RFC 2104 defines it, from hashlib's SHA-256
states with the key's inner and outer pads hashed once: the digests of `hmac.new`, without the
hmac module's Python wrapper around every row's copy, update and digest.
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
import math
import os
import re
import unicodedata
from pathlib import Path

import numpy as np

from purifier.errors import ConfigError

_INV_U53 = 2.0**-53
_SHIFT = np.uint64(11)  # 64 random bits -> 53
_SHA256_BLOCK = 64  # bytes: HMAC pads (or hashes) the key to the hash's block size


class KeyedPRF:
    """Deterministic pseudo-random numbers keyed by a secret and the input row.

    Args:
        secret: the PRF key; at least 16 bytes.
        model_id: identity of the protected model, mixed into every digest so two models
            behind one sidecar get independent streams.
    """

    def __init__(self, secret: bytes, model_id: str):
        if not isinstance(secret, bytes | bytearray) or len(secret) < 16:
            raise ConfigError("secret: the PRF secret must be at least 16 bytes")
        key = bytes(secret)
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))  # RFC 2104: H(K ^ ipad || message)
        self._inner.update(b"purifier-prf-v1\x00" + model_id.encode() + b"\x00")
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))  # and H(K ^ opad || inner digest)
        self._prefixes: dict[tuple[str, int], hashlib._Hash] = {}
        self.model_id = model_id

    def digests(self, rows: np.ndarray, purpose: str, blocks: int = 1) -> np.ndarray:
        """Raw digests: (N, 32 * blocks) uint8, one independent stream per row and purpose."""
        out, n = self._digest_bytes(rows, purpose, blocks)
        digests = np.frombuffer(out, dtype=np.uint8).reshape(n, 32 * blocks)
        digests.flags.writeable = False  # as before: the digests are not a scratch buffer
        return digests

    def _digest_bytes(self, rows: np.ndarray, purpose: str, blocks: int) -> tuple[bytearray, int]:
        """`digests` as one buffer of N * 32 * blocks bytes, and N."""
        rows = np.ascontiguousarray(rows, dtype=np.float64)
        if rows.ndim != 2:
            raise ValueError(f"rows must be 2-D (N, C), got shape {rows.shape}")
        prefix, outer = self._prefix(purpose, rows.shape[1]), self._outer
        n = rows.shape[0]
        out = bytearray(32 * blocks * n)
        view = rows.data.cast("B")
        width = rows.shape[1] * 8
        pos = 0
        for i in range(n):
            h = prefix.copy()
            h.update(view[i * width:(i + 1) * width])
            for b in range(blocks):
                hb = h.copy() if b + 1 < blocks else h  # the last block finishes the row's own copy
                hb.update(b.to_bytes(4, "little"))
                o = outer.copy()
                o.update(hb.digest())
                out[pos:pos + 32] = o.digest()
                pos += 32
        return out, n

    def _prefix(self, purpose: str, width: int):
        """The inner hash's state after the key, model id, purpose and row width: made once per stream."""
        key = (purpose, width)
        if key not in self._prefixes:
            prefix = self._inner.copy()
            prefix.update(purpose.encode() + b"\x00" + str(width).encode() + b"\x00")
            self._prefixes[key] = prefix
        return self._prefixes[key]

    def uniform(self, rows: np.ndarray, purpose: str, size: int = 1) -> np.ndarray:
        """Uniform floats in [0, 1): (N, size), 53 random bits each."""
        blocks = -(-size // 4)  # four 64-bit words per 32-byte digest
        out, n = self._digest_bytes(rows, purpose, blocks)
        if n == 1 and blocks == 1:  # one-row requests, the hot path: one numpy call instead of five
            return np.array([[(int.from_bytes(out[8 * j:8 * j + 8], "little") >> 11) * _INV_U53
                              for j in range(size)]])  # the same exact values as below
        words = np.frombuffer(out, dtype="<u8").reshape(n, 4 * blocks)[:, :size]
        return (words >> _SHIFT) * _INV_U53  # exact: a 53-bit integer times 2**-53

    def normal(self, rows: np.ndarray, purpose: str, size: int) -> np.ndarray:
        """Standard normal draws: (N, size), by Box-Muller on keyed uniforms."""
        half = -(-size // 2)
        u = self.uniform(rows, purpose, 2 * half)
        u1 = 1.0 - u[:, :half]  # in (0, 1], so log is finite
        u2 = u[:, half:]
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)
        return z[:, :size]


SECRET_ENV, SECRET_FILE_ENV = "PURIFIER_SECRET", "PURIFIER_SECRET_FILE"
MIN_SECRET_BYTES = 16
# Refuse secrets whose guessability estimate (`guess_bits`) is below this. The README's command
# (32 random bytes, base64) estimates at 150 bits or more, 16 random bytes as hex (`openssl rand
# -hex 16`) at 95 or more, a UUID4 at 145 or more; `changemechangeme` estimates at 15, a
# four-word passphrase at 50 to 70.
MIN_SECRET_BITS = 72
GENERATE_SECRET = "head -c 32 /dev/urandom | base64 > secret.txt"
KEY_CHECK_LABEL = b"purifier-key-check-v1"

# Words people put in secrets they choose by hand (matched case-insensitively, in any script); a
# longer word of a language is caught by the letter-run rule of `guess_bits`.
COMMON_WORDS = frozenset("""
password passwd pass secret secrets changeme change default admin root user login letmein welcome hello
master monkey dragon qwerty qwertz azerty iloveyou princess sunshine shadow football baseball superman
batman trustno1 test testing example sample demo key keys token private purifier memguard model server
production prod staging dev local localhost abc xyz foo bar baz qux hunter summer winter spring autumn
love god money freedom whatever nothing access company secure security internal dummy temp insecure
unsafe please notsecret mysecret mykey apikey api hmac prf salt pepper sha256 base64 random
passwort geheim kennwort motdepasse contraseña segreto senha wachtwoord hasło пароль секрет ключ
""".split())
# Sentences everyone knows (pangrams, placeholder text, quotations, the passphrase of the xkcd comic):
# each is one guess from a short list, however many words it has. Matched case-insensitively with
# any separators between the words (or none).
WELL_KNOWN_PHRASES = (
    "the quick brown fox jumps over the lazy dog", "the five boxing wizards jump quickly",
    "pack my box with five dozen liquor jugs", "sphinx of black quartz judge my vow",
    "how vexingly quick daft zebras jump", "jackdaws love my big sphinx of quartz",
    "lorem ipsum dolor sit amet consectetur adipiscing elit", "correct horse battery staple",
    "to be or not to be that is the question", "may the force be with you", "hello world",
    "all your base are belong to us", "open sesame", "i am the walrus", "the cake is a lie",
    "franz jagt im komplett verwahrlosten taxi quer durch bayern",
    "voix ambiguë d'un cœur qui au zéphyr préfère les jattes de kiwis",
    "съешь же ещё этих мягких французских булок да выпей чаю",
)
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm", "1234567890", "qazwsxedcrfvtgbyhnujmikolp",
                 "1qaz2wsx3edc4rfv5tgb6yhn", "йцукенгшщзхъ", "фывапролджэ", "ячсмитьбю")
_MIN_WORD = 5  # shortest ASCII letter run priced as a word (`_reads_like_a_word`)
_CONSONANTS_4 = re.compile("[^aeiouy]{4,}")
_VOWELS_3 = re.compile("[aeiouy]{3,}")
_SEPARATORS = frozenset(" -_.")
_MAX_PATTERN = 32      # longest single pattern considered (bounds the work)
_MAX_ANALYZED = 128    # characters analyzed; a longer secret is judged by its first 128
_PHRASES = re.compile("|".join(r"[\W_]*".join(map(re.escape, re.findall(r"\w+", phrase)))
                               for phrase in WELL_KNOWN_PHRASES), re.IGNORECASE)
# Letters of one script (per Unicode name's first word) a random string over that script draws from:
# about 64 for an alphabet (both cases, accents), the common ideographs or syllables otherwise.
_SCRIPT_SIZES = {"CJK": 2**14, "HANGUL": 11172}


def _as_text(secret: bytes) -> str | None:
    """The characters a person wrote, whatever the file's encoding (a BOM, UTF-16 as Windows tools
    write it, UTF-8), or None for bytes that are not printable text (random binary secrets)."""
    candidates = []
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                       (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                       (codecs.BOM_UTF16_BE, "utf-16")):
        if secret.startswith(bom):
            candidates = [codec]
            break
    else:
        # UTF-16 without a BOM: text of one or two scripts keeps the high byte of every character
        # within two values (NUL for ASCII); random bytes almost never do.
        for codec, high in (("utf-16-le", secret[1::2]), ("utf-16-be", secret[0::2])):
            if len(secret) % 2 == 0 and len(set(high)) <= 2:
                candidates.append(codec)
        candidates.append("utf-8")
    for codec in candidates:
        try:
            text = secret.decode(codec).strip()
        except UnicodeDecodeError:
            continue
        if text and text.isprintable():
            return text
    return None


def _alphabet_bits(text: str) -> float:
    """Bits per character of a random string over the character classes `text` uses."""
    if all(32 <= ord(c) <= 126 for c in text) and (
            all(c in "0123456789abcdef" for c in text) or all(c in "0123456789ABCDEF" for c in text)):
        return 4.0  # hex
    size = sum(n for chars, n in (("0123456789", 10), ("abcdefghijklmnopqrstuvwxyz", 26),
                                  ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 26)) if any(c in chars for c in text))
    size += 33 * any(ord(c) < 127 and not c.isalnum() for c in text)
    scripts = {unicodedata.name(c, "OTHER").split()[0] for c in text if ord(c) > 126}
    size += sum(_SCRIPT_SIZES.get(script, 64) for script in scripts)
    return math.log2(max(size, 2))


def guess_bits(secret: bytes) -> tuple[float, list[str]]:
    """A conservative estimate of how many bits an attacker needs to guess `secret`, and the
    patterns that lowered it.

    The secret is judged as the characters a person wrote (decoded from UTF-8, or UTF-16 with or
    without a BOM), so an encoding adds nothing; bytes that are not text are judged as bytes. The
    cheapest split of it into pieces, each priced by the simplest way to produce it (the
    minimum-description idea behind password-strength meters such as zxcvbn): a character at the
    bits of its character classes (4 for hex, about 6 for base64, 8 for binary bytes, more for a
    script's letters); a run of one character, a piece seen earlier in the secret, a sequence
    ("0123", "fedc"), a common word, a keyboard row, a well-known sentence: a few bits each; a
    letter run that reads like a word (one case pattern, with a vowel when in ASCII; any script):
    2 bits a letter; a separator (space, "-", "_", "."): 2 bits. Random secrets lose little to
    chance patterns; chosen ones lose most of their length.
    """
    decoded = _as_text(secret)
    text = (decoded if decoded is not None else secret.decode("latin-1"))[:_MAX_ANALYZED]
    n, per = len(text), (8.0 if decoded is None else _alphabet_bits(text))
    best = [0.0] + [math.inf] * n
    how: list[tuple[int, str]] = [(0, "")] * (n + 1)  # (start of the last piece, its pattern)
    for i in range(n):
        for j, bits, kind in _pieces(text, i, per):
            if best[i] + bits < best[j]:
                best[j], how[j] = best[i] + bits, (i, kind)
    kinds, j = [], n
    while j > 0:
        j, kind = how[j]
        if kind and kind not in kinds:
            kinds.append(kind)
    return best[n], kinds[::-1]


def _reads_like_a_word(piece: str) -> bool:
    """A letter run of one case pattern that could be a word. In ASCII it must also be
    pronounceable (a vowel in every four letters, no three vowels in a row) and five letters or
    longer: random strings are full of short letter runs, and pricing those as words refused one in
    four random 16-character letters-and-digits secrets (shorter real words are in COMMON_WORDS)."""
    if not piece.isalpha():
        return False
    if piece.isascii():
        low = piece.lower()
        if len(piece) < _MIN_WORD or _CONSONANTS_4.search(low) or _VOWELS_3.search(low):
            return False
    uncased = not any(c.islower() or c.isupper() for c in piece)
    return uncased or piece.islower() or piece.isupper() or (piece[0].isupper() and piece[1:].islower())


def _pieces(text: str, i: int, per: float):
    """(end, bits, pattern) of every priced piece of `text` starting at i (`guess_bits`)."""
    yield i + 1, (2.0 if text[i] in _SEPARATORS and per < 8 else per), ""
    phrase = _PHRASES.match(text, i)
    if phrase and phrase.end() > i:
        yield phrase.end(), math.log2(len(WELL_KNOWN_PHRASES)) + 2, "well-known sentences"
    low = text.lower()
    for j in range(i + 3, min(len(text), i + _MAX_PATTERN) + 1):
        piece, length = text[i:j], j - i
        if _reads_like_a_word(piece):
            yield j, 2.0 * length + (not piece.islower()), "words"
        if len(set(piece)) == 1:
            yield j, per + math.log2(length), "repeats"
        elif piece in text[:i]:
            yield j, math.log2(i) + math.log2(length) + 1, "repeats"
        step = ord(piece[1]) - ord(piece[0])
        if step in (-2, -1, 1, 2) and all(ord(b) - ord(a) == step for a, b in zip(piece, piece[1:], strict=False)):
            yield j, per + math.log2(length) + 2, "sequences"
        if low[i:j] in COMMON_WORDS:
            yield j, math.log2(len(COMMON_WORDS)) + 1, "common words"
        elif length >= 4 and any(low[i:j] in row or low[i:j][::-1] in row for row in KEYBOARD_ROWS):
            yield j, 6 + math.log2(length), "keyboard rows"


def secret_weakness(secret: bytes) -> str | None:
    """Why `secret` is too weak to key the PRF, in words (never quoting it), or None if it is strong."""
    if len(secret) < MIN_SECRET_BYTES:
        return f"is {len(secret)} bytes; it must be at least {MIN_SECRET_BYTES} random bytes"
    bits, kinds = guess_bits(secret)
    if bits < MIN_SECRET_BITS:
        made = f" (it is made of {', '.join(kinds)})" if kinds else ""
        return (f"is guessable: about {bits:.0f} bits by a conservative estimate, below the {MIN_SECRET_BITS} "
                f"required{made}")
    return None


def key_check_value(secret: bytes) -> str:
    """A key check value: the first 8 bytes of HMAC-SHA256(secret, a fixed label), as hex.

    Saved in a fitted defense's `defense.json` so that loading it with another secret is refused.
    It reveals nothing usable about a strong secret: finding a secret that matches means searching
    a space of 2**64 and more, and for a secret of more than 64 bits many secrets share each value,
    so a match does not even confirm a guess."""
    return hmac.new(bytes(secret), KEY_CHECK_LABEL, hashlib.sha256).digest()[:8].hex()


def load_secret(value: str | bytes | os.PathLike | None = None, file: str | os.PathLike | None = None, *,
                required: bool = True) -> bytes | None:
    """The PRF secret, from the first of: `value`, the file `file`, $PURIFIER_SECRET, the file named
    by $PURIFIER_SECRET_FILE. Never logged.

    Args:
        value: the secret itself (str or bytes), or a `pathlib.Path` (any os.PathLike) to a file
            holding it: `load_secret(Path("secret.txt"))`.
        file: a path (str or PathLike) to a file holding the secret (surrounding whitespace stripped).
        required: missing -> ConfigError naming the options; else None.
    Raises ConfigError for a secret shorter than 16 bytes or a guessable one (`secret_weakness`:
    repeated, sequential, dictionary-like), with the command that makes a strong one.

    A fixed secret is what makes answers identical across restarts and replicas; without one, a
    restarted sidecar would answer repeated queries differently and leak through the difference.
    """
    if isinstance(value, os.PathLike):
        value, file = None, value
    where = "the secret"
    if value is None and file is None:
        value = os.environ.get(SECRET_ENV) or None
        file = None if value else (os.environ.get(SECRET_FILE_ENV) or None)
        where = f"${SECRET_ENV}" if value else f"the file in ${SECRET_FILE_ENV}"
    if value is not None:
        raw = value if isinstance(value, bytes | bytearray) else str(value).encode()
        raw = bytes(raw).strip()
    elif file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"secret_file: {path} does not exist")
        raw = path.read_bytes().strip()
        where = f"the secret in {path}"
    elif required:
        raise ConfigError(
            f"secret: no PRF secret configured; set {SECRET_ENV}, {SECRET_FILE_ENV} or --secret-file "
            f"(e.g. {GENERATE_SECRET})"
        )
    else:
        return None
    why = secret_weakness(raw)
    if why is not None:
        raise ConfigError(f"secret: {where} {why}; make a strong one with {GENERATE_SECRET}")
    return raw
