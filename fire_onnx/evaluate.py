"""Clean accuracy, attack success rate and robust accuracy of ONNX models in onnxruntime.

- CA: accuracy on the clean images.
- ASR: fraction of triggered images *whose true class is not the target* classified as the target.
- RA: fraction of the same triggered images classified as their true class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fire_onnx.data import Images, Preprocess, infer_layout
from fire_onnx import errors
from fire_onnx.errors import FireError, first_line
from fire_onnx.triggers import same_trigger

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise FireError("onnxruntime is not installed: pip install 'fire-onnx[cpu]' (or [gpu])") from None
    return ort


def _both_runtimes_installed() -> bool:
    from importlib import metadata

    found = 0
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.distribution(dist)
            found += 1
        except metadata.PackageNotFoundError:
            pass
    return found == 2


def session(model, provider: str = "cpu", threads: int = 0, optimization: str = "all"):
    """An InferenceSession on ``provider``; fails clearly if that provider did not load.

    ``model`` is a path or serialized bytes. For cuda/tensorrt the CPU provider stays as fallback for
    unsupported nodes, but the requested provider must be active.
    """
    ort = _ort()
    if provider not in PROVIDERS:
        raise FireError(f"provider must be one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        hint = ""
        if provider != "cpu" and _both_runtimes_installed():
            hint = ("; both onnxruntime and onnxruntime-gpu are installed and shadow each other: "
                    "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
        elif provider != "cpu":
            hint = "; install fire-onnx[gpu] (onnxruntime-gpu) instead of fire-onnx[cpu]"
        raise FireError(f"onnxruntime here has no {wanted} (available: {', '.join(ort.get_available_providers())}){hint}")
    chain = [wanted] if provider == "cpu" else [wanted, "CPUExecutionProvider"]
    if provider == "tensorrt":
        chain = [wanted, "CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    src = str(model) if isinstance(model, (str, Path)) else model
    try:
        sess = ort.InferenceSession(src, sess_options=opts, providers=chain)
    except Exception as e:
        msg = first_line(e)
        raise FireError(f"onnxruntime cannot load the model: {msg}") from None
    if wanted not in sess.get_providers():
        raise FireError(f"{wanted} is listed but did not load (check the CUDA/TensorRT libraries)")
    return sess


def single_input(sess, x: np.ndarray) -> str:
    """The name of the session's only input, after checking ``x`` fits its shape."""
    inp = sess.get_inputs()
    if len(inp) != 1:
        raise FireError(f"the model has {len(inp)} inputs; fire-onnx feeds single-input image models")
    expect = inp[0].shape
    if len(expect) != 4 and x.ndim == 4:  # (N, D), (N, C, T), ...: no image layout can feed it
        raise FireError(
            f"model input {inp[0].name!r} has shape {expect} (rank {len(expect)}): fire-onnx feeds images, (N, C, H, W) "
            "or (N, H, W, C) inputs only. For a vector or sequence model, export it with an image-shaped input (a "
            "reshape inside the model), fit and check that export, then patch the directions into the original "
            "(the repaired tensor is the same)")
    if len(expect) != x.ndim or any(isinstance(e, int) and e != s for e, s in zip(expect[1:], x.shape[1:])):
        raise FireError(
            f"model input {inp[0].name!r} expects shape {expect}, the preprocessed images are {list(x.shape)} "
            "(check --input-layout, the image size and the channels)"
        )
    return inp[0].name


# what fire-onnx feeds each input element type: the preprocessed images (float32), cast
INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16,
                "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def as_input(inp, x: np.ndarray) -> np.ndarray:
    """The preprocessed images ``x`` in the element type of the model input ``inp`` (a float16 export gets
    float16; a model that takes raw uint8 pixels gets them when they are whole numbers in range)."""
    want = INPUT_DTYPES.get(inp.type)
    if want is None:
        raise FireError(f"model input {inp.name!r} is {inp.type}; fire-onnx feeds images as float or integer tensors")
    want = np.dtype(want)
    if x.dtype == want:
        return x
    if np.issubdtype(want, np.integer):
        info = np.iinfo(want)
        if x.size and not (np.array_equal(x, np.round(x)) and x.min() >= info.min and x.max() <= info.max):
            raise FireError(f"model input {inp.name!r} is {inp.type}: the model takes raw pixel values and does its "
                            f"own preprocessing, but the preprocessed images are not whole numbers in [{info.min}, "
                            f"{info.max}]; pass --scale 1 --mean 0 --std 1 to feed the pixels as they are")
    return x.astype(want)


def run_batches(sess, x: np.ndarray, outputs, batch_size: int, progress=None) -> list[list[np.ndarray]]:
    """Run ``x`` through ``sess`` in batches; per requested output, the list of batch results (float16
    results as float32). A model exported with a fixed batch gets exactly that many images per call: the
    last call is padded with copies of its last image, whose results are dropped."""
    name = single_input(sess, x)
    inp = sess.get_inputs()[0]
    static_batch = inp.shape[0]
    fixed = isinstance(static_batch, int) and static_batch > 0
    if fixed:
        batch_size = static_batch  # a model exported with a fixed batch (often 1)
    parts: list[list[np.ndarray]] = []
    for i in range(0, len(x), batch_size):
        xb = as_input(inp, x[i : i + batch_size])
        n = len(xb)
        if fixed and n < batch_size:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - n, axis=0)])
        try:
            res = sess.run(outputs, {name: xb})
        except Exception as e:  # onnxruntime's InvalidArgument / Fail for inputs the model rejects
            msg = first_line(e)
            raise FireError(f"onnxruntime rejected the input batch: {msg}") from None
        if fixed and n < batch_size:
            res = [r[:n] if getattr(r, "ndim", 0) and r.shape[0] == batch_size else r for r in res]
        res = [r.astype(np.float32) if getattr(r, "dtype", None) == np.float16 else r for r in res]
        if not parts:
            parts = [[] for _ in res]
        for acc, r in zip(parts, res):
            acc.append(r)
        if progress:
            progress(min(i + batch_size, len(x)), len(x))
    return parts


