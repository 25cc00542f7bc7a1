"""Read ONNX tensors in onnxruntime, and fingerprint the model a directions file was fitted on.

No torch here: ``patch`` uses this module to check that the directions it is about to insert were
fitted on *this* model, and ``fit`` uses it to read activations from an ONNX model.

Fingerprint. ``fit`` feeds a few deterministic *probe* images through the model (the mean of the
clean fitting images, a seeded noise image, and their 50/50 blend; stored in the directions file as
``probe.x``, uint8 NHWC) and records, per target and probe, a short vector of statistics of the
activation at the target: its mean, its standard deviation, and its projections on a few seeded
random directions (scaled by 1/sqrt(D)). ``patch`` runs the same probes through the ONNX model with
the recorded preprocessing and compares: directions fitted on another model of the same shapes, a
module output that is not what the ONNX tensor holds (a BatchNorm folded into the Conv by the
exporter), or a ``--tensor`` that points elsewhere all differ by far more than the float noise
between PyTorch and onnxruntime (about 1e-6 relative).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fire_onnx.errors import FireError

N_PROBES = 3
N_PROJECTIONS = 8
PROJECTION_SEED = 20260211
PROBE_SEED = 7
FINGERPRINT_TOL = 1e-2  # relative difference above which two activations are "another model"
FINGERPRINT_VERSION = 1

Progress = Callable[[int, int], None]


def probe_images(clean_x: np.ndarray) -> np.ndarray:
    """The probe images (uint8, (3, H, W, C)) for clean images ``clean_x`` (uint8 NHWC)."""
    mean = np.clip(np.rint(clean_x.astype(np.float64).mean(axis=0)), 0, 255).astype(np.uint8)
    noise = np.random.default_rng(PROBE_SEED).integers(0, 256, size=mean.shape, dtype=np.uint8)
    blend = ((mean.astype(np.uint16) + noise.astype(np.uint16)) // 2).astype(np.uint8)
    return np.stack([mean, noise, blend])


def _projections(d: int) -> np.ndarray:
    return np.random.default_rng(PROJECTION_SEED).standard_normal((N_PROJECTIONS, d)).astype(np.float32)


def activation_stats(acts: np.ndarray) -> np.ndarray:
    """(P, ...) activations of the probes -> (P, 2 + N_PROJECTIONS) statistics in float64."""
    a = np.asarray(acts, dtype=np.float64).reshape(len(acts), -1)
    d = a.shape[1]
    with np.errstate(all="ignore"):
        proj = (a.astype(np.float32) @ _projections(d).T).astype(np.float64) / np.sqrt(d)
        return np.concatenate([a.mean(axis=1, keepdims=True), a.std(axis=1, keepdims=True), proj], axis=1)


def fingerprint(acts: np.ndarray) -> dict:
    """The fingerprint record of one target (stored in its header) from the probes' activations."""
    return {"version": FINGERPRINT_VERSION, "stats": activation_stats(acts).tolist()}


def difference(recorded: dict, acts: np.ndarray) -> float:
    """Relative difference between a recorded fingerprint and the probes' activations now (0 = same)."""
    ref = np.asarray(recorded["stats"], dtype=np.float64)
    now = activation_stats(acts)
    if ref.shape != now.shape:
        return float("inf")
    fin = np.isfinite(ref)
    if not np.array_equal(fin, np.isfinite(now)):
        return float("inf")
    ref, now = np.where(fin, ref, 0.0), np.where(fin, now, 0.0)
    scale = max(float(np.linalg.norm(ref)), float(np.linalg.norm(now)), 1e-12)
    return float(np.linalg.norm(ref - now)) / scale


