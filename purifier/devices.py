"""Compute devices: the one list of names, and the one rule when CUDA is asked for and missing.

`cpu` runs on the CPU, `auto` takes CUDA when this process can use it and the CPU otherwise,
`cuda` insists: without a usable CUDA device it is a one-line `ConfigError` at start-up, never a
silent fall-back to the CPU (a user who asked for the GPU must learn that they are not on it).
torch (training, MemGuard's faithful solver) and onnxruntime (models, PURIFIER's reformer,
MemGuard's fast solver) both resolve names here; this module imports neither until asked.
"""

from __future__ import annotations

from purifier.errors import ConfigError

DEVICES = ("cpu", "cuda", "auto")


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ConfigError(f"device: {device!r} is not one of {', '.join(DEVICES)}")
    return device


def cuda_missing(runtime: str) -> ConfigError:
    return ConfigError(f"device: cuda was asked for but {runtime} sees no usable CUDA device; "
                       "use --device cpu (or auto)")


def torch_device(device: str):
    """torch.device for a device name (needs torch, the full install)."""
    import torch

    check_device(device)
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise cuda_missing("torch")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu")


# float32 matrix products in float32: TF32 tensor cores (on by default on Ampere and later) keep 10
# bits of mantissa, which would move MemGuard's probe decisions and PURIFIER's outputs away from
# the CPU's far more than float32 rounding does.
CUDA_OPTIONS = {"use_tf32": "0"}


def ort_providers(device: str, available: list[str]) -> list:
    """onnxruntime execution providers for a device name, given the providers ORT offers
    (the CUDA provider with its options, then the CPU)."""
    check_device(device)
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not cuda:
        raise cuda_missing("onnxruntime")
    if device != "cpu" and cuda:
        return [("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
