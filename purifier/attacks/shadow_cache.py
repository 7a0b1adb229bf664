"""A content-addressed cache of shadow-model outputs, so a rerun does not retrain its shadows.

LiRA needs dozens of shadow models (Carlini et al. 2022, "Membership Inference Attacks From
First Principles"), and the attacker's shadows do not depend on the endpoint under audit, so an
audit of the same records with the same recipe, seed and shadow index reuses what an earlier one
trained. An entry is addressed by a sha256 of everything that determines it (the caller's
`parts`: the hashes of the attacker pool and the candidates, the shadow's training rows, the
recipe, the seed, the index, library versions), so a hit is by construction what training would
have produced.

Entries are arrays only: `<root>/<key[:2]>/<key>.npz` (never pickle) beside `<key>.json` holding
the npz file's sha256 and the parts that made the key. A read checks the hash and the expected
array shapes; a corrupt entry is reported, deleted and treated as a miss (the caller retrains
and rewrites it). A failed write is reported and the audit goes on uncached.

What an entry holds: a shadow's outputs on the rows every attack queries (attacker pool and
candidates) and, when the recipe's model is arrays (the torch recipes: their weights), the model,
so the attacks that query a shadow on new inputs (label-only augmentation, boundary search)
rebuild it exactly. A recipe without an array form (scikit-learn, `module:function`; only pickle
would store them) has just its outputs cached, and the few shadows those attacks query are
retrained on demand: seeded training gives the same model. Caching outputs on every query set
instead would tie entries to each attack's augmentations and seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1
Expected = Mapping[str, tuple[int, ...]]  # array name -> shape
CACHE_DIR_ENV = "PURIFIER_CACHE_DIR"


def default_cache_dir() -> Path:
    """$PURIFIER_CACHE_DIR, else $XDG_CACHE_HOME/purifier/shadows, else ~/.cache/purifier/shadows."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "purifier" / "shadows"


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 over the dtype, shape and bytes of each array (the content, not the object)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def entry_key(parts: Mapping) -> str:
    """sha256 of the canonical JSON of `parts` (and the cache format)."""
    doc = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


def _stderr(msg: str) -> None:
    print(f"purifier: shadow cache: {msg}", file=sys.stderr, flush=True)


@dataclass
class CacheStats:
    """What the cache did in one run, for the report."""

    enabled: bool
    root: str | None
    hits: int = 0
    misses: int = 0
    written: int = 0
    corrupt: list[dict] = field(default_factory=list)  # {"key", "reason"}: detected and retrained
    write_errors: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {"enabled": self.enabled, "dir": self.root, "hits": self.hits, "misses": self.misses,
                "written": self.written, "corrupt_retrained": self.corrupt, "write_errors": self.write_errors}


class ShadowCache:
    """Arrays by key under `root` (default `default_cache_dir()`); `enabled=False` bypasses it.

    `notify(message)` hears about corrupt entries and failed writes (default: one stderr line).
    """

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True,
                 notify: Callable[[str], None] = _stderr):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.notify = notify
        self.stats = CacheStats(enabled, str(self.root) if enabled else None)

    def paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.npz", folder / f"{key}.json"

    def get(self, key: str, expected: Expected | None = None) -> dict[str, np.ndarray] | None:
        """The arrays stored under `key`, or None (a miss; a corrupt entry counts as one)."""
        if not self.enabled:
            return None
        npz, meta = self.paths(key)
        if not meta.exists():  # the JSON is written last: without it the entry never finished
            self.stats.misses += 1
            return None
        try:
            arrays = self._read(npz, meta, expected)
        except (OSError, ValueError, KeyError) as e:
            self.stats.misses += 1
            self.stats.corrupt.append({"key": key, "reason": str(e)})
            self.notify(f"entry {key[:12]} is corrupt ({e}); retraining it")
            for p in (meta, npz):
                p.unlink(missing_ok=True)
            return None
        self.stats.hits += 1
        return arrays

    @staticmethod
    def _read(npz: Path, meta: Path, expected: Expected | None) -> dict[str, np.ndarray]:
        from purifier.artifacts import sha256_file

        want = json.loads(meta.read_text())["sha256"]
        if sha256_file(npz) != want:
            raise ValueError("sha256 mismatch")
        with np.load(npz, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
        for name, shape in (expected or {}).items():
            a = arrays.get(name)
            if a is None or a.shape != tuple(shape):
                raise ValueError(f"array {name!r} has shape {None if a is None else a.shape}, expected {tuple(shape)}")
        return arrays

    def put(self, key: str, arrays: Mapping[str, np.ndarray], parts: Mapping | None = None) -> None:
        """Store `arrays` under `key` (atomic: a reader sees the whole entry or none)."""
        if not self.enabled:
            return
        from purifier.artifacts import sha256_file

        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if any(a.dtype.hasobject for a in arrays.values()):
            raise ValueError("shadow cache entries are numeric arrays (object arrays would need pickle)")
        npz, meta = self.paths(key)
        try:
            npz.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:12]}.", suffix=".npz", dir=npz.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, allow_pickle=False, **arrays)
                digest = sha256_file(tmp)
                os.replace(tmp, npz)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            doc = {"format": CACHE_FORMAT, "sha256": digest, "parts": dict(parts or {})}
            tmp_meta = meta.with_name(f".{meta.name}.{os.getpid()}")
            tmp_meta.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            os.replace(tmp_meta, meta)
            self.stats.written += 1
        except OSError as e:
            self.stats.write_errors.append(str(e))
            if len(self.stats.write_errors) == 1:
                self.notify(f"cannot write to {self.root} ({e}); continuing without caching")


def cached_map(cache: ShadowCache, executor, fn: Callable, tasks: Sequence[tuple], keys: Sequence[str],
               shared: tuple = (), expected: Expected | None = None, parts: Sequence[Mapping] | None = None,
               progress=None) -> tuple[list[dict[str, np.ndarray]], dict]:
    """`fn(*shared, *task)` for the tasks whose key misses the cache, cache hits for the rest.

    Args:
        executor: a `purifier.executor.ExecutorSpec`, opened (a local Ray started, a cluster
            joined) only if some task misses, and closed at the end.
        fn: returns a dict of arrays (the entry), stored as soon as its task finishes, so an
            interrupted run keeps what it finished.
        progress: a `purifier.progress.Progress` of len(tasks), advanced on hits and on finished
            tasks, showing the executor's name and the hits.
    Returns:
        (entries in task order, the executor's `describe()`, or the spec's if none was opened).
    """
    if len(keys) != len(tasks):
        raise ValueError("one key per task")
    entries: list = [cache.get(k, expected) for k in keys]
    todo = [i for i, e in enumerate(entries) if e is None]
    described = {**executor.describe(), "opened": False}

    def advance(n: int) -> None:
        if progress is not None and n:
            progress.update(n, executor=described["executor"], cached=cache.stats.hits)

    advance(len(tasks) - len(todo))

    def done(j: int, result: dict) -> None:
        i = todo[j]
        entries[i] = result
        cache.put(keys[i], result, parts[i] if parts is not None else None)
        advance(1)

    if todo:
        with executor.open() as ex:
            described = {**ex.describe(), "opened": True}
            ex.map(fn, [tasks[i] for i in todo], shared, on_done=done)
    return entries, described
