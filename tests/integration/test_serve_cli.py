"""`purifier serve` as a process: serves tritonclient, drains on SIGTERM, refuses bad settings in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.integration


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("PURIFIER_")}


def serve(*args):
    return subprocess.Popen([sys.executable, "-m", "purifier.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(), start_new_session=True)


def test_serve_embedded_then_sigterm_exits_cleanly(digits_target):
    proc = serve("--model", str(digits_target.directory), "--host", "127.0.0.1", "--port", "0",
                 "--metrics-port", "-1", "--model-name", "digits")
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        port = json.loads(line)["port"]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        x = np.zeros((2, 64), np.float32)
        inp = grpcclient.InferInput("input", [2, 64], "FP32")
        inp.set_data_from_numpy(x)
        probs = client.infer("digits", [inp]).as_numpy("probabilities")
        client.close()
        np.testing.assert_allclose(probs, digits_target.classifier().run(x)["probabilities"], rtol=1e-6)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        log = proc.stderr.read()
        assert '"msg": "sidecar stopped"' in log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.parametrize("args,message", [
    (["--upstream", "127.0.0.1:1"], "model_name: required"),
    (["--upstream", "127.0.0.1:1", "--model-name", "m", "--confidence-output", "p", "--defense", "memguard"],
     "defense_dir: required"),
    (["--upstream", "127.0.0.1:1", "--model-name", "m", "--confidence-output", "p", "--max-batch-rows", "0"],
     "max_batch_rows: must be >= 1"),
    (["--upstream", "127.0.0.1:1", "--model-name", "m", "--confidence-output", "p", "--allow-output", "p"],
     "allow_outputs: 'p' is the confidence output"),
    (["--upstream", "127.0.0.1:1", "--model-name", "m", "--confidence-output", "p", "--allow-output", "logits"],
     "allow_outputs: 'logits' looks like a logits output"),
])
def test_bad_settings_fail_at_start_up_in_one_line(args, message):
    proc = serve(*args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_model_whose_confidences_cannot_be_defended_exits_2_naming_the_fix(zipmap_onnx):
    proc = serve("--model", str(zipmap_onnx), "--port", "0", "--metrics-port", "-1", "--host", "127.0.0.1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("purifier: error: confidence_output: 'label' is INT64") and "'zipmap': False" in line
    assert "Traceback" not in err
