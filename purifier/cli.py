"""The `purifier` command line. Heavy imports happen inside each subcommand.

User mistakes (`PurifierError`) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys

from purifier.errors import PurifierError


def _train_target(args: argparse.Namespace) -> int:
    from purifier.models.target import train_target

    target = train_target(args.dataset, args.out, seed=args.seed, epochs=args.epochs)
    acc = target.manifest["accuracy"]
    print(f"target {target.manifest['dataset']} ({target.manifest['architecture']}) -> {target.directory}")
    print(f"  member accuracy (train)       {acc['train']:.4f}")
    print(f"  non-member accuracy (eval)    {acc['eval_nonmembers']:.4f}")
    print(f"  non-member accuracy (ref)     {acc['reference']:.4f}")
    print(f"  gap floor (balanced accuracy) {0.5 + (acc['eval_members'] - acc['eval_nonmembers']) / 2:.4f}")
    print(f"  onnx sha256 {target.model_id[:16]}...  ort/torch max diff "
          f"{target.manifest['ort_torch_max_abs_diff']:.1e}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    # the only place the library touches the server package, imported lazily
    from purifier_server.app import run
    from purifier_server.settings import Settings

    flags = {name: getattr(args, name) for name in SERVE_FLAGS}
    if args.allow_output is not None:
        flags["allow_outputs"] = tuple(args.allow_output)
    return run(Settings.resolve(flags, config=args.config))


SERVE_FLAGS = ("model", "upstream", "upstream_service", "upstream_contents", "model_name", "model_version", "model_id", "defense",
               "defense_dir", "secret_file", "confidence_output", "confidence_kind", "host", "port",
               "metrics_host", "metrics_port", "max_request_rows", "max_batch_rows", "max_wait_ms", "device",
               "reflection", "grace_s", "upstream_timeout_s", "health_poll_s", "log_level", "tls_cert_file",
               "tls_key_file", "tls_client_ca_file", "auth_token_file")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC sidecar (OIP v2) in front of a model server or an ONNX model",
                       description="Settings: flags > PURIFIER_<SETTING> environment > --config TOML > defaults.")
    backend = p.add_mutually_exclusive_group()
    backend.add_argument("--model", help="embedded backend: a target directory or an .onnx file")
    backend.add_argument("--upstream", metavar="HOST:PORT", help="an OIP v2 gRPC server (Triton, KServe, MLServer)")
    p.add_argument("--upstream-service", help="upstream gRPC service (default inference.GRPCInferenceService; "
                   "TorchServe: org.pytorch.serve.grpc.openinference.GRPCInferenceService)")
    p.add_argument("--upstream-contents", choices=("auto", "raw", "typed"),
                   help="how inputs travel upstream (default auto: typed for TorchServe, as sent otherwise)")
    p.add_argument("--model-name", help="the model clients ask for (required with --upstream)")
    p.add_argument("--model-version", help="model version accepted besides ''")
    p.add_argument("--model-id", help="with --upstream: ONNX sha256 the defense must have been fitted for")
    from purifier.defenses import REGISTRY as DEFENSES

    p.add_argument("--defense", choices=list(DEFENSES), help="default none")
    p.add_argument("--defense-dir", help="fitted defense directory (from purifier fit-defense)")
    p.add_argument("--secret-file", help="PRF secret file (else $PURIFIER_SECRET / $PURIFIER_SECRET_FILE)")
    p.add_argument("--confidence-output", help="output holding the confidences (embedded: from model.json)")
    p.add_argument("--logits", dest="confidence_kind", action="store_const", const="logits",
                   help="the confidence output holds logits: softmax before defending")
    p.add_argument("--allow-output", action="append", metavar="NAME",
                   help="pass another output through undefended (repeatable; never a logits output)")
    p.add_argument("--host", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="gRPC port (default 8001; 0 = any free port)")
    p.add_argument("--metrics-host", help="metrics address (default 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002; -1 = off)")
    p.add_argument("--max-request-rows", type=int, help="rows per request (default 4096)")
    p.add_argument("--max-batch-rows", type=int, help="rows per defense call (default 256)")
    p.add_argument("--max-wait-ms", type=float, help="wait for more rows before defending (default 0)")
    from purifier.devices import DEVICES

    p.add_argument("--device", choices=list(DEVICES), help="embedded model device (default cpu)")
    p.add_argument("--reflection", action="store_true", default=None, help="enable gRPC server reflection")
    p.add_argument("--grace", dest="grace_s", type=float, help="seconds to drain on SIGTERM (default 5)")
    p.add_argument("--upstream-timeout", dest="upstream_timeout_s", type=float,
                   help="upstream deadline when the caller sets none (default 30 s)")
    p.add_argument("--health-poll", dest="health_poll_s", type=float, help="upstream readiness poll (default 1 s)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--tls-cert", dest="tls_cert_file", help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", dest="tls_key_file", help="PEM private key for --tls-cert")
    p.add_argument("--tls-client-ca", dest="tls_client_ca_file", help="PEM CA: require client certificates (mTLS)")
    p.add_argument("--auth-token-file", dest="auth_token_file",
                   help="file with the bearer token clients must send (health checks stay open)")
    p.add_argument("--config", help="TOML settings file (keys as in the [serve] table)")
    p.set_defaults(func=_serve)


def _demo(args: argparse.Namespace) -> int:
    from purifier.demo import demo_cli

    return demo_cli(args)


def build_parser() -> argparse.ArgumentParser:
    from purifier import __version__
    from purifier.data.datasets import LOADERS

    parser = argparse.ArgumentParser(
        prog="purifier",
        description="Defend a served classifier against membership inference, and audit it.",
    )
    parser.add_argument("--version", action="version", version=f"purifier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train-target", help="train a target classifier on an offline dataset, export ONNX")
    p.add_argument("--dataset", required=True, choices=list(LOADERS), metavar="NAME",
                   help=f"one of: {', '.join(LOADERS)}")
    p.add_argument("--out", required=True, help="output directory (model.onnx, model.json, splits)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="override the dataset's default epochs")
    p.set_defaults(func=_train_target)

    from purifier.fitting import add_parser as add_fit_parser

    add_fit_parser(sub)

    _add_serve(sub)

    from purifier.audit.command import add_parser as add_audit_parser

    add_audit_parser(sub)

    from purifier.bench.command import add_parser as add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser("demo", help="end to end: train, fit MemGuard and PURIFIER, serve, audit through gRPC")
    p.add_argument("--out", default="build/demo", help="working directory (reused by a rerun; default build/demo)")
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist5k"], help="default digits")
    p.add_argument("--seed", type=int, default=0, help="target, defense and attacker seed (default 0)")
    p.add_argument("--shadows", type=int, default=4, help="attacker shadow models (default 4)")
    p.set_defaults(func=_demo)
    return parser




# what the `full` extra adds to the serving install (pyproject.toml)
FULL_INSTALL_MODULES = frozenset({"torch", "sklearn", "matplotlib", "mlxtend", "onnx", "tritonclient", "scipy"})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PurifierError as e:
        print(f"purifier: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in FULL_INSTALL_MODULES:
            raise
        print(f"purifier: error: {args.command} needs {e.name}, which the serving install leaves out; "
              "install everything with pip install 'purifier[cpu,full]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("purifier: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
