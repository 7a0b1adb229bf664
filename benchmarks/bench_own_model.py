"""Worked example (b) at full strength, timed step by step: a user's overfit scikit-learn
RandomForest on a seeded tabular problem Purifier does not ship, served by MLServer; both
defenses fitted from the endpoint, served by the sidecar in front of MLServer, and audited
(undefended = MLServer itself, then each sidecar) with every default attack, 4 random_forest
shadows, through the CLI as separate processes, as a user runs them.

    python benchmarks/bench_own_model.py [--shadows 4] [--out build/bench-own-model]

Writes benchmarks/results/own_model.json: the time of each step and the audit table.
The test version (smaller settings) is tests/integration/test_own_model.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_sidecar import free_port, process, sidecar_cmd, sidecar_port, wait_ready  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

N_FEATURES, N_CLASSES, MODEL = 20, 4, "tabular-rf"
DEFENSES = ("memguard", "purifier")


def user_side(d: Path) -> None:
    """The user's own data and model: record files, a joblib RandomForest, MLServer settings."""
    import joblib
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    from purifier.data.records import save_records

    X, y = make_classification(n_samples=3000, n_features=N_FEATURES, n_informative=10, n_redundant=4,
                               n_classes=N_CLASSES, flip_y=0.05, random_state=11)
    X = X.astype(np.float32)
    for role, (a, b) in {"train": (0, 600), "reference": (600, 1000), "nonmembers": (1000, 1400),
                         "pool": (1400, 3000), "members": (0, 400)}.items():
        save_records(d / f"{role}.npz", X[a:b], y[a:b])
    model_dir = d / "models" / MODEL
    model_dir.mkdir(parents=True)
    joblib.dump(RandomForestClassifier(n_estimators=100, random_state=0).fit(X[:600], y[:600]),
                model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, N_FEATURES]}],
        "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, N_CLASSES]}],
        "parameters": {"uri": "./model.joblib", "extra": {"predict_fn": "predict_proba"}}}))
    (d / "secret.txt").write_text(os.urandom(24).hex())


def cli(*args: str, log: Path) -> float:
    """Run `purifier ARGS` as a process; its wall time in seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "purifier.cli", *args], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"purifier {args[0]} failed (exit {rc}): {log.read_text()[-1500:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shadows", type=int, default=4)
    parser.add_argument("--out", default="build/bench-own-model")
    args = parser.parse_args(argv)
    d = Path(args.out)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    user_side(d)
    timing["user_side_data_and_model"] = time.perf_counter() - t0
    port = free_port()
    (d / "models" / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": free_port(), "grpc_port": port, "metrics_port": free_port(),
        "parallel_workers": 0}))
    upstream = f"127.0.0.1:{port}"
    records = ["--members", str(d / "members.npz"), "--nonmembers", str(d / "nonmembers.npz"),
               "--attacker-pool", str(d / "pool.npz")]
    audit = ["--shadow-model", "random_forest", "--target-family", "random_forest", "--train-size", "600",
             "--shadows", str(args.shadows), "--quiet"]
    secret = ["--secret-file", str(d / "secret.txt")]
    from purifier.audit.results import Report

    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        stack.enter_context(process([str(Path(sys.executable).with_name("mlserver")), "start", str(d / "models")],
                                    ready_line=False))
        wait_ready(port, MODEL)
        timing["serve_mlserver_ready"] = time.perf_counter() - t0
        for name in DEFENSES:
            timing[f"fit_{name}_from_endpoint"] = cli(
                "fit-defense", name, "--endpoint", upstream, "--model-name", MODEL, "--members", str(d / "train.npz"),
                "--reference", str(d / "reference.npz"), *secret, "--out", str(d / name), log=d / f"fit-{name}.log")
        endpoints = {"none": upstream}
        for name in DEFENSES:
            t0 = time.perf_counter()
            cmd = sidecar_cmd(["--upstream", upstream, "--model-name", MODEL, "--confidence-output", "predict_proba"],
                              (name, str(d / name)), d / "secret.txt")
            _, line = stack.enter_context(process(cmd))
            endpoints[name] = f"127.0.0.1:{sidecar_port(line)}"
            wait_ready(sidecar_port(line), MODEL)
            timing[f"serve_sidecar_{name}_ready"] = time.perf_counter() - t0
        reports = {}
        for name, endpoint in endpoints.items():
            extra = [] if name == "none" else ["--baseline", upstream, "--defense-name", name]
            timing[f"audit_{name}"] = cli("audit", "--endpoint", endpoint, "--model-name", MODEL, *records, *audit,
                                          *extra, "--out", str(d / "reports" / name), log=d / f"audit-{name}.log")
            reports[name] = Report.read(d / "reports" / name)

    from purifier.demo import comparison_rows

    columns, rows = comparison_rows(reports, None)
    load = os.getloadavg()
    timing = {k: round(v, 1) for k, v in timing.items()}
    steps = [[k, v] for k, v in timing.items()]
    a = reports["memguard"].assumptions
    payload = {
        "settings": {"shadows": args.shadows, "recipe": "random_forest",
                     "records": {"evaluation_members": a.evaluation_members,
                                 "evaluation_nonmembers": a.evaluation_nonmembers,
                                 "attacker_pool": a.attacker_pool, "target_training_set": a.target_training_set}},
        "timing_s": timing, "load_average_1_5_15": [round(x, 2) for x in load],
        "reports": {n: {k: v for k, v in r.to_json().items()
                        if k in ("attacks", "gap_floor", "utility", "assumptions", "timing")}
                    for n, r in reports.items()},
        "tables": [
            {"title": "Your own model, worked example (b): a scikit-learn RandomForest behind MLServer, undefended vs "
                      "MemGuard vs PURIFIER through the sidecar",
             "columns": columns, "rows": rows,
             "note": f"400 evaluation members + 400 non-members, attacker pool 1,600, {args.shadows} random_forest "
                     "shadow models (the target's family) trained on 600 rows each; every default attack; "
                     "defenses fitted from the MLServer endpoint. TPR at 0.1% FPR is not measurable with 400 "
                     "non-members (see each report's assumptions)."},
            {"title": "Your own model, worked example (b): time of each step (CLI processes, seconds)",
             "columns": ["step", "seconds"], "rows": steps,
             "note": f"One run on a shared 2-core machine; 1/5/15-minute load average at the end "
                     f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}: timings move with the load."},
        ],
    }
    path = write_result("own_model", payload)
    print(json.dumps(timing, indent=1))
    from purifier.tables import text_table

    print(text_table(columns, rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
