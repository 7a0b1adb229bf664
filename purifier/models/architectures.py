"""Target and shadow model architectures (torch).

Every model takes flat float32 rows (N, D) and returns logits (N, C); image models reshape to
(N, channels, height, width) inside, so clients and the wire format are the same for all.
"""

from __future__ import annotations

import torch
from torch import nn

from purifier.errors import ConfigError


class TabularMLP(nn.Module):
    def __init__(self, n_features: int, n_classes: int, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks and two dense layers; for 28x28 (or larger) single-channel images."""

    def __init__(self, image_shape: tuple[int, int, int], n_classes: int, width: int = 16):
        super().__init__()
        c, h, w = image_shape
        self.image_shape = tuple(image_shape)
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), 128), nn.ReLU(),
            nn.Linear(128, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, *self.image_shape)))


ARCHITECTURES = ("mlp", "cnn")


def build_model(arch: str, n_features: int, n_classes: int,
                image_shape: tuple[int, int, int] | None = None) -> nn.Module:
    if arch == "mlp":
        return TabularMLP(n_features, n_classes)
    if arch == "cnn":
        if image_shape is None or image_shape[1] < 8:
            raise ConfigError("arch: 'cnn' needs an image dataset of at least 8x8 pixels")
        return SmallCNN(image_shape, n_classes)
    raise ConfigError(f"arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
