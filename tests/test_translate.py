"""The FIRE paper's translation operator (``fit --repair translate``): estimate, directions file, ONNX
patch against numpy and PyTorch references, and the console script end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import run_cli, torch_repaired

from fire_onnx import directions as dirs
from fire_onnx.errors import FireError
from fire_onnx.estimate import fit_target
from fire_onnx.patch import patch_model, patched_targets
from fire_onnx.probe import TensorReader

TRT_SAFE_OPS = {"Reshape", "Shape", "Gemm", "MatMul", "Sub", "Greater", "Where", "Cast"}
TENSOR = "/block2/block2.2/MaxPool_output_0"


def translate_target(d, k, layout, module, gate, seed=0, alpha=1.0, feature_shape=None):
    rng = np.random.default_rng(seed)
    U = dirs.orthonormalize(rng.normal(size=(k, d))).astype(np.float32)
    return dirs.Target(mu=rng.normal(size=d).astype(np.float32) * 0.1, U=U, tau=np.full(k, 0.05, np.float32),
                       alpha=np.full(k, alpha, np.float32), layout=layout, gate=gate, module=module,
                       feature_shape=feature_shape or [], repair="translate",
                       shift=rng.uniform(0.5, 2.0, size=k).astype(np.float32))


def repaired_tensors(patched: onnx.ModelProto, x: np.ndarray):
    """(input h, output y) of the (single) repair in ``patched``, read in onnxruntime."""
    rec = patched_targets(patched)[0]
    acts, _ = TensorReader(patched, [rec["tensor"], rec["output"]], batch_size=len(x))(x)
    return acts[rec["tensor"]], acts[rec["output"]]


def ort_logits(proto, x):
    from fire_onnx.evaluate import session

    s = session(proto.SerializeToString())
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("module,d,layout,fs", [("block1", 32 * 14 * 14, "flat", [32, 14, 14]),
                                                 ("fc1_act", 128, "vector", [128])])
@pytest.mark.parametrize("gate", ["none", "hard"])
def test_translate_patch_matches_numpy_and_torch(cnn_onnx, module, d, layout, fs, gate):
    """At the target, onnxruntime gives x - alpha beta (gate none: on every input, one Sub node) or the
    numpy reference of the gated translation; the logits equal the PyTorch hook's within 1e-5."""
    model, path = cnn_onnx
    t = translate_target(d, 1, layout, module, gate, alpha=0.7, feature_shape=fs)
    dd = dirs.Directions([t])
    res = patch_model(onnx.load(str(path)), dd)
    assert res.targets[0].repair == "translate"
    ops = [n.op_type for n in res.model.graph.node if n.name.startswith("fire_onnx/")]
    assert set(ops) <= TRT_SAFE_OPS
    if gate == "none":
        assert ops == ["Sub"]  # the paper's operator: one Sub of a constant
    x = np.random.default_rng(3).normal(size=(6, 1, 28, 28)).astype(np.float32)
    h, y = repaired_tensors(res.model, x)
    beta = 0.7 * float(t.shift[0]) * t.U[0].astype(np.float64)
    ref = dirs.reference_repair(h, t)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
    flat = h.reshape(len(h), -1).astype(np.float64)
    if gate == "none":
        np.testing.assert_allclose(y.reshape(len(y), -1), flat - beta, atol=1e-5, rtol=1e-5)
    else:  # fires on some samples, not all: moved ones moved by exactly alpha beta, the rest untouched
        moved = np.abs(y.reshape(len(y), -1) - flat).max(axis=1) > 1e-6
        s = (flat - t.mu) @ t.U[0]
        np.testing.assert_array_equal(moved, s > t.tau[0])
        np.testing.assert_allclose(y.reshape(len(y), -1)[moved], flat[moved] - beta, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ort_logits(res.model, x), torch_repaired(model, dd, x), atol=1e-5, rtol=1e-5)


