"""Defense throughput and per-call latency on one CPU core: identity vs MemGuard (faithful, fast).

Run: `.venv/bin/python -m benchmarks.bench_defense` -> benchmarks/results/defense.json and a table.

Each entry of `CASES` is one named defense; every case runs at every batch size and class count
in one process, so the ratios compare like with like. To add a defense, append a `Case` whose
`build(workload)` returns a fitted `Defense` (e.g. "purifier", "purifier+swap").

Workload: no target with 100 classes trains in seconds here, so both class counts use synthetic
confidence vectors: softmax of N(0, 1) logits with the true class raised by 7 (members, sharper)
or 4 (non-members); MemGuard's classifier is trained on 1,000 of each (Adam, 10 epochs; the training
schedule changes the classifier, not the cost per Phase I step). torch, ORT and numpy's BLAS run on
one thread each (`purifier.threads`): the "one CPU core" figures of the issue.
The faithful solver takes seconds per call on big batches: above 16 rows it is timed on
`Case.max_rows` (16) rows per call and its vectors/s computed from those rows (flagged in the
JSON as bounded).

`--baseline FILE` adds a table comparing memguard-fast with the memguard-fast rows of an earlier
run's JSON (a solver that no longer exists to run side by side: the early-exit solver in
benchmarks/results/defense_before_constant_work.json, or the numpy constant-work solver in a
defense.json recorded before the ONNX graph replaced it; each file carries its load averages).
"""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_info

from benchmarks.common import summarize, time_calls, write_result
from purifier.defenses.base import Defense, FitData, IdentityDefense
from purifier.defenses.memguard import MemGuard
from purifier.defenses.purifier_net import PurifierNet
from purifier.threads import THREADS, limit_threads

SECRET = secrets.token_bytes(32)  # a throwaway key: the timings do not depend on it
N_FEATURES = 16
BATCHES = (1, 16, 256, 1024)
CLASS_COUNTS = (10, 100)


@dataclass(frozen=True)
class Workload:
    """Synthetic target outputs for one class count: fit data and a pool of rows to defend."""

    n_classes: int
    fit: FitData
    pool: np.ndarray  # (1024, C) float32, half training members, half fresh non-member-like rows
    inputs: np.ndarray  # (1024, N_FEATURES) the request rows behind `pool` (PURIFIER's swapper reads them)


def make_workload(n_classes: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)

    def outputs(n, boost):
        z = rng.normal(size=(n, n_classes))
        y = rng.integers(0, n_classes, n)
        z[np.arange(n), y] += boost
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True), y

    pm, ym = outputs(1000, 7.0)
    pr, yr = outputs(1000, 4.0)
    xm, xr = (rng.normal(size=(1000, N_FEATURES)).astype(np.float32) for _ in range(2))
    fit = FitData(pm, pr, xm, xr, ym, yr, "synthetic-" + "0" * 54)
    perm = rng.permutation(1024)
    pool = np.r_[pm[:512], outputs(512, 4.0)[0]][perm].astype(np.float32)
    pool /= pool.sum(axis=1, keepdims=True)
    inputs = np.r_[xm[:512], rng.normal(size=(512, N_FEATURES)).astype(np.float32)][perm]
    return Workload(n_classes, fit, pool, inputs)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Workload], Defense]
    max_rows: int | None = None  # time at most this many rows of a batch per call (bounded work)
    min_calls: int = 5


_fitted: dict[int, MemGuard] = {}


def _memguard(mode: str) -> Callable[[Workload], Defense]:
    def build(w: Workload) -> Defense:
        if w.n_classes not in _fitted:
            _fitted[w.n_classes] = MemGuard(epochs=10, optimizer="adam", secret=SECRET).fit(w.fit)
        base = _fitted[w.n_classes]
        mg = MemGuard(epsilon=base.epsilon, mode=mode, secret=SECRET)
        mg.classifier, mg.n_classes, mg.model_id = base.classifier, base.n_classes, base.model_id
        return mg
    return build


_purifiers: dict[int, PurifierNet] = {}


def _purifier(**options) -> Callable[[Workload], Defense]:
    """PURIFIER trained once per class count (20 epochs: training length does not change the
    served graph's cost), served with the given options (noise mode, swapper)."""
    def build(w: Workload) -> Defense:
        if w.n_classes not in _purifiers:
            _purifiers[w.n_classes] = PurifierNet(epochs=20, secret=SECRET).fit(w.fit)
        d = _purifiers[w.n_classes].with_options(**options)
        if d.label_swap:  # swap every correctly classified member so the swap path really runs
            d.fit_swapper(w.fit)
        return d
    return build


def _identity(w: Workload) -> Defense:
    d = IdentityDefense()
    d.n_classes = w.n_classes
    return d