def check_class_scores(shape) -> None:
    """The model's first output must be (N, classes) scores with at least 2 classes: a single score per image
    (a sigmoid binary classifier, a regression) has an argmax of 0 for every input, so CA, ASR and every
    check built on the predicted class would be meaningless (it read 100 % ASR and 100 % ASR floor)."""
    shape = list(shape)
    if len(shape) != 2:
        raise FireError(f"the model's first output has shape {shape}; fire-onnx needs (N, classes) class scores")
    if isinstance(shape[1], int) and shape[1] < 2:
        raise FireError(f"the model's first output has shape {shape}: one score per input, not class scores "
                        "(its argmax is always 0); fire-onnx needs (N, classes) scores with at least 2 classes "
                        "(for a binary sigmoid classifier, export the two scores [1 - p, p] or [-z, z])")


BEYOND_LABELS = 0.5  # share of clean images predicted beyond the labels' range that makes the scores suspect


def check_labels_in_range(pred: np.ndarray, y: np.ndarray, n_scores: int, outputs: list[str] | None = None) -> None:
    """Refuse predictions that mostly fall beyond the labels' range: the scored output is then not the class
    scores (a model whose first output was a 64-wide activation and its logits the second read 0 % CA and
    0.7 % ASR, "most go to class 27", on a backdoored 10-class model), or the labels belong to another
    dataset; either way CA, ASR and every check on predictions would mean nothing."""
    if not len(pred) or not len(y):
        return
    top = int(np.max(y))
    if top >= n_scores:  # no prediction can be right: accuracy reads as a wrong preprocessing (new-user run 8)
        share = float((y >= n_scores).mean())
        raise FireError(f"the labels go up to {top} but the model's output has {n_scores} class scores (classes 0.."
                        f"{n_scores - 1}); {share:.0%} of the labelled images have a label the model cannot predict: "
                        "the labels belong to other data or another class numbering"
                        + (f" (they run from 1 to {top}: numbered from 1? fire-onnx numbers classes from 0, as the "
                           "model's outputs are)" if int(np.min(y)) == 1 and top == n_scores else "")
                        + (f" (or the class scores are not the first of the model's outputs {', '.join(outputs)})"
                           if outputs and len(outputs) > 1 else ""))
    beyond = pred > top
    if float(beyond.mean()) <= BEYOND_LABELS:
        return
    most = int(np.bincount(pred[beyond]).argmax())
    which = (f"the model has {len(outputs)} outputs ({', '.join(outputs)}) and fire-onnx scores the first: export "
             "the class scores as the first output" if outputs and len(outputs) > 1 else
             "export the class scores as the model's (first) output")
    raise FireError(f"{beyond.mean():.0%} of the clean images are predicted as classes beyond the labels' range "
                    f"0..{top} (most as {most}) by an output with {n_scores} columns: it is probably not the class "
                    f"scores ({which}), or the labels belong to other data")


def predict_logits(sess, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    outs = run_batches(sess, x, [sess.get_outputs()[0].name], batch_size)[0]
    logits = np.concatenate(outs)
    check_class_scores(logits.shape)
    return logits


@dataclass
class Metrics:
    ca: float
    asr: float | None = None
    ra: float | None = None
    n_clean: int = 0
    n_triggered: int = 0
    # the share of clean images not of the target class that the model itself puts in the target class:
    # the ASR a repair that removed the trigger's effect entirely would still show (a 64 %-accurate
    # CIFAR-10 model sends ~4 % of clean images to any one class)
    asr_floor: float | None = None
    # per true class of the triggered images: {class: {"n", "asr", "to"}} ("to": the class most of them go to
    # when that is neither their label nor the target, with its share); a pooled ASR hides a backdoor that
    # works from one source class only, or one that sends each class elsewhere (new-user run 13)
    by_class: dict | None = None
    elsewhere: float | None = None  # triggered images sent neither to their label nor to the target
    # triggered images of the target class itself still classified as it, and its clean images' recall: a repair
    # can move target-class inputs that carry the trigger (new-user run 15: 59 % against 85.5 %)
    target_kept: float | None = None
    target_recall: float | None = None
    # clean accuracy per true class {class: {"n", "ca"}}: a repair fitted without a class's clean images took it from
    # 84.9 % to 3.4 % while the pooled CA moved 4 pt and every --fail-* check passed (new-user run 20)
    ca_by_class: dict | None = None
    # the triggered images had no labels (flagged inputs): ASR counts all of them, target-class ones included; no RA
    asr_unlabelled: bool = False
    target: int | None = None  # the --target ASR is measured against
    # {"class", "share"}: the class other than the target that most triggered images go to (labelled images: not
    # counting those at their own label), with its share of them: where the trigger leads when the target is wrong
    # (see wrong_target)
    top_other: dict | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def compute_metrics(
    sess,
    clean: Images,
    preprocess: Preprocess,
    triggered: Images | None = None,
    target: int | None = None,
    batch_size: int = 256,
) -> Metrics:
    from fire_onnx.data import check_images

    if isinstance(sess, (str, Path)):  # a path where a session was meant: open it
        sess = session(sess)
    clean = check_images(clean, "clean images")
    triggered = None if triggered is None else check_images(triggered, "triggered images")
    preprocess.validate()  # Preprocess(std=[0.0]) gave CA 10 % through numpy's divide-by-zero warnings
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer))):
        raise FireError(f"target must be a class index (an integer), got {target!r}")
    if clean.y is None:
        raise FireError("the clean images have no labels (key y / y_test); CA needs labels")
    logits = predict_logits(sess, preprocess(clean.x), batch_size)
    if target is not None and not 0 <= target < logits.shape[1]:
        raise FireError(f"target class {target} is out of range: the model has {logits.shape[1]} classes "
                        f"(0..{logits.shape[1] - 1})")
    pred = logits.argmax(axis=1)
    check_labels_in_range(pred, clean.y, logits.shape[1], [o.name for o in sess.get_outputs()])
    m = Metrics(ca=float((pred == clean.y).mean()), n_clean=len(clean))
    m.ca_by_class = {str(int(c)): {"n": int((clean.y == c).sum()), "ca": float((pred[clean.y == c] == c).mean())}
                     for c in np.unique(clean.y)}
    if target is not None and (clean.y != target).any():
        m.asr_floor = float((pred[clean.y != target] == target).mean())
    m.target = None if target is None else int(target)
    if triggered is not None and target is None:
        raise FireError("ASR needs the attack's target class (--target)")
    if triggered is not None and triggered.y is None:
        # flagged inputs have no labels: the share sent to the target needs none (new-user run 20 was refused), but
        # images of the target class itself cannot be told apart, and RA needs the labels
        tp = predict_logits(sess, preprocess(triggered.x), batch_size).argmax(axis=1)
        m.asr, m.n_triggered, m.asr_unlabelled = float((tp == target).mean()), len(triggered), True
        m.top_other = _top_other(tp, tp != target)
        return m
    if triggered is not None:
        keep = triggered.y != target
        if not keep.any():
            raise FireError("every triggered image is of the target class; ASR is undefined")
        if (~keep).any() and (clean.y == target).any():
            own = triggered.subset(~keep)
            m.target_kept = float((predict_logits(sess, preprocess(own.x), batch_size).argmax(axis=1) == target).mean())
            m.target_recall = float((pred[clean.y == target] == target).mean())
        trig = triggered.subset(keep)
        tp = predict_logits(sess, preprocess(trig.x), batch_size).argmax(axis=1)
        m.asr = float((tp == target).mean())
        m.ra = float((tp == trig.y).mean())
        m.n_triggered = len(trig)
        off = (tp != trig.y) & (tp != target)
        m.elsewhere = float(off.mean())
        m.top_other = _top_other(tp, off)
        m.by_class = {}
        for c in np.unique(trig.y):
            sel = trig.y == c
            rec = {"n": int(sel.sum()), "asr": float((tp[sel] == target).mean())}
            if (clean.y == c).any():  # the class's own clean images at the target: no repair goes below it
                rec["floor"] = float((pred[clean.y == c] == target).mean())
            if off[sel].any():
                to, k = np.unique(tp[sel & off], return_counts=True)
                rec.update(to=int(to[k.argmax()]), to_share=float(k.max() / sel.sum()))
            m.by_class[str(int(c))] = rec
    return m