def test_translate_nonfinite_activation_gets_no_correction():
    """Gate hard: a NaN/inf activation gives no translation (as for the projection)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="r"),
                                             helper.make_node("Identity", ["h"], ["y"], name="i")], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    t = translate_target(4, 1, "vector", "", "hard", feature_shape=[4])
    t.tensor, t.tau = "h", np.full(1, -1e9, np.float32)  # fires on every finite score
    out = patch_model(m, dirs.Directions([t])).model
    xin = np.array([[1, 2, 3, 4], [np.inf, 0, 0, 0], [np.nan, 1, 1, 1]], np.float32)
    got = ort_logits(out, xin)
    np.testing.assert_allclose(got[0], xin[0] - t.beta, atol=1e-5)
    assert np.isinf(got[1, 0]) and np.array_equal(got[1, 1:], [0, 0, 0])
    assert np.isnan(got[2, 0]) and np.array_equal(got[2, 1:], [1, 1, 1])


def test_fit_translate_records_the_mean_shift():
    """beta = the mean (paired) shift, unnormalised: shift @ U."""
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(200, 16))
    twin = rng.normal(size=(30, 16))
    trig = twin + np.linspace(0, 3, 16)
    t = fit_target(clean, trig, paired=twin, tensor="h", repair="translate", alpha=0.5)
    assert t.repair == "translate" and t.fit["repair"] == "translate"
    np.testing.assert_allclose(t.beta, (trig - twin).mean(axis=0), atol=1e-5)
    assert t.alpha[0] == np.float32(0.5)
    assert fit_target(clean, trig, tensor="h").repair == "project"


def _save_raw(path, header: dict, arrays: dict):
    with open(path, "wb") as f:
        np.savez(f, header=np.array(json.dumps(header)), **arrays)


def _v1_file(path, extra_target=None, version=1, extra_arrays=None):
    u = np.zeros((1, 4), np.float32)
    u[0, 0] = 1
    head = {"tensor": "h", "module": "", "layout": "vector", "gate": "hard", "dim": 4, "k": 1,
            "feature_shape": [4], "fit": {}, "fingerprint": {}}
    head.update(extra_target or {})
    _save_raw(path, {"format": dirs.FORMAT, "schema_version": version, "preprocess": {}, "meta": {},
                     "targets": [head]},
              {"t0.mu": np.zeros(4, np.float32), "t0.U": u, "t0.tau": np.ones(1, np.float32),
               "t0.alpha": np.ones(1, np.float32), **(extra_arrays or {})})


def test_old_and_new_files_load(tmp_path):
    """A version 1 file (no repair field, no stats) still loads as a projection; projections are still
    written as version 1, translate targets as version 2 (which older fire-onnx refuses, instead of
    misreading the translation as a projection); a broken translate file is refused."""
    _v1_file(tmp_path / "v1.npz")
    t = dirs.load(tmp_path / "v1.npz").targets[0]
    assert (t.repair, t.shift, t.stats) == ("project", None, {})

    tt = translate_target(4, 1, "vector", "", "none")
    tt.tensor = "h"
    dirs.save(dirs.Directions([tt]), tmp_path / "tr.npz")
    with np.load(tmp_path / "tr.npz", allow_pickle=False) as z:
        assert json.loads(str(z["header"][()]))["schema_version"] == 2 and "t0.shift" in z.files
    back = dirs.load(tmp_path / "tr.npz").targets[0]
    assert back.repair == "translate"
    np.testing.assert_array_equal(back.shift, tt.shift)
    tt.repair, tt.shift = "project", None
    dirs.save(dirs.Directions([tt]), tmp_path / "pr.npz")
    with np.load(tmp_path / "pr.npz", allow_pickle=False) as z:
        assert json.loads(str(z["header"][()]))["schema_version"] == 1 and "t0.shift" not in z.files

    _v1_file(tmp_path / "bad1.npz", {"repair": "translate"}, extra_arrays={"t0.shift": np.ones(1, np.float32)})
    with pytest.raises(FireError, match="needs schema version 2"):
        dirs.load(tmp_path / "bad1.npz")
    _v1_file(tmp_path / "bad2.npz", {"repair": "translate"}, version=2)
    with pytest.raises(FireError, match="shift"):
        dirs.load(tmp_path / "bad2.npz")
    _v1_file(tmp_path / "bad3.npz", {"repair": "rotate"}, version=2)
    with pytest.raises(FireError, match="repair must be one of"):
        dirs.load(tmp_path / "bad3.npz")


def test_cli_fit_patch_eval_translate(demo_run, mnist_path, tmp_path):
    """fit --repair translate --gate none from the ONNX model, patch (one Sub), eval: the paper's operator
    removes the backdoor here and costs clean accuracy (it moves every input); gated, it keeps CA."""
    out, report = demo_run
    shutil.copyfile(out / "model.onnx", tmp_path / "model.onnx")
    common = ["--onnx", "model.onnx", "--layer", "block2", "--clean", mnist_path, "--trigger", "badnets",
              "--target", "0", "--mean", "0.5", "--std", "0.5"]
    proc = run_cli("fit", *common, "--repair", "translate", "--gate", "none", "-o", "tn.npz", cwd=tmp_path, check=True)
    assert "repair=translate" in proc.stdout
    run_cli("fit", *common, "--repair", "translate", "-o", "th.npz", cwd=tmp_path, check=True)
    proc = run_cli("patch", "model.onnx", "tn.npz", "-o", "tn.onnx", cwd=tmp_path, check=True)
    assert "repair translate, 1 nodes" in proc.stdout
    run_cli("patch", "model.onnx", "th.npz", "-o", "th.onnx", cwd=tmp_path, check=True)
    assert "repair translate" in run_cli("inspect", "tn.onnx", cwd=tmp_path, check=True).stdout
    proc = run_cli("eval", "model.onnx", "tn.onnx", "th.onnx", "--data", mnist_path, "--trigger", "badnets",
                   "--target", "0", "--limit", "400", "--json", "-", cwd=tmp_path, check=True)
    res = json.loads(proc.stdout)["models"]
    assert res["model.onnx"]["asr"] > 0.9
    assert res["tn.onnx"]["asr"] < 0.1 and res["th.onnx"]["asr"] < 0.1
    assert res["th.onnx"]["ca"] >= res["model.onnx"]["ca"] - 0.01
    assert res["tn.onnx"]["ca"] < res["th.onnx"]["ca"]  # measured 74 % vs 96 %: a baseline, not a default


@pytest.mark.parametrize("gate", ["none", "hard"])
def test_translate_onto_a_flattened_copy_of_the_tensor(cnn_onnx, gate):
    """Directions fitted at block2 (per-sample shape (64, 7, 7)) patched with --tensor onto the Flatten
    output that holds the same values as (N, 3136): the translation takes that tensor's own shape (it
    used to be reshaped to the fitted (64, 7, 7): onnxruntime refused the model, and a graph output would
    have come back with a wrong shape) and gives the same logits as the repair at block2."""
    model, path = cnn_onnx
    t = translate_target(64 * 7 * 7, 1, "flat", "block2", gate, alpha=0.7, feature_shape=[64, 7, 7])
    at_block = patch_model(onnx.load(str(path)), dirs.Directions([t]))
    at_flat = patch_model(onnx.load(str(path)), dirs.Directions([t]), tensor="/Flatten_output_0")
    assert at_flat.targets[0].tensor == "/Flatten_output_0"
    x = np.random.default_rng(4).normal(size=(5, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(ort_logits(at_flat.model, x), ort_logits(at_block.model, x), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ort_logits(at_flat.model, x), torch_repaired(model, dirs.Directions([t]), x),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("repair,gate", [("project", "hard"), ("project", "none"), ("translate", "hard"),
                                         ("translate", "none")])
def test_an_empty_batch_stays_an_empty_batch(cnn_onnx, repair, gate):
    """A batch of 0 images runs through the patched model as through the original ((0, classes)); the
    flat layout's Reshape to (N, -1) could not infer -1 from 0 values."""
    _, path = cnn_onnx
    proto = onnx.load(str(path))
    t = translate_target(64 * 7 * 7, 1, "flat", "block2", gate, feature_shape=[64, 7, 7])
    if repair == "project":
        t.repair, t.shift = "project", None
    res = patch_model(proto, dirs.Directions([t]))
    empty = np.zeros((0, 1, 28, 28), np.float32)
    assert ort_logits(res.model, empty).shape == ort_logits(proto, empty).shape == (0, 10)
