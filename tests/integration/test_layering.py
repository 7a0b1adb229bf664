"""The library never imports the server (only `purifier serve` does, lazily)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_library_imports_do_not_load_the_server():
    code = ("import sys, purifier.cli, purifier.defenses, purifier.models.target, purifier.evaluation; "
            "purifier.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith('purifier_server')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_only_the_serve_subcommand_mentions_the_server_package():
    pattern = re.compile(r"^\s*(from|import)\s+purifier_server", re.MULTILINE)
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "purifier").rglob("*.py")
                   if pattern.search(p.read_text()))
    assert users == ["purifier/cli.py"]


# The library's floors, lowest first: an import may only point to a lower floor (or stay inside
# its own package). Lazy imports inside functions count: they are arrows all the same.
FLOORS = (
    ("errors",),
    ("tables", "progress", "evaluation", "probabilities", "threads", "untrusted"),
    ("artifacts", "devices", "executor", "serve_process"),
    ("data", "machine"),
    ("models", "bench"),
    ("defenses",),
    ("attacks",),
    ("audit",),
    ("fitting", "demo"),
    ("tuning",),
    ("cli",),
)


def _imports(path: Path) -> set[str]:
    """Every purifier.* module `path` imports, at the top or inside a function."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "purifier" or m.startswith("purifier.")}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "purifier").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the purifier modules it imports (names that are not modules resolve to their module)."""
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _unit(module: str) -> str:
    """The room a module lives in: its package under purifier/, or its own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "purifier"


def upward_arrows(graph: dict[str, set[str]], floors=FLOORS) -> list[str]:
    floor = {unit: i for i, units in enumerate(floors) for unit in units}
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            a, b = _unit(src), _unit(dst)
            if a == b or "purifier" in (a, b):
                continue
            if a not in floor or b not in floor:
                bad.append(f"{src} -> {dst}: {a if a not in floor else b} has no floor in FLOORS")
            elif floor[b] >= floor[a]:
                bad.append(f"{src} -> {dst}: floor {floor[a]} imports floor {floor[b]}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles between modules (strongly connected components of more than one)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_a_floor():
    assert upward_arrows(_graph()) == []


def test_no_import_cycle_between_modules():
    assert cycles(_graph()) == []


def test_the_checks_catch_an_upward_arrow_and_a_cycle():
    graph = {"purifier.attacks.timing": {"purifier.audit.runner"}, "purifier.audit.runner": {"purifier.attacks"},
             "purifier.audit.html": {"purifier.audit.report"}, "purifier.audit.report": {"purifier.audit.html"}}
    assert upward_arrows(graph) == ["purifier.attacks.timing -> purifier.audit.runner: floor 6 imports floor 7"]
    assert cycles(graph) == [["purifier.audit.html", "purifier.audit.report"]]