def _top_other(pred: np.ndarray, sel: np.ndarray) -> dict | None:
    """{"class", "share"}: the most frequent of ``pred[sel]`` and its share of all of ``pred``; None when ``sel`` is
    empty."""
    if not sel.any():
        return None
    cls, k = np.unique(pred[sel], return_counts=True)
    return {"class": int(cls[k.argmax()]), "share": float(k.max() / len(pred))}


# --target given is probably not the trigger's: on the original model, fewer than this share of the triggered images
# reach it ...
TARGET_REACHED_MIN = 0.5
OTHER_CLASS_MOST = 0.5  # ... while one other class gets at least this share of them


def wrong_target(r: dict | None) -> dict | None:
    """Whether the model of metrics ``r`` (a :class:`Metrics` dict) shows the triggered images going to a class
    other than the target: under ``TARGET_REACHED_MIN`` of them at the target and at least ``OTHER_CLASS_MOST`` at
    one other class (labelled images: not counting those at their own label). Returns {"target", "target_share",
    "to_class", "to_share"}, or None. On the original (unrepaired) model that means the --target given is not the
    trigger's: B_flagged.npz went 100 % to class 3 on the original model, eval got --target 0, and both models
    printed ASR 0.0 % and "check ok" for --fail-asr 0.05. On a repaired model it is what a good repair does to
    unlabelled images of one source class, so only the original model is read (:func:`threshold_checks`)."""
    top = (r or {}).get("top_other")
    if not top or r.get("asr") is None or r.get("target") is None:
        return None
    if r["asr"] >= TARGET_REACHED_MIN or top["share"] < OTHER_CLASS_MOST:
        return None
    return {"target": r["target"], "target_share": r["asr"], "to_class": top["class"], "to_share": top["share"]}


def original_of(model: str, infos: list[ModelInfo]) -> str | None:
    """The original (unrepaired) model ``model`` is compared with: itself when it is not patched, else the first
    unpatched model given; None when every model is patched."""
    if any(i.path == model and not i.patched for i in infos):
        return model
    return next((i.path for i in infos if not i.patched), None)


def wrong_target_warnings(results: dict, infos: list[ModelInfo]) -> list[str]:
    """Warning lines for each unpatched model whose triggered images mostly go to a class other than --target
    (:func:`wrong_target`)."""
    out = []
    for i in infos:
        w = None if i.patched else wrong_target(results.get(i.path))
        if w:
            c, t = w["to_class"], w["target"]
            out.append(f"warning: {i.path}: {w['target_share']:.0%} of the triggered images reach --target {t} on "
                       f"the original model; {w['to_share']:.0%} go to class {c}: is the target {c}? ASR against "
                       f"class {t} measures a class the trigger does not reach, before or after a repair (--fail-asr "
                       "fails while this holds)")
    return out


MIN_CLASS = 20  # triggered images of one source class judged at 95 % confidence, each on its own
# ... smaller classes (from MIN_SMALL_CLASS images) are judged too, at 95 % over all of them together (Bonferroni):
# skipped, a GTSRB backdoor working only from six 10-image classes (10 of 10 at the target for one) passed
# --fail-asr 0.06 at 5.5 % pooled, without a warning (new-user run 20; 16 of GTSRB's 43 classes have < 20 images)
MIN_SMALL_CLASS = 5
TARGET_KEPT_GAP = 0.1  # warn when triggered target-class images keep their class this much less than clean ones
ELSEWHERE_WARN = 0.3  # warn when this share of triggered images goes neither to its label nor to the target


