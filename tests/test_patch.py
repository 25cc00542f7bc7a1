"""The ONNX patch against a PyTorch reference of the same repair, on real exported architectures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import torch_repaired

from fire_onnx import directions as dirs
from fire_onnx.errors import FireError
from fire_onnx.evaluate import session
from fire_onnx.fit import export_onnx
from fire_onnx.patch import patch_model, resolve_target

TRT_SAFE_OPS = {"Reshape", "Shape", "Gemm", "MatMul", "Sub", "Greater", "Where", "Cast"}


def random_target(d, k, layout, module, gate="hard", alpha=1.0, tau=0.0, seed=0):
    rng = np.random.default_rng(seed)
    U = dirs.orthonormalize(rng.normal(size=(k, d))).astype(np.float32)
    return dirs.Target(mu=rng.normal(size=d).astype(np.float32), U=U,
                       tau=np.full(k, tau, np.float32), alpha=np.full(k, alpha, np.float32),
                       layout=layout, gate=gate, module=module)


def run(model_proto, x):
    s = session(model_proto.SerializeToString())
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _export(model, shape, path, dynamo=False):
    export_onnx(model, np.zeros(shape, np.float32), path, dynamo=dynamo)
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from fire_onnx_models.vit import build_mnist

    torch.manual_seed(1)
    m = build_mnist().eval()
    return m, _export(m, (2, 1, 28, 28), tmp_path_factory.mktemp("vit") / "vit.onnx")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    from fire_onnx_models.preact_resnet import build_cifar

    torch.manual_seed(2)
    m = build_cifar().eval()
    return m, _export(m, (2, 3, 32, 32), tmp_path_factory.mktemp("r18") / "r18.onnx")


CASES = [
    # (fixture, module, layout, D, input shape)
    ("cnn", "block2", "flat", 64 * 7 * 7, (1, 28, 28)),
    ("cnn", "fc1_act", "vector", 128, (1, 28, 28)),
    ("vit", "blocks.1", "token", 64, (1, 28, 28)),
    ("vit", "blocks.2", "flat", 17 * 64, (1, 28, 28)),
    ("resnet", "layer2", "flat", 128 * 16 * 16, (3, 32, 32)),
]


@pytest.fixture(scope="module")
def models(cnn_onnx, vit, resnet):
    return {"cnn": (cnn_onnx[0], onnx.load(str(cnn_onnx[1]))), "vit": vit, "resnet": resnet}


@pytest.mark.parametrize("gate", ["none", "hard"])
@pytest.mark.parametrize("fixture,module,layout,d,shape", CASES, ids=[c[1] + "-" + c[2] for c in CASES])
def test_patched_onnx_matches_pytorch_reference(models, fixture, module, layout, d, shape, gate):
    torch_model, proto = models[fixture]
    t = random_target(d, 3, layout, module, gate=gate, tau=0.0, seed=len(module))
    x = np.random.default_rng(0).normal(size=(7, *shape)).astype(np.float32)
    # make the repair non-trivial at this layer: centre mu on real activations so the gate splits samples
    from fire_onnx.fit import collect

    rows = collect(torch_model, [module], x)[module].reshape(-1, d).astype(np.float64)
    t.mu = rows.mean(axis=0).astype(np.float32)
    # directions along which these activations really vary, so the repair changes the outputs
    t.U = dirs.orthonormalize(np.linalg.svd(rows - rows.mean(0), full_matrices=False)[2][:3]).astype(np.float32)
    d_ = dirs.Directions([t])
    res = patch_model(proto, d_)
    got = run(res.model, x)
    ref = torch_repaired(torch_model, d_, x)
    with torch.no_grad():
        orig = torch_model(torch.from_numpy(x)).numpy()
    assert np.abs(got - orig).max() > 1e-2 * np.abs(orig).max(), "the repair must change the outputs for this check to mean anything"
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert {n.op_type for n in res.model.graph.node if n.name.startswith("fire_onnx/")} <= TRT_SAFE_OPS


def test_dynamo_export_resolves_module_and_matches(cnn_onnx, tmp_path):
    model = cnn_onnx[0]
    proto = _export(model, (2, 1, 28, 28), tmp_path / "dyn.onnx", dynamo=True)
    t = random_target(64 * 7 * 7, 2, "flat", "block2", gate="none")
    res = patch_model(proto, dirs.Directions([t]))
    assert res.targets[0].tensor == resolve_target(proto, t)
    x = np.random.default_rng(3).normal(size=(5, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(run(res.model, x), torch_repaired(model, dirs.Directions([t]), x), atol=1e-5, rtol=1e-5)


def test_alpha_zero_gives_original_outputs(cnn_onnx):
    model, path = cnn_onnx
    proto = onnx.load(str(path))
    t = random_target(64 * 7 * 7, 3, "flat", "block2", gate="none", alpha=0.0)
    res = patch_model(proto, dirs.Directions([t]))
    x = np.random.default_rng(1).normal(size=(6, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(run(res.model, x), run(proto, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_one_patched_file_serves_batches_1_7_64(cnn_onnx, tmp_path, batch):
    model, path = cnn_onnx
    t = random_target(64 * 7 * 7, 2, "flat", "block2", gate="none")
    out = tmp_path / "p.onnx"
    from fire_onnx.onnxutil import save_model

    save_model(patch_model(onnx.load(str(path)), dirs.Directions([t])).model, out)
    dim0 = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    x = np.random.default_rng(batch).normal(size=(batch, 1, 28, 28)).astype(np.float32)
    s = session(out)
    got = s.run(None, {"input": x})[0]
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, torch_repaired(model, dirs.Directions([t]), x), atol=1e-5, rtol=1e-5)


def test_hard_gate_acts_only_above_tau(cnn_onnx):
    """Per sample: hard gate == plain projection where the score exceeds tau, == original elsewhere."""
    model, path = cnn_onnx
    proto = onnx.load(str(path))
    x = np.random.default_rng(5).normal(size=(40, 1, 28, 28)).astype(np.float32)
    from fire_onnx.fit import collect

    h = collect(model, ["fc1_act"], x)["fc1_act"].astype(np.float64)
    t_none = random_target(128, 1, "vector", "fc1_act", gate="none")
    t_none.mu = h.mean(0).astype(np.float32)
    scores = (h - t_none.mu) @ t_none.U[0].astype(np.float64)
    tau = float(np.median(scores))
    t_hard = dirs.Target(**{**t_none.__dict__, "gate": "hard", "tau": np.array([tau], np.float32)})
    y_orig = run(proto, x)
    y_none = run(patch_model(proto, dirs.Directions([t_none])).model, x)
    y_hard = run(patch_model(proto, dirs.Directions([t_hard])).model, x)
    above = scores > tau
    assert 5 < above.sum() < 35
    np.testing.assert_allclose(y_hard[above], y_none[above], atol=1e-5)
    np.testing.assert_allclose(y_hard[~above], y_orig[~above], atol=1e-6)
    assert np.abs(y_none[~above] - y_orig[~above]).max() > 1e-4  # gate none touches every sample


def test_graph_output_target_keeps_public_name(cnn_onnx):
    proto = onnx.load(str(cnn_onnx[1]))
    t = random_target(10, 1, "vector", "fc2", gate="none")
    res = patch_model(proto, dirs.Directions([t]))
    assert [o.name for o in res.model.graph.output] == ["logits"]
    assert res.targets[0].output == "logits" and res.targets[0].shown == "logits"  # not its renamed activation
    from fire_onnx.inspect import describe_repair, summary

    shown = "\n".join(describe_repair(summary(res.model)))
    assert "  logits" in shown and ".fire_onnx_in" not in shown, shown
    out = res.model.graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    ref = dirs.reference_repair(run(proto, x), t)
    np.testing.assert_allclose(run(res.model, x), ref, atol=1e-5)


def test_model_properties_kept_and_stamped(cnn_onnx):
    proto = onnx.load(str(cnn_onnx[1]))
    onnx.helper.set_model_props(proto, {"author": "me", "license": "x"})
    proto.doc_string = "my model"
    before = proto.SerializeToString()
    t = random_target(64 * 7 * 7, 1, "flat", "block2")
    res = patch_model(proto, dirs.Directions([t], preprocess={"scale": 0.5}), directions_sha256="abc")
    assert proto.SerializeToString() == before, "patch_model must not modify its argument"
    m = res.model
    assert m.ir_version == proto.ir_version
    assert [(o.domain, o.version) for o in m.opset_import] == [(o.domain, o.version) for o in proto.opset_import]
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["author"] == "me" and meta["license"] == "x" and m.doc_string == "my model"
    assert meta["fire_onnx.directions_sha256"] == "abc"
    assert json.loads(meta["fire_onnx.targets"])[0]["tensor"] == "/block2/block2.2/MaxPool_output_0"
    assert json.loads(meta["fire_onnx.preprocess"]) == {"scale": 0.5}
    onnx.checker.check_model(m, full_check=True)
    names = [n.name for n in m.graph.node]
    assert len(names) == len(set(names))


def test_two_targets_in_one_file(cnn_onnx):
    model, path = cnn_onnx
    d = dirs.Directions([random_target(32 * 14 * 14, 1, "flat", "block1", gate="none"),
                         random_target(128, 2, "vector", "fc1_act", gate="none", seed=4)])
    res = patch_model(onnx.load(str(path)), d)
    assert len(res.targets) == 2
    x = np.random.default_rng(2).normal(size=(4, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(run(res.model, x), torch_repaired(model, d, x), atol=1e-5, rtol=1e-5)


def test_replace_swaps_directions(cnn_onnx):
    model, path = cnn_onnx
    proto = onnx.load(str(path))
    d1 = dirs.Directions([random_target(10, 1, "vector", "fc2", gate="none", seed=1)])
    d2 = dirs.Directions([random_target(10, 1, "vector", "fc2", gate="none", seed=2)])
    once = patch_model(proto, d1).model
    with pytest.raises(FireError, match="already patched"):
        patch_model(once, d2)
    twice = patch_model(once, d2, replace=True).model
    direct = patch_model(proto, d2).model
    assert len(twice.graph.node) == len(direct.graph.node)
    assert [o.name for o in twice.graph.output] == ["logits"]
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(run(twice, x), run(direct, x), atol=1e-6)


def test_subgraph_consumer_is_rewired():
    """A tensor read inside an If branch is repaired there too (onnx-graphsurgeon shares outer tensors)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    relu = helper.make_node("Relu", ["x"], ["h"], name="relu")
    then_out = helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 4])
    else_out = helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 4])
    then_g = helper.make_graph([helper.make_node("Identity", ["h"], ["t_out"], name="then_id")], "then", [], [then_out])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"], name="else_neg")], "else", [], [else_out])
    if_node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    model = helper.make_model(helper.make_graph([relu, if_node], "g", [x, cond], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    t = random_target(4, 1, "vector", "", gate="none")
    t.tensor = "h"
    res = patch_model(model, dirs.Directions([t]))
    s = session(res.model.SerializeToString())
    xv = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    ref = dirs.reference_repair(np.maximum(xv, 0), t)
    for c, sign in ((True, 1), (False, -1)):
        got = s.run(None, {"x": xv, "cond": np.array(c)})[0]
        np.testing.assert_allclose(got, sign * ref, atol=1e-5)
    # a tensor made inside a branch is not repairable: the error says so, by name or with --tensor
    t.tensor = "e_out"
    for override in (None, "e_out"):
        with pytest.raises(FireError, match="made inside the body of the If node 'if': fire-onnx repairs tensors of "
                                            "the main graph only"):
            patch_model(model, dirs.Directions([t]), tensor=override)


def test_a_model_saved_by_the_runtime_optimizer_is_named_as_such(cnn_onnx, tmp_path):
    """onnxruntime's extended optimization writes com.microsoft fused ops that ONNX shape inference cannot
    follow; the error names them and says to patch the model as exported."""
    import onnxruntime as ort

    _, path = cnn_onnx
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    assert any(n.domain == "com.microsoft" for n in opt.graph.node)
    t = random_target(64 * 7 * 7, 1, "flat", "block2")
    t.tensor = "/block2/block2.2/MaxPool_output_0"
    with pytest.raises(FireError, match=r"ops of other domains \(com\.microsoft\.FusedConv.*patch the model as exported"):
        patch_model(opt, dirs.Directions([t]))


def test_fp16_tensor_is_repaired_between_casts(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 8])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="r"), helper.make_node("Neg", ["h"], ["y"], name="n")],
                          "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    t = random_target(8, 2, "vector", "", gate="none")
    t.tensor = "h"
    res = patch_model(model, dirs.Directions([t]))
    assert any("Casts" in w for w in res.warnings)
    s = session(res.model.SerializeToString())
    xv = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float16)
    got = s.run(None, {"x": xv})[0]
    assert got.dtype == np.float16
    ref = -dirs.reference_repair(np.maximum(xv.astype(np.float32), 0), t)
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=2e-2)


