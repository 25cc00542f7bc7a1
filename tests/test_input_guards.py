"""Guards found by new-user runs on inputs the README does not show (run 14: vector and sequence models,
NCHW and float npz files, a model whose preprocessing is inside the graph).

- genuine target-class images that a repair at a class-specific layer reads as triggered are not left out of
  the clean pool as "poisoned" (they carry nothing of the trigger in pixel space);
- ``fit`` refuses a repair when the original model does not send the held-out triggered images to --target
  (nothing to remove: wrong preprocessing, wrong trigger);
- ``eval``'s --fail-* checks fail on a model the preprocessing check says reads the images wrongly;
- NCHW and float npz files, and non-image model inputs, get one-line errors that say what to do.

Real data (bundled MNIST-5k) and the demo's backdoored model throughout.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
from conftest import run_cli
from onnx import TensorProto, helper
from test_cli import assert_user_error, snapshot, ws  # noqa: F401  (ws is a fixture)

from fire_onnx import triggers
from fire_onnx.data import Images, load_images
from fire_onnx.fit.verify import CARRY_SHARE, carried_share, poisoned_clean_hint

PRE = ("--mean", "0.5", "--std", "0.5")


def _pool(mnist_path, n=1000):
    d = load_images(mnist_path, "train")
    return d.x[:n], d.y[:n]


def test_poisoned_images_carry_the_trigger_genuine_target_images_do_not(mnist_path):
    """carried_share on real digits: a pool's stamped images carry about all of the trigger's pixel change, its
    genuine class-0 images about none, for --trigger, a triggered file with twins, and flagged images alone (a
    patch and a blend); below CARRY_SHARE fit does not leave them out."""
    x, y = _pool(mnist_path)
    for spec in ("badnets", "blended:alpha=0.2"):
        trig = triggers.parse(spec)
        pool = x.copy()
        poisoned = np.flatnonzero(y != 0)[::9]  # about 10 % of the pool, relabelled in a real attack
        pool[poisoned] = trig.apply(pool[poisoned])
        genuine = y == 0
        stamped_mask = np.zeros(len(pool), bool)
        stamped_mask[poisoned] = True
        flag_src = load_images(mnist_path, "test")
        flag_src = flag_src.x[flag_src.y != 0][:20]
        sources = {
            "trigger": SimpleNamespace(trigger=trig, triggered=None, triggered_clean=None),
            "twins": SimpleNamespace(trigger=None, triggered=Images(trig.apply(flag_src)), triggered_clean=flag_src),
            "flagged": SimpleNamespace(trigger=None, triggered=Images(trig.apply(flag_src)), triggered_clean=None),
        }
        for name, inputs in sources.items():
            carried = carried_share(inputs, pool, stamped_mask)
            assert carried is not None and carried >= 0.8, (spec, name, carried)
            own = carried_share(inputs, pool, genuine)
            assert own is not None and own < CARRY_SHARE, (spec, name, own)  # a blend reads 0.28 on bright 0s
    # nothing to compare with: no trigger, no triggered images
    assert carried_share(SimpleNamespace(trigger=None, triggered=None, triggered_clean=None), x, y == 0) is None
    hint = poisoned_clean_hint({"changed": 23, "changed_from_target": 23, "target": 0,
                                "genuine_target": {"n": 121, "carried_share": -0.003}})
    assert "genuine class-0 images" in hint and "carry 0% of the trigger's pixel change" in hint
    assert "probably holds triggered (poisoned) images" not in hint


def test_fit_refuses_a_repair_with_no_backdoor_to_remove(ws):  # noqa: F811
    """A trigger the model does not react to (here: a blend on the BadNets model) leaves nothing to remove: the
    repair is refused (run 14: with the wrong --scale every image went to one class, 0 % -> 0 % at the target, and
    the repair was written with exit 0); --force writes it."""
    before = snapshot(ws)
    common = ("fit", "--onnx", "model.onnx", "--layer", "block2", "--clean", "mnist.npz", "--trigger",
              "blended", "--target", "0", *PRE)
    proc = run_cli(*common, "-o", "nb.npz", cwd=ws)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and snapshot(ws) == before, proc.stderr
    assert last.startswith("fire-onnx: error: not written") and "shows no backdoor" in last, last
    assert "nothing to remove" in last and "--force writes it anyway" in last
    assert "only 0% of the triggered fitting images are classified as the target 0" in proc.stderr  # why, above it
    forced = run_cli(*common, "-o", "nb.npz", "--force", "--json", "-", cwd=ws)
    assert forced.returncode == 0, forced.stderr
    out = json.loads(forced.stdout)
    assert out["check"]["refuse_no_backdoor"] and out["check"]["target_rate_before"] < 0.2


def test_eval_checks_fail_on_a_misread_model(ws):  # noqa: F811
    """--fail-asr cannot pass through a preprocessing the check says is wrong (run 14: every image at one class,
    so ASR 0 %, and 'check ok' with exit 0)."""
    proc = run_cli("eval", "model.onnx", "model.fire.onnx", "--data", "mnist.npz", "--trigger", "badnets",
                   "--target", "0", "--mean", "5", "--std", "0.5", "--fail-asr", "0.02",
                   "--fail-ca-drop", "0.01", "--json", "-", cwd=ws)
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    pre = [c for c in out["checks"] if c["check"] == "preprocessing"]
    assert len(pre) == 1 and not pre[0]["passed"] and not out["checks_passed"], out["checks"]
    assert "the images are read wrongly" in proc.stderr and "Traceback" not in proc.stderr
    # the same models, read right: the preprocessing check does not fire and the checks pass
    ok = run_cli("eval", "model.onnx", "model.fire.onnx", "--data", "mnist.npz", "--trigger", "badnets",
                 "--target", "0", "--fail-asr", "0.05", "--json", "-", cwd=ws)
    assert ok.returncode == 0, ok.stderr
    assert not [c for c in json.loads(ok.stdout)["checks"] if c["check"] == "preprocessing"]


def test_nchw_float_and_vector_inputs_get_one_line_errors(ws):  # noqa: F811
    d = np.load(ws / "mnist.npz")
    x = d["x_train"][:300]
    np.savez(ws / "nchw.npz", x_train=x.reshape(300, 28, 28, 1).transpose(0, 3, 1, 2), y_train=d["y_train"][:300])
    np.savez(ws / "float.npz", x_train=x.astype(np.float32) / 255, y_train=d["y_train"][:300])
    before = snapshot(ws)
    fit = ("fit", "--onnx", "model.onnx", "--layer", "block2", "--trigger", "badnets", "--target", "0", *PRE,
           "-o", "x.npz")
    assert_user_error(run_cli(*fit, "--clean", "nchw.npz", cwd=ws), ws, before, "looks like an NCHW array",
                      "x.transpose(0, 2, 3, 1)")
    assert_user_error(run_cli(*fit, "--clean", "float.npz", cwd=ws), ws, before, "must be uint8",
                      "np.round(x * 255).astype(np.uint8)")
    # a vector-input model: no image layout feeds it, and the error says what does
    w = helper.make_tensor("w", TensorProto.FLOAT, [784, 10], np.zeros(784 * 10, np.float32))
    g = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["logits"])], "mlp",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(ws / "mlp.onnx"))
    before = snapshot(ws)
    assert_user_error(run_cli("eval", "mlp.onnx", "--data", "mnist.npz", cwd=ws), ws, before, "(rank 2)",
                      "fire-onnx feeds images", "image-shaped input")


def test_a_repair_broken_after_patching_is_named(ws):  # noqa: F811
    """New-user run 16: static INT8 quantization calibrated on clean images turns the gate off (ASR 0.4 -> 99.9 %)
    and fire-onnx metadata copied onto the unrepaired model both read "repaired" in inspect. Now inspect and eval
    say why the repair does not work, patch --replace refuses the quantized one instead of cutting its graph apart,
    and the metadata-only model is patched as the unrepaired model it is."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    d = np.load(ws / "mnist.npz")
    x = ((d["x_train"][:100].astype(np.float32) / 255).transpose(0, 3, 1, 2) - 0.5) / 0.5

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x[i:i + 20]} for i in range(0, len(x), 20)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(ws / "model.fire.onnx"), str(ws / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    proc = run_cli("inspect", "q.onnx", cwd=ws)
    assert proc.returncode == 0 and "cannot reach the gate's threshold" in proc.stdout, proc.stdout
    assert "NOT WORKING" in proc.stdout and "nodes_to_exclude" in proc.stdout
    ev = run_cli("eval", "model.onnx", "q.onnx", "--data", "mnist.npz", "--trigger", "badnets", "--target", "0",
                 "--json", "-", cwd=ws)
    assert ev.returncode == 0, ev.stderr
    assert "q.onnx: the repair's nodes are quantized" in ev.stderr
    if json.loads(ev.stdout)["models"]["q.onnx"]["asr"] > 0.5:  # the gate is off, as measured in run 16
        assert "the repair removes little of this trigger" in ev.stderr
    before = snapshot(ws)
    assert_user_error(run_cli("patch", "--replace", "q.onnx", "directions.npz", "-o", "r.onnx", cwd=ws), ws, before,
                      "repair was quantized", "fire_onnx/ nodes excluded")
    # the unrepaired model with a repaired one's metadata
    plain, fixed = onnx.load(str(ws / "model.onnx")), onnx.load(str(ws / "model.fire.onnx"))
    del plain.metadata_props[:]
    plain.metadata_props.extend(fixed.metadata_props)
    onnx.save(plain, str(ws / "meta_only.onnx"))
    proc = run_cli("inspect", "meta_only.onnx", cwd=ws)
    assert "the graph has no fire-onnx nodes: it is not repaired" in proc.stdout, proc.stdout
    proc = run_cli("patch", "meta_only.onnx", "directions.npz", "-o", "mo.fire.onnx", cwd=ws)
    assert proc.returncode == 0 and "metadata but no repair nodes" in proc.stderr, proc.stderr
    assert "NOT WORKING" not in run_cli("inspect", "mo.fire.onnx", cwd=ws).stdout


def test_fit_needs_clean_images_of_the_target_and_warns_on_few_classes(ws):  # noqa: F811
    """A clean file without --target's class: neither the clean reference nor the held-out check sees what the
    repair does to that class (new-user run 20: a GTSRB class went from 84.9 % to 71.4 %, 3.4 % with a one-class
    file, while the check read 0.0 % changed): a warning that points to eval's per-class --fail-ca-drop (a
    refusal cannot tell such a file from a class that exists only through the trigger). A file holding few of
    the model's classes gets a warning, and a one-class file is not blamed on the preprocessing."""
    d = np.load(ws / "mnist.npz")
    x, y = d["x_train"], d["y_train"]
    keep = y != 0
    np.savez(ws / "no_target.npz", x=x[keep][:800], y=y[keep][:800])
    common = ("fit", "--onnx", "model.onnx", "--layer", "block2", "--trigger", "badnets", "--target", "0", *PRE)
    proc = run_cli(*common, "--clean", "no_target.npz", "-o", "nt.npz", "--json", "-", cwd=ws, check=True)
    assert "has no image labelled 0 (--target)" in proc.stderr and "--fail-ca-drop" in proc.stderr
    assert any("has no image labelled 0" in w for w in json.loads(proc.stdout)["warnings"])
    few = np.isin(y, [0, 1, 2])
    np.savez(ws / "few.npz", x=x[few][:800], y=y[few][:800])
    proc = run_cli(*common, "--clean", "few.npz", "-o", "few_d.npz", "--json", "-", cwd=ws)
    out = json.loads(proc.stdout) if proc.returncode == 0 else None
    assert "hold only 3 of the model's 10 classes" in proc.stderr, proc.stderr
    assert out is None or any("hold only 3" in w for w in out["warnings"])
    one = y == 3  # (and no class 0: --force)
    np.savez(ws / "one.npz", x=x[one][:400], y=y[one][:400])
    proc = run_cli(*common, "--clean", "one.npz", "-o", "one_d.npz", "--force", cwd=ws)
    assert "hold only 1 of the model's 10 classes" in proc.stderr and "chance is" not in proc.stderr, proc.stderr


def test_eval_measures_asr_on_unlabelled_flagged_images(ws):  # noqa: F811
    """Flagged inputs have no labels; the share sent to --target needs none (new-user run 20 was refused): eval
    measures ASR over all of them and says RA needs labels."""
    d = np.load(ws / "mnist.npz")
    x, y = d["x_test"], d["y_test"]
    np.savez(ws / "flagged.npz", x=triggers.parse("badnets").apply(x[y != 0][:60]))
    proc = run_cli("eval", "model.onnx", "model.fire.onnx", "--data", "mnist.npz", "--triggered", "flagged.npz",
                   "--target", "0", *PRE, "--fail-asr", "0.05", "--json", "-", cwd=ws)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout)["models"]
    assert out["model.onnx"]["asr"] >= 0.9 and out["model.fire.onnx"]["asr"] <= 0.05
    assert out["model.fire.onnx"]["ra"] is None and out["model.fire.onnx"]["asr_unlabelled"]
    assert "flagged.npz has no labels" in proc.stderr


def test_errors_in_the_users_model_code_are_one_line(ws):  # noqa: F811
    """A factory that raises, or a model file with a syntax error, is the user's code: one line naming the file
    and line, exit 1, no fire-onnx traceback (new-user run 18)."""
    (ws / "bad.py").write_text("def build():\n    raise RuntimeError('boom')\n")
    (ws / "syn.py").write_text("def build(:\n    pass\n")
    common = ("fit", "--layer", "x", "--clean", "mnist.npz", "--trigger", "badnets", "--target", "0", "--no-weights")
    for spec, expect in (("bad.py:build", "the model factory bad.py:build raised RuntimeError: boom (bad.py:2)"),
                         ("syn.py:build", "loading syn.py failed: SyntaxError")):
        before = snapshot(ws)
        proc = run_cli(*common, "--model", spec, "-o", "d.npz", cwd=ws)
        assert_user_error(proc, ws, before)
        assert expect in proc.stderr, proc.stderr