def worst_class(by_class: dict | None) -> tuple[str, dict, float] | None:
    """(class, its record, the lower 95 % bound of its ASR above the class's own floor) of the source class whose
    ASR is highest with confidence, among classes with at least MIN_SMALL_CLASS triggered images (those under
    MIN_CLASS at 95 % jointly: each at 1 - 0.05 / their number); None without per-class records. The floor (its
    clean images the model puts at the target) is subtracted: Fashion-MNIST shirts go to the T-shirt class without
    any trigger."""
    from fire_onnx.fit.verify import lower_bound

    by_class = by_class or {}
    n_small = sum(1 for r in by_class.values() if MIN_SMALL_CLASS <= r["n"] < MIN_CLASS)

    def level(n: int) -> float:
        return 0.95 if n >= MIN_CLASS else 1 - 0.05 / n_small

    rows = [(c, r, lower_bound(int(round(r["asr"] * r["n"])), r["n"], level(r["n"])) - r.get("floor", 0.0))
            for c, r in by_class.items() if r["n"] >= MIN_SMALL_CLASS]
    return max(rows, key=lambda t: t[2]) if rows else None


def attack_shape_warnings(path, m: Metrics, target: int) -> list[str]:
    """What a pooled ASR to one target hides: a source-specific backdoor (one class far above the pool) and one
    that sends triggered images elsewhere (all-to-all, or another target)."""
    out = []
    w = worst_class(m.by_class)
    if w is not None and w[2] > max(2 * m.asr, m.asr + 0.05):
        c, r, _ = w
        floor = f"; {r['floor']:.1%} of its clean ones" if r.get("floor") else ""
        out.append(f"warning: {path}: triggered class-{c} images reach class {target} at {r['asr']:.1%} ({r['n']} "
                   f"images{floor}) against {m.asr:.1%} pooled over all classes: a backdoor that works from some source "
                   "classes only is diluted by the pooled ASR; the JSON's by_class lists each class (--fail-asr also "
                   "checks the worst one)")
    if m.target_kept is not None and m.target_kept < m.target_recall - TARGET_KEPT_GAP:
        out.append(f"warning: {path}: triggered images of class {target} itself stay at class {target} only "
                   f"{m.target_kept:.1%} of the time, against {m.target_recall:.1%} of its clean images: the model "
                   "(or its repair) moves target-class inputs that carry the trigger (target_kept in the JSON)")
    if m.elsewhere is not None and m.elsewhere >= ELSEWHERE_WARN and m.elsewhere > m.asr:
        moves = [(c, r["to"]) for c, r in (m.by_class or {}).items() if r.get("to_share", 0) >= 0.5]
        shown = ", ".join(f"{c}->{t}" for c, t in moves[:6]) + (", ..." if len(moves) > 6 else "")
        kind = ("an all-to-all backdoor (each class to its own target)" if len({t for _, t in moves}) > 1
                else f"a backdoor to class {moves[0][1]}, not {target}" if moves else "a backdoor to other classes")
        out.append(f"warning: {path}: {m.elsewhere:.1%} of the triggered images go neither to their label nor to "
                   f"class {target}" + (f" ({shown})" if moves else "") + f": {kind}? ASR to --target {target} does "
                   f"not measure it; RA ({m.ra:.1%}, against CA {m.ca:.1%}) does (--fail-ra-drop)")
    return out


def outputs_note(sess, path) -> str | None:
    """A note naming the output that is scored when a model has several (a model that returns (features,
    probabilities) was scored on its features, 15 % CA, with nothing to say so)."""
    outs = sess.get_outputs()
    if len(outs) < 2:
        return None
    names = ", ".join(f"{o.name} {list(o.shape)}" for o in outs)
    return (f"note: {path} has {len(outs)} outputs ({names}); CA, ASR and RA use the first, {outs[0].name!r}, as "
            "the class scores (export the class scores as the first output if that is not them)")


def other_output_hint(sess, clean: Images, preprocess: Preprocess, ca: float, batch_size: int = 256) -> str | None:
    """When another output of a several-output model classifies the clean images much better than the first (the
    one scored), say so: (features[:, :10], logits) read 7.8 % CA with exit 0 and a note only (new-user run 18)."""
    from fire_onnx import preprocess_check

    outs = sess.get_outputs()
    if len(outs) < 2 or clean.y is None or ca >= preprocess_check.PROBE_BELOW:
        return None
    names = [o.name for o in outs[1:] if len(o.shape) == 2]
    if not names:
        return None
    n = min(len(clean), 1000)
    parts = run_batches(sess, preprocess(clean.x[:n]), names, batch_size)
    best = None
    for name, p in zip(names, parts):
        z = np.concatenate(p)
        if z.ndim != 2 or z.shape[1] < 2 or clean.y[:n].max() >= z.shape[1]:
            continue
        acc = float((z.argmax(axis=1) == clean.y[:n]).mean())
        if acc >= ca + preprocess_check.WARN_GAP and (best is None or acc > best[1]):
            best = (name, acc)
    if best is None:
        return None
    return (f"its output {best[0]!r} classifies {best[1]:.1%} of the first {n} clean images correctly, against "
            f"{ca:.1%} for the first output {outs[0].name!r}, which CA, ASR and RA use: the class scores are probably "
            f"{best[0]!r}; export them as the model's first output")


def num_classes(sess, sample: np.ndarray | None = None) -> int:
    """The class count of the model's first output: from its static shape, else from running ``sample``
    (a few preprocessed images)."""
    out = sess.get_outputs()[0]
    shape = out.shape
    if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
        check_class_scores(shape)
        return shape[1]
    if sample is None:
        raise FireError("the model's class count is not static; pass sample images to find it")
    res = run_batches(sess, sample, [out.name], len(sample))[0][0]
    check_class_scores(res.shape)
    return int(res.shape[1])


# ------------------------------------------------------------------ what a model records, for eval
PREPROCESS_FIELDS = ("scale", "mean", "std", "layout")
OPTION = {"scale": "--scale", "mean": "--mean", "std": "--std", "layout": "--input-layout"}


@dataclass
class ModelInfo:
    """What ``eval`` reads from a model file before running it (metadata and I/O shapes)."""

    path: str
    patched: bool = False
    preprocess: Preprocess | None = None  # recorded by patch (fire_onnx.preprocess)
    preprocess_error: str | None = None  # why the recorded preprocessing is unusable
    attack: dict | None = None  # {"target": ..., "trigger": ...} recorded by patch (fire_onnx.attack)
    attack_error: str | None = None
    input_dims: list | None = None  # the single graph input's dims, None for a dynamic one
    classes: int | None = None  # static class count of the first output (N, K)
    problems: list = field(default_factory=list)  # fire_onnx.patch.repair_problems: why its repair may not work


