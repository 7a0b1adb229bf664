"""Keyed per-input randomness for defenses.

A served defense must answer the same query with the same vector: if a coin or a noise draw were
re-sampled per query, an attacker could repeat a query until the clean vector shows, and the
difference between answers itself leaks membership (docs/design.md#keyed-randomness). So every
random quantity a defense uses is a deterministic function of

    HMAC-SHA256(secret, model_id || purpose || dtype || row bytes)

where `secret` comes from configuration (never logged), `model_id` names the protected model
(the sha256 of its ONNX file or a configured identity), `purpose` separates independent streams
(the release coin, latent noise, ...), and the row is the clean confidence vector as float64.

Without the secret the outputs are unpredictable; with it they are reproducible. The per-row HMAC
is a Python-level loop over rows (about 1 microsecond each), which is the price of a standard,
auditable PRF; everything after the digests is vectorized.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import numpy as np

from purifier.errors import ConfigError

_U53 = float(2**53)


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
        self._base = hmac.new(bytes(secret), b"purifier-prf-v1\x00" + model_id.encode() + b"\x00",
                              hashlib.sha256)
        self.model_id = model_id

    def digests(self, rows: np.ndarray, purpose: str, blocks: int = 1) -> np.ndarray:
        """Raw digests: (N, 32 * blocks) uint8, one independent stream per row and purpose."""
        rows = np.ascontiguousarray(rows, dtype=np.float64)
        if rows.ndim != 2:
            raise ValueError(f"rows must be 2-D (N, C), got shape {rows.shape}")
        prefix = self._base.copy()
        prefix.update(purpose.encode() + b"\x00" + str(rows.shape[1]).encode() + b"\x00")
        n = rows.shape[0]
        out = bytearray(32 * blocks * n)
        view = memoryview(rows).cast("B")
        width = rows.shape[1] * 8
        pos = 0
        for i in range(n):
            h = prefix.copy()
            h.update(view[i * width:(i + 1) * width])
            for b in range(blocks):
                hb = h.copy()
                hb.update(b.to_bytes(4, "little"))
                out[pos:pos + 32] = hb.digest()
                pos += 32
        return np.frombuffer(bytes(out), dtype=np.uint8).reshape(n, 32 * blocks)

    def uniform(self, rows: np.ndarray, purpose: str, size: int = 1) -> np.ndarray:
        """Uniform floats in [0, 1): (N, size), 53 random bits each."""
        blocks = -(-size // 4)  # four 64-bit words per 32-byte digest
        words = self.digests(rows, purpose, blocks).view("<u8")[:, :size]
        return (words >> np.uint64(11)).astype(np.float64) / _U53

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


def load_secret(value: str | bytes | os.PathLike | None = None, file: str | os.PathLike | None = None, *,
                required: bool = True) -> bytes | None:
    """The PRF secret, from the first of: `value`, the file `file`, $PURIFIER_SECRET, the file named
    by $PURIFIER_SECRET_FILE. Never logged.

    Args:
        value: the secret itself (str or bytes), or a `pathlib.Path` (any os.PathLike) to a file
            holding it: `load_secret(Path("secret.txt"))`.
        file: a path (str or PathLike) to a file holding the secret (surrounding whitespace stripped).
        required: missing -> ConfigError naming the options; else None.

    A fixed secret is what makes answers identical across restarts and replicas; without one, a
    restarted sidecar would answer repeated queries differently and leak through the difference.
    """
    if isinstance(value, os.PathLike):
        value, file = None, value
    if value is None and file is None:
        value = os.environ.get(SECRET_ENV) or None
        file = None if value else (os.environ.get(SECRET_FILE_ENV) or None)
    if value is not None:
        raw = value if isinstance(value, bytes | bytearray) else str(value).encode()
        raw = bytes(raw).strip()
    elif file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"secret_file: {path} does not exist")
        raw = path.read_bytes().strip()
    elif required:
        raise ConfigError(
            f"secret: no PRF secret configured; set {SECRET_ENV}, {SECRET_FILE_ENV} or --secret-file "
            "(e.g. head -c 32 /dev/urandom | base64 > secret.txt)"
        )
    else:
        return None
    if len(raw) < 16:
        raise ConfigError("secret: the PRF secret must be at least 16 bytes")
    return raw
