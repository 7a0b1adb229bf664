"""KServe's own REST client (`kserve.InferenceRESTClient`, protocol v2) as a test client of the sidecar.

Runs in .venv-kserve (kserve cannot share the project's environment), so the test starts it as
a subprocess:

    python kserve_rest_client.py http://HOST:PORT MODEL INPUT_NAME ROWS.npy OUT.npz

Asks model readiness, then sends the rows twice as one FP32 request, first as JSON tensors and
then as binary tensors (Triton's extension, `InferInput.set_data_from_numpy(binary_data=True)`),
and saves every output of both answers (`json_<name>`, `binary_<name>`) with the answers' ids; an
HTTP error prints `ERROR <status> <body>` and exits 3.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("url", "model", "input", "rows", "out"):
        p.add_argument(name)
    args = p.parse_args()
    x = np.load(args.rows).astype(np.float32)
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    saved = {}
    try:
        saved["ready"] = np.array(await client.is_model_ready(args.url, args.model))
        for kind in ("json", "binary"):
            tensor = InferInput(name=args.input, shape=list(x.shape), datatype="FP32")
            tensor.set_data_from_numpy(x, binary_data=kind == "binary")
            request = InferRequest(model_name=args.model, infer_inputs=[tensor], request_id=f"kserve-{kind}")
            response = await client.infer(args.url, request, model_name=args.model)
            saved[f"{kind}_id"] = np.array(response.id)
            saved.update({f"{kind}_{o.name}": o.as_numpy() for o in response.outputs})
    except httpx.HTTPStatusError as e:
        print(f"ERROR {e.response.status_code} {e.response.text}")
        return 3
    finally:
        await client.close()
    np.savez(args.out, **saved)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
