"""Executors: local processes, in-process and Ray give the same results in task order, run each
task on one thread, pass the user's errors through, and fail fast on a bad Ray address."""

from __future__ import annotations

import socket
import sys
import threading

import numpy as np
import pytest

from purifier.errors import ConfigError
from purifier.executor import ExecutorSpec, LocalExecutor, RayExecutor, probe_address
from purifier.models.training import TrainConfig, train_classifier


def _training_tasks():
    """Tiny seeded trainings; the first task is the longest, so it finishes last."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 8)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    tasks = [(TrainConfig(epochs=e), seed, None, "t", False) for e, seed in ((12, 5), (2, 6), (3, 7), (2, 5))]
    return (X, y, 2), tasks


def _weights(models) -> list[list[np.ndarray]]:
    return [[p.detach().numpy() for p in m.parameters()] for m in models]


def _assert_same_models(a, b):
    for wa, wb in zip(_weights(a), _weights(b), strict=True):
        for pa, pb in zip(wa, wb, strict=True):
            np.testing.assert_array_equal(pa, pb)


@pytest.fixture(scope="module")
def in_process_models():
    shared, tasks = _training_tasks()
    return LocalExecutor(workers=1).map(train_classifier, tasks, shared)


def test_local_processes_equal_in_process_in_task_order(in_process_models):
    shared, tasks = _training_tasks()
    inline = in_process_models
    seen = []
    pooled = LocalExecutor(workers=2).map(train_classifier, tasks, shared, on_done=lambda i, _: seen.append(i))
    _assert_same_models(inline, pooled)
    assert sorted(seen) == list(range(len(tasks)))
    # different seeds or epochs give different models: the comparison above can fail
    assert not np.array_equal(_weights(inline)[0][0], _weights(inline)[3][0])
    assert not np.array_equal(_weights(inline)[1][0], _weights(inline)[3][0])


def test_ray_equals_in_process(ray_executor, in_process_models):
    shared, tasks = _training_tasks()
    seen = []
    on_ray = ray_executor.map(train_classifier, tasks, shared, on_done=lambda i, _: seen.append(i))
    _assert_same_models(in_process_models, on_ray)
    assert sorted(seen) == list(range(len(tasks)))
    assert ray_executor.describe()["workers"] == 2


@pytest.fixture(params=["in-process", "local", "ray"])
def executor(request):
    if request.param == "ray":
        return request.getfixturevalue("ray_executor")
    return LocalExecutor(workers=1 if request.param == "in-process" else 2)


def test_tasks_compute_on_one_thread(executor):
    import torch
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    assert executor.map(torch.get_num_threads, [()] * 2) == [1, 1]
    pools = executor.map(threadpool_info, [()])[0]
    assert pools and all(p["num_threads"] == 1 for p in pools), pools
    assert torch.get_num_threads() == before  # an in-process run restores this process's setting


def test_shared_arguments_are_read_only(executor):
    a = np.zeros(3)
    with pytest.raises(ValueError, match="read-only"):
        executor.map(np.copyto, [(1.0,)] * 2, (a,))
    assert a.flags.writeable and not a.any()  # the caller's array is untouched


def test_user_errors_come_back_as_themselves(executor):
    with pytest.raises(ConfigError, match="unknown executor 'dask'"):
        executor.map(ExecutorSpec, [("local",), ("dask",)])


def test_without_ray_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'purifier\[ray\]'") as e:
        ExecutorSpec("ray").check()
    assert "\n" not in str(e.value)


def test_executor_spec_validates():
    with pytest.raises(ConfigError, match="choose local or ray"):
        ExecutorSpec("dask")
    with pytest.raises(ConfigError, match="only applies with --executor ray"):
        ExecutorSpec("local", ray_address="127.0.0.1:6379")
    with pytest.raises(ConfigError, match="workers"):
        ExecutorSpec(workers=0)
    with pytest.raises(ConfigError, match="its own CPUs"):
        ExecutorSpec("ray", workers=2, ray_address="127.0.0.1:6379")
    with pytest.raises(ConfigError, match="workers"):
        LocalExecutor(workers=0)
    assert ExecutorSpec().describe() == {"executor": "local", "workers": ExecutorSpec().open().workers}


@pytest.mark.parametrize("address", ["localhost", "host:port", "ray://:1", "127.0.0.1:0"])
def test_malformed_ray_address(address):
    with pytest.raises(ConfigError, match="not HOST:PORT"):
        probe_address(address, 1.0)


def test_nothing_listening_fails_in_one_line():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ConfigError, match="cannot connect") as e:
        ExecutorSpec("ray", ray_address=f"127.0.0.1:{port}").check()
    assert "\n" not in str(e.value)


@pytest.mark.timeout(30)
def test_a_silent_listener_is_not_taken_for_a_ray_head():
    """A port that accepts TCP but never speaks gRPC: refused after the connect timeout, whereas
    Ray alone would retry it for minutes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    conns = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        with pytest.raises(ConfigError, match="not a Ray head") as e:
            RayExecutor(address=f"127.0.0.1:{server.getsockname()[1]}", connect_timeout_s=1.0)
        assert "\n" not in str(e.value)
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        server.close()


def test_ray_failures_become_one_line_with_the_inner_reason():
    from purifier.executor import _init_failure

    def chained(inner: str) -> Exception:
        try:
            try:
                raise RuntimeError(inner)
            except RuntimeError as e:
                raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from e
        except ConnectionError as e:
            return e

    auth = chained("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                   "  File x\nray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: missing")
    assert "RAY_AUTH_MODE=token" in _init_failure("10.0.0.1:6379", auth)
    other = _init_failure("10.0.0.1:6379", chained("Failed to connect to GCS. Traceback (most recent call "
                                                    "last):\n  File y\nray.exceptions.RpcError: version mismatch"))
    assert other.endswith("(ray.exceptions.RpcError: version mismatch)") and "\n" not in other
    busy = _init_failure(None, Exception("The current node timed out during startup. This could happen ..."))
    assert "load average" in busy and "--executor local" in busy
