"""Fit directions from an activation source, with the checks that keep a repair from being silently wrong.

Activation sources:
- :class:`TorchSource`: a ``torch.nn.Module``; module outputs through forward hooks.
- :class:`OnnxSource`: an ONNX model in onnxruntime; ``layers`` are ONNX tensor names or PyTorch
  module paths resolved through the exporter's scope names (no torch needed).

Checks, each measured on the samples ``fit`` already has:
- *module vs tensor*: with a PyTorch model and its ONNX export, each module's output must equal the
  ONNX tensor the repair will be patched at, value for value (an exporter that folds a BatchNorm into
  the preceding Conv makes the Conv module's output differ from the tensor that carries its name);
- *model sanity*: accuracy on the clean fitting samples when they are labelled (near chance means the
  preprocessing is wrong), how concentrated the predictions are, and how many triggered samples
  actually reach the attack's target;
- *fingerprint*: probe activations at every target, recorded so ``patch`` can refuse directions
  fitted on another model (:mod:`fire_onnx.probe`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from fire_onnx import directions as dirs
from fire_onnx import preprocess_check
from fire_onnx import probe as probes
from fire_onnx.data import Images, Preprocess
from fire_onnx.errors import FireError
from fire_onnx.estimate import fit_target

Progress = Callable[[int, int], None]

VALUE_CHECK_IMAGES = 8
MEMORIZED = 0.99  # clean fitting images classified at least this well may be the model's training images
MEMORIZED_MIN = 200  # ... judged on at least this many
NEAR_CHANCE = 0.25  # warn when accuracy < chance + NEAR_CHANCE * (1 - chance)
CONCENTRATED = 0.9  # warn when one class takes this share of the clean predictions
TRIGGER_REACH_WARN = 0.5  # warn when fewer triggered samples than this reach the target


class TorchSource:
    """Module outputs of a PyTorch model (forward hooks) and its (N, C) outputs as logits."""

    kind = "pytorch"

    def __init__(self, model, layers: Sequence[str], *, batch_size: int = 128):
        from fire_onnx.fit.torch_model import find_module

        self.model, self.layers, self.batch_size = model, list(layers), batch_size
        for layer in self.layers:
            find_module(model, layer)
        self.tensor_of: dict[str, str] = {}

    def run(self, x: np.ndarray, progress: Progress | None = None):
        from fire_onnx.fit.torch_model import collect

        return collect(self.model, self.layers, x, batch_size=self.batch_size, progress=progress, logits=True)


class OnnxSource:
    """Tensors of an ONNX model read in onnxruntime; ``layers`` name tensors or module paths."""

    kind = "onnx"

    def __init__(self, onnx_model, layers: Sequence[str], *, tensors: dict | None = None, batch_size: int = 128):
        from fire_onnx.onnxutil import infer_shapes, repeated_calls
        from fire_onnx.patch import resolve_tensor

        self.warnings: list[str] = []
        self.inferred = infer_shapes(onnx_model, weights=False)  # names and shapes (no second copy of a 2 GB model)
        self.layers = list(layers)
        names = {o for n in self.inferred.graph.node for o in n.output}
        self.tensor_of = {}
        for layer in self.layers:
            override = (tensors or {}).get(layer)
            if override:
                self.tensor_of[layer] = resolve_tensor(self.inferred, override=override)
            elif layer in names:
                self.tensor_of[layer] = layer
            else:
                self.tensor_of[layer] = resolve_tensor(self.inferred, module=layer)
                again = repeated_calls(self.inferred.graph, layer)
                if again:
                    self.warnings.append(
                        f"module {layer!r} is called more than once in the exported graph (further calls: "
                        f"{', '.join(again[:4])}); --layer {layer} repairs one call only, tensor "
                        f"{self.tensor_of[layer]}: to repair another call, name its tensor with --tensor "
                        "(fire-onnx inspect lists them)")
        self.reader = probes.TensorReader(onnx_model, list(self.tensor_of.values()), with_logits=True,
                                          batch_size=batch_size)

    def run(self, x: np.ndarray, progress: Progress | None = None):
        acts, logits = self.reader(x, progress)
        if logits is not None and (logits.ndim != 2 or logits.shape[1] < 2):  # no class scores
            logits = None
        return {layer: acts[t] for layer, t in self.tensor_of.items()}, logits


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        return float("inf")
    return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(a)), float(np.linalg.norm(b)), 1e-12)


def modules_matching(model, x: np.ndarray, reference: np.ndarray, tol: float = probes.FINGERPRINT_TOL) -> list[str]:
    """Module paths of ``model`` whose output on ``x`` equals ``reference`` (best first)."""
    import torch

    found: dict[str, float] = {}
    hooks = []

    def make(name):
        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(reference.shape):
                found[name] = relative_difference(out.detach().float().numpy(), reference)
        return hook

    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(make(name)))
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    except Exception:  # the check is advisory: a model that fails here already ran in collect
        return []
    finally:
        for h in hooks:
            h.remove()
    return [n for n, d in sorted(found.items(), key=lambda kv: kv[1]) if d <= tol]


def tensor_matching(model, onnx_model, layer: str, x: np.ndarray) -> str | None:
    """The ONNX tensor (main graph, float) whose values equal module ``layer``'s output on ``x``
    (preprocessed images), for a module the export's scope names do not show; None if none or several."""
    from fire_onnx.fit.torch_model import collect
    from fire_onnx.onnxutil import FLOAT_TYPES, tensor_table

    try:
        ref = collect(model, [layer], x, batch_size=len(x))[layer]
    except FireError:
        return None
    want = list(ref.shape[1:])
    table = tensor_table(onnx_model)
    names = [o for n in onnx_model.graph.node for o in n.output
             if o in table and table[o][0] in FLOAT_TYPES and table[o][1] is not None
             and len(table[o][1]) == len(want) + 1
             and all(not isinstance(a, int) or a == b for a, b in zip(table[o][1][1:], want))]
    if names:  # tensors whose batch is not on axis 0 ([T, B, D]) are not candidates, and reading them is refused
        from fire_onnx.inspect import batch_axes

        later = batch_axes(onnx_model)[1]
        names = [t for t in names if t not in later]
    if not names:
        return None
    acts, _ = probes.TensorReader(onnx_model, names, batch_size=len(x))(x)
    same = [t for t in names if acts[t].shape == ref.shape and relative_difference(acts[t], ref) <= probes.FINGERPRINT_TOL]
    return same[0] if len(same) == 1 else None