def valid_fingerprint(fp) -> bool:
    """Whether a header value is a usable fingerprint record (old or hand-made files have none)."""
    if not isinstance(fp, dict) or fp.get("version") != FINGERPRINT_VERSION:
        return False
    stats = fp.get("stats")
    if not isinstance(stats, list) or not all(
            isinstance(row, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
            for row in stats):
        return False
    try:
        arr = np.asarray(stats, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return False
    # statistics of float32 activations: finite ones stay within a few float32 maxima
    return (arr.ndim == 2 and arr.shape[1] == 2 + N_PROJECTIONS and arr.shape[0] >= 1
            and bool(np.all(np.abs(arr[np.isfinite(arr)]) <= 1e39)))


# ----------------------------------------------------------------------------- the batch axis
class BatchAxisError(FireError):
    """A tensor (or module output) whose first axis is not the batch: fit refuses it, and patch's fingerprint
    check passes the message on rather than blaming the probe images."""


def batch_later_text(what: str, axis: int, shape) -> str:
    """``what`` (a tensor or module, with its shape) holds the batch on ``axis``: the sentence fit and patch share."""
    form = " ([T, B, D], as nn.TransformerEncoderLayer(batch_first=False) does)" if axis == 1 and len(shape) == 3 else ""
    return (f"{what} holds the batch on axis {axis}{form}: fire-onnx repairs tensors whose first axis is the batch; "
            "pick a tensor where the model has moved the batch first (the CLS token or pooled features, which "
            "`fire-onnx inspect` lists as 'candidate (pooled features)'), or build the encoder with batch_first=True")


def batch_axis_error(what: str, shape, n: int) -> BatchAxisError:
    """The error for ``what`` (e.g. "module 'blocks.0'") that gave ``shape`` for a batch of ``n`` images."""
    shape = [int(v) for v in shape]
    axis = next((i for i, v in enumerate(shape) if i and v == n), None)
    if axis is not None:
        return BatchAxisError(batch_later_text(f"{what} (shape {shape} for a batch of {n} images)", axis, shape))
    return BatchAxisError(
        f"{what} has shape {shape} for a batch of {n} images: its first axis is not the batch (the model folds or "
        "moves the batch there), and fire-onnx repairs tensors whose first axis is the batch; pick another tensor "
        "(`fire-onnx inspect` lists candidates)")


def check_batch_axis(what: str, arr, n: int) -> None:
    """Refuse an activation of a batch of ``n`` images whose first axis is not that batch. Concatenating such
    batches along axis 0 either failed with a numpy shape error (a [T, B, D] encoder block, batches of 128 and
    116) or, when every batch had the same size, silently took the T token positions as samples and B x D as
    features (new-user run 18: a repair with feature_shape [20, 64] written with exit 0)."""
    if getattr(arr, "ndim", 0) >= 2 and arr.shape[0] != n:
        raise batch_axis_error(what, arr.shape, n)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - i) for i in range(0, n, batch_size)]


def second_size_batch(x: np.ndarray, n: int) -> np.ndarray:
    """A batch of another size than ``n`` from ``x`` (2 images, or 3 when ``n`` is 2; repeated when ``x`` is
    short), to tell a [T, B, D] tensor whose T equals ``n``. Not 1 image: a model that squeezes its tensors
    drops the batch axis at batch 1 ([1, T, D] -> [T, D] read as T samples)."""
    m = 3 if n == 2 else 2
    return x[np.arange(m) % len(x)]


# ----------------------------------------------------------------------------- ONNX tensors
def session_reading(model, tensors: Sequence[str], extra_outputs: Sequence[str] = ()):
    """An onnxruntime session of a copy of ``model`` whose outputs are ``tensors`` (plus the model's
    own outputs named in ``extra_outputs``). Models too large for one protobuf go through a temporary
    file with external data."""
    import onnx

    from fire_onnx.evaluate import session
    from fire_onnx.onnxutil import approx_size, external_data_threshold, infer_shapes, light_copy

    big = approx_size(model) >= external_data_threshold()
    tmp = Path(tempfile.mkdtemp(prefix="fire_onnx_probe_")) if big else None
    try:
        if big:  # weights to a temporary data file, the graph (no weights) edited and saved beside it
            m = infer_shapes(light_copy(model, tmp / "model.data"))
        else:
            m = onnx.ModelProto()
            m.CopyFrom(infer_shapes(model))  # a copy: infer_shapes returns its argument when inference fails
        known = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
        wanted = list(dict.fromkeys([*tensors, *extra_outputs]))
        del m.graph.output[:]
        for name in wanted:
            vi = known.get(name)
            m.graph.output.append(vi if vi is not None else onnx.helper.make_empty_tensor_value_info(name))
        if not big:
            return session(m.SerializeToString())
        path = tmp / "model.onnx"
        path.write_bytes(m.SerializeToString())
        return session(str(path))
    finally:  # onnxruntime has read the weights; the files can go
        if tmp is not None:
            for p in tmp.iterdir():
                os.unlink(p)
            os.rmdir(tmp)


