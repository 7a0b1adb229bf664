"""mypy on purifier/ and server/ (configured in pyproject.toml), so a type error fails `make test`
and CI, not only `make lint`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_is_clean():
    link = ROOT / "build" / "typecheck" / "purifier_server"  # server/ under its installed name (pyproject)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(Path("..", "..", "server"))
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
