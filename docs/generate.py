"""Write the generated pages docs/configuration.md and docs/metrics.md from the code they describe.

    python docs/generate.py           # rewrite both pages (`make docs` runs this and render_results)
    python docs/generate.py --check   # exit 1 when a page differs from what the code says

configuration.md comes from the field declarations of `Settings` (server/settings.py), metrics.md
from the objects `SidecarMetrics` (server/metrics.py) registers; neither imports torch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REGENERATE = "make docs"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(value) -> str:
    if value is None:
        return "-"
    if value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`" if value != "" else '`""`'


def configuration_page() -> str:
    from purifier_server.settings import ENV_PREFIX, Settings, _kind

    rows = []
    for f in fields(Settings):
        meta, kind = f.metadata, _kind(f.name)
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if "const" in meta:
            flag = f"`{flag}` (sets `{meta['const']}`)"
        elif kind == "tuple":
            flag = f"`{flag} {meta.get('metavar', 'VALUE')}` (repeatable)"
        elif kind == "bool":
            flag = f"`{flag}`"
        else:
            flag = f"`{flag} {meta.get('metavar', 'N' if kind in ('int', 'float') else 'VALUE')}`"
        if "choices" in meta:
            allowed = ", ".join(f"`{c}`" for c in meta["choices"])
        else:
            allowed = {"bool": "true / false", "int": "integer", "float": "number",
                       "tuple": "names (environment: comma-separated)"}.get(kind, "string")
        default = f.default if f.default is not MISSING else None
        rows.append(f"| `{f.name}` | {_cell(flag)} | `{ENV_PREFIX}{f.name.upper()}` | {_cell(_default(default))} "
                    f"| {_cell(allowed)} | {_cell(meta['help'])} |")
    return "\n".join([
        "# Configuration of `purifier serve`", "",
        f"Generated from the field declarations of `Settings` in `server/settings.py` by `{REGENERATE}`; a test",
        "fails when this page differs from them. Do not edit it by hand.", "",
        "One settings object; precedence, highest first: command-line flags > `PURIFIER_<SETTING>` environment",
        "variables > a TOML file (`--config FILE` or `$PURIFIER_CONFIG`; keys as below, all at the top level",
        "or all in a `[serve]` table, never both) > the defaults. Every value is checked at start-up: an invalid",
        "one stops the sidecar with one line naming the setting, and so does an unknown key, a key beside",
        "`[serve]` or an unknown `PURIFIER_*` variable (a misspelt one would otherwise be ignored; the",
        "others the project reads are `$PURIFIER_CONFIG`, `$PURIFIER_SECRET`, `$PURIFIER_SECRET_FILE` and",
        "`$PURIFIER_CACHE_DIR`, the audit's shadow cache). Exactly one of `model` and `upstream` is given.",
        "`purifier serve --help` prints the same flags.", "",
        "The PRF secret (at least 16 random bytes, required with a defense, the same on every replica, the",
        "one the defense was fitted with: see [tune.md](tune.md#fit-a-defense)) is never",
        "a setting, so it cannot end up in logs: `--secret-file` names the file that holds it, or the",
        "environment gives it in `$PURIFIER_SECRET` or names its file in `$PURIFIER_SECRET_FILE`.", "",
        "| setting | flag | environment | default | allowed | meaning |",
        "|---|---|---|---|---|---|",
        *rows, ""])


def _metric_rows(metrics) -> list[str]:
    from prometheus_client.metrics import MetricWrapperBase

    rows, seen = [], set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            if obj._labelvalues:  # a child such as stage.labels("upstream"), not a metric of its own
                continue
            name = obj._name + ("_total" if obj._type == "counter" else "")
            kind, labels, doc = obj._type, obj._labelnames, obj._documentation
            bounds = [b for b in getattr(obj, "_upper_bounds", []) if b != float("inf")]
        elif hasattr(obj, "labelnames"):  # BatchHistogram: binned in bulk, exposed as a histogram
            name, kind, labels, doc, bounds = obj.name, "histogram", obj.labelnames, obj.documentation, list(obj.bounds)
        elif hasattr(obj, "FAMILIES"):  # TritonAliases: Triton's names, derived from the rows above when scraped
            for name, doc in obj.FAMILIES:
                rows.append(f"| `{name}` | untyped (a counter) | `model`, `version` | {_cell(doc)} | - |")
            continue
        else:
            continue
        if name in seen:
            continue
        seen.add(name)
        buckets = ", ".join(f"{b:g}" for b in bounds) if kind == "histogram" else "-"
        label_cell = ", ".join(f"`{label}`" for label in labels) or "-"
        rows.append(f"| `{name}` | {kind} | {label_cell} | {_cell(doc)} | {buckets} |")
    return rows


def metrics_page() -> str:
    from prometheus_client import CollectorRegistry

    from purifier_server.metrics import SidecarMetrics

    rows = _metric_rows(SidecarMetrics(CollectorRegistry()))
    return "\n".join([
        "# Metrics of `purifier serve`", "",
        f"Generated from `SidecarMetrics` in `server/metrics.py` by `{REGENERATE}`; a test fails when this page",
        "differs from it. Do not edit it by hand.", "",
        "The sidecar serves Prometheus text on `http://METRICS_HOST:METRICS_PORT/metrics` (`--metrics-host`,",
        "default 127.0.0.1; `--metrics-port`, default 8002, -1 turns it off; see",
        "[configuration.md](configuration.md)). Histogram buckets are upper bounds in the metric's unit",
        "(seconds, rows, L1 distance).", "",
        "| metric | type | labels | meaning | histogram buckets |",
        "|---|---|---|---|---|",
        *rows, ""])


PAGES = {"configuration.md": configuration_page, "metrics.md": metrics_page}


def stale(docs: Path = DOCS) -> list[str]:
    """The generated pages whose text differs from what the code says now."""
    return [name for name, page in PAGES.items()
            if not (docs / name).is_file() or (docs / name).read_text() != page()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a page is out of date")
    parser.add_argument("--docs", default=str(DOCS), help="the docs directory (default: this one)")
    args = parser.parse_args(argv)
    docs = Path(args.docs)
    if args.check:
        names = stale(docs)
        for name in names:
            print(f"docs/{name} is out of date: run {REGENERATE}", file=sys.stderr)
        return 1 if names else 0
    for name, page in PAGES.items():
        (docs / name).write_text(page())
    return 0


if __name__ == "__main__":
    sys.exit(main())
