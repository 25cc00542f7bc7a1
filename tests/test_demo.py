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
    proc = run_cli("demo", "--arch", "vit", "--epochs", "10", "--output", out)
    report = json.loads((out / "report.json").read_text())
    # its RA sits ~5 pt under CA (the demo's RA check can fail here, and the exit status says so)
    assert proc.returncode == (0 if all(report["checks"].values()) else 3), proc.stderr
    o, p = report["original"], report["patched"]
    assert report["config"]["arch"] == "vit" and report["config"]["layer"] == "blocks.0"
    assert o["asr"] >= 0.9
    assert o["ca"] - p["ca"] <= 0.005 and p["asr"] <= 0.03
    from fire_onnx import directions as dirs

    t = dirs.load(out / "directions.npz").targets[0]
    assert t.layout == "flat" and t.feature_shape == [17, 64]


def test_demo_refusals_leave_no_output_folder(tmp_path, mnist_path):
    """A demo that cannot run says so before training and leaves nothing behind (new-user run 8: an npz with x/y
    only was trained and measured on the same images, and a bad --layer left model.onnx after training)."""
    import numpy as np
    from conftest import run_cli

    d = np.load(mnist_path)
    np.savez(tmp_path / "xy.npz", x=d["x_train"][:300], y=d["y_train"][:300])
    cases = {"xy": (["--data", tmp_path / "xy.npz"], "has no x_train, y_train, x_test, y_test"),
             "layer": (["--layer", "nope"], "--layer 'nope' is not a module of the demo's small_cnn"),
             "target": (["--target", "10"], "target must be a class index in 0..9")}
    for name, (args, message) in cases.items():
        out = tmp_path / f"out_{name}"
        proc = run_cli("demo", "-o", out, *args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr, proc.stderr
        assert not out.exists(), name


def test_a_failing_demo_restores_its_output_folder(tmp_path, monkeypatch):
    """Everything is written to a staging folder and moved in at the end: a failure after training (here
    an error raised by the fit) leaves an existing output folder as it was, with no staging folder."""
    import pytest

    from fire_onnx import demo
    from fire_onnx.errors import FireError

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def broken(*a, **k):
        raise FireError("broken fit")

    monkeypatch.setattr("fire_onnx.fit.fit_directions", broken)
    with pytest.raises(FireError, match="broken fit"):
        demo.run_demo(out, epochs=1, log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_demo_with_no_backdoor_implanted_exits_3_and_keeps_its_report(tmp_path):
    """Eight poisoned images and one epoch implant no backdoor: the repair then 'passes' its own checks on
    nothing, so the demo's first check fails, it says which on one line and exits 3 (a script sees it),
    with report.json / report.md written (new-user runs: a failing demo used to exit 0)."""
    from conftest import run_cli

    out = tmp_path / "weak"
    proc = run_cli("demo", "-o", out, "--epochs", "1", "--poison-rate", "0.002")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "check(s) failed: original_asr_ge_50pct" in proc.stderr, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["checks"]["original_asr_ge_50pct"] is False and report["original"]["asr"] < 0.5
    assert "FAIL original_asr_ge_50pct" in (out / "report.md").read_text()
