"""What a timing was taken on: the machine, its load, and the library versions.

Every speed figure the project writes (`purifier bench`, `benchmarks/`) carries this record,
because on a shared machine the same code runs several times slower when other work is queued:
a latency without the load average it was measured under cannot be compared with another.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from purifier.artifacts import library_versions


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(*versions: str) -> dict:
    """Platform, CPUs (count, affinity, model), load average now, and library versions.

    `versions` names extra distributions to record besides python, purifier, numpy, torch,
    onnxruntime, grpcio and protobuf.
    """
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": platform.processor(),
        "load_average": load_average(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    info["versions"] = library_versions("grpcio", "protobuf", *versions)
    return info


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (a server of several processes:
    `purifier serve --workers N`). Linux /proc; a descendant that exits meanwhile is left out."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += process_cpu_seconds(p)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            if p == pid:
                raise
    return total
