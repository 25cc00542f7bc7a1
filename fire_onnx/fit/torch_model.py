"""PyTorch models for fit: load them, read module outputs with hooks, export, apply the repair (torch).

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
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fire_onnx import directions as dirs
from fire_onnx.errors import FireError, first_line, suggest
from fire_onnx.probe import batch_sizes, check_batch_axis, second_size_batch

Progress = Callable[[int, int], None]


def _torch():
    try:
        import torch
    except ImportError:
        raise FireError("fit needs PyTorch: pip install 'fire-onnx[fit]' (or torch==2.13.0 for the CPU build)") from None
    return torch


def _where(e: BaseException) -> str:
    """``Type: message (file:line)`` of an exception raised in the user's model code (its innermost frame outside
    fire-onnx), for a one-line error instead of a traceback (new-user run 18)."""
    import traceback

    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} ({e.filename}:{e.lineno})"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "fire_onnx" not in f.filename.replace(os.sep, "/")
              and "importlib" not in f.filename]
    at = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {first_line(e)}{at}"


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
        except Exception as e:  # noqa: BLE001 - the user's own code: say where, in one line
            raise FireError(f"loading {path} failed: {_where(e)}") from None
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise FireError(f"cannot import {mod_name!r}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise FireError(f"importing {mod_name!r} failed: {_where(e)}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise FireError(f"{mod_name!r} has no callable {attr!r}")
    return fn


STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "ema", "weights")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
SAFE_GLOBALS = ("collections.OrderedDict", "torch._utils.", "torch.", "builtins.", "_codecs.encode", "numpy.")


def load_model(spec: str, weights: str | None = None, *, untrained: bool = False, notes: list | None = None):
    """Build the model from ``spec`` and load ``weights`` (a state dict); returns it in eval mode.

    Without ``weights`` the factory's own parameters are used, which is refused unless ``untrained``
    says so on purpose: a factory usually builds a *randomly initialised* model, and a repair fitted
    on random weights is useless (measured: ASR stayed at 92 %). Factories that load their trained
    weights themselves pass ``untrained=True`` (``fit --no-weights``). How the weights file was
    unwrapped (checkpoint key, DataParallel prefix) is appended to ``notes``.
    """
    torch = _torch()
    if not weights and not untrained:
        raise FireError(f"--model {spec} without --weights would fit a freshly initialised (untrained) model; "
                        "pass --weights STATE_DICT, or --no-weights if the factory loads trained weights itself")
    try:
        model = load_factory(spec)()
    except FireError:
        raise
    except Exception as e:  # noqa: BLE001 - the factory is the user's code
        raise FireError(f"the model factory {spec} raised {_where(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise FireError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        state, how = load_state_dict(weights)
        _load_into(model, state, spec, weights)
        if notes is not None:
            notes.extend(how)
    elif notes is not None:
        notes.append(f"--no-weights: fitting {spec} with the parameters its factory sets; if it does not load "
                     "trained weights itself, the repair is useless")
    return model.eval()


def _pickle_globals(path: Path) -> list[str]:
    """The module.name globals a torch checkpoint's pickle refers to, read with pickletools (which
    parses opcodes and executes nothing)."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            data = z.read(pkl) if pkl else b""
    except (zipfile.BadZipFile, OSError):
        data = path.read_bytes()[: 1 << 24]
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # not a pickle, or truncated: report what was found so far
        pass
    return list(dict.fromkeys(found))


