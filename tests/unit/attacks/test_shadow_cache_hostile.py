"""The shadow cache as an attack surface: a malformed or oversized entry is a miss with one warning
(never a crash, never gigabytes loaded), and a directory others can write is not used (issue 21,
item 8). The trust boundary: an entry rewritten with its hash recomputed is only prevented by who
can write the directory, which is why such directories are refused."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

from purifier.attacks import shadow_cache
from purifier.attacks.shadow_cache import ShadowCache, entry_key

MAX_ENTRY_BYTES = getattr(shadow_cache, "MAX_ENTRY_BYTES", 1 << 30)  # (getattr: the test also runs against older code)


def _cache(root, notes):
    return ShadowCache(root, notify=notes.append)


def _entry() -> dict[str, np.ndarray]:
    return {"probs": np.random.default_rng(0).dirichlet(np.ones(5), size=7)}


def _rehash(npz, meta) -> None:
    """What someone who can write the cache does after changing an entry: recompute its metadata."""
    doc = json.loads(meta.read_text())
    doc["sha256"] = hashlib.sha256(npz.read_bytes()).hexdigest()
    doc["bytes"] = npz.stat().st_size
    meta.write_text(json.dumps(doc))


@pytest.mark.parametrize("metadata", ["[]", "null", '"x"', '{"sha256": 5}', "{", "\xff"])
def test_malformed_metadata_is_a_miss_with_one_warning_not_a_crash(tmp_path, metadata):
    notes: list[str] = []
    key = entry_key({"i": 0})
    cache = _cache(tmp_path / "c", notes)
    cache.put(key, _entry())
    npz, meta = cache.paths(key)
    meta.write_text(metadata, encoding="latin-1")
    assert cache.get(key, {"probs": (7, 5)}) is None
    assert len(notes) == 1 and "corrupt" in notes[0] and cache.stats.misses == 1
    later = _cache(tmp_path / "c", [])  # every later audit: the entry is gone, retrained, a hit again
    assert later.get(key) is None
    later.put(key, _entry())
    assert _cache(tmp_path / "c", []).get(key, {"probs": (7, 5)}) is not None


def test_an_oversized_entry_is_refused_before_it_is_loaded(tmp_path):
    notes: list[str] = []
    key = entry_key({"i": 1})
    cache = _cache(tmp_path / "c", notes)
    cache.put(key, _entry())
    npz, meta = cache.paths(key)
    extra = MAX_ENTRY_BYTES + (64 << 20)  # an extra array past the limit, deflated to about a megabyte
    with zipfile.ZipFile(npz, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("extra.npy", "w", force_zip64=True) as f:
            header = np.lib.format
            import io

            buf = io.BytesIO()
            header.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (extra,)})
            f.write(buf.getvalue())
            chunk = bytes(16 << 20)
            for _ in range(extra // len(chunk)):
                f.write(chunk)
    _rehash(npz, meta)
    tracemalloc.start()
    try:
        assert cache.get(key, {"probs": (7, 5)}) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert len(notes) == 1 and "more than an entry may hold" in notes[0] and not npz.exists()


def test_an_entry_grown_behind_the_metadatas_back_is_a_miss(tmp_path):
    notes: list[str] = []
    key = entry_key({"i": 2})
    cache = _cache(tmp_path / "c", notes)
    cache.put(key, _entry())
    npz, _ = cache.paths(key)
    with zipfile.ZipFile(npz, "a") as zf:
        zf.writestr("extra.npy", bytes(1 << 20))
    assert cache.get(key) is None and "the metadata says" in notes[0]


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "another-owner"])
def test_a_directory_others_can_write_is_not_used(tmp_path, how):
    root = tmp_path / "shared"
    root.mkdir(mode=0o700)
    good = _cache(root, [])
    key = entry_key({"i": 3})
    good.put(key, _entry())
    if how == "world-writable":
        root.chmod(0o777)
    elif how == "group-writable":
        root.chmod(0o770)
    else:
        if os.geteuid() != 0:
            pytest.skip("changing a directory's owner needs root")
        os.chown(root, 65534, 65534)
    notes: list[str] = []
    cache = _cache(root, notes)
    assert len(notes) == 1 and "not using" in notes[0] and "training without the cache" in notes[0]
    assert not cache.enabled and cache.stats.report()["refused"]
    assert cache.get(key) is None  # the entry is there, and not trusted
    cache.put(entry_key({"i": 4}), _entry())
    assert not cache.paths(entry_key({"i": 4}))[0].exists() and len(notes) == 1


def test_the_cache_creates_its_directories_for_its_owner_only(tmp_path):
    cache = _cache(tmp_path / "new" / "cache", [])
    key = entry_key({"i": 5})
    cache.put(key, _entry())
    assert (tmp_path / "new" / "cache").stat().st_mode & 0o077 == 0
    assert cache.paths(key)[0].parent.stat().st_mode & 0o077 == 0
