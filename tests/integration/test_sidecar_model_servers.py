"""The sidecar in front of real model servers: Triton (nvidia-pytriton's tritonserver) and KServe.

Both serve the session's digits target (ONNX: `probabilities` and `logits`, FP32) from their own
virtual environments (tests/integration/model_servers.py). Through the sidecar, with a
non-identity test defense: defended vectors with the upstream's argmax and the request id, the
same answer to the same query, logits and undeclared outputs refused, metadata and readiness
reflecting the upstream, the upstream's advertised version served and named alike by metadata,
readiness and answers, perf_analyzer's calls (ModelMetadata, ModelConfig, infer) with tritonclient
and the real perf_analyzer binary, an upstream outage seen as UNAVAILABLE and NOT_SERVING, and
recovery once it is back. Clients: tritonclient (sync), KServe's `InferenceGRPCClient` (from
.venv-kserve, as a subprocess) and perf_analyzer (`make perf-analyzer`; skipped without it).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from model_servers import (
    EXAMPLES,
    ROOT,
    ModelServer,
    free_port,
    kserve_rest_client,
    sidecar_settings,
    venv_python,
)

from purifier_server.app import BackgroundSidecar

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "digits"
SERVERS = ("triton", "kserve")
PERF_ANALYZER = ROOT / "build" / "perf-analyzer" / "perf_analyzer"


def server_process(kind: str, onnx, root) -> ModelServer:
    grpc_port, http_port = free_port(), free_port()
    script = {"triton": "triton_onnx.py", "kserve": "kserve_onnx.py"}[kind]
    cmd = [str(venv_python(kind)), str(EXAMPLES / script), str(onnx), "--name", MODEL,
           "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    server = ModelServer(kind, cmd, grpc_port, MODEL, root / f"{kind}.log")
    server.http_port = http_port
    return server


@pytest.fixture(scope="module", params=SERVERS)
def upstream(request, digits_target, tmp_path_factory):
    with server_process(request.param, digits_target.onnx_path, tmp_path_factory.mktemp(request.param)) as server:
        yield server


@pytest.fixture(scope="module")
def sidecar(upstream, flatten_cls):
    with BackgroundSidecar(sidecar_settings(upstream), defense=flatten_cls()) as sc:
        yield sc


@pytest.fixture(scope="module")
def rest_sidecar(upstream, flatten_cls):
    """A sidecar reaching the same server over its REST front (`--upstream http://...`)."""
    settings = sidecar_settings(upstream, upstream=f"http://127.0.0.1:{upstream.http_port}")
    with BackgroundSidecar(settings, defense=flatten_cls()) as sc:
        yield sc


def infer(port, x, outputs=None, **kw):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
        return client.infer(MODEL, [inp], outputs=requested, **kw)
    finally:
        client.close()


def test_defended_output_keeps_the_upstream_argmax_and_the_id(upstream, sidecar, target_rows):
    direct = infer(upstream.grpc_port, target_rows, ["probabilities"]).as_numpy("probabilities")
    result = infer(sidecar.port, target_rows, request_id=f"{upstream.name}-7")
    got = result.as_numpy("probabilities")
    assert got.dtype == direct.dtype == np.float32
    np.testing.assert_allclose(got, type(sidecar.defense)().transform(direct), rtol=1e-5, atol=1e-7)
    assert np.array_equal(got.argmax(1), direct.argmax(1))
    assert np.abs(got - direct).sum(1).min() > 1e-3  # defended, not passed through
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    response = result.get_response()
    assert response.id == f"{upstream.name}-7"
    assert [o.name for o in response.outputs] == ["probabilities"]  # the upstream's logits are dropped


def test_identical_queries_get_identical_answers(sidecar, target_rows):
    first = infer(sidecar.port, target_rows).as_numpy("probabilities")
    again = infer(sidecar.port, target_rows).as_numpy("probabilities")
    alone = infer(sidecar.port, target_rows[3:4]).as_numpy("probabilities")
    assert first.tobytes() == again.tobytes()
    np.testing.assert_allclose(alone[0], first[3], rtol=1e-6, atol=1e-7)


def test_logits_are_refused_although_the_upstream_serves_them(upstream, sidecar, target_rows):
    assert infer(upstream.grpc_port, target_rows, ["logits"]).as_numpy("logits").shape == (len(target_rows), 10)
    with pytest.raises(InferenceServerException) as info:
        infer(sidecar.port, target_rows, ["logits"])
    assert "INVALID_ARGUMENT" in str(info.value.status())
    assert "logits" in info.value.message()


def test_metadata_and_readiness_reflect_the_upstream(upstream, sidecar):
    direct = grpcclient.InferenceServerClient(f"127.0.0.1:{upstream.grpc_port}")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    try:
        up, meta = direct.get_model_metadata(MODEL), client.get_model_metadata(MODEL)
        assert meta.name == MODEL
        assert list(meta.versions) == list(up.versions)
        assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == \
               [(i.name, i.datatype, list(i.shape)) for i in up.inputs]
        assert [o.name for o in meta.outputs] == ["probabilities"]
        assert {o.name for o in up.outputs} == {"probabilities", "logits"}
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert not client.is_model_ready("no-such-model")
    finally:
        direct.close()
        client.close()


def kserve_client(port: int, x: np.ndarray, tmp_path) -> dict:
    """KServe's InferenceGRPCClient (in .venv-kserve) against 127.0.0.1:port: a raw and a typed request."""
    rows_file, out = tmp_path / "rows.npy", tmp_path / "answer.npz"
    np.save(rows_file, x)
    cmd = [str(venv_python("kserve")), str(ROOT / "tests" / "integration" / "clients" / "kserve_client.py"),
           f"127.0.0.1:{port}", MODEL, "input", str(rows_file), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(np.load(out))


def test_kserve_client_gets_the_defended_answer_raw_and_typed(sidecar, target_rows, tmp_path):
    expected = infer(sidecar.port, target_rows).as_numpy("probabilities")
    answer = kserve_client(sidecar.port, target_rows, tmp_path)
    assert bool(answer["ready"])
    assert sorted(answer) == ["raw_id", "raw_model_version", "raw_probabilities", "ready", "typed_id",
                              "typed_model_version", "typed_probabilities"]  # no logits either way
    for kind in ("raw", "typed"):
        assert str(answer[f"{kind}_id"]) == f"kserve-{kind}"
        np.testing.assert_allclose(answer[f"{kind}_probabilities"].reshape(expected.shape), expected, rtol=1e-6)


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _wait_for(predicate, timeout: float = 60.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def test_upstream_outage_is_unavailable_then_recovers(upstream, sidecar, target_rows):
    """Stops the module's model server, then starts it again on the same ports."""
    before = infer(sidecar.port, target_rows).as_numpy("probabilities")
    pgid = upstream.proc.pid
    upstream.stop()
    with pytest.raises(ProcessLookupError):  # the whole group is gone (tritonserver outlives its parent)
        os.killpg(pgid, 0)
    try:
        with pytest.raises(InferenceServerException) as info:
            infer(sidecar.port, target_rows)
        assert "UNAVAILABLE" in str(info.value.status())
        assert _wait_for(lambda: _health(sidecar.port) == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
    finally:
        upstream.start()
    assert _wait_for(lambda: _health(sidecar.port) == health_pb2.HealthCheckResponse.SERVING, 30)

    def answer():
        try:
            return [infer(sidecar.port, target_rows).as_numpy("probabilities")]
        except InferenceServerException:
            return None

    recovered = _wait_for(answer, 30)
    assert recovered is not None
    np.testing.assert_allclose(recovered[0], before, rtol=1e-6)


def test_perf_analyzers_call_sequence_with_tritonclient(upstream, sidecar, target_rows):
    """What perf_analyzer does before it measures (ServerLive, ModelMetadata, ModelConfig, then
    ModelInfer with its shapes), with tritonclient; the sidecar's ModelConfig is synthesized from
    the description the model check took, and against Triton it agrees with Triton's own (its
    max_batch_size, inputs and dims) reduced to the served output."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    direct = grpcclient.InferenceServerClient(f"127.0.0.1:{upstream.grpc_port}")
    try:
        assert client.is_server_live()
        meta = client.get_model_metadata(MODEL)
        config = client.get_model_config(MODEL).config
        assert config.name == MODEL
        assert [o.name for o in config.output] == ["probabilities"]
        assert [i.name for i in config.input] == [i.name for i in meta.inputs] == ["input"]
        assert config.max_batch_size > 0  # a batching model: dims without the row dimension
        assert list(config.input[0].dims) == list(meta.inputs[0].shape[1:]) == [64]
        assert list(config.output[0].dims) == [10]
        assert config.max_batch_size <= sidecar.settings.max_request_rows
        if upstream.name == "triton":
            own = direct.get_model_config(MODEL).config
            assert config.max_batch_size == min(own.max_batch_size, sidecar.settings.max_request_rows)
            assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == \
                   [(i.name, i.data_type, list(i.dims)) for i in own.input]
            assert {o.name for o in own.output} == {"probabilities", "logits"}
            assert not config.instance_group and not config.parameters  # nothing else of Triton's config
        # perf_analyzer's request: -b rows of dims, with the shapes the config announced
        rows = target_rows[: min(4, config.max_batch_size)]
        inp = grpcclient.InferInput(config.input[0].name, [len(rows), *config.input[0].dims], "FP32")
        inp.set_data_from_numpy(rows)
        got = client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput(config.output[0].name)])
        assert got.as_numpy("probabilities").shape == (len(rows), *config.output[0].dims)
    finally:
        client.close()
        direct.close()


def test_advertised_versions_are_served_and_agree(upstream, sidecar, target_rows):
    """The version the upstream advertises (Triton: "1", KServe: none) is accepted without
    --model-version, forwarded, and metadata, readiness and inference say the same."""
    direct = grpcclient.InferenceServerClient(f"127.0.0.1:{upstream.grpc_port}")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    try:
        advertised = list(direct.get_model_metadata(MODEL).versions)
        assert list(client.get_model_metadata(MODEL).versions) == advertised
        for version in advertised:
            assert client.is_model_ready(MODEL, version)
            assert list(client.get_model_metadata(MODEL, version).versions) == advertised
            inp = grpcclient.InferInput("input", list(target_rows.shape), "FP32")
            inp.set_data_from_numpy(target_rows)
            answer = client.infer(MODEL, [inp], model_version=version)
            assert answer.get_response().model_version == version
            np.testing.assert_allclose(answer.as_numpy("probabilities"),
                                       infer(sidecar.port, target_rows).as_numpy("probabilities"), rtol=1e-6)
        assert not client.is_model_ready(MODEL, "999")
        with pytest.raises(InferenceServerException, match="999"):
            client.get_model_metadata(MODEL, "999")
        inp = grpcclient.InferInput("input", list(target_rows.shape), "FP32")
        inp.set_data_from_numpy(target_rows)
        with pytest.raises(InferenceServerException, match="999"):
            client.infer(MODEL, [inp], model_version="999")
    finally:
        direct.close()
        client.close()


def test_perf_analyzer_measures_through_the_sidecar(upstream, sidecar, tmp_path):
    """The real perf_analyzer binary (`make perf-analyzer`; skipped without it) completes a short
    measurement against the sidecar: it needs ModelConfig and the shapes it announces."""
    if not PERF_ANALYZER.exists():
        pytest.skip(f"{PERF_ANALYZER} is missing: run `make perf-analyzer`")
    export = tmp_path / "export.json"
    done = subprocess.run([str(PERF_ANALYZER), "-m", MODEL, "-u", f"127.0.0.1:{sidecar.port}", "-i", "grpc",
                           "-b", "2", "--concurrency-range", "2", "--measurement-mode", "count_windows",
                           "--measurement-request-count", "50", "--max-trials", "3", "--stability-percentage", "1000",
                           "--profile-export-file", str(export)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    requests = json.loads(export.read_text())["experiments"][0]["requests"]
    assert len(requests) >= 50 and all(r.get("response_timestamps") for r in requests)


def http_infer(port, x, binary: bool):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        return client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("probabilities",
                                                                                  binary_data=binary)])
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_rest_clients_get_the_defended_answer(upstream, sidecar, target_rows, binary):
    """tritonclient.http through the sidecar's REST front, gRPC upstream: the gRPC client's answer."""
    expected = infer(sidecar.port, target_rows).as_numpy("probabilities")
    got = http_infer(sidecar.http_port, target_rows, binary).as_numpy("probabilities")
    np.testing.assert_array_equal(got, expected)


def test_a_rest_upstream_is_defended_alike(upstream, sidecar, rest_sidecar, target_rows):
    """--upstream http://...: the same defended answers over gRPC, REST and streams, metadata
    and readiness from the REST upstream, logits still refused."""
    expected = infer(sidecar.port, target_rows).as_numpy("probabilities")
    np.testing.assert_allclose(infer(rest_sidecar.port, target_rows).as_numpy("probabilities"), expected, rtol=1e-6)
    np.testing.assert_allclose(http_infer(rest_sidecar.http_port, target_rows, True).as_numpy("probabilities"),
                               expected, rtol=1e-6)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{rest_sidecar.port}")
    try:
        assert client.is_model_ready(MODEL)
        meta = client.get_model_metadata(MODEL)
        assert [o.name for o in meta.outputs] == ["probabilities"] and meta.inputs[0].name == "input"
        assert client.get_model_config(MODEL).config.max_batch_size > 0
    finally:
        client.close()
    with pytest.raises(InferenceServerException, match="logits"):
        infer(rest_sidecar.port, target_rows, ["logits"])


def test_stream_infer_through_real_servers(upstream, sidecar, target_rows):
    import queue

    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(4):
            inp = grpcclient.InferInput("input", [1, 64], "FP32")
            inp.set_data_from_numpy(target_rows[i:i + 1])
            client.async_stream_infer(MODEL, [inp], request_id=str(i))
        got = [answers.get(timeout=60) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    expected = infer(sidecar.port, target_rows[:4]).as_numpy("probabilities")
    assert all(e is None for _, e in got), [str(e) for _, e in got]
    for result, _ in got:
        i = int(result.get_response().id)
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], expected[i], rtol=1e-6)


@pytest.mark.parametrize("mode", ["http", "grpc-streaming"])
def test_perf_analyzer_over_http_and_streaming(upstream, sidecar, tmp_path, mode):
    """perf_analyzer -i http (through the REST front) and -i grpc --streaming (ModelStreamInfer)."""
    if not PERF_ANALYZER.exists():
        pytest.skip(f"{PERF_ANALYZER} is missing: run `make perf-analyzer`")
    export = tmp_path / "export.json"
    port = sidecar.http_port if mode == "http" else sidecar.port
    protocol = ["-i", "http"] if mode == "http" else ["-i", "grpc", "--streaming"]
    done = subprocess.run([str(PERF_ANALYZER), "-m", MODEL, "-u", f"127.0.0.1:{port}", *protocol,
                           "-b", "2", "--concurrency-range", "2", "--measurement-mode", "count_windows",
                           "--measurement-request-count", "50", "--max-trials", "3", "--stability-percentage", "1000",
                           "--profile-export-file", str(export)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    requests = json.loads(export.read_text())["experiments"][0]["requests"]
    assert len(requests) >= 50 and all(r.get("response_timestamps") for r in requests)


def test_kserve_rest_client_gets_the_defended_answer(sidecar, target_rows, tmp_path):
    expected = infer(sidecar.port, target_rows).as_numpy("probabilities")
    answer = kserve_rest_client(sidecar.http_port, MODEL, target_rows, tmp_path)
    assert bool(answer["ready"])
    assert sorted(k for k in answer if k.endswith("probabilities")) == ["binary_probabilities", "json_probabilities"]
    assert not any(k.endswith("logits") for k in answer)
    for kind in ("json", "binary"):
        assert str(answer[f"{kind}_id"]) == f"kserve-{kind}"
        np.testing.assert_allclose(answer[f"{kind}_probabilities"].reshape(expected.shape), expected, rtol=1e-6)


def test_audit_sized_requests_pass(upstream, sidecar, digits_target):
    """The recipes' servers take the audit's 512-row requests (Triton's max batch was 256)."""
    X, _ = digits_target.role("eval_members")
    rows = np.ascontiguousarray(np.resize(X, (512, X.shape[1])), np.float32)
    assert infer(sidecar.port, rows).as_numpy("probabilities").shape == (512, 10)
