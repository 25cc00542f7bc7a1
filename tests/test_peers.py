"""Runtime peers (fire_onnx.peers: ShrinkPad, STRIP as a filter, cost ratios) on the demo's real
backdoored model in onnxruntime, and the comparison harness tools/bench.py on one cell."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from fire_onnx import triggers
from fire_onnx.data import Images, Preprocess, bundled_mnist, load_images
from fire_onnx.errors import FireError
from fire_onnx.evaluate import compute_metrics, session
from fire_onnx.peers import (ShrinkPad, Strip, abstention_metrics, bilinear_resize, evaluate_shrinkpad,
                             evaluate_strip, measure_costs, plain_runner)

PRE = Preprocess(scale=1 / 255, mean=[0.5], std=[0.5], layout="NCHW")  # the demo's preprocessing
TARGET = 0


@pytest.fixture(scope="module")
def demo(demo_run):
    out, _ = demo_run
    train, test = load_images(bundled_mnist(), "train"), load_images(bundled_mnist(), "test")
    test = test.subset(slice(0, 400))
    trig = Images(triggers.parse("badnets").apply(test.x), test.y)
    return session(out / "model.onnx", threads=2), train, test, trig


# ------------------------------------------------------------------ ShrinkPad
def test_shrinkpad_shape_dtype_and_determinism():
    x = load_images(bundled_mnist(), "test").x[:50]
    a = ShrinkPad(shrink=4, seed=0).transform(x)
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, ShrinkPad(shrink=4, seed=0).transform(x))  # same seed, same output
    assert not np.array_equal(a, ShrinkPad(shrink=4, seed=1).transform(x))  # other offsets
    assert x.sum() > 0 and np.array_equal(x, load_images(bundled_mnist(), "test").x[:50])  # input untouched


def test_shrinkpad_places_the_shrunk_image_at_an_offset_within_the_pad():
    x = np.full((40, 32, 32, 3), 200, np.uint8)  # bilinear resampling keeps a constant image constant
    out = ShrinkPad(shrink=4, seed=3).transform(x)
    offsets = set()
    for img in out:
        rows, cols = np.flatnonzero(img[..., 0].any(axis=1)), np.flatnonzero(img[..., 0].any(axis=0))
        assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == (28, 28)  # a 28x28 image ...
        assert (img == 200).sum() == 28 * 28 * 3 and (img == 0).sum() == (32 * 32 - 28 * 28) * 3  # ... zero around
        assert 0 <= rows[0] <= 4 and 0 <= cols[0] <= 4
        offsets.add((rows[0], cols[0]))
    assert len(offsets) > 5  # offsets are drawn per image


def test_bilinear_resize_matches_torch():
    import torch

    x = load_images(bundled_mnist(), "test").x[:8]
    ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32)), size=(24, 24),
                                          mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    assert np.abs(bilinear_resize(x, 24, 24).astype(np.float32) - ref).max() <= 0.5 + 1e-3  # uint8 rounding


def test_shrinkpad_keeps_most_clean_accuracy_on_the_demo_model(demo):
    sess, _, test, trig = demo
    orig = compute_metrics(sess, test, PRE, trig, TARGET)
    m4 = evaluate_shrinkpad(sess, ShrinkPad(shrink=4), test, PRE, trig, TARGET)
    m2 = evaluate_shrinkpad(sess, ShrinkPad(shrink=2), test, PRE, trig, TARGET)
    # a SmallCNN trained without shifts loses accuracy under a 4 px shift, but keeps most of it
    assert m4.ca >= 0.7 * orig.ca and m2.ca >= 0.9 * orig.ca
    assert m4.clean_rejected == 0 and m4.triggered_rejected == 0  # ShrinkPad never abstains
    assert m4.n_triggered == orig.n_triggered and m4.asr < orig.asr  # it does disturb the corner patch


# ------------------------------------------------------------------ STRIP
def test_strip_threshold_gives_the_requested_false_rejection_rate(demo):
    sess, train, _, _ = demo
    held = train.x[100:300]
    for frr in (0.05, 0.2):
        strip = Strip(train.x[:100], n_blend=10, frr=frr, seed=0)
        strip.calibrate(sess, held, PRE)
        rejected = int(strip.rejected(sess, held, PRE).sum())
        assert abs(rejected - frr * len(held)) <= 1, (frr, rejected)
        assert strip.calibration["n_held"] == len(held)


def test_strip_rejects_most_badnets_inputs_and_abstains(demo):
    sess, train, test, trig = demo
    strip = Strip(train.x[:100], n_blend=10, frr=0.05, seed=0)
    strip.calibrate(sess, train.x[100:400], PRE)
    m = evaluate_strip(sess, strip, test, PRE, trig, TARGET)
    orig = compute_metrics(sess, test, PRE, trig, TARGET)
    assert orig.asr > 0.9
    assert m.triggered_rejected > 0.8 and m.asr < 0.2
    assert m.clean_rejected < 0.2
    assert m.ca <= orig.ca  # false rejections only ever lower CA
    # abstentions are neither attack successes nor correct answers
    assert m.asr + m.ra <= 1 - m.triggered_rejected + 1e-9


def test_strip_without_rejections_equals_the_plain_model_and_rejecting_all_scores_zero(demo):
    sess, train, test, trig = demo
    strip = Strip(train.x[:50], n_blend=5, seed=0)
    orig = compute_metrics(sess, test, PRE, trig, TARGET)
    strip.threshold = -np.inf  # nothing is below: STRIP lets everything through
    m = evaluate_strip(sess, strip, test, PRE, trig, TARGET)
    assert (m.ca, m.asr, m.ra, m.asr_floor) == (orig.ca, orig.asr, orig.ra, orig.asr_floor)
    assert m.clean_rejected == 0 and m.triggered_rejected == 0
    strip.threshold = np.inf  # everything is rejected
    m = evaluate_strip(sess, strip, test, PRE, trig, TARGET)
    assert (m.ca, m.asr, m.ra) == (0, 0, 0) and m.clean_rejected == 1 and m.triggered_rejected == 1


def test_abstention_arithmetic():
    y = np.array([1, 2, 3, 0])
    pred = np.array([1, 2, 0, 0])  # 3 right, one wrong
    m = abstention_metrics(pred, y, [True, False, False, False], target=TARGET)
    assert m.ca == 0.5  # the rejected correct answer counts as wrong
    assert m.clean_rejected == 0.25
    assert m.asr_floor == pytest.approx(1 / 3)  # image 3 (label 3) goes to the target and is accepted
    ty = np.array([1, 2, 3, 4, 0])
    tp = np.array([0, 0, 3, 0, 0])  # three non-target images go to the target, one stays correct
    trej = np.array([True, False, True, False, True])
    m = abstention_metrics(pred, y, None, tp, ty, trej, TARGET)
    assert m.n_triggered == 4  # the target-class image does not count
    assert m.asr == 0.5  # images 2 and 4 reach the target unrejected; image 1 is rejected
    assert m.ra == 0  # image 3 is right but rejected
    assert m.triggered_rejected == 0.5
    assert m.ca == 0.75 and m.clean_rejected == 0
    m = abstention_metrics(pred, y, None, tp, ty, None, TARGET)
    assert (m.asr, m.ra) == (0.75, 0.25)


# ------------------------------------------------------------------ cost
def test_measure_costs_times_every_method_against_the_original(demo_run):
    out, _ = demo_run
    x = load_images(bundled_mnist(), "test").x[:64]
    orig, fire = session(out / "model.onnx", threads=1), session(out / "model.fire.onnx", threads=1)
    strip = Strip(load_images(bundled_mnist(), "train").x[:20], n_blend=3)
    strip.threshold = 0.5
    sp = ShrinkPad()
    calls = {"original": 0}

    def counted(xb):
        calls["original"] += 1
        return plain_runner(orig, PRE)(xb)

    res = measure_costs({"original": counted, "fire": plain_runner(fire, PRE),
                         "shrinkpad": lambda xb: sp.predict(orig, xb, PRE),
                         "strip": lambda xb: strip.decide(orig, xb, PRE)}, x, batch=64, repeats=3, warmup=1)
    assert set(res) == {"original", "fire", "shrinkpad", "strip"}
    assert res["original"]["ratio"] == 1.0 and calls["original"] == 4  # 1 warm-up + 3 timed
    assert all(r["ratio"] > 0 and r["batch"] == 64 for r in res.values())  # (no assertion on the times)


# ------------------------------------------------------------------ user mistakes
def test_bad_inputs_raise_fire_error(demo):
    sess, train, test, _ = demo
    bank = train.x[:30]
    with pytest.raises(FireError, match="whole number of pixels"):
        ShrinkPad(shrink=0)
    with pytest.raises(FireError, match="cannot shrink"):
        ShrinkPad(shrink=28).transform(test.x[:2])
    with pytest.raises(FireError, match="uint8 NHWC"):
        ShrinkPad().transform(test.x[:2].astype(np.float32))
    with pytest.raises(FireError, match="uint8 NHWC"):
        ShrinkPad().transform(test.x[0])  # one image without its batch axis
    for frr in (0, 1, 1.5, -0.1, "0.05"):
        with pytest.raises(FireError, match=r"false-rejection rate must be a fraction in \(0, 1\)"):
            Strip(bank, frr=frr)
    with pytest.raises(FireError, match="empty"):
        Strip(bank[:0])
    with pytest.raises(FireError, match="bank has only 30"):
        Strip(bank, n_blend=31)
    with pytest.raises(FireError, match="blend must be one of"):
        Strip(bank, n_blend=5, blend="max")
    strip = Strip(bank, n_blend=5)
    with pytest.raises(FireError, match="no threshold yet"):
        strip.rejected(sess, test.x[:4], PRE)
    with pytest.raises(FireError, match="bank holds"):
        strip.entropy(sess, np.zeros((2, 32, 32, 1), np.uint8), PRE)
    with pytest.raises(FireError, match="at least 64 images"):
        measure_costs({"original": lambda xb: None}, test.x[:10])
    with pytest.raises(FireError, match="reference method"):
        measure_costs({"fire": lambda xb: None}, test.x[:64])
    with pytest.raises(FireError, match="one entry per clean image"):
        abstention_metrics([1, 2], [1, 2], [True])
    for err in (strip.calibrate, strip.rejected):
        with pytest.raises(FireError):
            err(sess, test.x[:0], PRE)


# ------------------------------------------------------------------ the harness, one cell
def test_bench_harness_writes_records_for_every_method(demo_run, tmp_path, monkeypatch):
    """tools/bench.py on one cell (mnist5k BadNets), the model taken from a cache seeded with the demo's
    model (no training), 300 test images; then a re-run of a subset keeps the other records."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import bench_flagged as bf

    out, _ = demo_run
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(bundled_mnist(), data_dir / "mnist5k.npz")
    recipe = bf.make_recipe(data_dir / "mnist5k.npz", "small_cnn", "badnets", 6, 0)
    cached = tmp_path / "cache" / bf.recipe_key(recipe)
    cached.mkdir(parents=True)
    shutil.copy(out / "model.onnx", cached / "model.onnx")
    results = tmp_path / "matrix"
    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "--data-dir", data_dir, "--out", results,
           "--cache", tmp_path / "cache", "--quick", "--limit", "300", "--cost-repeats", "2", "--n-blend", "5"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "reusing" in proc.stderr and "strip: calibrating" in proc.stderr  # a progress line per step
    recs = json.loads((results / "results.json").read_text())
    by = {(r["method"], r["mode"]): r for r in recs}
    assert set(by) == {("original", None), ("fire", "paired"), ("fire", "flagged"), ("shrinkpad", None), ("strip", None)}
    for r in recs:
        assert {"dataset", "model", "attack", "method", "mode", "n_triggered", "seed", "ca", "asr", "ra",
                "cost_ratio"} <= set(r)
        assert (r["dataset"], r["model"], r["attack"], r["seed"]) == ("mnist5k", "small_cnn", "badnets", 0)
        assert all(0 <= r[k] <= 1 for k in ("ca", "asr", "ra"))
        assert r["n_clean_test"] == 300 and r["cost_ratio"] > 0
    assert by[("original", None)]["cost_ratio"] == 1.0
    assert by[("fire", "paired")]["n_triggered"] == 20 and by[("original", None)]["n_triggered"] == 0
    assert by[("original", None)]["asr"] > 0.9 and by[("fire", "paired")]["asr"] < 0.05
    assert 0 <= by[("strip", None)]["clean_rejected"] <= 1 and by[("strip", None)]["triggered_rejected"] > 0.5
    assert "clean_rejected" not in by[("shrinkpad", None)]
    md = (results / "results.md").read_text()
    assert "| mnist5k | badnets |" in md and "first 300 test images" in md and "STRIP" in md

    # re-measuring a subset replaces only its records
    cmd2 = [str(c) for c in cmd[:-6]] + ["--limit", "200", "--methods", "original,shrinkpad", "--cost-repeats", "0"]
    proc = subprocess.run(cmd2, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    recs2 = json.loads((results / "results.json").read_text())
    by2 = {(r["method"], r["mode"]): r for r in recs2}
    assert set(by2) == set(by) and len(recs2) == len(recs)
    assert by2[("original", None)]["n_clean_test"] == 200 and by2[("strip", None)]["n_clean_test"] == 300


def test_peers_import_neither_torch_nor_click():
    code = "import sys, fire_onnx.peers; print(sorted(m for m in ('torch', 'click') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
