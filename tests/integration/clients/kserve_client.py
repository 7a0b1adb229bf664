"""KServe's own OIP client (`kserve.InferenceGRPCClient`) as a test client of the sidecar.

Runs in .venv-kserve (kserve cannot share the project's environment), so the test starts it as
a subprocess:

    python kserve_client.py HOST:PORT MODEL INPUT_NAME ROWS.npy OUT.npz [--output NAME] [--only raw|typed]

Asks ModelReady, then sends the rows twice as one FP32 request, first as raw bytes and then as
typed contents, and saves every output of both answers (`raw_<name>`, `typed_<name>`) with the
answers' ids and model versions; a gRPC error prints `ERROR <code> <details>` and exits 3.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput


async def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("address", "model", "input", "rows", "out"):
        p.add_argument(name)
    p.add_argument("--output", default=None)
    p.add_argument("--only", choices=["raw", "typed"], default=None, help="send one kind of request only")
    args = p.parse_args()
    x = np.load(args.rows).astype(np.float32)
    outputs = [RequestedOutput(args.output)] if args.output else None
    client = InferenceGRPCClient(args.address, timeout=30)
    saved = {}
    try:
        saved["ready"] = np.array(await client.is_model_ready(args.model))
        for kind in [args.only] if args.only else ["raw", "typed"]:
            tensor = InferInput(name=args.input, shape=list(x.shape), datatype="FP32")
            tensor.set_data_from_numpy(x, binary_data=kind == "raw")
            request = InferRequest(model_name=args.model, infer_inputs=[tensor], request_id=f"kserve-{kind}",
                                   request_outputs=outputs)
            response = await client.infer(request)
            saved[f"{kind}_id"] = np.array(response.id)
            saved[f"{kind}_model_version"] = np.array(response.model_version or "")
            saved.update({f"{kind}_{o.name}": o.as_numpy() for o in response.outputs})
    except grpc.RpcError as e:
        print(f"ERROR {e.code().name} {e.details()}")
        return 3
    finally:
        await client.close()
    np.savez(args.out, **saved)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
