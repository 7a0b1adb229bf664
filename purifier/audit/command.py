"""`purifier audit`: argument definitions and the command, kept out of cli.py so the shared
parser only needs two lines. Attack catalogue and reporting rules: docs/design.md#attacks and #reporting.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from purifier.errors import ConfigError
from purifier.untrusted import printable


def add_parser(sub) -> argparse.ArgumentParser:
    from purifier.attacks import REGISTRY
    from purifier.audit.model_flags import add_model_flags

    p = sub.add_parser("audit", help="run membership inference attacks against a model or an OIP v2 endpoint; "
                                     "write report.html, report.md, report.json, roc.png",
                       description="Records come from --target DIR (train-target splits) or from files: "
                                   "--members, --nonmembers (evaluation records) and --attacker-pool. Record "
                                   "files: .npz with X (N, D) and y (N,), or .csv with a header and a label column.")
    add_model_flags(p, endpoint_help="the OIP v2 gRPC endpoint under audit (the sidecar or an undefended server)")
    p.add_argument("--target", default=None, help="target directory (model.json + splits): the records, and the "
                                                  "model with --in-process")
    add_record_flags(p)
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--attacks", nargs="+", default=None, metavar="NAME",
                   help=f"attacks to run (names or comma lists, 'all'); default: all but label_boundary. "
                        f"Choices: {', '.join(REGISTRY)}")
    p.add_argument("--baseline", default=None, metavar="HOST:PORT|REPORT",
                   help="the undefended model, for the report's \"before\": its endpoint (queried in plaintext "
                        "without a token; the same attacks and shadow models run against it, and the defense's "
                        "cost to users is measured), or the directory or report.json of its earlier audit on the "
                        "same records")
    p.add_argument("--baseline-model-name", default=None, help="model name at --baseline (default --model-name)")
    p.add_argument("--defense-name", default=None,
                   help="defense algorithm the attacker assumes, for the adaptive attacks (e.g. memguard)")
    add_attacker_flags(p)
    p.add_argument("--boundary-budget", type=int, default=1000,
                   help="label_boundary: queries per record (default 1000)")
    p.add_argument("--in-process", action="store_true",
                   help="with --target: query the target's ONNX model in this process instead of an endpoint")
    p.add_argument("--defense-dir", default=None, help="in process (--model or --in-process): a fitted defense "
                                                       "directory to apply")
    p.add_argument("--secret-file", default=None, help="PRF secret for --defense-dir "
                                                       "(else $PURIFIER_SECRET[_FILE], else a throwaway one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def add_record_flags(p: argparse.ArgumentParser) -> None:
    """The evaluation and attacker record files and what is known about the target (audit, tune)."""
    from purifier.data.records import DEFAULT_LABEL_COLUMN

    p.add_argument("--members", default=None, metavar="FILE", help="evaluation records from the training set")
    p.add_argument("--nonmembers", default=None, metavar="FILE",
                   help="evaluation records not in the training set (same distribution)")
    p.add_argument("--attacker-pool", default=None, metavar="FILE",
                   help="the attacker's own records (same distribution, disjoint from the evaluation records)")
    p.add_argument("--label-column", default=DEFAULT_LABEL_COLUMN, help="label column of .csv record files")
    p.add_argument("--image-shape", default=None, metavar="C,H,W",
                   help="record files hold flattened images of this shape (image augmentations, cnn shadows)")
    p.add_argument("--target-family", default=None, metavar="NAME",
                   help="the target's model family if known (e.g. random_forest): the report warns when the "
                        "shadow recipe differs, and it is the default recipe when it names one")
    p.add_argument("--train-size", type=int, default=None,
                   help="the target's training-set size if known: each shadow trains on as many records")


def add_attacker_flags(p: argparse.ArgumentParser) -> None:
    """How the attacker's shadow models are trained, the bootstrap and the seed (audit, tune)."""
    from purifier.attacks.shadow import BUILTIN_RECIPES

    p.add_argument("--shadow-model", default=None, metavar="RECIPE",
                   help=f"how shadow models are trained: {', '.join(BUILTIN_RECIPES)}, or module:function "
                        "(your code: train(X, y, n_classes, seed) -> predict_proba callable); default: the "
                        "target's family if known, else mlp")
    add_shadow_count_flags(p)
    add_executor_flags(p)
    p.add_argument("--shadow-epochs", type=int, default=None, help="torch recipes: override the epochs")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for 95%% CIs (default 200)")
    p.add_argument("--seed", type=int, default=0, help="attacker seed (default 0)")


def add_shadow_count_flags(p: argparse.ArgumentParser) -> None:
    """--shadows and --quick (audit, tune, demo); `shadow_count` reads them."""
    from purifier.attacks.shadow import DEFAULT_SHADOWS, QUICK_SHADOWS

    p.add_argument("--shadows", type=int, default=None,
                   help=f"number of shadow models (default {DEFAULT_SHADOWS}: enough for the online LiRA, RMIA and "
                        "calibrated label attacks; the shadow cache keeps them for later audits of the same records)")
    p.add_argument("--quick", action="store_true",
                   help=f"a quick audit with {QUICK_SHADOWS} shadow models: LiRA, RMIA and the calibrated label attack "
                        "fall back to weaker variants and understate TPR at low FPR")


