"""Sidecar overhead: client -> upstream directly versus client -> sidecar -> upstream.

Two upstreams: the embedded ONNX backend (compared against a bare OIP v2 server running the same
ONNX model in the same Python gRPC stack, so the difference is the sidecar's own work) and
MLServer (mlserver-sklearn, FP64 predict_proba, as a separate process). Through the sidecar: the
identity defense and every fitted defense directory given with --defense-dir. Concurrency 1
(tritonclient sync) and 16 (tritonclient aio, 16 concurrent callers), one row per request,
p50/p99 latency, throughput and the server's CPU per request (user + system CPU time of the
server process over the window / requests answered in it). Every server is a separate process
(`purifier.serve_process`); the client is this process. Compared cells run side by side and are
measured in interleaved windows, pooled per cell.

The identity sidecar is also measured over its REST front (`-rest` cells: binary tensors over
keep-alive HTTP/1.1, purifier.bench's HTTP connection) in the same interleaved windows, and
compared with its gRPC front (issue 23: REST adds at most 0.5 ms p50 at c1 and keeps >= 0.8x the
gRPC throughput at c16).

    python benchmarks/bench_sidecar.py [--target DIR] [--defense-dir DIR ...] [--seconds 3]

Writes benchmarks/results/sidecar.json (sidecar_LABEL.json with --label). Targets (issue 5): identity adds at most 1.0 ms p50 and
3 ms p99 at concurrency 1; at concurrency 16 the sidecar keeps >= 80% of direct throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_sidecar_flags,
    baseline_server,
    commit_of,
    digits_target,
    secret_file_or_throwaway,
    write_result,
)
from purifier.bench.measure import window_ratios  # noqa: E402
from purifier.serve_process import ServeProcess, ServerProcess, free_port  # noqa: E402


def wait_ready(port: int, model: str, timeout: float = 90.0) -> None:
    """Poll ModelReady (for MLServer, which prints no ready line)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                if client.is_model_ready(model):
                    return
            except Exception:
                pass
            time.sleep(0.2)
    finally:
        client.close()
    raise RuntimeError(f"model {model} on port {port} not ready after {timeout} s")


# --- the cells ----------------------------------------------------------------------------------
# The machine's background load drifts by several x within a minute, so cells that are compared
# are measured in interleaved windows (direct, sidecar, ..., then the reverse order) and pooled:
# purifier.bench (the `purifier bench` command's measurement core) does exactly that.


def interleaved(servers: dict[str, tuple], x: np.ndarray, seconds: float, rounds: int) -> dict[str, dict]:
    """servers: cell name -> (port, model, output name, server pid[, protocol]). Each cell gets `seconds` per
    concurrency (1 and 16) in total, split into `rounds` windows taken in turn with the other cells.
    CPU per request: the server process's CPU time over its windows / the calls it answered."""
    from purifier.bench.measure import Endpoint, compare

    outputs = {cell[2] for cell in servers.values()}
    if len(outputs) != 1:
        raise ValueError(f"cells compared together must share the output, got {sorted(outputs)}")
    endpoints = [Endpoint(name, f"127.0.0.1:{port}", model, server_pid=pid, protocol=protocol)
                 for name, (port, model, _, pid, *rest) in servers.items() for protocol in [rest[0] if rest else "grpc"]]
    result = compare(endpoints, x, concurrency=(1, 16), rows=(1,), seconds=seconds, rounds=rounds,
                     output=outputs.pop())
    cells: dict[str, dict] = {}
    for cell in result["cells"]:
        cells.setdefault(cell["endpoint"], {})[f"c{cell['concurrency']}"] = {
            k: cell[k] for k in ("calls", "mean_ms", "p50_ms", "p99_ms", "throughput_rps",
                                 "server_cpu_ms_per_request", "windows")}
    return cells


# --- servers ------------------------------------------------------------------------------------