def parse_recorded_preprocess(text: str) -> Preprocess:
    """Strictly parse a ``fire_onnx.preprocess`` value; ValueError says what is wrong with it."""
    from fire_onnx.data import preprocess_from_record
    from fire_onnx.fileio import loads_json

    return preprocess_from_record(loads_json(text))


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def read_model_info(path: str | Path) -> ModelInfo:
    """Metadata and I/O shapes of an ONNX file (its weights are not loaded)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise FireError(f"model not found: {p}")
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise FireError(f"{p} is not a readable ONNX model: {first_line(e)}") from None
    return model_info(m, str(path))


def model_info(m, path: str = "") -> ModelInfo:
    """:func:`read_model_info` of a loaded ModelProto (``path`` names it in the record)."""
    from fire_onnx.fileio import is_int, loads_json
    from fire_onnx.patch import META_ATTACK, META_PREPROCESS, is_patched, repair_problems

    info = ModelInfo(path=path, patched=is_patched(m), problems=repair_problems(m))
    props = {q.key: q.value for q in m.metadata_props}
    if META_PREPROCESS in props:
        try:
            info.preprocess = parse_recorded_preprocess(props[META_PREPROCESS])
        except ValueError as e:
            info.preprocess_error = f"its {META_PREPROCESS} metadata {e}"
    if META_ATTACK in props:
        try:
            attack = loads_json(props[META_ATTACK])
            if not isinstance(attack, dict) or not isinstance(attack.get("trigger") or {}, dict) or not (
                    attack.get("target") is None or is_int(attack["target"])):
                raise ValueError
            info.attack = attack
        except ValueError:
            info.attack_error = f"its {META_ATTACK} metadata is not a JSON object with an integer target"
    init = {t.name for t in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in init]
    if len(inputs) == 1:
        info.input_dims = _dims(inputs[0])
    if m.graph.output:
        out = _dims(m.graph.output[0])
        if len(out) == 2 and out[1]:
            info.classes = out[1]
    return info


def model_preprocess(model_path: str | Path) -> Preprocess | None:
    """The preprocessing recorded by ``patch`` in a patched model's metadata, None if it records none;
    corrupt metadata raises FireError."""
    info = read_model_info(model_path)
    if info.preprocess_error:
        raise FireError(f"{model_path}: {info.preprocess_error}")
    return info.preprocess


# ------------------------------------------------------------------ which preprocessing each model gets
def describe_preprocess(p: Preprocess) -> str:
    scale = "1/255" if abs(p.scale - 1 / 255) < 1e-12 else f"{p.scale:g}"
    nums = lambda v: ",".join(f"{x:g}" for x in v)  # noqa: E731
    return f"scale={scale} mean={nums(p.mean)} std={nums(p.std)} layout={p.layout}"


@dataclass
class PreprocessChoice:
    """The preprocessing one model is evaluated with, and where each field came from: "recorded",
    "shared from <model>", "command line", "model input shape" or "default"."""

    preprocess: Preprocess
    fields: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        """The most common source, then the fields that differ, e.g. "recorded (mean: command line)"."""
        groups: dict[str, list[str]] = {}
        for f in PREPROCESS_FIELDS:
            groups.setdefault(self.fields[f], []).append(f)
        main = max(groups, key=lambda src: len(groups[src]))
        rest = "; ".join(f"{', '.join(fs)}: {src}" for src, fs in groups.items() if src != main)
        return f"{main} ({rest})" if rest else main

    def as_dict(self) -> dict:
        return {"values": self.preprocess.as_dict(), "from": self.source, "fields": dict(self.fields)}


def _fmt_dims(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def choose_preprocess(infos: list[ModelInfo], given: dict, image_shape) -> tuple[list[PreprocessChoice], list[str]]:
    """Per model, the preprocessing ``eval`` uses, and the note/warning lines that explain it.

    - ``given`` (the command line, fields scale/mean/std/layout that are set) overrides every model;
    - else a model uses what it records;
    - a model that records nothing uses what the others record when they all agree (else FireError:
      the command line must settle the fields on which they differ);
    - else the defaults (1/255, mean 0, std 1, NCHW), with a note;
    - the layout, unless given, follows the model's input shape where exactly one layout fits
      ``image_shape`` (H, W, C).
    Corrupt recorded preprocessing is a FireError unless the command line gives all four fields.
    """
    given = {k: v for k, v in given.items() if v is not None}
    lines: list[str] = []
    full = all(f in given for f in PREPROCESS_FIELDS)
    for info in infos:
        if info.preprocess_error and not full:
            raise FireError(f"{info.path}: {info.preprocess_error}; re-patch the model, or pass all of "
                            "--scale, --mean, --std and --input-layout to ignore it")
    recorders = [i for i in infos if i.preprocess is not None]
    default = Preprocess()
    choices = []
    for info in infos:
        if info.preprocess is not None:
            values = info.preprocess.as_dict()
            fields = dict.fromkeys(PREPROCESS_FIELDS, "recorded")
        elif recorders:
            values, fields = {}, {}
            # the model's own input shape settles the layout when the recorders disagree on it
            own_layout = None if "layout" in given else infer_layout(info.input_dims, image_shape)
            settled = {"layout"} if own_layout is not None else set()
            for f in PREPROCESS_FIELDS:
                seen = {json.dumps(r.preprocess.as_dict()[f]) for r in recorders}
                if len(seen) == 1:
                    values[f] = recorders[0].preprocess.as_dict()[f]
                    fields[f] = f"shared from {recorders[0].path}"
                elif f in settled:
                    values[f], fields[f] = own_layout, "model input shape"
                elif f not in given:
                    differ = [g for g in PREPROCESS_FIELDS
                              if len({json.dumps(r.preprocess.as_dict()[g]) for r in recorders}) > 1
                              and g not in given and g not in settled]
                    raise FireError(
                        f"{info.path} records no preprocessing and the models that do disagree on "
                        + ", ".join(differ) + " (" + "; ".join(f"{r.path}: {describe_preprocess(r.preprocess)}"
                                                               for r in recorders)
                        + "); pass " + ", ".join(OPTION[g] for g in differ) + " explicitly")
        else:
            values = default.as_dict()
            fields = dict.fromkeys(PREPROCESS_FIELDS, "default")
        for f, v in given.items():
            values[f], fields[f] = v, "command line"
        if "layout" not in given:
            inferred = infer_layout(info.input_dims, image_shape)
            if inferred is not None and inferred != values["layout"]:
                h, w, c = image_shape
                if fields["layout"] == "recorded":
                    lines.append(f"warning: {info.path}: the recorded layout {values['layout']} does not fit the "
                                 f"model's input shape {_fmt_dims(info.input_dims)} for {h}x{w}x{c} images; "
                                 f"using {inferred} (--input-layout overrides)")
                values["layout"], fields["layout"] = inferred, "model input shape"
            elif inferred is not None and fields["layout"] == "default":
                fields["layout"] = "model input shape"
        pre = Preprocess(scale=float(values["scale"]), mean=list(values["mean"]), std=list(values["std"]),
                         layout=values["layout"]).validate()
        c = image_shape[-1]
        for f in ("mean", "std"):
            n = len(values[f])
            if n not in (1, c):
                raise FireError(f"{info.path}: {f} has {n} values ({fields[f]}) but the images have {c} channels; "
                                f"pass {OPTION[f]} with 1 or {c} values")
        choices.append(PreprocessChoice(pre, fields))
    lines += _preprocess_notes(infos, choices)
    return choices, lines


def _preprocess_notes(infos: list[ModelInfo], choices: list[PreprocessChoice]) -> list[str]:
    """One note line per group of models that use a shared or default preprocessing."""
    groups: dict[tuple, list[str]] = {}
    for info, ch in zip(infos, choices):
        srcs = set(ch.fields.values())
        shared = sorted({s for s in srcs if s.startswith("shared from ")})
        defaults = [f for f in PREPROCESS_FIELDS if ch.fields[f] == "default"]
        if shared:
            key = ("shared", shared[0][len("shared from "):], describe_preprocess(ch.preprocess))
        elif defaults:
            key = ("default", tuple(defaults), describe_preprocess(ch.preprocess), ch.fields["layout"])
        else:
            continue
        groups.setdefault(key, []).append(info.path)
    lines = []
    for key, paths in groups.items():
        names = ", ".join(paths)
        if key[0] == "shared":
            verb = "records" if len(paths) == 1 else "record"
            lines.append(f"note: {names} {verb} no preprocessing; using the one recorded in {key[1]} ({key[2]}); "
                         "--scale/--mean/--std/--input-layout override it")
        else:
            _, defaults, desc, layout_src = key
            how = ", ".join(OPTION[f] for f in defaults)
            layout = {"model input shape": " (layout from the model's input shape)",
                      "default": " (the model's input shape does not tell the layout)"}.get(layout_src, "")
            lines.append(f"note: {names}: no preprocessing recorded or given for {', '.join(defaults)}; "
                         f"using {desc}{layout}; set {how} to change it")
    return lines


# ------------------------------------------------------------------ attack recorded vs evaluated
def _trigger_diff(recorded: dict, given: dict) -> str:
    if recorded.get("kind") != given.get("kind"):
        return f"{given.get('kind')} given, {recorded.get('kind')} recorded"
    keys = [k for k in dict.fromkeys([*given, *recorded])
            if k != "kind" and not k.endswith("_sha256") and given.get(k) != recorded.get(k)]
    if not keys:  # same names, other contents
        keys = [k[: -len("_sha256")] for k in dict.fromkeys([*given, *recorded])
                if k.endswith("_sha256") and given.get(k) != recorded.get(k)]
        return ", ".join(f"{k}: the file's content differs from the one fitted with" for k in keys)
    show = lambda v: "(none)" if v in ("", None) else v  # noqa: E731
    return ", ".join(f"{k}={show(given.get(k))} given, {show(recorded.get(k))} recorded" for k in keys)


REPAIR_LEFT_MIN = 0.2  # repair_left judges triggers that send at least this share to the target on the original ...
REPAIR_LEFT_FLOORS = 3  # ... and this many times its ASR floor


def repair_left(results: dict, infos: list[ModelInfo]) -> list[str]:
    """Warning lines for patched models that remove little of the ASR an unpatched one beside them shows: a trigger
    other than the one fitted, or a repair a later tool broke (static INT8 quantization turned the gate off and eval
    printed 99.9 % ASR without a word, new-user run 16). First, the lines of :func:`wrong_target_warnings`: an ASR
    the original model does not show because --target is not the trigger's."""
    wrong = wrong_target_warnings(results, infos)
    base = [i.path for i in infos if not i.patched and results.get(i.path, {}).get("asr") is not None]
    if len(base) != 1:
        return wrong
    b, floor = results[base[0]]["asr"], results[base[0]].get("asr_floor") or 0.0
    # a trigger that fools the original model on 44 % of the images and the repaired one on 42 % is a bypass too
    # (new-user run 26: a patch shifted 2 px got no warning, the same gap at 50 % did): from REPAIR_LEFT_MIN, and
    # well above what the model sends to the target without any trigger
    if b < REPAIR_LEFT_MIN or b < REPAIR_LEFT_FLOORS * floor:
        return wrong
    return wrong + [
        f"warning: {i.path}: ASR {results[i.path]['asr']:.1%} against {b:.1%} for {base[0]}: the repair removes "
        "little of this trigger (a trigger other than the one fitted, or a repair a later tool changed: see "
        "'fire-onnx inspect')" for i in infos
        if i.patched and results.get(i.path, {}).get("asr") is not None and results[i.path]["asr"] >= 0.5 * b]