def check_module_tensors(model, onnx_model, tensor_of: dict[str, str], x: np.ndarray, onnx_name: str = "model.onnx"):
    """Each module's output must equal the ONNX tensor it resolved to, on the images ``x``
    (preprocessed); a mismatch is a FireError that names the module whose output the tensor holds."""
    from fire_onnx.fit.torch_model import collect

    if not tensor_of:
        return
    reader = probes.TensorReader(onnx_model, list(tensor_of.values()), batch_size=len(x))
    onnx_acts, _ = reader(x)
    torch_acts = collect(model, list(tensor_of), x, batch_size=len(x))
    for layer, tensor in tensor_of.items():
        a, b = torch_acts[layer], onnx_acts[tensor]
        if a.shape != b.shape:
            raise FireError(f"module {layer!r} outputs shape {list(a.shape[1:])} per sample but ONNX tensor {tensor!r} "
                            f"has {list(b.shape[1:])}; pass --tensor with the tensor that holds the module's output")
        diff = relative_difference(a, b)
        if diff <= probes.FINGERPRINT_TOL:
            continue
        matches = [m for m in modules_matching(model, x, b) if m != layer]
        if not matches and (out_diff := _output_difference(model, onnx_model, x)) is not None \
                and out_diff > probes.FINGERPRINT_TOL:
            raise FireError(
                f"module {layer!r} does not compute what ONNX tensor {tensor!r} holds, and the two models' outputs "
                f"differ too (relative difference {out_diff:.3g} on {len(x)} clean images): --model and --onnx do not "
                "compute the same function of the same input. The ONNX graph may do preprocessing of its own (a "
                "Cast/Sub/Div at its input) that the PyTorch model does not, or the weights differ. Fix: give the "
                f"PyTorch model that was exported, or fit from the ONNX model itself (--onnx {onnx_name} without "
                f"--model, --layer {tensor}, with the preprocessing its input expects)")
        fix = (f"the tensor holds the output of module {matches[0]!r}: use --layer {matches[0]} --tensor {tensor}"
               if matches
               else "no module of the PyTorch model outputs what the tensor holds")
        raise FireError(
            f"module {layer!r} does not compute what ONNX tensor {tensor!r} holds (relative difference {diff:.3g} on "
            f"{len(x)} clean images): the exporter folded or fused something there, typically a BatchNorm into the "
            f"preceding Conv, so a repair fitted on the module would be patched at the wrong values. Fix: {fix}, or "
            f"fit from the ONNX model itself (--onnx {onnx_name} without --model, --layer {tensor})")


