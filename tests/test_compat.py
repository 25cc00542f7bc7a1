"""Models fire-onnx did not write: IR version < 4 (every initializer is a graph input), opset-upgraded
pytorch test models, tensors of unknown shape, and the external-data path of models past 2 GiB.

A representative subset of ``tools/compat_sweep.py`` (which walks all of the onnx package's backend
test models): each check runs ``fire-onnx inspect`` and ``fire-onnx patch`` through the console
script and compares the patched model in onnxruntime with a numpy reference of the repair."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import REPO, fire_onnx_exe, run_cli, sha
from fire_onnx import directions as dirs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("compat_sweep", REPO / "tools" / "compat_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def backend_model(sweep, suite: str, name: str) -> Path:
    [(_, _, path)] = [m for m in sweep.list_models((suite,), name) if m[1] == name]
    return path


def test_ir3_light_model_patches_and_matches_numpy(sweep, tmp_path):
    """A real architecture with IR version 3 (initializers are graph inputs): patched, the source
    ir_version and opset kept, every initializer (the repair's included) declared as a typed input."""
    path = backend_model(sweep, "light", "light_squeezenet")
    rec = sweep.check_model("light", "light_squeezenet", path, tmp_path / "sq", index=1)
    assert rec["status"] == "ok", rec
    assert rec["ir_version"] == 3 and rec["patched_ir_version"] == 3
    assert rec["target_err"] < 1e-4 and rec["output_err"] < 1e-4

    src = onnx.load(str(path))
    patched = onnx.load(str(tmp_path / "sq" / "model.fire.onnx"))
    inputs = {i.name: i for i in patched.graph.input}
    assert {t.name for t in patched.graph.initializer} <= set(inputs)
    ours = [t for t in patched.graph.initializer if t.name.startswith("fire_onnx/")]
    assert ours
    for t in ours:
        tt = inputs[t.name].type.tensor_type
        assert tt.elem_type == t.data_type and [d.dim_value for d in tt.shape.dim] == list(t.dims)
    # the source's inputs come first, in their order (positional feeds keep working)
    kept = [i.name for i in src.graph.input if i.name in inputs]
    assert [i.name for i in patched.graph.input][: len(kept)] == kept
    assert list(patched.opset_import) == list(src.opset_import)

    # --replace on an IR 3 model removes the old repair and keeps the IR 3 rules
    d = tmp_path / "sq" / "directions.npz"
    again = tmp_path / "again.onnx"
    run_cli("patch", tmp_path / "sq" / "model.fire.onnx", d, "--replace", "-o", again, check=True)
    m = onnx.load(str(again))
    onnx.checker.check_model(m)
    assert m.ir_version == 3
    assert sum(n.name.endswith("/repaired") for n in m.graph.node) == 1

    # an initializer is a graph input before IR 4, but a weight, not an activation to repair
    weight = src.graph.initializer[0].name
    assert weight in {i.name for i in src.graph.input}
    bad = tmp_path / "weight.npz"
    dirs.save(dirs.Directions([random_target(4, weight, layout="vector")]), bad)
    proc = run_cli("patch", path, bad, "-o", tmp_path / "w.onnx")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"tensor {weight!r} is not in the model" in proc.stderr


@pytest.mark.parametrize("name,index,layout,graph_output", [
    ("test_ConvTranspose2d", 2, "flat", True),  # one node: the graph output is patched, its name kept
    ("test_GLU_dim", 1, "token", False),  # an intermediate (N, T, D) tensor, per-token repair
])
def test_upgraded_pytorch_model_patches_and_matches_numpy(sweep, tmp_path, name, index, layout, graph_output):
    """Opset-6 pytorch test models, upgraded to opset 9 by onnx.version_converter (IR 3 kept)."""
    path = backend_model(sweep, "pytorch-converted", name)
    rec = sweep.check_model("pytorch-converted", name, path, tmp_path / "m", index=index)
    assert rec["status"] == "ok", rec
    assert rec["upgrade"] == "opset 6 -> 9" and rec["ir_version"] < 4 and rec["patched_ir_version"] == rec["ir_version"]
    assert (rec["layout"], rec["graph_output"]) == (layout, graph_output)
    assert rec["target_err"] < 1e-4 and rec["output_err"] < 1e-4


def unknown_shape_model(path: Path) -> None:
    """x -> Relu -> com.example.Custom (no shape inference) -> Relu -> MaxPool -> y."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu_a"),
        helper.make_node("Custom", ["a"], ["b"], name="custom", domain="com.example"),
        helper.make_node("Relu", ["b"], ["c"], name="relu_c"),
        helper.make_node("MaxPool", ["c"], ["y"], name="pool", kernel_shape=[2, 2]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())


def test_inspect_lists_tensors_of_unknown_shape(tmp_path):
    """Shape inference stops at a custom op: the tensors after it are listed, shape unknown, not dropped;
    patching one is a clean refusal."""
    model = tmp_path / "custom.onnx"
    unknown_shape_model(model)
    proc = run_cli("inspect", model, "--json", "-", check=True)
    cands = {c["tensor"]: c for c in json.loads(proc.stdout)["candidates"]}
    assert cands["a"]["shape"] == ["N", 3, 8, 8] and cands["a"]["dtype"] == "float32"
    assert cands["c"]["shape"] is None and cands["c"]["dtype"] == "?"
    assert "type and shape unknown" in cands["c"]["note"]
    assert cands["y"]["shape"] is None  # the graph output, after the custom op too
    text = run_cli("inspect", model, check=True).stdout
    assert any(line.split()[:2] == ["c", "unknown"] for line in text.splitlines()), text

    d = tmp_path / "d.npz"
    dirs.save(dirs.Directions([random_target(3 * 8 * 8, "c")]), d)
    proc = run_cli("patch", model, d, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "shape of tensor 'c' is unknown" in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def random_target(dim: int, tensor: str, layout: str = "flat", k: int = 2, seed: int = 0) -> dirs.Target:
    rng = np.random.default_rng(seed)
    return dirs.Target(mu=rng.normal(size=dim).astype(np.float32),
                       U=dirs.orthonormalize(rng.normal(size=(k, dim))).astype(np.float32),
                       tau=np.zeros(k, np.float32), alpha=np.ones(k, np.float32), layout=layout, gate="hard",
                       tensor=tensor)


def mlp_model(path: Path, seed: int = 0) -> dict:
    """x (N, 64) -> MatMul w0 -> Relu (h) -> MatMul w1 -> y: ~80 KB of weights."""
    rng = np.random.default_rng(seed)
    w = {"w0": rng.normal(size=(64, 256)).astype(np.float32) / 8, "w1": rng.normal(size=(256, 16)).astype(np.float32) / 16}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["m"]), helper.make_node("Relu", ["m"], ["h"]),
             helper.make_node("MatMul", ["h", "w1"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                          [onnx.numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())
    return w


def test_external_data_path_through_the_console_script(tmp_path):
    """FIRE_ONNX_EXTERNAL_DATA_THRESHOLD lowered: the code path of a > 2 GiB model on an 80 KB one.
    The output is a model + .data pair with nothing else left behind; the input is untouched; the
    patched model matches numpy; inspect and patch --replace read the external-data model."""
    import subprocess

    import onnxruntime as ort

    model = tmp_path / "mlp.onnx"
    w = mlp_model(model)
    t = random_target(256, "h", layout="vector")
    d = tmp_path / "d.npz"
    dirs.save(dirs.Directions([t]), d)
    before = sha(model)
    env = {**os.environ, "FIRE_ONNX_EXTERNAL_DATA_THRESHOLD": "10000"}

    def cli(*args):
        return subprocess.run(fire_onnx_exe() + [str(a) for a in args], capture_output=True, text=True, env=env,
                              timeout=300)

    out = tmp_path / "mlp.fire.onnx"
    proc = cli("patch", model, d, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert sha(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "mlp.fire.onnx", "mlp.fire.onnx.data", "mlp.onnx"]
    assert out.stat().st_size < 5_000 and (tmp_path / "mlp.fire.onnx.data").stat().st_size > 80_000
    stub = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stub.graph.initializer if t.name in w)
    onnx.checker.check_model(str(out))

    x = np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32)
    h = np.maximum(x @ w["w0"], 0)
    ref = dirs.reference_repair(h, t) @ w["w1"]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(ref - h @ w["w1"]).max() > 1e-2  # the repair changed something

    proc = cli("inspect", out, "--json", "-")
    assert proc.returncode == 0, proc.stderr
    assert {c["tensor"] for c in json.loads(proc.stdout)["candidates"]} >= {"h"}

    # --replace on the external-data model, written over the same output: one consistent pair again
    again = tmp_path / "again.onnx"
    proc = cli("patch", out, d, "--replace", "-o", again)
    assert proc.returncode == 0, proc.stderr
    got = ort.InferenceSession(str(again), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_external_data_failure_leaves_nothing(tmp_path, monkeypatch):
    """A failure after the weights were written (here: onnxruntime rejects the result) leaves neither
    the model nor its .data file, and an existing output pair stays as it was."""
    import fire_onnx.patch as fp

    model = tmp_path / "mlp.onnx"
    mlp_model(model)
    d = tmp_path / "d.npz"
    dirs.save(dirs.Directions([random_target(256, "h", layout="vector")]), d)
    monkeypatch.setenv("FIRE_ONNX_EXTERNAL_DATA_THRESHOLD", "10000")
    out = tmp_path / "mlp.fire.onnx"
    fp.patch_file(model, d, out)
    old = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}

    def reject(path, original):
        assert Path(str(path) + ".data").is_file()  # the data was written beside the temporary model
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(fp, "verify_in_onnxruntime", reject)
    dirs.save(dirs.Directions([random_target(256, "h", layout="vector", seed=3)]), d)
    old["d.npz"] = hashlib.sha256(d.read_bytes()).hexdigest()
    with pytest.raises(RuntimeError, match="simulated"):
        fp.patch_file(model, d, out)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == old
    with pytest.raises(RuntimeError, match="simulated"):
        fp.patch_file(model, d, tmp_path / "new.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(old)


def test_size_without_serializing_and_light_copy(tmp_path):
    """approx_size tracks ByteSize without serializing; light_copy writes a loadable, equal model and
    leaves its argument unchanged."""
    import onnxruntime as ort

    from fire_onnx.onnxutil import approx_size, light_copy

    model = tmp_path / "mlp.onnx"
    mlp_model(model)
    m = onnx.load(str(model))
    assert abs(approx_size(m) - m.ByteSize()) < 0.01 * m.ByteSize()
    before = m.SerializeToString()
    light = light_copy(m, tmp_path / "copy.onnx.data")
    assert m.SerializeToString() == before
    (tmp_path / "copy.onnx").write_bytes(light.SerializeToString())
    x = np.ones((2, 64), np.float32)
    a = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(tmp_path / "copy.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)
    assert light_copy(m).ByteSize() < 1_000  # weightless


def test_model_output_to_a_device(tmp_path, monkeypatch):
    """``patch -o /dev/null`` is refused before any work (one line, exit 1) and the device stays a device;
    the library's atomic_model_path writes through a device in place (never replacing it) and refuses
    there a model with external data."""
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    from fire_onnx.errors import FireError
    from fire_onnx.onnxutil import save_model

    model = tmp_path / "mlp.onnx"
    mlp_model(model)
    d = tmp_path / "d.npz"
    dirs.save(dirs.Directions([random_target(256, "h", layout="vector")]), d)
    proc = run_cli("patch", model, d, "-o", "/dev/null")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "not a regular file" in proc.stderr
    assert Path("/dev/null").is_char_device()

    m = onnx.load(str(model))
    save_model(m, "/dev/null")
    assert Path("/dev/null").is_char_device()
    monkeypatch.setenv("FIRE_ONNX_EXTERNAL_DATA_THRESHOLD", "10000")
    with pytest.raises(FireError, match="not a regular file"):
        save_model(m, "/dev/null")
    assert Path("/dev/null").is_char_device() and not Path("/dev/null.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "mlp.onnx"]
