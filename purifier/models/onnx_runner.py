"""Running ONNX models with onnxruntime, and exporting torch models to ONNX.

`OnnxClassifier` is how everything in Purifier runs a model: the target (fit-defense, the
embedded sidecar backend) and PURIFIER's served reformer. Device names and the rule for a missing
CUDA device are `purifier.devices`'; onnxruntime releases the GIL in `run`, so callers may run it in a thread.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from purifier.devices import cuda_missing, ort_providers
from purifier.errors import ArtifactError, ConfigError
from purifier.threads import THREADS


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "onnxruntime is not installed: pip install 'purifier[cpu]' (or 'purifier[gpu]' for CUDA)"
        ) from None
    return onnxruntime


def providers_for(device: str) -> list[str]:
    """ORT execution providers for a device name (`purifier.devices`: cuda without CUDA is an error)."""
    return ort_providers(device, _ort().get_available_providers())


class OnnxClassifier:
    """A loaded ONNX graph. `run(x)` -> {output name: array}; `__call__` returns the first output."""

    def __init__(self, model: str | Path | bytes, device: str = "cpu"):
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = THREADS
        opts.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise ArtifactError(f"ONNX model {model} does not exist")
        try:
            self.session = ort.InferenceSession(source, opts, providers=providers_for(device))
        except ConfigError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise ArtifactError(f"cannot load ONNX model {model if not isinstance(model, bytes) else '<bytes>'}: "
                                f"{str(e).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        # onnxruntime-gpu lists the CUDA provider even without CUDA libraries, then falls back
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            raise cuda_missing("onnxruntime")

    def run(self, *inputs: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        feed = dict(zip(self.input_names, inputs, strict=True))
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feed), strict=True))

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names[:1], dict(zip(self.input_names, inputs, strict=True)))[0]


def export_onnx(module, example_inputs: tuple, input_names: list[str], output_names: list[str]) -> bytes:
    """Export a torch module to ONNX bytes with a dynamic batch axis and weights inside the file.

    Uses the TorchScript exporter (`dynamo=False`): it needs no onnxscript and never writes
    external weight files.
    """
    import torch

    buf = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with torch.no_grad():
        # torch annotates `f` as a path; its TorchScript exporter writes to file objects as well
        torch.onnx.export(module, example_inputs, buf, input_names=input_names,  # type: ignore[arg-type]
                          output_names=output_names, dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return buf.getvalue()
