"""A content-addressed cache of shadow-model outputs, so a rerun does not retrain its shadows.

LiRA needs dozens of shadow models (Carlini et al. 2022, "Membership Inference Attacks From
First Principles"), and the attacker's shadows do not depend on the endpoint under audit, so an
audit of the same records with the same recipe, seed and shadow index reuses what an earlier one
trained. An entry is addressed by a sha256 of everything that determines it (the caller's
`parts`: the hashes of the attacker pool and the candidates, the shadow's training rows, the
recipe, the seed, the index, library versions), so a hit is by construction what training would
have produced.

Entries are arrays only: `<root>/<key[:2]>/<key>.npz` (never pickle) beside `<key>.json` holding
the npz file's size and sha256 and the parts that made the key. A read checks, before hashing or
loading anything, that the metadata is well formed and the file is the size it records and no
larger than MAX_ENTRY_BYTES (also once decompressed), then the hash and the expected array shapes;
a malformed, oversized or corrupt entry is reported in one line, deleted and treated as a miss
(the caller retrains and rewrites it). A failed write is reported and the audit goes on uncached.

Trust boundary: the checks find damage, not tampering. Whoever can write the cache directory can
replace an entry and recompute its hash, and so change audit results without a trace; only the
directory's permissions can prevent that. So the cache refuses (one line, then the audit trains
without it) a directory that is owned by another user or writable by its group or by others, and
creates its directories readable and writable by their owner only.

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
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from purifier.untrusted import printable

CACHE_FORMAT = 2  # 2: the metadata records the entry's size
MAX_ENTRY_BYTES = 1 << 30  # a shadow's outputs and weights are megabytes; more is not an entry of ours
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


def unsafe_directory(root: Path) -> str | None:
    """Why `root` must not hold the cache, in words, or None: owned by another user, or writable by
    its group or by others (who could then rewrite entries, hashes included)."""
    try:
        st = root.stat()
    except OSError:
        return None  # missing: created here, owner-only; unreadable: the read or write says so
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"it is owned by another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"its group or others can write it (mode {st.st_mode & 0o777:o})"
    return None


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
    refused: str | None = None  # why the directory was not used (`unsafe_directory`)

    def report(self) -> dict:
        return {"enabled": self.enabled, "dir": self.root, "hits": self.hits, "misses": self.misses,
                "written": self.written, "corrupt_retrained": self.corrupt, "write_errors": self.write_errors,
                "refused": self.refused}


class ShadowCache:
    """Arrays by key under `root` (default `default_cache_dir()`); `enabled=False` bypasses it.

    `notify(message)` hears about corrupt entries, failed writes and a refused directory (default:
    one stderr line).
    """

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True,
                 notify: Callable[[str], None] = _stderr):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.notify = notify
        self.stats = CacheStats(enabled, str(self.root) if enabled else None)
        if enabled:
            self._refuse_if_unsafe()

    def _refuse_if_unsafe(self) -> bool:
        """Stop using a directory others could write (`unsafe_directory`); True if refused."""
        why = unsafe_directory(self.root)
        if why is None:
            return False
        self.enabled = self.stats.enabled = False
        self.stats.refused = why
        self.notify(f"not using {self.root}: {why}, so whoever can write it could change audit results; training "
                    "without the cache (make it yours with chmod go-w, or choose another with --cache-dir or "
                    "$PURIFIER_CACHE_DIR)")
        return True

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
        except Exception as e:  # damaged or hostile bytes: numpy and zipfile raise many types on them
            reason = printable(e, 200)
            self.stats.misses += 1
            self.stats.corrupt.append({"key": key, "reason": reason})
            self.notify(f"entry {key[:12]} is corrupt ({reason}); retraining it")
            for p in (meta, npz):
                p.unlink(missing_ok=True)
            return None
        self.stats.hits += 1
        return arrays

    @staticmethod
    def _read(npz: Path, meta: Path, expected: Expected | None) -> dict[str, np.ndarray]:
        """The entry's arrays; ValueError (or an I/O or zip error) naming what is wrong with it."""
        from purifier.artifacts import sha256_file

        if meta.stat().st_size > 1 << 20:
            raise ValueError("metadata file larger than 1 MiB")
        doc = json.loads(meta.read_text())
        if not (isinstance(doc, dict) and isinstance(doc.get("sha256"), str) and type(doc.get("bytes")) is int):
            raise ValueError("malformed metadata (a JSON object with sha256 and bytes is expected)")
        size = npz.stat().st_size
        if size > MAX_ENTRY_BYTES:
            raise ValueError(f"{size:,} bytes, more than an entry may hold ({MAX_ENTRY_BYTES:,})")
        if size != doc["bytes"]:
            raise ValueError(f"{size:,} bytes, the metadata says {doc['bytes']:,}")
        if sha256_file(npz) != doc["sha256"]:
            raise ValueError("sha256 mismatch")
        with zipfile.ZipFile(npz) as zf:
            unpacked = sum(i.file_size for i in zf.infolist())
        if unpacked > MAX_ENTRY_BYTES:
            raise ValueError(f"{unpacked:,} bytes once unpacked, more than an entry may hold ({MAX_ENTRY_BYTES:,})")
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
        nbytes = sum(a.nbytes for a in arrays.values())
        if nbytes > MAX_ENTRY_BYTES:  # it would be refused on reading
            self.stats.write_errors.append(f"entry {key[:12]} holds {nbytes:,} bytes, more than {MAX_ENTRY_BYTES:,}")
            self.notify(f"entry {key[:12]} is too large to cache ({nbytes:,} bytes); continuing without it")
            return
        npz, meta = self.paths(key)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._refuse_if_unsafe():  # created meanwhile by someone else
                return
            npz.parent.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:12]}.", suffix=".npz", dir=npz.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, allow_pickle=False, **arrays)
                digest = sha256_file(tmp)
                os.replace(tmp, npz)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            doc = {"format": CACHE_FORMAT, "sha256": digest, "bytes": npz.stat().st_size, "parts": dict(parts or {})}
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
