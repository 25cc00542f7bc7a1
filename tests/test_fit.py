"""fit: activation sources (PyTorch hooks, ONNX in onnxruntime, TorchScript) and their agreement."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from fire_onnx import directions as dirs
from fire_onnx import triggers
from fire_onnx.data import Images, Preprocess, load_images
from fire_onnx.errors import FireError
from fire_onnx.fit import fit_directions, load_factory, load_model, torchscript_to_onnx

PRE = Preprocess(scale=1 / 255, mean=[0.5], std=[0.5])


@pytest.fixture(scope="module")
def setup(demo_run, mnist_path):
    out, _ = demo_run
    model = load_model("fire_onnx_models.small_cnn:build_mnist", str(out / "model.pt"))
    train = load_images(mnist_path, "train")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(train))
    clean = train.subset(idx[:200])
    src = train.subset(idx[200:][train.y[idx[200:]] != 0][:20])
    trig = Images(triggers.parse("badnets").apply(src.x), src.y)
    return out, model, clean, trig, src


def test_onnx_and_pytorch_sources_agree(setup):
    out, model, clean, trig, src = setup
    proto = onnx.load(str(out / "model.onnx"))
    a = fit_directions(model, ["block2"], clean, trig, PRE, triggered_source=src, onnx_model=proto).targets[0]
    b = fit_directions(None, ["block2"], clean, trig, PRE, triggered_source=src, onnx_model=proto).targets[0]
    c = fit_directions(None, [a.tensor], clean, trig, PRE, triggered_source=src, onnx_model=proto).targets[0]
    assert a.tensor == b.tensor == c.tensor == "/block2/block2.2/MaxPool_output_0"
    assert b.module == "block2" and c.module == ""
    for t in (b, c):
        assert float(a.U[0] @ t.U[0]) > 0.9999
        np.testing.assert_allclose(a.mu, t.mu, atol=1e-4)
        np.testing.assert_allclose(a.tau, t.tau, rtol=1e-3)


def test_torchscript_source(setup, tmp_path):
    out, model, clean, trig, src = setup
    ts_path = tmp_path / "m.ts"
    torch.jit.script(model).save(str(ts_path))
    proto = torchscript_to_onnx(ts_path, PRE(clean.x[:2]))
    t = fit_directions(None, ["block2"], clean, trig, PRE, triggered_source=src, onnx_model=proto).targets[0]
    ref = fit_directions(model, ["block2"], clean, trig, PRE, triggered_source=src).targets[0]
    assert float(t.U[0] @ ref.U[0]) > 0.9999
    with pytest.raises(FireError, match="not a TorchScript"):
        torchscript_to_onnx(out / "model.pt", PRE(clean.x[:2]))


def test_subspace_and_several_layers(setup):
    out, model, clean, trig, src = setup
    d = fit_directions(model, ["block1", "fc1_act"], clean, trig, PRE, method="subspace", k=3, triggered_source=src)
    assert [t.k for t in d.targets] == [3, 3] and [t.layout for t in d.targets] == ["flat", "vector"]
    for t in d.targets:
        np.testing.assert_allclose(t.U @ t.U.T, np.eye(3), atol=1e-4)
        dirs.Directions([t]).validate()


def test_user_errors(setup, tmp_path):
    out, model, clean, trig, src = setup
    with pytest.raises(FireError, match="candidates"):
        fit_directions(model, ["block9"], clean, trig, PRE)
    with pytest.raises(FireError, match="must look like"):
        load_factory("no_colon_here")
    with pytest.raises(FireError, match="cannot import"):
        load_factory("not_a_module_xyz:build")
    with pytest.raises(FireError, match="no callable"):
        load_factory("fire_onnx_models.small_cnn:nope")
    with pytest.raises(FireError, match="do not fit"):
        load_model("fire_onnx_models.small_cnn:build_cifar", str(out / "model.pt"))
    bad = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, bad)  # a pickled module, not a state dict
    with pytest.raises(FireError, match="cannot load weights"):
        load_model("fire_onnx_models.small_cnn:build_mnist", str(bad))
    with pytest.raises(FireError, match="do not match"):
        fit_directions(model, ["block2"], clean, trig, PRE, triggered_source=clean)


def test_file_path_factory(setup):
    from conftest import REPO

    fn = load_factory(f"{REPO / 'models' / 'small_cnn.py'}:build_mnist")
    assert isinstance(fn(), torch.nn.Module)