@pytest.mark.parametrize("bad,match", [
    (dict(module="block9"), "block9"),
    (dict(tensor="nope", module=""), "nope"),
])
def test_unknown_target_names_are_user_errors(cnn_onnx, bad, match):
    t = random_target(64 * 7 * 7, 1, "flat", "block2")
    t.module, t.tensor = bad.get("module", ""), bad.get("tensor", "")
    with pytest.raises(FireError, match=match):
        patch_model(onnx.load(str(cnn_onnx[1])), dirs.Directions([t]))


def test_dimension_mismatch_is_a_user_error(cnn_onnx):
    t = random_target(100, 1, "flat", "block2")
    with pytest.raises(FireError, match="dimension mismatch"):
        patch_model(onnx.load(str(cnn_onnx[1])), dirs.Directions([t]))
    t = random_target(64 * 7 * 7, 1, "vector", "block2")
    with pytest.raises(FireError, match="layout 'vector'"):
        patch_model(onnx.load(str(cnn_onnx[1])), dirs.Directions([t]))


def test_fusion_hazard_is_warned(cnn_onnx):
    t = random_target(128, 1, "vector", "fc1")
    res = patch_model(onnx.load(str(cnn_onnx[1])), dirs.Directions([t]))
    assert any("fusion" in w for w in res.warnings)


