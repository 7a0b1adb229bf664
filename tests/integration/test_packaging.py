"""A non-editable `pip install .` works and `purifier --help` runs from another directory."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"add to pyproject packages: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_pip_install_non_editable_and_cli_from_elsewhere(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (target / "server").exists(), "nothing generic named 'server' may land in site-packages"
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-c", "import purifier; print(purifier.__file__)"],
                       capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.returncode == 0 and str(target) in r.stdout, r.stderr
    r = subprocess.run([str(target / "bin" / "purifier"), "--help"], capture_output=True, text=True,
                       cwd=elsewhere, env=env)
    assert r.returncode == 0 and "train-target" in r.stdout, r.stderr