class TensorReader:
    """Reads intermediate tensors (and optionally the first model output) of an ONNX model in
    onnxruntime; the session is built once and serves every call."""

    def __init__(self, model, tensors: Sequence[str], *, with_logits: bool = False, batch_size: int = 128):
        self.tensors = list(dict.fromkeys(tensors))
        self.logits_name = model.graph.output[0].name if with_logits and len(model.graph.output) else None
        extra = [self.logits_name] if self.logits_name and self.logits_name not in self.tensors else []
        self.sess = session_reading(model, self.tensors, extra)
        self.names = [o.name for o in self.sess.get_outputs()]
        self.batch_size = batch_size
        self.batch_checked: set[str] = set()  # tensors seen with the batch first at two batch sizes

    def __call__(self, x: np.ndarray, progress: Progress | None = None):
        """(activations by tensor name, logits or None) for preprocessed inputs ``x``."""
        from fire_onnx.evaluate import run_batches

        parts = run_batches(self.sess, x, self.names, self.batch_size, progress)
        self._check_batch_axis(x, parts)
        out = {name: np.concatenate(p) for name, p in zip(self.names, parts)}
        acts = {t: out[t].astype(np.float32) for t in self.tensors}
        logits = out.get(self.logits_name) if self.logits_name else None
        return acts, logits

    def _check_batch_axis(self, x: np.ndarray, parts) -> None:
        """Every batch's activation must have the batch's image count first (see :func:`check_batch_axis`). One
        batch size cannot tell a [T, B, D] tensor whose T happens to equal it: when all batches had the same size,
        a batch of another size is run once more (a tensor is checked so once per reader)."""
        from fire_onnx.evaluate import run_batches

        static = self.sess.get_inputs()[0].shape[0]
        fixed = isinstance(static, int) and static > 0  # run_batches feeds exactly that many (padded)
        sizes = batch_sizes(len(x), static if fixed else self.batch_size)
        for name, p in zip(self.names, parts):
            if name in self.tensors and len(p) == len(sizes):
                for n, a in zip(sizes, p):
                    check_batch_axis(f"tensor {name!r}", a, n)
        if len(set(sizes)) > 1:
            self.batch_checked.update(self.tensors)
        todo = [t for t in self.tensors if t not in self.batch_checked]
        if todo and not fixed and sizes:
            xb = second_size_batch(x, sizes[0])
            for name, p in zip(todo, run_batches(self.sess, xb, todo, len(xb))):
                check_batch_axis(f"tensor {name!r}", p[0], len(xb))
            self.batch_checked.update(todo)


def _as_model_input(model, x: np.ndarray) -> np.ndarray:
    """The preprocessed probe images reshaped to a vector or sequence input of the same size per sample (a repair
    fitted on the image-input export of a model, patched into the original, whose first layer flattens them)."""
    from fire_onnx.onnxutil import data_input

    inp = data_input(model.graph)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim] if inp else []
    if len(dims) in (2, 3) and all(dims[1:]) and int(np.prod(dims[1:])) == int(np.prod(x.shape[1:])):
        return x.reshape(len(x), *dims[1:])
    return x


def check_fingerprints(model, directions, tensors: Sequence[str]) -> tuple[list[str], list[str]]:
    """Compare each target's recorded fingerprint with ``model`` (an unpatched ModelProto) at the
    tensors the targets resolved to. Returns (mismatch messages, notes)."""
    from fire_onnx.data import Preprocess

    probe = getattr(directions, "probe", None)
    pairs = [(t, name) for t, name in zip(directions.targets, tensors)]
    recorded = [(t, name) for t, name in pairs if valid_fingerprint(t.fingerprint)]
    notes = []
    if probe is None or not recorded:
        return [], ["the directions file carries no model fingerprint (made by an older fire-onnx or by hand): "
                    "cannot check that it was fitted on this model"]
    if len(recorded) < len(pairs):
        notes.append("some targets carry no model fingerprint; only the others were checked")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return [], ["onnxruntime is not installed: the model fingerprint was not checked"]
    pre = Preprocess.from_dict(directions.preprocess or {})
    x = _as_model_input(model, pre(probe))
    try:
        acts, _ = TensorReader(model, [name for _, name in recorded], batch_size=len(x))(x)
    except BatchAxisError:  # not the probe images' fault, nor another model's: no repair fits that tensor
        raise
    except FireError as e:
        return [f"the directions' probe images do not run through this model ({e}); they were fitted on a model "
                "with another input"], notes
    bad = []
    folded = None
    for t, name in recorded:
        diff = difference(t.fingerprint, acts[name])
        if diff > FINGERPRINT_TOL:
            msg = (f"tensor {name!r} does not hold the activations the directions for {t.label} were fitted on "
                   f"(relative difference {diff:.3g} on the probe images, tolerance {FINGERPRINT_TOL:g})")
            if folded is None:
                from fire_onnx.inspect import folded_weights

                folded = folded_weights(model.graph)
            if t.module and name in folded:  # fit --model without --onnx cannot see this; it was blamed on the model
                msg += (f"; the exporter folded a BatchNorm (or a scale) into the node that computes it, so it is not "
                        f"the output of module {t.module!r}: fit from the ONNX model (--onnx without --model, --layer "
                        f"{name}), or at the module after the BatchNorm")
            bad.append(msg)
    return bad, notes
