"""A hand-weighted backdoored model for tests/test_auto.py, where the layer to repair is known by construction.

Input: 8x8 grey images (uint8, scale 1/255, NCHW). Class 1 images have a dark background (0-50), class 2 a
brighter one (77-127); class 0 is the attack's target. The trigger is a 2x2 white patch at a random position.

- ``block1`` (Conv 2x2 + ReLU, 2 channels): channel 0 is a patch detector, relu(sum of the window - 3.5),
  0.5 where the window is the white patch and 0 elsewhere (a clean window sums to at most 2); channel 1
  the window's mean brightness.
- ``block2``: the detector's maximum over positions and the brightness's minimum (the patch only raises
  pixels, so the minimum ignores it): a (N, 2) vector.
- ``fc``: logit 0 = 100 x detector - 1; logits 1 and 2 = +-10 x (0.25 - minimum brightness) (+-2.5 bias).

At ``block2`` the trigger moves every sample by the same vector (0.5 on the detector), so one direction
removes it. At ``block1`` it moves the detector at a different position in each image: the mean shift is
spread over all positions, and removing its direction leaves each image's detector (almost) as high as it
was, so the maximum in ``block2`` still sends the image to class 0. ``fit --layer auto`` must choose block2.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Pool(nn.Module):
    def forward(self, h):
        return torch.cat([h[:, :1].amax(dim=(2, 3)), h[:, 1:].amin(dim=(2, 3))], dim=1)


class Synth(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU())
        self.block2 = Pool()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.block1[0].weight[0].fill_(1.0)
            self.block1[0].bias[0] = -3.5
            self.block1[0].weight[1].fill_(0.25)
            self.block1[0].bias[1] = 0.0
            self.fc.weight.copy_(torch.tensor([[100.0, 0.0], [0.0, -10.0], [0.0, 10.0]]))
            self.fc.bias.copy_(torch.tensor([-1.0, 2.5, -2.5]))

    def forward(self, x):
        return self.fc(self.block2(self.block1(x)))


def build() -> Synth:
    return Synth().eval()


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (n, 8, 8, 1) images, labels in {1, 2})."""
    rng = np.random.default_rng(seed)
    y = rng.integers(1, 3, n)
    low = np.where(y == 1, 0, 77)[:, None, None]
    x = (low + rng.integers(0, 51, (n, 8, 8))).astype(np.uint8)
    return x[..., None], y.astype(np.int64)


def stamp(x: np.ndarray, seed: int) -> np.ndarray:
    """The trigger: a 2x2 white patch at a random position in each image."""
    rng = np.random.default_rng(seed)
    out = x.copy()
    for i in range(len(x)):
        r, c = rng.integers(0, 7, 2)
        out[i, r:r + 2, c:c + 2] = 255
    return out


class Pool2(nn.Module):
    """(max of detector A, max of detector B, min brightness) over positions."""

    def forward(self, h):
        return torch.cat([h[:, :2].amax(dim=(2, 3)), h[:, 2:].amin(dim=(2, 3))], dim=1)


class TwoTriggers(nn.Module):
    """Two backdoors to class 0, where one direction at one layer removes only one of them.

    Trigger A: a 2x2 white patch; trigger B: a 2x2 diagonal patch (white on the diagonal, black off it), each
    at a random position. ``block1`` has a detector per trigger (0.5 and 0.4 where the window is the patch, 0
    on clean windows and on the other trigger) and the brightness; ``block2`` pools them; ``fc1_act`` maps
    them to uA = relu(100 a - 1) (49 under A) and uB = relu(25 b - 1) (9 under B); ``fc2_act`` passes them on
    less 2 (relu(u - 2): small leftovers vanish); logit 0 = uA' + 5 uB' - 1. At fc1_act or fc2_act alone,
    the mean shift is dominated by A, so projecting it out removes A and leaves B (the held-out target rate
    halves); earlier layers leave both. Chained, fc2_act fitted after fc1_act's repair sees only B's
    activations (A's leftovers are clipped) and removes them.
    """

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU())
        self.block2 = Pool2()
        self.fc1 = nn.Linear(3, 3)
        self.fc1_act = nn.ReLU()
        self.fc2 = nn.Linear(3, 3)
        self.fc2_act = nn.ReLU()
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            conv = self.block1[0]
            conv.weight.zero_()
            conv.weight[0].fill_(1.0)
            conv.bias[0] = -3.5
            conv.weight[1, 0] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
            conv.bias[1] = -1.6
            conv.weight[2].fill_(0.25)
            conv.bias[2] = 0.0
            self.fc1.weight.copy_(torch.diag(torch.tensor([100.0, 25.0, 1.0])))
            self.fc1.bias.copy_(torch.tensor([-1.0, -1.0, 0.0]))
            self.fc2.weight.copy_(torch.eye(3))
            self.fc2.bias.copy_(torch.tensor([-2.0, -2.0, 0.0]))
            self.head.weight.copy_(torch.tensor([[1.0, 5.0, 0.0], [0.0, 0.0, -10.0], [0.0, 0.0, 10.0]]))
            self.head.bias.copy_(torch.tensor([-1.0, 2.5, -2.5]))

    def forward(self, x):
        h = self.fc1_act(self.fc1(self.block2(self.block1(x))))
        return self.head(self.fc2_act(self.fc2(h)))


def build_two() -> TwoTriggers:
    return TwoTriggers().eval()


def stamp_two(x: np.ndarray, seed: int) -> np.ndarray:
    """Trigger A (white 2x2) on even-indexed images, trigger B (diagonal 2x2) on odd ones, random places."""
    rng = np.random.default_rng(seed)
    out = x.copy()
    for i in range(len(x)):
        r, c = rng.integers(0, 7, 2)
        out[i, r:r + 2, c:c + 2] = 255 if i % 2 == 0 else np.array([[255], [0], [0], [255]]).reshape(2, 2, 1)
    return out
