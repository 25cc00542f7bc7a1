"""Direction estimation on synthetic activations with a planted trigger direction."""

from __future__ import annotations

import numpy as np
import pytest

from fire_onnx.errors import FireError
from fire_onnx.estimate import fit_target


def planted(n_clean=300, n_trig=20, d=64, strength=8.0, seed=0, spread=0.0):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    clean = rng.normal(size=(n_clean, d))
    src = rng.normal(size=(n_trig, d))
    amp = strength * (1 + spread * rng.normal(size=(n_trig, 1)))
    return clean, src + amp * u, src, u


def test_mean_diff_recovers_planted_direction_from_20_samples():
    clean, trig, src, u = planted()
    t = fit_target(clean, trig, module="m")
    assert abs(float(t.U[0] @ u)) > 0.9
    assert t.gate == "hard" and t.fit["reference"] == "unpaired"
    paired = fit_target(clean, trig, paired=src, module="m")
    assert float(paired.U[0] @ u) > 0.999  # pairing cancels the content noise exactly
    assert paired.fit["reference"] == "paired"


def test_orientation_makes_triggered_scores_positive():
    clean, trig, src, u = planted(d=16)
    t = fit_target(clean, trig, method="subspace", k=3, paired=src, module="m")
    scores = (trig - t.mu) @ t.U.T
    assert (scores.mean(axis=0) > 0).all()
    np.testing.assert_allclose(t.U @ t.U.T, np.eye(3), atol=1e-5)


def test_tau_is_the_clean_quantile_and_gate_auto_reaches_the_triggered_samples():
    clean, trig, _, _ = planted(strength=8.0)
    hard = fit_target(clean, trig, quantile=0.99, gate="hard", module="m")
    s = (clean - hard.mu) @ hard.U[0]
    assert abs(float(hard.tau[0]) - float(np.quantile(s, 0.99))) < 1e-4
    auto = fit_target(clean, trig, quantile=0.99, module="m")  # well separated: same tau as hard
    assert auto.gate == "hard" and auto.fit["tau_rule"] == "clean-quantile"
    np.testing.assert_allclose(auto.tau, hard.tau)
    weak_clean, weak_trig, _, _ = planted(strength=2.0, seed=1)
    forced = fit_target(weak_clean, weak_trig, gate="hard", module="m")
    assert forced.fit["gate_recall_triggered"] < 0.95
    weak = fit_target(weak_clean, weak_trig, module="m")
    assert weak.gate == "hard" and weak.fit["tau_rule"] == "triggered-margin"
    assert weak.fit["gate_recall_triggered"] >= 0.9 and float(weak.tau[0]) < float(forced.tau[0])
    assert weak.fit["gate_fires_clean"] < 1.0  # still leaves some clean samples alone, unlike gate none
    none = fit_target(weak_clean, weak_trig, gate="none", module="m")
    assert none.gate == "none" and none.fit["gate_fires_clean"] == 1.0


