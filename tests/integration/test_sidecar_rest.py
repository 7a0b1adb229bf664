"""The REST front and gRPC streaming against the sidecar with the embedded ONNX backend, with real clients.

tritonclient.http (JSON and binary tensors), plain HTTP (http.client, as curl or `requests`
would), tritonclient.grpc's `stream_infer`, and the Prometheus text of the `nv_inference_*`
aliases. Every answer is the same defended vector a gRPC unary call gets; client mistakes are
400s with one line naming the problem, never 500; the bearer token and TLS of the gRPC port hold
for the REST port too.
"""

from __future__ import annotations

import gzip
import http.client
import json
import queue
import ssl
import urllib.request

import numpy as np
import pytest
from fronts import call_stream, http_request, rest_body
from model_servers import ROOT, kserve_rest_client
from oip_fake import infer_request
from prometheus_client.parser import text_string_to_metric_families

from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration
MAX_ROWS = 64


def settings(target, **extra) -> Settings:
    return Settings.resolve({"model": str(target.directory), "host": "127.0.0.1", "port": 0, "http_port": 0,
                             "metrics_port": 0, "health_poll_s": 0.2, "max_request_rows": MAX_ROWS, **extra}, env={})


@pytest.fixture(scope="module")
def sidecar(digits_target, flatten_cls):
    with BackgroundSidecar(settings(digits_target), defense=flatten_cls()) as sc:
        yield sc


@pytest.fixture(scope="module")
def rows(digits_target):
    X, _ = digits_target.role("eval_nonmembers")
    return np.ascontiguousarray(X[:8], dtype=np.float32)


def defended(sidecar, target, x):
    return type(sidecar.defense)().transform(target.classifier().run(x)["probabilities"])


def http_infer(port, model, x, binary: bool, **kw):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput(kw.pop("output", "probabilities"), binary_data=binary)
        return client.infer(model, [inp], outputs=[out], **kw)
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_gets_the_defended_vector(sidecar, digits_target, rows, binary):
    result = http_infer(sidecar.http_port, sidecar.model_name, rows, binary, request_id="rest-7")
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (len(rows), 10)
    np.testing.assert_array_equal(got, defended(sidecar, digits_target, rows))  # exact: JSON floats round-trip
    response = result.get_response()
    assert response["id"] == "rest-7" and response["model_name"] == sidecar.model_name
    assert [o["name"] for o in response["outputs"]] == ["probabilities"]
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary


def test_rest_and_grpc_answer_alike(sidecar, rows):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    try:
        inp = grpcclient.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        unary = client.infer(sidecar.model_name, [inp]).as_numpy("probabilities")
    finally:
        client.close()
    rest = http_infer(sidecar.http_port, sidecar.model_name, rows, binary=True).as_numpy("probabilities")
    assert rest.tobytes() == unary.tobytes()


def test_tritonclient_http_metadata_config_and_readiness(sidecar):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{sidecar.http_port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(sidecar.model_name) and client.is_model_ready(sidecar.model_name, "1")
        assert not client.is_model_ready("no-such-model") and not client.is_model_ready(sidecar.model_name, "9")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata(sidecar.model_name)
        assert [o["name"] for o in meta["outputs"]] == ["probabilities"] and meta["versions"] == ["1"]
        config = client.get_model_config(sidecar.model_name)
        assert config["max_batch_size"] == MAX_ROWS and config["input"][0]["dims"] == [64]  # numbers, not strings
        assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]
        with pytest.raises(InferenceServerException, match="not served here"):
            client.get_model_metadata("no-such-model")
    finally:
        client.close()


