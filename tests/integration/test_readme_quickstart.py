"""The README's five-minute path (your own model, serve, audit) runs as printed.

The code blocks of the README section are executed in order in an empty directory: the Python
block as `make_model.py`, every shell line through bash, each `purifier serve ... &` as a
subprocess. Two things differ from a user's terminal, both about sharing the machine: the
sidecars listen on free ports (`--port 0`, `--metrics-port 0`, read from their ready line) and the
audit is pointed at those ports; `kill %1 %2` becomes stopping them in `finally`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from purifier.audit.results import Report
from purifier.serve_process import ServerProcess, clean_env

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent


def _section() -> str:
    text = README.read_text()
    start = text.index("## Five minutes")
    return text[start:text.index("\n## ", start + 1)]


def _with_free_ports(argv: list[str]) -> tuple[list[str], str]:
    """A `purifier serve` argv on free ports; returns it and the port the README gave it."""
    out, readme_port, i = [], None, 0
    while i < len(argv):
        if argv[i] in ("--port", "--metrics-port"):
            readme_port = argv[i + 1] if argv[i] == "--port" else readme_port
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return [*out, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"], readme_port


def test_the_five_minute_path_runs_as_printed(tmp_path):
    blocks = re.findall(r"```(\w*)\n(.*?)```", _section(), re.S)
    assert [lang for lang, _ in blocks] == ["python", "bash", "bash", "bash"]
    env = {**clean_env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    servers, ports = [], {}

    def sh(line: str) -> None:
        for readme_port, port in ports.items():
            line = line.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{port}")
        done = subprocess.run(["bash", "-c", f"set -euo pipefail; {line}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"`{line}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    try:
        (tmp_path / "make_model.py").write_text(blocks[0][1])
        sh("python make_model.py")
        for _, block in blocks[1:]:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if not line or line.startswith("kill %"):
                    continue
                if line.startswith("purifier serve") and line.endswith("&"):
                    argv, readme_port = _with_free_ports(shlex.split(line.rstrip("&"))[2:])
                    server = ServerProcess([str(BIN / "purifier"), "serve", *argv], cwd=tmp_path, env=env,
                                           log_path=tmp_path / f"serve-{readme_port}.log")
                    servers.append(server)
                    server.start()
                    ports[readme_port] = server.port
                else:
                    sh(line)
    finally:
        for server in servers:
            server.stop()

    assert set(ports) == {"8001", "9001"}
    out = tmp_path / "build" / "audit" / "memguard"
    report = Report.read(out)
    assert (out / "report.html").is_file() and "gap" in report.attacks
    # the audited endpoint was the defended sidecar, the baseline the undefended one
    assert report.source.endpoint.endswith(f":{ports['8001']}")
    assert report.source.baseline_endpoint.endswith(f":{ports['9001']}")
    assert "defense inferred from defense.json" in (tmp_path / "serve-8001.log").read_text()
