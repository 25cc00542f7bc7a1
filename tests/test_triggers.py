from __future__ import annotations

import numpy as np
import pytest

from fire_onnx import triggers
from fire_onnx.errors import FireError


def imgs(c=1, n=4, s=28):
    return np.random.default_rng(0).integers(0, 200, size=(n, s, s, c)).astype(np.uint8)


def test_badnets_default_patch_bottom_right():
    x = imgs()
    y = triggers.parse("badnets").apply(x)
    assert (y[:, 24:27, 24:27, :] == 255).all()
    mask = np.ones_like(x, bool)
    mask[:, 24:27, 24:27, :] = False
    assert (y[mask] == x[mask]).all() and y.dtype == np.uint8
    assert (x == imgs()).all(), "the input must not be modified"


def test_badnets_options():
    y = triggers.parse("badnets:size=4,pos=tl,value=0,margin=0,pattern=checker").apply(imgs(3, s=32))
    assert y[0, 0, 0, 0] == 0 and y[0, 0, 1, 0] == 255 and y.shape == (4, 32, 32, 3)


def test_blended_is_seeded_and_alpha_weighted():
    x = imgs(3, s=32)
    a = triggers.parse("blended:alpha=0.2,seed=3").apply(x)
    b = triggers.parse("blended:alpha=0.2,seed=3").apply(x)
    c = triggers.parse("blended:alpha=0.2,seed=4").apply(x)
    assert (a == b).all() and (a != c).any()
    diff = np.abs(a.astype(int) - x.astype(int))
    assert diff.max() <= 0.2 * 255 + 1


def test_blended_pattern_file(tmp_path):
    pat = np.full((28, 28), 255, np.uint8)
    np.save(tmp_path / "p.npy", pat)
    y = triggers.parse(f"blended:pattern={tmp_path / 'p.npy'},alpha=1.0").apply(imgs())
    assert (y == 255).all()


def test_sig_changes_columns():
    y = triggers.parse("sig:delta=20,freq=6").apply(np.full((1, 28, 28, 1), 100, np.uint8))
    assert len(np.unique(y[0, 0, :, 0])) > 5 and (y[0, :, 3, 0] == y[0, 0, 3, 0]).all()


@pytest.mark.parametrize("spec,match", [
    ("warp", "unknown trigger"),
    ("badnets:size=abc", "must be int"),
    ("badnets:colour=1", "bad trigger option"),
    ("badnets:pos=middle", "pos"),
    ("badnets:margin=-1", "margin >= 0"),  # a traceback from numpy's broadcast (new-user run 27)
    ("badnets:pos=random,margin=-1", "margin >= 0"),
    ("blended:alpha=0", "alpha"),
])
def test_bad_specs(spec, match):
    with pytest.raises(FireError, match=match):
        triggers.parse(spec)


def test_patch_too_large_and_pattern_missing():
    with pytest.raises(FireError, match="does not fit"):
        triggers.parse("badnets:size=40").apply(imgs())
    with pytest.raises(FireError, match="not found"):
        triggers.parse("blended:pattern=/nonexistent.npy").apply(imgs())


def test_wanet_warps_smoothly_and_is_seeded():
    x = imgs(3, s=32)
    t = triggers.parse("wanet:k=4,s=2,seed=1")
    y = t.apply(x)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert (y == triggers.parse("wanet:k=4,s=2,seed=1").apply(x)).all()
    assert not (y == triggers.parse("wanet:k=4,s=2,seed=2").apply(x)).all()
    # a constant image stays constant under any warp; a gradient image moves by the flow
    flat = np.full((1, 32, 32, 1), 77, np.uint8)
    assert (t.apply(flat) == 77).all()
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 4, (32, 1, 1))[None]
    flow = t.flow(32, 32)
    inner = (slice(4, 28), slice(4, 28))
    moved = t.apply(ramp)[0, :, :, 0].astype(float)[inner] / 4 - np.arange(32)[None, :][:, 4:28]
    assert np.abs(moved - flow[1][inner]).max() < 0.2
    assert 0 < np.abs(flow).max() <= 2 * 2  # s=2: at most s * max|noise| / 2 px with max|noise| <= 2 after scaling
    with pytest.raises(FireError):
        triggers.parse("wanet:k=1")


def test_warp_takes_one_field_per_image():
    x = imgs(1, n=3, s=32)
    t = triggers.parse("wanet:k=4,s=2,seed=1")
    flow = t.flow(32, 32)
    assert (triggers.warp(x, np.stack([flow] * 3)) == t.apply(x)).all()
    zero = np.zeros((3, 2, 32, 32))
    assert (triggers.warp(x, zero) == x).all()  # no displacement, no change


