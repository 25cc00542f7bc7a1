"""Clean accuracy, attack success rate and robust accuracy of ONNX models in onnxruntime.

- CA: accuracy on the clean images.
- ASR: fraction of triggered images *whose true class is not the target* classified as the target.
- RA: fraction of the same triggered images classified as their true class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fire_onnx.data import Images, Preprocess
from fire_onnx.errors import FireError, first_line

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
    if len(expect) != x.ndim or any(isinstance(e, int) and e != s for e, s in zip(expect[1:], x.shape[1:])):
        raise FireError(
            f"model input {inp[0].name!r} expects shape {expect}, the preprocessed images are {list(x.shape)} "
            "(check --input-layout, the image size and the channels)"
        )
    return inp[0].name


def run_batches(sess, x: np.ndarray, outputs, batch_size: int, progress=None) -> list[list[np.ndarray]]:
    """Run ``x`` through ``sess`` in batches; per requested output, the list of batch results."""
    name = single_input(sess, x)
    static_batch = sess.get_inputs()[0].shape[0]
    if isinstance(static_batch, int) and static_batch > 0:
        batch_size = static_batch  # a model exported with a fixed batch (often 1)
        if len(x) % static_batch:
            raise FireError(f"the model takes batches of exactly {static_batch}; {len(x)} images do not divide evenly")
    parts: list[list[np.ndarray]] = []
    for i in range(0, len(x), batch_size):
        try:
            res = sess.run(outputs, {name: x[i : i + batch_size]})
        except Exception as e:  # onnxruntime's InvalidArgument / Fail for inputs the model rejects
            msg = first_line(e)
            raise FireError(f"onnxruntime rejected the input batch: {msg}") from None
        if not parts:
            parts = [[] for _ in res]
        for acc, r in zip(parts, res):
            acc.append(r)
        if progress:
            progress(min(i + batch_size, len(x)), len(x))
    return parts


def predict_logits(sess, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    outs = run_batches(sess, x, [sess.get_outputs()[0].name], batch_size)[0]
    logits = np.concatenate(outs)
    if logits.ndim != 2:
        raise FireError(f"the model's first output has shape {list(logits.shape)}; eval needs (N, classes) scores")
    return logits


@dataclass
class Metrics:
    ca: float
    asr: float | None = None
    ra: float | None = None
    n_clean: int = 0
    n_triggered: int = 0

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
    if clean.y is None:
        raise FireError("the clean images have no labels (key y / y_test); CA needs labels")
    pred = predict_logits(sess, preprocess(clean.x), batch_size).argmax(axis=1)
    m = Metrics(ca=float((pred == clean.y).mean()), n_clean=len(clean))
    if triggered is not None:
        if triggered.y is None:
            raise FireError("the triggered images have no labels; ASR/RA need the true labels")
        if target is None:
            raise FireError("ASR needs the attack's target class (--target)")
        keep = triggered.y != target
        if not keep.any():
            raise FireError("every triggered image is of the target class; ASR is undefined")
        trig = triggered.subset(keep)
        tp = predict_logits(sess, preprocess(trig.x), batch_size).argmax(axis=1)
        m.asr = float((tp == target).mean())
        m.ra = float((tp == trig.y).mean())
        m.n_triggered = len(trig)
    return m


def model_preprocess(model_path: str | Path) -> Preprocess | None:
    """The preprocessing recorded by ``patch`` in a patched model's metadata, if any."""
    import onnx

    from fire_onnx.patch import META_PREPROCESS

    try:
        m = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return None
    for p in m.metadata_props:
        if p.key == META_PREPROCESS:
            try:
                return Preprocess.from_dict(json.loads(p.value))
            except (json.JSONDecodeError, FireError):
                return None
    return None
