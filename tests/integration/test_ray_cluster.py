"""Joining an existing Ray cluster: a head started with `ray start --head` (its own process group,
stopped in `finally`), a driver in a subprocess that maps tasks on it through `RayExecutor`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DRIVER = """
import sys, numpy as np
from purifier.executor import RayExecutor
with RayExecutor(address=sys.argv[1]) as ex:
    print(ex.describe()["workers"], ex.map(np.add, [(1,), (2,)], (np.arange(3),)))
"""
LOCAL_DRIVER = """
from purifier.executor import RayExecutor
with RayExecutor(num_cpus=1) as ex:
    print(ex.describe()["workers"])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_driver_joins_a_running_head(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed here (the purifier[ray] extra; make venv installs it)")
    port = _free_port()
    ray_cli = Path(sys.executable).parent / "ray"
    head = subprocess.Popen([str(ray_cli), "start", "--head", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        for _ in range(240):  # the head binds its GCS port within seconds (a minute on a busy machine)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
                time.sleep(0.5)
        env = {**os.environ, "RAY_AUTH_MODE": "token"}  # Ray 2.60's head enables token auth
        run = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{port}"], capture_output=True,
                             text=True, env=env, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.strip().splitlines()[-1] == "2 [array([1, 2, 3]), array([2, 3, 4])]"
        # without the token mode, the driver is told what to set, in one line
        env.pop("RAY_AUTH_MODE")
        run = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{port}"], capture_output=True,
                             text=True, env=env, timeout=400)
        assert run.returncode != 0 and "RAY_AUTH_MODE=token" in run.stderr.splitlines()[-1]
        # with a head running on this machine, "no address" still means a Ray of our own
        run = subprocess.run([sys.executable, "-c", LOCAL_DRIVER], capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.strip().splitlines()[-1] == "1"
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # SIGTERM drains for 30 s; nothing here needs draining
        head.wait(30)
