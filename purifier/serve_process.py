"""`purifier serve` (or any server) as a subprocess: started, read, stopped as one process group.

The demo, the benchmarks and the tests run the sidecar exactly as a deployment does, in its own
process. `ServeProcess` starts `python -m purifier.cli serve ... --host 127.0.0.1 --port 0`, so
the kernel picks a free port and nothing races for it, reads the JSON ready line that
`purifier serve` prints on stdout once it serves (`{"event": "serving", "port": ..., ...}`), and
stops the whole process group (SIGTERM, then SIGKILL past a deadline). stderr (the JSON log)
goes to a file, never to a pipe nobody drains. This module never imports `purifier_server`.

Servers that print no ready line (Triton, KServe, MLServer, TorchServe as upstreams) are started
with `ready_line=False` and a `ready_check` that `start()` polls (ModelReady, say); `stop()` waits
for every member of the group, not just its leader (pytriton's tritonserver outlives its Python
parent by seconds), and `start()` after `stop()` brings the same command back (outage tests).

    with ServeProcess(["--model", "build/targets/digits", "--defense", "none"]) as sidecar:
        client = tritonclient.grpc.InferenceServerClient(sidecar.endpoint)
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from purifier.errors import PurifierError


class ServerStartError(PurifierError):
    """The server exited, or printed no ready line in time. `returncode` is None if it still ran."""

    def __init__(self, message: str, returncode: int | None, log: str):
        super().__init__(message)
        self.returncode, self.log = returncode, log


def free_port() -> int:
    """A port that was free a moment ago (bind, read, release).

    Only for servers that cannot bind port 0 and report the port they got (MLServer takes its
    ports from settings.json); another process may take the port in between. `purifier serve`
    never needs this: start it with `--port 0` and read the ready line.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without PURIFIER_* settings, so only the command line configures the child."""
    return {k: v for k, v in (os.environ if env is None else env).items() if not k.startswith("PURIFIER_")}


class ServerProcess:
    """A server command in its own process group; `start()` waits for its JSON ready line.

    Args:
        cmd: the command line.
        env: its environment (default: this one without PURIFIER_* variables).
        log_path: where stderr goes (default: a temporary file, removed on `stop`).
        ready_timeout_s: how long `start` waits for the ready line.
        ready_line: False for servers that print none; their stdout goes to the log too.
        ready_check: with ready_line False, `start` polls this (True: ready) every `poll_s` until
            `ready_timeout_s`; without one, `start` returns as soon as the process runs.
        cwd: its working directory (default this one; note `python -m` puts it first on sys.path).
        name: how errors name the server (default: from the command).

    After `start()`: `pid`, `ready` (the parsed ready line, {} without one), `port`, `endpoint`
    ("127.0.0.1:PORT") and `ready_s` (seconds from process start to the ready line).
    """

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str] | None = None, log_path: str | Path | None = None,
                 ready_timeout_s: float = 90.0, ready_line: bool = True, cwd: str | Path | None = None,
                 ready_check: Callable[[], bool] | None = None, poll_s: float = 0.5, name: str | None = None):
        self.cmd = [str(c) for c in cmd]
        self.cwd = cwd
        self.ready_check, self.poll_s, self._name = ready_check, poll_s, name
        self.env = clean_env() if env is None else env
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path is not None else None
        self.ready_timeout_s, self.ready_line = ready_timeout_s, ready_line
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}
        self.port: int | None = None
        self.http_port: int | None = None       # the REST port of `purifier serve`, when it has one
        self.http_endpoint: str | None = None
        self.endpoint: str | None = None
        self.ready_s: float | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self._started().pid

    def _started(self) -> subprocess.Popen:
        if self.proc is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self.proc

    def start(self) -> ServerProcess:
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        log_path = self.log_path
        with open(log_path, "ab") as log:  # a restart appends
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE if self.ready_line else log,
                                         stderr=log, text=True, env=self.env, cwd=self.cwd,
                                         start_new_session=True)
        if not self.ready_line:
            if self.ready_check is not None:
                self._poll_ready()
                self.ready_s = time.perf_counter() - t0
            return self
        try:
            line = self._read_line()
            self.ready_s = time.perf_counter() - t0
            self.ready = json.loads(line)
        except BaseException:
            self.stop()
            if self._own_log:  # the error carries the log text
                with contextlib.suppress(OSError):
                    log_path.unlink()
            raise
        if "port" in self.ready:
            self.port = int(self.ready["port"])
            self.endpoint = f"127.0.0.1:{self.port}"
        if self.ready.get("http_port") is not None:
            self.http_port = int(self.ready["http_port"])
            self.http_endpoint = f"127.0.0.1:{self.http_port}"
        return self

    def _poll_ready(self) -> None:
        proc, ready = self._started(), self.ready_check
        assert ready is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                code = proc.returncode
                self.stop()  # its children may live on
                raise ServerStartError(f"{self.name} exited with {code} before it was ready: "
                                       f"{self._last_log_line()}", code, self.log_text())
            if ready():
                return
            time.sleep(self.poll_s)
        self.stop()
        raise ServerStartError(f"{self.name} not ready within {self.ready_timeout_s:g} s (log: {self.log_path}): "
                               f"{self._last_log_line()}", None, self.log_text())

    def _read_line(self) -> str:
        proc = self._started()
        stdout = proc.stdout
        assert stdout is not None  # started with stdout=PIPE when a ready line is expected
        deadline = time.monotonic() + self.ready_timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.1):
                    line = stdout.readline()
                    if line.strip():
                        return line
                if proc.poll() is not None:
                    raise ServerStartError(f"{self.name} exited with {proc.returncode} before serving: "
                                           f"{self._last_log_line()}", proc.returncode, self.log_text())
        raise ServerStartError(f"{self.name} printed no ready line within {self.ready_timeout_s:g} s "
                               f"(log: {self.log_path})", None, self.log_text())

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        return " ".join(self.cmd[2:5]) if self.cmd[1:2] == ["-m"] else Path(self.cmd[0]).name

    def log_text(self) -> str:
        """What the server wrote on stderr so far."""
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def _last_log_line(self) -> str:
        lines = [ln for ln in self.log_text().splitlines() if ln.strip()]
        return lines[-1][:800] if lines else "(no output)"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the server's process group (no-op once it has exited)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        self.returncode = self._started().wait(timeout=timeout)
        return self.returncode

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the group, wait up to `timeout_s` for all of it, SIGKILL what is left; returns the
        leader's exit code. `start()` may be called again afterwards."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)  # also when the leader is gone and its children are not
        try:
            self.returncode = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.returncode = self.proc.wait(timeout=10)
        # the group may outlive its leader (a grandchild): give it the rest of the time, then SIGKILL
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve_command(args: Sequence[str], python: str | Path = sys.executable, rest: bool = True) -> list[str]:
    """`python -m purifier.cli serve` on loopback, gRPC and REST on port 0, no metrics port, then
    `args` (a flag given in `args` overrides these defaults: argparse keeps the last occurrence).
    `rest=False` leaves out `--http-port` (a checkout older than the REST front rejects it)."""
    return [str(python), "-m", "purifier.cli", "serve", "--host", "127.0.0.1", "--port", "0",
            *(("--http-port", "0") if rest else ()), "--metrics-port", "-1", *map(str, args)]


class ServeProcess(ServerProcess):
    """`purifier serve ARGS` as a subprocess on a loopback port it picks itself (see module doc).

    Args:
        args: serve flags, e.g. ["--model", DIR, "--defense", "memguard", "--defense-dir", DIR].
        python: the interpreter whose installation runs it (another virtual environment's, say).
        rest: start the REST front on a free port too (False for a checkout older than it).
        Other keywords as `ServerProcess`.
    """

    def __init__(self, args: Sequence[str], *, python: str | Path = sys.executable, rest: bool = True, **kwargs):
        super().__init__(serve_command(args, python, rest), **kwargs)


__all__ = ["ServeProcess", "ServerProcess", "ServerStartError", "clean_env", "free_port", "serve_command"]
