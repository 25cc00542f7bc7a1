"""Judge a fitted repair on images the fit did not use, before it is written.

``fit --layer auto`` chooses among candidates by what each repair does on held-out images; a repair at a
given ``--layer`` was written on the strength of its fitting statistics alone (separation, where the
gate fires), which can look excellent while the repair does nothing useful or harms. Seen on models no
one here trained: a blended backdoor repaired at a layer with 24.8 sigma separation still left 51 %
ASR; 20 clean images given as "flagged" wrote a repair that left ASR at 98 % and cost 8.4 points of
clean accuracy; a "confirmed" reconstruction on a clean model cost 9 points.

So the repaired model is run beside the original (in onnxruntime when an ONNX model is at hand, else in
PyTorch with the repair as forward hooks) on

- **held-out clean images**: pool images the fit did not use (up to ``N_CHECK``). The share whose
  predicted class the repair changes needs no labels: a repair meant to act only on triggered inputs
  should change almost none. Above ``CHANGE_WARN`` fit warns; above ``CHANGE_REFUSE`` (with at least
  ``MIN_REFUSE_CLEAN`` images, so a handful of flips cannot decide it) it refuses to write the repair
  unless ``--force`` (an ungated repair, ``--gate none``, moves every input by design: warning only);
- **triggered images**: with ``--trigger``, held-out pool images stamped with it (never the target
  class when labels are known); with a triggered file, its images beyond those fitted on, or else the
  fitted ones themselves (in-sample, and said so). The share sent to the target class (``--target``,
  or the class the original model gives most of them) before and after: when the repair leaves more
  than ``WEAK`` of them there and more than half of what the original model did, fit warns that this
  layer does not remove the trigger, and when even the lower confidence bound of that share is above
  ``WEAK`` (not in-sample), it refuses to write the repair unless ``--force``.

In-sample, a repair always looks perfect: gate auto sets its threshold to reach every image it was fitted
on. Measured: 5 flagged Fashion-MNIST Blended images, checked on themselves, went 100 % -> 0 % at the
target while the repair left 81 % ASR on the test split, and fit printed no warning. So when the triggered
file has no images beyond those fitted on, the check is **cross-fitted**: the triggered samples are split
into ``CROSS_FOLDS`` folds, each fold is held out of a fit on the others (the same fit: reconstruction,
options, ``--update`` statistics), and the repair of the others is run on it. The target rate over all
folds is what a repair from slightly fewer images does to flagged images it has not seen; that rate,
not the in-sample one, decides the warning. It costs ``CROSS_FOLDS`` more fits.

The outcome goes to ``meta["check"]`` and the fit output.
"""

from __future__ import annotations

import math

import numpy as np

from fire_onnx import directions as dirs
from fire_onnx.data import Images, pool_order
from fire_onnx.errors import FireError

N_CHECK = 500  # held-out clean (and stamped) images the check runs at most
CHANGE_WARN = 0.02  # warn when the repair changes more than this share of held-out clean predictions
CHANGE_REFUSE = 0.05  # ... and refuse to write it (without --force) above this share
MIN_REFUSE_CLEAN = 200  # refuse only on at least this many held-out clean images
MIXED_REFUSE = 0.25  # refuse a flagged fit when at least this share of the flagged images agree on a second class
NO_BACKDOOR = 0.2  # refuse when the original model sends fewer held-out triggered images than this to --target
WEAK = 0.5  # warn when the repair leaves more than this share of the triggered images at the target
FLOOR_MARGIN = 0.01  # a rate within this (plus two standard errors) of the target floor is the model's own errors
PARTIAL = 0.1  # ... and, in other words, above this share (the repair removes the trigger only partly)
MIN_TRIGGERED = 10  # held-out triggered images a file must have beyond the fitted ones to use them
CROSS_FOLDS = 5  # in-sample: hold out each of this many folds of the triggered samples from a fit on the rest
MIN_CROSS = 4  # ... with at least this many triggered samples (each fold fits on at least three)
CLEAN_BOUND_SHOWN = 0.01  # the held-out clean change's upper bound is printed when above this
FLOOR_SHOWN = 0.01  # the original model's own rate of clean non-target images at the target is printed from here
BOUND_LEVEL = 0.95  # the cross-fitted rate's one-sided upper confidence bound (printed when it exceeds PARTIAL)
SMALL_CROSS = 10  # below this many, the warning says the folds' fits are weaker than the written one (5 images:
# a fit on 4 left 60 % of the MNIST centre patch images at the target where the repair from all 5 left 3.6 % ASR)


def _held_indices(req, inputs) -> tuple[np.ndarray, np.ndarray]:
    """(held-out clean indices, held-out indices to stamp) into the pool: the seeded order fit_samples
    uses, past the clean samples and (with --trigger) past the images it stamped."""
    _, rest, stampable = pool_order(inputs.pool, n_clean=req.n_clean, seed=req.seed, target=req.target)
    if inputs.trigger is None:
        return rest[:N_CHECK], rest[:0]
    unused = rest[~np.isin(rest, stampable[:req.n_triggered])]
    return unused[:N_CHECK], stampable[req.n_triggered:][:N_CHECK]


def verify(req, inputs, d: dirs.Directions, triggered: Images, clean: Images, source: Images | None,
           refit=None, progress=None, seek_suspects: bool = False) -> dict:
    """:func:`_verify`, and on every path (a check skipped for want of held-out clean images too) the refusal of a
    flagged file whose images go to two classes (:func:`_mixed`)."""
    out = _verify(req, inputs, d, triggered, clean, source, refit, progress, seek_suspects)
    mixed = _mixed(req, inputs, d, source)
    if mixed and not out.get("refuse"):
        out.update(mixed)
    return out


