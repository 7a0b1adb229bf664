"""`purifier tune DEFENSE`: choose a defense's budget by measurement instead of guessing it.

Sweeps the defense's budget (MemGuard's epsilon, PURIFIER's L1 budget, top-k's k, rounding's
decimals, noise's scale) over a grid, audits every setting with the confidence attacks against the
label-only floor (`purifier.audit.sweep`), with the simple baselines on the same curve, and
reports the weakest setting whose best confidence attack is within the floor's 95% interval,
with what it costs real users (L1 on non-members). Why the floor: a defense that keeps the
predicted label cannot push membership inference below what the label alone leaks (Yeom et al.
2018; Choquette-Choo et al. 2021), so more distortion past it buys nothing; MemGuard's epsilon is
the expected L1 budget of Jia et al. (CCS 2019).

Same model and record inputs as `fit-defense` and `audit`: `--target DIR`, or `--model` /
`--endpoint` with record files. The defense is a fitted directory (`--defense-dir`) or fitted
here from the members and `--reference`. Writes `tune.json`, `tune.md` and `tune.png` into
`--out` atomically; `--write-to DIR` puts the chosen setting into a fitted defense directory.
Exit status 0 when a setting reaches the floor, 1 when none does (the report says which came
closest), 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from purifier.audit.results import Result, ShadowInfo, Strongest
from purifier.audit.sweep import SweepPoint
from purifier.errors import ConfigError

RULE = ("the weakest setting whose best confidence attack AUC is at most the upper end of the label-only floor's "
        "95% bootstrap interval, with every predicted label kept")


def add_parser(sub) -> argparse.ArgumentParser:
    from purifier.audit.command import add_attacker_flags, add_record_flags
    from purifier.audit.model_flags import add_model_flags
    from purifier.audit.sweep import CONFIDENCE_ATTACKS
    from purifier.defenses import REGISTRY, baseline_defenses, tunable_defenses
    from purifier.devices import DEVICES

    grids = "; ".join(f"{n}: {k.param} {','.join('none' if v is None else f'{v:g}' for v in k.grid)}"
                      for n, c in tunable_defenses().items() if (k := c.knob))
    p = sub.add_parser("tune", help="sweep a defense's budget and pick the smallest setting that reaches the "
                                    "label-only floor; write tune.json, tune.md, tune.png",
                       description="Records come from --target DIR (train-target splits) or from files: "
                                   "--members (the model's training records, audited as members), --nonmembers "
                                   "and --attacker-pool as for audit, and --reference (non-members the defender "
                                   "holds back) to fit the defense unless --defense-dir names a fitted one.")
    p.add_argument("defense", choices=[n for n in REGISTRY if n != "none"], help="the defense whose budget to tune")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--target", default=None, help="a target directory (from train-target): model and records")
    add_model_flags(p, endpoint_help="an OIP v2 gRPC server serving the undefended model (the defense is applied "
                                     "here, as the sidecar would)")
    add_record_flags(p)
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="non-member records held back by the defender, to fit the defense (not with --defense-dir)")
    p.add_argument("--defense-dir", default=None, help="a fitted defense to sweep (default: fit one here)")
    p.add_argument("--grid", default=None, metavar="V1,V2,...",
                   help=f"the settings to try (default per defense: {grids})")
    p.add_argument("--baselines", default=",".join(baseline_defenses()), metavar="NAMES",
                   help="simple alternatives on the same curve, comma-separated, or 'none' (default: %(default)s)")
    p.add_argument("--attacks", default=",".join(CONFIDENCE_ATTACKS), metavar="NAMES",
                   help="the confidence attacks measured at every setting (default: %(default)s)")
    add_attacker_flags(p)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="fitting here: a hyper-parameter of the defense (repeatable), as for fit-defense")
    p.add_argument("--device", choices=list(DEVICES), default="cpu", help="fitting here: torch/ORT device")
    p.add_argument("--secret-file", default=None,
                   help="PRF secret (else $PURIFIER_SECRET[_FILE], else a throwaway one: the privacy figures hold "
                        "for any secret); required with --write-to, which binds the defense to it")
    p.add_argument("--write-to", default=None, metavar="DEFENSE_DIR",
                   help="write the chosen setting into this fitted defense directory (same defense and model), "
                        "or save the swept defense there at the chosen setting if it does not exist")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run, budget=None, epsilon=None, mode=None, label_swap=None)
    return p


def _names(text: str, flag: str, allowed, what: str) -> list[str]:
    names = [] if text.strip().lower() == "none" else [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ConfigError(f"{flag}: {bad[0]!r} is not {what}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def _plan(args) -> tuple:
    """(knob, grid, baselines, attacks), all checked before any model is opened."""
    from purifier.attacks import REGISTRY, Family, attack_class
    from purifier.defenses import baseline_defenses, defense_class, tunable_defenses

    cls = defense_class(args.defense)
    k = cls.knob
    if k is None:
        if cls.baseline_grid:
            raise ConfigError(f"{args.defense} has no budget to tune (it always answers the same way); it is on "
                              "every tune curve as a baseline")
        raise ConfigError(f"defense: {args.defense!r} has no budget to tune; choose one of {', '.join(tunable_defenses())}")
    grid = k.parse(args.grid) if args.grid is not None else k.weakest_first(k.grid)
    for value in grid:
        try:
            cls(**{k.param: value})
        except ConfigError as e:
            raise ConfigError(f"--grid: {e}") from None
    baselines = [n for n in _names(args.baselines, "--baselines", list(baseline_defenses()), "a baseline defense")
                 if n != args.defense]
    confidence = [n for n in REGISTRY if attack_class(n).family == Family.CONFIDENCE]
    attacks = _names(args.attacks, "--attacks", confidence, "a confidence attack")
    if not attacks:
        raise ConfigError(f"--attacks: name at least one confidence attack from {', '.join(confidence)}")
    return k, grid, baselines, attacks


def _check_write_to(args, model_id: str | None = None) -> None:
    """--write-to is a fitted defense of this kind for this model (`model_id`, once known), or a new path."""
    if args.write_to is None:
        return
    from purifier.defenses import read_defense_manifest

    path = Path(args.write_to)
    if path.exists():
        manifest = read_defense_manifest(path)
        if manifest["defense"] != args.defense:
            raise ConfigError(f"--write-to: {path} holds a {manifest['defense']} defense, not {args.defense}")
        if model_id and manifest["model_id"] and manifest["model_id"] != model_id:
            raise ConfigError(f"--write-to: {path} was fitted for model {manifest['model_id'][:12]}..., not this "
                              f"model {model_id[:12]}...")
    elif not path.resolve().parent.is_dir():
        raise ConfigError(f"--write-to: parent directory {path.resolve().parent} does not exist")


def _open(args):
    """(access, data, fit records or None) from --target or from files and a model flag."""
    from purifier.audit.command import audit_data
    from purifier.audit.model_flags import open_model
    from purifier.data.records import Records, check_disjoint, load_records

    files = [f for f, v in (("--members", args.members), ("--nonmembers", args.nonmembers),
                            ("--attacker-pool", args.attacker_pool), ("--reference", args.reference)) if v]
    fit: tuple[Records, Records] | None
    if args.target:
        if files or args.model or args.endpoint:
            raise ConfigError(f"--target brings its own model and records; drop "
                              f"{', '.join(files) or '--model/--endpoint'}")
        from purifier.audit.data import AuditData
        from purifier.models.access import InProcessTarget
        from purifier.models.target import Target

        target = Target.load(args.target)
        fit = (Records(*target.role("train"), f"{args.target} (train split)"),
               Records(*target.role("reference"), f"{args.target} (reference split)"))
        return InProcessTarget(target), AuditData.from_target(target), fit
    missing = [f for f, v in (("--members", args.members), ("--nonmembers", args.nonmembers),
                              ("--attacker-pool", args.attacker_pool)) if not v]
    if not args.defense_dir and not args.reference:
        missing.append("--reference (or a fitted --defense-dir)")
    if missing:
        raise ConfigError(f"give {', '.join(missing)} with --model or --endpoint (or --target DIR)")
    if not (args.model or args.endpoint):
        raise ConfigError("name the model: --model MODEL.onnx, or --endpoint HOST:PORT --model-name NAME")
    access = open_model(args)
    try:
        data = audit_data(args, None, access)
        fit = None
        if args.reference:
            reference = load_records(args.reference, args.label_column, "--reference")
            reference.check_model(access.n_features, access.n_classes)
            for other in (data.members, data.nonmembers, data.pool):
                check_disjoint(other, reference)
            fit = (data.members, reference)
    except BaseException:
        access.close()
        raise
    return access, data, fit


def _defense(args, access, fit, secret: bytes):
    """The defense to sweep: --defense-dir (checked against the model) or fitted here."""
    from purifier.audit.command import load_checked_defense
    from purifier.defenses import FitData, defense_class
    from purifier.fitting import defense_kwargs

    cls = defense_class(args.defense)
    if args.defense_dir:
        if args.param or args.reference:
            raise ConfigError("--defense-dir is already fitted; drop --param/--reference")
        defense = load_checked_defense(args, access)
        if defense.name != args.defense:
            raise ConfigError(f"--defense-dir: {args.defense_dir} holds a {defense.name} defense, not {args.defense}")
        return defense
    defense = cls(**defense_kwargs(cls, args), secret=secret)
    _log(args, f"fitting {args.defense} on {len(fit[0])} members and {len(fit[1])} reference rows")
    return defense.fit(FitData.from_model(access, *fit))


def _baseline(name: str, access, secret: bytes):
    from purifier.defenses import defense_class

    defense = defense_class(name)(secret=secret)
    defense.model_id = access.model_id  # unfitted baselines still key their noise to the model
    return defense


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(f"[tune] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Tuning(Result):
    """What `purifier tune` found (tune.json): the sweep, the floor and the chosen setting.

    Attributes:
        chosen: the weakest setting of `defense` within the floor's interval (`RULE`), or None;
        closest: the setting with the weakest best attack; saturated: the grid's two strongest
        settings answered alike (a stronger one would change nothing).
    """

    defense: str
    param: str
    grid: tuple
    baselines: tuple[str, ...]
    attacks: tuple[str, ...]
    dataset: str
    model_id: str | None
    n_members: int
    n_nonmembers: int
    shadows: ShadowInfo
    floor: Strongest
    undefended: SweepPoint
    points: tuple[SweepPoint, ...]
    chosen: SweepPoint | None
    closest: SweepPoint
    saturated: bool
    seconds: float
    load_average_1_5_15min: dict
    written_to: str | None = None
    not_written: str | None = None  # why --write-to wrote nothing although a setting was chosen
    rule: str = RULE

    @property
    def reached_floor(self) -> bool:
        return self.chosen is not None

    def to_json(self) -> dict:
        return {**super().to_json(), "reached_floor": self.reached_floor}


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from purifier.artifacts import new_output_dir
    from purifier.audit.command import shadow_count
    from purifier.audit.runner import AuditConfig
    from purifier.audit.sweep import choose, sweep_points
    from purifier.defenses import defense_class, load_secret

    t0, load_start = time.perf_counter(), os.getloadavg()
    new_output_dir(args.out, args.force, "tune.json")
    k, grid, baselines, attacks = _plan(args)
    _check_write_to(args)
    config = AuditConfig(tuple(attacks), n_shadows=shadow_count(args), shadow_epochs=args.shadow_epochs,
                         shadow_model=args.shadow_model, n_boot=args.bootstrap, seed=args.seed, progress=False)
    # a throwaway secret measures the same privacy; a defense written with --write-to is bound to the served one
    secret = load_secret(file=args.secret_file, required=args.write_to is not None) or secrets.token_bytes(32)
    access, data, fit = _open(args)
    try:
        _check_write_to(args, access.model_id)
        data.recipe(config.shadow_model, config.shadow_epochs)  # a bad recipe fails before any work
        defense = _defense(args, access, fit, secret)
        variants = [(args.defense, v, defense.with_budget(v)) for v in grid]
        for name in baselines:
            base = _baseline(name, access, secret)
            variants += [(name, v, base.with_budget(v)) for v in defense_class(name).baseline_grid]
        started = time.perf_counter()

        def progress(done, total, label):
            _log(args, f"{done}/{total} audited: {label} ({time.perf_counter() - started:.0f}s)")

        _log(args, f"auditing {len(variants) + 1} settings ({config.n_shadows} shadow models, trained once)")
        sweep = sweep_points(data, access, variants, config, progress)
    finally:
        access.close()
    chosen, best = choose(sweep.points, sweep.floor, args.defense)
    result = Tuning(args.defense, k.param, tuple(grid), tuple(baselines), tuple(attacks), data.name, data.model_id,
                    len(data.members), len(data.nonmembers), sweep.undefended_report.shadows, sweep.floor,
                    sweep.undefended, tuple(sweep.points), chosen, best, _saturated(sweep.points, args.defense),
                    round(time.perf_counter() - t0, 1),
                    {"start": list(load_start), "end": list(os.getloadavg())})
    not_written = None if chosen is not None else "no setting reached the floor"
    if args.write_to and chosen is not None:
        try:
            result = replace(result, written_to=str(_write_setting(args, defense, chosen, result, secret)))
        except ConfigError as e:  # the chosen setting changes nothing: the report still says what was measured
            not_written = str(e)
            result = replace(result, not_written=not_written)
    _write_report(args.out, result, chosen)
    print(_summary(result))
    if args.write_to and not_written:
        print(f"nothing written to {args.write_to}: {not_written}", file=sys.stderr)
    print(f"report: {args.out}/tune.json, tune.md, tune.png", file=sys.stderr)
    return 0 if chosen is not None and not (args.write_to and not_written) else 1


def _saturated(points, defense_name: str) -> bool:
    """The two strongest settings of the grid gave the same answers (MemGuard past the largest
    Phase I distance, say): a stronger setting would change nothing."""
    own = [p for p in points if p.defense == defense_name]
    return len(own) > 1 and own[-1].utility.l1_nonmembers == own[-2].utility.l1_nonmembers \
        and own[-1].best_auc == own[-2].best_auc


def _verdict(result: Tuning) -> list[str]:
    f, c, b, u = result.floor.auc, result.chosen, result.closest, result.undefended
    floor = f"label-only floor ({f.attack}) AUC {f.value:.3f} [95% CI {f.ci95[0]:.3f}, {f.ci95[1]:.3f}]"
    lines = [f"{floor}; undefended best attack AUC {u.best_auc:.3f} ({u.best.label})"]
    if c is not None:
        members = c.utility.l1_members
        lines.append(f"chosen: {result.defense} {c.label}: best confidence attack AUC {c.best_auc:.3f} "
                     f"({c.best.label}) is within the floor's interval; real-traffic L1 "
                     f"{c.utility.l1_nonmembers.mean:.4f} mean, {c.utility.l1_nonmembers.p95:.4f} p95"
                     + ("" if members is None else f" (members {members.mean:.4f})"))
    else:
        lines.append(f"no {result.defense} setting in the grid reaches the floor: the closest is {b.label} "
                     f"(best confidence attack AUC {b.best_auc:.3f} [{b.best.ci95[0]:.3f}, {b.best.ci95[1]:.3f}], "
                     f"real-traffic L1 {b.real_traffic_l1:.4f}); "
                     + ("its strongest settings answer alike, so a stronger one would change nothing: this defense "
                        "does not reach the floor on this model" if result.saturated
                        else "extend --grid toward stronger settings"))
    return lines


def table_rows(result: Tuning) -> tuple[list[str], list[list[str]]]:
    header = ["defense", "setting", "real-traffic L1 mean / p95", "members L1", "best attack AUC [95% CI]",
              "TPR@1%FPR", "within floor"]

    def row(p: SweepPoint):
        u, t = p.utility, p.best_tpr_1pct.rate
        mark = " <- chosen" if p == result.chosen else ""
        ok = "yes" if p.within(result.floor) and p.keeps_labels else "no"
        lo, hi = p.best.ci95
        return [p.defense, p.label + mark, f"{u.l1_nonmembers.mean:.4f} / {u.l1_nonmembers.p95:.4f}",
                "-" if u.l1_members is None else f"{u.l1_members.mean:.4f}",
                f"{p.best_auc:.3f} [{lo:.3f}, {hi:.3f}] {p.best.label}",
                f"{t.tpr:.3f} @{t.fpr:.4f}/{t.negatives}", ok]

    return header, [row(result.undefended), *(row(p) for p in result.points)]


def _summary(result: Tuning) -> str:
    from purifier.tables import text_table

    return "\n".join([text_table(*table_rows(result)), "", *_verdict(result)])


def _write_report(out, result: Tuning, chosen) -> None:
    from purifier import tables
    from purifier.artifacts import atomic_directory, write_json
    from purifier.audit.figures import TradeoffPoint, tradeoff_figure
    from purifier.defenses import defense_class

    Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
    points = [TradeoffPoint(p.defense, "" if defense_class(p.defense).knob is None else p.label,
                            p.real_traffic_l1, p.best_auc, p is chosen) for p in result.points]
    with atomic_directory(out) as tmp:
        write_json(tmp / "tune.json", result.to_json())
        md = [f"# Budget tuning: {result.defense} on {result.dataset}", "", *[f"- {v}" for v in _verdict(result)],
              "", tables.markdown_table(*table_rows(result)), "",
              f"Rule: {result.rule}. Real-traffic L1 is measured on {result.n_nonmembers} non-members; "
              f"TPR cells: tpr @realized-FPR/negatives. Attacks: {', '.join(result.attacks)}, thresholds and "
              f"attack models fitted on {result.shadows.n} shadow models.", "", "![privacy against utility](tune.png)", ""]
        (tmp / "tune.md").write_text("\n".join(md))
        fig = tradeoff_figure(points, result.floor.auc.value, result.undefended.best_auc, result.floor.auc.ci95,
                              marked="chosen")
        fig.savefig(tmp / "tune.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)


def _write_setting(args, defense, chosen: SweepPoint, result: Tuning, secret: bytes) -> Path:
    """Put the chosen budget into the --write-to defense directory: defense.json's config is
    rewritten (atomically) when the directory exists (its state files, hashes and fingerprint are
    unchanged, as the budget lives in the config only), else the swept defense is saved there.
    Either way the directory must load with `secret` and the setting must change answers
    (`purifier.defenses.no_op`; ConfigError otherwise)."""
    from purifier.artifacts import write_json
    from purifier.defenses import load_defense, read_defense_manifest

    path = Path(args.write_to)
    tuned = defense.with_budget(chosen.setting)  # checked by the defense's own rules
    knob = type(defense).knob
    assert knob is not None  # a tunable defense
    param = knob.param
    note = {"param": param, "value": chosen.setting, "floor": result.floor.to_json(), "best_auc": chosen.best_auc,
            "real_traffic_l1_mean": chosen.real_traffic_l1, "report": str(Path(args.out).resolve() / "tune.json")}
    if not path.exists():
        tuned.save(path, extra={"tuned": note})
        return path
    manifest = read_defense_manifest(path)
    load_defense(path, secret, config={param: tuned.config()[param]})  # with this secret, and changing answers
    write_json(path / "defense.json", {**manifest, "config": {**manifest["config"], param: tuned.config()[param]},
                                       "tuned": note})
    return path