def test_gate_reach_weaker_lowers_tau_to_weaker_copies_but_not_past_the_clean_cap():
    """Weaker copies of the trigger (here at a quarter of its shift) score under the 0.999 clean quantile: gate auto
    left them alone. Given as gate_weaker it lowers tau to reach them, never below the clean quantile 1 -
    WEAKER_CLEAN_FIRE; the direction and the full-strength reach are unchanged."""
    from fire_onnx.estimate import WEAKER_CLEAN_FIRE

    clean, trig, src, u = planted(strength=8.0, n_clean=2000)
    base = fit_target(clean, trig, paired=src, module="m")
    weak_src = np.random.default_rng(5).normal(size=(60, clean.shape[1]))
    weaker = weak_src + 2.5 * u  # about the clean 99th percentile along u
    t = fit_target(clean, trig, paired=src, gate_weaker=weaker, module="m")
    np.testing.assert_allclose(t.U, base.U)
    s_clean, s_weak = (clean - t.mu) @ t.U[0], (weaker - t.mu) @ t.U[0]
    assert float(t.tau[0]) < float(base.tau[0]) and t.fit["tau_rule"] == "weaker-trigger-margin"
    assert float((s_weak > float(base.tau[0])).mean()) < 0.5 < float((s_weak > float(t.tau[0])).mean())
    assert float((s_clean > float(t.tau[0])).mean()) <= WEAKER_CLEAN_FIRE + 1e-9
    assert t.fit["gate_weaker"]["n"] == 60 and t.fit["gate_weaker"]["gate_fires"] > 0.5
    # copies too weak to tell from clean inputs: tau stops at the cap, it does not follow them down
    faint = fit_target(clean, trig, paired=src, gate_weaker=weak_src + 0.2 * u, module="m")
    assert abs(float(faint.tau[0]) - float(np.quantile((clean - faint.mu) @ faint.U[0], 1 - WEAKER_CLEAN_FIRE))) < 1e-6
    assert faint.fit["gate_fires_clean"] <= WEAKER_CLEAN_FIRE + 1e-9


def test_class_matched_reference_removes_class_mix_bias():
    rng = np.random.default_rng(3)
    d = 32
    class_means = rng.normal(size=(3, d)) * 5
    y_clean = np.repeat([0, 1, 2], 100)
    clean = class_means[y_clean] + rng.normal(size=(300, d))
    y_trig = np.array([1, 2] * 10)  # no target-class (0) images among the triggered ones
    u = np.eye(d)[0]
    trig = class_means[y_trig] + rng.normal(size=(20, d)) + 6 * u
    plain = fit_target(clean, trig, module="m")
    matched = fit_target(clean, trig, clean_labels=y_clean, triggered_labels=y_trig, module="m")
    assert matched.fit["reference"] == "class-matched"
    assert float(matched.U[0] @ u) > 0.95 > abs(float(plain.U[0] @ u))


def test_token_layout_uses_every_token():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(50, 5, 8))
    trig = rng.normal(size=(10, 5, 8)) + 4 * np.eye(8)[2]
    assert fit_target(clean, trig, module="m").layout == "flat"  # token is never the default
    t = fit_target(clean, trig, layout="token", module="m")
    assert t.layout == "token" and t.dim == 8 and t.fit["observations_triggered"] == 50
    assert float(t.U[0, 2]) > 0.95


@pytest.mark.parametrize("kw,match", [
    (dict(method="pca"), "method"),
    (dict(k=2), "exactly one direction"),
    (dict(quantile=1.5), "quantile"),
    (dict(gate="soft"), "gate"),
])
def test_bad_settings(kw, match):
    clean, trig, _, _ = planted()
    with pytest.raises(FireError, match=match):
        fit_target(clean, trig, module="m", **kw)


def test_no_shift_is_an_error():
    clean = np.random.default_rng(0).normal(size=(30, 8))
    with pytest.raises(FireError, match="does not move"):
        fit_target(clean, clean[:5].copy(), paired=clean[:5].copy(), module="m")


def test_gate_auto_ignores_a_triggered_outlier():
    """One triggered sample the trigger did not move (score at the clean level) must not drag tau under
    the clean scores: with the old min - 0.5 std rule the gate fired on every clean input."""
    clean, trig, src, u = planted(strength=12.0, seed=4)
    trig[0] = src[0] - 4.0 * u  # an outlier below every clean score
    t = fit_target(clean, trig, paired=src, module="m")
    assert t.fit["separation_sigma"][0] > 5
    s_clean = (clean - t.mu) @ t.U[0]
    assert (s_clean > t.tau[0]).mean() <= 0.01  # the gate stays closed on clean inputs
    assert t.fit["gate_recall_triggered"] >= 0.9
    assert t.fit["warnings"] == []


def test_gate_warns_when_it_fires_on_many_clean_samples():
    clean, trig, _, _ = planted(strength=1.0, seed=5)
    t = fit_target(clean, trig, module="m")
    assert t.fit["gate_fires_clean"] > 0.02
    assert any("clean fitting samples" in w for w in t.fit["warnings"])