def test_large_model_path_uses_external_data(cnn_onnx, tmp_path, monkeypatch):
    """Models past the protobuf limit: shape inference by path, weights written beside the model.
    The threshold is lowered so a small model takes the same code path."""
    import fire_onnx.onnxutil as ou
    from fire_onnx.patch import patch_file

    model, path = cnn_onnx
    d = dirs.Directions([random_target(64 * 7 * 7, 1, "flat", "block2", gate="none")])
    dpath = tmp_path / "d.npz"
    dirs.save(d, dpath)
    monkeypatch.setattr(ou, "EXTERNAL_DATA_THRESHOLD", 10_000)
    out, res = patch_file(path, dpath, tmp_path / "big.fire.onnx")
    assert (tmp_path / "big.fire.onnx.data").is_file()
    assert (tmp_path / "big.fire.onnx").stat().st_size < 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.fire.onnx", "big.fire.onnx.data", "d.npz"]
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    s = session(out)
    np.testing.assert_allclose(s.run(None, {"input": x})[0], torch_repaired(model, d, x), atol=1e-5, rtol=1e-5)


def test_patch_file_verifies_in_onnxruntime(cnn_onnx, tmp_path):
    from fire_onnx.patch import patch_file, verify_in_onnxruntime

    dpath = tmp_path / "d.npz"
    dirs.save(dirs.Directions([random_target(128, 1, "vector", "fc1_act")]), dpath)
    out, res = patch_file(cnn_onnx[1], dpath, tmp_path / "p.onnx")
    assert [w for w in res.warnings if "no model fingerprint" not in w] == []  # hand-made: no fingerprint
    assert verify_in_onnxruntime(out, cnn_onnx[1]) is None
    broken = tmp_path / "broken.onnx"
    m = onnx.load(str(out))
    next(n for n in m.graph.node if n.name.endswith("/repaired")).op_type = "NoSuchOp"
    broken.write_bytes(m.SerializeToString())
    with pytest.raises(RuntimeError, match="please report"):
        verify_in_onnxruntime(broken, cnn_onnx[1])
    assert "either" in verify_in_onnxruntime(broken, broken)


