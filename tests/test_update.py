"""Streaming updates (``fit --update``) and ``patch --replace``, on the session's real backdoored model."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from conftest import run_cli, sha

from fire_onnx import directions as dirs
from fire_onnx import triggers
from fire_onnx.data import Preprocess, load_images
from fire_onnx.errors import FireError
from fire_onnx.evaluate import session
from fire_onnx.fit.pipeline import FitRequest, run_fit
from fire_onnx.streaming import ShiftStats, row_cap

ERR = "fire-onnx: error: "


@pytest.fixture
def ws(demo_run, mnist_path, tmp_path):
    """Copies of the demo model and MNIST, and flagged files: three batches (a, b, c) of triggered test
    images of non-target classes, and their union; ``pair_*`` hold the clean twins too."""
    out, _ = demo_run
    for name in ("model.onnx", "model.fire.onnx", "directions.npz"):
        shutil.copyfile(out / name, tmp_path / name)
    shutil.copyfile(mnist_path, tmp_path / "mnist.npz")
    test = load_images(mnist_path, "test")
    keep = np.flatnonzero(test.y != 0)
    trig = triggers.parse("badnets")
    for name, sl in (("a", slice(0, 7)), ("b", slice(7, 19)), ("c", slice(19, 30)), ("abc", slice(0, 30))):
        i = keep[sl]
        np.savez(tmp_path / f"flag_{name}.npz", x=trig.apply(test.x[i]))
        np.savez(tmp_path / f"pair_{name}.npz", x=trig.apply(test.x[i]), x_clean=test.x[i])
    return tmp_path


def request(ws, triggered, **kw) -> FitRequest:
    base = dict(layers=["block2"], clean_path=str(ws / "mnist.npz"), onnx_path=str(ws / "model.onnx"),
                triggered_path=str(ws / triggered), n_triggered=100, n_clean=300, mean=[0.5], std=[0.5],
                reconstruct="off")
    base.update(kw)
    return FitRequest(**base)


def assert_same_estimate(a: dirs.Target, b: dirs.Target, tol=1e-5):
    for name in ("mu", "U", "tau", "alpha"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=tol, rtol=tol, err_msg=name)
    for key in ("n_triggered", "reference", "tau_rule", "gate_recall_triggered", "gate_fires_clean"):
        assert a.fit[key] == b.fit[key], key


@pytest.mark.parametrize("kind", ["flag", "pair"])
def test_updates_equal_a_fit_on_the_union(ws, kind):
    """fit(A), update(B), update(C) == fit(A u B u C) for mean-diff, unpaired (flagged, with the default
    shrinkage, no trigger reconstruction) and paired."""
    d = run_fit(request(ws, f"{kind}_a.npz"))
    dirs.save(d, ws / "d0.npz")
    for i, part in enumerate("bc", start=1):
        d = run_fit(request(ws, f"{kind}_{part}.npz", layers=[], update_path=str(ws / f"d{i - 1}.npz")))
        dirs.save(d, ws / f"d{i}.npz")
    full = run_fit(request(ws, f"{kind}_abc.npz"))
    got = dirs.load(ws / "d2.npz")
    assert_same_estimate(got.targets[0], full.targets[0])
    assert got.targets[0].fit["updates"] == 2 and got.meta["update_history"] == ["d0.npz", "d1.npz"]
    assert got.targets[0].fit["reference"] == ("paired" if kind == "pair" else "unpaired")
    stats = ShiftStats.from_arrays(got.targets[0].stats, got.targets[0].dim)
    assert (stats.n_images, stats.rows.shape[0]) == (30, 30)
    if kind == "flag":
        assert got.targets[0].fit.get("shrinkage") and full.targets[0].fit.get("shrinkage")


def test_update_with_trigger_reconstruction_equals_a_fit_on_all_flagged_images(ws):
    """The default path for flagged images (reconstruct the trigger, fit on pseudo-pairs): the directions file
    keeps the flagged images and an update refits on them and the new ones, so fit(A), update(B), update(C)
    is fit(A u B u C) however the images arrived. (Merged per batch, 20 one-image batches left 18.4 % ASR
    where one fit on the same images left 0.3 %, new-user run 19.)"""
    d = run_fit(request(ws, "flag_a.npz", reconstruct="auto"))
    assert d.targets[0].stats["flagged_x"].shape[0] == 7 and len(d.meta["flagged_seen"]) == 7
    dirs.save(d, ws / "r0.npz")
    for i, part in enumerate("bc", start=1):
        req = request(ws, f"flag_{part}.npz", layers=[], update_path=str(ws / f"r{i - 1}.npz"), reconstruct="auto")
        up = run_fit(req)
        assert any("refitted on the" in n for n in req.notes)
        dirs.save(up, ws / f"r{i}.npz")
    got = dirs.load(ws / "r2.npz")
    full = run_fit(request(ws, "flag_abc.npz", reconstruct="auto"))
    assert got.meta["reconstruction"]["confirmed"] and got.targets[0].fit["updates"] == 2
    assert got.meta["reconstruction"]["name"] == full.meta["reconstruction"]["name"] == "patch"
    assert got.meta["reconstruction"]["n_flagged"] == 30
    assert_same_estimate(got.targets[0], full.targets[0])
    np.testing.assert_array_equal(got.targets[0].stats["flagged_x"], full.targets[0].stats["flagged_x"])
    assert got.meta["flagged_seen"] == full.meta["flagged_seen"] and len(got.meta["flagged_seen"]) == 30
    # sent again, images already merged are left out; a batch of nothing new is refused
    with pytest.raises(FireError, match="every image of flag_b.npz was already merged into r2.npz"):
        run_fit(request(ws, "flag_b.npz", layers=[], update_path=str(ws / "r2.npz"), reconstruct="auto"))
    test = load_images(ws / "mnist.npz", "test")
    keep = np.flatnonzero(test.y != 0)
    x_b = np.load(ws / "flag_b.npz")["x"]
    np.savez(ws / "mixed_new.npz", x=np.concatenate([x_b[:4], triggers.parse("badnets").apply(test.x[keep[30:33]])]))
    req = request(ws, "mixed_new.npz", layers=[], update_path=str(ws / "r2.npz"), reconstruct="auto")
    up = run_fit(req)
    assert any("4 of its 7 images were already merged into r2.npz and are left out (3 new)" in n for n in req.notes)
    assert up.targets[0].stats["flagged_x"].shape[0] == 33 and len(up.meta["flagged_seen"]) == 33


def test_update_of_a_file_without_stored_flagged_images_merges_the_batch(ws):
    """A file that keeps no flagged images (an older fire-onnx's): the new batch's reconstruction is merged into
    the statistics, and fit says so."""
    d = run_fit(request(ws, "flag_a.npz", reconstruct="auto"))
    for t in d.targets:
        t.stats.pop("flagged_x")
    d.meta.pop("flagged_seen")
    dirs.save(d, ws / "old.npz")
    first = d.targets[0].fit["n_triggered"]
    req = request(ws, "flag_b.npz", layers=[], update_path=str(ws / "old.npz"), reconstruct="auto")
    up = run_fit(req)
    t = up.targets[0]
    assert any("keeps no flagged images" in n for n in req.notes)
    assert up.meta["reconstruction"]["confirmed"] and t.fit["updates"] == 1
    assert t.fit["reference"] == "paired" and t.fit["n_triggered"] > first
    stats = ShiftStats.from_arrays(t.stats, t.dim)
    assert stats.n_gate_rows == 7 + 12  # the real flagged images of both batches
    assert t.fit["gate_recall_triggered"] == 1.0
    assert t.stats["flagged_x"].shape[0] == 12  # from now on it keeps the images it sees


def test_update_reconstructs_for_the_confirmed_class_not_the_batch_majority(ws, mnist_path):
    """A later batch where most images are clean 3s (mis-flagged) and a few carry the trigger: the update's
    reconstruction and held-out check aim at class 0, the class the first fit's reconstruction confirmed,
    and the low reach is reported, instead of hunting a trigger for class 3."""
    test = load_images(mnist_path, "test")
    keep, threes = np.flatnonzero(test.y != 0), np.flatnonzero(test.y == 3)[:12]
    np.savez(ws / "mixed.npz", x=np.concatenate([triggers.parse("badnets").apply(test.x[keep[40:45]]),
                                                  test.x[threes]]))
    d = run_fit(request(ws, "flag_abc.npz", reconstruct="auto"))
    assert d.meta["reconstruction"]["confirmed"] and d.meta["reconstruction"]["majority_class"] == 0
    dirs.save(d, ws / "r0.npz")
    req = request(ws, "mixed.npz", layers=[], update_path=str(ws / "r0.npz"), reconstruct="auto", force=True)
    up = run_fit(req)
    assert req.target == 0 and any("class the trigger reconstruction of r0.npz confirmed" in n for n in req.notes)
    assert up.meta["reconstruction"]["majority_class"] == 0
    assert up.meta["check"]["target"] == 0
    # the low reach is the new images' own (the refit also holds the 30 stored ones, which reach class 0)
    assert any("only 29% of the 17 new triggered images reach the repair's target class 0" in w
               and "merged anyway: --force" in w for w in up.meta["checks"]["warnings"])
    # the confirmed class is the file's target: another --target is refused (new-user run 6: it was taken)
    with pytest.raises(FireError, match=r"--target 5 differs from the class the trigger reconstruction confirmed \(0\)"):
        run_fit(request(ws, "mixed.npz", layers=[], update_path=str(ws / "r0.npz"), reconstruct="auto", target=5))


def test_translate_update_equals_fit(ws):
    """The translation (beta, the unnormalised mean shift) too: --repair is kept by the update."""
    dirs.save(run_fit(request(ws, "pair_a.npz", repair="translate")), ws / "t0.npz")
    up = run_fit(request(ws, "pair_b.npz", layers=[], update_path=str(ws / "t0.npz")))
    full = run_fit(request(ws, "pair_abc.npz", repair="translate", n_triggered=19))
    assert up.targets[0].repair == "translate"
    np.testing.assert_allclose(up.targets[0].beta, full.targets[0].beta, rtol=1e-5, atol=1e-5)


def test_stats_rows_are_bounded():
    """Large D keeps fewer rows (at most 2 MiB), never fewer than 8; the reservoir keeps the cap."""
    assert row_cap(3136) == 128 and row_cap(10**6) == 8 and row_cap(64) == 128
    rng = np.random.default_rng(0)
    d = 40000
    a = ShiftStats.from_rows(rng.normal(size=(10, d)), None, np.zeros(d), n_images=10)
    assert ShiftStats.from_arrays(a.to_arrays(), d).n_obs == 10
    assert a.rows.shape == (10, d)
    m = a.merge(ShiftStats.from_rows(rng.normal(size=(9, d)), None, np.zeros(d), n_images=9))
    assert m.rows.shape == (row_cap(d), d) and m.n_obs == 19
    np.testing.assert_allclose(m.sum_triggered, a.sum_triggered + (m.sum_triggered - a.sum_triggered))


def strip_stats(src, dst):
    """The same directions file without its update statistics (as an older fire-onnx wrote it)."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if ".stats." not in k}
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


def one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(ERR)
    return lines[0]


def test_cli_update_and_replace(ws):
    """The console script: fit, --update (default output name .u1), patch, patch --replace == fresh
    patch of the original in onnxruntime; the update lowers the residual ASR of 7 flagged images."""
    common = ["--onnx", "model.onnx", "--clean", "mnist.npz", "--mean", "0.5", "--std", "0.5", "--n-triggered", "50",
              "--reconstruct", "off"]
    run_cli("fit", *common, "--layer", "block2", "--triggered", "flag_a.npz", "-o", "d.npz", cwd=ws, check=True)
    before = sha(ws / "d.npz")
    proc = run_cli("fit", *common, "--update", "d.npz", "--triggered", "flag_b.npz", cwd=ws, check=True)
    assert "update 1" in proc.stdout and "19 triggered" in proc.stdout and "wrote d.u1.npz" in proc.stdout
    proc = run_cli("fit", *common, "--update", "d.u1.npz", "--triggered", "flag_c.npz", cwd=ws, check=True)
    assert "wrote d.u2.npz" in proc.stdout and sha(ws / "d.npz") == before
    # the same input updated again: the next free name, not d.u1.npz over the first update (new-user run 19),
    # and a warning that this update does not build on the earlier one
    u1 = sha(ws / "d.u1.npz")
    proc = run_cli("fit", *common, "--update", "d.npz", "--triggered", "flag_c.npz", cwd=ws, check=True)
    assert "wrote d.u3.npz" in proc.stdout and sha(ws / "d.u1.npz") == u1
    assert "d.u2.npz (an earlier update of d.npz) exists" in proc.stderr and "pass --update d.u2.npz" in proc.stderr
    run_cli("patch", "model.onnx", "d.npz", "-o", "p1.onnx", cwd=ws, check=True)
    p1 = sha(ws / "p1.onnx")
    run_cli("patch", "p1.onnx", "d.u2.npz", "--replace", "-o", "p2.onnx", cwd=ws, check=True)
    run_cli("patch", "model.onnx", "d.npz", "-o", "model.fire.onnx", cwd=ws, check=True)
    for want in ("model.fire.r1.onnx", "model.fire.r2.onnx"):  # each round its own file (run 19: r1 overwritten)
        proc = run_cli("patch", "model.fire.onnx", "d.u2.npz", "--replace", cwd=ws, check=True)
        assert want in proc.stdout and (ws / want).is_file(), proc.stdout
    run_cli("patch", "model.onnx", "d.u2.npz", "-o", "fresh.onnx", cwd=ws, check=True)
    assert sha(ws / "p1.onnx") == p1
    p2, fresh = onnx.load(str(ws / "p2.onnx")), onnx.load(str(ws / "fresh.onnx"))
    assert sorted(n.op_type for n in p2.graph.node) == sorted(n.op_type for n in fresh.graph.node)
    test = load_images(ws / "mnist.npz", "test")
    x = Preprocess(mean=[0.5], std=[0.5]).__call__(triggers.parse("badnets").apply(test.x[:200]))
    outs = []
    for name in ("p2.onnx", "fresh.onnx", "p1.onnx"):
        s = session(str(ws / name))
        outs.append(s.run(None, {s.get_inputs()[0].name: x})[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert not np.allclose(outs[0], outs[2], atol=1e-3)  # the repair was really swapped
    y = test.y[:200]
    asr = [float(((o.argmax(1) == 0) & (y != 0)).sum() / (y != 0).sum()) for o in outs]
    assert asr[0] <= asr[2]


def test_cli_refusals(ws, cnn_onnx):
    """One error line, exit 1: --update of a file without statistics, --replace of an unpatched model,
    --replace with directions for another tensor, --update with another model."""
    strip_stats(ws / "directions.npz", ws / "old.npz")
    common = ["--onnx", "model.onnx", "--clean", "mnist.npz", "--mean", "0.5", "--std", "0.5"]
    msg = one_error_line(run_cli("fit", *common, "--update", "old.npz", "--triggered", "flag_a.npz", cwd=ws))
    assert "no update statistics" in msg and not (ws / "old.u1.npz").exists()
    assert dirs.load(ws / "old.npz").targets[0].stats == {}  # still a valid file for patch

    msg = one_error_line(run_cli("patch", "model.onnx", "directions.npz", "--replace", "-o", "r.onnx", cwd=ws))
    assert "no fire-onnx repair" in msg and not (ws / "r.onnx").exists()

    run_cli("fit", *common, "--layer", "block1", "--trigger", "badnets", "--target", "0", "-o", "b1.npz", cwd=ws,
            check=True)
    msg = one_error_line(run_cli("patch", "model.fire.onnx", "b1.npz", "--replace", "-o", "r.onnx", cwd=ws))
    assert "same tensors" in msg and not (ws / "r.onnx").exists()

    _, other = cnn_onnx  # same architecture, other (untrained) weights
    shutil.copyfile(other, ws / "other.onnx")
    msg = one_error_line(run_cli("fit", "--onnx", "other.onnx", "--clean", "mnist.npz", "--update", "directions.npz",
                                 "--triggered", "flag_a.npz", "--reconstruct", "off", cwd=ws))
    assert "same model" in msg

    msg = one_error_line(run_cli("fit", *common, "--update", "directions.npz", "--layer", "block1",
                                 "--triggered", "flag_a.npz", cwd=ws))
    assert "leave --layer out" in msg


def test_library_replace_repair_refuses_unpatched(ws):
    from fire_onnx.patch import replace_repair

    with pytest.raises(FireError, match="no fire-onnx repair"):
        replace_repair(onnx.load(str(ws / "model.onnx")), dirs.load(ws / "directions.npz"))


def test_update_refuses_options_it_would_ignore(ws):
    """--update takes method, gate, alpha, ... from the file: giving them is an error, not a silent no-op."""
    proc = run_cli("fit", "--onnx", "model.onnx", "--clean", "mnist.npz", "--update", "d.npz", "--triggered",
                   "flag_b.npz", "--gate", "none", "--alpha", "0.5", cwd=ws)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--update takes --gate, --alpha from d.npz" in proc.stderr, proc.stderr


def test_update_refuses_another_target_than_the_files(ws):
    d = run_fit(request(ws, "pair_a.npz", target=0))
    dirs.save(d, ws / "d0.npz")
    with pytest.raises(FireError, match=r"--target 5 differs from the target class \(0\)"):
        run_fit(FitRequest(layers=[], update_path=str(ws / "d0.npz"), clean_path=str(ws / "mnist.npz"),
                           onnx_path=str(ws / "model.onnx"), triggered_path=str(ws / "pair_b.npz"), target=5,
                           n_clean=300, mean=[0.5], std=[0.5], reconstruct="off"))


def test_update_refuses_preprocessing_other_than_the_files(ws):
    """The recorded preprocessing is what the statistics were gathered under: another --mean/--std would merge
    activations of other inputs (new-user run 8: it was taken silently and the file then recorded it). The
    same values are accepted."""
    d = run_fit(request(ws, "pair_a.npz", target=0))
    dirs.save(d, ws / "d0.npz")
    upd = dict(layers=[], update_path=str(ws / "d0.npz"), clean_path=str(ws / "mnist.npz"),
               onnx_path=str(ws / "model.onnx"), triggered_path=str(ws / "pair_b.npz"), n_clean=300,
               reconstruct="off")
    with pytest.raises(FireError, match=r"--mean 0.45 \(recorded: 0.5\); --std 0.55 \(recorded: 0.5\)"):
        run_fit(FitRequest(**upd, mean=[0.45], std=[0.55]))
    out = run_fit(FitRequest(**upd, mean=[0.5], std=[0.5]))
    assert out.preprocess["mean"] == [0.5] and out.preprocess["std"] == [0.5]


def test_update_refuses_images_that_do_not_reach_the_target(ws, mnist_path):
    """New 'triggered' images the model does not send to the repair's target (clean ones, here) would pull
    the merged estimate off the trigger; the update is refused, and --force merges them anyway."""
    d = run_fit(request(ws, "pair_a.npz", target=0))
    dirs.save(d, ws / "d0.npz")
    test = load_images(mnist_path, "test")
    np.savez(ws / "not_triggered.npz", x=test.x[test.y != 0][100:130])
    upd = dict(layers=[], update_path=str(ws / "d0.npz"), clean_path=str(ws / "mnist.npz"),
               onnx_path=str(ws / "model.onnx"), triggered_path=str(ws / "not_triggered.npz"), n_clean=300)
    with pytest.raises(FireError, match=r"only \d+% of the 20 new triggered images reach the repair's target "
                                        r"class 0.*--force merges them anyway"):
        run_fit(FitRequest(**upd))
    forced = run_fit(FitRequest(**upd, force=True))
    assert forced.targets[0].fit["updates"] == 1


def test_update_refuses_clean_images_the_model_reads_near_chance(ws):
    """The update replaces the repair's clean reference with the clean images given: a clean file the model reads at
    chance (run 19: Fashion-MNIST images for an MNIST repair, 10 % right; ASR 0.6 -> 13.3 % with a warning only) is
    refused; --force writes it."""
    d = run_fit(request(ws, "flag_a.npz"))
    dirs.save(d, ws / "r0.npz")
    m = np.load(ws / "mnist.npz")
    rng = np.random.default_rng(0)
    np.savez(ws / "wrong.npz", x_train=m["x_train"], y_train=rng.permutation(m["y_train"]))  # labels of other images
    with pytest.raises(FireError, match=r"not written: the model classifies only .* of the clean images correctly"):
        run_fit(request(ws, "flag_b.npz", layers=[], update_path=str(ws / "r0.npz"), clean_path=str(ws / "wrong.npz")))
    run_fit(request(ws, "flag_b.npz", layers=[], update_path=str(ws / "r0.npz"), clean_path=str(ws / "wrong.npz"),
                    force=True))
