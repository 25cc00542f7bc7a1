"""A new user's own models through fit / eval: a classifier ending in Softmax, a single-score
(sigmoid) model, a model with two outputs, and clean images given as flagged inputs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, run_cli

torch = pytest.importorskip("torch")
nn = torch.nn

DIGITS = REPO.parent / "shared" / "data" / "sklearn_digits.npz"


class Mlp(nn.Module):
    """A small MLP on (N, 8, 8, 1) uint8-scale digits in 0..1 (NHWC, no mean/std)."""

    def __init__(self, head: str = "logits"):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)
        self.head = head

    def forward(self, x):
        h = self.act(self.fc1(x.reshape(x.shape[0], -1)))
        z = self.fc2(h)
        if self.head == "softmax":
            return torch.softmax(z, dim=1)
        if self.head == "sigmoid":  # one score per input
            return torch.sigmoid(z[:, :1])
        if self.head == "features-first":
            return h, torch.softmax(z, dim=1)
        if self.head == "scores-second":  # ten feature columns first: within the labels' range
            return h[:, :10], z
        return z


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """sklearn digits, 8x8x1 (the shared data folder beside the repository)."""
    if not DIGITS.is_file():
        pytest.skip(f"{DIGITS} not available")
    d = np.load(DIGITS, allow_pickle=False)
    return d["x_train"], d["y_train"], d["x_test"], d["y_test"]


@pytest.fixture(scope="module")
def trained(digits):
    """A real classifier trained for a few hundred Adam steps (about a second) on the digits."""
    x, y = digits[0], digits[1]
    torch.manual_seed(0)
    m = Mlp()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x.astype(np.float32) / 255), torch.from_numpy(y)
    for _ in range(150):
        loss = nn.functional.cross_entropy(m(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _export(model, path, outputs):
    torch.onnx.export(model, torch.zeros(1, 8, 8, 1), str(path), input_names=["image"], output_names=outputs,
                      dynamic_axes={"image": {0: "n"}, **{o: {0: "n"} for o in outputs}}, opset_version=17,
                      dynamo=False)
    return path


def _variant(trained, head):
    m = Mlp(head)
    m.load_state_dict(trained.state_dict())
    return m.eval()


def test_trigger_free_search_reads_softmax_outputs_as_probabilities(trained, digits):
    """A model ending in Softmax: the search's model gives log-probabilities, so the search sees the same
    losses as on the logits model (taken as logits, probabilities gave log(10) for every class)."""
    from fire_onnx import invert
    from fire_onnx.data import Preprocess

    pre = Preprocess(scale=1 / 255, mean=[0.0], std=[1.0], layout="NHWC")
    plain, soft = invert.Model(trained, pre), invert.Model(_variant(trained, "softmax"), pre)
    x = digits[2][:64]
    z = torch.from_numpy(plain.logits(x))
    assert np.allclose(soft.logits(x), torch.log_softmax(z, 1).numpy(), atol=1e-4)
    assert soft.probabilities is True and plain.probabilities is False
    a = invert.search_class(plain, x, 3, "blend", steps=5, restarts=1)
    b = invert.search_class(soft, x, 3, "blend", steps=5, restarts=1)
    assert a.loss == pytest.approx(b.loss, rel=1e-3) and a.rate == b.rate
    assert abs(b.loss - np.log(10)) > 0.5  # probabilities taken as logits: log(10) whatever the change


def test_eval_refuses_a_single_score_model(trained, digits, tmp_path):
    """(N, 1) sigmoid output: argmax is always 0, eval printed 100 % ASR and ASR floor as if it measured
    something. Now one error line, exit 1."""
    onnx_path = _export(_variant(trained, "sigmoid"), tmp_path / "bin.onnx", ["p"])
    proc = run_cli("eval", onnx_path, "--data", DIGITS, "--trigger", "badnets:size=2", "--target", "0")
    assert proc.returncode == 1, proc.stdout
    assert "one score per input" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # --target 1 (the positive class of a binary model) read "out of range: 1 classes (0..0)" (new-user run 21)
    proc = run_cli("eval", onnx_path, "--data", DIGITS, "--trigger", "badnets:size=2", "--target", "1")
    assert proc.returncode == 1 and "one score per input" in proc.stderr and "[-z, z]" in proc.stderr, proc.stderr


def test_fit_refuses_unchecked_flagged_repair_of_a_single_score_model(trained, digits, tmp_path):
    """(N, 1) output and flagged images: neither the trigger reconstruction nor the held-out check can run, and
    the unpaired repair was written with exit 0 (new-user run 21: a single-logit model, 100 % -> 61 % ASR). Now it
    is refused (one line naming the two-score export, nothing written) unless --force; --trigger still fits."""
    from fire_onnx import triggers

    onnx_path = _export(_variant(trained, "sigmoid"), tmp_path / "bin.onnx", ["p"])
    x_test = digits[2]
    np.savez(tmp_path / "flagged.npz", x=triggers.parse("badnets:size=2").apply(x_test[:20]))
    out = tmp_path / "d.npz"
    args = ["fit", "--onnx", onnx_path, "--layer", "/act/Relu_output_0", "--clean", DIGITS, "--triggered",
            tmp_path / "flagged.npz", "--scale", str(1 / 255), "-o", out]
    proc = run_cli(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "cannot be checked" in err and "[-z, z]" in err and not out.exists()
    proc = run_cli(*args, "--force")
    assert proc.returncode == 0 and out.exists(), proc.stderr
    proc = run_cli("fit", "--onnx", onnx_path, "--layer", "/act/Relu_output_0", "--clean", DIGITS, "--trigger",
                   "badnets:size=2", "--target", "0", "--scale", str(1 / 255), "-o", tmp_path / "t.npz")
    assert proc.returncode == 0, proc.stderr


def test_labels_under_another_numbering_are_named_as_such(trained, digits, tmp_path):
    """Labels shifted by one class (the model is right, the file's numbering is not): fit and eval used to blame the
    preprocessing (new-user run 21: inverted binary labels, 3 % right, "pass the preprocessing the model was trained
    with"). Now fit refuses naming the renumbering and eval warns so; 1-based labels are named as such."""
    from fire_onnx.preprocess_check import renumbered

    onnx_path = _export(trained, tmp_path / "mlp.onnx", ["logits"])
    x, y = digits[2], digits[3]
    np.savez(tmp_path / "shifted.npz", x_train=x, y_train=(y + 1) % 10, x_test=x, y_test=(y + 1) % 10)
    proc = run_cli("fit", "--onnx", onnx_path, "--layer", "/act/Relu_output_0", "--clean", tmp_path / "shifted.npz",
                   "--trigger", "badnets:size=2", "--target", "0", "--scale", str(1 / 255), "-o", tmp_path / "d.npz")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "another class numbering" in proc.stderr and "1 -> 0" in proc.stderr and "--scale" not in proc.stderr
    proc = run_cli("eval", onnx_path, "--data", tmp_path / "shifted.npz", "--scale", str(1 / 255))
    assert proc.returncode == 0 and "another class numbering" in proc.stderr, proc.stderr
    np.savez(tmp_path / "one_based.npz", x_test=x, y_test=y + 1)
    proc = run_cli("eval", onnx_path, "--data", tmp_path / "one_based.npz", "--scale", str(1 / 255))
    assert proc.returncode == 1 and "numbered from 1?" in proc.stderr, proc.stderr
    pred = np.array([1, 1, 1, 0, 0, 0, 1])
    assert renumbered(pred, np.array([0, 0, 0, 1, 1, 1, 0]), 2)["mapping"] == {0: 1, 1: 0}
    assert renumbered(pred, 1 - np.array([0, 0, 0, 1, 1, 1, 0]), 2) is None  # right as they are
    assert renumbered(np.zeros(7, int), np.array([0, 0, 0, 1, 1, 1, 0]), 2) is None  # one class: no renumbering


def test_eval_names_the_output_it_scores(trained, tmp_path):
    """(features, probabilities): eval scores the first output. It used to say so in a note and print CA
    of the features' argmax (15 %); predictions mostly beyond the labels' range now stop it, naming the
    outputs (new-user run 5: 0 % CA and 0.7 % ASR read off a 64-wide activation)."""
    onnx_path = _export(_variant(trained, "features-first"), tmp_path / "two.onnx", ["feat", "probs"])
    proc = run_cli("eval", onnx_path, "--data", DIGITS)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "beyond the labels' range 0..9" in proc.stderr and "2 outputs (feat, probs)" in proc.stderr


def test_eval_names_the_output_that_holds_the_class_scores(trained, tmp_path):
    """(features[:, :10], logits): the first output is within the labels' range, so eval used to print 7.8 % CA
    with exit 0 and a note only (new-user run 18). The output that classifies the images is named, and --fail-*
    checks fail on a model read this way."""
    onnx_path = _export(_variant(trained, "scores-second"), tmp_path / "rev.onnx", ["feat", "logits"])
    proc = run_cli("eval", onnx_path, "--data", DIGITS, "--fail-ca", "0.5")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert "its output 'logits' classifies" in proc.stderr and "export them as the model's first output" in proc.stderr
    assert "the images are read wrongly" in proc.stderr


def test_fit_warns_when_flagged_images_are_spread_over_classes(trained, digits, tmp_path):
    """Clean images passed as --triggered (no --target): nothing confirmed, but the fit must say the images
    do not agree on a class; a real flagged set (all stamped, one class) gets no such warning."""
    onnx_path = _export(trained, tmp_path / "mlp.onnx", ["logits"])
    x_test, y_test = digits[2], digits[3]
    np.savez(tmp_path / "clean_flagged.npz", x=x_test[:20])
    proc = run_cli("fit", "--onnx", onnx_path, "--layer", "act", "--clean", DIGITS, "--triggered",
                   tmp_path / "clean_flagged.npz", "--reconstruct", "off", "-o", tmp_path / "d.npz", check=True)
    assert "do not agree on a class" in proc.stderr
    same = x_test[y_test == 4][:20]
    np.savez(tmp_path / "one_class.npz", x=same)
    proc = run_cli("fit", "--onnx", onnx_path, "--layer", "act", "--clean", DIGITS, "--triggered",
                   tmp_path / "one_class.npz", "--reconstruct", "off", "-o", tmp_path / "d2.npz")
    assert "do not agree on a class" not in proc.stderr
    # clean images of one class agree on it, yet removing "their trigger" removes the class: the held-out
    # check refuses to write that repair (fire_onnx.fit.verify), and --force writes it anyway
    assert proc.returncode == 1 and "not written: the repair changes the predicted class of" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "d2.npz").exists()
    proc = run_cli("fit", "--onnx", onnx_path, "--layer", "act", "--clean", DIGITS, "--triggered",
                   tmp_path / "one_class.npz", "--reconstruct", "off", "-o", tmp_path / "d2.npz", "--force", check=True)
    assert (tmp_path / "d2.npz").exists() and "written with --force although" in proc.stderr


def test_reach_warning_does_not_contradict_itself():
    """Few triggered images reach the target, yet the target is still their most common class: the warning
    no longer says '(most go to class 3)' about target 3."""
    from fire_onnx.fit.core import model_checks

    trig = np.zeros((10, 4), np.float32)
    trig[np.arange(10), [3, 3, 3, 3, 0, 0, 1, 1, 2, 2]] = 1  # 40 % reach the target 3, still the top class
    w = model_checks(None, None, trig, 3, 10)["warnings"]
    assert any("only" in s for s in w) and not any("most go to class 3" in s for s in w)


def test_a_flagged_file_that_mixes_in_other_images_is_warned():
    """Flagged inputs were caught going to the attack's target: 14 of 20 at one class (6 clean images of another
    mixed in) is a mixed file; with or without --target it is said, for flagged files only (new-user run 11: no
    warning, the repair left 13.5 % ASR). 17 of 20 and stamped images (--trigger) are not warned."""
    from fire_onnx.fit.core import model_checks

    def logits(n_top, others=(3,)):
        z = np.zeros((20, 5), np.float32)
        rest = [others[i % len(others)] for i in range(20 - n_top)]
        z[np.arange(20), [0] * n_top + rest] = 1
        return z

    for target in (0, None):
        # the 6 others spread over four classes: a mixed file
        w = model_checks(None, None, logits(14, (1, 2, 3, 4)), target, 20, flagged=True)["warnings"]
        assert any("only 70% of the flagged images are classified as class 0" in s for s in w), w
        # the 6 others all at class 3: a second backdoor or untriggered class-3 images, named as such (run 13: 3 of
        # 20 from a second backdoor were fitted silently)
        w = model_checks(None, None, logits(14), target, 20, flagged=True)["warnings"]
        assert any("6 of the 20 flagged images go to class 3, not class 0 (14)" in s for s in w), w
        w = model_checks(None, None, logits(17), target, 20, flagged=True)["warnings"]
        assert any("3 of the 20 flagged images go to class 3" in s for s in w), w
        assert not [s for s in model_checks(None, None, logits(18, (1, 2)), target, 20, flagged=True)["warnings"]
                    if "flagged images" in s]  # two strays, at two classes
        assert not [s for s in model_checks(None, None, logits(14), target, 20)["warnings"] if "flagged images" in s]


def test_fit_names_a_flagged_file_in_another_layout(trained, digits, tmp_path):
    """Flagged images saved NCHW beside NHWC clean images: the error names the file, not the model's input
    layout (which is right for the clean images)."""
    onnx_path = _export(trained, tmp_path / "mlp.onnx", ["logits"])
    np.savez(tmp_path / "nchw.npz", x=digits[2][:20].transpose(0, 3, 1, 2))
    proc = run_cli("fit", "--onnx", onnx_path, "--layer", "act", "--clean", DIGITS, "--triggered",
                   tmp_path / "nchw.npz", "-o", tmp_path / "d.npz")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "nchw.npz: the images are [1, 8, 8], which looks like an NCHW array" in proc.stderr
    assert "transpose(0, 2, 3, 1)" in proc.stderr
    assert not (tmp_path / "d.npz").exists()


def test_unlabeled_all_clear_warns_about_a_model_that_misreads_its_inputs(trained, digits, tmp_path):
    """Mean/std given in pixel units (127.5, as for 0..255 inputs) with --unlabeled: the model puts the traffic in
    one class, no class has an outlying cluster, and 'no triggered inputs found' (exit 0) came with only a
    warning that the model misreads its inputs. Now the preprocessing check refuses before anything is searched,
    naming the preprocessing under which the model does classify its clean images; --force goes on, warning."""
    onnx_path = _export(trained, tmp_path / "mlp.onnx", ["logits"])
    np.savez(tmp_path / "traffic.npz", x=digits[2])
    args = ["fit", "--onnx", onnx_path, "--layer", "act", "--clean", DIGITS, "--unlabeled", tmp_path / "traffic.npz",
            "--mean", "127.5", "--std", "127.5", "-o", tmp_path / "d.npz"]
    proc = run_cli(*args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("fire-onnx: error: not fitted: with the preprocessing given (scale=1/255 mean=127.5")
    assert not (tmp_path / "d.npz").exists()
    forced = run_cli(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "warning: fitted with --force although with the preprocessing given" in forced.stderr
    assert "--scale/--mean/--std/--input-layout" in forced.stderr


def test_eval_does_not_call_the_real_trigger_a_mismatch_for_a_trigger_free_repair():
    """A trigger-free repair records {"kind": "trigger-free", ...}; eval --trigger with the real trigger warned
    'fitted with another trigger than --trigger (badnets given, trigger-free recorded)'. A recorded attack
    spec that differs still warns."""
    from fire_onnx import triggers
    from fire_onnx.evaluate import ModelInfo, attack_warnings

    given = triggers.describe(triggers.parse("badnets"))
    free = ModelInfo("m.fire.onnx", patched=True,
                     attack={"target": 3, "trigger": {"kind": "trigger-free", "rounds": 1}})
    assert attack_warnings([free], 3, given) == []
    other = ModelInfo("b.fire.onnx", patched=True,
                      attack={"target": 3, "trigger": triggers.describe(triggers.parse("blended"))})
    assert len(attack_warnings([other], 3, given)) == 1


def test_eval_compares_a_pattern_file_by_content(tmp_path):
    """The same blend pattern under another file name is the same trigger; another pattern under the same
    name is not (the warning says the content differs)."""
    from fire_onnx import triggers
    from fire_onnx.evaluate import ModelInfo, attack_warnings

    pat = np.random.default_rng(0).integers(0, 256, (8, 8, 1)).astype(np.uint8)
    np.save(tmp_path / "p.npy", pat)
    np.save(tmp_path / "copy.npy", pat)
    rec = triggers.describe(triggers.parse(f"blended:pattern={tmp_path / 'p.npy'}"))
    info = ModelInfo("m.fire.onnx", patched=True, attack={"target": 0, "trigger": rec})
    assert attack_warnings([info], 0, triggers.describe(triggers.parse(f"blended:pattern={tmp_path / 'copy.npy'}"))) == []
    np.save(tmp_path / "p.npy", 255 - pat)  # the file fitted with, overwritten with another pattern
    (w,) = attack_warnings([info], 0, triggers.describe(triggers.parse(f"blended:pattern={tmp_path / 'p.npy'}")))
    assert "pattern: the file's content differs" in w
    (w,) = attack_warnings([info], 0, triggers.describe(triggers.parse("blended")))
    assert "pattern=(none) given" in w


def test_negative_labels_are_a_one_line_error(tmp_path):
    from fire_onnx.data import load_images
    from fire_onnx.errors import FireError

    np.savez(tmp_path / "neg.npz", x=np.zeros((3, 4, 4, 1), np.uint8), y=np.array([0, -1, 2]))
    with pytest.raises(FireError, match=r"labels must be class indices \(>= 0\); 1 are negative"):
        load_images(tmp_path / "neg.npz")


BN_NET = '''
import torch.nn as nn


class BnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):  # NHWC
        return self.fc(self.act(self.bn(self.conv(x.permute(0, 3, 1, 2)))).flatten(1))


def build():
    return BnNet()
'''


def test_patch_names_a_batchnorm_folded_into_the_fitted_conv(tmp_path):
    """fit --model without --onnx at a Conv module whose BatchNorm the exporter folded into it: patch refuses
    (fingerprint) and now says why, instead of only 'fitted on another model'."""
    import importlib.util

    (tmp_path / "bnnet.py").write_text(BN_NET)
    spec = importlib.util.spec_from_file_location("bnnet_trial", tmp_path / "bnnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net = mod.build()
    with torch.no_grad():  # running statistics far from (0, 1), so folding changes the Conv's output
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(2, 4)
    net.eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    _export(net, tmp_path / "bn.onnx", ["logits"])
    run_cli("fit", "--model", f"{tmp_path / 'bnnet.py'}:build", "--weights", tmp_path / "w.pt", "--layer", "conv",
            "--clean", DIGITS, "--trigger", "badnets:size=2", "--input-layout", "NHWC", "-o", tmp_path / "d.npz",
            "--force", check=True)  # an untrained net: its repair removes nothing, which fit refuses without --force
    proc = run_cli("patch", tmp_path / "bn.onnx", tmp_path / "d.npz", "-o", tmp_path / "p.onnx")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "folded a BatchNorm" in proc.stderr and "not the output of module 'conv'" in proc.stderr


def test_a_reconstruction_confirmed_on_a_clean_model_is_not_written(trained, digits, tmp_path):
    """Twenty clean images of one class given as flagged inputs to a clean model: a 45 % blend of the class's
    mean image sends other images there by content alone, so the reconstruction 'confirms' it; written, that
    repair cost 9 points of clean accuracy. The held-out check refuses it."""
    onnx_path = _export(trained, tmp_path / "mlp.onnx", ["logits"])
    x_test, y_test = digits[2], digits[3]
    np.savez(tmp_path / "class0.npz", x=x_test[y_test == 0][:20])
    proc = run_cli("fit", "--onnx", onnx_path, "--layer", "act", "--clean", DIGITS, "--triggered",
                   tmp_path / "class0.npz", "-o", tmp_path / "d.npz")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not written: the repair changes the predicted class of" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "d.npz").exists()


def test_held_out_check_skips_a_model_without_class_scores(digits, tmp_path):
    """A model whose first output is not (N, classes) scores (here an image-to-image net) still gets its
    repair; the held-out check says it was skipped instead of failing the fit."""

    class Ae(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.act, self.dec = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x):
            return self.dec(self.act(self.enc(x)))

    torch.manual_seed(0)
    path = tmp_path / "ae.onnx"
    torch.onnx.export(Ae().eval(), torch.zeros(1, 1, 8, 8), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    proc = run_cli("fit", "--onnx", path, "--layer", "act", "--clean", DIGITS, "--trigger", "badnets:size=2",
                   "-o", tmp_path / "d.npz", check=True)
    assert "held-out check: skipped (the model's predictions cannot be compared" in proc.stdout
    assert (tmp_path / "d.npz").is_file()
