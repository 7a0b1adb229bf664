"""Strong PRF secrets for tests, from one helper instead of literals in every file.

`load_secret` refuses short, repeated, sequential and dictionary-like secrets, so a test secret has
the shape of the README's `head -c 32 /dev/urandom | base64`: 32 bytes, base64. They are derived
from a label (sha256), not drawn at random, so a failing test reproduces with the same secret.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path


def strong_secret(label: str = "tests") -> bytes:
    """A fixed 44-character base64 secret for `label`; different labels give unrelated secrets."""
    return base64.b64encode(hashlib.sha256(f"purifier-tests/{label}".encode()).digest())


def write_secret(path: str | Path, label: str = "tests") -> Path:
    """Write `strong_secret(label)` to `path` (mode 0600, newline-terminated as a shell would) and return the path."""
    path = Path(path)
    path.write_bytes(strong_secret(label) + b"\n")
    path.chmod(0o600)
    return path


SECRET = strong_secret()
