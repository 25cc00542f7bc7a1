"""From what the user gives ``fit`` (paths, specs, options) to a directions file.

One place turns the user's inputs into (activation source, clean samples, triggered samples with
their twins); the CLI only parses options into a :class:`FitRequest` and prints the result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fire_onnx import directions as dirs
from fire_onnx import triggers
from fire_onnx.data import Images, Preprocess, fit_samples, layout_hint, load_images, load_triggered, pool_order
from fire_onnx.errors import FireError

Progress = Callable[[int, int], None]
AUTO = "auto"  # --layer auto: fire_onnx.fit.auto chooses the layer
BLEND_FITS = ("auto", "unpaired", "pseudo-pairs")


@dataclass
class FitRequest:
    layers: list[str]
    clean_path: str
    model_spec: str | None = None  # package.module:factory, file.py:factory, or a TorchScript file
    weights: str | None = None
    no_weights: bool = False  # the factory loads trained weights itself
    onnx_path: str | None = None
    tensor: str | None = None  # the ONNX tensor of the (single) layer, where scopes do not tell
    triggered_path: str | None = None
    trigger_spec: str | None = None
    target: int | None = None
    split: str = "train"
    # clean samples to fit on; None (the CLI's default): N_CLEAN, or fewer so that a small clean file keeps
    # images for the held-out check (resolve_n_clean)
    n_clean: int | None = 500
    n_triggered: int = 20
    method: str = "mean-diff"
    k: int | None = None
    gate: str = "auto"
    quantile: float = 0.999
    gate_reach: str = "trigger"  # "weaker": gate auto also reaches weaker copies of the trigger (fit.core.weaker_copies)
    alpha: float = 1.0
    layout: str | None = None
    batch_size: int = 128
    seed: int = 0
    scale: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    input_layout: str | None = None
    shrink: bool = True  # shrink an unpaired shift by its content noise (fire_onnx.estimate.shrunk_shift)
    reconstruct: str = "auto"  # flagged images without x_clean: reconstruct the trigger ("auto") or not ("off")
    # a confirmed blend reconstruction: fit unpaired, on pseudo-pairs, or ("auto") whichever the cross-fitted
    # held-out check prefers (choose_blend_fit)
    blend_fit: str = "auto"
    notes: list[str] = field(default_factory=list)  # filled in: what fit decided on the user's behalf
    repair: str = "project"  # the operator: project (gated projection) or translate (the FIRE paper's x - alpha beta)
    update_path: str | None = None  # fit --update: refine this directions file with the new triggered inputs
    tensors: dict[str, str] | None = None  # layer -> ONNX tensor, where the scope names do not tell
    clean_budget: float = 0.005  # --layer auto: the most held-out clean predictions the repair may change
    n_holdout: int = 1000  # --layer auto: held-out clean images (pool images no fit uses)
    max_layers: int = 1  # --layer auto: repair a chain of up to this many layers (greedy)
    chosen_by_auto: bool = False  # the request --layer auto makes to check the layer it chose
    trigger_free: bool = False  # --trigger-free: search the trigger from the clean images (fire_onnx.fit.trigger_free)
    budget: float = 180.0  # --trigger-free: seconds the search may take (the scan's steps adapt to it)
    steps: int | None = None  # --trigger-free: gradient steps per class and search (default: from --budget)
    # --unlabeled (fire_onnx.fit.unlabeled): find the triggered inputs in unlabeled traffic
    unlabeled_path: str | None = None
    # --trigger-free: repair the most anomalous class even when none is anomalous;
    # --unlabeled found nothing: fit on the closest candidate anyway
    force: bool = False

    @property
    def auto(self) -> bool:
        """``--layer auto``: choose the layer (:mod:`fire_onnx.fit.auto`)."""
        return AUTO in self.layers

    def validate(self) -> None:
        if self.auto:
            self._validate_auto()
        elif self.max_layers != 1:
            raise FireError("--max-layers applies to --layer auto (which chooses the layers); with given --layer "
                            "values every one is repaired")
        elif self.repair == AUTO:
            raise FireError("--repair auto tries both operators at every candidate of --layer auto; with a given "
                            "--layer, choose --repair project or translate")
        if isinstance(self.layers, str):  # iterated as characters: "module 'b' not found" (new-user run 17)
            raise FireError(f"layers must be a list of module or tensor names, e.g. [{self.layers!r}]")
        if not self.layers and not self.update_path:
            raise FireError("give --layer (the module or tensor to repair), or --update DIRECTIONS")
        for name, low in (("n_clean", 2), ("n_triggered", 1), ("batch_size", 1), ("k", 1)):
            v = getattr(self, name, None)  # the CLI's ranges, for run_fit callers (n_triggered=-1 fitted on 3148)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low):
                raise FireError(f"{name} must be an integer >= {low}, got {v!r}")
        if not (np.isfinite(self.alpha) and self.alpha >= 0):  # before any work, not after the fit
            raise FireError(f"--alpha must be a finite number >= 0, got {self.alpha}")
        if self.trigger_free:
            self._validate_trigger_free()
        else:
            if self.update_path and self.trigger_spec is None and self.triggered_path is None and not self.unlabeled_path:
                raise FireError("--update needs the new triggered images: --triggered FILE (or --trigger SPEC)")
            given = [p for p in (self.triggered_path, self.trigger_spec, self.unlabeled_path) if p is not None]
            if len(given) != 1:
                raise FireError("give exactly one of --triggered FILE, --trigger SPEC or --unlabeled TRAFFIC (or "
                                "--trigger-free)")
            if self.unlabeled_path and self.update_path:
                raise FireError("--update refines a repair with new triggered images; --unlabeled finds them itself: "
                                "fit from scratch with --unlabeled, or give --triggered")
        if self.model_spec is None and self.onnx_path is None:
            raise FireError("give --model (PyTorch) or --onnx (fit from the ONNX model in onnxruntime)")
        if self.weights and not self.model_spec:
            raise FireError("--weights needs --model")
        if self.no_weights and self.weights:
            raise FireError("give --weights or --no-weights, not both")
        if self.method == "mean-diff" and self.k not in (None, 1):
            raise FireError("-k applies to --method subspace (mean-diff fits one direction)")
        if self.tensor and len(self.layers) != 1:
            raise FireError("--tensor names the ONNX tensor of one --layer; give exactly one --layer with it")
        if self.tensor and not self.onnx_path:
            raise FireError("--tensor needs --onnx (it names a tensor of that model)")
        if self.reconstruct not in ("auto", "off"):
            raise FireError("--reconstruct must be auto or off")
        if self.blend_fit not in BLEND_FITS:
            raise FireError(f"blend_fit must be one of {', '.join(BLEND_FITS)}")

    def _validate_trigger_free(self) -> None:
        if self.triggered_path or self.trigger_spec or self.unlabeled_path:
            raise FireError("--trigger-free searches the trigger itself: drop --triggered/--trigger/--unlabeled (or "
                            "drop --trigger-free to fit on them)")
        if self.update_path:
            raise FireError("--trigger-free fits from scratch; it cannot be combined with --update")
        if self.target is not None:
            raise FireError("--trigger-free finds the target class itself: drop --target")
        if not self.model_spec or Path(self.model_spec).is_file():
            raise FireError("--trigger-free searches the trigger by gradient descent: give --model (a PyTorch "
                            "factory, with --weights), not only an ONNX or TorchScript file")
        if self.budget <= 0:
            raise FireError("--budget is a number of seconds, more than 0")
        if self.steps is not None and self.steps < 1:
            raise FireError("--steps must be at least 1")

    def _validate_auto(self) -> None:
        if len(self.layers) != 1:
            raise FireError("--layer auto chooses one layer by itself: give it alone, without other --layer values")
        if self.tensor:
            raise FireError("--tensor names the tensor of a chosen layer; --layer auto chooses it: drop --tensor")
        if self.update_path:
            raise FireError("--update refines the layers of the file being updated; it cannot be combined with "
                            "--layer auto")
        if self.onnx_path is None and not (self.model_spec and Path(self.model_spec).is_file()):
            raise FireError("--layer auto judges each candidate by patching the ONNX model: give --onnx MODEL.onnx")
        if not 0 <= self.clean_budget < 1:
            raise FireError("--clean-budget is a fraction of held-out clean images in [0, 1), e.g. 0.005")
        if self.n_holdout < 1:
            raise FireError("--holdout must be at least 1")
        if self.max_layers < 1:
            raise FireError("--max-layers must be at least 1")


def infer_input_layout(onnx_model, image_shape) -> str | None:
    """NCHW or NHWC when the ONNX model's single input shape tells unambiguously for images of
    ``image_shape`` (H, W, C); None when it cannot tell (dynamic dims, or both fit)."""
    from fire_onnx.data import infer_layout

    inputs = [i for i in onnx_model.graph.input if i.name not in {t.name for t in onnx_model.graph.initializer}]
    if len(inputs) != 1 or not inputs[0].type.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return infer_layout(dims, image_shape)


@dataclass
class FitInputs:
    """What ``fit`` loads from a request before choosing samples: the image pool, the trigger (or the
    triggered images), the preprocessing and the model(s). :func:`run_fit` and ``--layer auto``
    (:mod:`fire_onnx.fit.auto`) share it."""

    pool: Images
    trigger: object | None  # a fire_onnx.triggers trigger (--trigger), or None
    triggered: Images | None  # --triggered images (None with --trigger)
    triggered_clean: np.ndarray | None  # their clean twins (x_clean), when the file has them
    preprocess: Preprocess
    model: object | None  # a torch.nn.Module, or None (activations from onnx_model)
    onnx_model: object | None
    onnx_name: str
    meta: dict
    k: int
    previous: dirs.Directions | None = None
    clean_left_out: list = field(default_factory=list)  # pool images left out as poisoned-looking, per round
    # --update of a file that keeps its flagged images (fire_onnx.fit.update.merge_flagged): ``triggered`` holds
    # them and the new ones, fitted together instead of merged into the statistics
    refit_all: bool = False
    new_flagged: Images | None = None  # the new images among them
    flagged_seen: list | None = None  # hashes of every flagged image merged so far
    warnings: list = field(default_factory=list)  # about the inputs themselves, added to the fit's warnings


UPDATE_MIN_REACH = 0.5  # fit --update: the share of new triggered images that must reach the target


def run_fit(req: FitRequest, progress: Progress | None = None, log: Callable[[str], None] | None = None
            ) -> dirs.Directions:
    """Load everything ``req`` names, fit, and return the directions (not yet saved). ``log`` gets
    progress lines of ``--layer auto`` (one per candidate)."""
    req.validate()
    if req.auto:
        from fire_onnx.fit.auto import run_auto

        inputs = load_inputs(req)
        d = run_auto(req, progress=progress, log=log, inputs=inputs)
        _record_inputs(d, req, inputs)
        return d
    inputs = load_inputs(req)
    clean, triggered, source = select_samples(req, inputs)
    if inputs.previous is not None:  # --update: each target with its own recorded settings (a chain in order)
        from fire_onnx.fit.update import new_reach, update_targets

        d = update_targets(req, inputs, clean, triggered, source, progress=progress)
        checks = d.meta.get("checks", {})
        if checks.get("near_chance") and not req.force:
            # the update replaces the repair's clean reference with these images: Fashion-MNIST clean images given
            # to an MNIST repair's update (10 % right) took it from 0.6 % to 13.3 % ASR with a warning (new-user run 19)
            raise FireError(f"not written: the model classifies only {checks['clean_accuracy']:.1%} of the clean images "
                            f"correctly (chance {checks['chance']:.1%}): the clean file or the preprocessing does not "
                            f"match the model, and the update would replace the clean reference of "
                            f"{Path(req.update_path).name} with them; check --clean (--force writes it anyway)")
        if inputs.refit_all:  # stored flagged images + new ones: the reach of the new ones is what tells
            reach, n_new = new_reach(inputs, req.target), len(inputs.new_flagged)
        else:
            reach, n_new = checks.get("triggered_to_target"), len(triggered)
        if reach is not None and reach < UPDATE_MIN_REACH:
            # merged, such images pull the estimate off the trigger: a ViT repair went from 0.9 % to 3.8 % ASR
            # and lost 2.5 pt CA, while the held-out check (judged on the new images only) looked harmless
            what = (f"only {reach:.0%} of the {n_new} new triggered images reach the repair's target class "
                    f"{req.target} on this model: they do not carry the trigger of the backdoor "
                    f"{Path(req.update_path).name} repairs, and merging them would weaken it")
            if not req.force:
                raise FireError(f"not written: {what}; check the images (or --target of the original fit); --force "
                                "merges them anyway")
            d.meta.setdefault("checks", {}).setdefault("warnings", []).append(f"{what} (merged anyway: --force)")
    else:
        d = fit_layers(req, inputs, list(req.layers), clean, triggered, source, progress=progress)
    from fire_onnx.fit.verify import refuse_or_record

    d, check = _check(req, inputs, d, clean, triggered, source, progress)
    while True:  # the clean file holds images the repair treats as triggered: fit again without them
        suspects = check.pop("_suspects", None)
        if inputs.previous is not None or not leave_out(inputs, suspects):
            break
        target_out = suspects["target"]
        clean, triggered, source = select_samples(req, inputs)
        d = fit_layers(req, inputs, list(req.layers), clean, triggered, source, progress=progress)
        d, check = _check(req, inputs, d, clean, triggered, source, progress, seek_suspects=True)
    if inputs.clean_left_out:
        report_excluded(req, inputs, d, target_out)
    _record_inputs(d, req, inputs)
    if check.get("refuse") and not req.force and log:  # what the fit saw, before the one-line refusal
        for w in d.meta.get("checks", {}).get("warnings", []) + check.get("warnings", []):
            log(f"warning: {w}")
    refuse_or_record(req, d, check)
    return d


def _record_inputs(d: dirs.Directions, req: FitRequest, inputs: FitInputs) -> None:
    """What a fit keeps of its inputs: the flagged images (for a later --update) and the warnings about them."""
    from fire_onnx.fit.update import store_flagged

    store_flagged(d, req, inputs)
    d.meta.setdefault("checks", {}).setdefault("warnings", []).extend(inputs.warnings)


CARRIERS_SHARE = 0.9  # left-out clean images that already carry the --trigger given: poisoned, not genuine


def leave_out(inputs: FitInputs, suspects: dict | None) -> bool:
    """Take ``suspects`` (``fire_onnx.fit.verify._pool_suspects``) out of the pool: the pool becomes the rest of
    their window, and they are kept in ``inputs.clean_left_out``. False (nothing done) when there are fewer than
    MIN_SUSPECTS or SUSPECT_ROUNDS rounds have left images out already."""
    if suspects is None or len(suspects["suspects"]) < MIN_SUSPECTS or len(inputs.clean_left_out) >= SUSPECT_ROUNDS:
        return False
    window, bad = suspects["window"], suspects["suspects"]
    inputs.clean_left_out.append(inputs.pool.x[bad])
    inputs.pool = inputs.pool.subset(window[~np.isin(window, bad)])
    return True


def report_excluded(req: FitRequest, inputs: FitInputs, d: dirs.Directions, target: int, who: str = "") -> None:
    """Say (and record in ``d.meta["clean_excluded"]``) which clean images fit left out as poisoned-looking.
    They are images the original model puts at the target; were they genuine ones (a clean file not drawn
    from the training set, a repair that moves target-class images), what the repair does to them would be a
    cost the held-out check no longer sees. With --trigger, images that stamping leaves as they are already
    carry it (a patch trigger's poisoned images): then a note; otherwise a warning."""
    x_out, rounds = np.concatenate(inputs.clean_left_out), len(inputs.clean_left_out)
    n = len(x_out)
    carriers = None
    if inputs.trigger is not None:
        stamped = inputs.trigger.apply(x_out).astype(np.int16)
        carriers = int((np.abs(stamped - x_out.astype(np.int16)).reshape(n, -1).max(axis=1) <= 1).sum())
    d.meta["clean_excluded"] = {"n": int(n), "rounds": rounds, "pool_left": int(len(inputs.pool)),
                                "carry_trigger": carriers}
    what = (f"{who}{n} clean images look triggered (the original model puts them at class {target}, and they "
            "score like the triggered samples along the repair's direction): left out "
            f"of the clean reference and the held-out check, and the fit redone on the other {len(inputs.pool)} "
            f"({rounds} round(s)); a clean file drawn from the training set can hold the attack's poisoned images")
    if carriers is not None and carriers >= CARRIERS_SHARE * n:
        req.notes.append(f"{what}; {carriers} of them already carry the trigger given")
        return
    d.meta.setdefault("checks", {}).setdefault("warnings", []).append(
        f"{what}. If the clean file is not drawn from the training set, they are genuine class-{target} images "
        "that the repair moves, a cost the held-out check no longer sees: give clean images from elsewhere, or "
        "measure with 'fire-onnx eval' on labelled images")


MIN_SUSPECTS = 3  # clean images that look triggered, from which fit leaves them out and fits again ...
SUSPECT_ROUNDS = 3  # ... at most this many times


def _check(req: FitRequest, inputs: FitInputs, d: dirs.Directions, clean: Images, triggered: Images,
           source: Images | None, progress, seek_suspects: bool = False) -> tuple[dirs.Directions, dict]:
    """The held-out check of ``d`` (``fire_onnx.fit.verify``), and the blend fit it chooses."""
    from fire_onnx.fit.verify import verify

    refit = None
    if d.meta.get("chain") and inputs.previous is None:  # several given layers: each cross-fit fold refits the chain
        from fire_onnx.fit.auto import refit_chain

        chain = _chain(d.targets, req.repair)
        refit = lambda t, src: refit_chain(req, inputs, chain, clean, t, src, progress)  # noqa: E731
    check = verify(req, inputs, d, triggered, clean, source, refit=refit, progress=progress,  # judged on held-out
                   seek_suspects=seek_suspects)
    return choose_blend_fit(req, inputs, clean, triggered, source, d, check)


def choose_blend_fit(req: FitRequest, inputs: FitInputs, clean: Images, triggered: Images, source: Images | None,
                     d: dirs.Directions, check: dict) -> tuple[dirs.Directions, dict]:
    """A confirmed blend reconstruction is fitted unpaired (``fire_onnx.fit.core.PSEUDO_PAIR_KINDS``: its
    pattern carries the flagged images' content noise). From few flagged images the unpaired shift is
    noisier still, and pseudo-pairs stamped with the pattern can do better: 5 flagged Fashion-MNIST Blended
    images left 81 % ASR unpaired and 38 % on pseudo-pairs, while from 20 images unpaired won on each of
    Fashion-MNIST, CIFAR-10 and GTSRB (26 / 8 / 36 % against 28 / 16 / 42 %). Neither wins everywhere, so
    with ``blend_fit="auto"`` both are fitted and the cross-fitted held-out check (``fire_onnx.fit.verify``)
    chooses: the pseudo-pairs only when they leave fewer held-out flagged images at the target without
    changing more clean predictions than the warning level; on a tie, unpaired. Returns (directions, check)."""
    from fire_onnx.fit.verify import CHANGE_WARN, verify

    rc = d.meta.get("reconstruction") or {}
    cross = check.get("cross_fit") or {}
    if (req.blend_fit != "auto" or rc.get("kind") != "blend" or not rc.get("confirmed")
            or "target_rate_after" not in cross):
        return d, check
    alt_req = copy.copy(req)
    alt_req.blend_fit = "pseudo-pairs"
    try:
        alt = fit_layers(alt_req, inputs, list(req.layers), clean, triggered, source)
        alt_check = verify(alt_req, inputs, alt, triggered, clean, source)
    except FireError as e:  # the alternative only; the unpaired fit stands
        d.meta["reconstruction"]["fit_choice"] = {"chosen": "unpaired", "pseudo-pairs": {"error": str(e)}}
        return d, check
    alt_rate = (alt_check.get("cross_fit") or {}).get("target_rate_after")
    take = (alt_rate is not None and alt_rate < cross["target_rate_after"] - 1e-9
            and alt_check["clean_change"] <= max(check["clean_change"], CHANGE_WARN))
    choice = {"unpaired": {"cross_fit_rate": cross["target_rate_after"], "clean_change": check["clean_change"]},
              "pseudo-pairs": {"cross_fit_rate": alt_rate, "clean_change": alt_check["clean_change"]},
              "chosen": "pseudo-pairs" if take else "unpaired"}
    if take:
        d, check = alt, alt_check
    d.meta["reconstruction"]["fit_choice"] = choice
    return d, check


def _distinct_triggered(req: FitRequest, images: Images, twins: np.ndarray | None):
    """The triggered file without repeated images (the first of each kept, with its label and twin). Copies add
    nothing to the estimate and fool every check that holds images out: 20 copies of one flagged image were
    cross-fitted as '0 % left' while the repair left 95 % ASR (new-user run 12)."""
    flat = images.x.reshape(len(images.x), -1)
    keys = flat if twins is None else np.concatenate([flat, twins.reshape(len(twins), -1)], axis=1)
    _, first = np.unique(np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel(), return_index=True)
    if len(first) == len(images.x):
        return images, twins
    keep = np.sort(first)
    n_rep = len(images.x) - len(keep)
    req.notes.append(f"{Path(req.triggered_path).name}: {n_rep} of its {len(images.x)} images repeat others and are "
                     f"left out ({len(keep)} distinct)")
    return images.subset(keep), (None if twins is None else twins[keep])


def _target_in_pool(req: FitRequest, pool: Images) -> str | None:
    """A labelled clean file without any image of --target: the held-out check cannot see what the repair does to
    that class (new-user run 20: a GTSRB repair fitted without class-2 images took that class from 84.9 % to 71.4 %,
    3.4 % with one class in the file, while the check read 0.0 % changed). A warning, not a refusal: a class that
    exists only through the trigger (tests/auto_synth.py) has no clean images to give, and a model that classifies
    well gives the target to no other clean image, so the model cannot tell the two cases apart; eval's per-class
    --fail-ca-drop measures the cost."""
    if req.target is None or pool.y is None or (pool.y == req.target).any():
        return None
    return (f"{req.clean_path} has no image labelled {req.target} (--target): the repair acts on what triggered "
            f"inputs share with class {req.target}, and without its clean images neither the clean reference nor the "
            "held-out check sees what it does to that class (a GTSRB repair fitted so took the class from 84.9 % to "
            f"71.4 % while the check read 0.0 % changed); add clean images of class {req.target}, and check the repair "
            "with 'fire-onnx eval --fail-ca-drop', which checks each class")


def _same_input_or_explain(req: FitRequest, onnx_model, model, pre: Preprocess, x: np.ndarray) -> None:
    """--model and --onnx are fed the same preprocessed images. An ONNX model that takes raw integer pixels
    (its preprocessing inside the graph) beside a PyTorch model that takes normalized floats has no
    preprocessing that suits both: say so and how to fit it, instead of one model's shape or dtype error
    after following the other's advice (new-user run 10)."""
    from fire_onnx.onnxutil import data_input

    inp = data_input(onnx_model.graph) if onnx_model is not None else None
    if inp is None:
        return
    from onnx import TensorProto, helper

    elem = inp.type.tensor_type.elem_type
    if elem == TensorProto.UNDEFINED or not np.issubdtype(helper.tensor_dtype_to_np_dtype(elem), np.integer):
        return
    raw = pre.scale == 1 and all(m == 0 for m in pre.mean) and all(v == 1 for v in pre.std)
    if raw:  # a factory that wraps the graph's preprocessing takes the raw pixels too
        import torch

        try:
            with torch.no_grad():
                model(torch.from_numpy(pre(x)))
            return
        except (RuntimeError, ValueError):
            pass
    name = TensorProto.DataType.Name(elem).lower()
    raise FireError(f"{Path(req.onnx_path).name} takes raw {name} pixels (its preprocessing is inside the graph) "
                    f"and the PyTorch model of --model {'rejects them' if raw else 'is fed normalized images'}: fit "
                    "feeds both the same input. Fit from the ONNX model alone (drop --model and --weights), or give a "
                    "--model factory that wraps the graph's preprocessing and pass --scale 1")


def load_inputs(req: FitRequest) -> FitInputs:
    """Read the images, the trigger and the model(s) ``req`` names (``--update``: the file it refines too)."""
    previous = None
    if req.update_path:
        from fire_onnx.fit.update import apply_previous, load_for_update

        previous = load_for_update(req.update_path)
        apply_previous(req, previous)
    k = req.k or (3 if req.method == "subspace" else 1)
    trig = triggers.parse(req.trigger_spec) if req.trigger_spec else None
    triggered_imgs, triggered_clean = load_triggered(req.triggered_path, req.split) if req.triggered_path else (None, None)
    if triggered_imgs is not None:
        triggered_imgs, triggered_clean = _distinct_triggered(req, triggered_imgs, triggered_clean)
    pool = load_images(req.clean_path, req.split)
    resolve_n_clean(req, len(pool))
    if triggered_imgs is not None and triggered_imgs.x.shape[1:] != pool.x.shape[1:]:
        # else the error came from the model ("expects shape ..., check --input-layout"), about a layout
        # that is right for the clean images
        a, b = list(triggered_imgs.x.shape[1:]), list(pool.x.shape[1:])
        hint = layout_hint(a, b)
        raise FireError(f"{req.triggered_path}: the triggered images are {a} but the clean images in {req.clean_path} "
                        f"are {b} (H, W, C): both must be uint8 NHWC images of the same size{hint}")

    onnx_model = None
    if req.onnx_path:
        from fire_onnx.onnxutil import load_model as load_onnx

        onnx_model = load_onnx(req.onnx_path)
        from fire_onnx.patch import has_repair_nodes

        if has_repair_nodes(onnx_model):  # its activations would be the repaired ones: the fit would see no backdoor
            raise FireError(f"{req.onnx_path} is already repaired by fire-onnx: fit on the original model it was patched "
                            "from; then 'fire-onnx patch --add' adds the new repair to the repaired model (another "
                            "backdoor), or 'patch --replace' swaps it for the old one (a refit of the same backdoor)")
    layout = req.input_layout
    if layout is None and onnx_model is not None:
        layout = infer_input_layout(onnx_model, pool.x.shape[1:])
        if layout == "NHWC":
            req.notes.append(f"input layout NHWC, read from the input shape of {Path(req.onnx_path).name}")
    pre = Preprocess(
        scale=1 / 255 if req.scale is None else req.scale,
        mean=req.mean or [0.0], std=req.std or [1.0], layout=layout or "NCHW",
    ).validate()

    meta = {"clean_file": Path(req.clean_path).name,
            "model": req.model_spec or Path(req.onnx_path).name,
            "weights": Path(req.weights).name if req.weights else "", "target": req.target,
            "trigger": triggers.describe(trig) if trig else None,
            "triggered_file": Path(req.triggered_path).name if req.triggered_path else None}
    model = None
    if req.model_spec and Path(req.model_spec).is_file():  # a TorchScript file: hooks do not run on it
        from fire_onnx.fit.torch_model import torchscript_to_onnx

        if req.weights or req.no_weights:
            raise FireError("--weights/--no-weights do not apply to a TorchScript file (its weights are inside)")
        if onnx_model is None:
            onnx_model = torchscript_to_onnx(req.model_spec, pre(pool.x[:2]))
        else:
            req.notes.append("fitting from the --onnx model; the TorchScript file is not needed")
        meta["model"] = Path(req.model_spec).name
    elif req.model_spec:
        from fire_onnx.fit.torch_model import load_model

        model = load_model(req.model_spec, req.weights, untrained=req.no_weights, notes=req.notes)
        _same_input_or_explain(req, onnx_model, model, pre, pool.x[:2])
    onnx_name = Path(req.onnx_path).name if req.onnx_path else "model.onnx"
    if model is not None or onnx_model is not None:
        from fire_onnx import preprocess_check
        from fire_onnx.fit.core import OnnxSource, TorchSource

        source = TorchSource(model, []) if model is not None else OnnxSource(onnx_model, [])
        rec = preprocess_check.run(req, pool, pre, source)
        if rec is not None:
            meta["preprocess_check"] = rec
    missing_target = _target_in_pool(req, pool)
    inputs = FitInputs(pool=pool, trigger=trig, triggered=triggered_imgs, triggered_clean=triggered_clean,
                       preprocess=pre, model=model, onnx_model=onnx_model, onnx_name=onnx_name, meta=meta, k=k,
                       previous=previous, warnings=[missing_target] if missing_target else [])
    if req.unlabeled_path:  # find the triggered inputs in the traffic: they become inputs.triggered
        from fire_onnx.fit.unlabeled import attach

        attach(req, inputs)
    if previous is not None:
        from fire_onnx.fit.update import merge_flagged

        merge_flagged(req, inputs)
    return inputs


N_CLEAN = 500  # clean samples fit uses by default
HELD_SHARE = 0.2  # without --n-clean, a clean file of fewer than N_CLEAN / (1 - HELD_SHARE) images keeps this share
MIN_HELD = 100  # ... and at least this many images (at most half the file) for the held-out check


def resolve_n_clean(req: FitRequest, n_pool: int) -> None:
    """Without ``--n-clean`` (``req.n_clean`` None), fit on N_CLEAN clean images, or fewer when the clean file
    would leave too few for the held-out check: a validation split of 500 images, the README's advice, used
    to leave none, and the check (clean change, cross-fitted flagged images, the blend's fit choice) was
    skipped without a warning while the repair written left 32 % ASR. Says so in ``req.notes``."""
    if req.n_clean is not None:
        return
    keep = min(max(MIN_HELD, int(HELD_SHARE * n_pool)), n_pool // 2)
    req.n_clean = max(2, min(N_CLEAN, n_pool - keep))
    if req.n_clean < N_CLEAN:
        req.notes.append(f"{Path(req.clean_path).name} has {n_pool} images: fit uses {req.n_clean} as clean samples "
                         f"and keeps {n_pool - req.n_clean} for the held-out check (--n-clean sets how many it uses)")


def select_samples(req: FitRequest, inputs: FitInputs):
    """(clean, triggered, triggered without trigger or None): the samples ``fit`` uses (seeded)."""
    clean, triggered, source = fit_samples(
        inputs.pool, n_clean=req.n_clean, n_triggered=req.n_triggered, seed=req.seed, target=req.target,
        trigger=inputs.trigger, triggered=inputs.triggered, triggered_clean=inputs.triggered_clean)
    note = lambda text: text in req.notes or req.notes.append(text)  # noqa: E731 - once: a refit selects again
    if len(clean) < req.n_clean:
        note(f"{req.clean_path} has only {len(clean)} clean images")
    if inputs.triggered is not None and inputs.trigger is None and len(inputs.triggered) > len(triggered) \
            and not req.update_path:
        from fire_onnx.fit.verify import MIN_TRIGGERED

        rest = len(inputs.triggered) - len(triggered)
        note(f"fitting on {len(triggered)} of the {len(inputs.triggered)} images of "
             f"{Path(req.triggered_path).name} (--n-triggered); "
             + ("the others check the repair" if rest >= MIN_TRIGGERED else
                f"the other {rest} are too few to check the repair on (at least {MIN_TRIGGERED}), so the check is "
                "cross-fitted") + f". --n-triggered {len(inputs.triggered)} fits on all of them"
             + (" (the check is then cross-fitted)" if rest >= MIN_TRIGGERED else ""))
    return clean, triggered, source


def fit_inputs(req: FitRequest, inputs: FitInputs, layers: list[str], clean: Images, triggered: Images,
               source: Images | None, *, progress: Progress | None = None, held: Images | None = None,
               tensors: dict[str, str] | None = None) -> dirs.Directions:
    """Fit ``layers`` on these samples with the options of ``req``.

    ``held``: clean pool images the trigger reconstruction may stamp (flagged images without twins);
    default: the pool images outside the seeded clean selection. ``tensors``: layer -> ONNX tensor
    (default: from ``req``).
    """
    from fire_onnx.fit.core import fit_directions

    if tensors is None:
        tensors = {req.layers[0]: req.tensor} if req.tensor else req.tensors
    reconstruct = "off"
    if req.reconstruct == "auto" and source is None:  # flagged images without their clean twins
        reconstruct = "auto"
        if held is None:
            # the pool images fit_samples did not pick as clean samples (same seeded order)
            rest = pool_order(inputs.pool, n_clean=req.n_clean, seed=req.seed)[1]
            held = inputs.pool.subset(rest) if len(rest) else None
    d = fit_directions(inputs.model, list(layers), clean, triggered, inputs.preprocess, method=req.method, k=inputs.k,
                       gate=req.gate, quantile=req.quantile, alpha=req.alpha, layout=req.layout,
                       batch_size=req.batch_size, onnx_model=inputs.onnx_model, meta=dict(inputs.meta),
                       triggered_source=source, progress=progress, tensors=tensors, target=req.target,
                       onnx_name=inputs.onnx_name, reconstruct=reconstruct, held=held, shrink=req.shrink,
                       repair=req.repair, previous=inputs.previous, merge=not inputs.refit_all,
                       pair_blend=req.blend_fit == "pseudo-pairs",
                       weak_floor=not req.trigger_free, gate_reach=req.gate_reach)
    if inputs.previous is not None:
        from fire_onnx.fit.update import stamp_update

        stamp_update(d, inputs.previous, req.update_path)
    return d


def fit_layers(req: FitRequest, inputs: FitInputs, layers: list[str], clean: Images, triggered: Images,
               source: Images | None, *, progress: Progress | None = None) -> dirs.Directions:
    """:func:`fit_inputs` for the ``--layer`` values of a plain fit. Several layers are one repair: patched
    together, a later layer sees activations the earlier repairs already changed, so a target fitted on the
    original activations may never fire (new-user run 9: conv1 + conv3 gave exactly conv1's logits). With the
    ONNX model they are fitted in graph order, each on activations with the earlier repairs applied, as a
    ``--layer auto --max-layers`` chain (:func:`fire_onnx.fit.auto.refit_chain`; ``meta["chain"]`` so that
    ``--update`` refines it in order). Without it (PyTorch only) they are fitted apart, with a warning."""
    d = fit_inputs(req, inputs, layers, clean, triggered, source, progress=progress)
    if len(d.targets) < 2 or inputs.previous is not None:
        return d
    if inputs.onnx_model is None or not all(t.tensor for t in d.targets):
        d.meta.setdefault("checks", {}).setdefault("warnings", []).append(
            f"the {len(d.targets)} layers were fitted apart, each on the original model's activations: patched "
            "together, a later layer sees activations the earlier repairs changed and its repair may never fire; "
            "give --onnx to fit them in sequence")
        return d
    from fire_onnx.fit.auto import refit_chain

    position = {o: i for i, n in enumerate(inputs.onnx_model.graph.node) for o in n.output}
    chain = _chain(sorted(d.targets, key=lambda t: position.get(t.tensor, len(position))), req.repair)
    # the first layer in graph order sees the original activations: its target in d is already that fit
    out = refit_chain(req, inputs, chain, clean, triggered, source, progress, first=d)
    out.meta["chain"] = [sc.site.label for sc in chain]
    return out


def _chain(targets: list[dirs.Target], repair: str) -> list:
    """``targets`` as the sites of a chain (:func:`fire_onnx.fit.auto.refit_chain`), in their order."""
    from fire_onnx.fit.auto import Score, Site

    return [Score(site=Site(tensor=t.tensor, module=t.module, shape=list(t.feature_shape or [])), repair=repair)
            for t in targets]


def summary(d: dirs.Directions) -> dict:
    """What fit reports (printed by the CLI, written by ``fit --json``)."""
    targets = []
    for t in d.targets:
        f = t.fit
        targets.append({
            "module": t.module, "tensor": t.tensor, "layout": t.layout, "dim": t.dim, "k": t.k, "gate": t.gate,
            "reference": f.get("reference"),
            "shrunk": bool(f.get("shrinkage")) and not str(f["shrinkage"].get("rule", "")).startswith("skipped"),
            "n_triggered": f.get("n_triggered"), "n_clean": f.get("n_clean"),
            "repair": t.repair, "updates": f.get("updates", 0),
            "separation_sigma": f.get("separation_sigma"), "tau_rule": f.get("tau_rule"),
            "gate_fires_triggered": f.get("gate_recall_triggered"), "gate_fires_clean": f.get("gate_fires_clean"),
            "warnings": list(f.get("warnings", [])),
        })
    checks = dict(d.meta.get("checks", {}))
    out = {"targets": targets, "checks": checks, "preprocess": d.preprocess,
            "warnings": list(checks.get("warnings", [])) + [w for t in targets for w in t["warnings"]]}
    if d.meta.get("reconstruction"):
        out["reconstruction"] = d.meta["reconstruction"]
    if d.meta.get("check"):
        out["check"] = d.meta["check"]
    if d.meta.get("auto"):
        out["auto"] = d.meta["auto"]
    if d.meta.get("unlabeled"):
        out["unlabeled"] = d.meta["unlabeled"]
    if d.meta.get("clean_excluded"):
        out["clean_excluded"] = d.meta["clean_excluded"]
    return out


def describe_reconstruction(rc: dict) -> str:
    """One line on the trigger reconstruction (printed by ``fit``)."""
    from fire_onnx.fit.verify import CHANGE_WARN

    if not rc.get("confirmed"):
        why = rc.get("reason") or f"best rate {rc.get('rate', 0):.0%} < {rc.get('threshold', 0.5):.0%}"
        return f"trigger reconstruction: nothing confirmed ({why}); unpaired estimate used"
    what = rc["kind"]
    if "mask_pixels" in rc:
        r0, r1, c0, c1 = rc["mask_box"]
        what += f" ({rc['name']}: {rc['mask_pixels']} px in rows {r0}-{r1 - 1}, cols {c0}-{c1 - 1})"
    elif "blend_ratio" in rc:
        what += f" (ratio {rc['blend_ratio']:.2f})"
    elif rc["kind"] == "additive":
        periods = [f for f in rc.get("frequencies", []) if f]  # 0 is the constant term
        freqs = f", periods per image {', '.join(map(str, periods))}" if periods else ""
        what += f" ({rc['name']}, L2 {rc.get('delta_l2', 0):.0f}{freqs})"
    tried = ", ".join(f"{c['name']} {c.get('rate', 0):.0%}" for c in rc.get("candidates", []))
    how = (f"fitted paired on {rc.get('pseudo_pairs', 0)} pseudo-pairs" if rc.get("fit") != "unpaired" else
           f"fitted unpaired on the flagged images (a {rc['kind']} reconstruction is too noisy to pair on)")
    choice = rc.get("fit_choice")
    if choice and "error" not in choice.get("pseudo-pairs", {}):
        rates = (f"{choice['pseudo-pairs']['cross_fit_rate']:.0%} against {choice['unpaired']['cross_fit_rate']:.0%} "
                 "of the held-out flagged images left at the target")
        pp, up = choice["pseudo-pairs"], choice["unpaired"]
        if choice["chosen"] == "pseudo-pairs":
            how = (f"fitted paired on {rc.get('pseudo_pairs', 0)} pseudo-pairs stamped with the reconstructed blend, "
                   f"which did better than the unpaired fit in the cross-fitted check ({rates})")
        elif pp["cross_fit_rate"] is not None and pp["cross_fit_rate"] < up["cross_fit_rate"]:
            how = ("fitted unpaired on the flagged images; pseudo-pairs stamped with the reconstructed blend left fewer "
                   f"in the cross-fitted check ({rates}) but changed {pp['clean_change']:.1%} of the held-out clean "
                   f"predictions (unpaired: {up['clean_change']:.1%}; more than {CHANGE_WARN:.0%} costs clean "
                   "accuracy)")
        else:
            how = ("fitted unpaired on the flagged images; pseudo-pairs stamped with the reconstructed blend did no "
                   f"better in the cross-fitted check ({rates})")
    return (f"trigger reconstruction: {what}, confirmed: {rc['rate']:.0%} of {rc['n_confirm']} held clean images "
            f"go to class {rc['majority_class']} when stamped; {how} (tried: {tried})")
