"""The demo's acceptance criteria, measured by the demo itself (seeded)."""

from __future__ import annotations

import json

import onnx


def test_demo_meets_repair_criteria(demo_run):
    out, report = demo_run
    o, p = report["original"], report["patched"]
    assert o["asr"] >= 0.9, "the demo model must actually be backdoored"
    assert o["ca"] - p["ca"] <= 0.005
    assert p["asr"] <= 0.02
    assert p["ra"] >= p["ca"] - 0.03
    assert all(report["checks"].values())
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["patched"] == p and on_disk["original"] == o
    for name in ("model.onnx", "directions.npz", "model.fire.onnx"):
        assert (out / name).is_file()
    patched = onnx.load(str(out / "model.fire.onnx"))
    assert any(n.name.startswith("fire_onnx/") for n in patched.graph.node)
    assert report["config"]["n_triggered"] == 20


def test_demo_fit_is_paired_and_gated(demo_run):
    from fire_onnx import directions as dirs

    out, report = demo_run
    d = dirs.load(out / "directions.npz")
    t = d.targets[0]
    assert t.module == "block2" and t.tensor == report["config"]["tensor"]
    assert t.fit["reference"] == "paired" and t.fit["n_triggered"] == 20
    assert d.preprocess["mean"] == [0.5]


def test_vit_demo_repairs_through_onnx(tmp_path):
    """The small ViT, backdoored and repaired at its first block (flat over all 17 tokens)."""
    from conftest import run_cli

    out = tmp_path / "vit"
    run_cli("demo", "--arch", "vit", "--epochs", "10", "--output", out, check=True)
    report = json.loads((out / "report.json").read_text())
    o, p = report["original"], report["patched"]
    assert report["config"]["arch"] == "vit" and report["config"]["layer"] == "blocks.0"
    assert o["asr"] >= 0.9
    assert o["ca"] - p["ca"] <= 0.005 and p["asr"] <= 0.03
    from fire_onnx import directions as dirs

    t = dirs.load(out / "directions.npz").targets[0]
    assert t.layout == "flat" and t.feature_shape == [17, 64]
