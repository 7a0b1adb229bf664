"""Serve an ONNX classifier from KServe's Python ModelServer (kserve 0.21) over OIP v2 gRPC.

    python kserve_onnx.py MODEL.onnx --name digits --grpc-port 8081 --http-port 8080

KServe 0.21 binds REST to 0.0.0.0 and gRPC to [::] and has no flag to change that: keep it
unreachable except through the sidecar with the pod's or host's network rules (docs/serving.md, "KServe").
The model runs with onnxruntime; ModelMetadata declares its one FP32 (-1, D) input and every FP32
output (e.g. probabilities and logits, (-1, C)); answers are raw when the request was raw and
typed when it was typed, as KServe does. One JSON line on stdout once the model is loaded:
{"event": "serving", "grpc_port": ..., ...}; KServe keeps running until SIGTERM.

Runs in its own virtual environment (`make venv-kserve`): kserve's dependencies conflict with
the project's.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="an ONNX classifier with one FP32 (N, D) input")
    parser.add_argument("--name", default="classifier", help="model name (default classifier)")
    parser.add_argument("--grpc-port", type=int, default=8081)
    parser.add_argument("--http-port", type=int, default=8080)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # kserve parses sys.argv itself when imported

    import kserve
    import numpy as np
    import onnxruntime as ort
    from kserve import InferOutput, InferRequest, InferResponse

    class OnnxClassifier(kserve.Model):
        def __init__(self, name: str, path: str):
            super().__init__(name)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0]
            self.outputs = [o for o in self.session.get_outputs() if o.type == "tensor(float)"]
            self.ready = True

        def get_input_types(self):
            return [{"name": self.input.name, "datatype": "FP32", "shape": [-1, self.input.shape[-1]]}]

        def get_output_types(self):
            return [{"name": o.name, "datatype": "FP32",
                     "shape": [-1, o.shape[-1] if isinstance(o.shape[-1], int) else -1]} for o in self.outputs]

        async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
            names = [o.name for o in payload.request_outputs or []] or [o.name for o in self.outputs]
            results = self.session.run(names, {self.input.name: x})
            outputs = []
            for name, array in zip(names, results, strict=True):
                out = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
                out.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
                outputs.append(out)
            return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs,
                                 use_binary_outputs=payload.use_binary_outputs)

    model = OnnxClassifier(args.name, args.onnx)
    server = kserve.ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, workers=1,
                                enable_latency_logging=False, grace_period=2)
    print(json.dumps({"event": "serving", "grpc_port": args.grpc_port, "http_port": args.http_port,
                      "model": args.name, "input": model.input.name,
                      "outputs": [o.name for o in model.outputs]}), flush=True)
    server.start([model])


if __name__ == "__main__":
    main()
