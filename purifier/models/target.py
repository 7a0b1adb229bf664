"""The target: a classifier trained on the `train` split, exported to ONNX with a `model.json`.

A target directory holds `model.onnx`, `model.json`, `splits.npz` and `splits.json`. The ONNX
graph takes `input` (N, D) FP32 and returns `probabilities` (N, C) and `logits` (N, C) FP32;
`model.json` records names, shapes, class order, dataset, split seed, the ONNX sha256 (the
model's identity for defenses) and library versions, and is checked on every load.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from purifier.artifacts import (
    atomic_directory,
    check_file_hash,
    library_versions,
    read_json,
    require_keys,
    sha256_file,
    write_json,
)
from purifier.data import Dataset, Splits, load_dataset, make_splits
from purifier.errors import ArtifactError

FORMAT_VERSION = 1
INPUT_NAME, PROBS_NAME, LOGITS_NAME = "input", "probabilities", "logits"

# dataset -> (architecture, epochs)
RECIPES: dict[str, tuple[str, int]] = {
    "digits": ("mlp", 150),
    "mnist5k": ("cnn", 60),
    "breast_cancer": ("mlp", 300),
    "synthetic100": ("mlp", 80),
    "purchase_like": ("mlp", 20),
}
PARITY_TOLERANCE = 1e-5


def _target_module(model):
    import torch

    class WithProbabilities(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            logits = self.inner(x)
            return torch.softmax(logits, dim=1), logits

    return WithProbabilities(model).eval()


def train_target(dataset_name: str, out: str | Path, seed: int = 0, epochs: int | None = None,
                 progress: bool = True) -> Target:
    """Train, export, check ONNX against torch, and write the target directory atomically."""
    from purifier.artifacts import check_output_dir
    from purifier.models.onnx_runner import OnnxClassifier, export_onnx
    from purifier.models.training import TrainConfig, predict_proba, train_classifier

    out = check_output_dir(out)
    data = load_dataset(dataset_name)
    splits = make_splits(data, seed)
    arch, default_epochs = RECIPES.get(dataset_name, ("mlp", 100))
    config = TrainConfig(arch=arch, epochs=epochs or default_epochs)
    X_train, y_train = splits.take(data, "train")
    t0 = time.perf_counter()
    model = train_classifier(X_train, y_train, data.n_classes, config, seed, data.image_shape,
                             label=f"target {dataset_name}", progress=progress)
    train_seconds = time.perf_counter() - t0
    wrapped = _target_module(model)

    import torch

    onnx_bytes = export_onnx(wrapped, (torch.zeros(2, data.n_features),), [INPUT_NAME], [PROBS_NAME, LOGITS_NAME])
    # ORT must reproduce torch on everything the target will ever be asked about here.
    ort_probs = OnnxClassifier(onnx_bytes).run(data.X)[PROBS_NAME]
    torch_probs = predict_proba(model, data.X)
    diff = float(np.abs(ort_probs.astype(np.float64) - torch_probs).max())
    if diff > PARITY_TOLERANCE:
        raise ArtifactError(f"onnxruntime differs from torch by {diff:.2e} (> {PARITY_TOLERANCE}); not written")

    pred = torch_probs.argmax(axis=1)
    accuracy = {role: float((pred[splits.indices[role]] == data.y[splits.indices[role]]).mean())
                for role in ("train", "eval_members", "eval_nonmembers", "reference", "attacker")}
    with atomic_directory(out) as tmp:
        (tmp / "model.onnx").write_bytes(onnx_bytes)
        splits.save(tmp)
        write_json(tmp / "model.json", {
            "format_version": FORMAT_VERSION,
            "dataset": data.name,
            "kind": data.kind,
            "image_shape": list(data.image_shape) if data.image_shape else None,
            "n_features": data.n_features,
            "n_classes": data.n_classes,
            "class_order": list(range(data.n_classes)),
            "input": {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, data.n_features]},
            "outputs": {
                PROBS_NAME: {"datatype": "FP32", "shape": [-1, data.n_classes], "kind": "probabilities"},
                LOGITS_NAME: {"datatype": "FP32", "shape": [-1, data.n_classes], "kind": "logits"},
            },
            "confidence_output": PROBS_NAME,
            "split_seed": seed,
            "onnx_sha256": sha256_file(tmp / "model.onnx"),
            "architecture": arch,
            "training": {**asdict(config), "seconds": round(train_seconds, 2)},
            "accuracy": accuracy,
            "ort_torch_max_abs_diff": diff,
            "versions": library_versions(),
        })
    return Target.load(out)


@dataclass
class Target:
    """A loaded, hash-checked target directory."""

    directory: Path
    manifest: dict

    @classmethod
    def load(cls, directory: str | Path) -> Target:
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"target directory {directory} does not exist (create it with purifier train-target)")
        manifest = read_json(directory / "model.json", "model.json")
        require_keys(manifest, ("format_version", "dataset", "n_classes", "n_features", "input", "outputs",
                                "confidence_output", "onnx_sha256"), f"{directory}/model.json")
        if manifest["format_version"] != FORMAT_VERSION:
            raise ArtifactError(f"{directory}/model.json: format_version {manifest['format_version']} unsupported")
        check_file_hash(directory / "model.onnx", manifest["onnx_sha256"], f"{directory}/model.json")
        return cls(directory, manifest)

    @property
    def model_id(self) -> str:
        return self.manifest["onnx_sha256"]

    @property
    def n_classes(self) -> int:
        return int(self.manifest["n_classes"])

    @property
    def onnx_path(self) -> Path:
        return self.directory / "model.onnx"

    @cached_property
    def dataset(self) -> Dataset:
        return load_dataset(self.manifest["dataset"])

    @cached_property
    def splits(self) -> Splits:
        if not (self.directory / "splits.json").is_file():
            raise ArtifactError(f"target directory {self.directory} has no splits.json/splits.npz")
        return Splits.load(self.directory, self.dataset)

    def classifier(self, device: str = "cpu"):
        from purifier.models.onnx_runner import OnnxClassifier

        return OnnxClassifier(self.onnx_path, device=device)

    def predict_proba(self, X: np.ndarray, device: str = "cpu") -> np.ndarray:
        """(N, D) -> (N, C) float64 probabilities from the ONNX model."""
        return self.classifier(device).run(np.ascontiguousarray(X, np.float32))[PROBS_NAME].astype(np.float64)

    def role(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        return self.splits.take(self.dataset, role)
