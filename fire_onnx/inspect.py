"""List the tensors of an ONNX model that a repair could target (onnx only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from fire_onnx.onnxutil import FLOAT_TYPES, infer_shapes, node_module, tensor_info
from fire_onnx.patch import ACTIVATIONS, fusion_hazard, is_patched, patched_targets

POST_OPS = ACTIVATIONS | {"MaxPool", "AveragePool", "GlobalAveragePool", "Add", "LayerNormalization",
                         "Flatten", "Reshape", "Concat"}


@dataclass
class Candidate:
    tensor: str
    shape: list
    dtype: str
    op: str
    module: str
    consumers: int
    layout: str
    breaks_fusion: bool
    note: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def candidates(model: onnx.ModelProto, include_all: bool = False) -> list[Candidate]:
    """Float activations of rank >= 2 in graph order, with their shape, producer and module scope."""
    inferred = infer_shapes(model)
    graph = inferred.graph
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outputs = {o.name for o in graph.output}
    out = []
    for n in graph.node:
        if n.op_type in ("Constant", "Shape") or n.name.startswith("fire_onnx/"):
            continue
        for name in n.output:
            if not name:
                continue
            elem, dims = tensor_info(inferred, name)
            if elem not in FLOAT_TYPES or dims is None or len(dims) < 2:
                continue
            layout = {2: "vector", 3: "token"}.get(len(dims), "flat")
            fusion = fusion_hazard(inferred, name) is not None
            if fusion:
                note = "pre-activation: patching breaks Conv/Gemm+activation fusion"
            elif name in outputs:
                note = "graph output"
            elif n.op_type in POST_OPS:
                note = "good target"
            else:
                note = ""
            if not include_all and n.op_type in ("Transpose", "Unsqueeze", "Squeeze", "Cast", "Gather",
                                                  "Slice", "Split", "Expand", "Softmax", "Mul", "Div", "Sub",
                                                  "Sqrt", "Pow", "ReduceMean", "Erf", "Identity"):
                continue
            out.append(Candidate(
                tensor=name,
                shape=["?" if d is None else d for d in dims],
                dtype=FLOAT_TYPES[elem],
                op=n.op_type,
                module=node_module(n),
                consumers=consumers.get(name, 0),
                layout=layout,
                breaks_fusion=fusion,
                note=note,
            ))
    return out


def summary(model: onnx.ModelProto) -> dict:
    return {
        "ir_version": int(model.ir_version),
        "opset": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": i.name, "shape": _dims(i)} for i in model.graph.input
                   if i.name not in {t.name for t in model.graph.initializer}],
        "outputs": [{"name": o.name, "shape": _dims(o)} for o in model.graph.output],
        "nodes": len(model.graph.node),
        "patched": is_patched(model),
        "fire_onnx_targets": patched_targets(model),
    }


def _dims(vi) -> list:
    if not vi.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