def _output_difference(model, onnx_model, x: np.ndarray) -> float | None:
    """Relative difference of the PyTorch model's and the ONNX model's first outputs on ``x`` (None when
    either cannot be read as one array)."""
    import torch

    try:
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            return None
        reader = probes.TensorReader(onnx_model, [], with_logits=True, batch_size=len(x))
        _, logits = reader(x)
    except Exception:  # advisory: the message without it still says what to do
        return None
    return None if logits is None else relative_difference(out.float().numpy(), logits)


SECOND_GROUP = 0.1  # flagged images agreeing on a second class: at least this share of them ...
SECOND_MIN = 3  # ... and this many (two stray images often share a class by chance)
FLAGGED_AGREE = 0.8  # flagged inputs (caught misbehaving) reaching one class less often than this: a mixed file


FEW_CLASSES = 0.5  # warn when the labelled clean images hold fewer than this share of the model's classes


def model_checks(clean_logits, clean_y, trig_logits, target: int | None, n_trig: int, flagged: bool = False) -> dict:
    """Sanity of the model on the fitting samples: accuracy, prediction concentration, trigger reach.
    ``flagged``: the triggered samples are flagged inputs (no trigger given, no clean twins)."""
    out: dict = {"warnings": []}
    warn = out["warnings"]
    if clean_logits is not None:
        pred = clean_logits.argmax(axis=1)
        n_classes = clean_logits.shape[1]
        counts = np.bincount(pred, minlength=n_classes)
        top = int(counts.argmax())
        out["clean_top_class"], out["clean_top_share"] = top, float(counts[top] / len(pred))
        if clean_y is not None:
            from fire_onnx.evaluate import check_labels_in_range

            check_labels_in_range(pred, clean_y, n_classes)
            acc = float((pred == clean_y).mean())
            chance = float(np.bincount(clean_y).max() / len(clean_y))
            out["clean_accuracy"], out["chance"] = acc, chance
            present = len(np.unique(clean_y))
            if present < FEW_CLASSES * n_classes:
                # the clean reference and the gate's threshold see only these classes: a 5-class GTSRB file cost the
                # absent classes up to 13 pt while the held-out check (same classes) read 0.0 % changed (new-user run 20)
                warn.append(f"the clean fitting images hold only {present} of the model's {n_classes} classes: the "
                            "clean reference and the gate's threshold come from them, and the held-out check sees "
                            "only them, so what the repair does to inputs of the other classes is not measured; give "
                            "clean images of every class (a validation split)")
            if present == 1:
                pass  # chance is 100 %: the warning above says what is wrong with the file, not the preprocessing
            elif acc < chance + NEAR_CHANCE * (1 - chance):
                out["near_chance"] = True  # fit --update refuses such clean images (fire_onnx.fit.pipeline.run_fit)
                warn.append(f"the model classifies only {acc:.1%} of the clean fitting images correctly (chance is "
                            f"{chance:.1%}): the preprocessing (--scale/--mean/--std/--input-layout), the model/"
                            "weights, the clean file (its labels, or images of another kind than the model's "
                            "inputs), or which output holds the class scores (fit reads the model's first output) are "
                            "probably wrong, and a repair fitted like this is useless")
            elif acc >= MEMORIZED and len(pred) >= MEMORIZED_MIN:
                warn.append(f"the model classifies {acc:.1%} of the {len(pred)} clean fitting images correctly: if "
                            "they come from its training set, the repair is fitted and checked on inputs the model "
                            "has memorized, and the held-out check underestimates what it does to new inputs (measured "
                            "on a GTSRB model, 99.4 % right on its training images and 88 % on new ones: 1.2 % of "
                            "held-out predictions changed against 3.9 % of new ones, and a fit on new images left "
                            "1.4 % ASR where one on training images left 21.6 %); give --clean images it was not "
                            "trained on (a validation split)")
        elif len(pred) >= 20 and out["clean_top_share"] >= CONCENTRATED:
            warn.append(f"the model predicts class {top} for {out['clean_top_share']:.0%} of the clean fitting images: "
                        "check the preprocessing (--scale/--mean/--std/--input-layout) and that these images are clean")
    if trig_logits is None and n_trig and target is not None:
        warn.append(f"--target {target} cannot be checked: the model's first output is not (N, classes) class scores "
                    "(at least 2 classes), so fit cannot tell whether the triggered images reach it")
    if trig_logits is not None and n_trig:
        tp = trig_logits.argmax(axis=1)
        counts = np.bincount(tp, minlength=trig_logits.shape[1])
        out["triggered_top_class"] = int(counts.argmax())
        out["triggered_top_share"] = float(counts.max() / len(tp))
        if target is not None:
            if not 0 <= target < trig_logits.shape[1]:
                raise FireError(f"--target {target} is not a class of this model (it has {trig_logits.shape[1]} "
                                "outputs)")
            reach = float((tp == target).mean())
            out["triggered_to_target"] = reach
            if reach < TRIGGER_REACH_WARN:
                most = ("" if out["triggered_top_class"] == target
                        else f" (most go to class {out['triggered_top_class']})")
                warn.append(f"only {reach:.0%} of the triggered fitting images are classified as the target {target}"
                            f"{most}: check --trigger/--triggered and --target; a direction fitted on inputs that do "
                            "not trigger the backdoor does not remove it")
        elif out["triggered_top_share"] < TRIGGER_REACH_WARN:
            # Without --target nothing else notices triggered images that do not trigger anything: clean images
            # given as --triggered were spread over the classes (most common 18 %), and the fit wrote a repair
            # that removed nothing (ASR 97.8 % -> 98.1 %) and cost 4.5 points of clean accuracy.
            warn.append(f"the triggered fitting images do not agree on a class (the most common, class "
                        f"{out['triggered_top_class']}, takes only {out['triggered_top_share']:.0%} of them): a "
                        "backdoor sends its triggered inputs to one target class, so these are probably not "
                        "triggered (or the trigger is wrong); a direction fitted on them does not remove the "
                        "backdoor. Check --trigger/--triggered, and give --target to check the reach")
        share = out.get("triggered_to_target", out["triggered_top_share"])
        cls = target if target is not None else out["triggered_top_class"]
        others = np.bincount(tp[tp != cls], minlength=trig_logits.shape[1])
        second, n_second = int(others.argmax()), int(others.max())
        if flagged and share >= TRIGGER_REACH_WARN and n_second >= max(SECOND_MIN, SECOND_GROUP * n_trig):
            # a group of them agreeing on another class is not scatter (new-user run 13: 3 of 20 flagged images from a
            # second backdoor to class 7 were fitted as class-0 ones without a word, and that backdoor stayed at 100 %)
            out["second_class"], out["second_count"], out["second_of"] = second, n_second, int(n_trig)
            warn.append(f"{n_second} of the {n_trig} flagged images go to class {second}, not class {cls} "
                        f"({int((tp == cls).sum())}): either a second backdoor (another trigger to class {second}) or "
                        f"untriggered class-{second} images; this repair is fitted for class {cls} only and does "
                        f"nothing for class {second}. Keep the flagged images at class {cls} here, and fit the class-"
                        f"{second} ones separately (--triggered with only them: fit reconstructs and confirms their "
                        "trigger if they have one)")
        elif flagged and TRIGGER_REACH_WARN <= share < FLAGGED_AGREE and n_trig >= 5:
            # flagged inputs were caught going to the attack's target: a share well under all of them is a file
            # that mixes in others (new-user run 11: 6 clean images of one class among 14 triggered got no warning,
            # the reconstruction quietly changed kind, and the repair left 13.5 % ASR or cost 2.3 pt of CA)
            warn.append(f"only {share:.0%} of the flagged images are classified as class {cls}: inputs caught by a "
                        "backdoor all go to its target, so the others are probably not triggered (or their trigger did "
                        "not fire), and fitted with them the repair is weaker; keep the flagged images the model sends "
                        "to the target")
    return out


