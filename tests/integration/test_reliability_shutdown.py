"""SIGTERM on a real `purifier serve` process with calls in flight: drained within the grace period.

The process fronts `oip_fake.FakeUpstream` made slow, so calls are provably in flight when the
signal arrives. Within the grace period they complete with their (identity-defended) answer; a
call started after the signal is refused; past the grace period an in-flight call is cut, never
answered with something else; the process exits 0 either way.
"""

from __future__ import annotations

import signal
import time

import grpc
import numpy as np
import pytest
from oip_fake import FakeUpstream, infer_request, softmax

from purifier.serve_process import ServeProcess
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
X = np.array([[0.5, -1.0, 2.0]], np.float32)


@pytest.fixture
def upstream():
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.stop()


def serve(upstream, grace: float, log_path) -> tuple[ServeProcess, int]:
    sidecar = ServeProcess(["--upstream", f"127.0.0.1:{upstream.port}", "--model-name", "m",
                            "--confidence-output", "probs", "--grace", str(grace)], log_path=log_path).start()
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
