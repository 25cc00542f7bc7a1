"""A model with two backdoors, found one incident at a time (new-user run 23): a 3x3 patch to class 0 and a blend
to class 3 in one SmallCNN trained on the bundled MNIST digits. Each is fitted from its own 20 flagged images on
the original model; the second repair is added to the deployed one with ``patch --add``; onnxruntime then measures
both backdoors. Before ``--add`` the only routes were ``--replace`` (which silently re-opened the first backdoor)
and one flagged file with both kinds of image (a repair fitted for neither), both refused now."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli
from fire_onnx import triggers
from fire_onnx.fileio import sha256_file

PRE = ("--mean", "0.5", "--std", "0.5")
PATCH, BLEND = "badnets", "blended:alpha=0.2"


@pytest.fixture(scope="module")
def two(tmp_path_factory, mnist_path):
    """(folder, test images, test labels): model.onnx with both backdoors, clean.npz, flagged_a.npz, flagged_b.npz."""
    import torch

    from fire_onnx.data import Preprocess, load_images
    from fire_onnx.demo import build_arch, train_model
    from fire_onnx.fit import export_onnx

    ws = tmp_path_factory.mktemp("two")
    train, test = load_images(mnist_path, "train"), load_images(mnist_path, "test")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train))
    fit_part, clean_part = order[:3200], order[3200:]  # clean.npz: training images the model never saw
    x, y = train.x[fit_part].copy(), train.y[fit_part].copy()
    free = rng.permutation(len(x))
    a = [i for i in free if y[i] != 0][:320]
    b = [i for i in free if y[i] != 3 and i not in set(a)][:320]
    x[a], y[a] = triggers.parse(PATCH).apply(x[a]), 0
    x[b], y[b] = triggers.parse(BLEND).apply(x[b]), 3
    pre = Preprocess(mean=[0.5], std=[0.5])
    torch.set_num_threads(2)
    torch.manual_seed(0)  # the weights' initialisation: train_model seeds only after the model is built
    model = build_arch("small_cnn", 10, 1, 28)
    train_model(model, pre(x), y, epochs=6, seed=0, log=lambda *_: None)
    export_onnx(model.eval(), pre(test.x[:2]), ws / "model.onnx")
    np.savez(ws / "clean.npz", x=train.x[clean_part], y=train.y[clean_part])
    src = train.x[clean_part]
    labels = train.y[clean_part]
    np.savez(ws / "flagged_a.npz", x=triggers.parse(PATCH).apply(src[labels != 0][:20]))
    np.savez(ws / "flagged_b.npz", x=triggers.parse(BLEND).apply(src[labels != 3][-20:]))
    return ws, test.x, test.y


def rates(path, x, y) -> dict:
    """CA, and the ASR of each backdoor (triggered non-target test images at its target), in onnxruntime."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def pred(z):
        z = ((z.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2)
        return s.run(None, {s.get_inputs()[0].name: z})[0].argmax(1)

    return {"ca": float((pred(x) == y).mean()),
            "asr_a": float((pred(triggers.parse(PATCH).apply(x[y != 0])) == 0).mean()),
            "asr_b": float((pred(triggers.parse(BLEND).apply(x[y != 3])) == 3).mean())}


def test_each_incident_fitted_alone_then_added_repairs_both(two):
    ws, x, y = two
    orig = rates(ws / "model.onnx", x, y)
    assert orig["asr_a"] >= 0.9 and orig["asr_b"] >= 0.9, orig
    for name, layer in (("a", "block2"), ("b", "block1")):  # a patch at the late block, a blend at the early one
        run_cli("fit", "--onnx", "model.onnx", "--layer", layer, "--clean", "clean.npz", "--triggered",
                f"flagged_{name}.npz", *PRE, "-o", f"d_{name}.npz", cwd=ws, check=True)
    run_cli("patch", "model.onnx", "d_a.npz", "-o", "m_a.onnx", cwd=ws, check=True)
    first = rates(ws / "m_a.onnx", x, y)
    assert first["asr_a"] <= 0.05 and first["asr_b"] >= 0.9, first  # the second backdoor nobody knew of yet
    # --replace would drop the class-0 repair: refused, naming --add
    proc = run_cli("patch", "--replace", "m_a.onnx", "d_b.npz", "-o", "m_r.onnx", cwd=ws)
    assert proc.returncode == 1 and "class 0" in proc.stderr and "patch --add" in proc.stderr, proc.stderr
    run_cli("patch", "--add", "m_a.onnx", "d_b.npz", "-o", "m_ab.onnx", cwd=ws, check=True)
    both = rates(ws / "m_ab.onnx", x, y)
    assert both["asr_a"] <= 0.05 and both["asr_b"] <= 0.05, both
    assert orig["ca"] - both["ca"] <= 0.01, (orig, both)
    view = run_cli("inspect", "m_ab.onnx", cwd=ws, check=True).stdout
    assert "for class 0" in view and "for class 3" in view and "targets 0, 3" in view
    # each repair names the directions file it came from (the model-wide record holds only the last one's)
    assert all(f"directions {sha256_file(ws / f'd_{n}.npz')[:12]}" in view for n in "ab"), view
    # one file with both kinds of flagged image: refused, not fitted for neither
    a, b = np.load(ws / "flagged_a.npz")["x"], np.load(ws / "flagged_b.npz")["x"]
    np.savez(ws / "mixed.npz", x=np.concatenate([a[:10], b[:10]]))
    mixed = run_cli("fit", "--onnx", "model.onnx", "--layer", "block2", "--clean", "clean.npz", "--triggered",
                    "mixed.npz", *PRE, "-o", "d_mix.npz", cwd=ws)
    assert mixed.returncode == 1 and "go to two classes" in mixed.stderr and not (ws / "d_mix.npz").exists()
    # ... also when --n-clean takes every clean image and the held-out check is skipped (the refusal ran inside it)
    n_all = str(len(np.load(ws / "clean.npz")["x"]))
    mixed = run_cli("fit", "--onnx", "model.onnx", "--layer", "block2", "--clean", "clean.npz", "--triggered",
                    "mixed.npz", "--n-clean", n_all, *PRE, "-o", "d_mix.npz", cwd=ws)
    assert mixed.returncode == 1 and "go to two classes" in mixed.stderr and not (ws / "d_mix.npz").exists(), (
        mixed.stderr)
