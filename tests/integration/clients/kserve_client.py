"""KServe's own OIP client (`kserve.InferenceGRPCClient`) as a test client of the sidecar.

Runs in .venv-kserve (kserve cannot share the project's environment), so the test starts it as
a subprocess:

    python kserve_client.py HOST:PORT MODEL INPUT_NAME ROWS.npy OUT.npz [--typed] [--output NAME]

Sends the rows as one FP32 request (raw bytes, or typed contents with --typed), with readiness
checked first the way KServe's client does it, and saves every output of the answer with the
answer's id and model version; a gRPC error prints `ERROR <code> <details>` and exits 3.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest, RequestedOutput


async def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("address", "model", "input", "rows", "out"):
        p.add_argument(name)
    p.add_argument("--typed", action="store_true")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    x = np.load(args.rows).astype(np.float32)
    tensor = InferInput(name=args.input, shape=list(x.shape), datatype="FP32")
    tensor.set_data_from_numpy(x, binary_data=not args.typed)
    outputs = [RequestedOutput(args.output)] if args.output else None
    request = InferRequest(model_name=args.model, infer_inputs=[tensor], request_id="kserve-client-1",
                           request_outputs=outputs)
    client = InferenceGRPCClient(args.address, timeout=30, retries=1)
    try:
        ready = await client.is_model_ready(args.model)
        response = await client.infer(request)
    except grpc.RpcError as e:
        print(f"ERROR {e.code().name} {e.details()}")
        return 3
    finally:
        await client.close()
    arrays = {f"out_{o.name}": o.as_numpy() for o in response.outputs}
    np.savez(args.out, id=np.array(response.id), model_version=np.array(response.model_version or ""),
             ready=np.array(ready), **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
