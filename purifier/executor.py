"""Independent tasks over an executor: worker processes here, or a Ray cluster.

An audit's expensive work is a set of independent, seeded tasks: shadow models (Shokri et al.
2017), dozens of them for LiRA at low false-positive rates (Carlini et al. 2022, "Membership
Inference Attacks From First Principles"). An executor computes `fn(*shared, *task)` for every
task and returns the results in task order. Each task carries its own seed and runs on one
thread, so the results do not depend on the executor, its number of workers or the order in
which tasks finish.

* `LocalExecutor` (default): at most one worker process per core, spawned (never forked: torch
  and OpenMP thread pools do not survive a fork); with one worker the tasks run in this process.
* `RayExecutor` (`pip install 'purifier[ray]'`): Ray tasks on an existing cluster (`address`) or
  on a local Ray started here and stopped by `close()`.

`fn` must be a top-level (importable) function; `shared` arguments travel once per worker (local)
or once per map (Ray's object store) instead of once per task, and are read-only in the task.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

from purifier.errors import ConfigError, PurifierError
from purifier.threads import limit_threads, single_threaded

EXECUTORS = ("local", "ray")
RAY_INSTALL_HINT = "install the extra: pip install 'purifier[ray]' (a checkout's make venv includes it)"
LOCAL_RAY_OBJECT_STORE_BYTES = 1 << 30  # Ray's default takes 30% of RAM; spill to disk instead
RAY_CONNECT_TIMEOUT_S = 10.0
RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"

OnDone = Callable[[int, Any], None]


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


class Executor(Protocol):
    """What `ExecutorSpec.open` returns and the shadow cache maps over (`LocalExecutor`, `RayExecutor`)."""

    name: str

    def map(self, fn: Callable, tasks: Sequence[tuple], shared: tuple = (),
            on_done: OnDone | None = None) -> list:
        """[fn(*shared, *task) for task in tasks], computed in parallel, in task order.

        on_done(index, result) is called in this process as each task finishes (completion
        order), e.g. to store the result or advance a progress bar.
        """

    def describe(self) -> dict:
        """JSON-able facts for reports: {"executor": name, "workers": n, ...}."""

    def close(self) -> None: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc) -> None: ...


def _read_only(shared: tuple) -> tuple:
    """Read-only views of the ndarray arguments, as Ray's object store hands them out."""
    import numpy as np

    out = []
    for a in shared:
        if isinstance(a, np.ndarray):
            a = a.view()
            a.flags.writeable = False
        out.append(a)
    return tuple(out)


class _Worker:
    """What a local worker process holds between tasks: the function and the shared arguments."""

    fn: Callable | None = None
    shared: tuple = ()


def _init_worker(fn: Callable, shared: tuple) -> None:
    limit_threads()  # before any task imports torch or sklearn
    _Worker.fn, _Worker.shared = fn, _read_only(shared)


def _run_task(task: tuple) -> Any:
    fn = _Worker.fn
    assert fn is not None  # set by _init_worker
    return fn(*_Worker.shared, *task)


class LocalExecutor:
    """Worker processes on this machine, at most one per core (or `workers`)."""

    name = "local"

    def __init__(self, workers: int | None = None):
        if workers is not None and workers < 1:
            raise ConfigError(f"workers: need at least 1, got {workers}")
        self.workers = workers or available_cores()

    def describe(self) -> dict:
        return {"executor": self.name, "workers": self.workers}

    def map(self, fn, tasks, shared=(), on_done=None):
        tasks = list(tasks)
        results: list = [None] * len(tasks)
        n = min(self.workers, len(tasks))
        if n <= 1:  # no process to spawn: same single-threaded computation, in this process
            shared = _read_only(shared)
            for i, task in enumerate(tasks):
                with single_threaded():
                    results[i] = fn(*shared, *task)
                if on_done is not None:
                    on_done(i, results[i])
            return results
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(fn, tuple(shared)))
        try:
            pending = {pool.submit(_run_task, task): i for i, task in enumerate(tasks)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    results[i] = fut.result()
                    if on_done is not None:
                        on_done(i, results[i])
        finally:  # on an error or Ctrl-C: drop queued tasks, do not wait for a long run
            pool.shutdown(wait=True, cancel_futures=True)
        return results

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"executor ray: Ray is not installed in this environment; {RAY_INSTALL_HINT}") from None
    return ray


