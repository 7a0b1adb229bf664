"""`purifier serve` needs neither torch, scikit-learn, matplotlib nor scipy (the slim `serve` install).

Two views of the real serving process, each started as `purifier serve` with a fitted defense
and asked a request through tritonclient: with `python -X importtime` (every module the process
imported, from start-up through the first request) and with those packages made unimportable (a
directory on PYTHONPATH whose `torch`, `sklearn`, `matplotlib` raise ImportError: the slim
install, as far as the process can tell). MemGuard fitted for `--mode faithful` needs torch and
must say so in one line at start-up.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from digits_clients import ask_endpoint, ask_rest
from strong_secret import SECRET, write_secret

from purifier.serve_process import (
    ServeProcess,
    ServerProcess,
    ServerStartError,
    clean_env,
    serve_command,
)

grpcclient = pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.integration
HEAVY = ("torch", "sklearn", "matplotlib", "scipy")  # none is in the slim install


@pytest.fixture(scope="module")
def fitted(digits_target, tmp_path_factory):
    """Fitted defense directories (short training: only the serving path is under test)."""
    from purifier.defenses import FitData
    from purifier.defenses.memguard import MemGuard
    from purifier.defenses.purifier_net import PurifierNet

    root = tmp_path_factory.mktemp("slim")
    data = FitData.from_target(digits_target)
    memguard = MemGuard(epochs=3, secret=SECRET).fit(data)
    memguard.save(root / "memguard")
    faithful = MemGuard(mode="faithful", secret=SECRET)
    faithful.classifier, faithful.n_classes, faithful.model_id = memguard.classifier, 10, memguard.model_id
    faithful.save(root / "memguard-faithful")
    PurifierNet(epochs=2, secret=SECRET).fit(data, progress=False).save(root / "purifier")
    write_secret(root / "secret")
    return root


def serve_args(target, fitted, defense: str, directory: str | None = None) -> list[str]:
    args = ["--model", str(target.directory), "--model-name", "digits", "--defense", defense,
            "--secret-file", str(fitted / "secret")]
    return args + (["--defense-dir", str(fitted / (directory or defense))] if defense != "none" else [])


def imported_modules(importtime_log: str) -> set[str]:
    """Module names from `python -X importtime` lines ('import time: self | cumulative | name')."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


@pytest.mark.parametrize("defense", ["none", "memguard", "purifier"])
def test_serving_process_imports_no_torch_sklearn_or_matplotlib(digits_target, fitted, defense, tmp_path):
    x = np.ascontiguousarray(digits_target.role("eval_nonmembers")[0][:3], np.float32)
    cmd = serve_command(serve_args(digits_target, fitted, defense))
    cmd[1:1] = ["-X", "importtime"]
    with ServerProcess(cmd, log_path=tmp_path / "serve.log") as sidecar:
        out = ask_endpoint(sidecar.endpoint, x)
        log = sidecar.log_text()
    clean = digits_target.predict_proba(x)
    assert np.array_equal(out.argmax(1), clean.argmax(1)) and np.allclose(out.sum(1), 1, atol=1e-5)
    modules = imported_modules(log)
    assert "purifier_server.app" in modules and "numpy" in modules  # the log really lists the imports
    if defense == "memguard":
        assert "purifier.defenses.phase1" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], f"the {defense} sidecar imported {heavy[:5]}"


@pytest.fixture
def without_heavy_packages(tmp_path):
    """An environment in which torch, scikit-learn and matplotlib cannot be imported."""
    blocked = tmp_path / "blocked"
    for name in HEAVY:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed (slim test)')\n")
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocked), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_memguard_fast_serves_without_torch_and_faithful_says_why_not(digits_target, fitted, without_heavy_packages,
                                                                       tmp_path):
    x = np.ascontiguousarray(digits_target.role("eval_members")[0][:8], np.float32)
    with ServeProcess(serve_args(digits_target, fitted, "memguard"), env=without_heavy_packages,
                      log_path=tmp_path / "fast.log") as sidecar:
        out = ask_endpoint(sidecar.endpoint, x)
        rest = ask_rest(sidecar.http_endpoint, x)
    from purifier.defenses import load_defense

    expected = load_defense(fitted / "memguard", secret=SECRET).transform(digits_target.predict_proba(x))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)  # the same defense, served slim
    np.testing.assert_array_equal(rest, out)                           # over REST too
    with pytest.raises(ServerStartError) as info:
        ServeProcess(serve_args(digits_target, fitted, "memguard", "memguard-faithful"), env=without_heavy_packages,
                     log_path=tmp_path / "faithful.log").start()
    err = info.value.log.strip()
    assert info.value.returncode == 2 and "Traceback" not in err
    error = [line for line in err.splitlines() if not line.startswith("{")]  # the rest: JSON log records
    assert len(error) == 1 and error[0].startswith("purifier: error: mode:")
    assert "faithful" in error[0] and "torch" in error[0]


def test_the_library_entry_points_import_without_torch(without_heavy_packages):
    import subprocess

    code = ("import purifier.defenses.memguard, purifier.defenses.purifier_net, purifier.serve_process, "
            "purifier.cli; purifier.cli.build_parser(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], env=without_heavy_packages, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
