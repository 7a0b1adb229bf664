"""`purifier audit` with shadows on Ray, from the cache and on local processes: the same report;
bad executor settings fail in one line before anything is queried or written."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from purifier.audit.results import Report
from purifier.cli import main

ATTACKS = "gap,mentr,lira_online,lira_offline,label_augment"


def audit(target, out, cache, *extra) -> Report:
    """Run the CLI in its own process (as a user does; a local Ray is started and stopped there)."""
    cmd = [sys.executable, "-m", "purifier.cli", "audit", "--target", str(target.directory), "--in-process",
           "--out", str(out), "--attacks", ATTACKS, "--shadows", "4", "--shadow-epochs", "20",
           "--bootstrap", "20", "--cache-dir", str(cache), "--quiet", *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return Report.read(out)


def attack_numbers(report: Report) -> dict:
    return {name: replace(a, seconds=0.0) for name, a in report.attacks.items()}


def test_ray_cache_and_local_processes_give_the_same_audit(digits_target, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed here (the purifier[ray] extra; make venv installs it)")
    cache = tmp_path / "cache"
    on_ray = audit(digits_target, tmp_path / "ray", cache, "--executor", "ray", "--workers", "2")
    sh = on_ray.shadows
    assert sh.executor["executor"] == "ray" and sh.executor["opened"] and sh.trained == 4
    assert sh.cache["written"] == 4 and sh.from_cache == 0

    warm = audit(digits_target, tmp_path / "warm", cache, "--executor", "ray")
    assert warm.shadows.from_cache == 4 and warm.shadows.trained == 0
    assert warm.shadows.executor["opened"] is False  # nothing to train: no Ray started
    assert warm.shadows.retrained_for_label_queries == ()  # oracles rebuilt from cached weights

    local = audit(digits_target, tmp_path / "local", cache, "--executor", "local", "--workers", "2", "--no-cache")
    assert local.shadows.executor["executor"] == "local" and local.shadows.trained == 4
    assert local.shadows.cache["enabled"] is False and not (tmp_path / "local-cache").exists()

    assert attack_numbers(on_ray) == attack_numbers(warm) == attack_numbers(local)
    assert "4 trained on ray" in (tmp_path / "ray" / "report.md").read_text()


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, message", [
    (["--executor", "ray", "--ray-address", "127.0.0.1:{port}"], "cannot connect"),
    (["--executor", "local", "--ray-address", "127.0.0.1:6379"], "--ray-address only applies with --executor ray"),
    (["--workers", "0"], "--workers: need at least 1"),
])
def test_bad_executor_settings_fail_in_one_line_before_any_work(digits_target, tmp_path, capsys, flags, message):
    flags = [f.format(port=_refused_port()) for f in flags]
    rc = main(["audit", "--target", str(digits_target.directory), "--in-process", "--out", str(tmp_path / "rep"),
               "--attacks", "gap", "--quiet", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "rep").exists()