def bare_server(model: str) -> None:
    """A plain OIP v2 server for the ONNX model (same grpc.aio stack, no sidecar work): the baseline."""
    import grpc

    from purifier_server._proto import grpc_service_pb2 as pb
    from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
    from purifier_server.codec import build_response
    from purifier_server.upstream import EmbeddedUpstream

    upstream = EmbeddedUpstream(model)

    class Bare(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelReady(self, request, context):
            return pb.ModelReadyResponse(ready=await upstream.ready(request.name, request.version))

        async def ModelMetadata(self, request, context):
            return await upstream.model_metadata(request.name, request.version)

        async def ModelInfer(self, request, context):
            answer, _ = await upstream.infer(request, None, ())  # the output arrays (codec.Decoded)
            return build_response(request.id, request.model_name, upstream.version, answer.arrays, raw=True)

    async def main():
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(json.dumps({"port": port, "model": upstream.name}), flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def mlserver_repository(root: Path) -> int:
    import joblib
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    clf = LogisticRegression(max_iter=300).fit(X[::2] / 16.0, y[::2])
    (root / "digits").mkdir(parents=True)
    joblib.dump(clf, root / "digits" / "model.joblib")
    (root / "digits" / "model-settings.json").write_text(json.dumps({
        "name": "digits", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "extra": {"predict_fn": "predict_proba"}},
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 64]}]}))
    port = free_port()
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": free_port(), "grpc_port": port, "metrics_port": free_port(),
        "parallel_workers": 0}))
    return port


def sidecar_args(backend_args: list[str], defense: tuple[str, str] | None, secret_file: Path) -> list[str]:
    """`purifier serve` flags: the backend, then `defense` (name, directory) or none on purpose."""
    args = [*backend_args, "--log-level", "warning"]
    if defense is None:
        return [*args, "--defense", "none"]
    return [*args, "--defense", defense[0], "--defense-dir", defense[1], "--secret-file", str(secret_file)]


def sidecar(backend_args: list[str], defense: tuple[str, str] | None, secret_file: Path, env: dict) -> ServeProcess:
    return ServeProcess(sidecar_args(backend_args, defense, secret_file), env=env)