CLASS_DROP_WARN = 0.05  # warn when a class's CA drop is confidently above this


def class_drops(base: dict | None, patched: dict | None) -> list[tuple[str, float, int, float]]:
    """(class, CA drop, its clean images, lower 95 % bound of the drop) per class of ``base``/``patched``
    ``ca_by_class`` records with at least MIN_SMALL_CLASS images, worst bound first. The bound treats the net loss
    as lost images (conservative), at 95 % over all those classes together (Bonferroni)."""
    from fire_onnx.fit.verify import lower_bound

    rows = [(c, b["ca"] - patched[c]["ca"], b["n"]) for c, b in (base or {}).items()
            if c in (patched or {}) and b["n"] >= MIN_SMALL_CLASS]
    level = 1 - 0.05 / max(len(rows), 1)
    out = [(c, drop, n, lower_bound(int(round(drop * n)), n, level)) for c, drop, n in rows]
    return sorted(out, key=lambda t: -t[3])


def class_drop_warnings(results: dict, infos: list[ModelInfo]) -> list[str]:
    """Warning lines for patched models under which one class loses much more clean accuracy than the pool, against
    the one unpatched model beside them."""
    base = [i.path for i in infos if not i.patched and results.get(i.path, {}).get("ca_by_class")]
    if len(base) != 1:
        return []
    b = results[base[0]]
    out = []
    for i in infos:
        r = results.get(i.path) or {}
        if not i.patched or not r.get("ca_by_class"):
            continue
        drops = class_drops(b["ca_by_class"], r["ca_by_class"])
        if drops and drops[0][3] > CLASS_DROP_WARN:
            c, drop, n, _ = drops[0]
            out.append(f"warning: {i.path}: class {c} loses {drop:.1%} of clean accuracy ({n} images: "
                       f"{b['ca_by_class'][c]['ca']:.1%} -> {r['ca_by_class'][c]['ca']:.1%}) against {b['ca'] - r['ca']:.1%} "
                       f"overall vs {base[0]}: the repair removes features of that class (fitted without its clean "
                       "images, or at a layer where the class resembles triggered inputs); --fail-ca-drop also "
                       "checks each class")
    return out


