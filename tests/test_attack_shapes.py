"""Backdoors that are not one trigger -> one target (new-user run 13): what eval, fit, patch and the
trigger-free scan say about a source-specific backdoor, one that sends triggered inputs elsewhere than
--target (all-to-all), a second backdoor among flagged inputs or in a trigger-free scan, a --replace that
drops a repair for another class (refused; --add stacks the second repair instead), flagged images of two backdoors
in one file, a repeated option, and a trigger that clean images already carry.

Real console script, the demo's backdoored MNIST model (BadNets -> class 0) and real digits.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from conftest import run_cli
from test_cli import ws  # noqa: F401  (ws is a fixture)

from fire_onnx import directions as dirs
from fire_onnx import invert, triggers
from fire_onnx.data import Images

PRE = ("--mean", "0.5", "--std", "0.5")


def test_eval_names_a_source_specific_backdoor_and_checks_it(ws):  # noqa: F811
    """Only class-3 images carry the trigger: pooled over every class the ASR reads about a ninth of it. eval warns,
    lists each class in the JSON, and --fail-asr fails on the class that is confidently over the limit."""
    d = np.load(ws / "mnist.npz")
    x, y = d["x_test"][:1000], d["y_test"][:1000]
    xt = x.copy()
    xt[y == 3] = triggers.parse("badnets").apply(x[y == 3])
    np.savez(ws / "src3.npz", x=xt, y=y)
    proc = run_cli("eval", "model.onnx", "--data", "mnist.npz", "--triggered", "src3.npz", "--target", "0", *PRE,
                   "--fail-asr", "0.2", "--json", "-", cwd=ws)
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    r = out["models"]["model.onnx"]
    assert r["asr"] < 0.2 and r["by_class"]["3"]["asr"] > 0.9, r
    assert "triggered class-3 images reach class 0" in proc.stderr and "pooled over all classes" in proc.stderr
    failed = [c for c in out["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == ["asr_class"] and failed[0]["source_class"] == "3", out["checks"]


def test_eval_names_triggered_inputs_sent_elsewhere_and_fail_ra_drop_catches_them(ws):  # noqa: F811
    """Measured against the wrong target (5; the backdoor sends to 0), ASR reads about 0: eval says where the
    triggered images go, and --fail-ra-drop (RA against CA) fails, as does --fail-asr (asr_target: a target the
    trigger does not reach)."""
    proc = run_cli("eval", "model.onnx", "--data", "mnist.npz", "--trigger", "badnets", "--target", "5", *PRE,
                   "--fail-asr", "0.05", "--fail-ra-drop", "0.1", "--json", "-", cwd=ws)
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    r = out["models"]["model.onnx"]
    assert r["asr"] < 0.05 and r["elsewhere"] > 0.8, r
    # triggered class-5 images (the --target's own) keep class 5 only as far as the backdoor (to 0) lets them
    assert r["target_kept"] < 0.2 and r["target_recall"] > 0.9, r
    assert "triggered images of class 5 itself stay at class 5 only" in proc.stderr
    assert "go neither to their label nor to class 5" in proc.stderr and "a backdoor to class 0, not 5" in proc.stderr
    by = {c["check"]: c["passed"] for c in out["checks"]}
    assert by == {"asr": True, "asr_target": False, "ra_drop": False}, out["checks"]
    # without triggered images there is no RA to check
    bad = run_cli("eval", "model.onnx", "--data", "mnist.npz", "--fail-ra-drop", "0.1", *PRE, cwd=ws)
    assert bad.returncode == 1 and "--fail-ra-drop needs triggered images" in bad.stderr


def test_flagged_images_of_a_second_class_are_named(ws):  # noqa: F811
    """17 triggered images and 3 clean class-7 ones: the repair is fitted for class 0, and fit says the three go
    to class 7 (a second backdoor, or untriggered images) and that the repair does nothing for them."""
    d = np.load(ws / "mnist.npz")
    x, y = d["x_train"], d["y_train"]
    trig = triggers.parse("badnets").apply(x[y != 0][:17])
    sevens = x[y == 7][:3]
    np.savez(ws / "mixed.npz", x=np.concatenate([trig, sevens]))
    proc = run_cli("fit", "--onnx", "model.onnx", "--layer", "block2", "--clean", "mnist.npz", "--triggered",
                   "mixed.npz", *PRE, "-o", "mixed_d.npz", "--json", "-", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    assert "3 of the 20 flagged images go to class 7, not class 0 (17)" in proc.stderr
    assert "does nothing for class 7" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["check"]["target"] == 0


def test_replace_refuses_to_drop_the_repair_of_another_class(ws):  # noqa: F811
    """--replace swaps repairs: a repair for class 7 swapped in for the class-0 one re-opens the class-0 backdoor
    (new-user runs 13 and 23). Refused with the way to keep both (--add), or done with --force, saying so."""
    d = dirs.load(ws / "directions.npz")
    d.meta["target"] = 7  # a repair fitted for another class at the same tensor
    dirs.save(d, ws / "d7.npz")
    proc = run_cli("patch", "--replace", "model.fire.onnx", "d7.npz", "-o", "r.onnx", cwd=ws)
    assert proc.returncode == 1 and not (ws / "r.onnx").exists(), proc.stderr
    assert "the repair replaced is for class 0, the new one for class 7" in proc.stderr
    assert "patch --add" in proc.stderr and "--force" in proc.stderr
    forced = run_cli("patch", "--replace", "--force", "model.fire.onnx", "d7.npz", "-o", "r.onnx", cwd=ws, check=True)
    assert "that backdoor works again in the output (--force)" in forced.stderr


def test_a_flagged_repair_records_its_class_so_replace_sees_the_swap(ws):  # noqa: F811
    """A fit from flagged images (no --target) records no target; its class is the one the trigger reconstruction
    confirmed. patch records it per repair, and --replace by a repair for another class is refused (new-user run 23:
    silent, and the class-0 backdoor came back from 4.6 to 98.3 % ASR)."""
    from fire_onnx.onnxutil import load_model
    from fire_onnx.patch import recorded_classes

    d = np.load(ws / "mnist.npz")
    x, y = d["x_train"], d["y_train"]
    np.savez(ws / "flagged.npz", x=triggers.parse("badnets").apply(x[y != 0][:20]))
    run_cli("fit", "--onnx", "model.onnx", "--layer", "block2", "--clean", "mnist.npz", "--triggered", "flagged.npz",
            *PRE, "-o", "df.npz", cwd=ws, check=True)
    meta = dirs.load(ws / "df.npz").meta
    assert meta.get("target") is None and dirs.repaired_class(meta) == 0
    run_cli("patch", "model.onnx", "df.npz", "-o", "f.onnx", cwd=ws, check=True)
    assert recorded_classes(load_model(ws / "f.onnx")) == [0]
    d7 = dirs.load(ws / "directions.npz")
    d7.meta["target"] = 7
    dirs.save(d7, ws / "d7.npz")
    proc = run_cli("patch", "--replace", "f.onnx", "d7.npz", "-o", "r.onnx", cwd=ws)
    assert proc.returncode == 1 and "the repair replaced is for class 0" in proc.stderr, proc.stderr


def test_add_keeps_the_first_repair_and_stacks_the_second(ws):  # noqa: F811
    """patch --add on a repaired model keeps its repair: a second repair at the same tensor reads the repaired
    activation. With a second repair that never fires (tau far above every score), the stacked model is the first
    repair's model: its ASR stays at the repaired level (a second repair wired to the unrepaired activation would
    drop the first and bring ASR back to ~100 %). inspect lists both with their classes; --replace --force of the
    stacked model by the first directions gives back the single repair's predictions."""
    import onnxruntime as ort

    d = dirs.load(ws / "directions.npz")
    t = d.targets[0]
    rng = np.random.default_rng(0)
    u = rng.normal(size=t.U.shape).astype(np.float32)
    t.U = (u / np.linalg.norm(u)).astype(np.float32)
    t.tau = np.full_like(t.tau, 1e6)
    d.meta["target"] = 7
    dirs.save(d, ws / "d7.npz")
    refused = run_cli("patch", "model.fire.onnx", "d7.npz", "-o", "s.onnx", cwd=ws)
    assert refused.returncode == 1 and "--add keeps its repair" in refused.stderr
    run_cli("patch", "--add", "model.fire.onnx", "d7.npz", "-o", "s.onnx", cwd=ws, check=True)
    view = run_cli("inspect", "s.onnx", cwd=ws, check=True).stdout
    assert "for class 0" in view and "for class 7, after the repair above at the same tensor (--add)" in view
    assert "several backdoors repaired, targets 0, 7" in view
    mn = np.load(ws / "mnist.npz")
    xt = triggers.parse("badnets").apply(mn["x_test"][:300])
    xin = ((xt.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2)

    def pred(name):
        s = ort.InferenceSession(str(ws / name), providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: xin})[0]

    single, stacked, orig = pred("model.fire.onnx"), pred("s.onnx"), pred("model.onnx")
    assert (orig.argmax(1) == 0).mean() > 0.9 and (single.argmax(1) == 0).mean() < 0.2
    assert np.allclose(stacked, single, atol=1e-5)
    run_cli("patch", "--replace", "--force", "s.onnx", "directions.npz", "-o", "back.onnx", cwd=ws, check=True)
    assert np.allclose(pred("back.onnx"), single, atol=1e-5)
    both = run_cli("patch", "--replace", "--add", "model.fire.onnx", "d7.npz", "-o", "x.onnx", cwd=ws)
    assert both.returncode == 1 and "give one of them" in both.stderr
    plain = run_cli("patch", "--add", "model.onnx", "d7.npz", "-o", "x.onnx", cwd=ws)
    assert plain.returncode == 1 and "patch it without --add" in plain.stderr


