"""The sidecar in front of TorchServe 0.12's OIP gRPC service (marker `torchserve`: Java 17, .venv-torchserve).

TorchServe serves the session's digits target through examples/upstreams/torchserve_onnx.py under
its own service name. It reads typed contents only: KServe's client sending typed contents gets
the defended answer, and so does tritonclient, which sends raw contents only, because the sidecar
re-encodes requests as typed for this upstream (upstream_contents auto).

    make venv-torchserve && .venv/bin/python -m pytest -m torchserve tests/integration/test_sidecar_torchserve.py
"""

from __future__ import annotations

import shutil
import subprocess

import grpc
import numpy as np
import pytest
from model_servers import (
    EXAMPLES,
    ROOT,
    ModelServer,
    free_port,
    model_ready,
    sidecar_settings,
    venv_python,
)

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.app import BackgroundSidecar

grpcclient = pytest.importorskip("tritonclient.grpc")

pytestmark = [pytest.mark.integration, pytest.mark.torchserve]
MODEL = "digits"
SERVICE = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"


@pytest.fixture(scope="module")
def torchserve(digits_target, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs a Java 17 runtime (apt install openjdk-17-jre-headless)")
    root = tmp_path_factory.mktemp("torchserve")
    port = free_port()
    cmd = [str(venv_python("torchserve")), str(EXAMPLES / "torchserve_onnx.py"), str(digits_target.onnx_path),
           "--name", MODEL, "--workdir", str(root), "--grpc-port", str(port), "--management-grpc-port",
           str(free_port()), "--ports", str(free_port()), str(free_port()), str(free_port()),
           "--worker-port", str(free_port())]
    with ModelServer("torchserve", cmd, port, MODEL, root / "torchserve.log", service=SERVICE) as server:
        yield server


@pytest.fixture(scope="module")
def sidecar(torchserve, flatten_cls):
    with BackgroundSidecar(sidecar_settings(torchserve), defense=flatten_cls()) as sc:
        yield sc


def typed_infer(port: int, x: np.ndarray, service: str, outputs=()) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name=MODEL, id="ts-1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel())
    for name in outputs:
        request.outputs.add(name=name)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{service}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        return call(request, timeout=30)


def typed_output(response, name: str) -> np.ndarray:
    out = {o.name: o for o in response.outputs}[name]
    return np.asarray(out.contents.fp32_contents, np.float32).reshape(list(out.shape))


def test_typed_requests_get_the_defended_answer(torchserve, sidecar, target_rows):
    direct = typed_infer(torchserve.grpc_port, target_rows, SERVICE)
    assert {o.name for o in direct.outputs} == {"probabilities", "logits"}
    answer = typed_infer(sidecar.port, target_rows, "inference.GRPCInferenceService")
    assert [o.name for o in answer.outputs] == ["probabilities"]
    assert answer.id == "ts-1"
    clean, got = typed_output(direct, "probabilities"), typed_output(answer, "probabilities")
    np.testing.assert_allclose(got, type(sidecar.defense)().transform(clean), rtol=1e-5, atol=1e-7)
    assert np.array_equal(got.argmax(1), clean.argmax(1))
    assert np.abs(got - clean).sum(1).min() > 1e-3


def test_readiness_and_logits_refused(torchserve, sidecar, target_rows):
    assert model_ready(sidecar.port, MODEL)
    with pytest.raises(grpc.RpcError) as info:
        typed_infer(sidecar.port, target_rows, "inference.GRPCInferenceService", outputs=["logits"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tritonclient_raw_requests_work_in_front_of_torchserve(torchserve, sidecar, target_rows):
    """tritonclient sends raw contents only; TorchServe reads typed contents only. With
    upstream_contents auto (typed for TorchServe's service) the sidecar re-encodes the request and
    answers raw, as tritonclient expects. The raw request straight to TorchServe fails."""
    assert sidecar.settings.upstream_encoding == "typed"
    request = pb.ModelInferRequest(model_name=MODEL, id="raw-1", raw_input_contents=[target_rows.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=target_rows.shape)
    with grpc.insecure_channel(f"127.0.0.1:{torchserve.grpc_port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError):
            call(request, timeout=30)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    try:
        inp = grpcclient.InferInput("input", list(target_rows.shape), "FP32")
        inp.set_data_from_numpy(target_rows)
        result = client.infer(MODEL, [inp], request_id="raw-2")
    finally:
        client.close()
    got = result.as_numpy("probabilities")  # as_numpy reads raw outputs only
    clean = typed_output(typed_infer(torchserve.grpc_port, target_rows, SERVICE), "probabilities")
    np.testing.assert_allclose(got, type(sidecar.defense)().transform(clean), rtol=1e-5, atol=1e-7)
    assert np.array_equal(got.argmax(1), clean.argmax(1))
    assert result.get_response().id == "raw-2"


def test_kserve_client_typed_through_the_sidecar(sidecar, target_rows, tmp_path):
    rows_file, out = tmp_path / "rows.npy", tmp_path / "answer.npz"
    np.save(rows_file, target_rows)
    done = subprocess.run([str(venv_python("kserve")), str(ROOT / "tests" / "integration" / "clients" /
                                                            "kserve_client.py"), f"127.0.0.1:{sidecar.port}",
                           MODEL, "input", str(rows_file), str(out), "--only", "typed"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = dict(np.load(out))
    expected = typed_output(typed_infer(sidecar.port, target_rows, "inference.GRPCInferenceService"), "probabilities")
    np.testing.assert_allclose(answer["typed_probabilities"].reshape(expected.shape), expected, rtol=1e-6)


def test_purifier_bench_compares_torchserve_and_the_sidecar_with_typed_requests(torchserve, sidecar, capsys):
    from purifier.cli import main

    assert main(["bench", "--direct", f"127.0.0.1:{torchserve.grpc_port}", "--direct-service", SERVICE,
                 "--sidecar", f"127.0.0.1:{sidecar.port}", "--model-name", MODEL, "--input-name", "input",
                 "--features", "64", "--output-name", "probabilities", "--typed", "--concurrency", "1",
                 "--seconds", "1", "--rounds", "1"]) == 0
    assert "added p50" in capsys.readouterr().out