def repaired_classes(info: ModelInfo) -> list[int]:
    """The classes a patched model records its repairs as being for (``fire_onnx.attack``: ``targets`` when
    several were stacked with ``patch --add``, else ``target``); [] when it records none."""
    from fire_onnx.patch import attack_classes

    return attack_classes(info.attack)


def attack_warnings(infos: list[ModelInfo], target: int | None, trigger: dict | None) -> list[str]:
    """Warning lines where ``target`` / ``trigger`` (a triggers.describe() dict) differ from what a
    patched model records as the attack it was fitted for, and what makes a patched model's repair not work
    (:func:`fire_onnx.patch.repair_problems`)."""
    lines = [f"warning: {info.path}: {w}" for info in infos for w in info.problems]
    for info in infos:
        if info.attack_error:
            lines.append(f"warning: {info.path}: {info.attack_error}; cannot compare --target/--trigger with it")
            continue
        rec = info.attack or {}
        listed = repaired_classes(info)  # several when repairs were stacked with patch --add
        if target is not None and listed and target not in listed:
            lines.append(f"warning: {info.path} was repaired for target{'s' if len(listed) > 1 else ''} "
                         f"{', '.join(str(c) for c in listed)}, --target is {target}: ASR and RA measure a different "
                         "attack")
        # a trigger-free repair records the trigger it recovered, not an attack spec: evaluating it with the real
        # trigger is what README asks for, not a mismatch to warn about
        recovered = isinstance(rec.get("trigger"), dict) and rec["trigger"].get("kind") == "trigger-free"
        if trigger is not None and rec.get("trigger") and not recovered and not same_trigger(rec["trigger"], trigger):
            lines.append(f"warning: {info.path} was fitted with another trigger than --trigger "
                         f"({_trigger_diff(rec['trigger'], trigger)})")
        elif trigger is not None and info.attack is not None and not rec.get("trigger"):
            # fitted from a triggered file or flagged inputs: a check passing on another trigger would go unnoticed
            lines.append(f"note: {info.path} records no trigger spec (fitted from triggered images), so --trigger "
                         "cannot be compared with what it was fitted for: ASR and RA are for the trigger given")
    return lines


# ------------------------------------------------------------------ CI thresholds
CHECK_FAILED_EXIT = errors.CHECK_FAILED_EXIT
_EPS = 1e-9  # metrics are ratios of counts: do not fail on float rounding at the limit


def threshold_checks(results: dict, infos: list[ModelInfo], fail_asr: float | None = None,
                     fail_ca: float | None = None, fail_ca_drop: float | None = None,
                     misread: dict | None = None, fail_ra_drop: float | None = None) -> list[dict]:
    """The --fail-* checks on ``results`` (model path -> Metrics dict).

    Checked models: the patched ones; when no model is patched, every model. --fail-ca-drop compares
    with the one unpatched model (the baseline). Call :func:`check_threshold_args` first. ``misread``
    (model path -> why): models that the preprocessing check says read the images wrongly; when any --fail-*
    is given, such a model fails a ``preprocessing`` check, since every number measured through it is
    meaningless (new-user run 14: a repair that removed nothing passed --fail-asr 0.02 on a model that
    classified 12 % of the images, every input at one class, so 0 % ASR). With --fail-asr, a model whose original
    (:func:`original_of`) sends the triggered images mostly to another class than the target (:func:`wrong_target`)
    fails an ``asr_target`` check: its ASR is measured against a class the trigger does not reach."""
    patched = [i.path for i in infos if i.patched]
    checked = patched or [i.path for i in infos]
    baseline = next((i.path for i in infos if not i.patched), None)
    checks = []

    def add(model, name, value, limit, passed, **extra):
        checks.append({"model": model, "check": name, "value": value, "limit": limit, "passed": bool(passed), **extra})

    misread = misread or {}
    for m in checked:
        r = results[m]
        if any(v is not None for v in (fail_asr, fail_ca, fail_ca_drop, fail_ra_drop)):
            who = next((w for w in (m, baseline if fail_ca_drop is not None else None) if w in misread), None)
            if who is not None:  # once per model: its own reading, else its baseline's
                add(m, "preprocessing", None, None, False, model_misread=who, why=misread[who])
        if fail_asr is not None:
            add(m, "asr", r["asr"], fail_asr, r["asr"] <= fail_asr + _EPS, floor=r.get("asr_floor"))
            w = worst_class(r.get("by_class"))
            if w is not None and w[2] > fail_asr + _EPS:  # confidently over the limit from one source class
                add(m, "asr_class", w[1]["asr"], fail_asr, False, source_class=w[0], n=w[1]["n"], lower_bound=w[2])
            orig = original_of(m, infos)
            wrong = wrong_target(results.get(orig)) if orig else None
            if wrong:  # a low ASR against a class the trigger does not reach proves nothing
                add(m, "asr_target", r["asr"], fail_asr, False, original=orig, **wrong)
            else:
                info = next(i for i in infos if i.path == m)
                classes = repaired_classes(info)
                if info.patched and classes and r.get("target") is not None and r["target"] not in classes:
                    # the patched model alone, repaired for class 0 and checked with --target 3: 0.7 % ASR against
                    # a class the repair is not for passed "check ok" beside a warning
                    add(m, "asr_repaired_for", r["asr"], fail_asr, False, target=r["target"], repaired_for=classes)
        if fail_ra_drop is not None and r.get("ra") is not None:
            add(m, "ra_drop", r["ca"] - r["ra"], fail_ra_drop, r["ca"] - r["ra"] <= fail_ra_drop + _EPS)
        if fail_ca is not None:
            add(m, "ca", r["ca"], fail_ca, r["ca"] >= fail_ca - _EPS)
        if fail_ca_drop is not None:
            drop = results[baseline]["ca"] - r["ca"]
            add(m, "ca_drop", drop, fail_ca_drop, drop <= fail_ca_drop + _EPS, baseline=baseline)
            drops = class_drops(results[baseline].get("ca_by_class"), r.get("ca_by_class"))
            if drops and drops[0][3] > fail_ca_drop + _EPS:  # confidently over the limit on one class
                c, d_c, n, lb = drops[0]
                add(m, "ca_drop_class", d_c, fail_ca_drop, False, baseline=baseline, clean_class=c, n=n, lower_bound=lb)
    return checks


