"""`purifier bench`: the command line around `purifier.bench.measure`.

    purifier bench --direct 127.0.0.1:8001 --sidecar 127.0.0.1:9001 --model-name digits \
        --concurrency 1 4 16 --rows 1 --seconds 10 --json bench.json

Prints one table row per (endpoint, concurrency, rows) and the latency the sidecar adds; with
--json, writes the same figures with the machine they were measured on and its load average.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

from purifier.errors import ConfigError

# measure.py (grpc, numpy, tritonclient's messages) is imported when the command runs, not when
# the CLI builds its parser
OIP_SERVICE = "inference.GRPCInferenceService"


def format_table(result: dict) -> str:
    """The cells and comparisons as a plain-text table."""
    lines = [f"{'endpoint':12s} {'conc':>4s} {'rows':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>9s} {'calls':>7s}"]
    for x in result["cells"]:
        lines.append(f"{x['endpoint']:12s} {x['concurrency']:4d} {x['rows']:5d} {x['p50_ms']:8.3f} "
                     f"{x['p99_ms']:8.3f} {x['throughput_rps']:9.1f} {x['calls']:7d}")
    if result["comparisons"]:
        lines.append("")
        lines.append(f"{'endpoint':12s} {'conc':>4s} {'rows':>5s} {'added p50':>10s} {'added p99':>10s} "
                     f"{'throughput':>10s}")
        for x in result["comparisons"]:
            lines.append(f"{x['endpoint']:12s} {x['concurrency']:4d} {x['rows']:5d} {x['added_p50_ms']:+9.3f}  "
                         f"{x['added_p99_ms']:+9.3f}  {x['throughput_ratio']:9.2f}x")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="latency and throughput of an OIP endpoint, directly vs through the sidecar",
                       description="Compares two Open Inference Protocol endpoints serving the same model "
                                   "(typically the model server and the sidecar in front of it) in interleaved "
                                   "windows; prints p50/p99/throughput and the latency the sidecar adds.")
    p.add_argument("--direct", metavar="HOST:PORT", help="the baseline endpoint, e.g. the model server")
    p.add_argument("--sidecar", metavar="HOST:PORT", help="the endpoint compared with it, e.g. purifier serve")
    p.add_argument("--sidecar-rest", metavar="HOST:PORT",
                   help="also the sidecar's REST front (plaintext, binary tensors over keep-alive HTTP/1.1), "
                        "compared with the first endpoint like --sidecar")
    p.add_argument("--model-name", required=True, help="the model both endpoints serve")
    p.add_argument("--model-version", default="", help="model version to request (default '')")
    p.add_argument("--output-name", default=None,
                   help="output to request (default 'probabilities' if served, else the only output)")
    p.add_argument("--direct-service", default=OIP_SERVICE,
                   help="gRPC service of --direct (TorchServe: org.pytorch.serve.grpc.openinference."
                        "GRPCInferenceService)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16],
                   help="concurrent callers, one window each (default 1 4 16)")
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows per request (default 1)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved windows per cell (default 5)")
    p.add_argument("--records", default=None, metavar="FILE",
                   help="real rows to send: a record file (.npz with X, y; .csv with a label column); "
                        "default: random rows of the model's input width")
    p.add_argument("--features", type=int, default=None,
                   help="random rows of this width when the model does not declare its input width")
    p.add_argument("--input-name", default=None,
                   help="the FP32 input, for models whose metadata declares none (TorchServe)")
    p.add_argument("--typed", action="store_true", help="send typed contents instead of raw bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rows (default 0)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call in seconds (default 30)")
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="connect with TLS, trust this CA")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="mutual TLS: client certificate chain")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="mutual TLS: client private key")
    p.add_argument("--token-file", default=None, metavar="FILE", help="file holding the bearer token to send")
    p.add_argument("--direct-plaintext", action="store_true",
                   help="TLS and token apply to --sidecar only; reach --direct in plaintext without a token")
    p.add_argument("--connection-per-thread", action="store_true",
                   help="a gRPC connection per calling thread instead of one shared: needed to reach every worker "
                        "of `purifier serve --workers N`, which spreads connections, not calls")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results (with machine info) here")
    p.set_defaults(func=bench_cli)


def bench_cli(args) -> int:
    from purifier.artifacts import write_json
    from purifier.bench.measure import Endpoint, compare, connect, random_rows
    from purifier.machine import load_average, machine_info

    if not args.direct and not args.sidecar and not args.sidecar_rest:
        raise ConfigError("give --direct HOST:PORT and/or --sidecar HOST:PORT (or --sidecar-rest HOST:PORT)")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ConfigError(f"--json: directory {Path(args.json).resolve().parent} does not exist")
    security = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
                "token_file": args.token_file}
    endpoints = []
    if args.direct:
        endpoints.append(Endpoint("direct", args.direct, args.model_name, args.model_version, args.direct_service,
                                  channel_per_thread=args.connection_per_thread,
                                  **({} if args.direct_plaintext else security)))
    if args.sidecar:
        endpoints.append(Endpoint("sidecar", args.sidecar, args.model_name, args.model_version,
                                  channel_per_thread=args.connection_per_thread, **security))
    if args.sidecar_rest:
        endpoints.append(Endpoint("sidecar-rest", args.sidecar_rest, args.model_name, args.model_version,
                                  protocol="http"))
    width = args.features
    if args.records:
        from purifier.data.records import load_records

        X, data = load_records(args.records, flag="--records").X, f"records from {args.records}"
    elif width is None:
        conn = connect(endpoints[0], args.timeout)
        try:
            width = conn.describe(args.input_name).n_features
        finally:
            conn.close()
        if width is None:
            raise ConfigError(f"model {args.model_name!r} does not declare its input width; pass --features D")
    if not args.records:
        X, data = random_rows(width, seed=args.seed), f"random uniform [0, 1) rows, seed {args.seed}"
    load_start = load_average()
    print(f"benchmarking {', '.join(f'{e.label} {e.address}' for e in endpoints)}: concurrency "
          f"{args.concurrency}, rows {args.rows}, {args.seconds:g} s per cell in {args.rounds} windows",
          file=sys.stderr)
    result = compare(endpoints, X, concurrency=args.concurrency, rows=args.rows, seconds=args.seconds,
                     rounds=args.rounds, output=args.output_name, typed=args.typed, timeout_s=args.timeout,
                     input_name=args.input_name)
    print(format_table(result))
    load_end = load_average()
    if load_start is not None and load_end is not None:
        print(f"load average (1 min) {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end: "
              "other work on this machine inflates latencies", file=sys.stderr)
    if args.json:
        doc = {"benchmark": "purifier-bench", "created": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info("tritonclient"), "load_average": {"start": load_start, "end": load_end},
               "config": {"endpoints": [{"label": e.label, "address": e.address, "service": e.service,
                                         "tls": bool(e.tls_ca), "token": bool(e.token_file)} for e in endpoints],
                          "model_name": args.model_name, "model_version": args.model_version,
                          "concurrency": args.concurrency, "rows": args.rows, "seconds_per_cell": args.seconds,
                          "rounds": args.rounds, "contents": "typed" if args.typed else "raw",
                          "data": data},
               **result}
        write_json(args.json, doc)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
