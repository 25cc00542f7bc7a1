"""tools/plots.py on the demo's real backdoored model (BadNets on MNIST, SmallCNN) in onnxruntime: the
scores its histograms draw, the PNGs it writes, and that it skips (never trains) a cell it has no model for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from fire_onnx import directions as dirs
from fire_onnx import triggers
from fire_onnx.data import Images, Preprocess, bundled_mnist, load_images
from fire_onnx.evaluate import compute_metrics, session

pytest.importorskip("matplotlib")

PRE = Preprocess(scale=1 / 255, mean=[0.5], std=[0.5], layout="NCHW")  # the demo's preprocessing
TARGET = 0
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plots(demo_run):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import plots
    finally:
        sys.path.remove(str(REPO / "tools"))
    return plots


def test_histogram_scores_are_the_repair_seen_along_its_direction(demo_run, plots, tmp_path):
    out, _ = demo_run
    d = dirs.load(out / "directions.npz")
    t = d.targets[0]
    test = load_images(bundled_mnist(), "test").subset(slice(0, 300))
    keep = test.y != TARGET
    x_clean = PRE(test.x)
    x_trig = PRE(triggers.parse("badnets").apply(test.x[keep]))

    sc = plots.direction_scores(out / "model.fire.onnx", d, x_clean)
    st = plots.direction_scores(out / "model.fire.onnx", d, x_trig)
    assert sc["before"].shape == (300,) and st["before"].shape == (int(keep.sum()),)

    # "before" is the original model's activation: the same scores from model.onnx, computed here
    import onnx

    from fire_onnx.patch import resolve_target
    from fire_onnx.probe import TensorReader

    original = onnx.load(str(out / "model.onnx"))
    name = resolve_target(original, t)
    acts, _ = TensorReader(original, [name])(x_trig)
    ref = (acts[name].reshape(len(x_trig), -1).astype(np.float64) - t.mu) @ t.U[0].astype(np.float64)
    np.testing.assert_allclose(st["before"], ref, rtol=1e-4, atol=1e-3)

    # "after" is what the patched graph computed: the gated projection removes alpha * s above tau
    # (the rows of U are orthonormal, so the other directions do not move this score)
    for s in (sc, st):
        want = np.where(s["before"] > s["tau"], (1 - s["alpha"]) * s["before"], s["before"])
        np.testing.assert_allclose(s["after"], want, rtol=1e-4, atol=1e-3 * np.abs(s["before"]).max())
    summary = plots.summarize(sc, st)
    assert summary["triggered_gated"] > 0.9 and float((st["after"] > st["tau"]).mean()) < 0.05
    assert summary["triggered_after_median"] < summary["triggered_before_median"] - 3 * abs(sc["tau"])
    assert summary["clean_gated"] < 0.05  # the gate leaves clean images alone
    assert summary["clean_after_median"] == pytest.approx(summary["clean_before_median"], abs=1e-4)
    # the logits read beside the scores are the patched model's: the same ASR as compute_metrics
    m = compute_metrics(session(out / "model.fire.onnx"), test, PRE,
                        Images(triggers.parse("badnets").apply(test.x), test.y), TARGET)
    assert float((st["logits"].argmax(1) == TARGET).mean()) == pytest.approx(m.asr)

    png = tmp_path / "h" / "hist.png"
    plots.plot_histograms([("FIRE demo", sc, st)], png, "demo")
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000


def test_bars_and_curve_draw_from_records(plots, tmp_path):
    records = json.loads((REPO / "benchmarks" / "matrix" / "results.json").read_text())
    cells = {(r["dataset"], r["attack"]) for r in records}
    assert plots.plot_bars(records, tmp_path / "bars.png") == len(cells)
    assert (tmp_path / "bars.png").read_bytes()[:8] == PNG
    curve = [r for r in json.loads((REPO / "benchmarks" / "streaming" / "results.json").read_text())
             if r["mode"] in ("original", "paired")]
    plots.plot_efficiency(curve, tmp_path / "curve.png", "streaming paired records")
    assert (tmp_path / "curve.png").read_bytes()[:8] == PNG


def test_a_cell_without_a_cached_model_is_skipped_not_trained(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(bundled_mnist(), data / "mnist5k.npz")
    (tmp_path / "cache").mkdir()
    cmd = [sys.executable, str(REPO / "tools" / "plots.py"), "--data-dir", str(data), "--cache", str(tmp_path / "cache"),
           "--matrix", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--no-bars", "--hist", "mnist5k:badnets",
           "--curve", "mnist5k:badnets"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "is not in" in proc.stderr and "skipped" in proc.stderr
    assert list((tmp_path / "cache").iterdir()) == []  # nothing trained into the cache
    assert not list((tmp_path / "out").glob("*.png"))
    assert json.loads((tmp_path / "out" / "plots.json").read_text())["histograms"] == []
