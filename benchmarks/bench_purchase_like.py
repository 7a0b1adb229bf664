"""The leaky benchmark target `purchase_like`: what its difficulty knob does and what a model costs.

For each `separation` (the knob of `purifier.data.datasets.purchase_like`): generate the data,
draw the default splits, train the `purchase_like` recipe (RECIPES: architecture, epochs) on the
`train` role single-threaded, and record member / non-member accuracy, the gap floor
0.5 + (acc_members - acc_nonmembers) / 2 and the training time (wall and process CPU). A shadow
model trains with the same recipe on as many records, so the default setting's time is also
the cost of one shadow; the JSON projects 64 shadows on 2 cores from it (stated as a projection).

    .venv/bin/python benchmarks/bench_purchase_like.py [--separations 0.55 0.7 0.8 0.85 1.0]

Writes benchmarks/results/purchase_like.json (with the load average before and after: timings
on a shared machine are noisy; CPU seconds are the steadier figure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from purifier.data import make_splits  # noqa: E402
from purifier.data.datasets import purchase_like  # noqa: E402
from purifier.models.target import RECIPES  # noqa: E402
from purifier.models.training import TrainConfig, predict_proba, train_classifier  # noqa: E402

DEFAULT_SEPARATION = 0.8


def measure(separation: float, seed: int) -> dict:
    t0 = time.perf_counter()
    data = purchase_like(separation=separation, seed=seed)
    generate_s = time.perf_counter() - t0
    splits = make_splits(data, seed)
    arch, epochs = RECIPES["purchase_like"]
    X_train, y_train = splits.take(data, "train")
    w0, c0 = time.perf_counter(), time.process_time()
    model = train_classifier(X_train, y_train, data.n_classes, TrainConfig(arch=arch, epochs=epochs), seed,
                             progress=False)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    accuracy = {}
    for role in ("train", "eval_nonmembers"):
        X, y = splits.take(data, role)
        accuracy[role] = float((predict_proba(model, X).argmax(axis=1) == y).mean())
    return {"separation": separation, "generate_s": round(generate_s, 2), "train_wall_s": round(wall, 2),
            "train_cpu_s": round(cpu, 2), "member_accuracy": accuracy["train"],
            "nonmember_accuracy": accuracy["eval_nonmembers"],
            "gap_floor": 0.5 + (accuracy["train"] - accuracy["eval_nonmembers"]) / 2,
            "sizes": {r: splits.size(r) for r in ("train", "reference", "eval_members", "eval_nonmembers",
                                                  "attacker")}}


def tables(rows: list[dict], load_before, load_after) -> list[dict]:
    """The results table: one row per separation, from the measured rows."""
    return [{"title": "purchase_like: the difficulty knob (MLP recipe, 5,000 training records, one thread)",
             "columns": ["separation", "member accuracy", "non-member accuracy", "gap floor",
                         "train wall s", "train CPU s"],
             "rows": [[r["separation"], r["member_accuracy"], r["nonmember_accuracy"], r["gap_floor"],
                       r["train_wall_s"], r["train_cpu_s"]] for r in rows],
             "note": f"Load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, after "
                     f"{tuple(round(v, 2) for v in load_after)}: wall times on a shared machine are noisy, CPU "
                     "seconds are the steadier figure. Non-member accuracy of published targets: 65-85% "
                     "(Purchase100, Texas100, CIFAR-10)."}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--separations", type=float, nargs="+", default=[0.55, 0.7, DEFAULT_SEPARATION, 0.85, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    load_before = os.getloadavg()
    rows = []
    for s in args.separations:
        rows.append(measure(s, args.seed))
        print(rows[-1], flush=True)
    default = next((r for r in rows if r["separation"] == DEFAULT_SEPARATION), None)
    projection = None
    if default is not None:
        per_model = default["train_cpu_s"]
        projection = {"per_shadow_cpu_s": per_model, "shadows": 64, "cores": 2,
                      "projected_wall_s": round(64 * per_model / 2, 1),
                      "note": "projection from the measured CPU time of one model, two single-threaded "
                              "models at a time; prediction and attack time not included"}
    load_after = os.getloadavg()
    path = write_result("purchase_like", {
        "recipe": {"architecture": RECIPES["purchase_like"][0], "epochs": RECIPES["purchase_like"][1],
                   "threads": 1},
        "default_separation": DEFAULT_SEPARATION, "rows": rows, "shadows_64_projection": projection,
        "load_average_before": load_before, "load_average_after": load_after,
        "tables": tables(rows, load_before, load_after),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