def load_state_dict(weights: str | os.PathLike) -> tuple[dict, list[str]]:
    """A plain state dict from ``weights`` (``weights_only=True``, never unpickling code), unwrapped
    from common checkpoint layouts: ``{'state_dict': ...}``, ``{'model': ...}`` and the like, and
    DataParallel ``module.`` / torch.compile ``_orig_mod.`` key prefixes. Returns (state, notes)."""
    torch = _torch()
    p = Path(weights)
    if not p.is_file():
        raise FireError(f"weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        unsafe = [g for g in _pickle_globals(p) if not g.startswith(SAFE_GLOBALS)]
        module_like = [g for g in _pickle_globals(p) if g.startswith("torch.nn.modules.")]
        if unsafe or module_like:
            what = (unsafe or module_like)[0]
            kind = ("a whole pickled model (torch.save(model))" if module_like or "Unsupported global" in msg
                    else "pickled Python objects")
            raise FireError(
                f"cannot load weights {p}: it is {kind}, not a plain state dict (it refers to {what}); fire-onnx never "
                f"unpickles code. If you trust the file, convert it once: python -c \"import torch; "
                f"m = torch.load('{p}', weights_only=False); torch.save(m.state_dict(), 'state_dict.pt')\" "
                "and pass --weights state_dict.pt") from None
        raise FireError(f"cannot load weights {p}: not a PyTorch state dict file ({first_line(e)})") from None
    notes: list[str] = []
    state = obj
    if isinstance(obj, torch.nn.Module):  # not reachable with weights_only, kept for safety
        state = obj.state_dict()
    if isinstance(state, dict) and not _is_tensor_dict(state):
        for key in STATE_DICT_KEYS:
            if isinstance(state.get(key), dict) and _is_tensor_dict(state[key]):
                notes.append(f"using the state dict under key {key!r} of {p.name}")
                state = state[key]
                break
        else:
            keys = ", ".join(repr(k) for k in list(state)[:8])
            raise FireError(f"cannot find a state dict in {p} (a dict with keys {keys}); save model.state_dict() "
                            "or a checkpoint with it under 'state_dict' or 'model'")
    if not isinstance(state, dict) or not state:
        raise FireError(f"cannot load weights {p}: it holds {type(obj).__name__}, not a state dict")
    for prefix in WRAPPER_PREFIXES:
        if all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            notes.append(f"stripped the {prefix!r} prefix from every key of {p.name}")
    return state, notes


def _is_tensor_dict(d: dict) -> bool:
    torch = _torch()
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _load_into(model, state: dict, spec: str, weights) -> None:
    """Load ``state`` into ``model``; a mismatch lists missing, unexpected and mis-shaped keys together."""
    torch = _torch()
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes)):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > 4 else ""
                parts.append(f"{label}: {', '.join(items[:4])}{more}")
        raise FireError(f"weights {Path(weights).name} do not fit {spec}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


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
    logits: bool = False,
):
    """Run ``x`` (preprocessed float32 inputs) through ``model``; return each layer's outputs (and,
    with ``logits``, the pair (outputs, model outputs or None when the model does not return (N, C)
    scores))."""
    torch = _torch()
    mods = {name: find_module(model, name) for name in layers}
    store: dict[str, list] = {name: [] for name in layers}
    outs: list = []
    hooks = []

    def make_hook(name):
        def hook(_mod, _inp, out):
            if not isinstance(out, torch.Tensor):
                raise FireError(f"module {name!r} returns {type(out).__name__}, not a tensor; choose a submodule, or "
                                "fit from the ONNX model alone (--onnx without --model) at one of its output tensors "
                                "(fire-onnx inspect lists them)")
            # a copy: a later in-place op (ReLU(inplace=True), ``out += identity``) would change a shared view
            # (a torchvision-style block's conv output read as its post-ReLU sum; fit then refused it as a
            # folded BatchNorm, and without --onnx fitted the wrong values)
            store[name].append(out.detach().to(torch.float32).cpu().numpy().copy())

        return hook

    for name, mod in mods.items():
        hooks.append(mod.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                seen = {name: len(parts) for name, parts in store.items()}
                try:
                    y = model(torch.from_numpy(x[i : i + batch_size]))
                except (RuntimeError, ValueError) as e:
                    msg = first_line(e)
                    raise FireError(f"the model rejects the preprocessed images of shape {list(x.shape[1:])}: "
                                    f"{msg} ({_other_layout(model, x[i : i + 1])})") from None
                n = len(x[i : i + batch_size])
                for name, parts in store.items():
                    for part in parts[seen[name]:]:
                        check_batch_axis(f"module {name!r}", part, n)
                if isinstance(y, (tuple, list)) and y:
                    y = y[0]
                outs.append(y.detach().to(torch.float32).cpu().numpy()
                            if isinstance(y, torch.Tensor) and y.ndim == 2 and y.shape[1] >= 2 else None)
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
    _check_batch_first(model, list(layers), x, batch_size)
    for name, parts in store.items():
        out[name] = np.concatenate(parts)
    if not logits:
        return out
    scores = np.concatenate(outs) if outs and all(o is not None for o in outs) else None
    return out, scores


_BATCH_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> modules seen with the batch first


def _check_batch_first(model, layers: list[str], x: np.ndarray, batch_size: int) -> None:
    """``collect`` checked each batch's output against its image count; with one batch size only, a [T, B, D]
    output whose T equals that size passes (17 images, or batches of 17, through a 17-token encoder), so each
    module is checked once per model at a second size (probe.second_size_batch)."""
    sizes = batch_sizes(len(x), batch_size)
    if len(set(sizes)) > 1:
        _BATCH_CHECKED.setdefault(model, set()).update(layers)
        return
    todo = [name for name in layers if name not in _BATCH_CHECKED.get(model, set())]
    if todo and sizes:
        checked = _BATCH_CHECKED.setdefault(model, set())
        checked.update(todo)  # before: collect on the second batch (one size too) would check it again, endlessly
        xb = second_size_batch(x, sizes[0])
        try:
            collect(model, todo, xb, batch_size=len(xb))
        except BaseException:
            checked.difference_update(todo)
            raise


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
    shift = torch.from_numpy(target.shift.astype(np.float32)) if target.repair == "translate" else None

    def hook(_mod, _inp, out):
        x = out.reshape(out.shape[0], -1) if target.layout == "flat" else out
        s = (x.to(torch.float32) - mu) @ U.T
        finite = torch.isfinite(s)
        s = torch.where(finite, s, torch.zeros_like(s))  # NaN/inf activations: no correction
        if shift is not None:  # translate: x - alpha beta where the gate fires (gate none: every input)
            fires = (finite & (s > tau)) if target.gate == "hard" else torch.ones_like(finite)
            s = torch.where(fires, shift.expand_as(s), torch.zeros_like(s))
        elif target.gate == "hard":
            s = torch.where(s > tau, s, torch.zeros_like(s))
        y = x.to(torch.float32) - (s * alpha) @ U
        return y.reshape(out.shape).to(out.dtype)

    return hook


def apply_in_torch(model, directions: dirs.Directions) -> list:
    """Register the repair of every target (by module path) on ``model``; returns the hook handles.

    A module called more than once per forward pass is refused when it runs a second time: the directions
    were fitted at one call (the ONNX patch repairs one tensor), and a hook would repair every call (a
    shared block: outputs 10 % off the patched model's, predictions changed)."""
    calls: dict[str, int] = {}
    handles = [model.register_forward_pre_hook(lambda _m, _i: calls.clear())]

    def once(t: dirs.Target, repair):
        def hook(mod, inp, out):
            calls[t.module] = calls.get(t.module, 0) + 1
            if calls[t.module] > 1:
                raise FireError(f"module {t.module!r} is called more than once per forward pass: its repair was fitted "
                                f"at one call ({t.tensor or 'one tensor'}) and cannot be applied by module in PyTorch; "
                                "run the patched ONNX model")
            try:
                return repair(mod, inp, out)
            except RuntimeError as e:  # another model's module: sizes differ (was a raw torch error at forward time)
                shape = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
                raise FireError(f"target {t.label}: module {t.module!r} outputs {shape}, which the directions (D="
                                f"{t.U.shape[1]}) do not fit: they were fitted on another model or module "
                                f"({first_line(e)})") from None
        hook._fire_onnx = True
        return hook

    try:
        for t in directions.targets:
            if not t.module:
                raise FireError(f"target {t.label} has no module path; it can only be applied to the ONNX model")
            mod = find_module(model, t.module)
            if any(getattr(h, "_fire_onnx", False) for h in mod._forward_hooks.values()):
                # a second call stacked the hooks: a translation moved inputs twice (new-user run 17: CA 74.5 -> 35 %)
                raise FireError(f"module {t.module!r} already carries a fire-onnx repair (apply_in_torch was called "
                                "before): remove those hooks first (h.remove() for each handle it returned)")
            handles.append(mod.register_forward_hook(once(t, repair_module_output(t))))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


def _other_layout(model, x) -> str:
    """What to check when the model rejects the images ``x`` (one preprocessed image): the other layout, when the
    model accepts that (a model that permutes NHWC input itself), else the generic hint."""
    import torch

    if x.ndim == 4:
        nhwc = x.shape[1] in (1, 3, 4)  # the images were fed channels first: try them channels last, and back
        alt, name = (x.transpose(0, 2, 3, 1), "NHWC") if nhwc else (x.transpose(0, 3, 1, 2), "NCHW")
        try:
            with torch.no_grad():
                model(torch.from_numpy(alt.copy()))
            return f"the model accepts them as {name}: pass --input-layout {name}"
        except Exception:  # noqa: BLE001 - any failure: no better hint than the generic one
            pass
    return "check --input-layout, the image size and the channels"
