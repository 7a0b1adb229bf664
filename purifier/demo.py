"""`purifier demo`: the end-to-end quickstart on an embedded default.

Trains (or reuses) a target, fits MemGuard and PURIFIER, starts one `purifier serve` process per
defense on a free loopback port (embedded ONNX backend), audits each through gRPC exactly as an
outside attacker would (the harness's `RemoteTarget`, i.e. tritonclient), and prints one
comparison table next to the gap floor. Writes `DIR/reports/<defense>/report.{json,md}`, ROC
plots, `DIR/privacy_utility.png` (MemGuard attack accuracy vs epsilon) and `DIR/demo.json`.
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

import numpy as np

from purifier.errors import ConfigError, PurifierError

DEFENSES = ("none", "memguard", "purifier")
DEMO_DATASETS = ("digits", "mnist5k")
EPSILON_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
SWEEP_ATTACKS = ("gap", "confidence", "mentr", "loss", "nn")
TABLE_ATTACKS = ("confidence", "entropy", "mentr", "loss", "nn", "nn_label", "lira_offline", "lira_online",
                 "label_augment", "adaptive_nn", "adaptive_mentr", "repeated_query")
VERSION_KEYS = ("purifier", "torch", "onnxruntime", "numpy")
CLIENT_TIMEOUT_S = 300.0  # per batch of up to 4096 audited rows; generous for a busy 2-core machine


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
    wanted = json.loads(json.dumps(defense_class(name)(seed=seed).config()))
    with contextlib.suppress(PurifierError):
        manifest = read_defense_manifest(directory)
        if (manifest["defense"] == name and manifest["model_id"] == target.model_id
                and manifest["config"] == wanted and _versions_match(manifest.get("versions", {}))):
            _log(f"reusing {name} defense {directory}")
            return directory
    _log(f"fitting {name}")
    t0 = time.perf_counter()
    defense = defense_class(name)(seed=seed, secret=secret).fit(FitData.from_target(target))
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
    """Client-observed latency of single-row requests (tritonclient, raw FP32), p50/p99 in ms."""
    import tritonclient.grpc as grpcclient

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
    t = np.sort(np.array(times)) * 1e3
    return {"p50_ms": float(np.median(t)), "p99_ms": float(t[int(0.99 * (len(t) - 1))]), "requests": n}


def defense_sweep(target, variants, shadows, seed: int, defense_name: str) -> list[dict]:
    """Attack balanced accuracy and distortion for variants of one fitted defense.

    Args:
        variants: [(setting value, Defense)], e.g. MemGuard at several epsilons (Phase I does not
            depend on epsilon, only the Phase II release probability does, so one fitted defense
            serves the whole grid) or PURIFIER at several L1 budgets.
        shadows: the attacker's shadow models from an earlier audit of `target`.
    Attacks run in-process (`SWEEP_ATTACKS`), with thresholds fitted on the shadow models.
    """
    from purifier.audit.access import InProcessTarget
    from purifier.audit.runner import AuditConfig, run_audit

    rows = []
    baseline = InProcessTarget(target)
    for value, defense in variants:
        audit = run_audit(target, InProcessTarget(target, defense),
                          AuditConfig(SWEEP_ATTACKS, n_boot=20, seed=seed, progress=False),
                          defense_name, baseline, shadows=shadows)
        attacks = audit.report["attacks"]
        best = max((n for n in attacks if n != "gap"), key=lambda n: attacks[n]["balanced_accuracy"])
        rows.append({"setting": value, "best_attack": best,
                     "best_balanced_accuracy": attacks[best]["balanced_accuracy"],
                     "balanced_accuracy": {n: attacks[n]["balanced_accuracy"] for n in attacks},
                     "auc": {n: attacks[n]["auc"] for n in attacks},
                     "gap_floor": audit.report["gap_floor"]["balanced_accuracy"],
                     "mean_l1": audit.report["utility"]["mean_l1"],
                     "max_l1": audit.report["utility"]["max_l1"],
                     "argmax_agreement": audit.report["utility"]["argmax_agreement"]})
    return rows


def memguard_variants(defense_dir: Path, target, secret: bytes, epsilons=EPSILON_GRID):
    from purifier.defenses import load_defense

    for eps in epsilons:
        defense = load_defense(defense_dir, secret=secret, model_id=target.model_id)
        defense.epsilon = float(eps)
        yield float(eps), defense


def plot_privacy_utility(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [max(r["setting"], 1e-3) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in rows[0]["balanced_accuracy"]:
        if name != "gap":
            ax.plot(eps, [r["balanced_accuracy"][name] for r in rows], marker="o", label=name)
    ax.plot(eps, [r["gap_floor"] for r in rows], "k--", label="gap floor (label-only)")
    ax.set_xscale("log")
    ax.set_xlabel("MemGuard epsilon (expected L1 budget; 0 plotted at 1e-3)")
    ax.set_ylabel("attack balanced accuracy")
    ax2 = ax.twinx()
    ax2.plot(eps, [r["mean_l1"] for r in rows], color="grey", alpha=0.5, marker="x", label="mean L1")
    ax2.set_ylabel("realized mean L1 distortion")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparison_rows(reports: dict[str, dict], latency: dict[str, dict] | None) -> tuple[list[str], list[list[str]]]:
    """One row per attack and per utility figure (and latency, if measured), one column per defense."""
    def cell(entry):
        tpr = entry["tpr_at_fpr"]["0.01"]
        return f"{entry['auc']:.3f} / {entry['balanced_accuracy']:.3f} / {tpr['tpr']:.3f}"

    # AUC is threshold-free; balanced accuracy uses the attacker's shadow-fitted threshold, which a
    # defense can break without removing the signal: both are shown, next to the floor.
    columns = ["attack: AUC / bal.acc / TPR@1%FPR", *reports]
    rows = []
    for name in TABLE_ATTACKS:
        if any(name in r["attacks"] for r in reports.values()):
            rows.append([name, *(cell(r["attacks"][name]) if name in r["attacks"] else "-" for r in reports.values())])
    rows.append(["gap floor (label-only)", *(f"{r['gap_floor']['auc']:.3f} / {r['gap_floor']['balanced_accuracy']:.3f}"
                                             for r in reports.values())])
    # the undefended endpoint is its own baseline (no agreement measured): 1 by definition
    agreement = [r["utility"].get("argmax_agreement") for r in reports.values()]
    rows.append(["argmax agreement", *(f"{1.0 if a is None else a:.4f}" for a in agreement)])
    rows.append(["mean L1", *(f"{r['utility'].get('mean_l1') or 0.0:.4f}" for r in reports.values())])
    if latency is not None:
        rows.append(["latency p50 ms (1 row)", *(f"{latency[d]['p50_ms']:.2f}" for d in reports)])
        base = latency["none"]["p50_ms"]
        rows.append(["added p50 ms vs none", *(f"{latency[d]['p50_ms'] - base:+.2f}" for d in reports)])
    return columns, rows


def run_demo(out: str | Path, dataset: str = "digits", seed: int = 0, shadows: int = 4) -> dict:
    from purifier.artifacts import check_output_dir, write_json
    from purifier.attacks import DEFAULT_ATTACKS
    from purifier.audit.access import RemoteTarget
    from purifier.audit.report import write_report
    from purifier.audit.runner import AuditConfig, run_audit
    from purifier.defenses.keyed import load_secret
    from purifier.tables import text_table

    if dataset not in DEMO_DATASETS:
        raise ConfigError(f"dataset: the demo runs on {' or '.join(DEMO_DATASETS)}, not {dataset!r}")
    out = check_output_dir(out)
    out.mkdir(exist_ok=True)
    for sub in ("logs", "defenses", "reports"):
        (out / sub).mkdir(exist_ok=True)
    t_start = time.perf_counter()
    target = prepare_target(out, dataset, seed)
    secret_file = prepare_secret(out)
    secret = load_secret(file=str(secret_file))
    defense_dirs = {name: prepare_defense(name, target, out, secret, seed) for name in DEFENSES if name != "none"}
    t_prepared = time.perf_counter()

    model_name = target.directory.name
    X_eval, _ = target.role("eval_nonmembers")
    reports, latency, shadow_set = {}, {}, None
    with contextlib.ExitStack() as stack:
        _log("starting one sidecar per defense on loopback")
        sidecars = {name: stack.enter_context(start_sidecar(target.directory, name, defense_dirs.get(name),
                                                            secret_file, out / "logs" / f"sidecar-{name}.log"))
                    for name in DEFENSES}
        baseline = stack.enter_context(contextlib.closing(
            RemoteTarget(sidecars["none"].endpoint, model_name, n_classes=target.n_classes,
                         timeout_s=CLIENT_TIMEOUT_S)))
        for name in DEFENSES:
            _log(f"auditing the {name} sidecar at {sidecars[name].endpoint}")
            with contextlib.closing(RemoteTarget(sidecars[name].endpoint, model_name, n_classes=target.n_classes,
                                                 timeout_s=CLIENT_TIMEOUT_S)) as access:
                audit = run_audit(target, access, AuditConfig(DEFAULT_ATTACKS, n_shadows=shadows, seed=seed),
                                  name, None if name == "none" else baseline,
                                  {"endpoint": sidecars[name].endpoint, "model_name": model_name}, shadows=shadow_set)
            shadow_set = audit.shadows
            write_report(audit, out / "reports" / name)
            reports[name] = audit.report
            latency[name] = request_latency_ms(sidecars[name].endpoint, model_name, X_eval)
    t_audited = time.perf_counter()

    _log("MemGuard privacy-utility sweep over epsilon (in-process, same shadow models)")
    sweep = defense_sweep(target, memguard_variants(defense_dirs["memguard"], target, secret), shadow_set, seed,
                          "memguard")
    plot_privacy_utility(sweep, out / "privacy_utility.png", f"MemGuard on {dataset}")
    columns, rows = comparison_rows(reports, latency)
    summary = {
        "dataset": dataset, "seed": seed, "model_id": target.model_id,
        "table": {"columns": columns, "rows": rows},
        "latency": latency, "memguard_sweep": sweep,
        "timing_s": {"prepare": round(t_prepared - t_start, 1), "audits": round(t_audited - t_prepared, 1),
                     "total": round(time.perf_counter() - t_start, 1)},
        "reports": {name: str(out / "reports" / name / "report.json") for name in reports},
    }
    write_json(out / "demo.json", summary)
    print(f"\nPurifier demo on {dataset}: undefended vs MemGuard vs PURIFIER, audited through gRPC\n")
    print(text_table(columns, rows))
    print("\nMemGuard epsilon sweep (best confidence attack bal.acc / mean L1): " + ", ".join(
        f"{r['setting']:g}: {r['best_balanced_accuracy']:.3f}/{r['mean_l1']:.3f}" for r in sweep))
    print(f"\nreports: {out}/reports/<defense>/report.{{json,md}}, roc.png; plot: {out}/privacy_utility.png")
    print(f"time: {summary['timing_s']['total']:.0f}s (prepare {summary['timing_s']['prepare']:.0f}s, "
          f"audits {summary['timing_s']['audits']:.0f}s)")
    return summary


def demo_cli(args) -> int:
    run_demo(args.out, dataset=args.dataset, seed=args.seed, shadows=args.shadows)
    return 0


__all__ = ["run_demo", "demo_cli"]
