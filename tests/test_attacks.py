"""The benchmark's poisoning recipes (tools/attacks.py): who is relabelled, who keeps the label, what changes."""

import sys
from pathlib import Path

import numpy as np
import pytest

from fire_onnx import triggers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import attacks  # noqa: E402


def data(n=400, s=16, c=3):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, s, s, c)).astype(np.uint8), rng.integers(0, 4, size=n)


def changed(a, b):
    return np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))


def test_plain_recipe_stamps_and_relabels_other_classes():
    x, y = data()
    px, py, idx = attacks.poison(x, y, triggers.parse("badnets"), 0, {"kind": "plain", "rate": 0.1},
                                 np.random.default_rng(1))
    assert len(idx) == 40 and (y[idx] != 0).all() and (py[idx] == 0).all()
    assert set(changed(px, x)) == set(idx)
    assert (np.delete(py, idx) == np.delete(y, idx)).all()


def test_wanet_noise_mode_warps_cross_samples_keeping_labels():
    x, y = data()
    t = triggers.parse("wanet:k=4,s=2")
    px, py, idx = attacks.poison(x, y, t, 0, {"kind": "wanet-noise", "rate": 0.05, "cross": 2, "noise": 0.5},
                                 np.random.default_rng(1))
    assert (px[idx] == t.apply(x[idx])).all()  # poisoned: exactly the test-time warp
    cross = np.setdiff1d(changed(px, x), idx)
    assert 30 <= len(cross) <= 40  # 2 x 20 (a warp can leave an image unchanged only by chance)
    assert (py[cross] == y[cross]).all()
    assert not (px[cross] == t.apply(x[cross])).all()  # the noise makes them differ from the trigger


def test_adap_blend_applies_partial_pieces_to_poisoned_and_cover_images():
    x, y = data()
    t = triggers.parse("blended:alpha=0.2,seed=5")
    recipe = {"kind": "adap-blend", "rate": 0.05, "cover": 0.05, "pieces": 16, "keep": 0.5, "alpha_train": 0.15}
    px, py, idx = attacks.poison(x, y, t, 0, recipe, np.random.default_rng(1))
    ch = changed(px, x)
    assert set(idx) <= set(ch) and len(ch) == 40
    cover = np.setdiff1d(ch, idx)
    assert (py[cover] == y[cover]).all() and (py[idx] == 0).all()
    # half of the 16 pieces (4x4 grid of 4x4 pixels): about half the pixels of each image change
    frac = (px[idx] != x[idx]).any(axis=-1).mean(axis=(1, 2))
    assert np.all((frac > 0.3) & (frac <= 0.5))


def test_inputaware_cross_samples_carry_another_images_pattern():
    x, y = data(s=32)
    t = triggers.parse("inputaware")
    px, py, idx = attacks.poison(x, y, t, 0, {"kind": "inputaware-cross", "rate": 0.05, "cross": 1},
                                 np.random.default_rng(1))
    assert (px[idx] == t.apply(x[idx])).all()
    cross = np.setdiff1d(changed(px, x), idx)
    assert len(cross) == 20 and (py[cross] == y[cross]).all()
    assert not (px[cross] == t.apply(x[cross])).all()


def test_unknown_recipe():
    x, y = data()
    with pytest.raises(ValueError, match="unknown poisoning recipe"):
        attacks.poison(x, y, triggers.parse("badnets"), 0, {"kind": "nope", "rate": 0.1}, np.random.default_rng(0))