def check_threshold_args(infos: list[ModelInfo], fail_asr, fail_ca_drop, has_triggered: bool) -> None:
    """Refuse --fail-* combinations that cannot be checked, before any evaluation."""
    if fail_asr is not None and not has_triggered:
        raise FireError("--fail-asr needs triggered images: pass --trigger or --triggered (and --target)")
    if fail_ca_drop is not None:
        unpatched = [i.path for i in infos if not i.patched]
        if len(unpatched) != 1 or len(unpatched) == len(infos):
            raise FireError("--fail-ca-drop compares patched models with one unpatched baseline; give exactly one "
                            f"unpatched model and at least one patched one (unpatched here: {', '.join(unpatched) or 'none'})")


def format_check(c: dict) -> str:
    if c["check"] == "preprocessing":
        who = "" if c["model_misread"] == c["model"] else f" (its baseline {c['model_misread']})"
        return (f"check FAILED: {c['model']}: the images are read wrongly{who}, so no number measured through it "
                f"can pass: {c['why']}")
    if c["check"] == "asr_class":
        return (f"check FAILED: {c['model']}: ASR of triggered class-{c['source_class']} images {100 * c['value']:.2f}% "
                f"({c['n']} images; at 95% confidence {100 * c['lower_bound']:.2f}% or more above the class's own "
                f"clean images at the target) > {100 * c['limit']:.2f}% (--fail-asr {c['limit']:g}, checked per "
                "source class too)")
    if c["check"] == "asr_target":
        where = "on this model" if c["original"] == c["model"] else f"on the original model {c['original']}"
        return (f"check FAILED: {c['model']}: ASR {100 * c['value']:.2f}% is measured against --target {c['target']}, "
                f"a class the trigger does not reach: {where} {100 * c['target_share']:.1f}% of the triggered images "
                f"go to class {c['target']} and {100 * c['to_share']:.1f}% to class {c['to_class']} (is the target "
                f"{c['to_class']}?), so no ASR against class {c['target']} can show the backdoor (--fail-asr "
                f"{c['limit']:g})")
    if c["check"] == "asr_repaired_for":
        return (f"check FAILED: {c['model']}: ASR {100 * c['value']:.2f}% is measured against --target {c['target']}, "
                f"but the model was repaired for {'class' if len(c['repaired_for']) == 1 else 'classes'} "
                f"{', '.join(str(k) for k in c['repaired_for'])}: a low ASR against another class shows nothing "
                f"about the repair (--fail-asr {c['limit']:g}; give --target "
                f"{c['repaired_for'][0]}{' or another of them' if len(c['repaired_for']) > 1 else ''})")
    if c["check"] == "ca_drop_class":
        return (f"check FAILED: {c['model']}: CA drop vs {c['baseline']} on class-{c['clean_class']} clean images "
                f"{100 * c['value']:.2f}% ({c['n']} images; at 95% confidence {100 * c['lower_bound']:.2f}% or more) > "
                f"{100 * c['limit']:.2f}% (--fail-ca-drop {c['limit']:g}, checked per class too)")
    name = {"asr": "ASR", "ca": "CA", "ca_drop": "CA drop", "ra_drop": "CA - RA"}[c["check"]]
    op = (">=" if c["check"] == "ca" else "<=") if c["passed"] else ("<" if c["check"] == "ca" else ">")
    opt = {"asr": "--fail-asr", "ca": "--fail-ca", "ca_drop": "--fail-ca-drop", "ra_drop": "--fail-ra-drop"}[c["check"]]
    vs = f" vs {c['baseline']}" if c.get("baseline") else ""
    floor = c.get("floor")
    # a limit under the model's own floor fails every repair (new-user run 21: a binary model's floor of 12.2 % against
    # --fail-asr 0.05, "check FAILED: ASR 12.40%" and nothing said why)
    below = (f"; the limit is below this model's ASR floor {100 * floor:.2f}% (clean non-target images it puts at the "
             "target itself), which no repair goes under" if not c["passed"] and floor is not None
             and floor > c["limit"] + _EPS else "")
    return (f"check {'ok' if c['passed'] else 'FAILED'}: {c['model']}: {name}{vs} {100 * c['value']:.2f}% {op} "
            f"{100 * c['limit']:.2f}% ({opt} {c['limit']:g}){below}")