def test_inspect_maps_tensors_to_layer_names(resnet):
    from fire_onnx.inspect import candidates

    _, proto = resnet
    cands = {c.tensor: c for c in candidates(proto)}
    block = cands["/layer2/layer2.1/Add_output_0"]
    assert block.layers == ["layer2", "layer2.1"] and block.layout == "flat" and not block.breaks_fusion
    conv = cands["/layer2/layer2.0/conv1/Conv_output_0"]
    assert conv.breaks_fusion and conv.note.startswith("splits Conv+Relu fusion")
    # the exporter folded bn2 into conv1: the tensor holds bn2's output, so conv1 is not offered
    assert "weights folded by the exporter: not the output of layer2.0.conv1" in conv.note and conv.layers == []
    assert cands["logits"].note == "graph output"
    # every listed layer name resolves back to its tensor, as fit/patch will resolve it
    for c in cands.values():
        for layer in c.layers:
            t = random_target(4, 1, "vector", layer)
            assert resolve_target(proto, t) == c.tensor


def test_patch_adds_nothing_but_its_nodes(vit):
    """The rest of the graph stays as exported: same nodes, no inferred shapes persisted (inferred
    value_info alone changed onnxruntime's optimizations and made a ViT 12 % slower at batch 64)."""
    _, proto = vit
    t = random_target(17 * 64, 1, "flat", "blocks.0")
    res = patch_model(proto, dirs.Directions([t]))
    target = res.targets[0].tensor
    ours = [n for n in res.model.graph.node if n.name.startswith("fire_onnx/")]
    assert len(res.model.graph.node) == len(proto.graph.node) + len(ours) == len(proto.graph.node) + 9
    orig = {n.name: (n.op_type, list(n.output)) for n in proto.graph.node}
    assert {n.name: (n.op_type, list(n.output)) for n in res.model.graph.node if n not in ours} == orig
    allowed = {vi.name for vi in proto.graph.value_info} | {o for n in ours for o in n.output} | {target}
    assert {vi.name for vi in res.model.graph.value_info} <= allowed
    assert len(res.model.graph.initializer) == len(proto.graph.initializer) + len(
        {i for n in ours for i in n.input if i.startswith("fire_onnx/") and i not in {o for m in ours for o in m.output}})