CASES: list[Case] = [
    Case("identity", _identity),
    Case("memguard-faithful", _memguard("faithful"), max_rows=16, min_calls=2),
    Case("memguard-fast", _memguard("fast")),
    Case("purifier", _purifier()),
    Case("purifier-zero-noise", _purifier(noise="mean")),
    Case("purifier+swap", _purifier(label_swap=True, swap_fraction=1.0)),
]


def run_case(case: Case, w: Workload, batch: int) -> dict:
    defense = case.build(w)
    rows = min(batch, case.max_rows or batch)
    # cycle through the pool so batch-1 latency is averaged over different rows
    starts = itertools.cycle(range(0, len(w.pool) - rows + 1, max(rows, 1)))

    def call():
        start = next(starts)
        inputs = w.inputs[start:start + rows] if defense.needs_inputs else None
        return defense.transform(w.pool[start:start + rows], inputs)

    times = time_calls(call, min_seconds=1.0, min_calls=case.min_calls)
    stats = summarize(times)
    stats["vectors_per_s"] = rows / (sum(times) / len(times))
    stats["timed_rows_per_call"] = rows
    stats["bounded"] = rows < batch
    return stats


def phase1_quality(w: Workload) -> dict:
    """Faithful vs fast Phase I on the same 64 rows: crossings and mean L1 where both cross."""
    faithful, fast = _memguard("faithful")(w), _memguard("fast")(w)
    p = w.pool[:64].astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    a, a_ok = faithful.phase1(p)
    b, b_ok = fast.phase1(p)
    both = a_ok & b_ok
    la, lb = np.abs(a - p).sum(1), np.abs(b - p).sum(1)
    return {"rows": len(p), "faithful_crossed": int(a_ok.sum()), "fast_crossed": int(b_ok.sum()),
            "mean_l1_faithful_both": float(la[both].mean()), "mean_l1_fast_both": float(lb[both].mean()),
            "l1_ratio_fast_over_faithful": float(lb[both].mean() / la[both].mean())}


def verdict_latency(w: Workload) -> dict:
    """Batch-1 Phase I latency on rows h calls members vs rows it calls non-members, interleaved
    (the in-process view of the timing side channel): equal medians mean no verdict in the timing."""
    mg = _memguard("fast")(w)
    p = w.pool.astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    verdict = mg.classifier.predict_member(p)
    order = np.random.default_rng(0).permutation(np.r_[np.arange(len(p)), np.arange(len(p))])
    times = {True: [], False: []}
    for i in order:
        t0 = time.perf_counter()
        mg.transform(p[i:i + 1])
        times[bool(verdict[i])].append(time.perf_counter() - t0)
    member, other = summarize(times[True]), summarize(times[False])
    return {"rows_member_verdict": int(verdict.sum()), "rows_nonmember_verdict": int((~verdict).sum()),
            "member_verdict": member, "nonmember_verdict": other,
            "p50_ratio_member_over_nonmember": member["p50_ms"] / other["p50_ms"]}


