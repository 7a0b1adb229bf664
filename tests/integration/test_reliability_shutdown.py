"""SIGTERM on a real `purifier serve` process: drained within the grace period, open health Watch
streams told NOT_SERVING and ended at once so they never hold the process past grace + 1 s.

The process fronts `oip_fake.FakeUpstream` made slow, so calls are provably in flight when the
signal arrives. Within the grace period they complete with their (identity-defended) answer; a
call started after the signal is refused; past the grace period an in-flight call is cut, never
answered with something else; the process exits 0 either way.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from oip_fake import infer_request, softmax

from purifier.serve_process import ServeProcess
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
X = np.array([[0.5, -1.0, 2.0]], np.float32)
SERVICE = "inference.GRPCInferenceService"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def serve(upstream, grace: float, log_path) -> tuple[ServeProcess, int]:
    sidecar = ServeProcess(["--upstream", f"127.0.0.1:{upstream.port}", "--model-name", "m",
                            "--confidence-output", "probs", "--defense", "none", "--grace", str(grace)],
                           log_path=log_path).start()
    return sidecar, sidecar.port


def in_flight(upstream, stub, n: int, timeout: float = 30) -> list:
    """Start `n` calls and return once the upstream holds all of them."""
    seen = upstream.infer_count
    calls = [stub.ModelInfer.future(infer_request(X, request_id=f"f{i}"), timeout=timeout) for i in range(n)]
    deadline = time.monotonic() + 10
    while upstream.infer_count < seen + n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.infer_count == seen + n
    return calls


def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(upstream, tmp_path):
    proc, port = serve(upstream, grace=10.0, log_path=tmp_path / "serve.log")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(infer_request(X), timeout=10)  # connected and serving
            upstream.delay = 2.0
            calls = in_flight(upstream, stub, 4)
            signalled = time.monotonic()
            proc.signal(signal.SIGTERM)
            time.sleep(0.5)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as fresh:
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.GRPCInferenceServiceStub(fresh).ModelInfer(infer_request(X), timeout=3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not any(c.done() for c in calls)               # the refusal happened while they ran
            for i, call in enumerate(calls):
                resp = call.result(timeout=15)
                assert resp.id == f"f{i}"
                got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(X.shape)
                np.testing.assert_allclose(got, softmax(X), rtol=1e-6)  # identity defense
        assert proc.wait(15) == 0
        assert time.monotonic() - signalled < 10.0 + 5.0
        assert '"msg": "sidecar stopped"' in proc.log_text()
    finally:
        upstream.delay = 0.0
        proc.stop(timeout_s=5)


def test_calls_longer_than_the_grace_period_are_cut_not_answered(upstream, tmp_path):
    proc, port = serve(upstream, grace=0.5, log_path=tmp_path / "serve.log")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(infer_request(X), timeout=10)
            upstream.delay = 4.0
            calls = in_flight(upstream, stub, 2)
            signalled = time.monotonic()
            proc.signal(signal.SIGTERM)
            codes = []
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call.result(timeout=15)
                codes.append(info.value.code())
            cut_after = time.monotonic() - signalled
        assert proc.wait(15) == 0
        print(f"\ncut after {cut_after:.2f} s with {[c.name for c in codes]}")
        assert cut_after < 4.0                                   # before the upstream would have answered
        assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
    finally:
        upstream.delay = 0.0
        proc.stop(timeout_s=5)


@pytest.mark.parametrize("in_flight_calls", [0, 2])
def test_sigterm_with_health_watch_streams_open_exits_within_grace_plus_one_second(upstream, in_flight_calls, tmp_path):
    """Before: each Watch stream was only cancelled at the end of the grace period, and shutdown took
    about twice the grace period (~10 s at grace 5, 12.7 s under load)."""
    grace = 3.0
    proc, port = serve(upstream, grace=grace, log_path=tmp_path / "serve.log")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            streams = [health.Watch(health_pb2.HealthCheckRequest(service=s)) for s in ("", "", SERVICE)]
            seen: list[list] = [[] for _ in streams]

            def read(i):
                try:
                    for message in streams[i]:
                        seen[i].append(message.status)
                except grpc.RpcError as e:
                    seen[i].append(e.code())

            readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(streams))]
            for t in readers:
                t.start()
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(infer_request(X), timeout=10)
            calls = []
            if in_flight_calls:
                upstream.delay = grace / 2          # finishes inside the grace period
                calls = in_flight(upstream, stub, in_flight_calls)
            deadline = time.monotonic() + 10
            while not all(s and s[-1] == SERVING for s in seen) and time.monotonic() < deadline:
                time.sleep(0.02)
            signalled = time.monotonic()
            proc.signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            took = time.monotonic() - signalled
            for call in calls:
                assert call.result(timeout=5).id.startswith("f")   # drained, answered
            for t in readers:
                t.join(timeout=5)
        print(f"\nexit {took:.2f} s after SIGTERM at grace {grace} with {in_flight_calls} calls in flight")
        assert took <= grace + 1.0
        assert all(s[:2] == [SERVING, NOT_SERVING] and len(s) == 2 for s in seen), seen  # told, then ended (OK)
    finally:
        upstream.delay = 0.0
        proc.stop(timeout_s=5)