def _mixed(req, inputs, d: dirs.Directions, source: Images | None) -> dict:
    """{"refuse", "refuse_mixed"} when the flagged images fitted on go to two classes, else {}."""
    out = {}
    checks = d.meta.get("checks") or {}
    n_fit = checks.get("second_of", 0)
    if (inputs.trigger is None and source is None and checks.get("second_class") is not None
            and checks.get("second_count", 0) >= MIXED_REFUSE * n_fit):
        # two groups of flagged images at two classes: a repair fitted on all of them is fitted for neither (new-user
        # run 23: 10 images of a patch backdoor to class 0 and 10 of a blend to class 3 in one file; written with exit
        # 0, the repair left 65 % and 86 % ASR, and the cross-fitted rate, diluted by the class-3 images, read 30 %)
        cls = req.target if req.target is not None else checks.get("triggered_top_class")
        out["refuse"] = (f"the flagged images go to two classes: {checks['second_count']} of the {n_fit} fitted on to "
                         f"class {checks['second_class']}, the others mostly to class {cls}; one repair fitted on both "
                         "groups is fitted for neither backdoor")
        out["refuse_mixed"] = {"class": cls, "second_class": checks["second_class"]}
    return out


def _verify(req, inputs, d: dirs.Directions, triggered: Images, clean: Images, source: Images | None,
            refit=None, progress=None, seek_suspects: bool = False) -> dict:
    """Run the repaired model beside the original on held-out images (module docstring); the record
    for ``meta["check"]``, with ``warnings`` and, when the repair must not be written, ``refuse``.
    ``clean`` and ``source`` (the clean samples and the triggered samples' twins the fit used) let an
    in-sample check be cross-fitted; ``refit(triggered, source)`` fits a fold's repair the way ``d`` was
    fitted (default: :func:`fire_onnx.fit.pipeline.fit_layers` at ``req.layers``; a chain of layers refits
    its chain)."""
    from fire_onnx.fit.auto import HeldOut, TorchHeldOut
    from fire_onnx.fit.core import TRIGGER_REACH_WARN

    if inputs.onnx_model is None and inputs.model is None:
        return {"skipped": "no model to run the repair in"}
    clean_idx, stamp_idx = _held_indices(req, inputs)
    if len(clean_idx) == 0:
        why = (f"no clean images left over for a held-out check (--n-clean {req.n_clean} takes all "
               f"{len(inputs.pool)} of the clean file)" if req.n_clean >= len(inputs.pool) else
               f"no clean images left over for a held-out check (the clean file has {len(inputs.pool)}; "
               f"--n-clean takes {req.n_clean})")
        return {"skipped": why, "warnings": [f"the repair is written unchecked: {why}; give a clean file with more "
                                             "images than --n-clean (or a smaller --n-clean), so fit can judge it on "
                                             "images it did not fit on"]}
    held_clean = inputs.pool.subset(clean_idx)
    in_sample = False
    if inputs.trigger is not None:
        src = inputs.pool.subset(stamp_idx)
        held_trig = Images(inputs.trigger.apply(src.x), src.y)
        trig_from = f"{len(held_trig)} held-out images stamped with {getattr(inputs.trigger, 'name', 'the trigger')}"
    else:
        extra = _unfitted(req, inputs.triggered, triggered) if inputs.triggered is not None else np.zeros((0,))
        if len(extra) >= MIN_TRIGGERED:
            held_trig = Images(extra[:N_CHECK])
            trig_from = f"{len(held_trig)} triggered images of the file not fitted on"
        else:
            held_trig, in_sample = Images(triggered.x), True
            # the file's few other images are too few to judge on (new-user run 20 read "no others" beside "fitting on
            # 20 of the 22 images ... the others check the repair")
            others = (f"its {len(extra)} other image{'s are' if len(extra) > 1 else ' is'} too few to judge on, at "
                      f"least {MIN_TRIGGERED}" if len(extra) else "the file has no others")
            trig_from = f"the {len(held_trig)} triggered images fitted on (in-sample: {others})"
    try:
        if inputs.onnx_model is not None:
            held = HeldOut(inputs.onnx_model, inputs.preprocess, held_clean, held_trig, batch_size=req.batch_size)
        else:  # fitted from the PyTorch model alone: the repair runs as forward hooks
            held = TorchHeldOut(inputs.model, inputs.preprocess, held_clean, held_trig, batch_size=req.batch_size)
    except FireError as e:  # not a classifier (no (N, classes) first output): nothing to count predictions on
        out = {"skipped": f"the model's predictions cannot be compared ({e})"}
        if inputs.trigger is None and source is None:
            # flagged images without twins: no reconstruction can be confirmed either, so the repair is an unpaired
            # estimate nothing has checked (new-user run 21: a single-logit model, 100 % -> 61 % ASR, "wrote")
            out.update(refuse="the repair of flagged images cannot be checked on this model: its first output is not "
                              "class scores, so neither the trigger reconstruction nor the held-out check can run",
                       refuse_unchecked=True)
        return out
    target = req.target
    if target is None and held.base_trig is not None and len(held.base_trig):
        target = int(np.bincount(held.base_trig).argmax())
    pc, pt = held.outputs(d)
    rate, change, *_ = held.rates(pc, pt, -1 if target is None else target)
    before = float((held.base_trig == target).mean()) if target is not None and len(held_trig) else None
    floor = None  # held-out clean images of other classes the original model already puts at the target
    if target is not None and held_clean.y is not None and held.base_clean is not None:
        other = np.asarray(held_clean.y) != target
        if other.any():
            floor = float((held.base_clean.argmax(axis=1)[other] == target).mean())
    out = {"n_clean": int(len(held_clean)), "clean_change": change, "n_triggered": int(len(held_trig)),
           "triggered_from": trig_from, "in_sample": in_sample, "target": target, "target_floor": floor,
           "target_rate_before": before, "target_rate_after": rate if target is not None else None,
           "thresholds": {"change_warn": CHANGE_WARN, "change_refuse": CHANGE_REFUSE, "weak": WEAK, "partial": PARTIAL}}
    crossed = False
    if in_sample and target is not None:
        cross = cross_fit(req, inputs, held, clean, triggered, source, target, refit=refit, progress=progress)
        out["cross_fit"] = cross
        if "target_rate_after" in cross:
            crossed, in_rate, rate = True, rate, cross["target_rate_after"]
            trig_from = (f"the {len(held_trig)} triggered images when each is held out of the fit ({cross['folds']}-fold "
                         f"cross-fit; {in_rate:.0%} on the images fitted on; on unseen triggered inputs up to "
                         f"{cross['upper_bound']:.0%} at {BOUND_LEVEL:.0%} confidence"
                         + ("; from so few, each fit left out a fifth of them and is weaker than the one written"
                            if len(held_trig) < SMALL_CROSS else "") + ")")
    warnings = []
    if change > CHANGE_WARN and target is not None:
        out.update(_changed_from_target(held, d, held_clean, target, after=pc.argmax(axis=1)))
        if poisoned_clean_hint(out) and not req.trigger_free:
            out["_suspects"] = sus = _pool_suspects(req, inputs, held, d, target)
            if "genuine" in sus:
                out["genuine_target"] = sus["genuine"]
            elif sus["applies"] and len(sus["suspects"]) and sus.get("carried_share") is not None:
                out["poison_evidence"] = {"n": int(len(sus["suspects"])), "carried_share": sus["carried_share"]}
    elif seek_suspects and target is not None:  # the pool is known to hold some: look again after each refit
        out["_suspects"] = _pool_suspects(req, inputs, held, d, target)
    if inputs.trigger is not None and target is not None and before is not None and before >= WEAKER_FOOLS:
        weak = _weaker_check(held, d, src.x, held_trig.x, target, inputs.preprocess)  # src: their twins (above)
        out["weaker_trigger"] = weak
        if weak.get("bypass"):
            w = weak["bypass"]
            reach = getattr(req, "gate_reach", "trigger")
            warnings.append(
                f"a weaker copy of the trigger (at {w['strength']:.0%} of its strength, x + {w['strength']:g} (stamped - "
                f"x)) sends {w['before']:.0%} of {weak['n']} held-out images to class {target} on the original model "
                f"and {w['after']:.0%} after the repair: the gate's threshold sits above such inputs' scores, so a "
                "fainter trigger passes it; "
                + ("fit with --gate-reach weaker (the gate then reaches the weaker copies the model obeys, firing on "
                   "at most 2% of clean inputs)" if reach != "weaker" else
                   "--gate-reach weaker reached what it could within 2% of the clean inputs")
                + ", or --gate none (the repair acts on every input); check with 'fire-onnx eval --trigger' at lower "
                  "strengths (a blend's alpha, a patch's value)")
    if change > CHANGE_WARN:
        warnings.append(f"the repair changes the predicted class of {change:.1%} of {len(held_clean)} held-out clean "
                        "images (a repair that acts on triggered inputs only changes almost none): "
                        + (poisoned_clean_hint(out, _other_layers(req))
                           or "it will cost clean accuracy; check the triggered images, --target and the layer"
                           + ("" if req.auto else " (--layer auto judges every candidate on held-out images)")))
    n_changed = int(round(change * len(held_clean)))
    # few held-out images decide only when even the lower confidence bound is over the level (17 of 18
    # changed: a trigger-free repair that cost 7.6 pt CA was written because 18 < MIN_REFUSE_CLEAN)
    if (change > CHANGE_REFUSE and req.gate != "none"
            and (len(held_clean) >= MIN_REFUSE_CLEAN or lower_bound(n_changed, len(held_clean)) > CHANGE_REFUSE)):
        out["refuse"] = (f"the repair changes the predicted class of {change:.1%} of {len(held_clean)} held-out clean "
                         f"images (more than {CHANGE_REFUSE:.0%})"
                         + (f" while leaving {rate:.0%} of the triggered images at class {target}"
                            if target is not None and before is not None else ""))
        out["refuse_clean"] = True
    more = ("more triggered images (fit --update adds them), the trigger itself (--trigger) or their clean twins "
            "(x_clean)" if crossed else "more triggered images")
    mc = d.meta.get("checks", {})
    reach = mc.get("triggered_to_target", mc.get("triggered_top_share"))
    if reach is not None and reach < TRIGGER_REACH_WARN:  # the images themselves are in doubt, not their number
        where = f"class {target}" if "triggered_to_target" in mc else "their most common class"
        more = (f"first check that these images carry the trigger (the original model sends only {reach:.0%} of them "
                f"to {where}; a backdoor sends its triggered inputs to its target)")
    carriers = _carriers(inputs)
    if carriers:
        out["clean_carry_trigger"] = carriers
        more = (f"{carriers['n']} images of the clean file already carry the trigger (stamping leaves them as they are; "
                f"{carriers['by_class']}): where the trigger occurs in clean images, the repair cannot tell them from "
                f"triggered inputs; if they are genuine, leave them out of --clean; {more}")
    if req.alpha < 1:  # a partial repair by the user's choice: say so before suggesting other layers
        more = (f"--alpha {req.alpha:g} removes only that share of the shift along the direction (--alpha 1 removes "
                f"all of it); {more}")
    n_trig = len(held_trig)
    # at the model's own floor: no repair can go below the share of clean images the model already puts at the target
    # (new-user run 21: a binary model's "leaves 11 % ... removes the trigger only partly" beside a floor of 11.4 %)
    at_floor = (floor is not None and n_trig > 0
                and rate <= floor + FLOOR_MARGIN + 2 * np.sqrt(max(floor * (1 - floor), 1e-4) / n_trig))
    out["at_floor"] = bool(at_floor)
    if at_floor:
        pass
    elif before is not None and rate > WEAK and rate > 0.5 * before:
        warnings.append(f"the repair leaves {rate:.0%} of {trig_from} at class {target} (original model: {before:.0%}): "
                        + ("it does not carry over to triggered inputs it was not fitted on; give "
                           f"{more}, or {_other_layers(req)}" if crossed else
                           (f"this layer does not remove the trigger; try {_other_layers(req)}"
                            + (" or --method subspace" if not req.update_path else "")
                            if req.alpha >= 1 else
                            f"--alpha {req.alpha:g} removes only that share of the shift along the direction (--alpha 1 "
                            "removes all of it)")))
    elif before is not None and rate > PARTIAL and rate > 0.1 * before:
        warnings.append(f"the repair leaves {rate:.0%} of {trig_from} at class {target} (original model: {before:.0%}): "
                        + ("it removes nothing there" if rate >= before else "it removes the trigger only partly")
                        + f"; {more}, or {_other_layers(req)}, may do better")
    if (before is not None and "refuse" not in out and not at_floor and (crossed or not in_sample) and rate > 0.5 * before
            and lower_bound(int(round(rate * n_trig)), n_trig) > WEAK):
        # confidently more than half of the held-out triggered images stay at the target: written with exit 0,
        # such a repair (a sample-specific trigger: 94-100 % left, 92-97 % ASR measured) was deployable by
        # any script that checks exit codes (new-user run 6)
        out["refuse"] = (f"the repair leaves {rate:.0%} of {trig_from} at class {target} (original model: "
                         f"{before:.0%}): it does not remove the backdoor"
                         + (f" (--alpha {req.alpha:g} removes only that share of the shift)" if req.alpha < 1 else ""))
    source = _source_classes(held_trig, held.base_trig, target) if before is not None and before < NO_BACKDOOR else None
    if source:  # a backdoor that works from some source classes only: the pooled rate hides it (new-user run 13)
        out["source_classes"] = source
        shown = ", ".join(f"class {c} {r:.0%} of {n}" for c, r, n in source[:4])
        warnings.append(f"the original model sends {before:.0%} of {trig_from} to class {target}, but most of some "
                        f"source classes' ({shown}): a backdoor that works from those classes only. Judge the repair on "
                        f"them ('fire-onnx eval' lists the ASR per source class; --fail-asr checks the worst one); "
                        "fitted on triggered images of those classes alone (--triggered) its direction is sharper")
    if (before is not None and req.target is not None and "refuse" not in out and n_trig >= MIN_TRIGGERED
            and before < NO_BACKDOOR and not source):
        # nothing to remove: the original model does not send these triggered images to the target (new-user run
        # 14: read with the wrong --scale, every image went to one class, 0 % -> 0 %, and the repair was written)
        out["refuse"] = (f"the original model sends only {before:.0%} of {trig_from} to class {target}: with these "
                         "triggered images and this preprocessing it shows no backdoor, so the repair has nothing to "
                         "remove")
        out["refuse_no_backdoor"] = True
        few = _few_source_classes(held_trig, held.base_trig, target)
        if few:
            out["few_source"] = few
    if in_sample and not crossed and target is not None:  # judged only on the images it was fitted on
        warnings.append(f"the repair is checked only on the {len(held_trig)} triggered image(s) it was fitted on, too "
                        f"few to hold some out (at least {MIN_CROSS}): nothing shows it carries over to other triggered "
                        f"inputs (one flagged image fitted this way left 97 % ASR); give more flagged inputs (20 "
                        "recommended; fit --update adds them later)")
    out["warnings"] = warnings
    return out


