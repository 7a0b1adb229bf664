"""Render benchmarks/results/*.json into docs/results.md.

Each results file may carry `tables`: [{"title", "columns", "rows", "note"?}]; they are written
to docs/results.md with the machine and date each file was measured on, so the published numbers
are always measured ones.

    python benchmarks/render_results.py --readme README.md          # rewrite docs/results.md and the
                                                                    # README's serving-cost block (`make docs`)
    python benchmarks/render_results.py --readme README.md --check  # exit 1 if either is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from purifier.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
HEADER = """# Results

Every number on this page is rendered from `benchmarks/results/*.json` by `make docs` (which runs
`python benchmarks/render_results.py`); a test fails when the page is stale. `make bench` reruns the
benchmarks (long; on a quiet machine) and then renders this page. Each section names the machine
and the commit it was measured on; the notes under the tables give the load average.
"""
ORDER = ["demo_digits", "demo_purchase_like", "demo_mnist5k", "timing_purchase_like", "privacy_utility_digits",
         "tune_digits", "privacy_utility_purchase_like", "purchase_like", "defense", "sidecar", "sidecar_run1", "sidecar_busy_host", "abuse",
         "perf_analyzer", "load", "audit_digits", "audit_mnist5k", "shadows", "own_model"]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def render_table(table: dict) -> str:
    lines = [f"**{table['title']}**", "",
             markdown_table(table["columns"], [[_cell(v) for v in row] for row in table["rows"]])]
    if table.get("note"):
        lines += ["", table["note"]]
    return "\n".join(lines)


def render(results_dir: Path) -> str:
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        if doc.get("tables"):
            docs.append((path, doc))
    docs.sort(key=lambda pd: (ORDER.index(pd[1]["benchmark"]) if pd[1].get("benchmark") in ORDER else len(ORDER),
                              pd[0].name))
    names = [doc.get("benchmark", path.stem) for path, doc in docs]
    parts = ["Contents: " + " · ".join(f"[{n}](#{n})" for n in names) + "\n"] if names else []
    for path, doc in docs:
        m = doc.get("machine", {})
        parts.append(f"## {doc.get('benchmark', path.stem)}\n\n"
                     f"_Measured {doc.get('created', '?')} on {m.get('cpu_model', '?')} "
                     f"({m.get('affinity') or m.get('cpu_count')} cores), commit {m.get('git_commit', '?')}; "
                     f"source `benchmarks/results/{path.name}`._\n")
        parts += [render_table(t) + "\n" for t in doc["tables"]]
    return "\n".join(parts) if parts else "_No results yet: run `make bench`._\n"


def page(results_dir: Path) -> str:
    return f"{HEADER}\n{render(results_dir)}"


# The README's serving-cost block, between these markers, is rendered from sidecar.json and abuse.json.
README_START, README_END = "<!-- serving-cost: rendered by benchmarks/render_results.py -->", "<!-- /serving-cost -->"
README_CELLS = (("bare model server (no sidecar)", "embedded/direct"), ("identity sidecar", "embedded/sidecar-identity"),
                ("MemGuard", "embedded/sidecar-memguard"), ("PURIFIER", "embedded/sidecar-purifier"),
                ("MemGuard, end of wave 2", "embedded/sidecar-memguard-baseline"))


def _spread(comparison: dict, key: str) -> str:
    """' (lo-hi)': the ratio's range over the interleaved rounds, when the results carry it."""
    rounds = [r for r in comparison.get(f"{key}_by_round") or [] if r is not None]
    low, high = (f"{min(rounds):.2f}", f"{max(rounds):.2f}") if rounds else ("", "")
    return f" ({low}-{high})" if len(rounds) > 1 and low != high else ""  # not a cell against itself


# The same benchmark on a busier host of the same kind (`bench_sidecar.py --label busy_host`), shown
# beside the headline run: how far its ratios move with the host.
OTHER_HOST = "sidecar_busy_host"


def other_host_sentence(sidecar: dict, busy: dict) -> str:
    """How the headline ratios came out on the busier host, and how much slower that host was."""
    def cpu(doc: dict, key: str) -> float:
        return doc["cells"][key]["c1"]["server_cpu_ms_per_request"]

    memguard, identity = (busy["comparisons"][f"embedded/sidecar-{d}"] for d in ("memguard", "identity"))
    slower = cpu(busy, "embedded/sidecar-identity") / cpu(sidecar, "embedded/sidecar-identity")
    return (f"On a busier host of the same kind ([{OTHER_HOST}](docs/results.md#{OTHER_HOST}), commit "
            f"{busy.get('machine', {}).get('git_commit', '?')}; the identity sidecar's CPU per request "
            f"{slower:.1f}x this run's), MemGuard cost {memguard['cpu_ratio_vs_identity_c1']:.2f}x"
            f"{_spread(memguard, 'cpu_ratio_vs_identity_c1')} of the identity sidecar's CPU and kept "
            f"{memguard['throughput_vs_identity_c16']:.2f}x{_spread(memguard, 'throughput_vs_identity_c16')} of its "
            f"c16 throughput, and the identity sidecar {identity['throughput_ratio_c16']:.2f}x"
            f"{_spread(identity, 'throughput_ratio_c16')} of the bare server's: the margins above are this host's.")


