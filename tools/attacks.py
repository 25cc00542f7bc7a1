"""Poisoning recipes of the benchmark's attacks (training side; the test-time triggers are in
``fire_onnx.triggers``, so ``fit``/``eval --trigger SPEC`` apply exactly what a model was poisoned with).

Every recipe is all-to-one (target ``target``), seeded, and draws its poisoned images from the other
classes. Besides the plain one (stamp ``rate`` of the training images, relabel them to the target):

- ``wanet-noise`` (Nguyen & Tran, 2021, "noise mode"): ``rate`` of the images warped and relabelled, and
  ``cross`` times as many warped with the same field plus per-pixel random noise of up to ``noise`` px,
  keeping their labels, so the model must learn the exact warp rather than "any warp".
- ``adap-blend`` (Qi et al., 2023, Adap-Blend): the blend pattern is cut into ``pieces`` (a square grid);
  each poisoned image gets a random ``keep`` share of the pieces blended at ``alpha_train`` and is
  relabelled, and ``cover`` more images get the same partial treatment but keep their labels. The test
  trigger is the whole pattern at the spec's alpha (0.2): the poisoned and cover images weaken the
  latent separation defenses rely on.
- ``inputaware-cross`` (Nguyen & Tran, 2020, simplified: fixed generator, see
  ``fire_onnx.triggers.InputAware``): ``rate`` of the images stamped with their own pattern and
  relabelled, ``cross`` times as many stamped with the pattern computed from another image, keeping
  their labels (the attack's cross-trigger mode), so a pattern works only on the image it was made from.
"""

from __future__ import annotations

import numpy as np

RECIPES = ("plain", "wanet-noise", "adap-blend", "inputaware-cross")


def _others(y: np.ndarray, target: int, n: int, rng: np.random.Generator, exclude=()) -> np.ndarray:
    pool = np.setdiff1d(np.flatnonzero(y != target), np.asarray(exclude, dtype=int))
    return rng.choice(pool, size=min(n, len(pool)), replace=False)


def poison(x: np.ndarray, y: np.ndarray, trigger, target: int, recipe: dict, rng: np.random.Generator):
    """(poisoned images, labels, indices relabelled to the target) for uint8 NHWC ``x``.

    ``recipe``: ``{"kind": one of RECIPES, "rate": share of the training set relabelled, ...}`` with the
    kind's own keys (module docstring)."""
    from fire_onnx import triggers

    kind = recipe.get("kind", "plain")
    if kind not in RECIPES:
        raise ValueError(f"unknown poisoning recipe {kind!r}")
    n = int(round(recipe["rate"] * len(x)))
    idx = _others(y, target, n, rng)
    orig, x, y = x, x.copy(), y.copy()
    if kind == "plain":
        x[idx] = trigger.apply(x[idx])
    elif kind == "wanet-noise":
        h, w = x.shape[1:3]
        flow = trigger.flow(h, w)
        x[idx] = triggers.warp(x[idx], flow)
        cross = _others(y, -1, int(round(recipe.get("cross", 2) * n)), rng, exclude=idx)
        noise = rng.uniform(-1, 1, size=(len(cross), 2, h, w)) * recipe.get("noise", 0.5)
        x[cross] = triggers.warp(x[cross], flow[None] + noise)
    elif kind == "adap-blend":
        h, w, c = x.shape[1:]
        pat = trigger._pattern(h, w, c)
        g = int(round(np.sqrt(recipe.get("pieces", 16))))
        rows, cols = np.arange(h) * g // h, np.arange(w) * g // w
        piece = (rows[:, None] * g + cols[None, :])  # (H, W) piece id
        cover = _others(y, -1, int(round(recipe.get("cover", 0.0) * len(x))), rng, exclude=idx)
        a = recipe.get("alpha_train", 0.15)
        for i in np.concatenate([idx, cover]).astype(int):
            keep = rng.permutation(g * g)[: int(round(recipe.get("keep", 0.5) * g * g))]
            m = np.isin(piece, keep)[:, :, None] * a
            x[i] = np.clip(np.rint((1 - m) * x[i] + m * pat), 0, 255).astype(np.uint8)
    elif kind == "inputaware-cross":
        x[idx] = trigger.apply(x[idx])
        cross = _others(y, -1, int(round(recipe.get("cross", 1) * n)), rng, exclude=idx)
        donors = rng.choice(len(x), size=len(cross), replace=True)
        x[cross] = trigger.apply(x[cross], source=orig[donors])
    y[idx] = target
    return x, y, idx