def test_replace_in_a_stack_swaps_one_class_and_add_checks_fingerprints_on_the_unrepaired_model(ws):  # noqa: F811
    """A model repaired for two classes (--add): --replace with a refit of one class swaps that class's repair and keeps
    the other's (new-user run 24: no way but rebuilding from the original). A repair added downstream of another is
    checked against the unrepaired model's activations (the upstream gate firing on the probe images made --add refuse
    it as 'fitted on another model'), and one fitted with other preprocessing than the model records is refused."""
    import onnxruntime as ort

    run_cli("fit", "--onnx", "model.onnx", "--layer", "block1", "--clean", "mnist.npz", "--trigger", "badnets",
            "--target", "0", *PRE, "-o", "d_b1.npz", cwd=ws, check=True)
    up = dirs.load(ws / "d_b1.npz")
    up.meta["target"], up.targets[0].gate = 7, "none"  # fires on every input, probe images included
    dirs.save(up, ws / "d7_b1.npz")
    run_cli("patch", "model.onnx", "d7_b1.npz", "-o", "up.onnx", cwd=ws, check=True)
    run_cli("patch", "--add", "up.onnx", "directions.npz", "-o", "up_add.onnx", cwd=ws, check=True)
    # a stack at one tensor: class 0, then a class-7 repair that never fires
    d = dirs.load(ws / "directions.npz")
    t = d.targets[0]
    u = np.random.default_rng(0).normal(size=t.U.shape).astype(np.float32)
    t.U, t.tau = (u / np.linalg.norm(u)).astype(np.float32), np.full_like(t.tau, 1e6)
    d.meta["target"] = 7
    dirs.save(d, ws / "d7.npz")
    run_cli("patch", "--add", "model.fire.onnx", "d7.npz", "-o", "s.onnx", cwd=ws, check=True)
    swap = run_cli("patch", "--replace", "s.onnx", "directions.npz", "-o", "s2.onnx", cwd=ws, check=True)
    assert "swapped the class-0 repair and kept the repair of class 7" in swap.stderr
    view = run_cli("inspect", "s2.onnx", cwd=ws, check=True).stdout
    assert "for class 7" in view and "for class 0, after the repair above at the same tensor (--add)" in view
    xt = triggers.parse("badnets").apply(np.load(ws / "mnist.npz")["x_test"][:200])
    xin = ((xt.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2)

    def out(name):
        sess = ort.InferenceSession(str(ws / name), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: xin})[0]

    assert np.allclose(out("s2.onnx"), out("model.fire.onnx"), atol=1e-5)
    other = dirs.load(ws / "d7.npz")
    other.preprocess = dict(other.preprocess, mean=[0.0], std=[1.0])
    dirs.save(other, ws / "d7_pre.npz")
    bad = run_cli("patch", "--add", "model.fire.onnx", "d7_pre.npz", "-o", "p.onnx", cwd=ws)
    assert bad.returncode == 1 and "other preprocessing" in bad.stderr and not (ws / "p.onnx").exists()


