"""fit --trigger-free: when the rounds bound or --budget stops the rounds while the search still reaches the suspected
class through the repaired model, fit warns (not refuses) and records it (new-user run 25: index 25 after every round,
"stopped: reached 3 rounds", exit 0 and no warning, 84 % ASR left by a sticker at a random place)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fire_onnx.fit import trigger_free as tf


def _rounds(*after, last_checked=True):
    """Evidence rounds with these anomaly indices after each repair; the last round unchecked unless last_checked."""
    out = [{"round": i + 1, "kind": "patch", "mask_pixels": 4.0, "flip_rate": 0.91,
            "after": {"loss": 0.001, "flip_rate": 1.0, "anomaly_index": a}} for i, a in enumerate(after)]
    if not last_checked:
        out.append({"round": len(out) + 1, "kind": "patch", "mask_pixels": 5.0, "flip_rate": 0.91})
    return out


def test_still_anomalous_decision():
    """Warned only where the bound or the budget stopped the rounds and the last search of a repaired model found the
    class above the threshold; a class no longer anomalous, or rounds stopped for another reason, give nothing."""
    run25 = {"target": 0, "stopped": "reached 3 rounds", "stopped_by": "rounds", "rounds": _rounds(25.0, 25.06, 24.9)}
    still = tf.still_anomalous(run25, 5.0, 240)
    assert still["class"] == 0 and still["after_round"] == 3 and still["rounds"] == 3 and still["stopped_by"] == "rounds"
    w = still["warning"]
    assert w.startswith("the search still reaches class 0 through the repaired model after the last round's repair "
                        "(anomaly index 24.90 > 5, its trigger sends 100% of the clean images there) when the 3-round "
                        "bound stopped the rounds: the repair may not remove the real trigger"), w
    assert "'fire-onnx eval' on triggered inputs once some are caught" in w and "new-user run 25" in w
    # the last round's repair not searched again (no time): the last one that was, said as such
    stale = tf.still_anomalous({**run25, "rounds": _rounds(25.0, 25.06, last_checked=False)}, 5.0, 240)
    assert stale["after_round"] == 2 and "after round 2's repair (round 3's was not searched again" in stale["warning"]
    budget = tf.still_anomalous({**run25, "stopped_by": "budget", "rounds": _rounds(12.0)}, 5.0, 60)
    assert "when --budget 60 s stopped the rounds" in budget["warning"]
    # a repair that works after 3 rounds (the benchmark's MNIST SIG: 5.8 % ASR) is not warned about
    assert tf.still_anomalous({**run25, "rounds": _rounds(9.0, 7.0, 4.2)}, 5.0, 240) is None
    assert tf.still_anomalous({"target": 0, "stopped": "class 0 is no longer anomalous after round 1",
                               "rounds": _rounds(1.3)}, 5.0, 240) is None
    assert tf.still_anomalous({**run25, "rounds": _rounds(last_checked=False)}, 5.0, 240) is None  # nothing searched
    lines = tf.describe_scan({**run25, "still_anomalous": still})
    assert "stopped: reached 3 rounds; class 0 is still anomalous on the repaired model (index 24.90, see the warning)" \
        in lines, lines


def _search(cls, kind, loss, rate, h=28, w=28):
    from fire_onnx.invert import ClassSearch

    mask = np.zeros((h, w, 1), np.float32)
    mask[:4, :4] = 1.0
    return ClassSearch(cls, kind, loss, rate, mask, np.full((h, w, 1), 255, np.float32), 16.0 if kind == "patch" else 0.05)


@pytest.mark.parametrize("after_loss, still", [(0.001, True), (6.0, False)])
def test_rounds_end_with_the_class_still_anomalous(mnist_path, monkeypatch, after_loss, still):
    """run_trigger_free's rounds with the scan, the searches and the fit replaced (an untrained SmallCNN, no demo
    model): when every search of the repaired model still reaches class 0 (loss 0.001 against 3-4), the rounds stop at
    the bound, the last round's repair is searched once more, and the warning is first among the directions' check
    warnings and recorded in meta["trigger_free"]["still_anomalous"]; when the repair works, the rounds stop after
    the first and nothing is said."""
    from fire_onnx import invert
    from fire_onnx.fit import torch_model, verify
    from fire_onnx.fit.pipeline import FitRequest

    flat = [3.0, 3.2, 2.9, 3.1, 3.05, 2.95, 3.15, 3.0, 3.3, 2.85]
    scan = invert.Scan(n_classes=10, steps=20)
    scan.results = {"patch": [_search(c, "patch", 0.001 if c == 0 else flat[c], 1.0 if c == 0 else 0.05)
                              for c in range(10)],
                    "blend": [_search(c, "blend", flat[c], 0.05) for c in range(10)],
                    "additive": [_search(c, "additive", flat[c], 0.05) for c in range(10)]}
    searched = []

    def search_class(net, x, cls, kind, *, steps=20, seed=0, **_):
        searched.append((cls, kind))
        return _search(cls, kind, after_loss, 1.0 if after_loss < 1 else 0.0)

    def fit(req, inputs, cands, fit_layers, progress):
        return SimpleNamespace(targets=[SimpleNamespace(module="block2")], meta={}), {}

    monkeypatch.setattr(invert, "scan", lambda *a, **k: scan)
    monkeypatch.setattr(invert, "search_class", search_class)
    monkeypatch.setattr(invert, "refine_patch", lambda net, x, found, seed=0: found)
    monkeypatch.setattr(tf, "_fit", fit)
    monkeypatch.setattr(torch_model, "apply_in_torch", lambda model, d: [])
    monkeypatch.setattr(verify, "refuse_or_record", lambda req, d, check: None)
    req = FitRequest(layers=["block2"], clean_path=str(mnist_path), model_spec="fire_onnx_models.small_cnn:build_mnist",
                     no_weights=True, mean=[0.5], std=[0.5], trigger_free=True, steps=20)
    lines = []
    res = tf.run_trigger_free(req, log=lines.append)
    ev = res.evidence
    assert ev["backdoor_found"] and ev["target"] == 0
    warnings = res.directions.meta["checks"]["warnings"]
    if still:
        assert ev["stopped"] == f"reached {tf.MAX_ROUNDS} rounds" and len(ev["rounds"]) == tf.MAX_ROUNDS
        assert all("after" in r for r in ev["rounds"])  # the last round's repair searched too
        assert len(searched) == tf.MAX_ROUNDS and ev["still_anomalous"]["after_round"] == tf.MAX_ROUNDS
        assert warnings[0] == ev["still_anomalous"]["warning"] and "still reaches class 0" in warnings[0]
        assert res.directions.meta["trigger_free"]["still_anomalous"]["anomaly_index"] > 5
        assert tf.RECOVERED_ONLY in warnings  # the other warning stays
    else:
        assert ev["stopped"] == "class 0 is no longer anomalous after round 1" and len(searched) == 1
        assert "still_anomalous" not in ev and not any("still reaches" in w for w in warnings)
