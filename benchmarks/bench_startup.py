"""Sidecar start-up and memory: the full install against the slim serving install, per defense.

For each install (the full one: this interpreter's environment, torch and all; the slim one:
`.venv-slim`, built by `make slim-venv` exactly as the Dockerfile builds the image) and each
defense (none, MemGuard fast, PURIFIER; embedded ONNX backend, 10-class digits target), a real
`purifier serve` process is started (`purifier.serve_process`) and measured:

* ready: seconds from process start to the JSON ready line on stdout;
* RSS after warm-up: resident memory (/proc/PID/status) after `--warmup` single-row requests;
* loaded: whether torch, scikit-learn or matplotlib are loaded in the serving process (their
  compiled extension modules in /proc/PID/maps after warm-up).

Cells run in interleaved rounds (`--repeats`), medians reported; the site-packages size of both
installs is measured too. `--before-source DIR` adds a third install, "before": the full
interpreter running an older checkout of the sources (PYTHONPATH=DIR), e.g. the commit before the
serving path dropped torch. Writes benchmarks/results/startup.json.

    make slim-venv && python benchmarks/bench_startup.py [--target DIR --defense-dir DIR ...]

Targets (issue 16): slim ready within 1.5 s and RSS <= 150 MB after warm-up with MemGuard loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import rss_bytes, write_result  # noqa: E402

HEAVY = ("torch", "sklearn", "matplotlib")


def site_packages_bytes(python: Path) -> tuple[str, int]:
    """(site-packages path, apparent size in bytes of every file under it) of an interpreter's environment."""
    import subprocess

    path = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return path, total


