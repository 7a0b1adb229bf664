"""Real model servers as upstream processes: Triton (nvidia-pytriton), KServe, TorchServe.

Each runs from its own virtual environment made by the Makefile (`make venv-triton`,
`venv-kserve`, `venv-torchserve`; `make test` makes the first two) because their dependencies
conflict with the project's, and serves the session's digits target (ONNX, `probabilities` and
`logits`) with onnxruntime through the scripts in examples/upstreams/ (the docs/serving.md recipes). The
process is purifier.serve_process's launcher: its own process group on loopback ports, `stop()`
ends the whole group (Triton's server outlives its Python parent by seconds otherwise) and
`start()` again brings it back on the same ports, for the outage and recovery tests.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from purifier.serve_process import ServerProcess, free_port  # noqa: F401 - the tests import free_port here
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


class ModelServer(ServerProcess):
    """A model server command (purifier.serve_process.ServerProcess) that is ready once `model`
    answers ModelReady on `grpc_port` under `service`; its stdout and stderr go to `log`."""

    def __init__(self, name: str, cmd: list[str], grpc_port: int, model: str, log: Path, *,
                 service: str = OIP_SERVICE, env: dict | None = None, ready_timeout: float = 180.0):
        super().__init__(cmd, env=env, log_path=log, cwd=log.parent,
                         ready_line=False, ready_timeout_s=ready_timeout, name=name,
                         ready_check=lambda: model_ready(grpc_port, model, service))
        self.grpc_port, self.model, self.service = grpc_port, model, service


def sidecar_settings(server: ModelServer, **extra) -> Settings:
    """A loopback sidecar (any free port, no metrics) defending `server`'s `probabilities`."""
    return Settings.resolve({"upstream": f"127.0.0.1:{server.grpc_port}", "upstream_service": server.service,
                             "model_name": server.model, "confidence_output": "probabilities", "host": "127.0.0.1",
                             "port": 0, "http_port": 0, "metrics_port": -1, "health_poll_s": 0.2, **extra}, env={})


def kserve_rest_client(port: int, model: str, x: np.ndarray, tmp_path: Path) -> dict:
    """KServe's InferenceRESTClient (in .venv-kserve, clients/kserve_rest_client.py) against the REST
    front at 127.0.0.1:port: readiness, then `x` as JSON and as binary tensors; the saved answers."""
    rows_file, out = tmp_path / "rows.npy", tmp_path / "answer.npz"
    np.save(rows_file, x)
    cmd = [str(venv_python("kserve")), str(ROOT / "tests" / "integration" / "clients" / "kserve_rest_client.py"),
           f"http://127.0.0.1:{port}", model, "input", str(rows_file), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(np.load(out))
