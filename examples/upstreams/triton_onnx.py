"""Serve an ONNX classifier from a real Triton Inference Server (the one inside nvidia-pytriton).

    python triton_onnx.py MODEL.onnx --name digits --grpc-port 8101 --http-port 8100

Triton binds gRPC and HTTP to 127.0.0.1 only (--address), so nothing reaches the model server
except through the sidecar on the same host. The model is a Python function running onnxruntime;
its input is FP32 (-1, D) and every FP32 output of the graph is served (e.g. probabilities and
logits, (-1, C)); the model's max_batch_size is 4096 (--max-batch-size), the sidecar's default
max_request_rows, so the audit's 512-row requests pass. Triton's statistics, repository,
shared-memory, trace and logging APIs need pytriton's access token: give it with --access-token
(default: a random one nobody learns), and perf_analyzer pointed straight at this Triton, which
asks for statistics, needs it as `-H triton-grpc-protocol-triton-access-token:TOKEN` (through the
sidecar it needs none). One JSON line on stdout once the model is ready: {"event": "serving", ...}.

Runs in its own virtual environment (`make venv-triton`): nvidia-pytriton's dependencies
conflict with the project's. With a pyenv interpreter, Triton's Python backend stub links the
system libpython3.11: put the interpreter's lib/ first on LD_LIBRARY_PATH (this script re-executes
itself with it when needed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import sysconfig


def _ensure_libpython_path() -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    if libdir and paths[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *[p for p in paths if p]])
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _width(shape) -> int:
    """The per-row size of an (N, C) ONNX output; -1 when the graph leaves it symbolic."""
    return shape[-1] if isinstance(shape[-1], int) else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="an ONNX classifier with one FP32 (N, D) input")
    parser.add_argument("--name", default="classifier", help="model name (default classifier)")
    parser.add_argument("--address", default="127.0.0.1", help="bind address for gRPC and HTTP")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    # purifier audit sends 512-row requests and the sidecar admits up to 4096 (max_request_rows):
    # Triton refuses larger batches than its model's max_batch_size
    parser.add_argument("--max-batch-size", type=int, default=4096)
    parser.add_argument("--access-token", default=None,
                        help="token for Triton's restricted APIs (statistics, repository, shared memory, ...), "
                             "sent as header triton-grpc-protocol-triton-access-token; default: a random one")
    args = parser.parse_args()
    _ensure_libpython_path()

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    graph_input = session.get_inputs()[0]
    outputs = [o for o in session.get_outputs() if o.type == "tensor(float)"]
    names = [o.name for o in outputs]
    features = graph_input.shape[-1]

    @batch
    def infer(**inputs):
        x = inputs[graph_input.name].astype(np.float32, copy=False)
        return dict(zip(names, session.run(names, {graph_input.name: x}), strict=True))

    config = TritonConfig(grpc_address=args.address, grpc_port=args.grpc_port, http_address=args.address,
                          http_port=args.http_port, allow_metrics=False, log_verbose=0)
    triton = Triton(config=config, security_config=TritonSecurityConfig(access_token=args.access_token))
    # SIGTERM ends serve() the way Ctrl-C does, so tritonserver is stopped before this process exits
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        triton.bind(model_name=args.name, infer_func=infer,
                    inputs=[Tensor(name=graph_input.name, dtype=np.float32, shape=(features,))],
                    outputs=[Tensor(name=o.name, dtype=np.float32, shape=(_width(o.shape),)) for o in outputs],
                    config=ModelConfig(max_batch_size=args.max_batch_size), strict=True)
        triton.run()  # returns once the model is loaded and ready
        print(json.dumps({"event": "serving", "grpc_port": args.grpc_port, "http_port": args.http_port,
                          "model": args.name, "input": graph_input.name, "outputs": names}), flush=True)
        triton.serve()
    except KeyboardInterrupt:
        pass
    finally:
        triton.stop()


if __name__ == "__main__":
    main()
