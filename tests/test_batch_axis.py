"""Tensors whose first axis is not the batch: nn.TransformerEncoderLayer(batch_first=False) holds its blocks as
[T, B, D] (new-user run 18). fit refused them with a numpy traceback, or (batches of one size) silently fitted the
T token positions as samples and wrote a wrong repair; inspect listed them as candidates and --layer auto crashed on
them. Now fit refuses them in one line (PyTorch hooks and onnxruntime), inspect and auto pass over them, and patch
refuses a target there."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from fire_onnx import directions as dirs  # noqa: E402
from fire_onnx.errors import FireError  # noqa: E402

MODEL_SRC = textwrap.dedent('''
    import torch, torch.nn as nn

    class SeqViT(nn.Module):
        """A ViT whose encoder keeps batch_first=False: blocks hold [T, B, D]; the head reads the CLS token."""
        def __init__(self, d=16, p=7):
            super().__init__()
            self.embed = nn.Conv2d(1, d, p, stride=p)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
            self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=False)
                                         for _ in range(2)])
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            h = self.embed(x).flatten(2).transpose(1, 2)
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
            h = h.transpose(0, 1)  # T, B, D
            for b in self.blocks:
                h = b(h)
            return self.head(h[0])

    def build():
        torch.manual_seed(0)
        return SeqViT()
''')

BLOCK = "/blocks.0/norm2/LayerNormalization_output_0"  # blocks.0's output in the TorchScript export (17 x unk__1 x 16)
MESSAGE = "holds the batch on axis 1 ([T, B, D], as nn.TransformerEncoderLayer(batch_first=False) does)"


@pytest.fixture(scope="module")
def seq_model(tmp_path_factory):
    """(factory spec, weights, ONNX path) of the model above, exported with a dynamic batch (opset 17)."""
    import warnings

    d = tmp_path_factory.mktemp("seq")
    (d / "seqvit.py").write_text(MODEL_SRC)
    from fire_onnx.fit.torch_model import load_factory

    model = load_factory(f"{d / 'seqvit.py'}:build")().eval()
    torch.save(model.state_dict(), d / "seq.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(d / "seq.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return f"{d / 'seqvit.py'}:build", str(d / "seq.pt"), str(d / "seq.onnx")


def _request(mnist_path, **kw):
    from fire_onnx.fit.pipeline import FitRequest

    base = dict(clean_path=str(mnist_path), split="test", trigger_spec="badnets", target=0, n_clean=60,
                n_triggered=10, mean=[0.5], std=[0.5], reconstruct="off")
    return FitRequest(**{**base, **kw})


@pytest.mark.parametrize("how", ["hook", "hook+onnx", "onnx", "onnx-token", "hook-even"])
def test_fit_refuses_batch_on_axis_1(seq_model, mnist_path, how):
    from fire_onnx.fit.pipeline import run_fit

    spec, weights, onnx_path = seq_model
    kw = {
        "hook": dict(model_spec=spec, weights=weights, layers=["blocks.0"]),
        "hook+onnx": dict(model_spec=spec, weights=weights, layers=["blocks.0"], onnx_path=onnx_path),
        "onnx": dict(onnx_path=onnx_path, layers=["blocks.0"]),
        "onnx-token": dict(onnx_path=onnx_path, layers=[BLOCK], layout="token"),
        # every batch of one size: once written with exit 0 (17 token positions as samples, feature_shape [B, D])
        "hook-even": dict(model_spec=spec, weights=weights, layers=["blocks.0"], batch_size=10),
    }[how]
    with pytest.raises(FireError, match=r"batch on axis 1 \(\[T, B, D\]") as e:
        run_fit(_request(mnist_path, **kw))
    assert "\n" not in str(e.value) and "batch_first=True" in str(e.value)


def test_collect_and_reader_catch_a_coincident_batch(seq_model):
    """Batches of 17 images through a 17-token encoder give [17, 17, D]: one batch size cannot tell; a second one
    (one image) does."""
    from fire_onnx.fit.torch_model import collect, load_model
    from fire_onnx.probe import TensorReader

    spec, weights, onnx_path = seq_model
    x = np.random.default_rng(0).normal(size=(34, 1, 28, 28)).astype(np.float32)
    with pytest.raises(FireError, match=MESSAGE.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        collect(load_model(spec, weights), ["blocks.0"], x, batch_size=17)
    with pytest.raises(FireError, match="holds the batch on axis 1"):
        TensorReader(onnx.load(onnx_path), [BLOCK], batch_size=17)(x)
    # tensors with the batch first still read (the CLS-token path of the workaround)
    assert collect(load_model(spec, weights), ["embed"], x, batch_size=17)["embed"].shape == (34, 16, 4, 4)


def test_inspect_and_auto_pass_over_batch_on_axis_1(seq_model):
    from fire_onnx.fit.auto import candidate_sites
    from fire_onnx.inspect import candidates

    model = onnx.load(seq_model[2])
    by_name = {c.tensor: c for c in candidates(model)}
    assert by_name[BLOCK].note.startswith("batch on axis 1 ([T, B, D])")
    assert by_name[BLOCK].shape == [17, "batch", 16]
    assert by_name["/embed/Conv_output_0"].note == "candidate"
    sites, skipped = candidate_sites(model)
    assert BLOCK in dict(skipped) and dict(skipped)[BLOCK].startswith("batch on axis 1")
    # and the CLS token, the tensor such a model can be repaired at (run 18: ASR 98 -> 6.7 %), is a candidate
    assert [s.tensor for s in sites] == ["/embed/Conv_output_0", "/Gather_1_output_0"]


def test_patch_refuses_a_target_with_batch_on_axis_1(seq_model):
    """A directions file at such a tensor (fitted before fit refused them, or by hand, without a fingerprint)."""
    from fire_onnx.patch import patch_model

    d = 17 * 16
    u = np.zeros((1, d), np.float32)
    u[0, 0] = 1
    t = dirs.Target(mu=np.zeros(d, np.float32), U=u, tau=np.ones(1, np.float32), alpha=np.ones(1, np.float32),
                    layout="flat", tensor=BLOCK, feature_shape=[17, 16])
    with pytest.raises(FireError, match=r"cannot patch the directions: tensor .*holds the batch on axis 1"):
        patch_model(onnx.load(seq_model[2]), dirs.Directions(targets=[t], preprocess={}, meta={}))