def post(port, body, headers=None, path="/v2/models/digits/infer"):
    status, answer_headers, answer = http_request(port, "POST", path, body, headers)
    return status, json.loads(answer) if answer_headers.get("content-type") == "application/json" else answer


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0]}]}', 400, "needs 64 values"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": ["a", "b"]}]}', 400, "numbers"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [NaN]}]}', 400, "not valid JSON"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1e39]}]}', 400, "FP32 range"),
    (b'{"inputs": [{"name": "input", "datatype": "INT8", "shape": [1, 1], "data": [300]}]}', 400, "INT8 range"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, -64], "data": []}]}', 400, "negative"),
    (b'{"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}', 400, "not supported"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "parameters": {"binary_data_size": 256}}]}',
     400, "runs past"),
    (b'{"inputs": []}', 400, "no inputs"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [99, 1], "data": []}]}', 400, "needs 99 values"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [' + b"0," * 63 + b'0]}], '
     b'"outputs": [{"name": "logits"}]}', 400, "not served"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [' + b"0," * 63 + b'0]}], '
     b'"parameters": {"classification": 3}}', 400, "classification"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [65, 64], "data": [' + b"0," * (65 * 64 - 1)
     + b'0]}]}', 429, "max_request_rows"),
])
def test_bad_requests_are_4xx_naming_the_problem(sidecar, body, status, message):
    got, answer = post(sidecar.http_port, body)
    assert got == status, answer
    assert message in answer["error"]


def test_binary_header_length_is_checked(sidecar, rows):
    body, headers = rest_body(_named(infer_request(rows[:1], model=sidecar.model_name)), binary=True)
    for bad in ("abc", str(len(body) + 1), "-1"):
        got, answer = post(sidecar.http_port, body, {**headers, "Inference-Header-Content-Length": bad})
        assert got == 400 and "Inference-Header-Content-Length" in answer["error"]
    got, answer = post(sidecar.http_port, body + b"\0" * 4, headers)
    assert got == 400 and "after the last binary input" in answer["error"]


def test_routes_methods_and_unknown_models(sidecar):
    port = sidecar.http_port
    assert http_request(port, "GET", "/v2/health/live")[0] == 200
    assert http_request(port, "GET", "/v2/health/ready")[0] == 200
    assert http_request(port, "GET", "/v2/models/digits/ready")[0] == 200
    assert http_request(port, "GET", "/v2/models/digits/versions/1/ready")[0] == 200
    assert http_request(port, "GET", "/v2/models/NOSUCHMODEL/ready")[0] == 404   # never "ready" for any path
    assert http_request(port, "GET", "/v2/models/digits/versions/7/ready")[0] == 404
    assert http_request(port, "GET", "/metrics")[0] == 404
    assert http_request(port, "GET", "/v2/models/digits/repository/index")[0] == 404
    assert http_request(port, "POST", "/v2/repository/index", b"{}")[0] == 404
    assert http_request(port, "GET", "/v2/models/digits/infer")[0] == 405
    assert http_request(port, "POST", "/v2/models/digits/ready", b"")[0] == 405
    status, _, body = http_request(port, "POST", "/v2/models/other/infer", b'{"inputs": []}')
    assert status == 404 and "not served here" in json.loads(body)["error"]


def test_compressed_bodies_are_inflated_within_the_limit(digits_target, flatten_cls, rows):
    s = settings(digits_target, max_request_bytes=200_000)
    with BackgroundSidecar(s, defense=flatten_cls()) as sc:
        body, headers = rest_body(_named(infer_request(rows, model=sc.model_name)), binary=False)
        status, answer = post(sc.http_port, gzip.compress(body), {**headers, "Content-Encoding": "gzip"})
        assert status == 200, answer
        assert len(answer["outputs"][0]["data"]) == len(rows) * 10
        bomb = gzip.compress(b" " * 50_000_000)   # 50 MB of spaces in 49 KB: refused at 200 KB
        status, answer = post(sc.http_port, bomb, {"Content-Encoding": "gzip"})
        assert status == 413 and "max_request_bytes" in answer["error"]
        status, answer = post(sc.http_port, b"x" * 300_000)
        assert status == 413
        status, answer = post(sc.http_port, body, {"Content-Encoding": "br"})
        assert status == 400 and "Content-Encoding" in answer["error"]


