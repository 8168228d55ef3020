"""The ConvNet of the dataset-condensation literature, with BatchNorm so SRe2L has statistics to match."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """``depth`` blocks of conv3x3 -> BN -> ReLU -> 2x2 avg-pool, then a linear classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, depth: int = 3, width: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            channels, side = width, side // 2
        if side < 1:
            raise ValueError(f"convnet depth {depth} pools a {image_size}px image below 1px; lower model.depth")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class TinyBN(nn.Module):
    """Two conv+BN layers: the fastest model with BN statistics, for tests."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 8, **_: object):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
