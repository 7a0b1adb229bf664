"""Serve an ONNX classifier from TorchServe 0.12 over its Open Inference Protocol gRPC service.

    python torchserve_onnx.py MODEL.onnx --name digits --workdir DIR --grpc-port 7070

Packs the ONNX file with this script as the handler into DIR/model-store/NAME.mar
(torch-model-archiver), writes DIR/config.properties (every listener on 127.0.0.1, OIP on
`--grpc-port`, one worker) and runs `torchserve --foreground` with TS_OPEN_INFERENCE_PROTOCOL=oip,
which is what turns OIP on in 0.12 (INFERENCE_PROTOCOL=oip does not). The OIP service is
`org.pytorch.serve.grpc.openinference.GRPCInferenceService`: give that to the sidecar as
--upstream-service. TorchServe hands the handler typed contents only (`raw_input_contents` is
ignored), asks it nothing about requested outputs, and answers typed.

Needs a Java 17 runtime and its own virtual environment (`make venv-torchserve`: torchserve,
torch-model-archiver, torch, pyyaml (used by TorchServe but not declared by it), onnxruntime).

As a TorchServe handler (inside the .mar), `handle(data, context)` receives one JSON body per
request: {"id", "model_name", "inputs": [{"name", "shape", "datatype", "data"}]}, and answers
{"id", "model_name", "model_version", "outputs": [{"name", "datatype", "shape", "data"}]} with every
FP32 output of the graph.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

_session = None


def _load(model_dir: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    onnx = next(Path(model_dir).glob("*.onnx"))
    return ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])


def handle(data, context):
    """TorchServe's entry point: one answer per request in `data`."""
    import numpy as np

    global _session
    if _session is None:
        _session = _load(context.system_properties.get("model_dir"))
    if data is None:
        return None
    graph_input = _session.get_inputs()[0]
    names = [o.name for o in _session.get_outputs() if o.type == "tensor(float)"]
    answers = []
    for request in data:
        body = request.get("body") or request.get("data")
        if isinstance(body, bytes | bytearray):
            body = json.loads(body)
        tensor = body["inputs"][0]
        x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        results = _session.run(names, {graph_input.name: x})
        answers.append({"id": body.get("id", ""), "model_name": body.get("model_name", context.model_name),
                        "model_version": "1",
                        "outputs": [{"name": n, "datatype": "FP32", "shape": list(r.shape),
                                     "data": r.ravel().tolist()} for n, r in zip(names, results, strict=True)]})
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("--name", default="classifier")
    parser.add_argument("--workdir", required=True, help="model store, config and logs go here")
    parser.add_argument("--grpc-port", type=int, default=7070, help="OIP gRPC port")
    parser.add_argument("--ports", type=int, nargs=3, default=[8080, 8081, 8082], metavar="PORT",
                        help="inference, management and metrics HTTP ports (all on 127.0.0.1)")
    parser.add_argument("--management-grpc-port", type=int, default=7071)
    parser.add_argument("--worker-port", type=int, default=9000,
                        help="first backend worker port (its Unix socket is /tmp/.ts.sock.PORT): give "
                             "each TorchServe on one host its own")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    work = Path(args.workdir).resolve()
    store = work / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    staged = work / "staged"
    staged.mkdir(exist_ok=True)
    shutil.copy(args.onnx, staged / "model.onnx")
    subprocess.run([str(bin_dir / "torch-model-archiver"), "--model-name", args.name, "--version", "1",
                    "--handler", str(Path(__file__).resolve()), "--extra-files", str(staged / "model.onnx"),
                    "--export-path", str(store), "--force"], check=True)
    inference, management, metrics = args.ports
    (work / "config.properties").write_text("\n".join([
        f"inference_address=http://127.0.0.1:{inference}",
        f"management_address=http://127.0.0.1:{management}",
        f"metrics_address=http://127.0.0.1:{metrics}",
        "grpc_inference_address=127.0.0.1", f"grpc_inference_port={args.grpc_port}",
        "grpc_management_address=127.0.0.1", f"grpc_management_port={args.management_grpc_port}",
        f"initial_worker_port={args.worker_port}", "default_workers_per_model=1", "disable_token_authorization=true", "enable_envvars_config=true",
        f"model_store={store}", f"load_models={args.name}.mar", ""]))
    env = {**os.environ, "TS_OPEN_INFERENCE_PROTOCOL": "oip", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    print(json.dumps({"event": "starting", "grpc_port": args.grpc_port, "model": args.name,
                      "service": "org.pytorch.serve.grpc.openinference.GRPCInferenceService"}), flush=True)
    os.execve(str(bin_dir / "torchserve"), [str(bin_dir / "torchserve"), "--foreground", "--ncs", "--ts-config",
                                            str(work / "config.properties"), "--model-store", str(store)], env)


if __name__ == "__main__":
    main()
