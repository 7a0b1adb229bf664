"""`purifier fit-defense`: fit any registered defense for any model, from a target directory or
from the user's own record files, with the model in process or behind an endpoint.

A defense is fitted on the model's confidence vectors for its training members and for a
reference set of non-members the defender holds back (MemGuard: Jia et al. 2019; PURIFIER: Yang
et al. 2020/2023). This command gets those vectors from whatever `--model` / `--endpoint` names
(`purifier.audit.model_flags`), validates the record files (`purifier.data.records`), fits,
prints the defense's own summary (`Defense.fit_summary`) and writes the fitted directory
atomically, with the model's fingerprint (probe rows and answers) inside.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path
from typing import Any

from purifier.errors import ConfigError

# defense-specific shortcut flags -> constructor keyword
SHORTCUTS = {"epsilon": "--epsilon", "mode": "--mode", "label_swap": "--label-swap"}


def add_parser(sub) -> argparse.ArgumentParser:
    from purifier.audit.model_flags import add_model_flags
    from purifier.data.records import DEFAULT_LABEL_COLUMN
    from purifier.defenses import REGISTRY, tunable_defenses
    from purifier.devices import DEVICES

    p = sub.add_parser("fit-defense", help="fit a defense for a model from its members and a reference set",
                       description="Records come from --target DIR (train-target splits) or from files: "
                                   "--members (the model's training records) and --reference (non-members "
                                   "you hold back, never used to audit). Record files: .npz with X (N, D) "
                                   "and y (N,), or .csv with a header and a label column.")
    p.add_argument("defense", choices=[n for n in REGISTRY if n != "none"], help="which defense to fit")
    p.add_argument("--out", required=True, help="output directory for the fitted defense")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--target", default=None, help="a target directory (from train-target): model and records")
    p.add_argument("--members", default=None, metavar="FILE", help="the model's training records")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="non-member records from the same distribution, held back from training and audits")
    p.add_argument("--label-column", default=DEFAULT_LABEL_COLUMN, help="label column of .csv record files")
    add_model_flags(p, endpoint_help="an OIP v2 gRPC server (Triton, MLServer, KServe) serving the model")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a hyper-parameter of the defense (repeatable; VALUE is JSON or a string), "
                        "e.g. --param epochs=100")
    p.add_argument("--budget", default=None, metavar="VALUE",
                   help="the defense's budget, as `purifier tune` sets it: "
                        + "; ".join(f"{n}: {k.param}" for n, c in tunable_defenses().items() if (k := c.knob)))
    p.add_argument("--epsilon", type=float, default=None, help="memguard: expected L1 utility budget per query")
    p.add_argument("--mode", choices=["fast", "faithful"], default=None, help="memguard: Phase I solver")
    p.add_argument("--label-swap", action="store_true", default=None, help="purifier: enable the label swapper")
    p.add_argument("--device", choices=list(DEVICES), default="cpu", help="torch/ORT device")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--secret-file", default=None,
                   help="the PRF secret the defense will be served with (else $PURIFIER_SECRET[_FILE]); the "
                        "fitted defense records its key check value, and serving refuses another secret")
    p.set_defaults(func=run)
    return p


def defense_kwargs(cls, args: argparse.Namespace) -> dict:
    """Constructor keywords from --param, the shortcut flags, and --seed/--device where accepted."""
    accepted = {n for n, prm in inspect.signature(cls.__init__).parameters.items()
                if prm.kind is prm.KEYWORD_ONLY and n != "secret"}
    kwargs = {}
    for item in args.param:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--param {item!r}: write NAME=VALUE (e.g. --param epochs=100)")
        try:
            kwargs[name] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[name] = text
    if getattr(args, "budget", None) is not None:
        if cls.knob is None:
            raise ConfigError(f"--budget: the {cls.name} defense has no budget")
        kwargs[cls.knob.param] = cls.knob.parse(args.budget, "--budget")[0]
    for name, flag in SHORTCUTS.items():
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
            if name not in accepted:
                raise ConfigError(f"{flag} does not apply to the {cls.name} defense")
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"--param {unknown[0]}: the {cls.name} defense has no such hyper-parameter; "
                          f"it takes: {', '.join(sorted(accepted))}")
    for name in ("seed", "device"):
        if name in accepted:
            kwargs.setdefault(name, getattr(args, name))
    return kwargs


def _records(args: argparse.Namespace):
    """(members, reference, access, what) from --target or from files and a model flag."""
    from purifier.audit.model_flags import open_model
    from purifier.data.records import Records, check_disjoint, load_records

    files = [f for f, v in (("--members", args.members), ("--reference", args.reference)) if v]
    if args.target:
        if files or args.model or args.endpoint:
            raise ConfigError(f"--target brings its own model and records; drop {', '.join(files) or '--model/--endpoint'}")
        from purifier.models.access import InProcessTarget
        from purifier.models.target import Target

        target = Target.load(args.target)
        (Xm, ym), (Xr, yr) = target.role("train"), target.role("reference")
        return (Records(Xm, ym, f"{args.target} (train split)"), Records(Xr, yr, f"{args.target} (reference split)"),
                InProcessTarget(target), f"target {target.manifest['dataset']}")
    if len(files) < 2:
        raise ConfigError("give --members FILE and --reference FILE with --model or --endpoint (or --target DIR)")
    if not (args.model or args.endpoint):
        raise ConfigError("name the model: --model MODEL.onnx, or --endpoint HOST:PORT --model-name NAME")
    members = load_records(args.members, args.label_column, "--members")
    reference = load_records(args.reference, args.label_column, "--reference")
    check_disjoint(members, reference)
    access = open_model(args)
    try:
        for r in (members, reference):
            r.check_model(access.n_features, access.n_classes)
    except BaseException:
        access.close()
        raise
    return members, reference, access, access.description


def run(args: argparse.Namespace) -> int:
    from purifier.artifacts import new_output_dir
    from purifier.defenses import FitData, defense_class, load_secret

    out = new_output_dir(args.out, args.force, "defense.json")
    cls = defense_class(args.defense)
    defense = cls(**defense_kwargs(cls, args))  # bad hyper-parameters fail before anything is said or done
    defense.secret = load_secret(file=args.secret_file)  # the fitted defense is bound to it
    members, reference, access, what = _records(args)
    t0 = time.perf_counter()
    try:
        data = FitData.from_model(access, members, reference)
    finally:
        access.close()
    query_s = time.perf_counter() - t0
    options: dict[str, Any] = {"progress": True} if "progress" in inspect.signature(defense.fit).parameters else {}
    defense.fit(data, **options)
    extra, lines = defense.fit_summary(data)
    fit_s = time.perf_counter() - t0 - query_s
    extra = {**extra, "fitted_on": {"model": what, "members": members.source, "reference": reference.source,
                                    "member_rows": len(members), "reference_rows": len(reference)}}
    defense.save(out, extra=extra)
    print(f"{cls.name} for {what} ({data.n_classes} classes) -> {Path(out)}")
    print(f"  {len(members)} members, {len(reference)} reference rows; model queried in {query_s:.1f}s, "
          f"fitted in {fit_s:.1f}s")
    for line in lines:
        print(f"  {line}")
    return 0