RECONSTRUCT_CHOICES = ("auto", "off")
PSEUDO_PAIRS = 100  # reconstructed-trigger pairs to fit on (at least as many as flagged images)
# Kinds whose reconstruction the fit is paired on. A confirmed blend is recorded but the fit stays
# unpaired: its pattern p = (mean_flagged - (1 - a) mean_clean) / a carries the flagged images' content
# noise amplified by 1/a, and pseudo-pairs built from it left more ASR than the (shrunk) unpaired
# estimate: CIFAR-10 16.0 % vs 7.8 % (20 flagged), 83.9 % (5 flagged, ratio misread as 0.41);
# Fashion-MNIST 27.7 % vs 25.7 %; MNIST 0.6 % vs 0.8 % (benchmarks/flagged).
# fit --triggered (fire_onnx.fit.pipeline.choose_blend_fit) still tries the pseudo-pairs of a confirmed blend
# beside the unpaired fit and keeps them only when the cross-fitted check says they do better (5 flagged
# Fashion-MNIST Blended images: 38 % ASR against 81 %).
PSEUDO_PAIR_KINDS = ("patch", "additive")
GATE_FLAGGED = True  # gate auto must also reach the real flagged images (not only the pseudo-pairs)
GATE_REACH_CHOICES = ("trigger", "weaker")
# gate reach "weaker": the fitting pairs redrawn at these strengths of the trigger, x + t (x_trig - x); those the
# original model sends to the target are what gate auto must reach too (new-user run 26: a BadNets patch at grey 150
# or 60 % strength fooled the original model on 50-55 % of the images at scores under tau, the 0.999 clean quantile,
# and passed the repaired model unchanged)
WEAKER_STRENGTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def weaker_copies(x_clean: np.ndarray, x_trig: np.ndarray, strengths=WEAKER_STRENGTHS) -> np.ndarray:
    """uint8 images ``x + t (x_trig - x)`` for each strength ``t`` (in that order, one block of len(x) per t): the
    trigger at a fraction of its strength (a fainter patch, a weaker blend or signal)."""
    xc, xt = x_clean.astype(np.float32), x_trig.astype(np.float32)
    return np.concatenate([np.clip(np.rint(xc + t * (xt - xc)), 0, 255).astype(np.uint8) for t in strengths])


