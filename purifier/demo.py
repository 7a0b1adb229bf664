"""`purifier demo`: the end-to-end quickstart on an embedded default.

Trains (or reuses) a target, fits MemGuard and PURIFIER, starts one `purifier serve` process per
defense on a free loopback port (embedded ONNX backend), audits each through gRPC exactly as an
outside attacker would (the harness's `RemoteTarget`, i.e. tritonclient), and prints one
comparison table next to the label-only floor, then each endpoint's verdict lines. Writes
`DIR/reports/<defense>/report.{html,md,json}` and `roc.png` (report.html: the defended endpoint
against the undefended one, with MemGuard's budget sweep (`purifier.audit.sweep`, over its own
`Defense.knob` grid) in its privacy-utility picture) and `DIR/demo.json` (with the time of each step).
Every process it starts is stopped, whatever happens.

The sidecars run as subprocesses (not imported): the library never imports `purifier_server`,
and a subprocess is what a deployment runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from purifier.errors import ConfigError, PurifierError

DEFENSES = ("none", "memguard", "purifier")
DEMO_DATASETS = ("digits", "mnist5k", "purchase_like")
VERSION_KEYS = ("purifier", "torch", "onnxruntime", "numpy")
CLIENT_TIMEOUT_S = 300.0  # per batch of up to 4096 audited rows; generous, for small shared machines


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _versions_match(recorded: dict) -> bool:
    from purifier.artifacts import library_versions

    now = library_versions()
    return all(recorded.get(k) == now.get(k) for k in VERSION_KEYS)


def prepare_target(out: Path, dataset: str, seed: int):
    """Reuse `out/target` when it was built with this dataset, seed and library versions."""
    from purifier.models.target import Target, train_target

    directory = out / "target"
    with contextlib.suppress(PurifierError):
        target = Target.load(directory)
        m = target.manifest
        if m["dataset"] == dataset and m.get("split_seed") == seed and _versions_match(m.get("versions", {})):
            _log(f"reusing target {directory}")
            return target
    _log(f"training the {dataset} target")
    return train_target(dataset, directory, seed=seed)


def prepare_secret(out: Path) -> Path:
    """A PRF secret for this demo directory, created once (mode 0600) and reused."""
    path = out / "secret.txt"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
    return path


def prepare_defense(name: str, target, out: Path, secret: bytes, seed: int) -> Path:
    """Fit (or reuse) a defense for `target` under `out/defenses/<name>`."""
    from purifier.defenses import FitData, defense_class, read_defense_manifest

    directory = out / "defenses" / name
    seeded: dict[str, Any] = {"seed": seed}  # the demo's defenses (memguard, purifier) train with a seed
    wanted = json.loads(json.dumps(defense_class(name)(**seeded).config()))
    with contextlib.suppress(PurifierError):
        manifest = read_defense_manifest(directory)
        if (manifest["defense"] == name and manifest["model_id"] == target.model_id
                and manifest["config"] == wanted and _versions_match(manifest.get("versions", {}))):
            _log(f"reusing {name} defense {directory}")
            return directory
    _log(f"fitting {name}")
    t0 = time.perf_counter()
    defense = defense_class(name)(**seeded, secret=secret).fit(FitData.from_target(target))
    defense.save(directory)
    _log(f"fitted {name} in {time.perf_counter() - t0:.1f}s")
    return directory


def start_sidecar(target_dir: Path, defense: str, defense_dir: Path | None, secret_file: Path,
                  log_path: Path):
    """`purifier serve` for one defense on a loopback port it picks itself (`purifier.serve_process`)."""
    from purifier.serve_process import ServeProcess

    args = ["--model", str(target_dir), "--defense", defense, "--secret-file", str(secret_file)]
    if defense_dir is not None:
        args += ["--defense-dir", str(defense_dir)]
    return ServeProcess(args, log_path=log_path)


def request_latency_ms(endpoint: str, model_name: str, X: np.ndarray, n: int = 200) -> dict:
    """Client-observed latency of single-row requests (tritonclient, raw FP32): `latency_summary`'s
    calls, mean, p50 and p99 in ms."""
    import tritonclient.grpc as grpcclient

    from purifier.bench.measure import latency_summary

    client = grpcclient.InferenceServerClient(endpoint)
    try:
        times = []
        for i in range(n + 20):
            inp = grpcclient.InferInput("input", [1, X.shape[1]], "FP32")
            inp.set_data_from_numpy(np.ascontiguousarray(X[i % len(X)][None], np.float32))
            t0 = time.perf_counter()
            client.infer(model_name, [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")])
            if i >= 20:  # warm-up
                times.append(time.perf_counter() - t0)
    finally:
        client.close()
    return latency_summary(times)


def memguard_sweep(target, defense_dir: Path, secret: bytes, undefended, seed: int):
    """MemGuard at every setting of its own grid (`Defense.knob`), audited in process with the
    sweep's confidence attacks, beside the undefended audit (its floor, shadows and fitted attacks
    are reused): `purifier.audit.sweep.Sweep`."""
    from purifier.audit.data import AuditData
    from purifier.audit.runner import AuditConfig
    from purifier.audit.sweep import CONFIDENCE_ATTACKS, sweep_points
    from purifier.defenses import load_defense
    from purifier.models.access import InProcessTarget

    defense = load_defense(defense_dir, secret=secret, model_id=target.model_id)
    knob = defense.knob
    assert knob is not None  # memguard has a budget
    grid = knob.weakest_first(knob.grid)
    variants = [(defense.name, value, defense.with_budget(value)) for value in grid]
    config = AuditConfig(CONFIDENCE_ATTACKS, n_boot=20, seed=seed, progress=False)
    return sweep_points(AuditData.from_target(target), InProcessTarget(target), variants, config,
                        undefended=undefended)


def tradeoff_points(sweep, served: dict) -> tuple:
    """`TradeoffPoint`s for report.html: the MemGuard budget sweep, and each served defense's
    audited endpoint (real-traffic L1, best non-label attack AUC), marked served."""
    from purifier.audit.figures import TradeoffPoint

    points = [TradeoffPoint(p.defense, p.label, p.real_traffic_l1, p.best_auc) for p in sweep.points]
    for name, report in served.items():
        points.append(TradeoffPoint(name, "served", report.utility.cost.l1_nonmembers.mean,
                                    report.strongest(label_only=False).auc.value, served=True))
    return tuple(points)


def _tpr(t) -> str:
    return f"n/m ({t.negatives})" if not t.measurable else f"{t.tpr:.3f} @{t.fpr:.4f}/{t.negatives}"


def _best_tpr(b) -> str:
    return f"n/m ({b.tpr.negatives})" if not b.measurable else f"{b.value:.3f} @{b.tpr.fpr:.4f}/{b.tpr.negatives}"


def comparison_rows(reports: dict, latency: dict[str, dict] | None) -> tuple[list[str], list[list[str]]]:
    """One row per attack, the label-only floor and utility (and latency, if measured), one column
    per defense (`Report`s). Attack cells: AUC / TPR at 1% FPR / TPR at 0.1% FPR, each TPR with its
    realized FPR and the number of non-members (Carlini et al. 2022); n/m: not measurable."""
    def cell(a):
        r = a.ranking
        flipped = f" (inv. {a.flipped.auc:.3f})" if a.flipped is not None else ""
        return f"{r.auc:.3f}{flipped} / {_tpr(r.tpr_1pct)} / {_tpr(r.tpr_01pct)}"

    columns = ["attack: AUC / TPR@1%FPR / TPR@0.1%FPR", *reports]
    names = list(dict.fromkeys(n for r in reports.values() for n in r.attacks))
    rows = [[name, *(cell(r.attacks[name]) if name in r.attacks else "-" for r in reports.values())]
            for name in names]
    floors = [r.label_only_floor for r in reports.values()]
    rows.append(["label-only floor (best label-only per metric)",
                 *(f"{f.auc.value:.3f} / {_best_tpr(f.tpr_1pct)} / {_best_tpr(f.tpr_01pct)}" for f in floors)])
    rows.append(["floor set by", *(" / ".join(dict.fromkeys((f.auc.attack, f.tpr_1pct.attack, f.tpr_01pct.attack)))
                                   for f in floors)])
    acc = [r.utility for r in reports.values()]
    rows.append(["accuracy members / non-members", *(f"{u.member_accuracy:.3f} / {u.nonmember_accuracy:.3f}"
                                                      for u in acc)])
    # the undefended endpoint is its own baseline (no agreement measured): 1 by definition
    rows.append(["argmax agreement", *(f"{1.0 if u.cost is None else u.cost.argmax_agreement:.4f}" for u in acc)])
    rows.append(["real-traffic L1 mean / p95 (non-members)",
                 *("0 / 0" if u.cost is None else f"{u.cost.l1_nonmembers.mean:.4f} / {u.cost.l1_nonmembers.p95:.4f}"
                   for u in acc)])
    if latency is not None:
        rows.append(["latency p50 ms (1 row)", *(f"{latency[d]['p50_ms']:.2f}" for d in reports)])
        base = latency["none"]["p50_ms"]
        rows.append(["added p50 ms vs none", *(f"{latency[d]['p50_ms'] - base:+.2f}" for d in reports)])
    return columns, rows


def run_demo(out: str | Path, dataset: str = "digits", seed: int = 0, shadows: int | None = None,
             shadow_settings: dict | None = None) -> dict:
    """The whole demo; `shadow_settings` are AuditConfig's executor/cache fields (default: local
    processes, the default cache)."""
    from dataclasses import replace

    from purifier.artifacts import check_output_dir, write_json
    from purifier.attacks import ADAPTIVE, DEFAULT_ATTACKS
    from purifier.audit.report import write_report
    from purifier.audit.results import Source
    from purifier.audit.runner import AuditConfig, run_audit
    from purifier.defenses.keyed import load_secret
    from purifier.models.access import RemoteTarget
    from purifier.tables import text_table

    if dataset not in DEMO_DATASETS:
        raise ConfigError(f"dataset: the demo runs on {' or '.join(DEMO_DATASETS)}, not {dataset!r}")
    out = check_output_dir(out)
    out.mkdir(exist_ok=True)
    for sub in ("logs", "defenses", "reports"):
        (out / sub).mkdir(exist_ok=True)
    steps: dict[str, float] = {}  # seconds per step, in demo.json and the closing line

    def timed(step: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        steps[step] = round(time.perf_counter() - t0, 1)
        return result

    t_start, load_start = time.perf_counter(), os.getloadavg()
    target = timed("target", prepare_target, out, dataset, seed)
    secret_file = prepare_secret(out)
    secret = load_secret(file=str(secret_file))
    defense_dirs = {name: timed(f"fit {name}", prepare_defense, name, target, out, secret, seed)
                    for name in DEFENSES if name != "none"}
    t_prepared = time.perf_counter()

    model_name = target.directory.name
    X_eval, _ = target.role("eval_nonmembers")
    audits: dict[str, Any] = {}
    latency: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        _log("starting one sidecar per defense on loopback")
        sidecars = {name: stack.enter_context(start_sidecar(target.directory, name, defense_dirs.get(name),
                                                            secret_file, out / "logs" / f"sidecar-{name}.log"))
                    for name in DEFENSES}
        for name in DEFENSES:  # "none" first: the "before" of the others (same shadows and attack models)
            _log(f"auditing the {name} sidecar at {sidecars[name].endpoint}")
            with contextlib.closing(RemoteTarget(sidecars[name].endpoint, model_name, n_classes=target.n_classes,
                                                 timeout_s=CLIENT_TIMEOUT_S)) as access:
                settings: dict[str, Any] = {"n_shadows": shadows} if shadows else {}
                config = AuditConfig(DEFAULT_ATTACKS, **settings, seed=seed, **(shadow_settings or {}))
                if name == "none":
                    config = replace(config, attacks=tuple(a for a in DEFAULT_ATTACKS if a not in ADAPTIVE))
                source = Source(sidecars[name].endpoint, model_name, access.output_name,
                                baseline_endpoint=None if name == "none" else sidecars["none"].endpoint)
                audit = timed(f"audit {name}", run_audit, target, access, config, name, source=source,
                              before=audits.get("none"))
            audits[name] = audit
            # written at once, so a long run that stops later still leaves its finished reports
            write_report(audit, out / "reports" / name)
            latency[name] = request_latency_ms(sidecars[name].endpoint, model_name, X_eval)
    t_audited = time.perf_counter()

    _log("MemGuard privacy-utility sweep over its budget (in-process, same shadow models)")
    sweep = timed("memguard sweep", memguard_sweep, target, defense_dirs["memguard"], secret, audits["none"],
                  seed)
    reports = {name: a.report for name, a in audits.items()}
    points = tradeoff_points(sweep, {n: r for n, r in reports.items() if n != "none"})
    for name, audit in audits.items():  # the defended pages again, now with the sweep's picture
        if name != "none":
            write_report(audit, out / "reports" / name, tradeoff=points)
    columns, rows = comparison_rows(reports, latency)
    summary = {
        "dataset": dataset, "seed": seed, "model_id": target.model_id,
        "table": {"columns": columns, "rows": rows},
        "verdicts": {name: list(r.verdict.lines) for name, r in reports.items()},
        "latency": latency, "memguard_sweep": [p.to_json() for p in sweep.points],
        "shadows": {k: v for k, v in reports[DEFENSES[0]].shadows.to_json().items()
                    if k in ("n", "executor", "from_cache", "trained", "cache")},
        "timing_s": {"prepare": round(t_prepared - t_start, 1), "audits": round(t_audited - t_prepared, 1),
                     "total": round(time.perf_counter() - t_start, 1), "steps": steps,
                     "attacks": {name: {a: e.seconds for a, e in r.attacks.items()} for name, r in reports.items()},
                     "shadow_training": {name: r.timing.shadow_training for name, r in reports.items()}},
        # timings on a shared machine mean little without the load they ran under
        "load_average": {"start": [round(v, 2) for v in load_start], "end": [round(v, 2) for v in os.getloadavg()]},
        "reports": {name: str(out / "reports" / name / "report.html") for name in reports},
    }
    write_json(out / "demo.json", summary)
    print(f"\nPurifier demo on {dataset}: undefended vs MemGuard vs PURIFIER, audited through gRPC\n")
    print(text_table(columns, rows))
    print(f"\nMemGuard budget sweep (best confidence attack AUC / real-traffic L1; label-only floor AUC "
          f"{sweep.floor.auc.value:.3f} by {sweep.floor.auc.attack}): "
          + ", ".join(f"{p.label}: {p.best_auc:.3f}/{p.real_traffic_l1:.3f}" for p in sweep.points))
    for name in DEFENSES:
        print(f"\nVerdict, {name}:")
        for line in reports[name].verdict.lines:
            print(f"  - {line}")
    print(f"\nopen in a browser: {out}/reports/memguard/report.html, {out}/reports/purifier/report.html "
          f"(also report.md, report.json, roc.png per defense under {out}/reports/)")
    print(f"time: {summary['timing_s']['total']:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in steps.items()) + ")")
    return summary


def demo_cli(args) -> int:
    from purifier.audit.command import executor_settings, shadow_count

    run_demo(args.out, dataset=args.dataset, seed=args.seed, shadows=shadow_count(args),
             shadow_settings=executor_settings(args))
    return 0


__all__ = ["run_demo", "demo_cli"]