def shadow_count(args) -> int:
    """The shadow count from --shadows / --quick; --quick says once what it gives up."""
    from purifier.attacks.shadow import DEFAULT_SHADOWS, QUICK_SHADOWS

    if args.quick and args.shadows is not None:
        raise ConfigError("--quick means --shadows " f"{QUICK_SHADOWS}; give one of them")
    if args.shadows is not None and args.shadows < 1:
        raise ConfigError(f"--shadows: need at least 1 shadow model, got {args.shadows}")
    if not args.quick:
        return DEFAULT_SHADOWS if args.shadows is None else args.shadows
    if not getattr(args, "quiet", False):
        print(f"purifier: quick audit: {QUICK_SHADOWS} shadow models instead of {DEFAULT_SHADOWS}; attacks that need "
              "more fall back to weaker variants (the report lists them), so TPR at low FPR is understated; "
              "drop --quick for the full-strength audit", file=sys.stderr, flush=True)
    return QUICK_SHADOWS


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    """Where shadow models train and whether the cache is used (audit, demo)."""
    from purifier.executor import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where shadow models train: local processes, one per core (default), or ray (install "
                        "the extra: pip install 'purifier[ray]')")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="--executor ray: join the cluster whose head is here (GCS port, 6379 by default) "
                        "instead of starting a local Ray")
    p.add_argument("--workers", type=int, default=None,
                   help="local processes, or a local Ray's CPUs (default: this machine's cores)")
    p.add_argument("--no-cache", action="store_true",
                   help="train every shadow model afresh and store none (default: reuse the shadows earlier "
                        "audits trained on the same records, recipe and seed)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="shadow cache (default: $PURIFIER_CACHE_DIR, else ~/.cache/purifier/shadows)")


def executor_settings(args) -> dict:
    """AuditConfig's executor and cache fields from `add_executor_flags`, checked before any work:
    Ray missing, no cluster at --ray-address, a cache path that is a file each fail in one line."""
    from purifier.executor import ExecutorSpec

    executor = ExecutorSpec(args.executor, args.workers, args.ray_address)
    executor.check()
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise ConfigError(f"--cache-dir: {args.cache_dir} exists and is not a directory")
    return {"executor": executor, "cache": not args.no_cache, "cache_dir": args.cache_dir}


def _image_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--image-shape: {text!r} is not C,H,W (e.g. 1,28,28)")
    return shape


def load_checked_defense(args, model):
    """The --defense-dir defense, checked against the in-process `model` (ONNX hash, fingerprint)."""
    if not args.defense_dir:
        return None
    from purifier.defenses import load_defense, load_secret

    secret = load_secret(file=args.secret_file, required=False)
    defense = load_defense(args.defense_dir, secret=secret or os.urandom(32).hex().encode(),
                           model_id=model.model_id or None, check_secret=secret is not None)
    fp = defense.fingerprint
    why = fp.mismatch(model.query(fp.inputs)) if fp is not None and model.n_features in (None, fp.n_features) else None
    if why is not None:
        raise ConfigError(f"--defense-dir {args.defense_dir} was fitted for another model: {why}; refit it "
                          "for this model")
    return defense


def _open_access(args, target):
    """(access, baseline, defense_name, source) from the arguments: `baseline` is the undefended
    model's access (in process: the model without --defense-dir), a `Report` of an earlier audit
    of it (--baseline REPORT), or None."""
    from purifier.audit.model_flags import open_model
    from purifier.audit.results import Report, Source
    from purifier.models.access import InProcessTarget, OnnxTarget, RemoteTarget, TargetAccess

    in_process = args.in_process or bool(args.model)
    if args.in_process:
        if args.endpoint or args.model:
            raise ConfigError("--in-process runs the --target's own model; drop --endpoint/--model")
        if target is None:
            raise ConfigError("--in-process needs --target DIR (or name an .onnx file with --model)")
    if args.defense_dir and not in_process:
        raise ConfigError("--defense-dir only applies in process (--model or --in-process): an endpoint applies "
                          "its own defense")
    if not (in_process or args.endpoint):
        raise ConfigError("name the model under audit: --endpoint HOST:PORT --model-name NAME, or --model "
                          "MODEL.onnx (or --target DIR --in-process)")
    access: OnnxTarget | RemoteTarget
    baseline: TargetAccess | Report | None
    if in_process:
        if args.in_process:
            defense = load_checked_defense(args, InProcessTarget(target))
            access = InProcessTarget(target, defense)
            baseline = InProcessTarget(target) if defense is not None else None
        else:
            plain = OnnxTarget(args.model, args.output_name, args.logits)
            defense = load_checked_defense(args, plain)
            access = OnnxTarget(args.model, args.output_name, args.logits, defense) if defense else plain
            baseline = plain if defense is not None else None
        name = defense.name if defense is not None else "none"
        if args.baseline:
            raise ConfigError("--baseline names the undefended model of an endpoint audit; in process the model "
                              "without --defense-dir is the baseline already")
        return access, baseline, args.defense_name or name, Source("in-process", model=args.model,
                                                                   output_name=access.output_name)
    earlier = Report.read(args.baseline) if args.baseline and Path(args.baseline).exists() else None
    access = open_model(args, n_classes=target.n_classes if target is not None else None)
    baseline = earlier
    if args.baseline and earlier is None:
        try:
            baseline = RemoteTarget(args.baseline, args.baseline_model_name or args.model_name, None,
                                    n_classes=access.n_classes, logits=args.logits)
        except BaseException:
            access.close()
            raise
    # the output name may come from the endpoint's metadata: plain characters only (purifier.untrusted)
    def shown(v: str | None) -> str | None:
        return v if v is None else printable(v)

    return access, baseline, args.defense_name, Source(shown(args.endpoint), shown(args.model_name),
                                                       shown(access.output_name), baseline_endpoint=args.baseline)


def audit_data(args, target, access):
    """The AuditData from --target or from the three record files, checked against the model."""
    from dataclasses import replace

    from purifier.audit.data import AuditData
    from purifier.data.records import load_records

    if target is not None:
        data = AuditData.from_target(target)
        if args.image_shape:
            raise ConfigError("--image-shape: a --target directory records its own data layout")
    else:
        records = [load_records(path, args.label_column, flag) for flag, path in
                   (("--members", args.members), ("--nonmembers", args.nonmembers),
                    ("--attacker-pool", args.attacker_pool))]
        for r in records:
            r.check_model(access.n_features, access.n_classes)
        shape = _image_shape(args.image_shape)
        name = printable(args.model_name or Path(args.model).stem)  # what the report's title names
        members, nonmembers, pool = records
        data = AuditData(members, nonmembers, pool, access.n_classes, name=name, kind="image" if shape else "tabular",
                         image_shape=shape, model_id=access.model_id or None)
        data.check_disjoint()
    if args.target_family:
        data = replace(data, model_family=args.target_family)
    if args.train_size is not None:
        if args.train_size < 1:
            raise ConfigError(f"--train-size: {args.train_size} must be a positive record count")
        data = replace(data, train_size=args.train_size)
    return data


def run(args: argparse.Namespace) -> int:
    from purifier.artifacts import new_output_dir
    from purifier.attacks import ADAPTIVE, parse_attacks
    from purifier.audit.report import text_table, write_report
    from purifier.audit.results import Report
    from purifier.audit.runner import AuditConfig, run_audit, run_before_after
    from purifier.models.target import Target

    new_output_dir(args.out, args.force, "report.json")
    shadow_settings = executor_settings(args)  # before any query
    explicit = args.attacks is not None
    attacks = parse_attacks(args.attacks)
    files = [f for f, v in (("--members", args.members), ("--nonmembers", args.nonmembers),
                            ("--attacker-pool", args.attacker_pool)) if v]
    target = None
    if args.target:
        if files:
            raise ConfigError(f"--target brings its own records; drop {', '.join(files)}")
        target = Target.load(args.target)
        _ = target.splits  # a target directory without splits fails here, before any query
    elif len(files) < 3:
        raise ConfigError("give the records: --members FILE --nonmembers FILE --attacker-pool FILE "
                          "(or --target DIR)")
    access, baseline, defense_name, source = _open_access(args, target)
    skipped = {}
    try:
        data = audit_data(args, target, access)
        if defense_name in (None, "none") and not explicit:
            attacks = [a for a in attacks if a not in ADAPTIVE]  # nothing to adapt to
            why = "undefended: nothing to adapt to" if defense_name else "no --defense-name"
            skipped = {a: why for a in ADAPTIVE}
        config = AuditConfig(tuple(attacks), n_shadows=shadow_count(args), shadow_epochs=args.shadow_epochs,
                             shadow_model=args.shadow_model, boundary_budget=args.boundary_budget,
                             n_boot=args.bootstrap, seed=args.seed, progress=not args.quiet,
                             **shadow_settings)
        data.recipe(config.shadow_model, config.shadow_epochs)  # a bad recipe fails before any query
        if isinstance(baseline, Report):
            audit = run_audit(data, access, config, defense_name, source=source, skipped=skipped, before=baseline)
        elif baseline is not None:
            audit = run_before_after(data, access, baseline, config, defense_name, source, skipped)[1]
        else:
            audit = run_audit(data, access, config, defense_name, source=source, skipped=skipped)
    finally:
        access.close()
        if baseline is not None and not isinstance(baseline, Report):
            baseline.close()
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
    out = write_report(audit, args.out)
    print(text_table(audit.report))
    for warning in audit.report.assumptions.warnings if audit.report.assumptions else ():
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report: {out}/report.html (open in a browser), report.md, report.json, roc.png", file=sys.stderr)
    return 0