# weaker copies of a known trigger (x + t (stamped - x)) the held-out check also runs, on this many images at most
WEAKER_CHECK = (0.5, 0.6, 0.7, 0.8)
WEAKER_CHECK_N = 200
WEAKER_FOOLS = 0.5  # a strength whose copies the original model sends to the target at least this often ...
# ... and the repaired model at more than PARTIAL and more than this share of that: the gate lets them through
WEAKER_LEFT = 0.5


def _weaker_check(held, d: dirs.Directions, src_x: np.ndarray, trig_x: np.ndarray, target: int, pre) -> dict:
    """The original and repaired models' target rates on held-out images stamped with the trigger at the weaker
    strengths ``WEAKER_CHECK`` (``fire_onnx.fit.core.weaker_copies``). New-user run 26: a BadNets patch at 60 % of
    its strength fooled the original model on 55 % of the images and the repaired one on 55 %, the gate firing on
    2 % of them, while fit's check of the full-strength trigger read 99 % -> 3 %. ``bypass``: the strength the repair
    leaves most of (see WEAKER_FOOLS, WEAKER_LEFT), absent when none."""
    from fire_onnx.fit.core import weaker_copies

    n = min(len(src_x), len(trig_x), WEAKER_CHECK_N)
    if n == 0:
        return {"n": 0, "rows": []}
    x = pre(weaker_copies(src_x[:n], trig_x[:n], WEAKER_CHECK))
    before = held.runner(None)(x).argmax(axis=1) == target
    after = held.runner(d)(x).argmax(axis=1) == target
    rows = [{"strength": t, "before": float(before[i * n:(i + 1) * n].mean()),
             "after": float(after[i * n:(i + 1) * n].mean())} for i, t in enumerate(WEAKER_CHECK)]
    out = {"n": int(n), "rows": rows}
    left = [r for r in rows if r["before"] >= WEAKER_FOOLS and r["after"] > max(PARTIAL, WEAKER_LEFT * r["before"])]
    if left:
        out["bypass"] = max(left, key=lambda r: r["after"])
    return out


