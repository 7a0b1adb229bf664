"""A malicious REST upstream (`--upstream http://...`): its answers are validated like a gRPC upstream's.

`HostileRestUpstream` is a plain HTTP server (http.server) answering `POST .../infer` with a
fault built from the clean vector `softmax(x)` of the request: clean values in error bodies,
headers, parameters, extra outputs, strings, wrong counts, wrong datatypes, broken binary
framing, a cut connection, an answer larger than the sidecar reads. Through every front
(`fronts.FRONTS`), no clean value reaches the client, and the outcome is the defended answer or
the expected error.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest
from fronts import FRONTS, outcome_matches
from fronts import call as front_call
from oip_fake import infer_request, softmax
from test_malicious_upstream import assert_no_clean_value, text

from purifier_server import rest_upstream
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
C = 4
X = np.random.default_rng(11).normal(0, 0.6, size=(3, C)).astype(np.float32)
INTERNAL, UNAVAILABLE, OK = grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, None
JSON = {"Content-Type": "application/json"}


def tensor(name, p, datatype="FP32", **extra):
    return {"name": name, "datatype": datatype, "shape": list(p.shape), "data": p.ravel().tolist(), **extra}


def answer(*outputs, **fields):
    return 200, JSON, json.dumps({"model_name": "m", "id": "r", "outputs": list(outputs), **fields}).encode()


def binary(p, declared=None, header_length=None):
    blob = np.ascontiguousarray(p, np.float32).tobytes()
    head = json.dumps({"model_name": "m", "outputs": [{"name": "probs", "datatype": "FP32", "shape": list(p.shape),
                                                       "parameters": {"binary_data_size": declared or len(blob)}}]})
    headers = {"Inference-Header-Content-Length": str(header_length or len(head))}
    return 200, headers, head.encode() + blob


# name -> (the upstream's answer (status, headers, body) given the clean vector, expected outcome)
FAULTS = {
    "a well-formed JSON answer": (lambda p: answer(tensor("probs", p)), OK),
    "a well-formed binary answer": (lambda p: binary(p), OK),
    "an extra output holding a clean copy": (lambda p: answer(tensor("probs", p), tensor("copy", p)), OK),
    "the clean vector in response parameters": (
        lambda p: answer(tensor("probs", p), parameters={"clean": text(p)}), OK),
    "the clean vector in output parameters": (lambda p: answer(tensor("probs", p, parameters={"c": text(p)})), OK),
    "the clean vector in a response header": (
        lambda p: (200, {**JSON, "X-Clean": text(p)}, answer(tensor("probs", p))[2]), OK),
    "the clean vector in extra JSON fields": (lambda p: answer(tensor("probs", p, clean=p.tolist()), clean=text(p)), OK),
    "HTTP 500 with the clean vector in its body": (lambda p: (500, JSON, json.dumps({"error": text(p)}).encode()),
                                                    INTERNAL),
    "HTTP 503 with the clean vector in its body": (lambda p: (503, {}, text(p).encode()), UNAVAILABLE),
    "HTTP 400 with the clean vector in its body": (lambda p: (400, {}, text(p).encode()),
                                                    grpc.StatusCode.INVALID_ARGUMENT),
    "an HTML page holding the clean vector": (lambda p: (200, {}, f"<html>{text(p)}</html>".encode()), INTERNAL),
    "NaN tokens (not JSON)": (lambda p: (200, JSON, answer(tensor("probs", p))[2].replace(b"[", b"[NaN, ", 1)),
                              INTERNAL),
    "one value too many": (lambda p: answer({**tensor("probs", p), "data": [*p.ravel().tolist(), 0.5]}), INTERNAL),
    "values as strings": (lambda p: answer({**tensor("probs", p), "data": [str(v) for v in p.ravel()]}), INTERNAL),
    "nested in the wrong shape": (lambda p: answer({**tensor("probs", p), "data": p.T.tolist()}), INTERNAL),
    "data beside binary_data_size": (
        lambda p: answer(tensor("probs", p, parameters={"binary_data_size": 48})), INTERNAL),
    "binary_data_size past the body": (lambda p: binary(p, declared=4096), INTERNAL),
    "header length past the body": (lambda p: binary(p, header_length=100_000), INTERNAL),
    "confidences declared INT64": (lambda p: answer(tensor("probs", np.round(p * 1e6).astype(np.int64), "INT64")),
                                   INTERNAL),
    "twice the rows": (lambda p: answer(tensor("probs", np.concatenate([p, p]))), INTERNAL),
    "rows that do not sum to 1": (lambda p: answer(tensor("probs", p * 0.8)), INTERNAL),
    "confidence output missing, clean under another name": (lambda p: answer(tensor("scores", p)), INTERNAL),
    "an answer larger than the sidecar reads": (lambda p: answer(tensor("probs", p), pad="x" * 300_000), INTERNAL),
    "the connection cut mid-answer": (lambda p: "cut", UNAVAILABLE),
}


class HostileRestUpstream:
    def __init__(self):
        self.fault = FAULTS["a well-formed JSON answer"][0]
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, headers, body):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.endswith("/ready"):
                    return self._send(200, {}, b"")
                meta = {"name": "m", "versions": [], "platform": "", "inputs": [], "outputs": []}
                self._send(200, JSON, json.dumps(meta).encode())

            def do_POST(self):
                head = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                t = head["inputs"][0]
                x = np.asarray(t["data"], np.float32).reshape(t["shape"])
                outer.calls += 1
                reply = outer.fault(softmax(x))
                if reply == "cut":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"outputs": [')
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._send(*reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hostile():
    upstream = HostileRestUpstream()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def sidecar(hostile, flatten_cls):
    defense = flatten_cls()
    defense.n_classes = C
    settings = Settings.resolve({"upstream": f"http://127.0.0.1:{hostile.port}", "model_name": "m",
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": 0,
                                 "metrics_port": -1, "health_poll_s": 0.2, "upstream_timeout_s": 10}, env={})
    patch = pytest.MonkeyPatch()
    patch.setattr(rest_upstream, "MAX_RESPONSE_BYTES", 200_000)
    try:
        with BackgroundSidecar(settings, defense=defense) as sc:
            deadline = time.monotonic() + 20
            while sc.readiness.refusal() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            yield sc
    finally:
        patch.undo()


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_no_clean_value_reaches_the_client(sidecar, hostile, fault, front):
    make, expected = FAULTS[fault]
    clean = softmax(X)
    hostile.fault = make
    try:
        before = hostile.calls
        seen = front_call(front, sidecar.port, sidecar.http_port, infer_request(X))
        assert hostile.calls > before
        assert_no_clean_value(seen, clean)
        assert outcome_matches(seen, front, expected), (seen.code, seen.texts)
        if expected is OK:
            assert list(seen.outputs) == ["probs"] and not seen.extra and seen.id == "r"
            np.testing.assert_allclose(seen.outputs["probs"], type(sidecar.defense)().transform(clean), rtol=1e-6)
    finally:
        hostile.fault = FAULTS["a well-formed JSON answer"][0]
