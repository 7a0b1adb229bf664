"""Timing attack: the membership signal in how long the served endpoint takes to answer.

A defense whose work depends on its own membership verdict leaks that verdict through latency:
MemGuard's Phase I (Jia et al., CCS 2019) once fell back to a longer search only for rows its
defender classifier called members (docs/design.md#attacks-timing). This attack measures that
channel from outside, with the stock OIP client (`tritonclient.grpc` through `RemoteTarget`):

* every audited record and `pool_rows` of the attacker's own pool records are sent as
  single-row requests, all of them in one random interleaved order per pass, `passes` times
  (interleaving spreads the machine's background load evenly over members and non-members);
* per record the `aggregate` ("min" or "median") of its latencies is the score: higher = slower
  = member, the direction of a defense that works harder on what it believes are members;
* the threshold is fitted on the pool records' scores: the pool is disjoint from the target's
  training set, so these are known non-members (`pool_quantile` of their latencies).

Only a remote endpoint has a latency worth measuring: an in-process target is refused.
Shapes: X (N, D) float32 records, scores (N,) float64 latency in seconds.
"""

from __future__ import annotations

import time

import numpy as np

from purifier.attacks.base import Attack, AttackContext, Family
from purifier.errors import ConfigError

AGGREGATES = ("min", "median")


class TimingAttack(Attack):
    """Latency of single-row requests as the membership score.

    Args:
        passes: requests per record (each pass one random interleaved order), >= 1.
        aggregate: "min" or "median" of a record's latencies.
        pool_rows: attacker pool records timed alongside, for the threshold (known non-members).
        pool_quantile: the threshold is this quantile of the pool records' scores.
        warmup: untimed requests before the first pass (connection, caches).
    """

    name = "timing"
    family = Family.TIMING

    def __init__(self, *, passes: int = 5, aggregate: str = "median", pool_rows: int = 200,
                 pool_quantile: float = 0.5, warmup: int = 20, seed: int = 0):
        super().__init__(seed=seed)
        if not isinstance(passes, int) or passes < 1:
            raise ConfigError(f"passes: must be a positive integer, got {passes!r}")
        if aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate: {aggregate!r} is not one of {', '.join(AGGREGATES)}")
        if not 0.0 < pool_quantile < 1.0:
            raise ConfigError(f"pool_quantile: must be in (0, 1), got {pool_quantile!r}")
        self.passes, self.aggregate, self.pool_rows = passes, aggregate, int(pool_rows)
        self.pool_quantile, self.warmup = float(pool_quantile), int(warmup)
        self.pool_X: np.ndarray | None = None
        self.latencies: np.ndarray | None = None

    def fit(self, ctx: AttackContext) -> TimingAttack:
        rng = np.random.default_rng(self.seed)
        pool = ctx.shadows.pool_X
        pick = rng.choice(len(pool), min(self.pool_rows, len(pool)), replace=False)
        self.pool_X = np.ascontiguousarray(pool[np.sort(pick)], np.float32)
        return self

    def run(self, target, X, y, outputs):
        from purifier.models.access import RemoteTarget

        if not isinstance(target, RemoteTarget):
            raise ConfigError("attack timing: needs a remote endpoint (--endpoint HOST:PORT); "
                              f"{target.description} has no latency to measure")
        if self.pool_X is None:
            raise ConfigError("attack timing: call fit() first (it picks the pool records to time)")
        rows = np.concatenate([np.ascontiguousarray(X, np.float32), self.pool_X])
        before = target.queries
        latency = single_row_latencies(target.query, rows, self.passes, self.warmup, self.seed)
        self.latencies = latency  # (passes, N + pool rows) seconds, audited records first
        self.queries = target.queries - before
        scores = aggregate_latencies(latency, self.aggregate)
        n = len(X)
        self.threshold = float(np.quantile(scores[n:], self.pool_quantile))
        self.details = {"passes": self.passes, "aggregate": self.aggregate, "pool_rows_timed": len(self.pool_X),
                        "threshold_from": f"attacker pool records (known non-members), quantile {self.pool_quantile:g}",
                        "median_latency_ms_audited": float(1e3 * np.median(scores[:n])),
                        "median_latency_ms_pool": float(1e3 * np.median(scores[n:])),
                        "timer_resolution_s": time.get_clock_info("perf_counter").resolution}
        return scores[:n]


def single_row_latencies(query, rows: np.ndarray, passes: int, warmup: int = 0, seed: int = 0) -> np.ndarray:
    """(passes, N) seconds per single-row `query(rows[i:i+1])`, each pass in a fresh random order.

    `query` maps (1, D) float32 -> answer; its return value is ignored. The order is one
    permutation per pass from `seed`, so records of every kind share the same moments of load.
    """
    rng = np.random.default_rng(seed)
    n = len(rows)
    for i in rng.integers(0, n, min(warmup, n) if n else 0):
        query(rows[i:i + 1])
    out = np.empty((passes, n))
    clock = time.perf_counter
    for k in range(passes):
        for i in rng.permutation(n):  # one request per row is the measurement itself
            row = rows[i:i + 1]
            t0 = clock()
            query(row)
            out[k, i] = clock() - t0
    return out


def aggregate_latencies(latency: np.ndarray, aggregate: str) -> np.ndarray:
    """(passes, N) -> (N,) per-record minimum or median."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate: {aggregate!r} is not one of {', '.join(AGGREGATES)}")
    return latency.min(axis=0) if aggregate == "min" else np.median(latency, axis=0)