def test_flagged_images_of_two_backdoors_in_one_file_are_refused(ws):  # noqa: F811
    """10 BadNets images (class 0) and 10 whose patch sends them nowhere near 0 but agree on another class: one repair
    fitted on both groups is fitted for neither (new-user run 23: written with exit 0, 65 % and 86 % ASR left). fit
    refuses and says to split the file; --force writes it."""
    d = np.load(ws / "mnist.npz")
    x, y = d["x_train"], d["y_train"]
    trig = triggers.parse("badnets").apply(x[y != 0][:10])
    sevens = x[y == 7][:10]  # a second group the model agrees on: class 7
    np.savez(ws / "two.npz", x=np.concatenate([trig, sevens]))
    proc = run_cli("fit", "--onnx", "model.onnx", "--layer", "block2", "--clean", "mnist.npz", "--triggered",
                   "two.npz", *PRE, "-o", "two_d.npz", cwd=ws)
    assert proc.returncode == 1 and not (ws / "two_d.npz").exists(), proc.stderr
    assert "the flagged images go to two classes: 10 of the 20 fitted on to class 7" in proc.stderr
    assert "Split the file" in proc.stderr and "patch --add" in proc.stderr
    run_cli("fit", "--onnx", "model.onnx", "--layer", "block2", "--clean", "mnist.npz", "--triggered", "two.npz",
            *PRE, "-o", "two_d.npz", "--force", cwd=ws, check=True)


