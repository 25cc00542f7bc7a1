"""ONNX model I/O and PyTorch-scope bookkeeping shared by patch, inspect, fit and eval."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import onnx

from fire_onnx.errors import FireError, first_line
from fire_onnx.fileio import atomic_path

# protobuf refuses to serialize a message of 2 GiB or more; switch to external data well before.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model (with its external data); a missing or corrupt file raises FireError."""
    p = Path(path)
    if not p.is_file():
        raise FireError(f"model not found: {p}")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # protobuf DecodeError, external-data errors, ...
        msg = first_line(e)
        raise FireError(f"{p} is not a readable ONNX model: {msg}") from None
    if not model.opset_import or not model.graph.node:
        raise FireError(f"{p} is not a readable ONNX model (no graph nodes or no opset)")
    return model


def write_model(model: onnx.ModelProto, path: str | os.PathLike, data_location: str) -> None:
    """Serialize ``model`` to ``path``; above ~2 GiB its weights go to ``data_location`` beside it."""
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        Path(path).write_bytes(model.SerializeToString())
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_location, size_threshold=1024)


def save_model(model: onnx.ModelProto, dest: str | os.PathLike) -> None:
    """Write ``model`` to ``dest`` atomically; models near 2 GiB go to external data beside it."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        write_model(model, tmp, dest.name + ".data")


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that never fails the caller: an unknown custom op just leaves shapes unknown.

    Models too large to serialize in one protobuf go through ``infer_shapes_path`` on a temporary
    copy with external data; only the inferred ``value_info`` is brought back.
    """
    try:
        if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "model.onnx", Path(tmp) / "inferred.onnx"
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(src), save_as_external_data=True, location="model.data", size_threshold=1024)
            onnx.shape_inference.infer_shapes_path(str(src), str(dst), strict_mode=False, data_prop=True)
            inferred = onnx.load(str(dst), load_external_data=False)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        del out.graph.value_info[:]
        out.graph.value_info.extend(inferred.graph.value_info)
        return out
    except Exception:
        return model


def opset_of(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise FireError("model has no default-domain opset import")


def _vi_info(vi: onnx.ValueInfoProto):
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    dims = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
            for d in tt.shape.dim]
    return tt.elem_type, dims


def tensor_table(model: onnx.ModelProto) -> dict:
    """Tensor name -> (elem_type, dims) from value_info/inputs/outputs; dims are int, str or None."""
    table = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            table.setdefault(vi.name, _vi_info(vi))
    return table


def tensor_info(model: onnx.ModelProto, name: str):
    """(elem_type, dims) of one tensor (see :func:`tensor_table`); (None, None) when unknown."""
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.HasField("tensor_type"):
            return _vi_info(vi)
    return None, None


# --------------------------------------------------------------------------------------------
# PyTorch module paths <-> exported node scopes
#
# The TorchScript-based exporter (torch.onnx.export(..., dynamo=False)) names nodes after the
# module scope: module "layer1.0.conv1" gives "/layer1/layer1.0/conv1/Conv". Each level is the
# unqualified module name: the last non-numeric atom of its dotted path plus any numeric atoms
# after it. The dynamo exporter records the full paths in node metadata
# "pkg.torch.onnx.name_scopes", e.g. ['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d'].


def _unqualified(path: str) -> str:
    atoms = path.split(".")
    i = len(atoms) - 1
    while i > 0 and atoms[i].isdigit():
        i -= 1
    return ".".join(atoms[i:])


def _child_path(parent: str, level: str) -> str:
    """Full path of the child of ``parent`` whose exported scope level is ``level``."""
    if not parent:
        return level
    head = _unqualified(parent)
    rest = level[len(head) + 1 :] if level.startswith(head + ".") else ""
    if rest and all(a.isdigit() for a in rest.split(".")):
        return f"{parent}.{rest}"  # "features" + "features.0" -> "features.0"
    return f"{parent}.{level}"  # "layer1.0" + "conv1" -> "layer1.0.conv1"


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """Module paths enclosing ``node``, outermost first ([] for top-level code or unknown)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:  # untrusted text: deep nesting raises RecursionError/MemoryError, not only SyntaxError
                scopes = ast.literal_eval(p.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return []
            if not isinstance(scopes, (list, tuple)) or not all(isinstance(s, str) for s in scopes):
                return []
            return [s for s in scopes[:-1] if s]  # last entry is the op itself
    name = node.name
    if name.startswith("/") and name.count("/") >= 2:
        levels = [lv for lv in name.split("/")[1:-1] if lv]
        out, path = [], ""
        for lv in levels:
            path = _child_path(path, lv)
            out.append(path)
        return out
    return []


def node_module(node: onnx.NodeProto) -> str:
    scopes = node_scopes(node)
    return scopes[-1] if scopes else ""


class ScopeIndex:
    """The PyTorch module scopes of every node of a graph, computed once."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes = list(graph.node)
        ordered = [node_scopes(n) for n in self.nodes]
        self.scopes = [set(sc) for sc in ordered]
        self.paths = list(dict.fromkeys(path for sc in ordered for path in sc))

    def inside(self, module_path: str) -> list[int]:
        """Indices of the nodes inside ``module_path``. A module called more than once shows up in
        dynamo exports as "name_1", "name_2"; those count only when the exact path is absent."""
        exact = [i for i, sc in enumerate(self.scopes) if module_path in sc]
        if exact or not module_path:
            return exact
        prefix = module_path + "_"
        return [i for i, sc in enumerate(self.scopes)
                if any(s.startswith(prefix) and s[len(prefix):].isdigit() for s in sc)]

    def outputs(self, module_path: str) -> list[str]:
        """Tensors that leave ``module_path``: produced inside it, used outside it (or graph outputs)."""
        inside = set(self.inside(module_path))
        if not inside:
            return []
        used_outside = {o.name for o in self.graph.output}
        for i, n in enumerate(self.nodes):
            if i not in inside:
                used_outside.update(n.input)
        produced = [o for i in sorted(inside) for o in self.nodes[i].output if o]
        return [t for t in produced if t in used_outside]

    def output_map(self) -> dict[str, list[str]]:
        """Tensor name -> the module paths whose single output it is (what ``--layer`` accepts)."""
        out: dict[str, list[str]] = {}
        for path in self.paths:
            outs = self.outputs(path)
            if len(outs) == 1:
                out.setdefault(outs[0], []).append(path)
        return out


def module_outputs(graph: onnx.GraphProto, module_path: str) -> list[str]:
    """Tensors that leave ``module_path`` (see :meth:`ScopeIndex.outputs`)."""
    return ScopeIndex(graph).outputs(module_path)


def module_paths(graph: onnx.GraphProto) -> list[str]:
    return ScopeIndex(graph).paths
