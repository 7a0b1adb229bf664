"""The digits model's probabilities through a sidecar, with Triton's own clients (tritonclient's
gRPC and HTTP). Tests that use them skip without tritonclient (`pytest.importorskip`)."""

from __future__ import annotations

import numpy as np


def ask(client, x: np.ndarray, timeout: float = 60) -> np.ndarray:
    """One ModelInfer of rows x (N, 64) over an open tritonclient.grpc client."""
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("digits", [inp], client_timeout=timeout).as_numpy("probabilities")


def ask_endpoint(endpoint: str, x: np.ndarray) -> np.ndarray:
    """`ask` over a gRPC client of its own, closed afterwards."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(endpoint)
    try:
        return ask(client, x)
    finally:
        client.close()


def ask_rest(endpoint: str, x: np.ndarray) -> np.ndarray:
    """The same request over REST (tritonclient.http), with a client of its own."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(endpoint)
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("digits", [inp]).as_numpy("probabilities")
    finally:
        client.close()
