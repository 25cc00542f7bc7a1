"""fit --layer auto: the choice on a model where the answer is constructed (tests/auto_synth.py), the clean
budget on held-out images, the ranking in the directions file, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from fire_onnx import directions as dirs
from fire_onnx.data import Images, Preprocess
from fire_onnx.errors import FireError
from fire_onnx.evaluate import predict_logits, session
from fire_onnx.fit.auto import Score, Site, rank, why
from fire_onnx.fit.pipeline import FitRequest, run_fit
from fire_onnx.patch import patch_file

SYNTH = Path(__file__).resolve().parent / "auto_synth.py"
SCALE = str(1 / 255)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The hand-weighted model exported to ONNX, a clean pool and 20 triggered images with their twins."""
    import importlib.util

    from fire_onnx.fit import export_onnx

    spec = importlib.util.spec_from_file_location("auto_synth", SYNTH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path_factory.mktemp("auto")
    model = mod.build()
    x, y = mod.images(2500, seed=0)
    pre = Preprocess(scale=1 / 255)
    export_onnx(model, pre(x[:2]), root / "synth.onnx")
    xt = mod.stamp(x[:20], seed=1)
    np.savez(root / "trig.npz", x=xt, x_clean=x[:20], y=y[:20])
    np.savez(root / "clean.npz", x=x[20:], y=y[20:])
    fresh_x, fresh_y = mod.images(1000, seed=7)  # never seen by fit: for the budget on unseen images
    return {"root": root, "onnx": root / "synth.onnx", "clean": root / "clean.npz", "trig": root / "trig.npz",
            "mod": mod, "pre": pre, "fresh": Images(fresh_x, fresh_y)}


def request(s, **kw) -> FitRequest:
    args = dict(layers=["auto"], clean_path=str(s["clean"]), onnx_path=str(s["onnx"]), triggered_path=str(s["trig"]),
                target=0, scale=1 / 255)
    args.update(kw)
    return FitRequest(**args)


def rows(d: dirs.Directions) -> dict:
    return {r["layer"]: r for r in d.meta["auto"]["candidates"]}


def test_auto_chooses_the_layer_where_the_trigger_is_one_direction(synth):
    d = run_fit(request(synth))
    t = d.targets[0]
    assert (t.module, t.tensor) == ("block2", "/block2/Concat_output_0")
    r = rows(d)
    assert set(r) == {"block1", "block2"}  # the Conv (fusion) output and the logits are not candidates
    assert r["block2"]["chosen"] and r["block2"]["rank"] == 1 and r["block2"]["target_rate"] == 0.0
    assert r["block1"]["target_rate"] >= 0.8 and not r["block1"]["chosen"]  # the spread shift is not removed
    a = d.meta["auto"]
    assert a["within_budget"] and a["chosen"] == "block2" and a["original_target_rate"] == 1.0
    assert (a["n_fit_triggered"], a["n_held_triggered"]) == (10, 10)  # the 20 triggered images split in two
    assert "block2" in a["why"] and "lowest held-out target rate" in a["why"]
    # the winner is refitted on all 20 triggered images: the same directions as fit --layer block2
    ref = run_fit(request(synth, layers=["block2"])).targets[0]
    assert t.fit["n_triggered"] == 20
    np.testing.assert_array_equal(t.U, ref.U)
    np.testing.assert_array_equal(t.mu, ref.mu)
    np.testing.assert_array_equal(t.tau, ref.tau)


def test_the_repair_it_chose_removes_the_backdoor_on_unseen_images(synth, tmp_path):
    d = run_fit(request(synth))
    dirs.save(d, tmp_path / "d.npz")
    patched = patch_file(synth["onnx"], tmp_path / "d.npz", tmp_path / "m.fire.onnx")[0]
    fresh, pre = synth["fresh"], synth["pre"]
    trig = synth["mod"].stamp(fresh.x, seed=9)
    before = predict_logits(session(synth["onnx"]), pre(trig)).argmax(1)
    after = predict_logits(session(patched), pre(trig)).argmax(1)
    assert (before == 0).mean() == 1.0 and (after == 0).mean() == 0.0
    assert (after == fresh.y).mean() > 0.95  # and gives the images their own class back


@pytest.mark.parametrize("gate", ["none", "auto"])
def test_the_clean_budget_holds_on_held_out_clean_images(synth, tmp_path, gate):
    """With --gate none, block1's projection changes most clean predictions: over the budget, never chosen.
    The chosen repair's clean change, measured again from the written file on the held-out images and on
    images no fit saw, stays within the budget."""
    from fire_onnx.fit.auto import split_samples
    from fire_onnx.fit.pipeline import load_inputs, select_samples

    budget = 0.005
    req = request(synth, gate=gate, clean_budget=budget)
    d = run_fit(req)
    r = rows(d)
    assert d.targets[0].module == "block2" and r["block2"]["clean_change"] <= budget
    if gate == "none":
        assert r["block1"]["clean_change"] > 0.5 and not r["block1"]["within_budget"]
    dirs.save(d, tmp_path / "d.npz")
    patched = patch_file(synth["onnx"], tmp_path / "d.npz", tmp_path / "m.fire.onnx")[0]

    # the held-out clean images, as the documented split holds them out (not fitted on)
    req2 = request(synth, gate=gate)
    inputs = load_inputs(req2)
    clean, trig, source = select_samples(req2, inputs)
    split = split_samples(req2, inputs, clean, trig, source, 0, None)
    assert len(split.held_clean) == d.meta["auto"]["n_held_clean"] == 1000
    fitted = {a.tobytes() for a in clean.x}
    assert not any(a.tobytes() in fitted for a in split.held_clean.x)
    pre = synth["pre"]
    for imgs in (split.held_clean, synth["fresh"]):
        p0 = predict_logits(session(synth["onnx"]), pre(imgs.x)).argmax(1)
        p1 = predict_logits(session(patched), pre(imgs.x)).argmax(1)
        assert (p0 != p1).mean() <= budget


def test_objective_prefers_a_worse_target_rate_within_budget_and_falls_back_to_least_clean_change():
    def score(label, rate, change, shift=0.0):
        return Score(site=Site(tensor=f"/{label}", module=label, shape=[4]), target_rate=rate, clean_change=change,
                     clean_shift=shift)

    a, b, c = score("a", 0.00, 0.020), score("b", 0.03, 0.004), score("c", 0.05, 0.000)
    ranked, within = rank([a, b, c], 0.005)
    assert within and [s.site.label for s in ranked] == ["b", "c", "a"]  # a: lowest rate, but over budget
    assert "b: lowest held-out target rate" in why(ranked, within, 0.005, 1000, 1.0)
    ranked, within = rank([a, b, c], 0.05)  # a larger budget lets a in
    assert within and ranked[0] is a
    ranked, within = rank([a, b], 0.001)  # nothing within: the fewest clean changes, and it says so
    assert not within and ranked[0] is b
    assert "no candidate keeps the clean change within the budget" in why(ranked, within, 0.001, 1000, 1.0)
    # ties: lower clean change, then the smaller clean output shift, then graph order
    t1, t2, t3 = score("t1", 0.0, 0.002, 0.01), score("t2", 0.0, 0.001, 0.05), score("t3", 0.0, 0.001, 0.02)
    assert [s.site.label for s in rank([t1, t2, t3], 0.005)[0]] == ["t3", "t2", "t1"]
    failed = Score(site=Site(tensor="/f", module="f", shape=[4]), error="boom")
    assert rank([failed, t1], 0.005)[0][-1] is failed


def test_objective_with_twins_prefers_restoring_triggered_images_near_the_lowest_target_rate():
    """A repair can push triggered images out of the target class without giving them their own class back (PreAct
    CIFAR-10 Blended: layer4.0 0.1 % ASR at 34 % RA, layer2 1.1 % at 63 %). With twins, the candidates within
    RESTORE_WINDOW of the lowest target rate (or of the model's own floor) are ranked by the restored share."""
    from fire_onnx.fit.auto import RESTORE_WINDOW

    def score(label, rate, restored, change=0.0):
        return Score(site=Site(tensor=f"/{label}", module=label, shape=[4]), target_rate=rate, clean_change=change,
                     clean_shift=0.0, restored=restored)

    a, b, c = score("a", 0.001, 0.34), score("b", 0.011, 0.63), score("c", 0.022, 0.76)
    assert RESTORE_WINDOW == 0.01
    assert rank([a, b, c], 0.005)[0][0] is a  # the target rate alone
    ranked, within = rank([a, b, c], 0.005, floor=0.0, restore=True)
    assert [s.site.label for s in ranked] == ["b", "a", "c"]  # c is 2.1 pt above the lowest: out of the window
    line = why(ranked, within, 0.005, 1000, 1.0)
    assert "b: held-out target rate 1.1%" in line and "63.0% of the held-out triggered images" in line
    assert rank([a, b, c], 0.005, floor=0.025, restore=True)[0][0] is c  # below the model's own floor: all alike
    # over the budget: not considered, whatever it restores
    d = score("d", 0.005, 0.99, change=0.02)
    assert rank([a, b, d], 0.005, floor=0.0, restore=True)[0][0] is b
    # restoring barely more than the lowest-rate candidate (within RESTORE_MARGIN) is noise: the target rate decides
    f = score("f", 0.006, 0.37)
    assert rank([a, f], 0.005, floor=0.0, restore=True)[0][0] is a
    # a candidate without a restored share (no twins): the target rate alone
    e = score("e", 0.001, None)
    assert rank([e, b], 0.005, floor=0.0, restore=True)[0][0] is e


def test_auto_with_the_pytorch_model_reads_modules_and_chooses_the_same(synth):
    d = run_fit(request(synth, model_spec=f"{SYNTH}:build", no_weights=True))
    assert d.targets[0].module == "block2" and d.targets[0].tensor == "/block2/Concat_output_0"
    assert set(rows(d)) == {"block1", "block2"}


def test_auto_with_a_known_trigger_holds_out_stamped_clean_images(synth, tmp_path):
    """--trigger: the candidates are fitted on the samples a plain fit uses and judged on held-out pool
    images stamped with the trigger (here a 2x2 white patch at a fixed place: removable at both layers)."""
    d = run_fit(request(synth, triggered_path=None, trigger_spec="badnets:size=2", n_clean=300))
    a = d.meta["auto"]
    assert a["n_fit_triggered"] == 20 and a["n_held_triggered"] == a["n_held_clean"] == 1000
    assert a["target"] == 0 and all(r["target_rate"] is not None for r in a["candidates"])
    assert d.targets[0].fit["n_triggered"] == 20
    # the stamped images' clean twins are known: each candidate records the share it gives their twin's class back,
    # and a repair that removes the trigger restores most of them
    assert all(0 <= r["restored"] <= 1 for r in a["candidates"])
    assert max(r["restored"] for r in a["candidates"]) >= 0.8, a["candidates"]


def test_auto_judges_on_the_files_other_images_when_it_has_more_than_the_fit_takes(synth, tmp_path):
    """A triggered file of 60 images with --n-triggered 20: each candidate is fitted on the 20 a plain fit
    uses and judged on the other 40 (not on 10 of the 20); 20 images: the half split as before."""
    mod = synth["mod"]
    x, y = mod.images(200, seed=21)
    x, y = x[y != 0][:60], y[y != 0][:60]
    np.savez(tmp_path / "t60.npz", x=mod.stamp(x, seed=22), x_clean=x, y=y)
    d = run_fit(request(synth, triggered_path=str(tmp_path / "t60.npz")))
    a = d.meta["auto"]
    assert a["n_fit_triggered"] == 20 and a["n_held_triggered"] == 40, a
    assert "judged on 40 other images of the triggered file" in a["split"]
    assert a["refit"]["target_rate_in_sample"] is False and d.targets[0].module == "block2"
    half = run_fit(request(synth)).meta["auto"]
    assert half["n_fit_triggered"] == 10 and half["n_held_triggered"] == 10
    assert half["refit"]["target_rate_in_sample"] is True


def test_auto_infers_the_target_from_the_triggered_samples(synth):
    d = run_fit(request(synth, target=None))
    a = d.meta["auto"]
    assert a["target"] == 0 and a["target_from"].startswith("the class the original model gives")
    assert d.targets[0].module == "block2"


def test_cli_fit_layer_auto_prints_the_ranking_and_patch_accepts_the_file(synth, tmp_path):
    out = tmp_path / "auto.npz"
    proc = run_cli("fit", "--onnx", synth["onnx"], "--layer", "auto", "--clean", synth["clean"], "--triggered",
                   synth["trig"], "--target", 0, "--scale", SCALE, "-o", out, "--json", tmp_path / "fit.json",
                   check=True)
    lines = proc.stdout.splitlines()
    assert any(line.startswith("layer auto: held-out target rate") for line in lines)
    row = next(line for line in lines if line.split()[1:2] == ["block2"])
    assert "chosen" in row and "0.0%" in row
    assert any(line.startswith("chosen block2: lowest held-out target rate") for line in lines)
    # fit's own check of the refit comes after the ranking and says it is not the ranking's number
    check = next(i for i, line in enumerate(lines) if line.startswith("held-out check of the chosen layer, refitted"))
    assert check > next(i for i, line in enumerate(lines) if line.startswith("chosen block2"))
    assert "layer auto [1/2] block1" in proc.stderr and "layer auto [2/2] block2" in proc.stderr
    summ = json.loads((tmp_path / "fit.json").read_text())
    assert summ["auto"]["chosen"] == "block2"
    loaded = dirs.load(out)  # the ranking survives the file's JSON header
    assert loaded.meta["auto"]["candidates"] == summ["auto"]["candidates"]
    proc = run_cli("patch", synth["onnx"], out, "-o", tmp_path / "m.fire.onnx", check=True)
    assert "patched /block2/Concat_output_0" in proc.stdout


@pytest.mark.parametrize("extra, message", [
    (["--layer", "block1"], "--layer auto chooses one layer by itself"),
    (["--tensor", "/block2/Concat_output_0"], "--layer auto chooses it: drop --tensor"),
    (["--update", "UPDATE"], "cannot be combined with --layer auto"),
])
def test_cli_bad_combinations_are_one_line_errors(synth, tmp_path, extra, message):
    if "UPDATE" in extra:
        d = run_fit(request(synth, layers=["block2"]))
        dirs.save(d, tmp_path / "old.npz")
        extra = ["--update", tmp_path / "old.npz"]
    proc = run_cli("fit", "--onnx", synth["onnx"], "--layer", "auto", *extra, "--clean", synth["clean"],
                   "--triggered", synth["trig"], "--scale", SCALE, "-o", tmp_path / "x.npz")
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fire-onnx: error:") and message in err[0]
    assert not (tmp_path / "x.npz").exists()


def test_auto_needs_the_onnx_model_and_held_out_images(synth, tmp_path):
    with pytest.raises(FireError, match="give --onnx"):
        run_fit(request(synth, onnx_path=None, model_spec=f"{SYNTH}:build", no_weights=True))
    small = tmp_path / "small.npz"
    x = np.load(synth["clean"])["x"][:100]
    np.savez(small, x=x)
    with pytest.raises(FireError, match="needs clean images beyond the 100"):
        run_fit(request(synth, clean_path=str(small), n_clean=100))
    one = tmp_path / "one.npz"
    t = np.load(synth["trig"])
    np.savez(one, x=t["x"][:1], x_clean=t["x_clean"][:1])
    with pytest.raises(FireError, match="at least 2 triggered images"):
        run_fit(request(synth, triggered_path=str(one)))


def test_candidates_leave_out_the_output_head_and_fusion_splits(tmp_path):
    """A model whose output is a Softmax of the logits: neither the Softmax nor the logits Gemm are
    candidates, nor the Conv/Gemm outputs a runtime fuses with their activation."""
    import torch

    from fire_onnx.fit import export_onnx
    from fire_onnx.fit.auto import candidate_sites
    from fire_onnx.onnxutil import load_model
    from fire_onnx_models.small_cnn import build_mnist

    torch.manual_seed(0)
    model = torch.nn.Sequential(build_mnist(), torch.nn.Softmax(dim=1)).eval()
    export_onnx(model, np.zeros((2, 1, 28, 28), np.float32), tmp_path / "m.onnx")
    sites, skipped = candidate_sites(load_model(tmp_path / "m.onnx"))
    assert [s.label for s in sites] == ["0.block1.1", "0.block1", "0.block2.1", "0.block2", "0.fc1_act"]
    why = dict(skipped)
    head = [t for t, w in why.items() if "output head" in w]
    assert len(head) == 2  # the Softmax output and the fc2 Gemm output under it
    assert any("Gemm" in t for t in head)
    assert sum("fused" in w for w in why.values()) == 3  # block1.0, block2.0, fc1


def test_repair_auto_ranks_both_operators_at_every_site(synth):
    d = run_fit(request(synth, repair="auto"))
    a = d.meta["auto"]
    assert a["repairs"] == ["project", "translate"]
    assert sorted((r["layer"], r["repair"]) for r in a["candidates"]) == [
        ("block1", "project"), ("block1", "translate"), ("block2", "project"), ("block2", "translate")]
    best = next(r for r in a["candidates"] if r["chosen"])
    assert best["layer"] == "block2" and d.targets[0].repair == best["repair"] == a["chosen_repair"]
    with pytest.raises(FireError, match="--repair auto tries both operators"):
        run_fit(request(synth, layers=["block2"], repair="auto"))


def test_auto_warns_when_no_layer_removes_the_trigger(synth):
    """--alpha 0: every candidate repair does nothing, so the best one leaves the target rate where it was;
    fit refuses to write it (the held-out images are clear evidence), and --force writes it with the warnings."""
    with pytest.raises(FireError, match="it does not remove the backdoor"):
        run_fit(request(synth, alpha=0.0))
    d = run_fit(request(synth, alpha=0.0, force=True))
    assert all(r["target_rate"] == 1.0 and r["clean_change"] == 0.0 for r in d.meta["auto"]["candidates"])
    warnings = d.meta["checks"]["warnings"]
    assert any("still sends 100% of the held-out triggered images to class 0" in w for w in warnings)
    assert any("no candidate lowers the share of held-out triggered images sent to class 0" in w for w in warnings)
    assert "tied on target rate with" in d.meta["auto"]["why"]


def test_auto_refuses_when_no_layer_lowers_the_rate_and_the_check_agrees(synth, tmp_path):
    """Five flagged images, one of them untriggered, and a repair that removes nothing (--alpha 0): the check's
    cross-fit leaves 4 of 5 at the target, too few for its own refusal (a lower bound under 50 %), and auto wrote
    the repair with exit 0 after saying it removes nothing (new-user run 25: 69 % ASR measured). Now refused."""
    mod = synth["mod"]
    x, y = mod.images(40, seed=3)
    other = np.flatnonzero(y != 0)
    flagged = np.concatenate([mod.stamp(x[other[:4]], seed=2), x[other[4:5]]])
    np.savez(tmp_path / "five.npz", x=flagged)
    req = lambda **kw: request(synth, triggered_path=str(tmp_path / "five.npz"), alpha=0.0, **kw)  # noqa: E731
    with pytest.raises(FireError, match="no candidate layer lowers .* it does not remove the backdoor"):
        run_fit(req())
    d = run_fit(req(force=True))
    assert d.meta["check"]["refuse"].startswith("no candidate layer lowers")


def test_chain_fits_each_layer_on_repaired_activations_and_equals_the_pytorch_chain(synth, tmp_path):
    """refit_chain (the final fit of --max-layers): the second target is fitted on activations with the first
    repair applied, the patched ONNX model equals the PyTorch chain (forward hooks) within 1e-5, and the
    fingerprints are those of the unpatched model (patch accepts the file)."""
    import torch
    from conftest import torch_repaired

    from fire_onnx.fit.auto import Score, Site, refit_chain
    from fire_onnx.fit.pipeline import load_inputs, select_samples

    req = request(synth, layers=["auto"], gate="none", max_layers=2)  # gate none: block1's repair moves every input
    inputs = load_inputs(req)
    clean, trig, source = select_samples(req, inputs)
    chain = [Score(site=Site(tensor="/block1/block1.1/Relu_output_0", module="block1", shape=[2, 7, 7])),
             Score(site=Site(tensor="/block2/Concat_output_0", module="block2", shape=[2]))]
    d = refit_chain(req, inputs, chain, clean, trig, source)
    assert [t.module for t in d.targets] == ["block1", "block2"]
    model = synth["mod"].build()
    first = dirs.Directions(targets=d.targets[:1], preprocess=d.preprocess)
    x = synth["pre"](clean.x)
    acts = {}
    handles = [model.block2.register_forward_hook(lambda m, i, o: acts.__setitem__("b2", o.detach().numpy()))]
    try:
        torch_repaired(model, first, x)  # block1 repaired, block2's output recorded
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_allclose(d.targets[1].mu, acts["b2"].mean(axis=0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        plain = model.block2(model.block1(torch.from_numpy(x))).numpy().mean(axis=0)
    assert np.abs(plain - d.targets[1].mu).max() > 1e-3  # the first repair did change what the second saw
    dirs.save(d, tmp_path / "chain.npz")
    patched = patch_file(synth["onnx"], tmp_path / "chain.npz", tmp_path / "chain.fire.onnx")[0]
    xs = synth["pre"](np.concatenate([synth["fresh"].x[:200], synth["mod"].stamp(synth["fresh"].x[:200], seed=3)]))
    onnx_out = predict_logits(session(patched), xs)
    np.testing.assert_allclose(onnx_out, torch_repaired(model, d, xs), rtol=1e-5, atol=1e-5)


def test_max_layers_stops_when_the_target_rate_is_already_zero_and_is_refused_without_auto(synth):
    d = run_fit(request(synth, max_layers=3))
    a = d.meta["auto"]
    assert len(d.targets) == 1 and a["chain"] == ["block2"] and a["stopped"] == "the held-out target rate is already 0"
    with pytest.raises(FireError, match="--max-layers applies to --layer auto"):
        run_fit(request(synth, layers=["block2"], max_layers=2))


def test_max_layers_keeps_a_second_layer_only_within_the_budget(synth):
    """Triggered images without twins (unpaired, half of them to fit): block2 leaves part of the trigger;
    step 2 fits block1 on activations with block2's repair applied, and that chain changes more held-out
    clean predictions than the budget allows, so the chain stops at block2 and says why."""
    s = dict(synth)
    flagged = s["root"] / "flagged.npz"
    np.savez(flagged, x=np.load(s["trig"])["x"])
    d = run_fit(request(s, triggered_path=str(flagged), reconstruct="off", max_layers=2))
    a = d.meta["auto"]
    assert a["chain"][0] == "block2" and len(a["steps"]) == 1 and a["steps"][0]["after"] == ["block2"]
    step = a["steps"][0]["candidates"]
    assert [r["layer"] for r in step] == ["block1"]
    assert step[0]["clean_change"] > 0.005 and not step[0]["within_budget"] and not step[0]["chosen"]
    assert a["chain"] == ["block2"] and a["stopped"] == "step 2: every candidate would exceed the clean budget"
    assert [t.module for t in d.targets] == ["block2"] and a["chain_target_rate"] == rows(d)["block2"]["target_rate"]


@pytest.fixture(scope="module")
def two(synth):
    """tests/auto_synth.py's TwoTriggers model: one direction per layer removes only one of two triggers."""
    from fire_onnx.fit import export_onnx

    mod, root = synth["mod"], synth["root"]
    x, y = mod.images(2500, seed=0)
    export_onnx(mod.build_two(), synth["pre"](x[:2]), root / "two.onnx")
    np.savez(root / "two_trig.npz", x=mod.stamp_two(x[:40], seed=1), x_clean=x[:40], y=y[:40])
    np.savez(root / "two_clean.npz", x=x[40:], y=y[40:])
    return dict(synth, onnx=root / "two.onnx", trig=root / "two_trig.npz", clean=root / "two_clean.npz")


def test_max_layers_chains_a_second_layer_that_removes_what_the_first_left(two, tmp_path):
    from conftest import torch_repaired

    single = run_fit(request(two, n_triggered=40))
    r = rows(single)
    assert single.targets[0].module == "fc1_act" and 0.2 <= r["fc1_act"]["target_rate"] <= 0.8  # B survives
    assert r["block2"]["target_rate"] == 1.0
    d = run_fit(request(two, n_triggered=40, max_layers=3))
    a = d.meta["auto"]
    assert a["chain"] == ["fc1_act", "fc2_act"] and [t.module for t in d.targets] == ["fc1_act", "fc2_act"]
    assert a["chain_target_rate"] == 0.0 and a["chain_clean_change"] <= 0.005
    assert a["steps"][0]["chosen"] == "fc2_act" and a["stopped"] == "the held-out target rate is already 0"
    # the chain refitted on all samples is scored again on the held-out images: still within the budget
    assert a["refit"]["clean_change"] <= 0.005 and a["refit"]["dropped"] == [] and a["refit"]["target_rate"] == 0.0
    # and it gets fit's check, cross-fitted by refitting the whole chain on each fold (one layer alone
    # would leave 20-80 % of the held-out fold at the target)
    check = d.meta["check"]
    assert check["in_sample"] and check["cross_fit"]["n"] == 40, check
    assert check["cross_fit"]["target_rate_after"] <= 0.1 and check["clean_change"] <= 0.02, check
    assert single.meta["check"]["cross_fit"]["target_rate_after"] >= 0.2, single.meta["check"]
    dirs.save(d, tmp_path / "chain.npz")
    proc = run_cli("patch", two["onnx"], tmp_path / "chain.npz", "-o", tmp_path / "two.fire.onnx", check=True)
    assert "patched /fc1_act/Relu_output_0" in proc.stdout and "patched /fc2_act/Relu_output_0" in proc.stdout
    mod, pre, fresh = two["mod"], two["pre"], two["fresh"]
    xt = pre(mod.stamp_two(fresh.x, seed=5))
    patched = session(tmp_path / "two.fire.onnx")
    assert (predict_logits(session(two["onnx"]), xt).argmax(1) == 0).mean() == 1.0
    assert (predict_logits(patched, xt).argmax(1) == 0).mean() == 0.0  # both triggers gone on unseen images
    clean_x = pre(fresh.x)
    assert (predict_logits(patched, clean_x).argmax(1) == fresh.y).mean() == 1.0
    both = np.concatenate([clean_x[:100], xt[:100]])
    np.testing.assert_allclose(predict_logits(patched, both), torch_repaired(mod.build_two(), d, both),
                               rtol=1e-5, atol=1e-5)


def test_update_of_a_chain_reads_later_targets_with_the_earlier_repairs_applied(two, tmp_path):
    """fit --update on a --max-layers chain: each target keeps its own settings and the second one is
    updated on activations with the (updated) first repair applied, as the chain was fitted; the
    statistics it merges then agree with what it recorded, and the updated chain still removes both
    triggers on unseen images without touching clean ones."""
    from fire_onnx.fit.update import chain_of

    d = run_fit(request(two, n_triggered=40, max_layers=3))
    assert chain_of(d) == ["fc1_act", "fc2_act"]
    dirs.save(d, tmp_path / "chain.npz")
    mod, pre = two["mod"], two["pre"]
    x, y = mod.images(300, seed=11)
    np.savez(tmp_path / "more.npz", x=mod.stamp_two(x[:40], seed=12), x_clean=x[:40], y=y[:40])
    req = FitRequest(layers=[], update_path=str(tmp_path / "chain.npz"), clean_path=str(two["clean"]),
                     onnx_path=str(two["onnx"]), triggered_path=str(tmp_path / "more.npz"), n_triggered=40)
    u = run_fit(req)
    assert chain_of(u) == chain_of(d) and [t.module for t in u.targets] == ["fc1_act", "fc2_act"]
    assert [(t.layout, t.gate, t.repair) for t in u.targets] == [(t.layout, t.gate, t.repair) for t in d.targets]
    assert all(t.fit["updates"] == 1 and t.fit["n_triggered"] == 80 for t in u.targets)
    assert not [w for w in u.meta["checks"]["warnings"] if "clean mean differs" in w], u.meta["checks"]["warnings"]
    # the new triggered samples, read with the first repair applied, move the second target the way the
    # earlier ones did (read without it they carry the first trigger's shift too)
    cos = abs(float(u.targets[1].U[0] @ d.targets[1].U[0]))
    assert cos > 0.99, cos
    # another model (one weight matrix scaled): refused on the original model's fingerprints, before any fit
    from dataclasses import replace

    import onnx
    from onnx import numpy_helper

    other = onnx.load(str(two["onnx"]))
    init = next(i for i in other.graph.initializer if numpy_helper.to_array(i).ndim == 2)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(FireError, match="--update needs the same model"):
        run_fit(replace(req, onnx_path=str(tmp_path / "other.onnx")))
    dirs.save(u, tmp_path / "chain.u1.npz")
    run_cli("patch", two["onnx"], tmp_path / "chain.u1.npz", "-o", tmp_path / "u.fire.onnx", check=True)
    fresh = two["fresh"]
    sess = session(tmp_path / "u.fire.onnx")
    assert (predict_logits(sess, pre(mod.stamp_two(fresh.x, seed=5))).argmax(1) == 0).mean() == 0.0
    assert (predict_logits(sess, pre(fresh.x)).argmax(1) == fresh.y).mean() == 1.0


def test_the_tie_explanation_names_what_decided():
    """Tied on target rate and clean change, the candidate that moves the clean outputs least wins, and the
    line says it moved them less than the others; only an even clean shift falls to graph order (it read
    'it comes first in the graph' when a later candidate had won on the shift)."""
    from fire_onnx.fit.auto import Score, Site, rank, why

    def sc(name, shift):
        return Score(site=Site(tensor=name, module=name, shape=[4]), target_rate=0.0, clean_change=0.0,
                     clean_shift=shift)

    stem, res1, down = sc("stem", 6e-5), sc("res1", 5.2948e-6), sc("down", 5.2958e-6)
    ranked, within = rank([stem, res1, down], 0.005)
    assert [s.site.label for s in ranked] == ["res1", "down", "stem"]
    line = why(ranked, within, 0.005, 1000, 1.0)
    assert "moves the held-out clean outputs less than stem" in line
    assert "as little as down, and it comes first in the graph" in line


def test_the_chosen_layer_gets_fits_held_out_check_cross_fitted_over_a_flagged_file(synth, tmp_path):
    """With flagged images (no twins) `--layer auto` judged its candidates on half of them (10 of 20: a layer
    it rated 10 % left 32 % ASR on a new user's model) and wrote the refit unchecked. The refit now gets the
    check a plain `fit --layer <chosen>` runs: cross-fitted over all the flagged images, recorded in
    meta["check"]; and it equals that fit."""
    x = np.load(synth["trig"])["x"]
    np.savez(tmp_path / "flagged.npz", x=x)
    d = run_fit(request(synth, triggered_path=str(tmp_path / "flagged.npz")))
    check = d.meta["check"]
    assert check["in_sample"] and check["cross_fit"]["n"] == 20 and check["cross_fit"]["folds"] == 5, check
    chosen = d.meta["auto"]["chosen"]
    plain = run_fit(request(synth, layers=[chosen], triggered_path=str(tmp_path / "flagged.npz")))
    np.testing.assert_allclose(d.targets[0].U, plain.targets[0].U, atol=1e-6)
    assert plain.meta["check"]["cross_fit"]["target_rate_after"] == check["cross_fit"]["target_rate_after"]


class _Residual:
    """A residual block whose flatten reads the batch size off the input (x.shape[0] taken at the start):
    the graph after the inner ReLU reads the block's input (the skip) and a Shape of the graph input."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
                self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
                self.act = nn.ReLU()
                self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
                self.fc = nn.Linear(4 * 8 * 8, 3)

            def forward(self, x):
                n = x.shape[0]
                h = self.stem(x)
                r = self.act(self.conv1(h))
                out = torch.relu(self.conv2(r) + h)
                return self.fc(out.reshape(n, -1))

        torch.manual_seed(3)
        return Net().eval()


def test_the_graph_after_a_tensor_is_cut_out_with_its_skip_input_and_reproduces_the_model(tmp_path):
    import onnx

    from fire_onnx.fit import export_onnx
    from fire_onnx.onnxutil import downstream_model, infer_shapes
    from fire_onnx.probe import TensorReader

    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    export_onnx(_Residual.build(), x, tmp_path / "res.onnx")
    model = infer_shapes(onnx.load(tmp_path / "res.onnx"))
    start = "/act/Relu_output_0"
    part, frontier = downstream_model(model, start)
    assert frontier[0] == start and "/stem/stem.1/Relu_output_0" in frontier  # the skip
    assert "input" in frontier  # the Shape of the input that the reshape reads is computed inside the part
    assert {n.op_type for n in part.graph.node} >= {"Conv", "Add", "Relu", "Shape", "Reshape", "Gemm"}
    assert not any(n.op_type == "Conv" and n.output[0] == "/stem/stem.0/Conv_output_0" for n in part.graph.node)
    reads = [f for f in frontier if f != "input"]
    acts, logits = TensorReader(model, reads, with_logits=True)(x)
    got = session(part.SerializeToString()).run(None, {**{f: acts[f] for f in reads}, "input": x})[0]
    np.testing.assert_allclose(got, logits, rtol=1e-6, atol=1e-6)
    # any rows, in any order
    idx = np.array([4, 1])
    got = session(part.SerializeToString()).run(None, {**{f: acts[f][idx] for f in reads}, "input": x[idx]})[0]
    np.testing.assert_allclose(got, logits[idx], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not depend"):
        downstream_model(model, "/stem/stem.0/Conv_output_0x")


@pytest.mark.parametrize("model_key", ["synth", "two"])
def test_held_out_scoring_through_the_cut_out_graph_equals_the_whole_patched_model(synth, two, model_key):
    """HeldOut.score_many (one pass reading every candidate's tensor, then only the images whose gate fires
    run through the graph after it) gives exactly HeldOut.score's numbers, also behind an earlier repair
    (a chain step), and falls back to the whole model for gate none."""
    from fire_onnx.fit.auto import HeldOut, chained_inputs, split_samples
    from fire_onnx.fit.pipeline import load_inputs, select_samples

    s = synth if model_key == "synth" else two
    req = request(s, layers=["auto"], n_triggered=40 if model_key == "two" else 20)
    inputs = load_inputs(req)
    clean, trig, source = select_samples(req, inputs)
    base = session(inputs.onnx_model.SerializeToString())
    split = split_samples(req, inputs, clean, trig, source, 0,
                          lambda x: predict_logits(base, inputs.preprocess(x)).argmax(1))
    held = HeldOut(inputs.onnx_model, inputs.preprocess, split.held_clean, split.held_triggered, batch_size=64,
                   twins=split.twins, target=0)
    assert (held.base_twin is not None) == (split.twins is not None)
    held.fast_after = 0.0  # a tiny model: cut the graph anyway
    names = ["block1", "block2"] if model_key == "synth" else ["fc1_act", "fc2_act", "block2"]
    fitted = [run_fit(request(s, layers=[n], n_triggered=req.n_triggered, force=True)).targets[0] for n in names]
    none = run_fit(request(s, layers=[names[0]], gate="none", n_triggered=req.n_triggered, force=True)).targets[0]
    pre = dict(inputs.preprocess.as_dict())
    cands = [*fitted, none]
    got = held.score_many(inputs.onnx_model, [], cands, 0)
    want = [held.score(dirs.Directions(targets=[c], preprocess=pre), 0) for c in cands]
    same(got, want)
    # block2's gate fires on the triggered images only; a gate that fires on every held-out image (the
    # auto gate lowered below the clean scores at fc1_act/fc2_act) leaves no image to check the cut-out
    # graph on, and is scored on the whole model like gate none
    assert held.suffix_stats["suffix"] >= 1 and held.suffix_stats["full"] >= 1
    assert held.suffix_stats["rows_run"] < held.suffix_stats["rows"]  # not every image ran again
    if model_key == "two":  # behind the first layer's repair
        prefix = [fitted[0]]
        chained = chained_inputs(inputs, prefix).onnx_model
        got = held.score_many(chained, prefix, fitted[1:], 0)
        want = [held.score(dirs.Directions(targets=[*prefix, c], preprocess=pre), 0) for c in fitted[1:]]
        same(got, want)


def same(got, want):
    """Score tuples equal: the rates to 1e-12, the restored share (None without twins) exactly."""
    np.testing.assert_allclose([g[:3] for g in got], [w[:3] for w in want], rtol=0, atol=1e-12)
    assert [g[3] for g in got] == [w[3] for w in want]


def test_several_given_layers_are_fitted_in_sequence_like_a_chain(two, tmp_path):
    """fit --layer fc2_act --layer fc1_act (in any order): fitted in graph order, the second on activations
    with the first repair applied, exactly as the --max-layers chain; fitted apart, fc2_act's gate never
    fired once fc1_act's repair was applied (new-user run 9: conv1 + conv3 gave exactly conv1's logits)."""
    d = run_fit(request(two, layers=["fc2_act", "fc1_act"], n_triggered=40))
    assert [t.module for t in d.targets] == ["fc1_act", "fc2_act"] and d.meta["chain"] == ["fc1_act", "fc2_act"]
    chain = run_fit(request(two, n_triggered=40, max_layers=3))
    assert [t.module for t in chain.targets] == ["fc1_act", "fc2_act"]
    for a, b in zip(d.targets, chain.targets):
        np.testing.assert_allclose(a.U, b.U, atol=1e-6)
        np.testing.assert_allclose(a.tau, b.tau, atol=1e-6)
    dirs.save(d, tmp_path / "two_layers.npz")
    run_cli("patch", two["onnx"], tmp_path / "two_layers.npz", "-o", tmp_path / "two.fire.onnx", check=True)
    mod, pre, fresh = two["mod"], two["pre"], two["fresh"]
    xt = pre(mod.stamp_two(fresh.x, seed=5))
    assert (predict_logits(session(tmp_path / "two.fire.onnx"), xt).argmax(1) == 0).mean() == 0.0


def test_a_vits_token_tensors_are_cut_out_at_the_block_not_pulled_back_to_the_embedding(tmp_path):
    """Symbolic shape inference loses a ViT's batch symbol at the class token (Shape(x)[0] feeds an Expand:
    the block tensors are unk__N x 17 x 64); inferred with a numeric batch, they are known to be batch-first,
    so the part after block 1's norm reads block 0's output (the residual) and no more, and reproduces the
    model on any rows."""
    import onnx
    import torch

    from fire_onnx.fit import export_onnx
    from fire_onnx.onnxutil import batch_aligned, downstream_model, infer_shapes
    from fire_onnx.probe import TensorReader
    from fire_onnx_models.vit import SmallViT

    torch.manual_seed(0)
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    export_onnx(SmallViT(depth=2).eval(), x, tmp_path / "vit.onnx")
    model = infer_shapes(onnx.load(tmp_path / "vit.onnx"))
    start, residual = "/blocks/blocks.1/norm1/LayerNormalization_output_0", "/blocks/blocks.0/Add_1_output_0"
    aligned = batch_aligned(model)
    assert start in aligned and residual in aligned
    part, frontier = downstream_model(model, start, aligned=aligned)
    assert frontier == [start, residual]
    acts, logits = TensorReader(model, frontier, with_logits=True)(x)
    idx = np.array([3, 0])
    got = session(part.SerializeToString()).run(None, {f: acts[f][idx] for f in frontier})[0]
    np.testing.assert_allclose(got, logits[idx], rtol=1e-6, atol=1e-6)


def test_a_ranking_on_few_held_out_images_says_when_candidates_differ_by_one_image(synth, tmp_path):
    """10 held-out flagged images: rates move in steps of 10 %, and a one-image difference decided a new user's layer
    (run 20: 0 % against 10 %, 4.9 % ASR where the runner-up left 2.4 %). too_close names the candidates such a
    sample cannot tell apart (fit prints them in a note); with many held-out images, or a clear gap, none."""
    from fire_onnx.fit.auto import too_close

    def score(label, rate, change):
        return Score(site=Site(tensor=f"/{label}", module=label, shape=[4]), target_rate=rate, clean_change=change,
                     clean_shift=0.0)

    ranked = [score("fc", 0.0, 0.0), score("c1.1", 0.1, 0.0), score("c2", 0.1, 0.01), score("c1", 0.3, 0.0)]
    assert [s.site.module for s in too_close(ranked, True, 0.005, 10)] == ["c1.1"]  # c2 is over the budget
    assert too_close(ranked, True, 0.005, 500) == []  # 0 % against 10 % of 500 images is a real difference
    assert too_close([score("fc", 0.0, 0.0), score("c1", 0.3, 0.0)], True, 0.005, 10) == []
    # and the synthetic model's flagged fit (block2 apart from the rest) gets no such note
    x = np.load(synth["trig"])["x"]
    np.savez(tmp_path / "flagged.npz", x=x)
    req = request(synth, triggered_path=str(tmp_path / "flagged.npz"))
    run_fit(req)
    assert not [t for t in req.notes if "ranked on only" in t]