def cross_fit(req, inputs, held, clean: Images, triggered: Images, source: Images | None, target: int,
              refit=None, progress=None) -> dict:
    """Hold each of ``CROSS_FOLDS`` folds of the triggered samples out of a fit on the others and run that
    repair on it (``held``: a HeldOut whose triggered images are ``triggered``, in order). The record for
    ``check["cross_fit"]``: the share of held-out triggered images left at ``target``, per fold too."""
    from fire_onnx.fit.pipeline import fit_layers

    n = len(triggered)
    if n < MIN_CROSS:
        return {"skipped": f"{n} triggered images: too few to hold some out (at least {MIN_CROSS})"}
    folds = min(CROSS_FOLDS, n)
    order = np.random.default_rng(req.seed + 7).permutation(n)
    at_target = np.zeros(n, bool)
    per_fold = []
    for f in range(folds):
        out_idx = np.sort(order[f::folds])
        keep = np.setdiff1d(np.arange(n), out_idx)
        try:
            src = None if source is None else source.subset(keep)
            d = (refit(triggered.subset(keep), src) if refit is not None
                 else fit_layers(req, inputs, list(req.layers), clean, triggered.subset(keep), src,
                                 progress=progress))  # five more activation passes: visible on big models
        except FireError as e:
            return {"skipped": f"a fit on {len(keep)} of the {n} triggered images failed: {e}"}
        at_target[out_idx] = held.triggered_at(d, target, out_idx)
        per_fold.append(round(float(at_target[out_idx].mean()), 4))
    k = int(at_target.sum())
    return {"folds": folds, "n": n, "target_rate_after": float(at_target.mean()), "per_fold": per_fold,
            "upper_bound": round(upper_bound(k, n), 4)}