def reconstruct_pairs(source, preprocess: Preprocess, clean: Images, flagged: Images, logits_f, held: Images | None,
                      checks: dict, target: int | None = None, pair_blend: bool = False) -> dict:
    """Reconstruct the trigger behind ``flagged`` and build pseudo-pairs from it.

    The trigger must send held clean images to ``target`` when it is known (``--target``, or the class the
    earlier fit of ``--update`` reconstructed for), else to the flagged images' majority class. A blend is
    paired on only with ``pair_blend`` (``PSEUDO_PAIR_KINDS``).

    Returns ``{"meta": what meta["reconstruction"] records, "pairs": (stamped, originals) or None}``;
    when nothing is confirmed (or the model has no class outputs to confirm with), a warning goes to
    ``checks["warnings"]`` and the caller keeps the unpaired estimate.
    """
    from fire_onnx import reconstruct as rc

    fallback = "fell back to the unpaired shift of the flagged images against the clean mean, which is much noisier"
    if logits_f is None:
        reason = "the model's output is not (N, classes) logits, so no reconstruction can be confirmed"
        checks["warnings"].append(f"trigger reconstruction skipped: {reason}; {fallback}")
        return {"meta": {"kind": "none", "rate": 0.0, "confirmed": False, "reason": reason, "candidates": []},
                "pairs": None}
    pool = held if held is not None and len(held) else clean
    maj = int(np.bincount(logits_f.argmax(axis=1)).argmax()) if target is None else int(target)

    def predict(x: np.ndarray) -> np.ndarray:
        return source.run(preprocess(x))[1].argmax(axis=1)

    r = rc.reconstruct(flagged.x, clean.x, pool.x, predict, flagged_pred=logits_f.argmax(axis=1),
                       clean_excluded=None if clean.y is None else clean.y == maj,
                       held_excluded=None if pool.y is None else pool.y == maj, target=maj)
    meta = r.describe()
    if not r.confirmed:
        checks["warnings"].append(f"no trigger reconstruction confirmed: {r.reason}; {fallback}. Give --trigger SPEC "
                                  "if you know the trigger, or flagged images with their clean twins (x_clean)")
        return {"meta": meta, "pairs": None}
    if r.winner.kind not in PSEUDO_PAIR_KINDS and not (pair_blend and r.winner.kind == "blend"):
        meta["fit"] = "unpaired"
        return {"meta": meta, "pairs": None}
    originals = r.held[:max(PSEUDO_PAIRS, len(flagged))]
    meta["pseudo_pairs"], meta["fit"] = int(len(originals)), "pseudo-pairs"
    return {"meta": meta, "pairs": (Images(r.winner.apply(originals)), Images(originals))}


