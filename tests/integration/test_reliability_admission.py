"""Admission control: a one-row client keeps being served while maximum-size requests run.

The defense here costs 4 ms per row in the defense thread (a stand-in for MemGuard's boundary
search), so a 512-row request holds it for 2 s. Four clients send 512-row requests back to back
through the sidecar (`oip_fake.FakeUpstream` upstream); a fifth sends one row at a time with a
4 s deadline. Before: whole requests were defended first come first served, the one-row client
queued behind up to four of them (~8 s) and hit its deadline (20/20 DEADLINE_EXCEEDED); the
queue had no bound. Now large requests are defended in chunks of `max_batch_rows` (32 rows,
0.13 s), smallest request first, and a full queue answers RESOURCE_EXHAUSTED at once. Functional,
not timed: the deadline is 30x the one chunk a one-row request may wait for.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from oip_fake import infer_request, softmax

from purifier.defenses import Defense
from purifier_server._proto import grpc_service_pb2_grpc as pb_grpc
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
LARGE, CHUNK, SECONDS_PER_ROW = 512, 32, 4e-3


class PerRowCost(Defense):
    """Identity in value, 4 ms per row in time."""

    name = "test-per-row-cost"

    def _transform(self, p, inputs):
        time.sleep(SECONDS_PER_ROW * len(p))
        return p, None


def test_a_one_row_client_is_served_while_four_clients_send_maximum_size_requests(upstream):
    settings = Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": -1,
                                 "max_request_rows": LARGE, "max_batch_rows": CHUNK,
                                 "max_queued_rows": 2 * LARGE + CHUNK}, env={})
    large_codes: collections.Counter = collections.Counter()
    stop = threading.Event()
    with BackgroundSidecar(settings, defense=PerRowCost()) as sc:
        def large_client(seed):
            x = np.random.default_rng(seed).normal(size=(LARGE, 3)).astype(np.float32)
            with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                while not stop.is_set():
                    try:
                        stub.ModelInfer(infer_request(x), timeout=60)
                        large_codes["OK"] += 1
                    except grpc.RpcError as e:
                        large_codes[e.code().name] += 1
                        time.sleep(0.05)

        threads = [threading.Thread(target=large_client, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)                               # the defense queue is full of large requests
        small = np.array([[0.3, -0.2, 1.1]], np.float32)
        latencies, small_codes = [], collections.Counter()
        with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(20):
                start = time.monotonic()
                try:
                    resp = stub.ModelInfer(infer_request(small), timeout=4.0)
                except grpc.RpcError as e:
                    small_codes[e.code().name] += 1
                    continue
                latencies.append(time.monotonic() - start)
                small_codes["OK"] += 1
                got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(small.shape)
                np.testing.assert_allclose(got, softmax(small), rtol=1e-6)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    spread = f"median {1e3 * np.median(latencies):.0f} ms, max {1e3 * max(latencies):.0f} ms" if latencies else ""
    print(f"\none-row client: {dict(small_codes)} {spread}; large clients: {dict(large_codes)}")
    assert small_codes == {"OK": 20}
    assert large_codes["OK"] > 0                                       # large requests are served too
    assert set(large_codes) <= {"OK", "RESOURCE_EXHAUSTED"}, large_codes
    assert large_codes["RESOURCE_EXHAUSTED"] > 0                      # the queue bound was reached


class Recording(Defense):
    """Identity in value; records the thread and the rows of every call."""

    name = "test-recording"

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def _transform(self, p, inputs):
        self.calls.append((threading.current_thread().name, len(p)))
        return p, None


def test_concurrent_requests_are_defended_off_the_event_loop_and_a_lone_one_on_it(upstream):
    """A one-row request that is the only call in progress is defended on the event loop (the
    hops through the defense thread would cost what a small defense does); requests whose
    upstream answers arrive together are not, whatever the state of the defense when each
    arrives: defended on the loop one after another they would never coalesce, and the loop
    would serve nothing else meanwhile (before: all eight ran on the loop)."""
    settings = Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                                 "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": -1,
                                 "metrics_port": -1}, env={})
    defense = Recording()
    x = np.array([[0.3, -0.2, 1.1]], np.float32)
    with BackgroundSidecar(settings, defense=defense) as sc, grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):  # the first call measures the defense's cost; then alone: on the loop
            stub.ModelInfer(infer_request(x), timeout=30)
        alone = list(defense.calls)
        defense.calls.clear()
        upstream.gate = threading.Barrier(8)  # the upstream answers the next eight calls together
        try:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _: stub.ModelInfer(infer_request(x), timeout=30), range(8)))
        finally:
            upstream.gate = None
        upstream.stop()  # a request whose upstream is gone fails; it is no longer on its way either
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(infer_request(x), timeout=2)
        for _ in range(200):  # the sidecar ends the failed request at its deadline, about when the client does
            if (sc.batcher.coming, sc.plane.inferring) == (0, 0):
                break
            time.sleep(0.05)
        coming, inferring = sc.batcher.coming, sc.plane.inferring
    assert coming == 0 and inferring == 0
    assert alone[0][0].startswith("defense") and all(not name.startswith("defense") for name, _ in alone[1:])
    assert sum(rows for _, rows in defense.calls) == 8 and len(answers) == 8
    assert all(name.startswith("defense") for name, _ in defense.calls), defense.calls
