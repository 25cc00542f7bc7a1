"""Weaker copies of a known trigger (new-user run 26). On a Fashion-MNIST BadNets model a patch at 60 % of its
strength (or grey 150, or an inverted checker) fooled the original model on 50-55 % of the images at scores under
the gate's threshold, and passed the repaired model unchanged, while fit read "99 % -> 3 %". fit's held-out check
now also runs weaker copies of a known trigger and warns when the repair lets them through, and ``--gate-reach
weaker`` makes gate auto reach the weaker copies the original model still obeys (never firing on more than 2 % of
the clean fitting samples)."""

from __future__ import annotations

import json

import numpy as np
from conftest import run_cli
from test_cli import assert_user_error, eval_json, fit_args, snapshot, ws  # noqa: F401  (ws is a fixture)

from fire_onnx import directions as dirs
from fire_onnx.fit import core, verify


def test_weaker_copies_interpolate_between_the_twin_and_the_stamped_image():
    x = np.full((2, 4, 4, 1), 100, np.uint8)
    xt = x.copy()
    xt[:, -1, -1] = 255
    w = core.weaker_copies(x, xt, (0.5, 1.0))
    assert w.shape == (4, 4, 4, 1) and w.dtype == np.uint8
    assert w[0, -1, -1, 0] == 178 and w[2, -1, -1, 0] == 255 and (w[:, 0, 0] == 100).all()


class _Held:
    """A stand-in for fit's HeldOut: the original model sends the weaker copies to class 0 at the given rates
    per strength, the repaired one at others."""

    def __init__(self, before, after, n):
        self.rates = {None: before, "d": after}
        self.n = n

    def runner(self, d):
        rates = self.rates[None if d is None else "d"]

        def run(x):
            out = np.zeros((len(x), 2))
            for i, r in enumerate(rates):
                block = out[i * self.n:(i + 1) * self.n]
                block[: int(round(r * self.n)), 0] = 1  # class 0 (the target) for that share
                block[int(round(r * self.n)):, 1] = 1
            return out
        return run


def test_the_weaker_check_names_the_strength_the_repair_lets_through():
    n = 50
    x = np.zeros((n, 4, 4, 1), np.uint8)
    pre = lambda a: a.astype(np.float32)  # noqa: E731
    # 60 % strength: 54 % -> 52 % (the gate let it through); 70 %: 72 % -> 20 % (partly); 80 %: 86 % -> 6 %
    held = _Held([0.34, 0.54, 0.72, 0.86], [0.34, 0.52, 0.2, 0.06], n)
    out = verify._weaker_check(held, "d", x, x, 0, pre)
    assert [r["strength"] for r in out["rows"]] == list(verify.WEAKER_CHECK) and out["n"] == n
    assert out["bypass"]["strength"] == 0.6 and out["bypass"]["after"] == 0.52
    # a repair that removes the weaker copies too: nothing to report
    held = _Held([0.34, 0.54, 0.72, 0.86], [0.06, 0.04, 0.04, 0.02], n)
    assert "bypass" not in verify._weaker_check(held, "d", x, x, 0, pre)


def test_fit_gate_reach_weaker_records_the_weaker_copies_and_the_repair_still_works(ws):
    proc = run_cli(*fit_args(ws, "--trigger", "badnets", "--target", "0", "--onnx", "model.onnx", "--gate-reach",
                             "weaker", "-o", "w.npz", "--json", "w.json"), cwd=ws)
    assert proc.returncode == 0, proc.stderr
    d = dirs.load(ws / "w.npz")
    reach = d.meta["gate_reach"]
    assert reach["mode"] == "weaker" and reach["strengths"] == list(core.WEAKER_STRENGTHS)
    assert len(reach["at_target"]) == len(core.WEAKER_STRENGTHS) and reach["at_target"][-1] > 0
    assert d.targets[0].fit["gate_fires_clean"] <= 0.02 + 1e-9
    check = json.loads((ws / "w.json").read_text())["check"]
    rows = check["weaker_trigger"]["rows"]
    assert [r["strength"] for r in rows] == list(verify.WEAKER_CHECK)
    assert all(r["after"] <= r["before"] for r in rows), rows
    run_cli("patch", "model.onnx", "w.npz", "-o", "w.onnx", cwd=ws, check=True)
    res = eval_json(ws, "model.onnx", "w.onnx")
    assert res["models"]["w.onnx"]["asr"] <= 0.02
    assert res["models"]["model.onnx"]["ca"] - res["models"]["w.onnx"]["ca"] <= 0.005


def test_gate_reach_weaker_needs_twins_and_is_taken_from_the_file_on_update(ws):
    from fire_onnx import triggers
    from fire_onnx.data import load_images

    test = load_images(ws / "mnist.npz", "test")
    np.savez(ws / "flagged.npz", x=triggers.parse("badnets").apply(test.x[test.y != 0][:20]))
    before = snapshot(ws)
    proc = run_cli(*fit_args(ws, "--triggered", "flagged.npz", "--reconstruct", "off", "--onnx", "model.onnx",
                             "--gate-reach", "weaker", "-o", "f.npz"), cwd=ws)
    assert_user_error(proc, ws, before, "--gate-reach weaker needs the triggered images' clean twins")
    proc = run_cli("fit", "--update", "directions.npz", "--triggered", "flagged.npz", "--model",
                   fit_args(ws)[2], "--weights", ws / "model.pt", "--clean", ws / "mnist.npz", "--gate-reach",
                   "weaker", "-o", "u.npz", cwd=ws)
    assert_user_error(proc, ws, before, "--update takes --gate-reach")


def test_a_layer_auto_run_is_not_told_to_try_layer_auto():
    """new-user run 26: inside a --layer auto run the changed-clean warning said "try another layer: --layer auto"."""
    check = {"changed": 16, "changed_from_target": 11, "target": 0}
    assert "(try --layer auto)" in verify.poisoned_clean_hint(check)
    hint = verify.poisoned_clean_hint(check, "a larger --max-layers or --clean-budget")
    assert "--layer auto" not in hint and "(try a larger --max-layers or --clean-budget)" in hint