def _ray_call(fn: Callable, *args) -> Any:
    limit_threads()
    return fn(*args)


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of 'HOST:PORT' or 'ray://HOST:PORT'; None for 'auto'; ConfigError otherwise."""
    if address == "auto":
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address: {address!r} is not HOST:PORT (the head node's GCS port, "
                          "6379 by default), ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout_s: float) -> None:
    """Fail in one line, within `timeout_s`, when nothing answers at a Ray address.

    Ray itself retries an unreachable address for minutes; a TCP connect plus (for a GCS
    address) an HTTP/2 handshake tells "nothing there" and "not a Ray head" apart quickly.
    """
    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"--ray-address {address}: cannot connect ({e.strerror or e}); start a head with "
                          "`ray start --head` or leave --ray-address out for a local Ray") from None
    if address.startswith("ray://"):
        return
    import grpc

    channel = grpc.insecure_channel(f"{hp[0]}:{hp[1]}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise ConfigError(f"--ray-address {address}: something listens there but it is not a Ray head "
                          "(no gRPC answer); give the head's GCS address (HOST:6379 by default)") from None
    finally:
        channel.close()


@contextlib.contextmanager
def _bounded_ray_connect() -> Iterator[None]:
    """Cap Ray's own connection retries (minutes by default) for `ray.init(address=...)`.

    Ray reads the C++ timeouts when it is imported, so they bind only if Ray is imported here;
    the retry count is read at connect time. Variables the user set are left alone.
    """
    bounded = {"RAY_py_gcs_connect_timeout_s": "5", "RAY_gcs_rpc_server_connect_timeout_s": "3",
               "RAY_gcs_server_port_wait_time_s": "1"}
    added = [k for k in bounded if k not in os.environ]
    os.environ.update({k: bounded[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _init_failure(address: str | None, error: BaseException) -> str:
    """One line from Ray's failure; its useful part is the innermost error, sometimes only as the
    text of a traceback inside another exception's message."""
    chain = [error]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
        chain.append(nxt)
    texts = [f"{type(e).__name__}: {e}" for e in chain]
    where = f"the Ray cluster at {address}" if address else "a local Ray"
    if any("AuthenticationError" in t or "InvalidAuthToken" in t for t in texts):
        # Ray 2.60: `ray start --head` enables token auth when ~/.ray/auth_token exists, but a
        # driver joining with an address does not send it unless RAY_AUTH_MODE=token is set.
        return (f"executor ray: {where} requires token authentication; export RAY_AUTH_MODE=token with the "
                "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token")
    if any("timed out during startup" in t for t in texts):
        # Ray gives its raylet a fixed 30 s to register; on an overloaded machine that is too short
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        return (f"executor ray: a local Ray did not start within Ray's fixed 30 s (load average {load} on "
                f"{available_cores()} cores); retry when the machine is quieter, or use --executor local")
    lines = [line.strip() for line in str(chain[-1]).splitlines() if line.strip()]
    if not lines:
        lines = [type(chain[-1]).__name__]
    text = lines[-1] if any("Traceback" in line for line in lines) else lines[0]
    return f"executor ray: cannot start or join {where} ({text[:300]})"


