"""Load and soak through `benchmarks/bench_load.py`, run as a program (tests never import benchmarks).

A short run is part of `make test`; the long soak is behind the `slow` marker. Both check what
the benchmark measured: zero errors, every answer equal to the clean ORT vector (identity
defense), a clean SIGTERM exit, and resident-memory growth after warm-up below the target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_load.py"


def run_load(tmp_path: Path, model_dir: Path, seconds: float, warmup: float, concurrency: int) -> dict:
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--seconds", str(seconds), "--warmup", str(warmup),
                           "--concurrency", str(concurrency), "--model", str(model_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=seconds + 120)
    assert out.exists(), proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    r = doc["result"]
    print(f"\nload {seconds:g} s @ {concurrency}: codes {r['codes']}, p50 {r['latency']['p50_ms']:.2f} ms, "
          f"p99 {r['latency']['p99_ms']:.2f} ms, {r['throughput_rps']:.0f} req/s, "
          f"RSS {r['rss_baseline_mb']:.1f} -> {r['rss_final_mb']:.1f} MB ({100 * r['rss_growth']:+.2f}%)")
    return doc


def check(doc: dict, max_growth: float) -> None:
    r = doc["result"]
    assert r["errors"] == 0, r["codes"]
    assert r["codes"]["OK"] > 0 and r["wrong_answers"] == 0
    assert r["sidecar_exit_code"] == 0
    assert r["rss_growth"] < max_growth, r["rss_series"]
    table = doc["tables"][0]
    assert len(table["columns"]) == len(table["rows"][0])


def test_short_load_run_has_no_errors_and_bounded_memory(tmp_path, digits_target):
    check(run_load(tmp_path, digits_target.directory, seconds=8, warmup=3, concurrency=16), max_growth=0.10)


@pytest.mark.slow
def test_soak_two_minutes_at_concurrency_32(tmp_path, digits_target):
    check(run_load(tmp_path, digits_target.directory, seconds=120, warmup=15, concurrency=32), max_growth=0.10)
