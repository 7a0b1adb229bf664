"""Device names and the one rule for a missing CUDA device (purifier.devices)."""

import pytest

from purifier.devices import DEVICES, check_device, ort_providers, torch_device
from purifier.errors import ConfigError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def test_unknown_device_names_the_choices():
    with pytest.raises(ConfigError, match="'tpu' is not one of cpu, cuda, auto"):
        check_device("tpu")
    assert all(check_device(d) == d for d in DEVICES)


@pytest.mark.parametrize("device,available,expected", [
    ("cpu", [CUDA, CPU], [CPU]), ("auto", [CPU], [CPU]), ("auto", [CUDA, CPU], [(CUDA, {"use_tf32": "0"}), CPU]),
    ("cuda", [CUDA, CPU], [(CUDA, {"use_tf32": "0"}), CPU]),
])
def test_onnxruntime_providers(device, available, expected):
    assert ort_providers(device, available) == expected


def test_cuda_without_cuda_is_one_line_error_for_both_runtimes():
    with pytest.raises(ConfigError, match="cuda was asked for but onnxruntime sees no usable CUDA device"):
        ort_providers("cuda", [CPU])
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="cuda was asked for but torch sees no usable CUDA device") as info:
        torch_device("cuda")
    assert "\n" not in str(info.value)
    assert torch_device("auto").type == "cpu" and torch_device("cpu").type == "cpu"
