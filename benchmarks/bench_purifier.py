"""PURIFIER overhead next to the identity defense, single thread, in one process.

Cases: batch 1, 64, 1024 x 10 and 100 classes; identity, PURIFIER (keyed latent noise),
PURIFIER in latent-mean mode (no PRF: the ONNX graph + repair alone) and PURIFIER + label
swapper (inputs hashed and looked up). Defenses are fitted on synthetic Dirichlet confidences
(timing does not depend on the weights). Overhead = p50(defense) - p50(identity); throughput at
batch 1024 = rows / p50. Writes benchmarks/results/defense_purifier.json.

    .venv/bin/python benchmarks/bench_purifier.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import summarize, time_calls, write_result  # noqa: E402

SECRET = b"benchmark-secret-0123456789abcdef"
N_FEATURES = 64


def fit_data(c: int, seed: int = 0):
    from purifier.defenses.base import FitData

    rng = np.random.default_rng(seed)
    n = 500
    probs = rng.dirichlet(np.ones(c) * 0.2, size=(2, n))
    X = rng.normal(size=(2, n, N_FEATURES)).astype(np.float32)
    y = probs.argmax(2)
    return FitData(probs[0], probs[1], X[0], X[1], y[0], y[1], f"bench-{c}")


def main() -> None:
    import torch

    from purifier.defenses.base import IdentityDefense
    from purifier.defenses.purifier_net import PurifierNet

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short timing windows")
    args = parser.parse_args()
    window = 0.2 if args.quick else 1.0
    load_start = os.getloadavg()[0]
    results = []
    for c in (10, 100):
        data = fit_data(c)
        ident = IdentityDefense()
        ident.n_classes = c
        defenses = {
            "identity": ident,
            "purifier": PurifierNet(epochs=20, secret=SECRET).fit(data),
            "purifier_mean": PurifierNet(epochs=20, noise="mean").fit(data),
            # swap every member so the benchmark exercises the swap path on member rows
            "purifier_swap": PurifierNet(epochs=20, label_swap=True, swap_fraction=1.0,
                                         secret=SECRET).fit(data),
        }
        for batch in (1, 64, 1024):
            rng = np.random.default_rng(batch)
            probs = rng.dirichlet(np.ones(c) * 0.2, size=batch).astype(np.float32)
            probs /= probs.sum(1, keepdims=True)
            # half members (indexed), half unseen rows
            members = data.member_inputs[np.arange(batch // 2) % len(data.member_inputs)]
            inputs = np.r_[members,
                           rng.normal(size=(batch - batch // 2, N_FEATURES)).astype(np.float32)]
            row = {"classes": c, "batch": batch}
            for name, d in defenses.items():
                x = inputs if d.needs_inputs else None
                stats = summarize(time_calls(lambda d=d, x=x, p=probs: d.transform(p, x), min_seconds=window))
                row[name] = stats
            for name in ("purifier", "purifier_mean", "purifier_swap"):
                row[f"{name}_overhead_us"] = 1e3 * (row[name]["p50_ms"] - row["identity"]["p50_ms"])
                row[f"{name}_rows_per_s"] = batch / (row[name]["p50_ms"] / 1e3)
            results.append(row)
            print(f"C={c:3d} batch={batch:5d} identity p50 {1e3 * row['identity']['p50_ms']:8.1f} us | "
                  + " | ".join(f"{n} +{row[f'{n}_overhead_us']:8.1f} us ({row[f'{n}_rows_per_s']:,.0f} rows/s)"
                               for n in ("purifier", "purifier_mean", "purifier_swap")))
    path = write_result("defense_purifier", {
        "threads": 1, "window_s": window,
        # the 2-core machine is shared: record how busy it was, the absolute figures depend on it
        "loadavg_1m_start_end": [load_start, os.getloadavg()[0]],
        "notes": "p50 per transform call; overhead = p50 minus identity's p50 in the same run; "
                 "purifier = keyed latent noise (HMAC per row), purifier_mean = zero-noise mode, "
                 "purifier_swap = keyed noise + member lookup, half of each batch indexed members",
        "cases": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
