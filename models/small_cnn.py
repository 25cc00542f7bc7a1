"""A small CNN (2 conv blocks + 2 fully connected layers) for 28x28 / 32x32 images."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv(32)-relu-pool, conv(64)-relu-pool, fc(128)-relu, fc(classes).

    Module paths worth repairing: ``block1``, ``block2`` (post-pool block outputs, NCHW) and
    ``fc1_act`` (N, 128).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: int = 32):
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        side = image_size // 4
        self.fc1 = nn.Linear(2 * width * side * side, 128)
        self.fc1_act = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(x))
        x = self.fc1_act(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def build(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def build_mnist() -> SmallCNN:
    """Factory with no arguments for ``--model``: 1x28x28 inputs, 10 classes."""
    return SmallCNN(10, 1, 28)


def build_cifar() -> SmallCNN:
    """Factory with no arguments for ``--model``: 3x32x32 inputs, 10 classes."""
    return SmallCNN(10, 3, 32)


def build_gtsrb() -> SmallCNN:
    """Factory with no arguments for ``--model``: 3x32x32 inputs, the 43 GTSRB classes."""
    return SmallCNN(43, 3, 32)
