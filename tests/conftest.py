"""Shared fixtures: one small real target per session, trained once."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def shadow_cache_dir(tmp_path_factory):
    """Audits cache shadow models by default; in tests, in a session directory, not ~/.cache
    (subprocesses inherit it). A test that counts trained shadows passes its own cache_dir."""
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("shadow-cache")
    patch.setenv("PURIFIER_CACHE_DIR", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def digits_target(tmp_path_factory):
    """The default digits target (MLP, default epochs), trained once per test session."""
    from purifier.models.target import train_target

    return train_target("digits", tmp_path_factory.mktemp("targets") / "digits", seed=0, progress=False)


@pytest.fixture(scope="session")
def ray_executor():
    """One local Ray (2 CPUs) for the session; executors opened meanwhile join it, not start one."""
    pytest.importorskip("ray", reason="Ray is not installed here (the purifier[ray] extra; make venv installs it)")
    from purifier.executor import RayExecutor

    ex = RayExecutor(num_cpus=2)
    try:
        yield ex
    finally:
        ex.close()
