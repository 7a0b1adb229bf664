"""`purifier serve --workers 2`, for real on loopback: two serving processes behind one gRPC, one
REST and one metrics port, answering alike; SIGTERM to the supervisor drains both; a port another
process listens on is refused in one line, as with one worker.

MemGuard serves here (short training): its noise is a keyed function of the row, so answers that
agree bit for bit across the workers, and with the defense run in this process, show one secret
and one defense. Which worker answers a gRPC connection is the kernel's choice (SO_REUSEPORT
hashes the connection): 16 connections of their own all land on one worker with probability
2**-15; the merged metrics say which worker answered.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from digits_clients import ask, ask_rest
from prometheus_client.parser import text_string_to_metric_families
from strong_secret import SECRET, write_secret

from purifier.serve_process import ServeProcess, ServerStartError

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
pytestmark = pytest.mark.integration
CONNECTIONS = 16


@pytest.fixture(scope="module")
def memguard_dir(digits_target, tmp_path_factory):
    from purifier.defenses import FitData
    from purifier.defenses.memguard import MemGuard

    root = tmp_path_factory.mktemp("workers")
    MemGuard(epochs=3, secret=SECRET).fit(FitData.from_target(digits_target)).save(root / "memguard")
    write_secret(root / "secret")
    return root


def serve_args(target, root, *extra: str) -> list[str]:
    return ["--model", str(target.directory), "--defense-dir", str(root / "memguard"),
            "--secret-file", str(root / "secret"), "--metrics-port", "0", "--workers", "2", *extra]


def clients(endpoint: str) -> list:
    # each client its own TCP connection (gRPC shares subchannels between channels by default)
    return [grpcclient.InferenceServerClient(endpoint, channel_args=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CONNECTIONS)]


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def per_worker(families: dict, name: str, **labels) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in families[name].samples:
        if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created"):
            out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out


def test_two_workers_answer_alike_and_sigterm_drains_both(digits_target, memguard_dir, tmp_path):
    from purifier.defenses import load_defense

    x = np.ascontiguousarray(digits_target.role("eval_nonmembers")[0][:3], np.float32)
    expected = load_defense(memguard_dir / "memguard", SECRET, digits_target.model_id).transform(
        digits_target.predict_proba(x))
    # a request waits up to 2 s for company before the defense (a fixed call size: no slice), in
    # flight long enough to be drained
    sidecar = ServeProcess(serve_args(digits_target, memguard_dir, "--max-wait-ms", "2000",
                                      "--max-defense-slice-ms", "0"),
                           log_path=tmp_path / "serve.log", ready_timeout_s=180)
    with sidecar:
        assert sidecar.ready["workers"] == 2 and len(sidecar.ready["pids"]) == 2
        workers = sidecar.ready["pids"]
        conns = clients(sidecar.endpoint)
        try:
            with ThreadPoolExecutor(CONNECTIONS) as pool:
                answers = list(pool.map(lambda c: ask(c, x), conns))
            for answer in answers:  # bit for bit, whichever worker answered
                assert answer.tobytes() == expected.astype(np.float32).tobytes()
            assert ask_rest(sidecar.http_endpoint, x).tobytes() == answers[0].tobytes()
            ok = per_worker(scrape(sidecar.ready["metrics_port"]), "purifier_requests", outcome="OK")
            assert set(ok) == {"0", "1"} and all(n > 0 for n in ok.values()), ok  # both answered

            # requests in flight on every connection, then SIGTERM to the supervisor only
            results: list = []

            def in_flight(client) -> None:
                try:
                    results.append(ask(client, x))
                except Exception as e:  # noqa: BLE001 - recorded, asserted below
                    results.append(e)

            threads = [threading.Thread(target=in_flight, args=(c,)) for c in conns]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until every request waits in a worker's defense queue
                queued = per_worker(scrape(sidecar.ready["metrics_port"]), "purifier_defense_queued_rows")
                if sum(queued.values()) >= CONNECTIONS * len(x):
                    break
                time.sleep(0.05)
            assert sum(queued.values()) == CONNECTIONS * len(x)
            os.kill(sidecar.pid, signal.SIGTERM)
            for t in threads:
                t.join(timeout=60)
            assert sidecar.proc.wait(timeout=60) == 0
        finally:
            for c in conns:
                c.close()
        assert len(results) == CONNECTIONS
        for result in results:  # every request in flight was answered, defended
            assert isinstance(result, np.ndarray), result
            assert result.tobytes() == answers[0].tobytes()
        for pid in workers:  # both workers exited (not left behind for the group kill)
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    log = (tmp_path / "serve.log").read_text()
    assert log.count('"msg": "sidecar stopped"') == 2
    assert '"worker": 0' in log and '"worker": 1' in log


@pytest.mark.parametrize("shared", [True, False], ids=["SO_REUSEPORT", "plain"])
def test_a_port_another_process_listens_on_is_refused_in_one_line(digits_target, memguard_dir, tmp_path, shared):
    other = socket.socket()
    try:
        if shared:  # it would take a share of the connections, were the port shared
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ServerStartError) as refused:
            ServeProcess(serve_args(digits_target, memguard_dir, "--port", str(port)),
                         log_path=tmp_path / "serve.log", ready_timeout_s=180).start()
    finally:
        other.close()
    assert refused.value.returncode == 2
    lines = [line for line in refused.value.log.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("purifier: error: port: "), lines
    assert f"127.0.0.1:{port}" in lines[0] and "--port" in lines[0]
    assert ("another process" if shared else "cannot listen") in lines[0]


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaps yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pids, seconds: float = 60.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not gone(p)]


def test_a_worker_that_dies_stops_the_sidecar_and_its_siblings(digits_target, memguard_dir, tmp_path):
    """Fail closed: one worker killed (OOM, a crash) stops the whole sidecar with status 1, so the
    orchestrator restarts it whole, rather than serving on at half strength unseen."""
    sidecar = ServeProcess(serve_args(digits_target, memguard_dir), log_path=tmp_path / "serve.log",
                           ready_timeout_s=180)
    with sidecar:
        pids = sidecar.ready["pids"]
        os.kill(pids[1], signal.SIGKILL)
        assert sidecar.proc.wait(timeout=60) == 1
        assert wait_gone(pids) == []  # the sibling drained and exited before the supervisor did
    log = (tmp_path / "serve.log").read_text()
    assert "a worker exited; stopping the sidecar" in log


def test_workers_whose_supervisor_is_killed_exit_on_their_own(digits_target, memguard_dir, tmp_path):
    """SIGKILL to the supervisor leaves no orphan serving on the port: each worker sees its control
    pipe close, drains and exits."""
    sidecar = ServeProcess(serve_args(digits_target, memguard_dir), log_path=tmp_path / "serve.log",
                           ready_timeout_s=180)
    with sidecar:
        pids = sidecar.ready["pids"]
        os.kill(sidecar.pid, signal.SIGKILL)
        sidecar.proc.wait(timeout=60)
        # checked before the context's group kill would clean up what is left
        assert wait_gone(pids) == []


@pytest.mark.parametrize("per_thread", [True, False], ids=["connection-per-thread", "one-connection"])
def test_the_bench_reaches_every_worker_with_a_connection_per_thread(digits_target, memguard_dir, tmp_path,
                                                                     per_thread):
    """purifier.bench's client shares one gRPC connection between its threads unless asked, and one
    connection reaches one worker: measured that way, `--workers 2` would look like one worker."""
    from purifier.bench.measure import Endpoint, compare

    x = np.ascontiguousarray(digits_target.role("eval_nonmembers")[0][:8], np.float32)
    with ServeProcess(serve_args(digits_target, memguard_dir), log_path=tmp_path / "serve.log",
                      ready_timeout_s=180) as sidecar:
        endpoint = Endpoint("sidecar", sidecar.endpoint, "digits", server_pid=sidecar.pid,
                            channel_per_thread=per_thread)
        result = compare([endpoint], x, concurrency=(CONNECTIONS,), seconds=0.5, rounds=1, warmup_s=0.1)
        assert result["cells"][0]["server_cpu_ms_per_request"] > 0
        ok = per_worker(scrape(sidecar.ready["metrics_port"]), "purifier_requests", outcome="OK")
    # 16 connections of their own all land on one worker with probability 2**-15
    answered = {worker for worker, n in ok.items() if n > 0}
    assert len(answered) == (2 if per_thread else 1), ok


def test_a_refusal_by_another_worker_refuses_here_too_and_is_not_echoed(digits_target, flatten_cls):
    """What a worker does with the supervisor's `peer_refusal`: while another worker refuses the
    upstream model (its identity probe caught another model on its own connection), requests here
    are refused and health says NOT_SERVING; this worker does not report the refusal as its own
    (the supervisor would relay it back for ever); once none refuses, it serves again."""
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tritonclient.utils import InferenceServerException

    from purifier_server.app import BackgroundSidecar
    from purifier_server.settings import Settings

    settings = Settings.resolve({"model": str(digits_target.directory), "host": "127.0.0.1", "port": 0,
                                 "http_port": -1, "metrics_port": -1}, env={})
    x = np.ascontiguousarray(digits_target.role("eval_nonmembers")[0][:2], np.float32)
    background = BackgroundSidecar(settings, defense=flatten_cls())
    with background as sc:
        reported: list = []
        sc.on_refusal = reported.append
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{sc.port}")
        channel = grpc.insecure_channel(f"127.0.0.1:{sc.port}")
        health = health_pb2_grpc.HealthStub(channel)
        try:
            def peer(why):
                asyncio.run_coroutine_threadsafe(sc.readiness.set_peer_refusal(why), background.loop).result(10)

            assert ask(client, x).shape == (2, 10)
            peer("an identity probe found another model")
            with pytest.raises(InferenceServerException) as refused:
                ask(client, x)
            assert "UNAVAILABLE" in str(refused.value.status()) and "another worker" in refused.value.message()
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            assert all(why is None for why in reported), reported
            peer(None)
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert ask(client, x).shape == (2, 10)
        finally:
            client.close()
            channel.close()
