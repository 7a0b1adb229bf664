"""`purifier serve` as a process: serves tritonclient, drains on SIGTERM, refuses bad settings in one line."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from purifier.serve_process import ServeProcess, ServerStartError

grpcclient = pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.integration


def test_serve_embedded_then_sigterm_exits_cleanly(digits_target, tmp_path):
    proc = ServeProcess(["--model", str(digits_target.directory), "--model-name", "digits"],
                        log_path=tmp_path / "serve.log").start()
    try:
        assert proc.ready["event"] == "serving" and proc.port > 0
        client = grpcclient.InferenceServerClient(proc.endpoint)
        x = np.zeros((2, 64), np.float32)
        inp = grpcclient.InferInput("input", [2, 64], "FP32")
        inp.set_data_from_numpy(x)
        probs = client.infer("digits", [inp]).as_numpy("probabilities")
        client.close()
        np.testing.assert_allclose(probs, digits_target.classifier().run(x)["probabilities"], rtol=1e-6)
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert '"msg": "sidecar stopped"' in proc.log_text()
    finally:
        proc.stop(timeout_s=5)


@pytest.mark.parametrize("args,message", [
    (["--upstream", "127.0.0.1:1"], "model_name: required"),
    (["--upstream", "127.0.0.1:1", "--model-name", "m", "--confidence-output", "p", "--defense", "memguard"],
     "defense_dir: required"),
    (["--upstream", "127.0.0.1:1", "--model-name", "m", "--confidence-output", "p", "--max-batch-rows", "0"],
     "max_batch_rows: must be >= 1"),
])
def test_bad_settings_fail_at_start_up_in_one_line(args, message, tmp_path):
    with pytest.raises(ServerStartError) as info:
        ServeProcess(args, log_path=tmp_path / "serve.log", ready_timeout_s=60).start()
    err = info.value.log
    assert info.value.returncode == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
