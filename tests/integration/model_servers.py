"""Real model servers as upstream processes: Triton (nvidia-pytriton), KServe, TorchServe.

Each runs from its own virtual environment made by the Makefile (`make venv-triton`,
`venv-kserve`, `venv-torchserve`; `make test` makes the first two) because their dependencies
conflict with the project's, and serves the session's digits target (ONNX, `probabilities` and
`logits`) with onnxruntime through the scripts in examples/upstreams/ (the README recipes). The
process gets its own process group on loopback ports; `stop()` ends the whole group (Triton's
server outlives its Python parent by seconds otherwise) and `start()` again brings it back on the
same ports, for the outage and recovery tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from purifier.serve_process import free_port  # noqa: F401 - the tests import it from here
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "upstreams"
OIP_SERVICE = "inference.GRPCInferenceService"


def venv_python(name: str) -> Path:
    """`.venv-<name>/bin/python`; a missing venv skips the test (fails it under CI)."""
    exe = ROOT / f".venv-{name}" / "bin" / "python"
    if not exe.exists():
        message = f".venv-{name} is missing: run `make venv-{name}` (make test makes the Triton and KServe ones)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def model_ready(port: int, model: str, service: str = OIP_SERVICE, timeout: float = 2.0) -> bool:
    """ModelReady over a fresh channel (any error: not ready)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{service}/ModelReady", request_serializer=pb.ModelReadyRequest.SerializeToString,
                                   response_deserializer=pb.ModelReadyResponse.FromString)
        try:
            return call(pb.ModelReadyRequest(name=model), timeout=timeout).ready
        except grpc.RpcError:
            return False


class ServerProcess:
    """A model server command in its own process group, ready once its model answers ModelReady."""

    def __init__(self, name: str, cmd: list[str], grpc_port: int, model: str, log: Path, *,
                 service: str = OIP_SERVICE, env: dict | None = None, ready_timeout: float = 180.0):
        self.name, self.cmd, self.grpc_port, self.model = name, cmd, grpc_port, model
        self.log, self.service, self.env, self.ready_timeout = log, service, env, ready_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env, cwd=self.log.parent)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if (code := self.proc.poll()) is not None:
                self.stop()  # its children may live on
                raise RuntimeError(f"{self.name} exited with {code}: {self.tail()}")
            if model_ready(self.grpc_port, self.model, self.service):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {self.ready_timeout} s: {self.tail()}")

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the group, wait until every member is gone, SIGKILL what is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.proc = None


def sidecar_settings(server: ServerProcess, **extra) -> Settings:
    """A loopback sidecar (any free port, no metrics) defending `server`'s `probabilities`."""
    return Settings.resolve({"upstream": f"127.0.0.1:{server.grpc_port}", "upstream_service": server.service,
                             "model_name": server.model, "confidence_output": "probabilities", "host": "127.0.0.1",
                             "port": 0, "metrics_port": -1, "health_poll_s": 0.2, **extra}, env={})