def lower_bound(k: int, n: int, level: float = BOUND_LEVEL) -> float:
    """One-sided Clopper-Pearson lower confidence bound on a rate seen as ``k`` of ``n``."""
    return 0.0 if k <= 0 or n <= 0 else 1.0 - upper_bound(n - k, n, level)


def upper_bound(k: int, n: int, level: float = BOUND_LEVEL) -> float:
    """One-sided Clopper-Pearson upper confidence bound on a rate seen as ``k`` of ``n``: the largest rate
    under which seeing ``k`` or fewer still has probability ``1 - level``. 0 of 5 held-out flagged images at
    the target bounds the rate only below 45 %; 0 of 20, below 14 %."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0

    def cdf(p: float) -> float:  # P(X <= k) for X ~ Binomial(n, p), decreasing in p
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))

    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - level else (lo, mid)
    return hi


def _class_reach(held_trig: Images, base: np.ndarray | None, target: int) -> list[tuple[int, int, int]]:
    """(class, images at ``target``, images) per source class of the labelled held-out triggered images (the
    original model's classes ``base``); empty without labels."""
    if held_trig.y is None or base is None or not len(base):
        return []
    y = np.asarray(held_trig.y)
    return [(int(c), int((base[y == c] == target).sum()), int((y == c).sum())) for c in np.unique(y[y != target])]


def _source_classes(held_trig: Images, base: np.ndarray | None, target: int) -> list[tuple[int, float, int]]:
    """(class, share at the target, images) of the labelled held-out triggered images' source classes that the
    original model sends to ``target`` for the most part (at least WEAK of MIN_TRIGGERED images or more), highest
    first; empty without labels."""
    out = [(c, k / n, n) for c, k, n in _class_reach(held_trig, base, target) if n >= MIN_TRIGGERED and k / n >= WEAK]
    return sorted(out, key=lambda t: -t[1])


def _few_source_classes(held_trig: Images, base: np.ndarray | None, target: int) -> list[tuple[int, int, int]]:
    """(class, images at the target, images) of source classes with too few held-out triggered images for
    :func:`_source_classes` (2 to MIN_TRIGGERED - 1) that the original model sends to ``target`` for the most part:
    a GTSRB backdoor from six 10-image classes showed 6 % pooled and was refused as no backdoor (new-user run 20)."""
    out = [(c, k, n) for c, k, n in _class_reach(held_trig, base, target)
           if 2 <= n < MIN_TRIGGERED and k >= max(2, WEAK * n)]
    return sorted(out, key=lambda t: (-t[1] / t[2], -t[2]))


MIN_CARRIERS = 3  # clean images that already carry the --trigger, from which the check names them


def _carriers(inputs) -> dict | None:
    """Clean pool images that stamping with --trigger leaves as they are (they carry it already), with their
    classes: a trigger that occurs naturally in clean images (new-user run 13: 30 clean class-0 images carried the
    patch, and the refusal blamed the layer), or a poisoned pool. None below MIN_CARRIERS or without --trigger."""
    if inputs.trigger is None:
        return None
    x = inputs.pool.x
    same = (inputs.trigger.apply(x) == x).reshape(len(x), -1).all(axis=1)
    if same.sum() < MIN_CARRIERS:
        return None
    if inputs.pool.y is None:
        return {"n": int(same.sum()), "by_class": "no labels"}
    cls, k = np.unique(np.asarray(inputs.pool.y)[same], return_counts=True)
    top = sorted(zip(k.tolist(), cls.tolist()), reverse=True)[:3]
    return {"n": int(same.sum()), "by_class": ", ".join(f"{n} labelled {c}" for n, c in top)}


def _unfitted(req, all_triggered: Images, fitted: Images) -> np.ndarray:
    """The triggered file's images the fit did not use: ``fit_samples`` takes the first ``n`` outside the
    target class (a file stamped over a whole test split has target-class images too; they used to make the
    check fall back to in-sample), so the rest outside the target class; none when the fitted images are
    not that selection."""
    from fire_onnx.data import triggered_order

    keep = triggered_order(all_triggered, req.target)
    n = len(fitted)
    if n > len(keep) or not np.array_equal(all_triggered.x[keep[:n]], fitted.x):
        return np.zeros((0,) + all_triggered.x.shape[1:], all_triggered.x.dtype)
    return all_triggered.x[keep[n:]]


def describe(check: dict) -> str:
    """One line for the fit output."""
    if "skipped" in check:
        return f"held-out check: skipped ({check['skipped']})"
    line = (f"held-out check: the repair changes {check['clean_change']:.1%} of {check['n_clean']} clean predictions")
    n_clean = int(check.get("n_clean") or 0)
    if n_clean and (bound := upper_bound(round(check["clean_change"] * n_clean), n_clean)) > CLEAN_BOUND_SHOWN:
        # a ViT repair read 1.0 % of 100 held out and changed 4.0 % of 500 new images
        line += f" (from {n_clean} images: below {bound:.1%} at {BOUND_LEVEL:.0%} confidence)"
    if check.get("target") is not None and check.get("target_rate_before") is not None:
        line += (f"; {check['triggered_from']}: {check['target_rate_before']:.0%} -> "
                 f"{check['target_rate_after']:.0%} at class {check['target']}")
        floor = check.get("target_floor")
        if floor is not None and floor >= FLOOR_SHOWN:  # what no repair goes below (new-user run 10 read 2 % here
            # and measured 4.8 % on test images the model itself puts at the target 4.4 % of the time)
            line += (f" (the model's floor: {floor:.1%} of the held-out clean images of other classes already go to "
                     f"class {check['target']}" + ("; the repair is at it" if check.get("at_floor") else "") + ")")
        cross = check.get("cross_fit", {})
        if "target_rate_after" in cross:
            line += (f"; each held out of a fit on the others ({cross['folds']} folds): "
                     f"{cross['target_rate_after']:.0%}")
            bound = cross.get("upper_bound")
            if bound is not None and bound > PARTIAL:
                # "below 100 %" said nothing (new-user run 25)
                line += (f" (from {cross['n']} images: on unseen triggered inputs the rate may be as high as "
                         f"{bound:.0%}, at {BOUND_LEVEL:.0%} confidence)")
        elif "skipped" in cross:
            line += f" (not cross-fitted: {cross['skipped']})"
    rows = (check.get("weaker_trigger") or {}).get("rows") or []
    if rows:  # what was checked beyond the trigger itself (new-user run 26 asked what the check covers)
        strengths, before, after = ("/".join(f"{100 * r[k]:.0f}" for r in rows) for k in ("strength", "before", "after"))
        line += f"; the trigger at {strengths} % strength: {before} % -> {after} %"
    return line


POISONED_SHARE = 0.5  # changed clean predictions mostly away from the target: the clean file looks poisoned


def _changed_from_target(held, d: dirs.Directions, held_clean: Images, target: int,
                         after: np.ndarray | None = None) -> dict:
    """Of the held-out clean predictions the repair changes, how many were at ``target`` before (and, with
    labels, now match them): a clean file drawn from a poisoned training set holds triggered images, and the
    repair moving those away from the target is it working, not a cost (new-user run 12: such a file was refused
    as 'it will cost clean accuracy', and the repair forced through cost none). ``after``: the patched model's
    predictions on them, when already computed."""
    base = held.base_clean.argmax(axis=1)
    if after is None:
        after = held.runner(d)(held.x_clean).argmax(axis=1)
    changed = after != base
    rec = {"changed": int(changed.sum()), "changed_from_target": int((base[changed] == target).sum())}
    if held_clean.y is not None:
        y = np.asarray(held_clean.y)[changed]
        rec["changed_to_label"] = int((after[changed] == y).sum())
        rec["changed_labelled_target"] = int((y == target).sum())
    return rec


SUSPECT_WINDOW = 2  # the poisoned-looking clean images are sought among this many times the images fit draws


def _pool_suspects(req, inputs, held, d: dirs.Directions, target: int) -> dict:
    """The clean pool's images that look triggered to the repair: those the original model puts at ``target``
    and that score like the triggered samples (:func:`_triggered_scores`; none where that rule does not apply),
    among the first images of the seeded order fit draws from (``window``: the clean
    samples and the held-out part, twice over). Returned under ``check["_suspects"]`` (not recorded)."""
    order = pool_order(inputs.pool, n_clean=req.n_clean, seed=req.seed)
    window = np.concatenate(order[:2])[: SUSPECT_WINDOW * (req.n_clean + N_CHECK)]
    suspect = _triggered_scores(inputs, d, held.pre(inputs.pool.x[window]), target)
    if suspect is None:  # no evidence beyond changed predictions: leave the pool as it is (clean images given as
        # flagged inputs on a clean model changed predictions at the class they were read as, too: leaving 142
        # 'suspects' out took away the refusal of a repair that moved 20 % of clean inputs)
        return {"window": window, "suspects": window[:0], "target": target, "applies": False}
    share = carried_share(inputs, inputs.pool.x[window], suspect)
    if share is not None and share < CARRY_SHARE:  # most of them carry less than half of the trigger: a class, not poison
        # (new-user run 14: a repair at a penultimate layer read 126 of 143 genuine class-0 digits as triggered;
        # left out, the held-out check read 0.0 % changed while the repair cost 8.1 pt of CA)
        return {"window": window, "suspects": window[:0], "target": target, "applies": False,
                "genuine": {"n": int(suspect.sum()), "carried_share": round(share, 3)}}
    return {"window": window, "suspects": window[suspect], "target": target, "applies": True,
            "carried_share": None if share is None else round(share, 3)}


CARRY_SHARE = 0.5  # poisoned-looking clean images must carry at least this share of the trigger's pixel change
SHIFT_Z = 3.0  # flagged images alone: the pixels of their mean difference kept for the trigger's change
MIN_CARRIED = 0.2  # flagged images alone: below this share of their own change (cross-halves) pixels tell nothing


def _shift(t: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Mean pixel difference of flagged images ``t`` from clean images ``r`` (float), kept where it stands out:
    without twins it also holds the flagged images' own content (a 3x3 MNIST patch was 60 % of the raw difference)."""
    v = t.mean(axis=0) - r.mean(axis=0)
    z = np.abs(v) / np.sqrt(t.var(axis=0, ddof=1) / len(t) + r.var(axis=0, ddof=1) / len(r) + 1e-12)
    sig = z > SHIFT_Z
    return np.where(sig, v, 0.0) if sig.any() else v


def _shares(x: np.ndarray, origin: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Each image's difference from ``origin`` along ``v`` with its mean over the pixels taken out, as a share of
    that ``v`` (all flattened float). The mean goes because brightness is content: SIG and blend changes are mostly
    of one sign, so any brighter-than-average image 'carried' them (genuine MNIST zeros read 0.71 of SIG's change
    and were left out of the clean pool as poisoned, at --layer auto's fc1_act: 1.8 % of the test predictions
    changed); without it they read about 0 and poisoned images still about 1."""
    v = v - v.mean()
    norm = float(np.linalg.norm(v))
    if norm < 1e-9:
        return np.zeros(len(x))
    return (x - origin) @ (v / norm) / norm


def carried_share(inputs, x: np.ndarray, suspect: np.ndarray) -> float | None:
    """How much of the trigger's pixel change the ``suspect`` images of ``x`` (uint8 pool images) carry, relative to
    the triggered images themselves: the suspects' median difference from the other images of ``x`` along the
    trigger's mean change, as a share of what a triggered image shows. A clean file's poisoned images carry the
    trigger (about 1); genuine target-class images that a repair at a class-specific layer reads as triggered do
    not (about 0): in pixel space a class's content and a trigger are different things, where at a late layer
    they are not. The change is exact with --trigger (stamped minus unstamped images) or twins (x_clean); from
    flagged images alone it is estimated on each half of them and judged on the other half, whose median share is
    what a triggered image shows (the noise of 20 images' content shrinks it; blends and SIG read 0.4-0.6).
    None where there is nothing to compare with, or the flagged images' change does not show in pixels (a warp)."""
    rest = ~suspect
    if not suspect.any() or not rest.any():
        return None
    flat = x.reshape(len(x), -1).astype(np.float64)
    origin = flat[rest].mean(axis=0)
    if inputs.trigger is not None:
        ref = x[rest][:N_CHECK]
        v = (inputs.trigger.apply(ref).astype(np.float64) - ref.astype(np.float64)).reshape(len(ref), -1).mean(axis=0)
        return float(np.median(_shares(flat[suspect], origin, v)))
    if inputs.triggered is None or len(inputs.triggered) < 2:
        return None
    t = np.asarray(inputs.triggered.x, np.float64).reshape(len(inputs.triggered), -1)
    if inputs.triggered_clean is not None:
        v = t.mean(axis=0) - np.asarray(inputs.triggered_clean, np.float64).reshape(len(t), -1).mean(axis=0)
        return float(np.median(_shares(flat[suspect], origin, v)))
    if len(t) < 4:
        return None
    r = flat[rest][:N_CHECK]
    half = np.arange(len(t)) % 2 == 0
    own, sus = [], []
    for a, b in ((half, ~half), (~half, half)):
        v = _shift(t[a], r)
        own.append(_shares(t[b], origin, v))
        sus.append(_shares(flat[suspect], origin, v))
    level = float(np.median(np.concatenate(own)))
    if level < MIN_CARRIED:
        return None
    return float(np.median((sus[0] + sus[1]) / 2)) / level


SUSPECT_MIN_SIGMA = 4.0  # the score rule needs triggered and clean scores this far apart (robust sigmas)


def _triggered_scores(inputs, d: dirs.Directions, x: np.ndarray, target: int) -> np.ndarray | None:
    """Which of the preprocessed images ``x`` the original model puts at ``target`` and score like the triggered
    samples along a (single, flat or vector) repair's directions (one pass of the model reads both): past the midpoint of the images' median score and the triggered samples' median, along
    each direction where the triggered median stands ``SUSPECT_MIN_SIGMA`` robust deviations (median absolute
    deviation of the images' scores: poisoned images among them inflate the plain std, 3.1 sigma read where
    the clean ones stood 35 apart) above the images' median. Images the projection leaves at the target (the
    share of triggered inputs a repair misses) still score there, and a few of them among the clean samples
    raise the gate's clean quantile into the triggered range (new-user run 12: 18 poisoned clean images kept the
    gate from 25 % of the triggered ones). None where the rule does not apply: clean images given as flagged
    inputs stand no such distance apart."""
    if len(d.targets) != 1 or inputs.onnx_model is None or d.targets[0].layout not in ("flat", "vector"):
        return None
    t = d.targets[0]
    ts = t.fit.get("triggered_scores")
    if not ts:
        return None
    from fire_onnx.fit.core import OnnxSource

    acts, logits = OnnxSource(inputs.onnx_model, [t.tensor]).run(x)
    if logits is None:
        return None
    acts = acts[t.tensor]
    scores = (acts.reshape(len(x), -1).astype(np.float64) - t.mu.astype(np.float64)) @ t.U.astype(np.float64).T
    med = np.median(scores, axis=0)
    mad = 1.4826 * np.median(np.abs(scores - med), axis=0)
    trig = np.array([r["q50"] for r in ts], dtype=np.float64)
    apart = (trig - med) >= SUSPECT_MIN_SIGMA * np.maximum(mad, 1e-12)
    if not apart.any():
        return None
    mid = (med + trig) / 2
    return ((scores > mid) & apart).any(axis=1) & (logits.argmax(axis=1) == target)


def poisoned_clean_hint(check: dict, other: str = "--layer auto") -> str | None:
    """What to say when most changed clean predictions left the target (see :func:`_changed_from_target`); ``other``:
    the layer advice (:func:`_other_layers`: a --layer auto run was told to try --layer auto, new-user run 26)."""
    n, away = check.get("changed") or 0, check.get("changed_from_target") or 0
    if not n or away < POISONED_SHARE * n:
        return None
    fixed, relabelled = check.get("changed_to_label"), check.get("changed_labelled_target")
    if check.get("genuine_target"):  # they score like triggered inputs but carry nothing of the trigger
        g = check["genuine_target"]
        return (f"{away} of the {n} it changes were at class {check['target']} and move away from it. Of the clean "
                f"images this repair reads as triggered, the {g['n']} at class {check['target']} carry "
                f"{max(g['carried_share'], 0):.0%} of the trigger's pixel change (poisoned images carry as much as the triggered "
                f"images do): "
                f"they are genuine class-{check['target']} images, and the repair removes the class's own features "
                f"at this layer; try an earlier layer" + (" (--layer auto)" if other == "--layer auto" else ""))
    t = check["target"]
    if check.get("poison_evidence"):  # clean images that score like triggered ones carry the trigger in pixels too
        e = check["poison_evidence"]
        why = ("" if fixed is None else
               f" ({relabelled} of them labelled {t} in the clean file, as relabelled poisoned training images are)"
               if relabelled and relabelled >= fixed else f" ({fixed} of them to their labels)" if fixed else "")
        return (f"{away} of the {n} it changes were at class {t} and move away from it{why}, as triggered inputs do, "
                f"and the {e['n']} clean images the repair reads as triggered carry {e['carried_share']:.0%} of the "
                "trigger's pixel change: the clean file probably holds triggered (poisoned) images, e.g. drawn from "
                "the training set; give clean images from elsewhere (a validation split)")
    # no pixel evidence either way (no trigger estimate, or no clean image scores like the triggered ones): a test
    # split's genuine class-0 images were blamed as poisoned (new-user runs 18 and 20), so say both
    why = f" ({relabelled} of them labelled {t} in the clean file)" if relabelled else ""
    return (f"{away} of the {n} it changes were at class {t} and move away from it{why}, as triggered inputs do: "
            f"either the repair removes features that genuine class-{t} images share with triggered ones at this "
            f"layer (try {other}), or the clean file holds triggered (poisoned) images, e.g. "
            "drawn from the training set (give clean images from elsewhere, a validation split)")


def _other_layers(req) -> str:
    """What to try instead of this layer: --layer auto, unless that is what chose it."""
    if req.update_path:  # --update keeps the file's layers and settings (new-user run 19 was told to try options
        # that --update refuses)
        return "a fit from scratch (without --update) at another layer (--layer auto)"
    if not (req.auto or req.chosen_by_auto):
        return "--layer auto"
    return "a larger --max-layers or --clean-budget" if req.max_layers <= 1 else "a larger --clean-budget"


def refuse_or_record(req, d: dirs.Directions, check: dict) -> None:
    """Record ``check`` in the directions; raise when it refuses the repair and ``--force`` was not given."""
    d.meta["check"] = {k: v for k, v in check.items() if k != "warnings" and not k.startswith("_")}
    if check.get("refuse") and not req.force:
        hint = poisoned_clean_hint(check, _other_layers(req)) if check.get("refuse_clean") else None
        if hint:
            what = f"Of those, {hint}"
        elif check.get("refuse_mixed"):  # two backdoors (or flagged images of two kinds) in one file
            m = check["refuse_mixed"]
            what = (f"Split the file by the class the model puts each image in and fit each part on its own: the "
                    f"class-{m['class']} images give the repair of one backdoor, the class-{m['second_class']} ones (if "
                    f"fit confirms a trigger in them) another, which 'fire-onnx patch --add' adds to the repaired model")
        elif check.get("refuse_unchecked"):
            what = ("Export the model with two class scores ([-z, z] for a logit z, [1 - p, p] for a probability) and "
                    "fit, patch and evaluate that model, or give --trigger (or the flagged images' clean twins, x_clean)")
        elif check.get("refuse_no_backdoor") and req.trigger_free:  # the user gave no trigger to check
            what = ("The search named a class but the trigger it recovered is not the backdoor's (held-out clean images "
                    "stamped with it rarely reach that class): no repair can be fitted from it. Fit on triggered "
                    "inputs once some are caught (fit --triggered), or give a larger --budget")
        elif check.get("refuse_no_backdoor"):
            what = ("Check --trigger/--triggered and --target against the attack, and the preprocessing (--scale, "
                    "--mean, --std: see the warnings above)"
                    + (f". Some source classes with few held-out images do reach class {check['target']} ("
                       + ", ".join(f"class {c}: {k} of {n}" for c, k, n in check["few_source"][:4])
                       + "): a backdoor from those classes only needs more of their images in --clean to be judged"
                       if check.get("few_source") else ""))
        elif req.trigger_free:  # neither triggered images nor a target came from the user
            what = (f"That is the repair of the trigger the search recovered: try {_other_layers(req)}, or fit on "
                    "triggered inputs once some are caught (fit --triggered)")
        elif req.trigger_spec and check.get("clean_carry_trigger"):  # the clean images hold the trigger themselves
            c = check["clean_carry_trigger"]
            what = (f"{c['n']} images of the clean file already carry the trigger (stamping leaves them as they are; "
                    f"{c['by_class']}): if the trigger occurs in genuine clean images, leave them out of --clean (the "
                    "repair cannot tell them from triggered inputs), and if the file is drawn from the poisoned "
                    "training set, give clean images from elsewhere")
        elif req.trigger_spec:  # the trigger is the user's own: the limit is where and how it is repaired
            what = (f"The trigger given does not separate from clean content at this layer: try {_other_layers(req)}"
                    + (" or --method subspace" if req.method == "mean-diff" else "")
                    + " (or check --trigger and --target against the attack)")
        else:
            what = ("Check that the triggered images carry the trigger (and --target), or try "
                    f"{_other_layers(req)}")
        from fire_onnx.errors import Refused
        from fire_onnx.fit.pipeline import summary

        err = Refused(f"not written: {check['refuse']}. {what}; --force writes it anyway", summary(d))
        err.report["warnings"] += [w for w in check.get("warnings", []) if w not in err.report["warnings"]]
        err.report.update(output=None, written=False, refused=str(err))
        raise err
    d.meta.setdefault("checks", {}).setdefault("warnings", []).extend(check.get("warnings", []))
    if check.get("refuse"):
        d.meta["checks"]["warnings"].append(f"written with --force although {check['refuse']}")