def test_inspect_layout_is_what_fit_would_choose(vit):
    """inspect and fit agree on the layout: (N, T, D) tensors are flat unless token is asked for."""
    from fire_onnx.inspect import candidates

    cands = {c.tensor: c for c in candidates(vit[1])}
    assert cands["/blocks/blocks.0/Add_1_output_0"].layout == "flat"
    assert cands["logits"].layout == "vector"
    # the token tensors' first dimension is shown as the input's batch, not the symbol inference made up
    batch = vit[1].graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert cands["/blocks/blocks.0/Add_1_output_0"].shape[0] == batch and batch, cands["/blocks/blocks.0/Add_1_output_0"]


@pytest.mark.parametrize("gate", ["none", "hard"])
def test_non_finite_activations_are_left_as_they_were(gate):
    """A NaN or +-inf entry in the target tensor (a Log/Sqrt/Pow output, say) must not spread NaN over the
    whole sample: the repair leaves such a sample exactly as it was, in ONNX, numpy and PyTorch alike,
    and still repairs the finite samples of the same batch."""
    import onnx.helper as oh
    from onnx import TensorProto

    d = 12
    graph = oh.make_graph(
        [oh.make_node("Log", ["x"], ["h"], name="log"), oh.make_node("Relu", ["h"], ["y"], name="relu")],
        "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    t = random_target(d, 2, "vector", "", gate=gate, tau=-100.0)
    t.tensor = "h"
    res = patch_model(proto, dirs.Directions([t]))
    x = np.random.default_rng(0).uniform(0.5, 3.0, size=(5, d)).astype(np.float32)
    x[1, 3] = 0.0      # log -> -inf
    x[2, 0] = -1.0     # log -> NaN
    x[3, 5] = np.inf   # log -> +inf
    h = np.log(x.astype(np.float64))
    y = run(res.model, x)
    expect = np.maximum(dirs.reference_repair(h, t), 0)
    for i in (1, 2, 3):  # non-finite samples: exactly the original
        np.testing.assert_array_equal(y[i], run(proto, x)[i])
        np.testing.assert_array_equal(np.isnan(y[i]), np.isnan(h[i]))
    for i in (0, 4):  # finite samples: repaired, and moved
        np.testing.assert_allclose(y[i], expect[i], atol=1e-5)
        assert np.abs(y[i] - np.maximum(h[i], 0)).max() > 1e-3
    np.testing.assert_allclose(expect[[1, 2, 3]], np.maximum(h[[1, 2, 3]], 0))
    hook = __import__("fire_onnx.fit", fromlist=["repair_module_output"]).repair_module_output(t)
    out = hook(None, None, torch.from_numpy(h.astype(np.float32))).numpy()
    np.testing.assert_allclose(np.maximum(out, 0), y, atol=1e-5)
