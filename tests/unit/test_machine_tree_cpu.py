"""process_tree_cpu_seconds counts a server's children: `purifier serve --workers N` answers from
its workers, and the supervisor alone uses next to no CPU."""

from __future__ import annotations

import subprocess
import sys

from purifier.machine import process_cpu_seconds, process_tree_cpu_seconds


def test_the_cpu_of_live_children_is_counted():
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\nprint(1, flush=True)\n" \
           "import sys; sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"1\n"  # it spent 0.5 s of CPU and still runs
        import os

        me = os.getpid()
        assert process_tree_cpu_seconds(me) - process_cpu_seconds(me) >= 0.4
        assert process_tree_cpu_seconds(child.pid) >= 0.4
    finally:
        child.stdin.close()
        child.wait(timeout=30)