class RayExecutor:
    """Ray tasks (one CPU each) on the cluster at `address`, or on a local Ray of `num_cpus`.

    A local Ray is started here (no dashboard, 1 GiB object store) and shut down by `close()`;
    a connection to an existing cluster is closed, the cluster left running. If Ray is already
    initialised in this process (a notebook), it is used as is and left running.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 connect_timeout_s: float = RAY_CONNECT_TIMEOUT_S):
        if num_cpus is not None and num_cpus < 1:
            raise ConfigError(f"ray num_cpus: need at least 1, got {num_cpus}")
        self.address = address
        if address:
            probe_address(address, connect_timeout_s)
            with _bounded_ray_connect():
                self._ray = import_ray()
        else:
            self._ray = import_ray()
        ray = self._ray
        self._owned = not ray.is_initialized()
        if self._owned:
            if address:
                with _bounded_ray_connect():
                    self._init(lambda: ray.init(address=address, log_to_driver=False,
                                                logging_level=logging.WARNING), address)
            else:
                # "local": a new Ray even when `ray start` left one running on this machine
                # (plain ray.init() would join it, with its own CPUs and workloads). Ray's notice that
                # token authentication is on says nothing useful about a cluster private to this run.
                logging.getLogger(RAY_TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
                self._init(lambda: ray.init(address="local", num_cpus=num_cpus or available_cores(),
                                            include_dashboard=False, log_to_driver=False,
                                            logging_level=logging.WARNING,
                                            object_store_memory=LOCAL_RAY_OBJECT_STORE_BYTES),
                           None)
        self._remote = ray.remote(num_cpus=1)(_ray_call)
        self.workers = int(ray.cluster_resources().get("CPU", 0))

    def _init(self, start: Callable[[], object], address: str | None) -> None:
        """Run `start` (a ray.init); a failure is one line."""
        try:
            start()
        except Exception as e:  # Ray raises ConnectionError, RuntimeError (version mismatch), ...
            with contextlib.suppress(Exception):
                self._ray.shutdown()
            raise ConfigError(_init_failure(address, e)) from None

    def describe(self) -> dict:
        return {"executor": self.name, "workers": self.workers,
                "cluster": self.address or "local (started by the audit)"}

    def map(self, fn, tasks, shared=(), on_done=None):
        ray = self._ray
        tasks = list(tasks)
        results: list = [None] * len(tasks)
        shared_refs = [ray.put(a) for a in shared]  # once per map, resolved read-only in the task
        pending = {self._remote.remote(fn, *shared_refs, *task): i for i, task in enumerate(tasks)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        if isinstance(e.cause, PurifierError):
                            raise e.cause from None  # the user's mistake, in one line
                        raise
                    if on_done is not None:
                        on_done(i, results[i])
        finally:
            for ref in pending:  # an error or Ctrl-C: nothing keeps computing for nobody
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        return results

    def close(self) -> None:
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class ExecutorSpec:
    """Which executor to use, checked when made and opened only when there is work.

    Args:
        name: "local" or "ray".
        workers: local processes (default: the cores), or a local Ray's CPUs; with "ray" and an
            address, the cluster's size rules and `workers` must be None.
        ray_address: an existing cluster ("ray" only); None starts a local Ray.
    """

    name: str = "local"
    workers: int | None = None
    ray_address: str | None = None

    def __post_init__(self):
        if self.name not in EXECUTORS:
            raise ConfigError(f"--executor: unknown executor {self.name!r}; choose {' or '.join(EXECUTORS)}")
        if self.ray_address and self.name != "ray":
            raise ConfigError("--ray-address only applies with --executor ray")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers: need at least 1, got {self.workers}")
        if self.workers is not None and self.ray_address:
            raise ConfigError("--workers sizes a local executor; a Ray cluster at --ray-address has its own CPUs")

    def check(self) -> None:
        """Fail now, in one line, on what would fail when opened: Ray missing, no cluster there."""
        if self.name == "ray":
            if self.ray_address:
                probe_address(self.ray_address, RAY_CONNECT_TIMEOUT_S)
            with _bounded_ray_connect() if self.ray_address else contextlib.nullcontext():
                import_ray()

    def describe(self) -> dict:
        if self.name == "local":
            return {"executor": "local", "workers": self.workers or available_cores()}
        return {"executor": "ray", "workers": self.workers if not self.ray_address else None,
                "cluster": self.ray_address or "local (started by the audit)"}

    def open(self) -> Executor:
        if self.name == "local":
            return LocalExecutor(self.workers)
        return RayExecutor(self.ray_address, num_cpus=self.workers)
