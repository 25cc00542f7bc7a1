"""Runtime peer defenses that FIRE is compared with, on uint8 NHWC images and an onnxruntime session.

Both run in front of (or around) the *unmodified* model; neither needs the model's code or gradients:

- :class:`ShrinkPad` (Li et al., 2021, "Backdoor attack in the physical world", arXiv 2104.02361): an input
  transform. Each image is shrunk by ``shrink`` pixels (bilinear, to (H-s) x (W-s)) and zero-padded back
  to H x W at a random offset; the prediction is the model's on the transformed image. A trigger that
  must sit at a fixed place and scale no longer does. Default ``shrink = 4``: BackdoorBox's
  ``ShrinkPad(size_map=32, pad=4)`` for 32x32 images (12.5 % of the side; 14 % on 28x28 digits).
- :class:`Strip` (Gao et al., 2019, arXiv 1902.06531) used as a *filter*: the input is superimposed on
  ``n_blend`` clean images from a held bank and the model's softmax entropy on the blends is averaged.
  A trigger that dominates the prediction keeps the entropy low, so an input whose mean entropy is
  below a threshold is rejected (the system abstains). The threshold is chosen on held clean images
  at a false-rejection rate (default ``frr = 0.05``: 5 % of clean inputs are turned away). Default
  ``n_blend = 20`` (a cost choice: 21 forward passes per input; the paper's setting reportedly uses ~100).
  Superimposition ``blend="add"`` (default) is the paper's: the pixels of the two images are added and
  saturate at 255 (its code's ``cv2.addWeighted(background, 1, overlay, 1, 0)``; BackdoorBench's
  alpha = beta = 1). ``blend="average"`` takes the pixel mean (0.5 / 0.5), which halves the trigger's
  contrast: on the demo's BadNets MNIST model it rejects ~40 % of triggered inputs at 5 % false
  rejections against ~99 % with "add"; on CIFAR-10 patches, where added natural images saturate, it
  does better than "add" (BENCHMARKS.md, runtime peers).

Metrics with abstention (:func:`abstention_metrics`): a rejected input is never a success of the
attack and never a correct answer. ASR = triggered non-target inputs classified as the target *and not
rejected*; CA = clean inputs classified correctly and not rejected (false rejections count as wrong);
RA = triggered inputs classified as their true label and not rejected. The rejection rates are reported
beside them.

:func:`measure_costs` times each method's per-input cost from uint8 pixels to its decision as a ratio to
the original model's (preprocessing + one forward pass), all methods interleaved in one loop.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from fire_onnx.data import Images, Preprocess
from fire_onnx.errors import FireError
from fire_onnx.evaluate import Metrics, predict_logits

DEFAULT_SHRINK = 4
DEFAULT_N_BLEND = 20
DEFAULT_FRR = 0.05
DEFAULT_COST_BATCH = 64
BLENDS = ("add", "average")


def _check_images(x, what: str = "images") -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        desc = f"{x.dtype} with shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise FireError(f"{what} must be uint8 NHWC images (N, H, W, C), got {desc}")
    if x.shape[0] == 0:
        raise FireError(f"{what} are empty: give at least one image")
    return x


# ------------------------------------------------------------------ ShrinkPad
def _resize_axis(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Bilinear resampling of ``a`` along ``axis`` to ``size`` samples (half-pixel centers, as
    torch's ``interpolate(mode="bilinear", align_corners=False)``; no antialiasing)."""
    n = a.shape[axis]
    src = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
    src = np.clip(src, 0, n - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (src - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = size
    w = w.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w


def bilinear_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 NHWC images resized to h x w (bilinear, rounded back to uint8)."""
    out = _resize_axis(_resize_axis(x.astype(np.float32), 1, h), 2, w)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass
class ShrinkPad:
    """Shrink by ``shrink`` pixels, zero-pad back at a random (seeded) offset; see the module docstring."""

    shrink: int = DEFAULT_SHRINK
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.shrink, bool) or not isinstance(self.shrink, (int, np.integer)) or self.shrink < 1:
            raise FireError(f"ShrinkPad's shrink must be a whole number of pixels >= 1, got {self.shrink!r}")

    def transform(self, x: np.ndarray) -> np.ndarray:
        """The transformed images (uint8, same shape). The offsets are drawn afresh from ``seed`` on every
        call: the same images in the same order give the same output."""
        x = _check_images(x)
        n, h, w, c = x.shape
        s = int(self.shrink)
        if s >= min(h, w):
            raise FireError(f"ShrinkPad cannot shrink {h}x{w} images by {s} pixels (shrink must be < {min(h, w)})")
        small = bilinear_resize(x, h - s, w - s)
        off = np.random.default_rng(self.seed).integers(0, s + 1, size=(n, 2))
        out = np.zeros_like(x)
        for dy, dx in {tuple(o) for o in off.tolist()}:  # at most (s + 1)^2 groups, not one loop per image
            idx = np.flatnonzero((off[:, 0] == dy) & (off[:, 1] == dx))
            out[idx, dy: dy + h - s, dx: dx + w - s] = small[idx]
        return out

    def predict(self, sess, x: np.ndarray, preprocess: Preprocess, batch_size: int = 256) -> np.ndarray:
        """The model's logits on the transformed images."""
        return predict_logits(sess, preprocess(self.transform(x)), batch_size)


# ------------------------------------------------------------------ STRIP
def _entropy(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=-1)


class Strip:
    """STRIP as a filter: per input, the mean softmax entropy over ``n_blend`` superimpositions with
    clean bank images; an input below :attr:`threshold` is rejected. Call :meth:`calibrate` on held
    clean images (not the test images) first."""

    def __init__(self, bank: np.ndarray, n_blend: int = DEFAULT_N_BLEND, frr: float = DEFAULT_FRR,
                 seed: int = 0, blend: str = "add", chunk: int = 64):
        bank = _check_images(bank, "STRIP's bank of clean images")
        if isinstance(n_blend, bool) or not isinstance(n_blend, (int, np.integer)) or n_blend < 1:
            raise FireError(f"STRIP's n_blend must be a whole number >= 1, got {n_blend!r}")
        if len(bank) < n_blend:
            raise FireError(f"STRIP blends each input with {n_blend} distinct bank images; the bank has only "
                            f"{len(bank)} (give more clean images or a smaller n_blend)")
        if not isinstance(frr, numbers.Real) or isinstance(frr, bool) or not 0 < frr < 1:
            raise FireError(f"STRIP's false-rejection rate must be a fraction in (0, 1), got {frr!r} (e.g. 0.05)")
        if blend not in BLENDS:
            raise FireError(f"STRIP's blend must be one of {', '.join(BLENDS)}, got {blend!r}")
        if chunk < 1:
            raise FireError("STRIP's chunk must be >= 1")
        self.bank, self.n_blend, self.frr, self.seed, self.chunk = bank, int(n_blend), float(frr), seed, int(chunk)
        self.blend = blend
        self.threshold: float | None = None
        self.calibration: dict = {}

    def entropy(self, sess, x: np.ndarray, preprocess: Preprocess) -> np.ndarray:
        """Mean softmax entropy (nats) of the model over each input's ``n_blend`` blends, shape (N,).
        The bank images each input is blended with are drawn from ``seed`` on every call (the same
        inputs in the same order give the same entropies)."""
        x = _check_images(x)
        if x.shape[1:] != self.bank.shape[1:]:
            raise FireError(f"STRIP's inputs are {list(x.shape[1:])} images, its bank holds {list(self.bank.shape[1:])} "
                            "ones: give bank images of the inputs' size and channels")
        rng = np.random.default_rng(self.seed)
        bank = self.bank.astype(np.float32)
        out = np.empty(len(x), np.float64)
        for i in range(0, len(x), self.chunk):
            xb = x[i: i + self.chunk].astype(np.float32)
            # n_blend distinct bank images per input
            pick = np.argsort(rng.random((len(xb), len(bank))), axis=1)[:, : self.n_blend]
            if self.blend == "add":  # (n, N, H, W, C), pixel space
                mix = np.minimum(xb[:, None] + bank[pick], 255.0)
            else:
                mix = 0.5 * xb[:, None] + 0.5 * bank[pick]
            logits = predict_logits(sess, preprocess(mix.reshape(-1, *x.shape[1:])),
                                    batch_size=len(xb) * self.n_blend)
            out[i: i + len(xb)] = _entropy(logits).reshape(len(xb), self.n_blend).mean(axis=1)
        return out

    def calibrate(self, sess, held: np.ndarray, preprocess: Preprocess) -> float:
        """Set :attr:`threshold` so that ``round(frr * len(held))`` of the held clean images fall below it
        (are rejected); returns it."""
        e = np.sort(self.entropy(sess, held, preprocess))
        k = int(round(self.frr * len(e)))
        if k <= 0:
            t = float(e[0])  # nothing strictly below the lowest
        elif k >= len(e):
            t = float(np.nextafter(e[-1], np.inf))
        else:
            t = float((e[k - 1] + e[k]) / 2)
        self.threshold = t
        self.calibration = {"n_held": int(len(e)), "frr": self.frr, "rejected_held": k, "threshold": t,
                            "entropy_p50": float(np.median(e))}
        return t

    def rejected(self, sess, x: np.ndarray, preprocess: Preprocess) -> np.ndarray:
        """Boolean mask of the inputs STRIP turns away (mean entropy below the threshold)."""
        if self.threshold is None:
            raise FireError("STRIP has no threshold yet: call calibrate() on held clean images first")
        return self.entropy(sess, x, preprocess) < self.threshold

    def decide(self, sess, x: np.ndarray, preprocess: Preprocess, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(the model's predicted classes on the unmodified inputs, the rejection mask)."""
        rej = self.rejected(sess, x, preprocess)
        pred = predict_logits(sess, preprocess(x), batch_size).argmax(axis=1)
        return pred, rej


# ------------------------------------------------------------------ metrics with abstention
@dataclass
class FilterMetrics(Metrics):
    """:class:`~fire_onnx.evaluate.Metrics` for a defense that may abstain: CA/ASR/RA count a rejected
    input as neither correct nor an attack success; plus the shares rejected."""

    clean_rejected: float | None = None  # clean test images turned away (false rejections)
    triggered_rejected: float | None = None  # triggered non-target test images turned away (detections)


def abstention_metrics(clean_pred, clean_y, clean_rejected=None, trig_pred=None, trig_y=None,
                       trig_rejected=None, target: int | None = None) -> FilterMetrics:
    """CA, ASR, RA (fractions) when rejected inputs abstain; ``*_rejected`` None means nothing rejected.
    ASR and RA are over the triggered inputs whose true label is not ``target``."""
    clean_pred, clean_y = np.asarray(clean_pred), np.asarray(clean_y)
    if clean_pred.shape != clean_y.shape or clean_pred.ndim != 1 or len(clean_y) == 0:
        raise FireError("clean predictions and labels must be equal-length non-empty 1-D arrays")
    cr = np.zeros(len(clean_y), bool) if clean_rejected is None else np.asarray(clean_rejected, bool)
    if cr.shape != clean_y.shape:
        raise FireError("the clean rejection mask must have one entry per clean image")
    accepted = ~cr
    m = FilterMetrics(ca=float(((clean_pred == clean_y) & accepted).mean()), n_clean=len(clean_y),
                      clean_rejected=float(cr.mean()))
    if target is not None and (clean_y != target).any():
        nt = clean_y != target
        m.asr_floor = float(((clean_pred == target) & accepted)[nt].mean())
    if trig_pred is not None:
        if target is None:
            raise FireError("ASR needs the attack's target class")
        trig_pred, trig_y = np.asarray(trig_pred), np.asarray(trig_y)
        if trig_pred.shape != trig_y.shape or trig_pred.ndim != 1:
            raise FireError("triggered predictions and labels must be equal-length 1-D arrays")
        tr = np.zeros(len(trig_y), bool) if trig_rejected is None else np.asarray(trig_rejected, bool)
        if tr.shape != trig_y.shape:
            raise FireError("the triggered rejection mask must have one entry per triggered image")
        keep = trig_y != target
        if not keep.any():
            raise FireError("every triggered image is of the target class; ASR is undefined")
        p, y, ok = trig_pred[keep], trig_y[keep], ~tr[keep]
        m.asr = float(((p == target) & ok).mean())
        m.ra = float(((p == y) & ok).mean())
        m.n_triggered = int(keep.sum())
        m.triggered_rejected = float(tr[keep].mean())
    return m


def _labelled(images: Images, what: str) -> Images:
    if images.y is None:
        raise FireError(f"the {what} images have no labels; CA/ASR/RA need them")
    _check_images(images.x, f"the {what} images")
    return images


def evaluate_shrinkpad(sess, sp: ShrinkPad, clean: Images, preprocess: Preprocess,
                       triggered: Images | None = None, target: int | None = None,
                       batch_size: int = 256) -> FilterMetrics:
    """CA/ASR/RA of the model behind ShrinkPad (it never abstains; the rejection rates are 0)."""
    clean = _labelled(clean, "clean")
    cp = sp.predict(sess, clean.x, preprocess, batch_size).argmax(axis=1)
    if triggered is None:
        return abstention_metrics(cp, clean.y, target=target)
    triggered = _labelled(triggered, "triggered")
    tp = sp.predict(sess, triggered.x, preprocess, batch_size).argmax(axis=1)
    return abstention_metrics(cp, clean.y, None, tp, triggered.y, None, target)


def evaluate_strip(sess, strip: Strip, clean: Images, preprocess: Preprocess,
                   triggered: Images | None = None, target: int | None = None,
                   batch_size: int = 256) -> FilterMetrics:
    """CA/ASR/RA of the model behind a calibrated STRIP filter, rejections counted as abstentions."""
    clean = _labelled(clean, "clean")
    cp, cr = strip.decide(sess, clean.x, preprocess, batch_size)
    if triggered is None:
        return abstention_metrics(cp, clean.y, cr, target=target)
    triggered = _labelled(triggered, "triggered")
    keep = triggered.y != target if target is not None else np.ones(len(triggered), bool)
    tp = np.full(len(triggered), -1)
    tr = np.zeros(len(triggered), bool)
    if keep.any():  # target-class triggered images do not count: do not spend STRIP's passes on them
        tp[keep], tr[keep] = strip.decide(sess, triggered.x[keep], preprocess, batch_size)
    return abstention_metrics(cp, clean.y, cr, tp, triggered.y, tr, target)


# ------------------------------------------------------------------ cost
def plain_runner(sess, preprocess: Preprocess) -> Callable[[np.ndarray], Any]:
    """Preprocessing + one forward pass of ``sess`` (the original model, or a FIRE-patched one)."""
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: preprocess(x)})


def measure_costs(runners: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, *,
                  reference: str = "original", batch: int = DEFAULT_COST_BATCH, repeats: int = 20,
                  warmup: int = 2) -> dict[str, dict]:
    """Per method: median seconds per call on a batch of ``batch`` uint8 images and the ratio of that median
    to the ``reference`` method's. All methods run interleaved in one loop (the order rotates every
    repeat) so that machine noise hits them alike. Timing only: never assert on it."""
    if reference not in runners:
        raise FireError(f"the reference method {reference!r} is not among the timed ones ({', '.join(runners)})")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise FireError("cost measurement needs batch >= 1, repeats >= 1 and warmup >= 0")
    x = _check_images(x)
    if len(x) < batch:
        raise FireError(f"cost measurement at batch {batch} needs at least {batch} images, got {len(x)}")
    xb = np.ascontiguousarray(x[:batch])
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n](xb)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            runners[n](xb)
            times[n].append(time.perf_counter() - t0)
    ref = float(np.median(times[reference]))
    return {n: {"ms_p50": 1e3 * float(np.median(t)), "us_per_input": 1e6 * float(np.median(t)) / batch,
                "ratio": float(np.median(t)) / ref, "batch": batch, "repeats": repeats} for n, t in times.items()}
