"""The `purifier` command line. Heavy imports happen inside each subcommand.

User mistakes (`PurifierError`) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys

from purifier.errors import PurifierError
from purifier.untrusted import printable


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
    # the only place the library touches the server package, imported lazily; the flags are
    # generated from the server's Settings fields, so they are parsed there too
    from purifier_server.app import run
    from purifier_server.settings import parse_arguments

    return run(parse_arguments(args.serve_args))


def _add_serve(sub) -> None:
    # a pass-through: building the real parser would import the server package for every command
    p = sub.add_parser("serve", add_help=False, prefix_chars="\0",
                       help="run the gRPC sidecar (OIP v2) in front of a model server or an ONNX model "
                            "(purifier serve --help lists its flags)")
    p.add_argument("serve_args", nargs=argparse.REMAINDER)
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

    from purifier.audit.command import add_executor_flags, add_shadow_count_flags
    from purifier.audit.command import add_parser as add_audit_parser

    add_audit_parser(sub)

    from purifier.tuning import add_parser as add_tune_parser

    add_tune_parser(sub)

    from purifier.bench.command import add_parser as add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser("demo", help="end to end: train, fit MemGuard and PURIFIER, serve, audit through gRPC")
    p.add_argument("--out", default="build/demo", help="working directory (reused by a rerun; default build/demo)")
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist5k", "purchase_like"],
                   help="default digits; purchase_like is the leaky benchmark (its target is right on every "
                        "member and far less often on non-members)")
    p.add_argument("--seed", type=int, default=0, help="target, defense and attacker seed (default 0)")
    add_shadow_count_flags(p)
    add_executor_flags(p)
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
    except PurifierError as e:  # may quote an endpoint's text: plain characters only (purifier.untrusted)
        print(f"purifier: error: {printable(e, None)}", file=sys.stderr)
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