def test_bearer_token_and_tls_hold_on_the_rest_port(digits_target, flatten_cls, pki, rows):
    s = settings(digits_target, auth_token_file=str(pki / "token"), tls_cert_file=str(pki / "server.pem"),
                 tls_key_file=str(pki / "server.key"))
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    token = (pki / "token").read_text().strip()
    with BackgroundSidecar(s, defense=flatten_cls()) as sc:
        url = f"https://127.0.0.1:{sc.http_port}"
        with urllib.request.urlopen(f"{url}/v2/health/ready", context=context, timeout=10) as r:
            assert r.status == 200                                  # health stays open
        body, headers = rest_body(_named(infer_request(rows, model=sc.model_name)), binary=True)
        for auth in (None, "Bearer wrong-token-0123456789", f"Basic {token}"):
            request = urllib.request.Request(f"{url}/v2/models/{sc.model_name}/infer", data=body,
                                             headers={**headers, **({"Authorization": auth} if auth else {})})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, context=context, timeout=10)
            assert info.value.code == 401
        client = httpclient.InferenceServerClient(f"127.0.0.1:{sc.http_port}", ssl=True,
                                                  ssl_context_factory=lambda: context)
        try:
            inp = httpclient.InferInput("input", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows)
            got = client.infer(sc.model_name, [inp], headers={"Authorization": f"Bearer {token}"})
            assert got.as_numpy("probabilities").shape == (len(rows), 10)
        finally:
            client.close()
        with pytest.raises((http.client.HTTPException, OSError)):  # plain HTTP on the TLS port
            http_request(sc.http_port, "GET", "/v2/health/live", timeout=5)


def test_the_rest_front_can_be_off(digits_target, flatten_cls):
    with BackgroundSidecar(settings(digits_target, http_port=-1), defense=flatten_cls()) as sc:
        assert sc.http_port is None


# --- streaming --------------------------------------------------------------------------------------

def test_stream_infer_gets_the_unary_answers_and_errors_per_request(sidecar, digits_target, rows):
    good = [_named(infer_request(rows[i:i + 2], model=sidecar.model_name, request_id=f"s{i}")) for i in range(0, 8, 2)]
    bad = pb.ModelInferRequest()
    bad.CopyFrom(good[0])
    bad.id = "bad"
    bad.outputs.add(name="logits")
    seen = {s.id: s for s in call_stream(sidecar.port, [good[0], bad, *good[1:]])}
    assert sorted(seen) == ["bad", "s0", "s2", "s4", "s6"]
    assert seen["bad"].code is not None and "not served" in seen["bad"].message and not seen["bad"].extra
    for i in range(0, 8, 2):
        np.testing.assert_array_equal(seen[f"s{i}"].outputs["probabilities"],
                                      defended(sidecar, digits_target, rows[i:i + 2]))


def test_tritonclient_stream_infer(sidecar, digits_target, rows):
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{sidecar.port}")
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(len(rows)):
            inp = grpcclient.InferInput("input", [1, 64], "FP32")
            inp.set_data_from_numpy(rows[i:i + 1])
            client.async_stream_infer(sidecar.model_name, [inp], request_id=str(i))
        inp = grpcclient.InferInput("input", [MAX_ROWS + 1, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((MAX_ROWS + 1, 64), np.float32))
        client.async_stream_infer(sidecar.model_name, [inp], request_id="too-many")
        got = [answers.get(timeout=30) for _ in range(len(rows) + 1)]
    finally:
        client.stop_stream()
        client.close()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "max_request_rows" in errors[0].message()
    by_id = {r.get_response().id: r.as_numpy("probabilities") for r, e in got if e is None}
    expected = defended(sidecar, digits_target, rows)
    for i in range(len(rows)):
        np.testing.assert_allclose(by_id[str(i)][0], expected[i], rtol=1e-6)


# --- metrics ----------------------------------------------------------------------------------------

def test_triton_metric_aliases_count_requests_from_every_front(sidecar, rows):
    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=10) as r:
            families = text_string_to_metric_families(r.read().decode())
            return {s.name: s for f in families for s in f.samples if s.name.startswith("nv_inference")}

    before = scrape()
    http_infer(sidecar.http_port, sidecar.model_name, rows, binary=False)
    call_stream(sidecar.port, [_named(infer_request(rows[:3], model=sidecar.model_name))])
    post(sidecar.http_port, b"{broken")
    after = scrape()
    assert after["nv_inference_request_success"].labels == {"model": sidecar.model_name, "version": "1"}
    delta = {k: after[k].value - before[k].value for k in after}
    assert delta["nv_inference_request_success"] == 2 and delta["nv_inference_request_failure"] == 1
    assert delta["nv_inference_count"] == len(rows) + 3
    assert delta["nv_inference_exec_count"] >= 2 and delta["nv_inference_request_duration_us"] > 0


