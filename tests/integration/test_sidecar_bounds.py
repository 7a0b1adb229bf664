"""Callers without the token are bounded: health Watch streams, request ids, log lines, the
metrics port, and port clashes at start-up (issue 21, item 6)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from purifier.serve_process import ServeProcess, ServerStartError, free_port
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
TOKEN = "bounds-test-token-0123456789"


def digits_request(rows: int = 1, request_id: str = "r", model: str = "digits") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    req.raw_input_contents.append(np.zeros((rows, 64), np.float32).tobytes())
    return req


def test_open_health_watch_streams_never_take_the_slots_inference_needs(digits_target, tmp_path):
    """Before: 140 Watch streams opened without the token took every max_concurrent_rpcs slot and
    every authorized ModelInfer got RESOURCE_EXHAUSTED until they closed."""
    (tmp_path / "token").write_text(TOKEN)
    settings = Settings.resolve({"model": str(digits_target.directory), "defense": "none", "host": "127.0.0.1",
                                 "port": 0, "http_port": 0, "metrics_port": -1, "auth_token_file": str(tmp_path / "token")}, env={})
    opened, refused, lock = [], [], threading.Lock()

    def watch(stream):
        try:
            for _ in stream:
                with lock:
                    opened.append(stream)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                with lock:
                    refused.append(e.code())

    with BackgroundSidecar(settings) as sc:
        channels = [grpc.insecure_channel(f"127.0.0.1:{sc.port}") for _ in range(4)]
        streams = [health_pb2_grpc.HealthStub(channels[i % 4]).Watch(health_pb2.HealthCheckRequest(service=""))
                   for i in range(140)]
        try:
            for s in streams:
                threading.Thread(target=watch, args=(s,), daemon=True).start()
            deadline = time.monotonic() + 60
            while len(opened) + len(refused) < 140 and time.monotonic() < deadline:
                time.sleep(0.05)
            stub = pb_grpc.GRPCInferenceServiceStub(channels[0])
            for _ in range(5):   # while every Watch stream that was let in is still open
                resp = stub.ModelInfer(digits_request(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),))
                assert resp.outputs[0].name == "probabilities"
            watchers = sc.health.watchers
        finally:
            for s in streams:
                s.cancel()
            for ch in channels:
                ch.close()
    assert len(opened) == watchers == 16 and refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 124  # the default


def test_a_watch_stream_ends_after_its_lifetime(digits_target):
    settings = Settings.resolve({"model": str(digits_target.directory), "defense": "none", "host": "127.0.0.1",
                                 "port": 0, "http_port": 0, "metrics_port": -1, "watch_max_s": 0.5}, env={})
    with BackgroundSidecar(settings) as sc, grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        statuses = [r.status for r in stream]         # ends by itself, status OK (no exception)
        assert statuses == [health_pb2.HealthCheckResponse.SERVING]
        assert sc.health.watchers == 0


def test_long_request_ids_are_refused_and_repeated_failures_do_not_flood_the_log(digits_target, tmp_path):
    """Before: a failing request with a 1 MB id wrote 1 MB to the log, per request."""
    with ServeProcess(["--model", str(digits_target.directory), "--defense", "none"],
                      log_path=tmp_path / "serve.log") as proc, grpc.insecure_channel(proc.endpoint) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        start = time.monotonic()
        codes = []
        for i in range(40):
            try:
                stub.ModelInfer(digits_request(request_id="x" * (1 << 20)), timeout=30)
            except grpc.RpcError as e:
                codes.append(e.code())
                if i == 0:
                    assert e.details() == f"the request id has {1 << 20} characters; the limit is 256"
        for _ in range(160):                                         # the same failure, short ids
            try:
                stub.ModelInfer(digits_request(model="nope"), timeout=30)
            except grpc.RpcError as e:
                codes.append(e.code())
        elapsed = time.monotonic() - start
        assert stub.ModelInfer(digits_request(request_id="y" * 256), timeout=30).id == "y" * 256
        log = proc.log_text()
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 40 + [grpc.StatusCode.NOT_FOUND] * 160
    assert len(log) < 64 << 10, len(log)                                  # 40 MB before
    failed = [json.loads(line) for line in log.splitlines() if '"request failed' in line]
    assert all(len(line) < 2048 for line in log.splitlines())
    by_code = {c: [e for e in failed if e["code"] == c] for c in ("INVALID_ARGUMENT", "NOT_FOUND")}
    for code, sent in (("INVALID_ARGUMENT", 40), ("NOT_FOUND", 160)):
        lines = by_code[code]
        # a burst of 20 per kind, then one a second; what is held back is counted on the next line
        assert 1 <= len(lines) <= 20 + elapsed + 1
        assert len(lines) + sum(e.get("suppressed", 0) for e in lines) <= sent
    assert len(by_code["NOT_FOUND"]) < 160


def test_the_metrics_port_answers_metrics_only(digits_target):
    """Before: any path gave 200 and the metrics text, so GET /v2/models/X/ready there "was ready"."""
    settings = Settings.resolve({"model": str(digits_target.directory), "defense": "none", "host": "127.0.0.1",
                                 "port": 0, "http_port": 0, "metrics_port": 0}, env={})
    with BackgroundSidecar(settings) as sc:
        base = f"http://127.0.0.1:{sc.metrics_port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            assert r.status == 200 and b"purifier_requests_total" in r.read()
        for path in ("/", "/v2/models/NOSUCHMODEL/ready", "/v2/health/ready", "/metrics/x", "/metricsx"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(base + path, timeout=10)
            assert info.value.code == 404, path


@pytest.mark.parametrize("which", ["metrics", "grpc"])
def test_a_port_in_use_is_one_line_naming_the_flag(digits_target, tmp_path, which):
    """Before: a second sidecar on the default metrics port logged "serving" and died with a 30-line
    traceback."""
    args = ["--model", str(digits_target.directory), "--defense", "none"]
    metrics = str(free_port())
    with ServeProcess([*args, "--metrics-port", metrics], log_path=tmp_path / "first.log") as first:
        clash = ["--metrics-port", metrics] if which == "metrics" else ["--port", str(first.port)]
        second = ServeProcess([*args, *clash], log_path=tmp_path / "second.log", ready_timeout_s=60)
        try:
            with pytest.raises(ServerStartError) as info:
                second.start()
        finally:
            second.stop(timeout_s=5)
    assert info.value.returncode == 2
    log = info.value.log.strip().splitlines()
    line = log[-1]
    assert "Traceback" not in info.value.log and not any('"msg": "serving"' in entry for entry in log)
    flag = "--metrics-port" if which == "metrics" else "--port"
    assert line.startswith(f"purifier: error: {'metrics_port' if which == 'metrics' else 'port'}: cannot listen on "
                           "127.0.0.1:") and f"choose another with {flag}" in line
