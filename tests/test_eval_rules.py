"""``eval`` never gives silently wrong numbers: which preprocessing each model gets (and says so), the
input layout read from the model, --target checks, and the --fail-* CI thresholds (exit 3).

Everything runs through the real console script on copies of the demo's backdoored MNIST model
(``model.onnx``, unpatched) and its repaired version (``model.fire.onnx``, which records the
preprocessing it was fitted with: scale 1/255, mean 0.5, std 0.5, NCHW, and the attack: badnets, target 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from conftest import run_cli, set_fire_metadata
from test_cli import assert_user_error, snapshot, ws  # noqa: F401  (ws is a fixture)

from fire_onnx.data import infer_layout

RECORDED = {"scale": 1 / 255, "mean": [0.5], "std": [0.5], "layout": "NCHW"}
ALL_RECORDED = dict.fromkeys(RECORDED, "recorded")


def run_eval(ws: Path, *args, code: int = 0):
    """``eval ... --data mnist.npz --json -``: (stdout JSON, stderr lines)."""
    proc = run_cli("eval", *args, "--data", "mnist.npz", "--json", "-", cwd=ws)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout), [ln for ln in proc.stderr.splitlines() if ln.strip()]


def with_meta(ws: Path, name: str, src: str = "model.fire.onnx", **props) -> str:
    """A copy of ``src`` whose metadata keys (fire_onnx.<key>) are set to the given strings (None: removed)."""
    m = onnx.load(str(ws / src))
    set_fire_metadata(m, **props)
    onnx.save(m, str(ws / name))
    return name


def pre_json(**changes) -> str:
    return json.dumps({**RECORDED, **changes})


# ---------------------------------------------------------------------------- preprocessing rules
def test_argument_order_does_not_change_the_numbers(ws, demo_run):
    _, report = demo_run
    trig = ("--trigger", "badnets", "--target", "0")
    a, notes_a = run_eval(ws, "model.onnx", "model.fire.onnx", *trig)
    b, notes_b = run_eval(ws, "model.fire.onnx", "model.onnx", *trig)
    assert a["models"] == b["models"]
    orig = a["models"]["model.onnx"]
    assert orig["preprocess"]["values"] == RECORDED
    assert orig["preprocess"]["from"] == "shared from model.fire.onnx"
    assert a["models"]["model.fire.onnx"]["preprocess"]["fields"] == ALL_RECORDED
    assert a["preprocess"] == RECORDED  # one preprocessing for all models: also at the top level
    # the demo evaluated the same model with the preprocessing it was trained with
    assert orig["ca"] == report["original"]["ca"] and orig["asr"] == report["original"]["asr"]
    # the ASR floor: clean non-target images the model itself sends to the target (small for a 96 % model);
    # the repaired model's ASR cannot be far below its own floor
    fixed = a["models"]["model.fire.onnx"]
    assert 0 <= orig["asr_floor"] < 0.05 and 0 <= fixed["asr_floor"] < 0.05
    assert fixed["asr"] >= fixed["asr_floor"] - 0.02
    for notes in (notes_a, notes_b):
        assert len(notes) == 1 and notes[0].startswith("note: model.onnx records no preprocessing")
        assert "model.fire.onnx" in notes[0] and "mean=0.5" in notes[0]
    # alone, the unpatched model gets the defaults: other numbers, and a note saying exactly what was used
    # and, since the model does clearly better on -1..1 inputs, a warning naming them
    alone, notes = run_eval(ws, "model.onnx")
    assert notes[0] == (
        "note: model.onnx: no preprocessing recorded or given for scale, mean, std; using scale=1/255 mean=0 std=1 "
        "layout=NCHW (layout from the model's input shape); set --scale, --mean, --std to change it")
    assert len(notes) == 2 and notes[1].startswith("warning: model.onnx: with the preprocessing given")
    assert "--mean 0.5 --std 0.5 (-1..1)" in notes[1]
    res = alone["models"]["model.onnx"]
    assert res["preprocess"]["fields"] == {"scale": "default", "mean": "default", "std": "default",
                                           "layout": "model input shape"}
    assert res["preprocess"]["values"] == {"scale": 1 / 255, "mean": [0.0], "std": [1.0], "layout": "NCHW"}
    assert res["ca"] != orig["ca"]
    assert res["asr_floor"] is None  # no target given


def test_command_line_overrides_each_given_field_for_every_model(ws, demo_run):
    _, report = demo_run
    res, notes = run_eval(ws, "model.fire.onnx", "model.onnx", "--mean", "0.4", "--limit", "200")
    fire, orig = res["models"]["model.fire.onnx"]["preprocess"], res["models"]["model.onnx"]["preprocess"]
    assert fire["values"] == orig["values"] == {**RECORDED, "mean": [0.4]}
    assert fire["fields"] == {**ALL_RECORDED, "mean": "command line"}
    assert fire["from"] == "recorded (mean: command line)"
    assert orig["fields"] == {**dict.fromkeys(RECORDED, "shared from model.fire.onnx"), "mean": "command line"}
    assert len(notes) == 1 and notes[0].startswith("note: model.onnx records no preprocessing")
    # every field given: the command line alone decides, no note, the demo's numbers
    full = ("--scale", repr(1 / 255), "--mean", "0.5", "--std", "0.5", "--input-layout", "NCHW")
    res, notes = run_eval(ws, "model.onnx", *full)
    assert notes == []
    assert res["models"]["model.onnx"]["preprocess"]["from"] == "command line"
    assert res["models"]["model.onnx"]["ca"] == report["original"]["ca"]


def test_disagreeing_records_with_an_unrecorded_model_need_explicit_options(ws):
    other = with_meta(ws, "other.fire.onnx", preprocess=pre_json(mean=[0.4]))
    before = snapshot(ws)
    proc = run_cli("eval", "model.onnx", "model.fire.onnx", other, "--data", "mnist.npz", "--json", "e.json", cwd=ws)
    assert_user_error(proc, ws, before, "model.onnx records no preprocessing", "disagree on mean", "pass --mean")
    # settling the field that differs is enough; the agreeing ones are shared
    res, _ = run_eval(ws, "model.onnx", "model.fire.onnx", other, "--mean", "0.5", "--limit", "200")
    assert res["models"]["model.onnx"]["preprocess"]["fields"] == {
        **dict.fromkeys(RECORDED, "shared from model.fire.onnx"), "mean": "command line"}
    # patched models alone keep their own records; no single preprocessing at the top level then
    res, notes = run_eval(ws, "model.fire.onnx", other, "--limit", "200")
    assert notes == [] and res["preprocess"] is None
    assert res["models"][other]["preprocess"]["values"]["mean"] == [0.4]
    assert res["models"]["model.fire.onnx"]["preprocess"]["values"]["mean"] == [0.5]


def test_records_disagreeing_on_layout_only_are_settled_by_the_models_input_shape(ws):
    """An unrecorded model beside patched ones that record NCHW and NHWC: its own input shape says which
    layout it takes, so eval does not ask for --input-layout."""
    other = with_meta(ws, "nhwc.fire.onnx", preprocess=pre_json(layout="NHWC"))
    res, _ = run_eval(ws, "model.onnx", "model.fire.onnx", other, "--limit", "100")
    fields = res["models"]["model.onnx"]["preprocess"]["fields"]
    assert fields["layout"] == "model input shape" and fields["mean"] == "shared from model.fire.onnx"
    assert res["models"]["model.onnx"]["preprocess"]["values"]["layout"] == "NCHW"


@pytest.mark.parametrize("value,why", [
    ('{"scale": 0.0039, "mean": [0.5', "not valid JSON"),
    ('[1, 2]', "not a JSON object"),
    (pre_json(mean="0.5"), "mean"),
    (pre_json(scale="1/255"), "scale"),
    (pre_json(std=[0.5, True]), "std"),
    (pre_json(layout="HWC"), "layout"),
    (json.dumps({"scale": 1 / 255, "mean": [0.5], "std": [0.5]}), "lacks layout"),
    (pre_json(std=[float("nan")]), "non-finite"),
    (pre_json(std=[0.0]), "zero std"),
], ids=["json", "list", "mean-str", "scale-str", "std-bool", "layout", "missing", "nan", "zero-std"])
def test_corrupt_recorded_preprocessing_is_an_error_naming_the_model(ws, value, why):
    bad = with_meta(ws, "bad.fire.onnx", preprocess=value)
    before = snapshot(ws)
    proc = run_cli("eval", "model.fire.onnx", bad, "--data", "mnist.npz", "--json", "e.json", cwd=ws)
    assert_user_error(proc, ws, before, "bad.fire.onnx", "fire_onnx.preprocess", why)


def test_corrupt_record_is_ignored_only_when_every_field_is_given(ws):
    bad = with_meta(ws, "bad.fire.onnx", preprocess="{nope")
    before = snapshot(ws)
    proc = run_cli("eval", bad, "--data", "mnist.npz", "--mean", "0.5", "--std", "0.5", "--json", "e.json", cwd=ws)
    assert_user_error(proc, ws, before, "bad.fire.onnx", "--input-layout")
    res, _ = run_eval(ws, bad, "--scale", repr(1 / 255), "--mean", "0.5", "--std", "0.5", "--input-layout", "NCHW",
                      "--limit", "100")
    assert res["models"][bad]["preprocess"]["from"] == "command line"


# ---------------------------------------------------------------------------- input layout
@pytest.mark.parametrize("dims,image,expect", [
    ([None, 1, 28, 28], (28, 28, 1), "NCHW"),
    (["batch", 28, 28, 1], (28, 28, 1), "NHWC"),
    ([None, 3, None, None], (32, 32, 3), "NCHW"),
    ([None, None, None, 3], (32, 32, 3), "NHWC"),
    ([None, None, None, None], (28, 28, 1), None),  # everything dynamic: both fit
    ([1, 3, 3, 3], (3, 3, 3), None),  # both fit
    ([None, 1, 32, 32], (28, 28, 1), None),  # neither fits
    ([None, 784], (28, 28, 1), None),
    (None, (28, 28, 1), None),
])
def test_infer_layout(dims, image, expect):
    assert infer_layout(dims, image) == expect


def _export_nhwc(ws: Path) -> str:
    """The demo's trained CNN behind a permute: an ONNX model whose input is (N, 28, 28, 1)."""
    import torch

    from fire_onnx.fit import load_model

    cnn = load_model("fire_onnx_models.small_cnn:build_mnist", str(ws / "model.pt"))

    class NHWC(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = cnn

        def forward(self, x):
            return self.cnn(x.permute(0, 3, 1, 2))

    torch.onnx.export(NHWC().eval(), (torch.zeros(2, 28, 28, 1),), str(ws / "nhwc.onnx"), dynamo=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return "nhwc.onnx"


def test_layout_follows_the_model_input_shape(ws, demo_run):
    _, report = demo_run
    nhwc = _export_nhwc(ws)
    res, notes = run_eval(ws, "model.onnx", nhwc, "--mean", "0.5", "--std", "0.5")
    a, b = res["models"]["model.onnx"], res["models"][nhwc]
    assert a["preprocess"]["values"]["layout"] == "NCHW" and b["preprocess"]["values"]["layout"] == "NHWC"
    assert a["preprocess"]["fields"]["layout"] == b["preprocess"]["fields"]["layout"] == "model input shape"
    assert a["ca"] == b["ca"] == report["original"]["ca"]  # same network, each fed in its own layout
    assert len(notes) == 2 and all("scale=1/255" in n and "--scale" in n for n in notes)
    # the command line still wins (and the shape check says what is wrong)
    before = snapshot(ws)
    proc = run_cli("eval", nhwc, "--data", "mnist.npz", "--input-layout", "NCHW", "--json", "e.json", cwd=ws)
    assert_user_error(proc, ws, before, "expects shape", "--input-layout")


def test_recorded_layout_that_contradicts_the_input_shape_warns(ws, demo_run):
    _, report = demo_run
    wrong = with_meta(ws, "nhwc-recorded.fire.onnx", preprocess=pre_json(layout="NHWC"))
    res, notes = run_eval(ws, wrong, "--trigger", "badnets", "--target", "0")
    assert len(notes) == 1 and notes[0].startswith(f"warning: {wrong}: the recorded layout NHWC does not fit")
    assert res["models"][wrong]["preprocess"]["values"]["layout"] == "NCHW"
    assert res["models"][wrong]["ca"] == report["patched"]["ca"]


# ---------------------------------------------------------------------------- --target
def test_target_out_of_range_is_an_error_before_evaluating(ws):
    dynamic = "dyn.onnx"
    m = onnx.load(str(ws / "model.fire.onnx"))
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"  # class count only known by running
    onnx.save(m, str(ws / dynamic))
    before = snapshot(ws)
    for model in ("model.fire.onnx", dynamic):
        proc = run_cli("eval", "model.onnx", model, "--data", "mnist.npz", "--trigger", "badnets", "--target", "10",
                       "--json", "e.json", cwd=ws)
        assert_user_error(proc, ws, before, "--target 10 is out of range", "10 classes (0..9)")
    proc = run_cli("eval", "model.fire.onnx", "--data", "mnist.npz", "--trigger", "badnets", "--target", "-1",
                   "--json", "e.json", cwd=ws)
    assert_user_error(proc, ws, before, "--target", code=2)
    res, _ = run_eval(ws, dynamic, "--trigger", "badnets", "--target", "9", "--limit", "100")
    assert res["models"][dynamic]["n_triggered"] > 0


def test_patch_records_the_attack_and_eval_warns_on_a_different_one(ws):
    attack = {p.key: p.value for p in onnx.load(str(ws / "model.fire.onnx")).metadata_props}["fire_onnx.attack"]
    assert json.loads(attack) == {"target": 0, "trigger": {"kind": "badnets", "size": 3, "pos": "br", "value": 255,
                                                          "pattern": "solid", "margin": 1}}
    _, notes = run_eval(ws, "model.onnx", "model.fire.onnx", "--trigger", "badnets", "--target", "0")
    assert not [n for n in notes if n.startswith("warning:")]
    _, notes = run_eval(ws, "model.onnx", "model.fire.onnx", "--trigger", "badnets:size=4", "--target", "1",
                        "--limit", "200")
    warnings = [n for n in notes if n.startswith("warning:") and ("was repaired for" in n or "another trigger" in n)]
    assert len(warnings) == 2, notes  # only the patched model records an attack
    assert "model.fire.onnx was repaired for target 0, --target is 1" in warnings[0]
    assert "model.fire.onnx was fitted with another trigger" in warnings[1] and "size=4 given, 3 recorded" in warnings[1]
    # and the original model's triggered images go to class 0, not to the --target given: eval says where
    assert any(n.startswith("warning: model.onnx:") and "a backdoor to class 0, not 1" in n for n in notes), notes
    _, notes = run_eval(ws, "model.fire.onnx", "--trigger", "blended", "--target", "0", "--limit", "200")
    assert len(notes) == 1 and "blended given, badnets recorded" in notes[0]


# ---------------------------------------------------------------------------- --fail-* (CI)
def test_fail_thresholds_pass_with_exit_0(ws):
    res, notes = run_eval(ws, "model.onnx", "model.fire.onnx", "--trigger", "badnets", "--target", "0",
                          "--fail-asr", "0.02", "--fail-ca", "0.9", "--fail-ca-drop", "0.005")
    assert res["checks_passed"] is True
    # the patched model is checked, the unpatched one (ASR ~100 %) is the baseline
    assert {(c["model"], c["check"]) for c in res["checks"]} == {
        ("model.fire.onnx", "asr"), ("model.fire.onnx", "ca"), ("model.fire.onnx", "ca_drop")}
    assert [c["baseline"] for c in res["checks"] if c["check"] == "ca_drop"] == ["model.onnx"]
    assert len([n for n in notes if n.startswith("check ok: model.fire.onnx")]) == 3


def test_fail_thresholds_fail_with_exit_3_after_writing_the_results(ws):
    proc = run_cli("eval", "model.onnx", "model.fire.onnx", "--data", "mnist.npz", "--trigger", "badnets",
                   "--target", "0", "--fail-asr", "0.001", "--fail-ca", "0.999", "--json", "e.json", cwd=ws)
    assert proc.returncode == 3, proc.stderr
    assert "| model.fire.onnx |" in proc.stdout  # the table is still printed
    res = json.loads((ws / "e.json").read_text())
    assert res["checks_passed"] is False and len(res["checks"]) == 2
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("check FAILED: ")]
    assert len(failed) == 2
    assert "model.fire.onnx: ASR" in failed[0] and "(--fail-asr 0.001)" in failed[0]
    assert "model.fire.onnx: CA" in failed[1] and "< 99.90%" in failed[1]
    # with no patched model given, every model is checked: the backdoored one fails the ASR gate
    proc = run_cli("eval", "model.onnx", "--data", "mnist.npz", "--trigger", "badnets", "--target", "0",
                   "--fail-asr", "0.5", "--limit", "200", cwd=ws)
    assert proc.returncode == 3 and "check FAILED: model.onnx: ASR" in proc.stderr


def test_a_target_the_trigger_does_not_reach_fails_fail_asr(ws):
    """Flagged images (no labels) that the original model sends to class 0, evaluated with --target 1: ASR 0 % on both
    models read "check ok" with exit 0 (a user gave the wrong target: B_flagged.npz went 100 % to class 3, --target
    0). Now eval warns, naming the class the images go to, and --fail-asr fails an asr_target check (exit 3). With
    labelled triggered images the same; with the right target nothing changes."""
    import numpy as np

    from fire_onnx import triggers
    from fire_onnx.data import load_images

    test = load_images(ws / "mnist.npz", "test")
    x = test.x[(test.y != 0) & (test.y != 1)][:300]  # of neither class: with no labels, ASR counts every image
    np.savez(ws / "flagged.npz", x=triggers.parse("badnets").apply(x))  # no labels, as flagged inputs come
    res, notes = run_eval(ws, "model.onnx", "model.fire.onnx", "--triggered", "flagged.npz", "--target", "1",
                          "--fail-asr", "0.05", code=3)
    orig = res["models"]["model.onnx"]
    assert orig["asr"] < 0.05 and orig["top_other"]["class"] == 0 and orig["top_other"]["share"] > 0.9, orig
    warned = [n for n in notes if n.startswith("warning: model.onnx: ") and "reach --target 1 on the original model"
              in n]
    assert len(warned) == 1 and "go to class 0: is the target 0?" in warned[0], notes
    assert not [n for n in notes if n.startswith("warning: model.fire.onnx: ") and "is the target" in n]
    assert res["checks_passed"] is False
    wrong = [c for c in res["checks"] if c["check"] == "asr_target"]
    assert [(c["model"], c["original"], c["to_class"], c["passed"]) for c in wrong] == [
        ("model.fire.onnx", "model.onnx", 0, False)]
    failed = [n for n in notes if n.startswith("check FAILED: model.fire.onnx: ")]
    assert len(failed) == 1 and "is measured against --target 1, a class the trigger does not reach" in failed[0]
    assert any(n.startswith("check ok: model.fire.onnx: ASR 0.00% <= 5.00%") for n in notes), notes  # alone before
    assert "on the original model model.onnx" in failed[0] and "(is the target 0?)" in failed[0], failed
    # labelled triggered images (--trigger), the original model checked on its own: it fails the same way
    res, notes = run_eval(ws, "model.onnx", "--trigger", "badnets", "--target", "1", "--fail-asr", "0.05",
                          "--limit", "300", code=3)
    assert [c["check"] for c in res["checks"] if not c["passed"]] == ["asr_target"]
    assert any("on this model" in n for n in notes if n.startswith("check FAILED: model.onnx: ASR")), notes
    # the right target: no warning, no asr_target check, exit 0
    res, notes = run_eval(ws, "model.onnx", "model.fire.onnx", "--triggered", "flagged.npz", "--target", "0",
                          "--fail-asr", "0.05")
    assert res["checks_passed"] and not [c for c in res["checks"] if c["check"] == "asr_target"]
    assert not [n for n in notes if "is the target" in n], notes


def test_the_patched_model_alone_with_another_target_fails_fail_asr(ws):
    """The repaired model alone, checked with a --target it was not repaired for: 0.7 % ASR against class 3 on a
    class-0 repair read "check ok" with exit 0 beside a warning. With --fail-asr it now fails (exit 3), naming the
    class the model was repaired for; with that class it passes."""
    res, notes = run_eval(ws, "model.fire.onnx", "--trigger", "badnets", "--target", "3", "--fail-asr", "0.05",
                          "--limit", "300", code=3)
    assert res["models"]["model.fire.onnx"]["asr"] <= 0.05  # the number alone would pass
    failed = [c for c in res["checks"] if not c["passed"]]
    assert [(c["check"], c["target"], c["repaired_for"]) for c in failed] == [("asr_repaired_for", 3, [0])]
    lines = [n for n in notes if n.startswith("check FAILED: model.fire.onnx: ")]
    assert len(lines) == 1 and "repaired for class 0" in lines[0] and "give --target 0" in lines[0], notes
    assert any("was repaired for target 0, --target is 3" in n for n in notes), notes
    res, _ = run_eval(ws, "model.fire.onnx", "--trigger", "badnets", "--target", "0", "--fail-asr", "0.05",
                      "--limit", "300")
    assert res["checks_passed"] and [c["check"] for c in res["checks"]] == ["asr"]


def test_wrong_target_reads_the_original_model_only():
    """The rule itself: under half of the triggered images at the target and at least half at one other class, on the
    unpatched model; a patched model showing the same (a good repair of flagged images of one source class) is not
    read, and without an unpatched model nothing is said."""
    from fire_onnx.evaluate import ModelInfo, repair_left, threshold_checks, wrong_target

    orig = {"asr": 0.0, "target": 0, "top_other": {"class": 3, "share": 1.0}, "ca": 0.9}
    fixed = {"asr": 0.0, "target": 0, "top_other": {"class": 5, "share": 0.8}, "ca": 0.9}
    assert wrong_target(orig) == {"target": 0, "target_share": 0.0, "to_class": 3, "to_share": 1.0}
    assert wrong_target(dict(orig, asr=0.6, top_other={"class": 3, "share": 0.4})) is None  # the target is reached
    assert wrong_target(dict(orig, top_other={"class": 3, "share": 0.3})) is None  # no single class gets most
    assert wrong_target({"asr": 0.0, "ca": 0.9}) is None  # results without the record (older JSON)
    infos = [ModelInfo(path="m.onnx"), ModelInfo(path="m.fire.onnx", patched=True)]
    results = {"m.onnx": orig, "m.fire.onnx": fixed}
    lines = repair_left(results, infos)
    assert lines == ["warning: m.onnx: 0% of the triggered images reach --target 0 on the original model; 100% go to "
                     "class 3: is the target 3? ASR against class 0 measures a class the trigger does not reach, "
                     "before or after a repair (--fail-asr fails while this holds)"]
    checks = threshold_checks(results, infos, fail_asr=0.05)
    assert [(c["check"], c["passed"]) for c in checks] == [("asr", True), ("asr_target", False)]
    assert threshold_checks(results, infos, fail_ca=0.5)[0]["check"] == "ca"  # only with --fail-asr
    results["m.onnx"] = dict(orig, asr=0.98, top_other={"class": 3, "share": 0.02})
    assert all(c["passed"] for c in threshold_checks(results, infos, fail_asr=0.05))
    only_patched = [ModelInfo(path="m.fire.onnx", patched=True)]
    assert all(c["passed"] for c in threshold_checks({"m.fire.onnx": fixed}, only_patched, fail_asr=0.05))
    assert repair_left({"m.fire.onnx": fixed}, only_patched) == []


@pytest.mark.parametrize("argv,expect,code", [
    (["model.fire.onnx", "--fail-asr", "0.02"], ["--fail-asr needs triggered images"], 1),
    (["model.fire.onnx", "--fail-ca-drop", "0.005"], ["one unpatched baseline", "none"], 1),
    (["model.onnx", "--fail-ca-drop", "0.005"], ["one unpatched baseline"], 1),
    (["model.fire.onnx", "--fail-ca", "95"], ["--fail-ca"], 2),
], ids=["asr-without-trigger", "drop-without-baseline", "drop-without-patched", "ca-not-a-fraction"])
def test_fail_options_that_cannot_be_checked_are_errors(ws, argv, expect, code):
    before = snapshot(ws)
    proc = run_cli("eval", *argv, "--data", "mnist.npz", "--json", "e.json", cwd=ws)
    assert_user_error(proc, ws, before, *expect, code=code)


def test_help_documents_every_option_and_exit_code_3():
    proc = run_cli("eval", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "3 a --fail-* check failed" in text
    from fire_onnx.cli import cli

    missing = [p.name for p in cli.commands["eval"].params if p.param_type_name == "option" and not p.help]
    assert missing == []


def test_a_model_fitted_from_triggered_images_gets_a_note_that_the_trigger_is_not_checked():
    """A CI check with --trigger passed against a repair fitted from the user's own trigger file (new-user run 9):
    the model records no trigger spec, so eval says it cannot compare; a recorded spec that matches says nothing."""
    from fire_onnx import triggers
    from fire_onnx.evaluate import ModelInfo, attack_warnings

    given = triggers.describe(triggers.parse("badnets"))
    from_file = ModelInfo(path="m.fire.onnx", patched=True, attack={"target": 7, "trigger": None})
    lines = attack_warnings([from_file], 7, given)
    assert len(lines) == 1 and lines[0].startswith("note: m.fire.onnx records no trigger spec"), lines
    same = ModelInfo(path="s.fire.onnx", patched=True, attack={"target": 7, "trigger": given})
    assert attack_warnings([same], 7, given) == []
    assert attack_warnings([ModelInfo(path="orig.onnx")], 7, given) == []  # an unpatched model records nothing


def test_small_source_classes_are_judged_together():
    """A backdoor that works from a few small classes only (new-user run 20: six GTSRB classes of 10 test images,
    one at 10 of 10, 5.5 % pooled) fails --fail-asr through its worst class; classes under MIN_CLASS are judged at
    95 % over all of them (Bonferroni), so scatter across many small classes does not."""
    from fire_onnx.evaluate import ModelInfo, threshold_checks, worst_class

    by_class = {str(c): {"n": 10, "asr": 0.0, "floor": 0.0} for c in range(40)}
    by_class["37"] = {"n": 10, "asr": 1.0, "floor": 0.0}
    by_class["5"] = {"n": 300, "asr": 0.02, "floor": 0.0}
    c, rec, bound = worst_class(by_class)
    assert c == "37" and 0.4 < bound < 0.75  # 10 of 10 at 1 - 0.05/41
    results = {"m.fire.onnx": {"asr": 0.055, "ca": 0.8, "ra": 0.78, "by_class": by_class}}
    checks = threshold_checks(results, [ModelInfo(path="m.fire.onnx", patched=True)], fail_asr=0.06)
    assert [ch["check"] for ch in checks if not ch["passed"]] == ["asr_class"]
    # one image of ten at the target in each small class: nothing to fail on
    scattered = {str(c): {"n": 10, "asr": 0.1, "floor": 0.0} for c in range(40)}
    assert worst_class(scattered)[2] < 0.02
    results["m.fire.onnx"]["by_class"] = scattered
    checks = threshold_checks(results, [ModelInfo(path="m.fire.onnx", patched=True)], fail_asr=0.06)
    assert all(ch["passed"] for ch in checks if ch["check"] == "asr_class") and not [
        ch for ch in checks if ch["check"] == "asr_class"]


def test_a_class_losing_its_clean_accuracy_fails_the_ca_drop_check():
    """A repair fitted without the target class's clean images took that class from 84.9 % to 71.4 % (119 images)
    while the pooled CA moved 0.6 pt and --fail-ca-drop 0.01 passed (new-user run 20): the drop is checked per class
    too, and eval warns; a repair that costs every class a little passes."""
    from fire_onnx.evaluate import ModelInfo, class_drop_warnings, threshold_checks

    base = {str(c): {"n": 50, "ca": 0.8} for c in range(42)}
    base["2"] = {"n": 119, "ca": 0.849}
    hurt = dict(base, **{"2": {"n": 119, "ca": 0.714}})
    infos = [ModelInfo(path="m.onnx"), ModelInfo(path="m.fire.onnx", patched=True)]
    results = {"m.onnx": {"ca": 0.784, "ca_by_class": base}, "m.fire.onnx": {"ca": 0.778, "ca_by_class": hurt}}
    checks = threshold_checks(results, infos, fail_ca_drop=0.01)
    failed = [ch for ch in checks if not ch["passed"]]
    assert [ch["check"] for ch in failed] == ["ca_drop_class"] and failed[0]["clean_class"] == "2"
    assert any("class 2 loses 13.5% of clean accuracy" in w for w in class_drop_warnings(results, infos))
    even = {c: {"n": r["n"], "ca": r["ca"] - 0.01} for c, r in base.items()}
    results["m.fire.onnx"] = {"ca": 0.774, "ca_by_class": even}
    assert all(ch["passed"] for ch in threshold_checks(results, infos, fail_ca_drop=0.02))
    assert class_drop_warnings(results, infos) == []
