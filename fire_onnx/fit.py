"""Collect activations from a PyTorch model and fit a directions file (needs torch).

The model comes from a factory spec, ``package.module:factory`` or ``path/to/file.py:factory``
(the factory is called with no arguments and returns an ``nn.Module``), plus optional weights
(a state dict, loaded with ``weights_only=True``). Activations are module outputs, captured with
forward hooks, so a module path here is the same path ``patch`` looks up in the export's scopes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fire_onnx import directions as dirs
from fire_onnx.data import Images, Preprocess
from fire_onnx.errors import FireError, first_line, suggest
from fire_onnx.estimate import fit_target

Progress = Callable[[int, int], None]


def _torch():
    try:
        import torch
    except ImportError:
        raise FireError("fit needs PyTorch: pip install 'fire-onnx[fit]' (or torch==2.13.0 for the CPU build)") from None
    return torch


def load_factory(spec: str):
    """Resolve ``module:attr`` or ``file.py:attr`` to the callable it names."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise FireError(f"model spec {spec!r} must look like package.module:factory or path/to/file.py:factory")
    if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise FireError(f"model file not found: {path}")
        name = f"_fire_onnx_user_model_{abs(hash(str(path.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec_obj.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise FireError(f"cannot import {mod_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise FireError(f"{mod_name!r} has no callable {attr!r}")
    return fn


def load_model(spec: str, weights: str | None = None):
    """Build the model from ``spec`` and load ``weights`` (a state dict); returns it in eval mode."""
    torch = _torch()
    model = load_factory(spec)()
    if not isinstance(model, torch.nn.Module):
        raise FireError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise FireError(f"weights file not found: {p}")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FireError(f"cannot load weights {p} (plain state dicts only, no pickled objects): {first_line(e)}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as e:
            first = str(e).strip().splitlines()
            raise FireError(f"weights {p} do not fit {spec}: {' '.join(first[:2])}") from None
    return model.eval()


def find_module(model, path: str):
    named = dict(model.named_modules())
    if path not in named or path == "":
        raise FireError(f"module {path!r} not found in the model{suggest(path, [n for n in named if n], limit=12)}")
    return named[path]


def collect(
    model,
    layers: Sequence[str],
    x: np.ndarray,
    *,
    batch_size: int = 128,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Run ``x`` (preprocessed float32 inputs) through ``model``; return each layer's outputs."""
    torch = _torch()
    mods = {name: find_module(model, name) for name in layers}
    store: dict[str, list] = {name: [] for name in layers}
    hooks = []

    def make_hook(name):
        def hook(_mod, _inp, out):
            if not isinstance(out, torch.Tensor):
                raise FireError(f"module {name!r} returns {type(out).__name__}, not a tensor; choose a submodule")
            store[name].append(out.detach().to(torch.float32).cpu().numpy())

        return hook

    for name, mod in mods.items():
        hooks.append(mod.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                try:
                    model(torch.from_numpy(x[i : i + batch_size]))
                except (RuntimeError, ValueError) as e:
                    msg = first_line(e)
                    raise FireError(f"the model rejects the preprocessed images of shape {list(x.shape[1:])}: "
                                    f"{msg} (check --input-layout, the image size and the channels)") from None
                if progress:
                    progress(min(i + batch_size, len(x)), len(x))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, parts in store.items():
        if not parts:
            raise FireError(f"module {name!r} was never called in the forward pass")
        if len(parts) != -(-len(x) // batch_size):
            raise FireError(f"module {name!r} is called more than once per forward pass; choose a module called once")
        out[name] = np.concatenate(parts)
    return out


def onnx_activation_reader(model, tensors: Sequence[str], *, batch_size: int = 128,
                           progress: Progress | None = None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A function returning the activations of ONNX ``tensors`` for inputs ``x``, from onnxruntime
    (no torch needed). The tensors are exposed as extra graph outputs of an in-memory copy of
    ``model`` (a ModelProto); the session is built once and serves every call."""
    import onnx

    from fire_onnx.evaluate import run_batches, session
    from fire_onnx.onnxutil import infer_shapes

    m = infer_shapes(model)
    present = {o.name for o in m.graph.output}
    known = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.input)}
    for name in tensors:
        if name not in present:
            m.graph.output.append(known.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    sess = session(m.SerializeToString())

    def read(x: np.ndarray) -> dict[str, np.ndarray]:
        parts = run_batches(sess, x, list(tensors), batch_size, progress)
        return {name: np.concatenate(p).astype(np.float32) for name, p in zip(tensors, parts)}

    return read


def torchscript_to_onnx(path: str | Path, sample: np.ndarray):
    """Export a TorchScript file to an in-memory ONNX model (scope names kept), for fitting from it.

    Forward hooks do not run on loaded TorchScript modules, so activations are read in onnxruntime.
    """
    torch = _torch()
    import io
    import warnings

    import onnx

    try:
        ts = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise FireError(f"{path} is not a TorchScript file: {first_line(e)}") from None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(ts.eval(), (torch.from_numpy(np.ascontiguousarray(sample[:2])),), buf, dynamo=False,
                              input_names=["input"], dynamic_axes={"input": {0: "batch"}})
        except Exception as e:
            raise FireError(f"cannot export TorchScript {path} to ONNX for fitting: {first_line(e)}") from None
    return onnx.load_from_string(buf.getvalue())


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
) -> dirs.Directions:
    """Fit one target per layer.

    ``model`` is a ``torch.nn.Module`` (activations from forward hooks on the modules named by
    ``layers``) or ``None``, in which case activations come from ``onnx_model`` in onnxruntime and
    ``layers`` may name ONNX tensors or PyTorch module paths (resolved through export scopes).
    ``triggered_source`` holds the triggered images without their trigger (same order), which makes
    the shift estimate paired (much less noisy). With ``onnx_model``, each target records the ONNX
    tensor it applies to, and its shape is checked against the export.
    """
    if triggered_source is not None and triggered_source.x.shape != triggered.x.shape:
        raise FireError("the clean originals of the triggered images do not match them in shape")
    inferred = None
    if onnx_model is not None:
        from fire_onnx.onnxutil import infer_shapes, tensor_info
        from fire_onnx.patch import check_layout, resolve_target, resolve_tensor

        inferred = infer_shapes(onnx_model)
    tensor_of: dict[str, str] = {}
    if model is None:
        if inferred is None:
            raise FireError("fit needs a PyTorch model (--model) or an ONNX model (--onnx)")
        names = {o for n in inferred.graph.node for o in n.output}
        for layer in layers:  # an ONNX tensor name, else a PyTorch module path
            is_tensor = layer in names
            tensor_of[layer] = resolve_tensor(inferred, tensor=layer if is_tensor else "",
                                              module="" if is_tensor else layer)

        read = onnx_activation_reader(inferred, list(dict.fromkeys(tensor_of.values())),
                                      batch_size=batch_size, progress=progress)

        def run(x):
            acts = read(x)
            return {layer: acts[t] for layer, t in tensor_of.items()}
    else:
        def run(x):
            return collect(model, layers, x, batch_size=batch_size, progress=progress)

    acts_c, acts_t = run(preprocess(clean.x)), run(preprocess(triggered.x))
    acts_p = run(preprocess(triggered_source.x)) if triggered_source is not None else None
    targets = []
    for name in layers:
        is_tensor = tensor_of.get(name) == name
        t = fit_target(acts_c[name], acts_t[name], layout=layout, method=method, k=k, gate=gate,
                       quantile=quantile, alpha=alpha, module="" if is_tensor else name,
                       tensor=tensor_of.get(name, ""),
                       paired=None if acts_p is None else acts_p[name],
                       clean_labels=clean.y, triggered_labels=triggered.y)
        if inferred is not None:
            t.tensor = t.tensor or resolve_target(inferred, t)
            check_layout(t, t.tensor, tensor_info(inferred, t.tensor)[1])
        targets.append(t)
    return dirs.Directions(targets=targets, preprocess=preprocess.as_dict(), meta=dict(meta or {}))


def export_onnx(model, sample: np.ndarray, path: str | Path, *, dynamo: bool = False, opset: int = 17) -> None:
    """Export ``model`` to ONNX with a dynamic batch dimension (input 'input', output 'logits')."""
    torch = _torch()
    import warnings

    x = torch.from_numpy(np.ascontiguousarray(sample[:2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes={next(iter(_forward_params(model))): {0: torch.export.Dim("batch")}},
                              verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _forward_params(model):
    import inspect

    return [p for p in inspect.signature(model.forward).parameters if p != "self"]


def repair_module_output(target: dirs.Target):
    """A forward hook that applies ``target``'s repair to a module's output, in PyTorch.

    The same computation the ONNX patch performs; useful as a reference and to run FIRE in PyTorch.
    """
    torch = _torch()
    U = torch.from_numpy(target.U.astype(np.float32))
    mu = torch.from_numpy(target.mu.astype(np.float32))
    tau = torch.from_numpy(target.tau.astype(np.float32))
    alpha = torch.from_numpy(target.alpha.astype(np.float32))

    def hook(_mod, _inp, out):
        x = out.reshape(out.shape[0], -1) if target.layout == "flat" else out
        s = (x.to(torch.float32) - mu) @ U.T
        if target.gate == "hard":
            s = torch.where(s > tau, s, torch.zeros_like(s))
        y = x.to(torch.float32) - (s * alpha) @ U
        return y.reshape(out.shape).to(out.dtype)

    return hook


def apply_in_torch(model, directions: dirs.Directions) -> list:
    """Register the repair of every target (by module path) on ``model``; returns the hook handles."""
    handles = []
    for t in directions.targets:
        if not t.module:
            raise FireError(f"target {t.label} has no module path; it can only be applied to the ONNX model")
        handles.append(find_module(model, t.module).register_forward_hook(repair_module_output(t)))
    return handles
