"""The shadow cache: hits return what was stored, corrupt entries are detected, reported and
recomputed, --no-cache bypasses it, keys follow content, and a write failure is not fatal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from purifier.attacks.shadow_cache import ShadowCache, array_digest, cached_map, entry_key
from purifier.executor import ExecutorSpec
from purifier.progress import Progress


def _entry(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"probs": rng.dirichlet(np.ones(5), size=7), "train_acc": np.float64(rng.random())}


def _cache(tmp_path, notes=None, **kw) -> ShadowCache:
    return ShadowCache(tmp_path / "cache", notify=(notes.append if notes is not None else print), **kw)


def test_miss_then_hit_returns_the_stored_arrays(tmp_path):
    cache = _cache(tmp_path)
    key = entry_key({"index": 0})
    assert cache.get(key) is None
    cache.put(key, _entry(0), {"index": 0})
    got = cache.get(key, expected={"probs": (7, 5)})
    for name, a in _entry(0).items():
        np.testing.assert_array_equal(got[name], a)
        assert got[name].dtype == np.asarray(a).dtype
    assert (cache.stats.hits, cache.stats.misses, cache.stats.written) == (1, 1, 1)
    npz, meta = cache.paths(key)
    assert json.loads(meta.read_text())["parts"] == {"index": 0}
    assert not list(npz.parent.glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "remove_npz", "wrong_shape"])
def test_corrupt_entry_is_detected_reported_and_dropped(tmp_path, damage):
    notes: list[str] = []
    cache = _cache(tmp_path, notes)
    key = entry_key({"index": 1})
    cache.put(key, _entry(1))
    npz, meta = cache.paths(key)
    expected = {"probs": (7, 5)}
    if damage == "flip_byte":
        raw = bytearray(npz.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        npz.write_bytes(bytes(raw))
    elif damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:100])
    elif damage == "remove_npz":
        npz.unlink()
    else:
        expected = {"probs": (7, 6)}  # e.g. written for another class count
    assert cache.get(key, expected) is None
    assert len(cache.stats.corrupt) == 1 and cache.stats.corrupt[0]["key"] == key
    assert cache.stats.hits == 0 and cache.stats.misses == 1
    assert len(notes) == 1 and "corrupt" in notes[0] and "\n" not in notes[0]
    assert not meta.exists() and not npz.exists()
    cache.put(key, _entry(1))  # the caller retrains and rewrites it
    assert cache.get(key) is not None


def test_an_unfinished_entry_is_a_miss(tmp_path):
    cache = _cache(tmp_path)
    key = entry_key({"index": 2})
    cache.put(key, _entry(2))
    cache.paths(key)[1].unlink()  # the JSON is written last
    assert cache.get(key) is None and not cache.stats.corrupt


def test_disabled_cache_bypasses(tmp_path):
    cache = _cache(tmp_path, enabled=False)
    key = entry_key({"index": 3})
    cache.put(key, _entry(3))
    assert cache.get(key) is None
    assert not (tmp_path / "cache").exists()
    assert cache.stats.report()["enabled"] is False and cache.stats.misses == 0


def test_keys_follow_content():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert array_digest(a) == array_digest(a.copy())
    assert array_digest(a) != array_digest(a.astype(np.float64))
    assert array_digest(a) != array_digest(a.reshape(4, 3))
    assert array_digest(a, a[:1]) != array_digest(a[:1], a)
    base = {"pool": array_digest(a), "recipe": {"name": "mlp", "epochs": 30}, "seed": 0, "index": 0}
    keys = {entry_key(base), entry_key({**base, "seed": 1}), entry_key({**base, "index": 1}),
            entry_key({**base, "recipe": {"name": "mlp", "epochs": 31}})}
    assert len(keys) == 4
    assert entry_key(dict(reversed(list(base.items())))) == entry_key(base)


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pickle"):
        _cache(tmp_path).put(entry_key({}), {"x": np.array([{"a": 1}], dtype=object)})


def test_write_failure_is_reported_not_fatal(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    notes: list[str] = []
    cache = _cache(tmp_path, notes)
    for i in range(2):
        cache.put(entry_key({"index": i}), _entry(i))
    assert len(cache.stats.write_errors) == 2 and len(notes) == 1 and "without caching" in notes[0]
    assert cache.stats.written == 0


def test_cached_map_recomputes_only_misses_and_corrupt_entries(tmp_path):
    calls: list[int] = []

    def compute(scale, seed):
        calls.append(seed)
        return {"probs": _entry(seed)["probs"] * scale}

    tasks = [(seed,) for seed in range(4)]
    keys = [entry_key({"seed": s}) for s in range(4)]
    executor = ExecutorSpec(workers=1)  # in-process: the closure above needs no pickling
    cold_cache = _cache(tmp_path, [])
    with Progress("shadows", 4, enabled=False) as bar:
        cold, used = cached_map(cold_cache, executor, compute, tasks, keys, shared=(1.0,), progress=bar)
    assert calls == [0, 1, 2, 3] and bar.done == 4 and "executor=local" in bar.info
    assert used == {"executor": "local", "workers": 1, "opened": True}
    warm_cache = _cache(tmp_path, [])
    npz = warm_cache.paths(keys[2])[0]
    npz.write_bytes(npz.read_bytes()[:-8])
    with Progress("shadows", 4, enabled=False) as bar:
        warm, _ = cached_map(warm_cache, executor, compute, tasks, keys, shared=(1.0,), progress=bar)
    assert calls[4:] == [2] and bar.done == 4 and "cached=3" in bar.info
    assert warm_cache.stats.hits == 3 and len(warm_cache.stats.corrupt) == 1 and warm_cache.stats.written == 1
    for a, b in zip(cold, warm, strict=True):
        np.testing.assert_array_equal(a["probs"], b["probs"])
    all_hits = _cache(tmp_path, [])
    _, used = cached_map(all_hits, executor, compute, tasks, keys, shared=(1.0,))
    assert len(calls) == 5 and used["opened"] is False  # nothing to train: no executor started
    off = _cache(tmp_path, [], enabled=False)
    cached_map(off, executor, compute, tasks, keys, shared=(1.0,))
    assert calls[5:] == [0, 1, 2, 3]