def _named(request):
    request.inputs[0].name = "input"
    return request


def test_the_rest_listener_is_a_tcp_socket_so_answers_are_not_delayed(sidecar):
    """asyncio sets TCP_NODELAY only on sockets whose protocol says TCP; a socket made with proto 0
    held every two-part answer for the client's delayed ACK (40 ms a request)."""
    import socket

    assert sidecar._http._socket.proto == socket.IPPROTO_TCP


def test_kserve_rest_client(sidecar, digits_target, rows, tmp_path):
    answer = kserve_rest_client(sidecar.http_port, sidecar.model_name, rows, tmp_path)
    assert bool(answer["ready"])
    for kind in ("json", "binary"):
        assert str(answer[f"{kind}_id"]) == f"kserve-{kind}"
        np.testing.assert_allclose(answer[f"{kind}_probabilities"].reshape(len(rows), 10),
                                   defended(sidecar, digits_target, rows), rtol=1e-6)


@pytest.mark.parametrize("mode", ["grpc", "http", "grpc-streaming"])
def test_perf_analyzer_over_http_and_streaming(sidecar, tmp_path, mode):
    """perf_analyzer -i grpc, -i http and -i grpc --streaming against the embedded model (`make perf-analyzer`)."""
    import subprocess

    perf_analyzer = ROOT / "build" / "perf-analyzer" / "perf_analyzer"
    if not perf_analyzer.exists():
        pytest.skip(f"{perf_analyzer} is missing: run `make perf-analyzer`")
    export = tmp_path / "export.json"
    port = sidecar.http_port if mode == "http" else sidecar.port
    protocol = {"grpc": ["-i", "grpc"], "http": ["-i", "http"], "grpc-streaming": ["-i", "grpc", "--streaming"]}[mode]
    done = subprocess.run([str(perf_analyzer), "-m", sidecar.model_name, "-u", f"127.0.0.1:{port}", *protocol,
                           "-b", "2", "--concurrency-range", "2", "--measurement-mode", "count_windows",
                           "--measurement-request-count", "50", "--max-trials", "3", "--stability-percentage", "1000",
                           "--profile-export-file", str(export)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    requests = json.loads(export.read_text())["experiments"][0]["requests"]
    assert len(requests) >= 50 and all(r.get("response_timestamps") for r in requests)


def test_a_taken_rest_port_is_one_line_naming_the_flag(sidecar, digits_target, flatten_cls):
    from purifier.errors import ConfigError

    with pytest.raises(ConfigError, match="http_port: cannot listen on .*--http-port"):
        with BackgroundSidecar(settings(digits_target, http_port=sidecar.http_port), defense=flatten_cls()):
            pass


def test_mutual_tls_holds_on_the_rest_port(digits_target, flatten_cls, pki):
    s = settings(digits_target, tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"),
                 tls_client_ca_file=str(pki / "ca.pem"))
    with BackgroundSidecar(s, defense=flatten_cls()) as sc:
        url = f"https://127.0.0.1:{sc.http_port}/v2/health/live"
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, context=anonymous, timeout=10).read()
        client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        client.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        with urllib.request.urlopen(url, context=client, timeout=10) as r:
            assert r.status == 200
