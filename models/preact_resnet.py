"""PreAct-ResNet18 (He et al., 2016, "Identity Mappings in Deep Residual Networks") for 32x32 inputs.

The BackdoorBench reference architecture. Module paths: ``layer1`` .. ``layer4`` (NCHW block
outputs), ``avgpool`` output flattened to (N, 8 * width) feeds ``linear`` (width 64: the reference;
smaller widths keep the structure for CPU training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        w = width  # 64 is the reference network; a smaller width keeps the depth and structure, for CPU training
        self.in_planes = w
        self.conv1 = nn.Conv2d(in_channels, w, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(w, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * w, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * w, num_blocks[2], 2)
        self.layer4 = self._make_layer(8 * w, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(8 * w)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(8 * w, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def build(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width)


def build_cifar() -> PreActResNet:
    return build(10, 3)


def build_gtsrb() -> PreActResNet:
    return build(43, 3)