def readme_block(results_dir: Path) -> str:
    """The serving cost in the README: each defense beside the identity sidecar and the bare model
    server at concurrency 1 and 16, CPU per request, and the fairness figure, from the results."""
    sidecar = json.loads((results_dir / "sidecar.json").read_text())
    cells, cmp = sidecar["cells"], sidecar["comparisons"]
    rows = []
    for label, key in README_CELLS:
        c1, c16, vs = cells[key]["c1"], cells[key]["c16"], cmp.get(key, {})
        ratio = (f"{vs['cpu_ratio_vs_identity_c1']:.2f}x{_spread(vs, 'cpu_ratio_vs_identity_c1')} / "
                 f"{vs['throughput_vs_identity_c16']:.2f}x{_spread(vs, 'throughput_vs_identity_c16')}"
                 if "cpu_ratio_vs_identity_c1" in vs else "-")
        rows.append([label, f"{c1['p50_ms']:.2f}", f"{c1['server_cpu_ms_per_request']:.2f}",
                     f"{c16['throughput_rps']:,.0f}", f"{c16['server_cpu_ms_per_request']:.2f}", ratio])
    table = markdown_table(["one row per request (embedded digits model)", "c1 p50 ms", "c1 server CPU ms",
                            "c16 req/s", "c16 server CPU ms", "vs identity sidecar: c1 CPU / c16 req/s"], rows)
    m = sidecar.get("machine", {})
    lines = [README_START, table, "",
             f"Measured {sidecar.get('created', '?')[:10]} on {m.get('cpu_model', '?')} "
             f"({m.get('affinity') or m.get('cpu_count')} cores shared by client, sidecar and model), commit "
             f"{m.get('git_commit', '?')}; \"end of wave 2\" is commit {sidecar['config'].get('baseline_commit', '?')} "
             "in the same run ([sidecar](docs/results.md#sidecar); a second run: "
             "[sidecar_run1](docs/results.md#sidecar_run1))."]
    identity = cmp.get("embedded/sidecar-identity", {})
    if "throughput_ratio_c16" in identity:
        lines[-1] += (f" The identity sidecar keeps {identity['throughput_ratio_c16']:.2f}x"
                      f"{_spread(identity, 'throughput_ratio_c16')} of the bare server's c16 throughput.")
    if any(f"{k}_by_round" in c for c in cmp.values() for k in ("throughput_ratio_c16", "cpu_ratio_vs_identity_c1")):
        lines[-1] += (f" In brackets: the range of a ratio over the {sidecar['config'].get('interleaved_rounds', '?')} "
                      "interleaved rounds, each round's windows adjacent in time.")
    busy = results_dir / f"{OTHER_HOST}.json"
    if busy.is_file():
        lines[-1] += " " + other_host_sentence(sidecar, json.loads(busy.read_text()))
    abuse = json.loads((results_dir / "abuse.json").read_text())
    for t in abuse["tables"]:
        if t["title"].startswith("One-row client beside"):
            row = next(r for r in t["rows"] if r[0] == "memguard")
            lines[-1] += (f" Fairness: with MemGuard, a one-row client beside four clients sending 4096-row "
                          f"requests waits {row[1]:.1f} ms at p50 and {row[2]:.1f} ms at p99 "
                          "([abuse](docs/results.md#abuse)).")
    return "\n".join([*lines, README_END])


def with_readme_block(text: str, block: str) -> str:
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    return text[:start] + block + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/results.md is out of date")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--readme", default=None, help="also render the serving-cost block of this README")
    args = parser.parse_args(argv)
    pages = {Path(args.out): page(Path(args.results))}
    if args.readme:
        readme = Path(args.readme)
        pages[readme] = with_readme_block(readme.read_text(), readme_block(Path(args.results)))
    if args.check:
        stale = [p.name for p, new in pages.items() if not p.is_file() or new != p.read_text()]
        for name in stale:
            print(f"{name} is out of date: run make docs", file=sys.stderr)
        return 1 if stale else 0
    for path, new in pages.items():
        path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
