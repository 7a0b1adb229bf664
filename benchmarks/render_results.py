"""Render benchmarks/results/*.json into docs/results.md.

Each results file may carry `tables`: [{"title", "columns", "rows", "note"?}]; they are written
to docs/results.md with the machine and date each file was measured on, so the published numbers
are always measured ones.

    python benchmarks/render_results.py            # rewrite docs/results.md (`make docs` runs this)
    python benchmarks/render_results.py --check    # exit 1 if docs/results.md is out of date
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
         "tune_digits", "privacy_utility_purchase_like", "purchase_like", "defense", "sidecar", "abuse",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/results.md is out of date")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    new = page(Path(args.results))
    if args.check:
        if not out.is_file() or new != out.read_text():
            print(f"{out.name} is out of date: run make docs", file=sys.stderr)
            return 1
        return 0
    out.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