def sidecar_tables(cells: dict, comparisons: dict, rounds: int, seconds: float, load: float | None) -> list[dict]:
    """The results table: every cell with its overhead against the matching direct call."""
    table_rows = []
    for key, cell in cells.items():
        c1, c16, cmp = cell["c1"], cell["c16"], comparisons.get(key, {})
        table_rows.append([key, c1["p50_ms"], c1["p99_ms"], c1["throughput_rps"], c1["server_cpu_ms_per_request"],
                           c16["p50_ms"], c16["p99_ms"], c16["throughput_rps"], c16["server_cpu_ms_per_request"],
                           cmp.get("added_p50_ms_c1", cmp.get("added_p50_ms_c1_vs_grpc", "-")),
                           cmp.get("added_p99_ms_c1", cmp.get("added_p99_ms_c1_vs_grpc", "-")),
                           cmp.get("throughput_ratio_c16", cmp.get("throughput_ratio_c16_vs_grpc", "-")),
                           cmp.get("throughput_vs_identity_c16", "-"),
                           cmp.get("added_p50_ms_c1_vs_identity", "-"), cmp.get("cpu_ratio_vs_identity_c1", "-")])
    load_text = "not recorded" if load is None else f"{load:.1f}"
    return [{
        "title": "Sidecar overhead: client -> upstream directly vs client -> sidecar -> upstream (1 row per request)",
        "columns": ["cell", "c1 p50 ms", "c1 p99 ms", "c1 req/s", "c1 server CPU ms/req", "c16 p50 ms", "c16 p99 ms",
                    "c16 req/s", "c16 server CPU ms/req", "added p50 ms (c1)", "added p99 ms (c1)",
                    "c16 throughput ratio", "c16 throughput vs identity sidecar", "added p50 ms vs identity (c1)",
                    "server CPU vs identity (c1)"],
        "rows": table_rows,
        "note": f"Servers as separate processes measured side by side in {rounds} interleaved windows of "
                f"{seconds:g} s; client, sidecar and upstream share the machine's 2 cores (1-minute load average "
                f"at the end: {load_text}). Server CPU per request: user + system CPU time of the server process over "
                "its windows / requests answered (warm-up included). -rest cells: the identity sidecar's REST front "
                "(binary tensors, keep-alive HTTP/1.1), compared with the same sidecar's gRPC front (targets: "
                "added p50 <= 0.5 ms at c1, c16 throughput ratio >= 0.8). Targets: added p50 <= 1.0 ms, p99 <= 3 ms at c1; "
                "c16 throughput ratio >= 0.8 with the identity defense; PURIFIER <= 0.2 ms more than identity; "
                "MemGuard (10 classes) <= 1.0 ms server CPU per single-row request and c16 throughput >= 0.7x "
                "the identity sidecar's. Issue 25 targets: MemGuard server CPU <= 1.5x identity's, added p50 <= 1.0 ms "
                "over identity, c16 >= 0.8x identity; identity c16 >= 0.85x direct. -baseline cells: the same cells "
                "served by an older checkout (config.baseline_commit) in the same windows, each compared with its own "
                "identity sidecar.",
    }]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sidecar_flags(parser)
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement seconds per cell")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved windows per cell (default 3)")
    parser.add_argument("--skip-mlserver", action="store_true")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="a checkout of an older commit whose identity sidecar (and --baseline-defense-dir "
                             "defenses) are measured in the same interleaved windows")
    parser.add_argument("--baseline-defense-dir", action="append", default=[], metavar="DIR",
                        help="a defense directory fitted by --baseline-src's own code (same --secret-file)")
    parser.add_argument("--label", help="suffix of the result file: results/sidecar_LABEL.json (e.g. busy_host, "
                                        "a run on another host beside the headline run)")
    parser.add_argument("--bare-server", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.bare_server)
        return

    target = digits_target(args.target)
    X, _ = target.role("eval_nonmembers")
    x = np.ascontiguousarray(X[:64], np.float32)  # one row per request, cycled
    env = {k: v for k, v in os.environ.items() if not k.startswith("PURIFIER_")}
    defenses = [(json.loads((Path(d) / "defense.json").read_text())["defense"], d) for d in args.defense_dir]
    baseline = Path(args.baseline_src).resolve() if args.baseline_src else None
    baseline_defenses = [(json.loads((Path(d) / "defense.json").read_text())["defense"], d)
                         for d in args.baseline_defense_dir]
    cells: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        secret_file = secret_file_or_throwaway(args.secret_file, Path(tmp),
                                               [*args.defense_dir, *args.baseline_defense_dir])

        # embedded ONNX backend: the bare server and every sidecar variant run side by side
        with contextlib.ExitStack() as stack:
            bare = stack.enter_context(ServerProcess([sys.executable, __file__, "--bare-server",
                                                      str(target.directory)], env=env))
            wait_ready(bare.port, bare.ready["model"])
            servers = {"embedded/direct": (bare.port, bare.ready["model"], "probabilities", bare.pid)}
            for name, d in [("identity", None), *((n, (n, d)) for n, d in defenses)]:
                sc = stack.enter_context(sidecar(["--model", str(target.directory)], d, secret_file, env))
                servers[f"embedded/sidecar-{name}"] = (sc.port, target.directory.name, "probabilities", sc.pid)
                if name == "identity":
                    servers["embedded/sidecar-identity-rest"] = (sc.http_port, target.directory.name,
                                                                 "probabilities", sc.pid, "http")
            if baseline is not None:
                for name, d in [("identity", None), *((n, (n, d)) for n, d in baseline_defenses)]:
                    old_args = sidecar_args(["--model", str(target.directory)], d, secret_file)
                    sc = stack.enter_context(baseline_server(baseline, old_args))
                    servers[f"embedded/sidecar-{name}-baseline"] = (sc.port, target.directory.name,
                                                                    "probabilities", sc.pid)
            cells.update(interleaved(servers, x, args.seconds, args.rounds))

        # MLServer upstream (FP64); defenses fitted for the ONNX target do not apply to its model
        if not args.skip_mlserver:
            repo = Path(tmp) / "mlserver"
            repo.mkdir()
            mport = mlserver_repository(repo)
            exe = str(Path(sys.executable).with_name("mlserver"))
            with ServerProcess([exe, "start", str(repo)], env=env, ready_line=False) as mlserver:
                wait_ready(mport, "digits")
                with sidecar(["--upstream", f"127.0.0.1:{mport}", "--model-name", "digits",
                              "--confidence-output", "predict_proba"], None, secret_file, env) as sc:
                    servers = {"mlserver/direct": (mport, "digits", "predict_proba", mlserver.pid),
                               "mlserver/sidecar-identity": (sc.port, "digits", "predict_proba", sc.pid)}
                    cells.update(interleaved(servers, x, args.seconds, args.rounds))

    comparisons = {}
    for key, cell in cells.items():
        backend, mode = key.split("/")
        if mode == "direct":
            continue
        if mode.endswith("-rest"):  # REST against the same sidecar's gRPC front
            grpc_cell = cells[f"{backend}/{mode[:-len('-rest')]}"]
            comparisons[key] = {
                "added_p50_ms_c1_vs_grpc": cell["c1"]["p50_ms"] - grpc_cell["c1"]["p50_ms"],
                "added_p99_ms_c1_vs_grpc": cell["c1"]["p99_ms"] - grpc_cell["c1"]["p99_ms"],
                "throughput_ratio_c16_vs_grpc": cell["c16"]["throughput_rps"] / grpc_cell["c16"]["throughput_rps"],
            }
            continue
        direct = cells[f"{backend}/direct"]
        # a defended cell is compared with the identity sidecar of its own code (this checkout's or the baseline's)
        identity = cells.get(f"{backend}/sidecar-identity" + ("-baseline" if mode.endswith("-baseline") else ""))
        comparisons[key] = {
            "added_p50_ms_c1": cell["c1"]["p50_ms"] - direct["c1"]["p50_ms"],
            "added_p99_ms_c1": cell["c1"]["p99_ms"] - direct["c1"]["p99_ms"],
            "throughput_ratio_c16": cell["c16"]["throughput_rps"] / direct["c16"]["throughput_rps"],
            "throughput_vs_identity_c16": (cell["c16"]["throughput_rps"] / identity["c16"]["throughput_rps"]
                                           if identity else None),
            "added_p50_ms_c1_vs_identity": cell["c1"]["p50_ms"] - identity["c1"]["p50_ms"] if identity else None,
            "cpu_ratio_vs_identity_c1": (cell["c1"]["server_cpu_ms_per_request"]
                                         / identity["c1"]["server_cpu_ms_per_request"] if identity else None),
            # the same ratios round by round (each round's windows are adjacent in time): their spread
            # says how far one pooled figure can be trusted on this machine
            "throughput_ratio_c16_by_round": window_ratios(cell["c16"], direct["c16"], "throughput_rps"),
            "throughput_vs_identity_c16_by_round": (window_ratios(cell["c16"], identity["c16"], "throughput_rps")
                                                    if identity else None),
            "cpu_ratio_vs_identity_c1_by_round": (window_ratios(cell["c1"], identity["c1"], "server_cpu_ms_per_request")
                                                  if identity else None),
        }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    tables = sidecar_tables(cells, comparisons, args.rounds, args.seconds, load)
    path = write_result(f"sidecar_{args.label}" if args.label else "sidecar", {
        "tables": tables, "load_average_1m_end": load,
        "config": {"seconds_per_cell": args.seconds, "interleaved_rounds": args.rounds, "rows_per_request": 1, "target": str(target.directory),
                   "defenses": [d for _, d in defenses], "baseline_src": args.baseline_src,
                   "baseline_commit": commit_of(baseline) if baseline else None,
                   "baseline_defenses": [d for _, d in baseline_defenses], "clients": "purifier.bench: threads over one grpc channel, pre-serialized raw requests"},
        "cells": cells, "comparisons": comparisons,
        "targets": {"added_p50_ms_c1": 1.0, "added_p99_ms_c1": 3.0, "throughput_ratio_c16": 0.8,
                    "rest_added_p50_ms_c1_vs_grpc": 0.5, "rest_throughput_ratio_c16_vs_grpc": 0.8,
                    "memguard_server_cpu_ms_per_request_c1": 1.0, "memguard_throughput_vs_identity_c16": 0.7},
    })
    print(f"{'cell':34s} {'c1 p50':>8s} {'c1 p99':>8s} {'c1 rps':>8s} {'c1 cpu':>8s} {'c16 p50':>8s} {'c16 p99':>8s} "
          f"{'c16 rps':>8s} {'c16 cpu':>8s}")
    for key, cell in cells.items():
        c1, c16 = cell["c1"], cell["c16"]
        print(f"{key:34s} {c1['p50_ms']:8.3f} {c1['p99_ms']:8.3f} {c1['throughput_rps']:8.0f} "
              f"{c1['server_cpu_ms_per_request']:8.3f} {c16['p50_ms']:8.3f} {c16['p99_ms']:8.3f} "
              f"{c16['throughput_rps']:8.0f} {c16['server_cpu_ms_per_request']:8.3f}")
    for key, c in comparisons.items():
        if "added_p50_ms_c1_vs_grpc" in c:
            print(f"{key:34s} vs its gRPC front: added p50 {c['added_p50_ms_c1_vs_grpc']:+.3f} ms, "
                  f"p99 {c['added_p99_ms_c1_vs_grpc']:+.3f} ms, c16 throughput x{c['throughput_ratio_c16_vs_grpc']:.2f}")
            continue
        print(f"{key:34s} added p50 {c['added_p50_ms_c1']:+.3f} ms, p99 {c['added_p99_ms_c1']:+.3f} ms, "
              f"c16 throughput x{c['throughput_ratio_c16']:.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
