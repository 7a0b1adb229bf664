"""Load and soak: a real `purifier serve` (embedded ONNX backend) under concurrent loopback load.

The sidecar runs as its own process, started exactly as a user would (`python -m purifier.cli
serve --model DIR`), so its resident memory (/proc/PID/status VmRSS) is measured alone. A
grpc.aio client in this process keeps `--concurrency` requests in flight for `--seconds`, each
one a row of the digits evaluation set; every answer is checked (identity defense: equal to the
clean ORT probabilities; any other defense: on the simplex with the clean argmax), every error is
counted by gRPC code. After `--warmup` seconds the latency, throughput and RSS baseline are taken;
the RSS growth from the end of warm-up to the end of the run is the leak figure (< 10% target).

    .venv/bin/python benchmarks/bench_load.py                 # 60 s at concurrency 32
    .venv/bin/python benchmarks/bench_load.py --seconds 10 --out /tmp/load.json

Writes benchmarks/results/load.json (via benchmarks.common.write_result) unless --out is given.
Exit status 1 when there were errors, wrong answers or RSS growth at or above --max-growth.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine_info, process_cpu_seconds, rss_bytes, summarize, write_result  # noqa: E402
from purifier.serve_process import ServeProcess  # noqa: E402
from purifier_server._proto import grpc_service_pb2 as pb  # noqa: E402
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402


async def drive(port: int, pid: int, rows: np.ndarray, clean: np.ndarray, identity: bool, seconds: float,
                warmup: float, concurrency: int) -> dict:
    """Keep `concurrency` calls in flight for `seconds`; latencies and RSS after `warmup`."""
    requests = []
    for i in range(len(rows)):
        req = pb.ModelInferRequest(model_name="digits", id=str(i))
        req.inputs.add(name="input", datatype="FP32", shape=[1, rows.shape[1]])
        req.raw_input_contents.append(rows[i:i + 1].tobytes())
        requests.append(req)
    codes: collections.Counter = collections.Counter()
    wrong = 0
    latencies: list[float] = []
    start = time.monotonic()
    measure_from, end = start + warmup, start + seconds
    rss: list[tuple[float, int]] = []

    async def sample_rss() -> None:
        while time.monotonic() < end:
            rss.append((round(time.monotonic() - start, 2), rss_bytes(pid)))
            await asyncio.sleep(1.0)
        rss.append((round(time.monotonic() - start, 2), rss_bytes(pid)))

    async def worker(k: int, stub) -> None:
        nonlocal wrong
        i = k
        while (now := time.monotonic()) < end:
            i = (i + 7919) % len(requests)
            try:
                resp = await stub.ModelInfer(requests[i], timeout=10)
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                continue
            done = time.monotonic()
            codes["OK"] += 1
            got = np.frombuffer(resp.raw_output_contents[0], np.float32)
            if identity:
                # ORT's batch-of-1 and batch-of-N kernels may differ in the last bits
                wrong += int(not np.allclose(got, clean[i], rtol=1e-5, atol=1e-7))
            else:
                wrong += int(got.argmax() != clean[i].argmax() or abs(float(got.sum()) - 1) > 1e-4
                             or bool((got < 0).any()))
            if now >= measure_from:
                latencies.append(done - now)

    # a few channels: one HTTP/2 connection per 8 in-flight calls, as a pool of clients would open
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(max(1, concurrency // 8))]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        await asyncio.gather(sample_rss(), *(worker(k, stubs[k % len(stubs)]) for k in range(concurrency)))
    finally:
        for c in channels:
            await c.close()
    baseline = next((b for t, b in rss if t >= warmup), rss[-1][1])
    final = rss[-1][1]
    measured = seconds - warmup
    return {"codes": dict(codes), "errors": sum(v for k, v in codes.items() if k != "OK"), "wrong_answers": wrong,
            "latency": summarize(latencies) if latencies else None,
            "throughput_rps": len(latencies) / measured if measured > 0 else None,
            "rss_baseline_mb": baseline / 2**20, "rss_final_mb": final / 2**20,
            "rss_max_mb": max(b for _, b in rss) / 2**20, "rss_growth": (final - baseline) / baseline,
            "rss_series": [[t, round(b / 2**20, 2)] for t, b in rss]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=None, help="default: 10%% of --seconds, at least 2 s")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model", help="target directory (default: train the digits target into a temp dir)")
    from purifier.defenses import REGISTRY as DEFENSES

    p.add_argument("--defense", default="none", choices=list(DEFENSES))
    p.add_argument("--defense-dir")
    p.add_argument("--secret-file", help="PRF secret of the defense (MemGuard, PURIFIER)")
    p.add_argument("--max-growth", type=float, default=0.10)
    p.add_argument("--out", help="write the JSON here instead of benchmarks/results/load.json")
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(2.0, 0.1 * args.seconds)

    from purifier.models.target import Target, train_target

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else train_target("digits", Path(tmp) / "digits", seed=0,
                                                                     progress=False).directory
        target = Target.load(model_dir)
        rows, _ = target.role("eval_nonmembers")
        rows = np.ascontiguousarray(rows, np.float32)
        clean = target.classifier().run(rows)["probabilities"].astype(np.float32)
        serve_args = ["--model", str(model_dir), "--model-name", "digits", "--defense", args.defense]
        if args.defense_dir:
            serve_args += ["--defense-dir", args.defense_dir]
        if args.secret_file:
            serve_args += ["--secret-file", args.secret_file]
        sidecar = ServeProcess(serve_args).start()
        load_before = os.getloadavg()[0]
        try:
            cpu0 = process_cpu_seconds(sidecar.pid)
            result = asyncio.run(drive(sidecar.port, sidecar.pid, rows, clean, args.defense == "none", args.seconds,
                                       warmup, args.concurrency))
            answered = result["codes"].get("OK", 0) + result["errors"]
            result["server_cpu_ms_per_request"] = 1e3 * (process_cpu_seconds(sidecar.pid) - cpu0) / max(1, answered)
        finally:
            exit_code = sidecar.stop(timeout_s=20)
    result["sidecar_exit_code"] = exit_code
    result["loadavg_1m_start_end"] = [load_before, os.getloadavg()[0]]  # the machine is shared: say how busy
    lat = result["latency"] or {}
    config = {"seconds": args.seconds, "warmup_s": warmup, "concurrency": args.concurrency,
              "backend": "embedded onnxruntime (digits MLP)", "defense": args.defense, "rows_per_request": 1}
    table = {"title": f"Load: {args.seconds:g} s at concurrency {args.concurrency}, embedded backend, "
                      f"defense {args.defense} (after {warmup:g} s warm-up)",
             "columns": ["requests", "errors", "wrong answers", "throughput (req/s)", "server CPU ms/req", "p50 (ms)",
                         "p99 (ms)", "RSS after warm-up (MB)", "RSS at end (MB)", "RSS growth"],
             "rows": [[result["codes"].get("OK", 0) + result["errors"], result["errors"], result["wrong_answers"],
                       round(result["throughput_rps"] or 0, 1), round(result["server_cpu_ms_per_request"], 3),
                       round(lat.get("p50_ms", float("nan")), 3),
                       round(lat.get("p99_ms", float("nan")), 3), round(result["rss_baseline_mb"], 1),
                       round(result["rss_final_mb"], 1), f"{100 * result['rss_growth']:+.2f}%"]]}
    payload = {"config": config, "result": result, "tables": [table]}
    if args.out:
        doc = {"benchmark": "load", "machine": machine_info(), **payload}
        path, tmp = Path(args.out), Path(args.out + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    else:
        path = write_result("load", payload)
    print(json.dumps({"written": str(path), **table}, indent=1))
    ok = result["errors"] == 0 and result["wrong_answers"] == 0 and result["rss_growth"] < args.max_growth
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
