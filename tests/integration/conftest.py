"""Sidecar test support: a non-identity test defense, free ports, and MLServer as a subprocess.

MLServer is never imported here: its `inference.*` protobuf messages clash with tritonclient's in
one process, so it runs as `.venv/bin/mlserver start DIR` in its own process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from model_servers import ModelServer

from purifier.defenses import Defense
from purifier.serve_process import ServeProcess, free_port

TOKEN = "s3cret-token-0123456789"  # the bearer token in the pki fixture


class Flatten(Defense):
    """Deterministic, label-keeping, non-identity: p ** (1/T), renormalized (T > 1 flattens)."""

    name = "test-flatten"

    def __init__(self, *, temperature: float = 3.0, secret=None):
        super().__init__(secret=secret)
        self.temperature = temperature

    def _transform(self, p, inputs):
        q = p ** (1.0 / self.temperature)
        return q / q.sum(axis=1, keepdims=True), None


class MLServerProcess(ModelServer):
    """`mlserver start` on a model repository `root` (by default a scikit-learn digits classifier,
    predict_proba, FP64; `write_settings` alone for a repository written by the caller), through
    purifier.serve_process's launcher like the other model servers."""

    def __init__(self, root: Path, model_name: str = "digits"):
        self.root, self.model_name = root, model_name
        self.exe = Path(sys.executable).with_name("mlserver")
        super().__init__("mlserver", [str(self.exe), "start", str(root)], free_port(), model_name,
                         root / "mlserver.log", ready_timeout=90.0)
        self.endpoint = f"127.0.0.1:{self.grpc_port}"

    def write_settings(self) -> None:
        self.http_port = free_port()
        (self.root / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": self.http_port, "grpc_port": self.grpc_port,
            "metrics_port": free_port(), "parallel_workers": 0}))

    def write_repository(self) -> None:
        import joblib
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        X, y = load_digits(return_X_y=True)
        clf = LogisticRegression(max_iter=300).fit(X[::2] / 16.0, y[::2])
        model_dir = self.root / self.model_name
        model_dir.mkdir(parents=True)
        joblib.dump(clf, model_dir / "model.joblib")
        (model_dir / "model-settings.json").write_text(json.dumps({
            "name": self.model_name, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib", "extra": {"predict_fn": "predict_proba"}},
            "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 10]}]}))
        self.write_settings()

    def start(self) -> MLServerProcess:
        if not self.exe.exists():
            pytest.skip("mlserver is not installed in this environment")
        super().start()
        self.endpoint = f"127.0.0.1:{self.grpc_port}"
        return self


@contextlib.contextmanager
def serve(*args: str, log: Path, timeout_s: float = 90.0):
    """`purifier serve ARGS` on a loopback port of its choosing, as a user runs it; yields its endpoint."""
    with ServeProcess(args, log_path=log, ready_timeout_s=timeout_s, env=os.environ.copy()) as sidecar:
        yield sidecar.endpoint


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate (EC P-256) and a
    bearer token file `token`."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not available to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=d)
    (d / "token").write_text(TOKEN + "\n")
    return d


@pytest.fixture(scope="session")
def serve_process():
    """`with serve_process(*serve_args, log=path) as endpoint: ...` (purifier.serve_process.ServeProcess)."""
    return serve


@pytest.fixture(scope="session")
def mlserver_process():
    """The `MLServerProcess` class, for tests that write their own model repository."""
    return MLServerProcess


@pytest.fixture(scope="session")
def flatten_cls():
    return Flatten


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    server = MLServerProcess(tmp_path_factory.mktemp("mlserver"))
    server.write_repository()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def zipmap_onnx(tmp_path_factory) -> Path:
    """skl2onnx's default export of a classifier (4 features, 3 classes): an int64 `output_label`
    first and the probabilities as a ZipMap (`seq(map(int64, tensor(float)))`)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    X = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    model = to_onnx(LogisticRegression().fit(X, np.arange(60) % 3), X[:1])
    path = tmp_path_factory.mktemp("zipmap") / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def digits_rows():
    from sklearn.datasets import load_digits

    X, _ = load_digits(return_X_y=True)
    return np.ascontiguousarray(X[1::2][:16] / 16.0, dtype=np.float32)


@pytest.fixture
def upstream():
    """A started `oip_fake.FakeUpstream` (probs = softmax(x)), stopped after the test."""
    from oip_fake import FakeUpstream

    fake = FakeUpstream(workers=16).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def stub(sidecar):
    """A raw GRPCInferenceService stub for the `sidecar` fixture of the requesting test module."""
    import grpc

    from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def triton_infer():
    """infer(port, model, x (N, D) FP32 for input "input", output) -> that output, via tritonclient."""
    import tritonclient.grpc as grpcclient

    def infer(port: int, model: str, x: np.ndarray, output: str = "probabilities") -> np.ndarray:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(output)]).as_numpy(output)
        finally:
            client.close()

    return infer


@pytest.fixture
def target_rows(digits_target):
    """(12, 64) FP32 non-member rows of the session's digits target."""
    X, _ = digits_target.role("eval_nonmembers")
    return np.ascontiguousarray(X[:12], np.float32)


@pytest.fixture
def client(sidecar):
    """A tritonclient.grpc client for the `sidecar` fixture of the requesting test module."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    try:
        yield c
    finally:
        c.close()
