"""`purifier audit`: argument definitions and the command, kept out of cli.py so the shared
parser only needs two lines. Attack catalogue and reporting rules: REFERENCE.md section 4.
"""

from __future__ import annotations

import argparse
import os
import sys

from purifier.errors import ConfigError


def add_parser(sub) -> argparse.ArgumentParser:
    from purifier.attacks import DEFAULT_ATTACKS, REGISTRY

    p = sub.add_parser("audit", help="run membership inference attacks against an OIP v2 endpoint; "
                                     "write report.json, report.md, roc.png")
    p.add_argument("--endpoint", help="HOST:PORT of the OIP v2 gRPC endpoint under audit (the sidecar "
                                      "or an undefended model server)")
    p.add_argument("--model-name", help="model name served at --endpoint")
    p.add_argument("--output-name", default=None,
                   help="confidence output (default: 'probabilities' if served, else the only output)")
    p.add_argument("--target", required=True, help="target directory (model.json + splits) naming the "
                                                   "evaluation records and the attacker pool")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--attacks", nargs="+", default=None, metavar="NAME",
                   help=f"attacks to run (names or comma lists, 'all'); default: all but label_boundary. "
                        f"Choices: {', '.join(REGISTRY)}")
    p.add_argument("--baseline", default=None, help="HOST:PORT of the undefended endpoint (utility: "
                                                    "argmax agreement, L1 distortion)")
    p.add_argument("--baseline-model-name", default=None, help="model name at --baseline (default --model-name)")
    p.add_argument("--defense-name", default=None,
                   help="defense algorithm the attacker assumes, for the adaptive attacks (e.g. memguard)")
    p.add_argument("--shadows", type=int, default=4, help="number of shadow models (default 4)")
    p.add_argument("--shadow-epochs", type=int, default=None, help="override the target recipe's epochs")
    p.add_argument("--boundary-budget", type=int, default=1000,
                   help="label_boundary: queries per record (default 1000)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for 95%% CIs (default 200)")
    p.add_argument("--seed", type=int, default=0, help="attacker seed (default 0)")
    p.add_argument("--in-process", action="store_true",
                   help="query the target's ONNX model in this process (tests, demos) instead of an endpoint")
    p.add_argument("--defense-dir", default=None, help="--in-process: a fitted defense directory to apply")
    p.add_argument("--secret-file", default=None, help="--in-process: PRF secret for --defense-dir "
                                                       "(else $PURIFIER_SECRET[_FILE], else a throwaway one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    _ = DEFAULT_ATTACKS
    return p


def _open_access(args, target):
    """(access, baseline, defense_name, info) from the arguments."""
    from purifier.audit.access import InProcessTarget, RemoteTarget

    if args.in_process:
        if args.endpoint:
            raise ConfigError("choose either --endpoint or --in-process, not both")
        defense = None
        if args.defense_dir:
            from purifier.defenses import load_defense
            from purifier.defenses.keyed import load_secret

            secret = load_secret(None, args.secret_file, required=False) or os.urandom(32).hex().encode()
            defense = load_defense(args.defense_dir, secret=secret, model_id=target.model_id)
        access = InProcessTarget(target, defense)
        baseline = InProcessTarget(target) if defense is not None else None
        name = defense.name if defense is not None else "none"
        return access, baseline, args.defense_name or name, {"endpoint": "in-process"}
    if args.defense_dir:
        raise ConfigError("--defense-dir only applies with --in-process (an endpoint applies its own defense)")
    if not args.endpoint or not args.model_name:
        raise ConfigError("give --endpoint HOST:PORT and --model-name NAME (or --in-process)")
    access = RemoteTarget(args.endpoint, args.model_name, args.output_name, n_classes=target.n_classes)
    baseline = None
    if args.baseline:
        try:
            baseline = RemoteTarget(args.baseline, args.baseline_model_name or args.model_name, None,
                                    n_classes=target.n_classes)
        except BaseException:
            access.close()
            raise
    info = {"endpoint": args.endpoint, "model_name": args.model_name, "output_name": access.output_name,
            "baseline_endpoint": args.baseline}
    return access, baseline, args.defense_name, info


def run(args: argparse.Namespace) -> int:
    from purifier.artifacts import check_output_dir
    from purifier.attacks import ADAPTIVE, parse_attacks
    from purifier.audit.report import text_table, write_report
    from purifier.audit.runner import AuditConfig, run_audit
    from purifier.models.target import Target

    check_output_dir(args.out)
    explicit = args.attacks is not None
    attacks = parse_attacks(args.attacks)
    target = Target.load(args.target)
    _ = target.splits  # a target directory without splits fails here, before any query
    access, baseline, defense_name, info = _open_access(args, target)
    try:
        if not defense_name and not explicit:
            attacks = [a for a in attacks if a not in ADAPTIVE]  # nothing to adapt to
            info["skipped"] = {a: "no --defense-name" for a in ADAPTIVE}
        config = AuditConfig(tuple(attacks), n_shadows=args.shadows, shadow_epochs=args.shadow_epochs,
                             boundary_budget=args.boundary_budget, n_boot=args.bootstrap, seed=args.seed,
                             progress=not args.quiet)
        audit = run_audit(target, access, config, defense_name, baseline, info)
    finally:
        access.close()
        if baseline is not None:
            baseline.close()
    out = write_report(audit, args.out)
    print(text_table(audit.report))
    print(f"report: {out}/report.json, report.md, roc.png", file=sys.stderr)
    return 0
