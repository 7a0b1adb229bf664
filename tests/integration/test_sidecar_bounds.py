"""Callers without the token are bounded: health Watch streams, health calls that never send their
message, request ids, log lines, the metrics port (its paths, idle connections), and port clashes
at start-up (issue 21, item 6)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from oip_fake import FakeUpstream, infer_request

from purifier.serve_process import ServeProcess, ServerStartError, free_port
from purifier_server._proto import grpc_service_pb2 as pb
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.health import MAX_PENDING
from purifier_server.metrics import MetricsServer
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


@pytest.fixture
def guarded(tmp_path, flatten_cls):
    """A sidecar with a bearer token and small limits (4 inference calls, 2 Watch streams) in front
    of a fake upstream, with a metrics endpoint; yields the Sidecar."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    upstream = FakeUpstream(width=4).start()
    defense = flatten_cls()
    defense.n_classes = 4
    settings = Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "metrics_port": 0,
                                 "auth_token_file": str(tmp_path / "token"), "max_concurrent_rpcs": 4,
                                 "max_watch_streams": 2}, env={})
    try:
        with BackgroundSidecar(settings, defense=defense) as sc:
            yield sc
    finally:
        upstream.stop()


async def _header_only_streams_then_authorized_calls(sc, method: str, streams: int) -> tuple[list[str], int]:
    """Open `streams` calls of `method` that send headers and never a message (no token), on the
    connection authorized callers use too; then three authorized ModelInfer calls and one health
    Check: (the outcomes, "OK" or the status; the most health calls waiting for a message)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
        never = asyncio.Event()

        async def no_message():
            await never.wait()
            yield b""

        open_stream = channel.stream_stream(f"/grpc.health.v1.Health/{method}")
        held = [open_stream(no_message()) for _ in range(streams)]
        await asyncio.sleep(1.0)                        # let the server see every stream's headers
        pending = sc.health.pending
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        outcomes = []
        for _ in range(3):
            try:
                await infer(infer_request(np.ones((1, 4), np.float32), model="m"),
                            metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
                outcomes.append("OK")
            except grpc.aio.AioRpcError as e:
                outcomes.append(e.code().name)
        try:
            await check(b"", timeout=10)
            outcomes.append("health OK")
        except grpc.aio.AioRpcError as e:
            outcomes.append(f"health {e.code().name}")
        for call in held:
            call.cancel()
        return outcomes, pending


@pytest.mark.parametrize("method", ["Check", "Watch"])
def test_header_only_health_streams_without_the_token_do_not_take_the_inference_slots(guarded, method):
    """Before (a red-team review): gRPC reads a unary-request method's message before any handler
    runs, so health Check and Watch streams that send headers and never a message sat in gRPC's
    server-wide cap (max_concurrent_rpcs + max_watch_streams + 64, here 70) forever, never reaching
    the Watch limit or lifetime, and every authorized ModelInfer and health Check got
    RESOURCE_EXHAUSTED. Now health reads its own message (at most MAX_PENDING callers wait for one)
    and inference is admitted by the data plane alone."""
    outcomes, pending = asyncio.run(_header_only_streams_then_authorized_calls(guarded, method, streams=80))
    assert outcomes == ["OK", "OK", "OK", "health OK"], (
        f"80 health {method} streams without a token or a message left authorized callers with {outcomes}")
    assert pending <= MAX_PENDING


def test_idle_metrics_connections_do_not_hold_a_thread_each_nor_keep_a_scraper_out(guarded):
    """Before (a red-team review): the metrics endpoint (bound to 0.0.0.0 by the Dockerfile) answered
    each connection on a thread of its own, with no read timeout and no cap. Now idle connections
    cost no thread, and past MetricsServer.MAX_CONNECTIONS a new one closes the oldest idle one."""
    before = threading.active_count()
    idle = []
    try:
        for _ in range(MetricsServer.MAX_CONNECTIONS + 36):
            sock = socket.create_connection(("127.0.0.1", guarded.metrics_port), timeout=5)
            sock.sendall(b"GET /metr")                  # a request line that never ends
            idle.append(sock)
        scrape = socket.create_connection(("127.0.0.1", guarded.metrics_port), timeout=5)
        with scrape:
            scrape.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert scrape.recv(12).startswith(b"HTTP/1.0 200")
        held = threading.active_count() - before
        assert guarded._metrics_server.connections <= MetricsServer.MAX_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()
    assert held < 8, f"{len(idle)} idle connections to the metrics port hold {held} threads of the sidecar"