def _priors(previous: dirs.Directions, layers: Sequence[str], source) -> dict:
    """Per layer, (statistics, fit record, target) of the earlier fit; checks the model's fingerprint."""
    from fire_onnx.data import Preprocess
    from fire_onnx.streaming import ShiftStats

    by_label = {}
    for t in previous.targets:
        for key in (t.module, t.tensor):
            if key:
                by_label.setdefault(key, t)
    out = {}
    acts = None
    if previous.probe is not None:
        acts = source.run(Preprocess.from_dict(previous.preprocess or {})(previous.probe))[0]
    for name in layers:
        t = by_label.get(name)
        if t is None:
            raise FireError(f"layer {name!r} is not a target of the directions file being updated")
        if not t.stats:
            raise FireError(f"the directions for {t.label} carry no update statistics (fitted by an older "
                            "fire-onnx, or by hand): fit again on all triggered inputs, then --update works")
        if acts is not None and probes.valid_fingerprint(t.fingerprint):
            diff = probes.difference(t.fingerprint, acts[name])
            if diff > probes.FINGERPRINT_TOL:
                raise FireError(f"the model does not compute the activations the directions for {t.label} were "
                                f"fitted on (relative difference {diff:.3g} on the probe images): --update needs "
                                "the same model (and layer) as the earlier fit")
        out[name] = (ShiftStats.from_arrays(t.stats, t.dim, f"target {t.label}"), t.fit, t)
    return out


def _weaker_reach(source, preprocess, triggered: Images, acts_p, meta: dict, progress, target,
                  twins: Images | None) -> dict:
    """Gate reach "weaker": per layer, the activations of the fitting pairs redrawn at the weaker strengths
    (:func:`weaker_copies`) that the original model sends to ``target``, for gate auto to reach as well
    (``fire_onnx.estimate.fit_target``'s ``gate_weaker``). Needs twins (a known trigger, x_clean, or a confirmed
    reconstruction's pseudo-pairs); records what it found in ``meta["gate_reach"]``."""
    if twins is None or acts_p is None or target is None:
        raise FireError("--gate-reach weaker needs the triggered images' clean twins (--trigger, x_clean in the "
                        "triggered file, or flagged images whose trigger fit reconstructs): without them there is no "
                        "weaker copy of the trigger to stamp")
    xw = weaker_copies(twins.x, triggered.x)
    acts_w, logits_w = source.run(preprocess(xw), progress)
    hit = np.asarray(logits_w).argmax(axis=1) == int(target)
    n = len(triggered)
    meta["gate_reach"] = {"mode": "weaker", "strengths": list(WEAKER_STRENGTHS), "n_pairs": int(n),
                          "at_target": [int(hit[i * n:(i + 1) * n].sum()) for i in range(len(WEAKER_STRENGTHS))]}
    return {name: a[hit] for name, a in acts_w.items()}