def tables(results: list[dict], ratio_rows: list[list], quality: dict, verdicts: dict,
           baseline: dict | None) -> list[dict]:
    """The results tables: cost per call, speed ratios, Phase I quality, verdict timing, before/after."""
    cost = [[r["case"], r["classes"], r["batch"], r["p50_ms"], r["mean_ms"], r["vectors_per_s"],
             "yes" if r["bounded"] else ""] for r in results]
    q = [[int(c), v["rows"], v["faithful_crossed"], v["fast_crossed"], v["mean_l1_faithful_both"],
          v["mean_l1_fast_both"], v["l1_ratio_fast_over_faithful"]] for c, v in quality.items()]
    out = [
        {"title": "Defense cost per call, one CPU core (synthetic confidence vectors)",
         "columns": ["case", "classes", "batch", "p50 ms", "mean ms", "vectors/s", "bounded"],
         "rows": cost,
         "note": ("memguard-fast is the constant-work solver serving fast mode (one onnxruntime graph per call). "
                  "purifier: the ONNX "
                  "reformer with keyed latent noise; purifier-zero-noise: latent mean; purifier+swap: with the "
                  "label swapper, half of each batch being indexed members. Bounded: faithful timed on 16 rows "
                  "per call, vectors/s = 16 / time per call. Targets at 10 classes: MemGuard fast batch-1 "
                  "latency <= 2 ms and >= 5,000 vectors/s at batch 1,024; PURIFIER batch-1 overhead over "
                  "identity < 100 us.")},
        {"title": "MemGuard fast mode: throughput ratios",
         "columns": ["classes", "batch", "fast / faithful"],
         "rows": ratio_rows, "note": "Target: fast >= 50x faithful at batch 1."},
        {"title": "MemGuard Phase I: fast vs faithful on the same 64 rows",
         "columns": ["classes", "rows", "crossed (faithful)", "crossed (fast)", "mean L1 faithful",
                     "mean L1 fast", "fast / faithful L1"],
         "rows": q, "note": "Mean L1 over rows both modes carried across; target: fast <= 1.05x faithful."},
        {"title": "MemGuard fast, batch 1: latency by the defender classifier's verdict",
         "columns": ["classes", "rows h calls member", "p50 ms", "rows h calls non-member", "p50 ms",
                     "member / non-member p50"],
         "rows": [[int(c), v["rows_member_verdict"], v["member_verdict"]["p50_ms"], v["rows_nonmember_verdict"],
                   v["nonmember_verdict"]["p50_ms"], v["p50_ratio_member_over_nonmember"]]
                  for c, v in verdicts.items()],
         "note": "Each pool row defended alone twice, in one random interleaved order. Constant work: ratio ~1."},
    ]
    if baseline is not None:
        before = {(r["classes"], r["batch"]): r for r in baseline["results"] if r["case"] == "memguard-fast"}
        rows = []
        for r in results:
            b = before.get((r["classes"], r["batch"]))
            if r["case"] == "memguard-fast" and b is not None:
                rows.append([r["classes"], r["batch"], b["p50_ms"], r["p50_ms"], b["vectors_per_s"],
                             r["vectors_per_s"], r["vectors_per_s"] / b["vectors_per_s"]])
        out.append({"title": "MemGuard fast: this run vs the --baseline run",
                    "columns": ["classes", "batch", "p50 ms before", "p50 ms now", "vectors/s before",
                                "vectors/s now", "throughput now / before"],
                    "rows": rows,
                    "note": f"Before: {baseline.get('created')} at commit {baseline['machine'].get('git_commit')}, "
                            f"load averages {baseline.get('load_average_1_5_15min')}; same machine, separate runs "
                            "(at different loads: compare with benchmarks/results/phase1_constant_work_ab.json, both "
                            "solvers in one process, and its load-independent MLP rows per defended row)."})
    return out


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="an earlier defense.json to compare memguard-fast against")
    args = parser.parse_args()
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    limit_threads()  # every pool on one thread, as in the sidecar and the audit
    load_start = os.getloadavg()  # the machine is shared: timings are only comparable at like loads
    results, quality, verdicts = [], {}, {}
    for c in CLASS_COUNTS:
        w = make_workload(c)
        quality[str(c)] = phase1_quality(w)
        verdicts[str(c)] = verdict_latency(w)
        v = verdicts[str(c)]
        print(f"memguard-fast C={c:4d} batch=1 p50 by h's verdict: member {v['member_verdict']['p50_ms']:.3f} ms, "
              f"non-member {v['nonmember_verdict']['p50_ms']:.3f} ms", flush=True)
        for case, batch in itertools.product(CASES, BATCHES):
            stats = run_case(case, w, batch)
            results.append({"case": case.name, "classes": c, "batch": batch, **stats})
            print(f"{case.name:20s} C={c:4d} batch={batch:5d}  p50 {stats['p50_ms']:9.3f} ms  "
                  f"mean {stats['mean_ms']:9.3f} ms  {stats['vectors_per_s']:12.1f} vec/s"
                  f"{'  (bounded: ' + str(stats['timed_rows_per_call']) + ' rows/call)' if stats['bounded'] else ''}",
                  flush=True)
    ratios, ratio_rows = {}, []
    for c, batch in itertools.product(CLASS_COUNTS, BATCHES):
        pick = {r["case"]: r for r in results if r["classes"] == c and r["batch"] == batch}
        ratio = pick["memguard-fast"]["vectors_per_s"] / pick["memguard-faithful"]["vectors_per_s"]
        ratios[f"C{c}_batch{batch}"] = ratio
        ratio_rows.append([c, batch, ratio])
        print(f"fast / faithful throughput C={c:4d} batch={batch:5d}: {ratio:8.1f}x")
    for c, q in quality.items():
        print(f"Phase I C={c}: crossed faithful {q['faithful_crossed']}/{q['rows']}, fast {q['fast_crossed']}; "
              f"mean L1 (both crossed) faithful {q['mean_l1_faithful_both']:.4f}, fast {q['mean_l1_fast_both']:.4f} "
              f"(ratio {q['l1_ratio_fast_over_faithful']:.3f})")
    path = write_result("defense", {
        "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": THREADS,
                    "blas": [p["num_threads"] for p in threadpool_info()]},
        "workload": "synthetic softmax outputs, members boost 7, non-members boost 4; MemGuard h: Adam 10 epochs on 1000 + 1000 rows",
        "note": ("memguard-faithful above batch 16 is timed on its first 16 rows per call (bounded: "
             "true); its vectors/s there is 16 / time per call"),
        "load_average_1_5_15min": {"start": list(load_start), "end": list(os.getloadavg())},
        "results": results, "fast_over_faithful_throughput": ratios, "phase1_quality": quality,
        "latency_by_verdict_batch1": verdicts,
        "baseline": {"file": args.baseline, "created": baseline.get("created"),
                     "load_average_1_5_15min": baseline.get("load_average_1_5_15min")} if baseline else None,
        "tables": tables(results, ratio_rows, quality, verdicts, baseline),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
