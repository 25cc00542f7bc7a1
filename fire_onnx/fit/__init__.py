"""Fit backdoor directions: activation sources, sample sources, checks and estimation.

- :mod:`fire_onnx.fit.torch_model`  load PyTorch models (factory + state dict, TorchScript), read module
  outputs with hooks, export to ONNX, apply the repair in PyTorch (needs torch)
- :mod:`fire_onnx.fit.core`         activation sources (PyTorch, ONNX in onnxruntime), the consistency and
  sanity checks, fingerprints, :func:`fit_directions`
- :mod:`fire_onnx.fit.pipeline`     from the user's inputs (paths, specs, options) to a directions file

torch is imported only by the functions that need it: fitting from an ONNX model works without it.
"""

from fire_onnx.fit.core import OnnxSource, TorchSource, fit_directions
from fire_onnx.fit.pipeline import FitRequest, run_fit
from fire_onnx.fit.torch_model import (
    apply_in_torch,
    collect,
    export_onnx,
    find_module,
    load_factory,
    load_model,
    load_state_dict,
    repair_module_output,
    torchscript_to_onnx,
)

__all__ = [
    "FitRequest", "OnnxSource", "TorchSource", "apply_in_torch", "collect", "export_onnx", "find_module",
    "fit_directions", "load_factory", "load_model", "load_state_dict", "repair_module_output", "run_fit",
    "torchscript_to_onnx",
]
