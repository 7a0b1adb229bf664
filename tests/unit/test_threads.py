import json
import re
import subprocess
import sys
from pathlib import Path

from purifier.threads import POOL_ENV, THREADS, single_threaded

ROOT = Path(__file__).resolve().parents[2]


def test_limit_threads_sizes_loaded_and_later_pools():
    """In a fresh process: numpy's BLAS (loaded before) and torch (imported after) run THREADS threads."""
    code = ("import json, os, numpy\n"
            "from threadpoolctl import threadpool_info\n"
            "from purifier.threads import limit_threads\n"
            "limit_threads()\n"
            "import torch\n"
            "print(json.dumps({'torch': torch.get_num_threads(), 'pools': [p['num_threads'] for p in threadpool_info()],"
            f" 'env': [os.environ[v] for v in {POOL_ENV!r}]}}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["torch"] == THREADS and seen["pools"] and set(seen["pools"]) == {THREADS}, seen
    assert seen["env"] == [str(THREADS)] * len(POOL_ENV)


def test_single_threaded_restores_the_callers_sizes():
    import torch
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads(), [p["num_threads"] for p in threadpool_info()]
    torch.set_num_threads(2)
    try:
        with single_threaded():
            assert torch.get_num_threads() == THREADS
            assert {p["num_threads"] for p in threadpool_info()} == {THREADS}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before[0])
    assert [p["num_threads"] for p in threadpool_info()] == before[1]


def test_pools_are_sized_only_in_purifier_threads():
    """One place: nothing else in the library or the sidecar sets a pool's size."""
    sizing = re.compile(r"set_num_threads|threadpool_limits|_NUM_THREADS\b|_op_num_threads\s*=(?!.*\bTHREADS$)")
    found = [f"{p.relative_to(ROOT)}:{n}" for d in ("purifier", "server") for p in sorted((ROOT / d).rglob("*.py"))
             if p.name != "threads.py" for n, line in enumerate(p.read_text().splitlines(), 1) if sizing.search(line)]
    assert found == []
