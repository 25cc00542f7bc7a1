"""The Python API checks what the command line checks (new-user run 17): images and labels built in Python,
FitRequest's ranges, apply_in_torch called twice or on another model, and Directions compared with ==.

Real bundled MNIST digits and the demo's backdoored model.
"""

from __future__ import annotations

import numpy as np
import pytest

from fire_onnx import directions as dirs
from fire_onnx import triggers
from fire_onnx.data import Images, Preprocess, bundled_mnist, check_images, load_images
from fire_onnx.errors import FireError

PRE = Preprocess(scale=1 / 255, mean=[0.5], std=[0.5], layout="NCHW")


def test_images_built_in_python_are_checked():
    test = load_images(bundled_mnist(), "test")
    with pytest.raises(FireError, match=r"uint8 raw pixels .* np.round\(x \* 255\)"):
        check_images(Images(test.x.astype(np.float32) / 255, test.y))  # was CA 10 % and a repair doing nothing
    with pytest.raises(FireError, match="numpy array"):
        check_images(Images(list(test.x[:3]), test.y[:3]))
    with pytest.raises(FireError, match="one per image"):
        check_images(Images(test.x[:5], test.y[:4]))
    flat = check_images(Images(test.x[:5], test.y[:5, None]))  # (N, 1) labels broadcast to N x N before
    assert flat.y.shape == (5,) and flat.y.dtype == np.int64
    grey = check_images(Images(test.x[:5, :, :, 0], test.y[:5].astype(np.float32)))  # (N, H, W), float labels
    assert grey.x.shape == (5, 28, 28, 1) and grey.y.dtype == np.int64
    same = Images(test.x[:5], test.y[:5].astype(np.int64))
    assert check_images(same) is same


def test_compute_metrics_and_fit_directions_refuse_what_would_mislead(demo_run):
    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.fit import fit_directions, load_model

    out, _ = demo_run
    test = load_images(bundled_mnist(), "test").subset(slice(0, 200))
    sess = session(out / "model.onnx")
    with pytest.raises(FireError, match="uint8"):
        compute_metrics(sess, Images(test.x / 255.0, test.y), PRE)
    with pytest.raises(FireError, match="std must be non-zero"):
        compute_metrics(sess, test, Preprocess(scale=1 / 255, mean=[0.5], std=[0.0]))
    with pytest.raises(FireError, match="target must be a class index"):
        compute_metrics(sess, test, PRE, Images(test.x, test.y), target="0")
    by_path = compute_metrics(str(out / "model.onnx"), Images(test.x, test.y[:, None]), PRE)  # a path, (N, 1) labels
    assert by_path.ca == compute_metrics(sess, test, PRE).ca and by_path.ca > 0.9
    model = load_model("fire_onnx_models.small_cnn:build_mnist", str(out / "model.pt"))
    trig = Images(triggers.parse("badnets").apply(test.x[test.y != 0][:20]))
    with pytest.raises(FireError, match="layers must be a list"):
        fit_directions(model, "block2", test, trig, PRE)
    with pytest.raises(FireError, match="clean images: images must be uint8"):
        fit_directions(model, ["block2"], Images(test.x / 255.0, test.y), trig, PRE)


def test_fit_request_checks_the_cli_ranges(demo_run):
    from fire_onnx.fit.pipeline import FitRequest, run_fit

    out, _ = demo_run
    base = dict(layers=["block2"], clean_path=str(bundled_mnist()), onnx_path=str(out / "model.onnx"),
                trigger_spec="badnets", target=0, mean=[0.5], std=[0.5])
    for field, bad in (("n_triggered", -1), ("n_clean", 0), ("batch_size", 0), ("n_triggered", 2.5)):
        with pytest.raises(FireError, match=f"{field} must be an integer >= "):
            run_fit(FitRequest(**{**base, field: bad}))  # n_triggered=-1 had fitted on 3148 images


def test_apply_in_torch_twice_is_refused_and_another_model_is_named(demo_run):
    import torch

    from fire_onnx.fit import apply_in_torch, load_model

    out, _ = demo_run
    d = dirs.load(out / "directions.npz")
    model = load_model("fire_onnx_models.small_cnn:build_mnist", str(out / "model.pt"))
    handles = apply_in_torch(model, d)
    with pytest.raises(FireError, match="already carries a fire-onnx repair"):
        apply_in_torch(model, d)  # stacked, a translation moved inputs twice (CA 74.5 -> 35 %)
    for h in handles:
        h.remove()
    again = apply_in_torch(model, d)  # once removed, it applies again
    for h in again:
        h.remove()
    assert d != dirs.load(out / "directions.npz") and d == d  # identity, not an array comparison that raises
    # directions of another width: a clear error at the forward pass, not a raw torch size mismatch
    t = d.targets[0]
    t.U, t.mu = t.U[:, :100].copy(), t.mu[:100].copy()
    t.U /= np.linalg.norm(t.U, axis=1, keepdims=True)
    hs = apply_in_torch(model, d)
    try:
        with pytest.raises(FireError, match="do not fit: they were fitted on another model or module"):
            with torch.no_grad():
                model(torch.zeros((2, 1, 28, 28)))
    finally:
        for h in hs:
            h.remove()


def test_label_files_in_other_forms(tmp_path):
    """One-hot labels get a one-line error that says what to save (new-user run 21 got 'labels must be integers');
    whole numbers stored as floats are read as the class indices they spell, as check_images reads them."""
    test = load_images(bundled_mnist(), "test").subset(slice(0, 50))
    onehot = np.eye(10, dtype=np.float32)[test.y]
    np.savez(tmp_path / "onehot.npz", x=test.x, y=onehot)
    with pytest.raises(FireError, match=r"one-hot \(\[50, 10\]\).*y.argmax\(axis=1\)"):
        load_images(tmp_path / "onehot.npz")
    np.savez(tmp_path / "float.npz", x=test.x, y=test.y.astype(np.float32))
    got = load_images(tmp_path / "float.npz")
    assert got.y.dtype == np.int64 and (got.y == test.y).all()
    np.savez(tmp_path / "frac.npz", x=test.x, y=test.y + 0.5)
    with pytest.raises(FireError, match="labels must be integers"):
        load_images(tmp_path / "frac.npz")