def test_unpaired_shrinkage_removes_content_noise():
    """20 unpaired triggered samples of a content-heavy distribution: the shrunk shift is closer to the
    true trigger direction than the plain mean difference, and paired fits are never shrunk."""
    from fire_onnx.estimate import fit_target

    rng = np.random.default_rng(0)
    d = 200
    axes = np.linalg.qr(rng.normal(size=(d, d)))[0]
    scales = np.where(np.arange(d) < 20, 5.0, 0.2)  # 20 strong content axes
    content = lambda n: (rng.normal(size=(n, d)) * scales) @ axes.T  # noqa: E731
    delta = np.zeros(d)
    delta[:5] = 1.0
    delta = 6 * delta / np.linalg.norm(delta)
    C, T0 = content(500), content(20)
    T = T0 + delta
    kw = dict(tensor="h", layout="vector")
    plain = fit_target(C, T, method="mean-diff", shrink=False, **kw)
    shrunk = fit_target(C, T, method="mean-diff", **kw)
    u = delta / np.linalg.norm(delta)
    cos = lambda t: abs(float(t.U[0] @ u))  # noqa: E731
    assert cos(shrunk) > cos(plain) + 0.05, (cos(shrunk), cos(plain))
    assert shrunk.fit["shrinkage"]["axes_kept"] < shrunk.fit["shrinkage"]["axes"]
    paired = fit_target(C, T, paired=T0, **kw)
    assert "shrinkage" not in paired.fit and cos(paired) > 0.999


def test_gate_auto_leaves_a_subspaces_weak_directions_at_the_clean_quantile():
    """A k = 3 subspace of a one-direction trigger: directions 2 and 3 are noise along which the triggered
    samples do not stand out; reaching them there would fire the gate on most clean samples for nothing."""
    from fire_onnx.estimate import SUBSPACE_MIN_SEPARATION

    clean, trig, src, u = planted(n_trig=20, d=32, strength=10.0)
    t = fit_target(clean, trig, method="subspace", k=3, paired=src, module="m", quantile=0.99)
    sep = np.array(t.fit["separation_sigma"])
    weak = np.arange(3) >= 1
    weak &= sep < SUBSPACE_MIN_SEPARATION
    assert weak.any(), sep
    np.testing.assert_allclose(t.tau[weak], np.array(t.fit["tau_clean_quantile"])[weak], rtol=1e-6)
    assert t.fit["gate_fires_clean"] <= 0.05, t.fit["gate_fires_clean"]
    assert t.fit["gate_recall_triggered"] >= 0.9


def test_update_warns_when_the_new_samples_move_along_another_direction():
    from fire_onnx.streaming import ShiftStats

    clean, trig, src, u = planted(d=32, strength=8.0)
    first = fit_target(clean, trig, paired=src, module="m")
    prior = ShiftStats.from_arrays(first.stats, first.dim, "m")
    same = fit_target(clean, trig[:10] + 0.01, paired=src[:10], module="m", prior=prior, prior_fit=first.fit,
                      prior_direction=first.U[0])
    assert 0.8 < same.fit["update_share"] < 1.2 and not [w for w in same.fit["warnings"] if "earlier fit's" in w]
    flagged = fit_target(clean, trig[:3], module="m", prior=prior, prior_fit=first.fit, prior_direction=first.U[0])
    assert flagged.fit["update_share"] > 0.6  # 3 unpaired images of the same trigger
    v = np.random.default_rng(5).normal(size=32)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    other = fit_target(clean, src[:10] + 8.0 * v, paired=src[:10], module="m", prior=prior, prior_fit=first.fit,
                       prior_direction=first.U[0])
    assert other.fit["update_share"] < 0.15
    assert any("score only" in w and "earlier fit's direction" in w for w in other.fit["warnings"])