def test_inputaware_is_sample_specific_and_seeded():
    x = imgs(3, n=4, s=32)
    t = triggers.parse("inputaware:seed=2,density=0.06")
    y = t.apply(x)
    m = t.mask(32, 32)[:, :, 0] > 0
    assert abs(m.mean() - 0.06) < 0.01
    assert (y[:, ~m] == x[:, ~m]).all()  # only the mask's pixels change
    assert not (y[0][m] == y[1][m]).all()  # each image carries its own pattern
    assert (y == triggers.parse("inputaware:seed=2").apply(x)).all()
    assert not (y == triggers.parse("inputaware:seed=3").apply(x)).all()
    # another image's pattern (the attack's cross samples) differs from the image's own
    assert not (t.apply(x[:1], source=x[1:2]) == y[:1]).all()
    with pytest.raises(FireError, match="density"):
        triggers.parse("inputaware:density=0.9")


def test_wanet_grid_file_matches_torch_grid_sample(tmp_path):
    """A user's own WaNet warp, saved as the grid its training code feeds grid_sample, warps exactly as
    grid_sample does (up to uint8 rounding)."""
    torch = pytest.importorskip("torch")
    x = imgs(3, n=2, s=32)
    rng = np.random.default_rng(4)
    k, s, h = 4, 0.5, 32
    noise = torch.from_numpy(rng.uniform(-1, 1, size=(1, 2, k, k)).astype(np.float32))
    noise = noise / noise.abs().mean()
    noise = torch.nn.functional.interpolate(noise, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, h)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    identity = torch.stack((yy, xx), 2)[None]
    grid = torch.clamp(identity + 4 * s * noise / h, -1, 1)  # WaNet's code (4x the strength, to see it)
    np.save(tmp_path / "grid.npy", grid.numpy())
    ref = torch.nn.functional.grid_sample(torch.from_numpy(x).permute(0, 3, 1, 2).float(), grid.repeat(2, 1, 1, 1),
                                          align_corners=True).permute(0, 2, 3, 1).numpy()
    got = triggers.parse(f"wanet:grid={tmp_path / 'grid.npy'}").apply(x).astype(float)
    assert np.abs(got - ref).max() <= 0.51 + 1e-3
    assert np.abs(got - x).mean() > 1  # it did warp
    flow = triggers.parse(f"wanet:grid={tmp_path / 'grid.npy'}").flow(32, 32)
    np.save(tmp_path / "flow.npy", flow)  # the same warp as a displacement field in pixels
    assert (triggers.parse(f"wanet:grid={tmp_path / 'flow.npy'}").apply(x) == got).all()
    np.save(tmp_path / "bad.npy", np.zeros((5, 5)))
    with pytest.raises(FireError, match="has shape"):
        triggers.parse(f"wanet:grid={tmp_path / 'bad.npy'}").apply(x)
    with pytest.raises(FireError, match="not found"):
        triggers.parse("wanet:grid=/nonexistent.npy").apply(x)


def test_badnets_at_random_places():
    """pos=random: a sticker that lands anywhere (new-user run 25 could not write it, so eval --trigger checked a
    moving sticker's repair only at fixed places). One seeded place per image, inside the margin; the records of
    fixed-place patches carry no seed (older records stay the same trigger)."""
    import numpy as np

    x = np.zeros((200, 28, 28, 1), np.uint8)
    trig = triggers.parse("badnets:pos=random,size=4,margin=2,seed=3")
    y = trig.apply(x)
    corners = np.array([np.argwhere(img[:, :, 0] > 0).min(axis=0) for img in y])
    assert (y.reshape(200, -1) > 0).sum(axis=1).tolist() == [16] * 200  # one whole 4x4 patch each
    assert corners.min() >= 2 and corners.max() <= 28 - 2 - 4
    assert len({tuple(c) for c in corners}) > 100  # places differ from image to image
    np.testing.assert_array_equal(y, trig.apply(x))  # seeded
    assert not np.array_equal(y, triggers.parse("badnets:pos=random,size=4,margin=2,seed=4").apply(x))
    assert triggers.describe(trig)["seed"] == 3 and "seed" not in triggers.describe(triggers.parse("badnets"))
    with pytest.raises(FireError, match="does not fit"):
        triggers.parse("badnets:pos=random,size=20,margin=5").apply(x)