def measure(python: Path, source: str | None, serve_args: list[str], x: np.ndarray, model: str,
            warmup: int) -> dict:
    import tritonclient.grpc as grpcclient

    from purifier.serve_process import ServeProcess, clean_env

    env = clean_env()
    if source:  # `python -m` puts the working directory first on sys.path: run from the old checkout
        env["PYTHONPATH"] = source
    # the REST front is on (port 0) as in a real start, except for an older checkout that lacks it
    with ServeProcess(serve_args, python=python, env=env, cwd=source, rest=source is None) as sidecar:
        rss_ready = rss_bytes(sidecar.pid)
        client = grpcclient.InferenceServerClient(sidecar.endpoint)
        try:
            for i in range(warmup):
                inp = grpcclient.InferInput("input", [1, x.shape[1]], "FP32")
                inp.set_data_from_numpy(x[i % len(x)][None])
                client.infer(model, [inp])
        finally:
            client.close()
        rss_warm = rss_bytes(sidecar.pid)
        with open(f"/proc/{sidecar.pid}/maps") as f:
            maps = f.read()
    heavy = [name for name in HEAVY if f"/site-packages/{name}/" in maps]
    return {"ready_s": sidecar.ready_s, "rss_ready_mb": rss_ready / 2**20, "rss_after_warmup_mb": rss_warm / 2**20,
            "heavy_packages_imported": heavy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="target directory (default: the digits target under build/bench-startup)")
    parser.add_argument("--defense-dir", action="append", default=[], help="fitted defense directory (repeatable)")
    parser.add_argument("--secret-file", help="PRF secret of the defenses")
    parser.add_argument("--full-python", default=sys.executable, help="interpreter of the full install")
    parser.add_argument("--slim-python", default=str(ROOT / ".venv-slim" / "bin" / "python"),
                        help="interpreter of the slim install (make slim-venv)")
    parser.add_argument("--before-source", help="an older checkout's directory, served by the full interpreter")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per cell (default 3)")
    parser.add_argument("--warmup", type=int, default=200, help="single-row requests before RSS (default 200)")
    args = parser.parse_args()

    installs = {"full": Path(args.full_python), "slim": Path(args.slim_python)}
    sources = {"full": None, "slim": None}
    if args.before_source:
        installs["before"], sources["before"] = Path(args.full_python), str(Path(args.before_source).resolve())
    if not installs["slim"].exists():
        raise SystemExit(f"{installs['slim']} does not exist: run `make slim-venv` first")
    from purifier.defenses.keyed import load_secret
    from purifier.demo import prepare_defense, prepare_secret, prepare_target
    from purifier.models.target import Target

    if args.target and args.defense_dir and args.secret_file:
        target, secret_file = Target.load(args.target), Path(args.secret_file)
        dirs = {json.loads((Path(d) / "defense.json").read_text())["defense"]: Path(d) for d in args.defense_dir}
    else:  # prepare (or reuse) the digits target and both defenses
        work = ROOT / "build" / "bench-startup"
        (work / "defenses").mkdir(parents=True, exist_ok=True)
        target, secret_file = prepare_target(work, "digits", 0), prepare_secret(work)
        secret = load_secret(file=str(secret_file))
        dirs = {d: prepare_defense(d, target, work, secret, 0) for d in ("memguard", "purifier")}
    x = np.ascontiguousarray(target.role("eval_nonmembers")[0][:64], np.float32)
    cells = {(inst, d): [] for inst in installs for d in ("none", *dirs)}
    load_start = os.getloadavg()
    for r in range(args.repeats):
        for (inst, defense), runs in cells.items():
            serve_args = ["--model", str(target.directory), "--defense", defense, "--secret-file", str(secret_file),
                          "--log-level", "warning"]
            if defense != "none":
                serve_args += ["--defense-dir", str(dirs[defense])]
            runs.append(measure(installs[inst], sources[inst], serve_args, x, target.directory.name, args.warmup))
            m = runs[-1]
            print(f"round {r + 1} {inst:4s} {defense:9s} ready {m['ready_s']:.3f} s  RSS after warm-up "
                  f"{m['rss_after_warmup_mb']:.1f} MB  heavy imports {m['heavy_packages_imported']}", flush=True)
    load_end = os.getloadavg()
    results = {}
    for (inst, defense), runs in cells.items():
        results[f"{inst}/{defense}"] = {
            "ready_s_median": statistics.median(m["ready_s"] for m in runs),
            "rss_after_warmup_mb_median": statistics.median(m["rss_after_warmup_mb"] for m in runs),
            "rss_ready_mb_median": statistics.median(m["rss_ready_mb"] for m in runs),
            "heavy_packages_imported": sorted({p for m in runs for p in m["heavy_packages_imported"]}),
            "runs": runs}
    sizes = {inst: dict(zip(("path", "bytes"), site_packages_bytes(installs[inst]), strict=True))
             for inst in ("full", "slim")}
    rows = [[key, r["ready_s_median"], r["rss_ready_mb_median"], r["rss_after_warmup_mb_median"],
             ", ".join(r["heavy_packages_imported"]) or "none"] for key, r in results.items()]
    path = write_result("startup", {
        "config": {"target": str(target.directory), "repeats": args.repeats, "warmup_requests": args.warmup,
                   "installs": {k: str(v) for k, v in installs.items()}, "before_source": args.before_source,
                   "backend": "embedded onnxruntime"},
        "load_average_1_5_15min": {"start": list(load_start), "end": list(load_end)},
        "site_packages": sizes, "results": results,
        "tables": [
            {"title": "Sidecar start-up and memory: full install vs slim serving install (digits, 10 classes)",
             "columns": ["install/defense", "ready s (median)", "RSS at ready MB", "RSS after warm-up MB",
                         "torch/sklearn/matplotlib imported"],
             "rows": rows,
             "note": f"{args.repeats} interleaved rounds of `purifier serve --model DIR` (embedded), ready = process "
                     f"start to the ready line; {args.warmup} single-row requests of warm-up. "
                     f"site-packages: full {sizes['full']['bytes'] / 2**20:.0f} MiB, slim "
                     f"{sizes['slim']['bytes'] / 2**20:.0f} MiB. Load average (1, 5, 15 min) start "
                     f"{tuple(round(v, 2) for v in load_start)}, end {tuple(round(v, 2) for v in load_end)}. "
                     "Targets: slim ready <= 1.5 s and RSS <= 150 MB after warm-up with MemGuard."}],
    })
    for key, r in results.items():
        print(f"{key:16s} ready {r['ready_s_median']:.3f} s  RSS {r['rss_after_warmup_mb_median']:.1f} MB  "
              f"heavy {r['heavy_packages_imported']}")
    for inst, s in sizes.items():
        print(f"site-packages {inst}: {s['bytes'] / 2**20:.1f} MiB ({s['path']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
