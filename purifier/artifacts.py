"""Reproducible artifacts on disk: atomic directory writes, file hashes, JSON manifests.

Every artifact directory (a target model, a fitted defense, a report) is written into a temporary
sibling and renamed into place at the end, so an interrupted or failed command leaves nothing
half-written behind. Manifests record library versions and sha256 hashes that loaders check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from purifier.errors import ArtifactError, ConfigError


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (plus python), for manifests."""
    out = {"python": platform.python_version()}
    for name in ("purifier", "numpy", "torch", "onnxruntime", *names):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "onnxruntime":
                with contextlib.suppress(metadata.PackageNotFoundError):
                    out[name] = metadata.version("onnxruntime-gpu")
    return out


def check_output_dir(out: str | os.PathLike) -> Path:
    """Validate an output directory argument before any work is done."""
    out = Path(out)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"--out: parent directory {parent} does not exist")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    return out


def new_output_dir(out: str | os.PathLike, force: bool, marker: str | None = None) -> Path:
    """Validate an `--out` that a command will create: refuse an existing one unless `force`, and
    even then unless it is empty or holds `marker`, the file that says it is an earlier output of
    the same command (report.json, tune.json, defense.json): `--force` replaces an earlier output,
    never a directory of other files. Missing parent directories are fine (the writer creates them)."""
    from purifier.untrusted import printable

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    if out.exists() and not force:
        raise ConfigError(f"--out: {out} already exists; choose a new directory or pass --force to replace it")
    if out.exists() and marker is not None and not (out / marker).is_file():
        other = next(out.iterdir(), None)
        if other is not None:
            raise ConfigError(f"--out: {out} holds other files (e.g. {printable(other.name, 80)}) and no {marker}, so it "
                              "is not an earlier output that --force may replace; choose a new directory")
    return out


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only if the block succeeds."""
    out = check_output_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a manifest; a missing or corrupt file is an ArtifactError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what}: {path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what}: {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what}: {path} must hold a JSON object")
    return obj


def require_keys(obj: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ArtifactError(f"{what}: missing field(s) {', '.join(missing)}")


def check_file_hash(path: Path, expected: str, what: str) -> None:
    if not path.is_file():
        raise ArtifactError(f"{what}: {path} does not exist")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"{what}: sha256 of {path.name} is {actual[:12]}..., manifest says {expected[:12]}... "
            "(file corrupt or manifest from another model)"
        )
