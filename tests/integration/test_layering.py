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