def test_an_option_of_one_value_given_twice_is_refused(ws):  # noqa: F811
    """click keeps the last of a repeated option: fit --triggered A --triggered B fitted B alone (new-user run 23)."""
    proc = run_cli("fit", "--onnx", "model.onnx", "--layer", "block2", "--clean", "mnist.npz", "--triggered",
                   "a.npz", "--triggered=b.npz", *PRE, "-o", "x.npz", cwd=ws)
    assert proc.returncode == 2 and "--triggered is given twice" in proc.stderr and "patch --add" in proc.stderr
    proc = run_cli("eval", "model.onnx", "--data", "mnist.npz", "--target", "0", "--target", "1", cwd=ws)
    assert proc.returncode == 2 and "--target is given twice" in proc.stderr and "patch --add" not in proc.stderr


def test_trigger_free_names_a_runner_up_class():
    from fire_onnx.fit.trigger_free import runner_up_warnings

    k = invert.KINDS[0]
    scan = {k: {"loss": [0.1, 0.9, 0.01], "anomaly_index": [4.49, 0.2, 6.95], "flip_rate": [0.96, 0.1, 1.0]}}
    (w,) = runner_up_warnings(scan, 2)
    assert "class 0 also stands out" in w and "does not cover it" in w
    scan[k]["flip_rate"][0] = 0.5  # standing out without sending the images there: not named
    assert runner_up_warnings(scan, 2) == []


def test_clean_images_that_carry_the_trigger_are_counted(mnist_path):
    from fire_onnx.data import load_images
    from fire_onnx.fit.verify import _carriers

    pool = load_images(mnist_path, "train").subset(slice(0, 500))
    trig = triggers.parse("badnets")
    x = pool.x.copy()
    zeros = np.flatnonzero(pool.y == 0)[:5]
    x[zeros] = trig.apply(x[zeros])  # the pattern occurs in five clean class-0 images
    c = _carriers(SimpleNamespace(trigger=trig, pool=Images(x, pool.y)))
    assert c == {"n": 5, "by_class": "5 labelled 0"}
    assert _carriers(SimpleNamespace(trigger=trig, pool=pool)) is None


def test_a_source_specific_backdoor_is_not_refused_as_no_backdoor():
    """13 % of held-out stamped images reach the target, 91 % of class 3's (new-user run 13): that is a backdoor
    from one source class, not none; the check names the class instead of refusing."""
    from fire_onnx.fit.verify import _source_classes

    y = np.repeat(np.arange(10), 40)
    base = np.where(y == 3, 8, y)  # the original model: class 3 stamped -> 8, every other class keeps its label
    base[np.flatnonzero(y == 3)[:4]] = 3  # 36 of 40 reach the target
    got = _source_classes(Images(np.zeros((400, 2, 2, 1), np.uint8), y), base, 8)
    assert [(c, n) for c, _, n in got] == [(3, 40)] and got[0][1] == 0.9
    assert _source_classes(Images(np.zeros((400, 2, 2, 1), np.uint8), y), np.where(y == 3, 1, y), 8) == []
    assert _source_classes(Images(np.zeros((400, 2, 2, 1), np.uint8)), base, 8) == []  # no labels