def fit_directions(
    model,
    layers: Sequence[str],
    clean: Images,
    triggered: Images,
    preprocess: Preprocess,
    *,
    method: str = "mean-diff",
    k: int = 1,
    gate: str = "auto",
    quantile: float = 0.999,
    alpha: float = 1.0,
    layout: str | None = None,
    batch_size: int = 128,
    onnx_model=None,
    meta: dict | None = None,
    progress: Progress | None = None,
    triggered_source: Images | None = None,
    tensors: dict[str, str] | None = None,
    target: int | None = None,
    onnx_name: str = "model.onnx",
    shrink: bool = True,
    reconstruct: str = "off",
    held: Images | None = None,
    repair: str = "project",
    previous: dirs.Directions | None = None,
    pair_blend: bool = False,
    weak_floor: bool = True,
    merge: bool = True,
    gate_reach: str = "trigger",
) -> dirs.Directions:
    """Fit one target per layer and return the directions, with the checks' results in
    ``meta["checks"]`` and each target's fingerprint.

    ``model`` is a ``torch.nn.Module`` (activations from forward hooks on the modules named by
    ``layers``) or ``None``, in which case activations come from ``onnx_model`` in onnxruntime and
    ``layers`` may name ONNX tensors or PyTorch module paths (resolved through export scopes).
    ``tensors`` maps a layer to the ONNX tensor it exports to, where the scope names do not tell.
    ``triggered_source`` holds the triggered images without their trigger (same order), which makes
    the shift estimate paired (much less noisy). With ``onnx_model``, each target records the ONNX
    tensor it applies to; its shape and (with a PyTorch model) its values are checked against the
    module's output. ``target`` (the attack's target class, when known) is checked against the
    triggered samples' predictions.

    ``reconstruct="auto"`` with unpaired triggered images (flagged inputs, no ``triggered_source``):
    reconstruct the trigger in pixel space and let the model confirm it (:mod:`fire_onnx.reconstruct`);
    when a patch or additive trigger is confirmed, the fit is paired on pseudo-pairs (it stamped on ``held``
    clean images, or on ``clean`` when not given; the image without it), with the flagged images'
    own activations added to what gate auto must reach. The outcome is in ``meta["reconstruction"]``.

    ``repair`` is the operator (``project`` or ``translate``). ``pair_blend``: fit a confirmed blend
    reconstruction on pseudo-pairs too (by default it is fitted unpaired).

    ``previous`` (``fit --update``) is an earlier fit of the same layers on the same model, with its
    update statistics: the result is the fit on its triggered samples and ``triggered`` together
    (see :mod:`fire_onnx.streaming`); the model must match its fingerprint. ``merge=False``: ``triggered``
    already holds the earlier samples (flagged images the file keeps, :mod:`fire_onnx.fit.update`), so the
    statistics are not merged; the fingerprint is still checked and the update counted.
    """
    from fire_onnx.data import check_images

    if isinstance(layers, str):  # iterated as characters: "module 'b' not found" (new-user run 17)
        raise FireError(f"layers must be a list of module or tensor names, e.g. [{layers!r}]")
    if not layers:
        raise FireError("no layer to fit: give at least one (a module path or an ONNX tensor name)")
    preprocess.validate()  # Preprocess(std=[0.0]) or layout="CHW" from Python failed only later, and obscurely
    clean, triggered = check_images(clean, "clean images"), check_images(triggered, "triggered images")
    if triggered_source is not None:
        triggered_source = check_images(triggered_source, "the triggered images' clean originals")
    if triggered_source is not None and triggered_source.x.shape != triggered.x.shape:
        raise FireError("the clean originals of the triggered images do not match them in shape")
    meta = dict(meta or {})
    found_by_value = []  # modules with no node of their own, found by the tensor that holds their output
    if model is None:
        if onnx_model is None:
            raise FireError("fit needs a PyTorch model (--model) or an ONNX model (--onnx)")
        source = OnnxSource(onnx_model, layers, tensors=tensors, batch_size=batch_size)
        tensor_of, inferred = source.tensor_of, source.inferred
    else:
        source = TorchSource(model, layers, batch_size=batch_size)
        tensor_of, inferred = {}, None
        if onnx_model is not None:
            from fire_onnx.onnxutil import infer_shapes
            from fire_onnx.patch import resolve_tensor

            inferred = infer_shapes(onnx_model)
            x_check = preprocess(clean.x[:VALUE_CHECK_IMAGES])
            for layer in layers:
                # by suffix: the value check below confirms the tensor holds the module's output
                try:
                    tensor_of[layer] = resolve_tensor(inferred, module=layer, override=(tensors or {}).get(layer),
                                                      by_suffix=True)
                except FireError as e:
                    if (tensors or {}).get(layer) or "not found" not in str(e):
                        raise
                    match = tensor_matching(model, inferred, layer, x_check)
                    if match is None:
                        raise
                    tensor_of[layer] = match
                    found_by_value.append(
                        f"module {layer!r} has no node of its own in the ONNX graph (a BatchNorm folded into the "
                        f"Conv before it, for instance); ONNX tensor {match!r} holds its output (checked on "
                        f"{len(x_check)} clean images), so the repair is fitted and patched there")
            check_module_tensors(model, inferred, tensor_of, x_check, onnx_name)

    acts_c, logits_c = source.run(preprocess(clean.x), progress)
    acts_t, logits_t = source.run(preprocess(triggered.x), progress)
    acts_p = source.run(preprocess(triggered_source.x), progress)[0] if triggered_source is not None else None
    checks = model_checks(logits_c, clean.y, logits_t, target, len(triggered), flagged=triggered_source is None)
    checks["warnings"] += getattr(source, "warnings", []) + found_by_value
    if warning := preprocess_check.warning_of(meta):  # recorded by load_inputs
        checks["warnings"].insert(0, warning)
    checks["warnings"] += [w for w in meta.get("unlabeled_warnings", []) if w not in checks["warnings"]]
    acts_gate = None
    if reconstruct not in RECONSTRUCT_CHOICES:
        raise FireError(f"reconstruct must be one of {', '.join(RECONSTRUCT_CHOICES)}")
    if reconstruct == "auto" and triggered_source is None:
        pseudo = reconstruct_pairs(source, preprocess, clean, triggered, logits_t, held, checks, target,
                                   pair_blend=pair_blend)
        meta["reconstruction"] = pseudo["meta"]
        if pseudo["pairs"] is not None:
            stamped, originals = pseudo["pairs"]
            acts_gate = acts_t if GATE_FLAGGED else None
            acts_t = source.run(preprocess(stamped.x), progress)[0]
            acts_p = source.run(preprocess(originals.x), progress)[0]
            triggered = stamped
    if gate_reach not in GATE_REACH_CHOICES:
        raise FireError(f"gate_reach must be one of {', '.join(GATE_REACH_CHOICES)}")
    acts_weak = None
    if gate_reach == "weaker":
        acts_weak = _weaker_reach(source, preprocess, triggered, acts_p, meta, progress,
                                  target if target is not None else checks.get("triggered_top_class"),
                                  triggered_source if triggered_source is not None else
                                  (pseudo["pairs"][1] if reconstruct == "auto" and pseudo["pairs"] is not None
                                   else None))
    probe_x = probes.probe_images(clean.x)
    acts_probe = source.run(preprocess(probe_x))[0]

    priors = _priors(previous, layers, source) if previous is not None else {}
    targets = []
    for name in layers:
        is_tensor = model is None and tensor_of.get(name) == name
        prior, prior_fit, old_target = priors.get(name, (None, None, None))
        if not merge:
            prior, prior_fit = None, None
        t = fit_target(acts_c[name], acts_t[name], layout=layout, method=method, k=k, gate=gate,
                       quantile=quantile, alpha=alpha, module="" if is_tensor else name,
                       tensor=tensor_of.get(name, ""),
                       paired=None if acts_p is None else acts_p[name],
                       clean_labels=clean.y, triggered_labels=triggered.y,
                       gate_triggered=None if acts_gate is None else acts_gate[name], shrink=shrink, repair=repair,
                       gate_weaker=None if acts_weak is None else acts_weak[name],
                       weak_floor=weak_floor,
                       prior=prior, prior_fit=prior_fit,
                       prior_direction=None if old_target is None else old_target.U[0])
        t.fingerprint = probes.fingerprint(acts_probe[name])
        if old_target is not None and not merge:
            t.fit["updates"] = int(old_target.fit.get("updates", 0)) + 1
        if inferred is not None:
            from fire_onnx.onnxutil import tensor_info
            from fire_onnx.patch import check_layout

            check_layout(t, t.tensor, tensor_info(inferred, t.tensor)[1], inferred, checks["warnings"])
        targets.append(t)
    meta["checks"] = checks
    if previous is not None:
        for t, old in zip(targets, (priors[name][2] for name in layers)):
            if float(np.linalg.norm(t.mu - old.mu)) > 1e-4 * max(float(np.linalg.norm(old.mu)), 1e-12):
                checks["warnings"].append(
                    f"{t.label}: the clean mean differs from the earlier fit's (other clean images, --n-clean or "
                    "--seed): the update uses the new clean images for the reference and the gate")
    return dirs.Directions(targets=targets, preprocess=preprocess.as_dict(), meta=meta, probe=probe_x)
