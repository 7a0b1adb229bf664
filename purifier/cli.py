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


# defense name -> module providing `fit_cli(args) -> int`
FIT_MODULES = {"memguard": "purifier.defenses.memguard", "purifier": "purifier.defenses.purifier_net"}


def _fit_defense(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(FIT_MODULES[args.defense]).fit_cli(args)


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

    p = sub.add_parser("fit-defense", help="fit a defense for a target from its member and reference splits")
    p.add_argument("defense", choices=list(FIT_MODULES), help="which defense to fit")
    p.add_argument("--target", required=True, help="target directory (from train-target)")
    p.add_argument("--out", required=True, help="output directory for the fitted defense")
    p.add_argument("--epsilon", type=float, default=None,
                   help="memguard: expected L1 utility budget per query (Phase II)")
    p.add_argument("--mode", choices=["fast", "faithful"], default="fast",
                   help="memguard: Phase I solver (default fast)")
    p.add_argument("--label-swap", action="store_true",
                   help="purifier: enable the label swapper (off by default)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="torch/ORT device")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--secret-file", default=None,
                   help="PRF secret used to report realized distortion (else $PURIFIER_SECRET[_FILE], "
                        "else a throwaway secret)")
    p.set_defaults(func=_fit_defense)

    from purifier.audit.command import add_parser as add_audit_parser

    add_audit_parser(sub)
    return parser




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
    except KeyboardInterrupt:
        print("purifier: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
