"""ONNX model I/O and PyTorch-scope bookkeeping shared by patch, inspect, fit and eval."""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from fire_onnx.errors import FireError, first_line
from fire_onnx.fileio import is_special, output_parent, umask

# protobuf refuses to serialize a message of 2 GiB or more; switch to external data well before.
# FIRE_ONNX_EXTERNAL_DATA_THRESHOLD (bytes) overrides it, e.g. to exercise the external-data path in tests.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000
EXTERNAL_DATA_ENV = "FIRE_ONNX_EXTERNAL_DATA_THRESHOLD"
EXTERNAL_MIN_BYTES = 1024  # initializers at least this large go to the data file
_ALIGN = 4096  # each tensor starts on a page boundary of the data file (lets runtimes mmap it)
_UNLOADED = "fire_onnx.unloaded"  # location of the stubs in a weightless copy (never read)

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}


def load_model(path: str | os.PathLike, *, weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX model (with its external data); a missing or corrupt file raises FireError.

    ``weights=False`` leaves external data on disk (the graph, names, shapes and inline constants
    only): enough to inspect a model past 2 GiB without reading its weights into memory."""
    p = Path(path)
    if not p.is_file():
        raise FireError(f"model not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=weights)
    except Exception as e:  # protobuf DecodeError, external-data errors, ...
        msg = first_line(e)
        raise FireError(f"{p} is not a readable ONNX model: {msg}") from None
    if not model.opset_import or not model.graph.node:
        raise FireError(f"{p} is not a readable ONNX model (no graph nodes or no opset)")
    return model


def external_data_threshold() -> int:
    """Model size (bytes) from which weights go to an external data file: the environment variable
    FIRE_ONNX_EXTERNAL_DATA_THRESHOLD when set, else EXTERNAL_DATA_THRESHOLD (~1.9 GB)."""
    env = os.environ.get(EXTERNAL_DATA_ENV, "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise FireError(f"{EXTERNAL_DATA_ENV} must be a whole number of bytes, got {env!r}") from None
    return EXTERNAL_DATA_THRESHOLD


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    """Size of a tensor's data, from its dims and type (without touching the data, which protobuf would
    copy); tensors of strings or unknown types are measured by serializing them."""
    n = 1
    for d in t.dims:
        n *= int(d)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        itemsize = 0
    if t.data_type == onnx.TensorProto.STRING or itemsize == 0:
        return t.ByteSize()
    return n * itemsize


def approx_size(model: onnx.ModelProto) -> int:
    """The serialized size of ``model``, near enough to choose external data. ``ModelProto.ByteSize()``
    serializes the whole message and raises EncodeError past 2 GiB, so the top-level initializers are
    sized from their shapes and only the rest (nodes, each < 2 GiB) is measured."""
    g = model.graph
    total = sum(_tensor_nbytes(t) for t in g.initializer)
    for part in (g.node, g.sparse_initializer, g.input, g.output, g.value_info, model.functions):
        for x in part:
            try:
                total += x.ByteSize()
            except Exception:  # EncodeError: this part alone is past 2 GiB
                total += 1 << 31
    return total


def _is_external(t: onnx.TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL


def _exportable(t: onnx.TensorProto) -> bool:
    return t.data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) and \
        _tensor_nbytes(t) >= EXTERNAL_MIN_BYTES


def _stub(t: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    s = onnx.TensorProto(name=t.name, data_type=t.data_type, doc_string=t.doc_string)
    s.dims.extend(t.dims)
    s.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = s.external_data.add()
        e.key, e.value = key, value
    return s


def light_copy(model: onnx.ModelProto, data_file: str | os.PathLike | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose top-level initializers of 1 KiB or more refer to external data.

    With ``data_file``, their bytes are written there (one tensor in memory at a time, each starting on
    a 4 KiB boundary) and the copy is a complete model once saved in the same folder. Without it the
    copy carries no weights at all, which is enough for shape inference and graph inspection but not
    to run. Either way ``model`` is not modified and the weights are never held twice.
    """
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(out.graph, fd, value)
    f = open(data_file, "wb") if data_file is not None else None
    location = Path(data_file).name if data_file is not None else _UNLOADED
    try:
        offset = 0
        for t in model.graph.initializer:
            if not _exportable(t) or _is_external(t):
                if _is_external(t) and f is not None:
                    raise RuntimeError(f"initializer {t.name!r} has no data loaded; cannot write it")
                out.graph.initializer.add().CopyFrom(t)
                continue
            length = _tensor_nbytes(t)
            if f is not None:
                raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
                length = len(raw)
                pad = -offset % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(raw)
                del raw
            out.graph.initializer.append(_stub(t, location, offset, length))
            offset += length
    finally:
        if f is not None:
            f.close()
    return out


def _copy_field(dst, fd, value) -> None:
    if hasattr(value, "extend"):  # a repeated field (FieldDescriptor.label is gone from newer protobuf)
        getattr(dst, fd.name).extend(value)
    elif hasattr(value, "CopyFrom"):
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)


def write_model(model: onnx.ModelProto, path: str | os.PathLike, data_location: str) -> None:
    """Serialize ``model`` to ``path``; from the external-data threshold (~1.9 GB) on, its weights go to
    ``data_location`` in the same folder. ``model`` is not modified. For an atomic pair of files write
    into the folder of :func:`atomic_model_path`."""
    from google.protobuf.message import EncodeError

    try:
        if approx_size(model) < external_data_threshold():
            Path(path).write_bytes(model.SerializeToString())
        else:
            light = light_copy(model, Path(path).parent / data_location)
            Path(path).write_bytes(light.SerializeToString())
    except EncodeError:  # what stays inline (Constant nodes, subgraphs) is itself past 2 GiB
        raise FireError("the patched model is too large to write: over 2 GiB remain outside the top-level "
                        "initializers (in Constant nodes or subgraphs), which fire-onnx does not move to "
                        "external data; turn large Constant nodes into initializers first") from None


@contextlib.contextmanager
def atomic_model_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary model path, in a fresh folder beside ``dest``, for :func:`write_model`.

    When the block succeeds the external data file (if one was written, named ``dest`` + ".data") and
    then the model are moved onto their final names; on failure (or Ctrl-C) the folder is removed and
    nothing is left behind. The temporary model can be loaded (onnxruntime, onnx.checker) inside the
    block, with its data beside it. A ``dest`` that is a device or a pipe (``-o /dev/null``) is
    written in place, never replaced; a model with external data cannot go there.
    """
    dest = Path(dest)
    special = is_special(dest)
    parent = output_parent(dest)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=None if special else parent))
    except OSError as e:
        raise FireError(f"cannot write to the output folder {parent} ({e.strerror or e})") from None
    try:
        tmp = tmpdir / dest.name
        yield tmp
        data = tmpdir / (dest.name + ".data")
        if special:
            if data.exists():
                raise FireError(f"{dest} is not a regular file, and a model this large needs one "
                                "(its weights go to a .data file beside it)")
            with open(tmp, "rb") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            return
        for p in (data, tmp):
            if p.exists():
                os.chmod(p, 0o666 & ~umask())
        if data.exists():
            os.replace(data, parent / data.name)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def save_model(model: onnx.ModelProto, dest: str | os.PathLike) -> None:
    """Write ``model`` to ``dest`` atomically; models near 2 GiB go to external data beside it."""
    dest = Path(dest)
    with atomic_model_path(dest) as tmp:
        write_model(model, tmp, dest.name + ".data")


def check_written_model(path: str | os.PathLike) -> None:
    """onnx.checker on a model file (its external data is checked where it lies, never loaded)."""
    onnx.checker.check_model(str(path), full_check=False)


def infer_shapes(model: onnx.ModelProto, *, weights: bool = True) -> onnx.ModelProto:
    """Shape inference that never fails the caller: an unknown custom op just leaves shapes unknown.

    Models past the external-data threshold (``ModelProto.ByteSize`` and serialization fail above
    2 GiB) are inferred on a weightless :func:`light_copy`; the result is a copy of ``model`` with the
    inferred ``value_info`` or, with ``weights=False``, that weightless copy itself (enough for names,
    shapes and types; it cannot run, and saves holding the weights twice).
    """
    try:
        if approx_size(model) < external_data_threshold():
            return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        light = light_copy(model)
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
        if not weights:
            return inferred
        out = onnx.ModelProto()
        out.CopyFrom(model)
        del out.graph.value_info[:]
        out.graph.value_info.extend(inferred.graph.value_info)
        return out
    except Exception:
        return model


def keep_source_inputs(out: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give ``out`` (an onnx-graphsurgeon export of ``source``, edited) the graph inputs ONNX needs.

    onnx-graphsurgeon does not count initializers as graph inputs and drops them from ``graph.input``.
    Before IR version 4 every initializer must also be a graph input (onnx.checker refuses the model
    otherwise), so for such models the inputs are rebuilt: the source's inputs in their order (those
    still in the graph, with their original type), then an input for each initializer the edit added,
    typed and shaped from the initializer. Subgraphs get the same rule (appended inputs). From IR 4
    on, initializers need no input and nothing changes.
    """
    if out.ir_version >= 4:
        return
    _initializer_inputs(out.graph, source.graph)
    for g in _subgraphs(out.graph):
        _initializer_inputs(g, None)


def _subgraphs(graph: onnx.GraphProto):
    for n in graph.node:
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield g
                yield from _subgraphs(g)


def _initializer_inputs(graph: onnx.GraphProto, source: onnx.GraphProto | None) -> None:
    inits = {t.name: t for t in graph.initializer}
    current = {vi.name: vi for vi in graph.input}
    ordered: list[onnx.ValueInfoProto] = []
    seen: set[str] = set()
    for vi in (source.input if source is not None else graph.input):
        if vi.name in seen:
            continue
        if vi.name in current:
            ordered.append(current[vi.name])  # a real input, as exported
        elif vi.name in inits:
            ordered.append(vi)  # an initializer-backed input of the source, unchanged
        else:
            continue  # removed by the edit (an unused initializer)
        seen.add(vi.name)
    for vi in graph.input:  # inputs the edit added (none today), after the source's
        if vi.name not in seen:
            ordered.append(vi)
            seen.add(vi.name)
    for name, t in inits.items():
        if name not in seen:
            ordered.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
            seen.add(name)
    del graph.input[:]
    graph.input.extend(ordered)


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


NOT_ACTIVATIONS = {"Constant", "Shape", "Size", "ConstantOfShape"}  # ops whose outputs hold no activation


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
        # a Constant or a Shape computed inside the module and read outside it (a ViT's patch embedding exports
        # the flatten's shape constant in its scope) is not an activation: never the module's output
        produced = [o for i in sorted(inside) if self.nodes[i].op_type not in NOT_ACTIVATIONS
                    for o in self.nodes[i].output if o]
        return [t for t in produced if t in used_outside]

    def output_map(self) -> dict[str, list[str]]:
        """Tensor name -> the module paths whose single output it is (what ``--layer`` accepts)."""
        out: dict[str, list[str]] = {}
        for path in self.paths:
            outs = self.outputs(path)
            if len(outs) == 1:
                out.setdefault(outs[0], []).append(path)
        return out


def repeated_calls(graph: onnx.GraphProto, module_path: str) -> list[str]:
    """Scope names of further calls of ``module_path`` in a TorchScript-exporter graph ("relu_1", "relu_2"
    for a shared ``relu``; "shared.0_1" inside a block ``shared`` called twice): such a module is called
    more than once, and its name resolves to one of the calls only. [] when none is seen."""
    import re

    pat = re.compile(re.escape(module_path) + r"(\.[^/]+)?_\d+")
    found = []
    for n in graph.node:
        name = n.name or ""
        for lv in name.split("/")[1:-1] if name.startswith("/") else []:
            if pat.fullmatch(lv) and lv not in found:
                found.append(lv)
    return found


def module_outputs(graph: onnx.GraphProto, module_path: str) -> list[str]:
    """Tensors that leave ``module_path`` (see :meth:`ScopeIndex.outputs`)."""
    return ScopeIndex(graph).outputs(module_path)


def module_paths(graph: onnx.GraphProto) -> list[str]:
    return ScopeIndex(graph).paths


PROBE_BATCH = 7919  # a batch size no other dimension is likely to equal (a prime)


def initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}


def data_input(graph: onnx.GraphProto):
    """The graph's first input that is not an initializer (IR < 4 lists initializers as inputs too)."""
    inits = initializer_names(graph)
    return next((vi for vi in graph.input if vi.name not in inits), None)


def batch_symbol(model: onnx.ModelProto) -> str | None:
    """The symbolic first dimension of the model's data input (e.g. 'batch'); None when it is fixed or absent."""
    inp = data_input(model.graph)
    dims = inp.type.tensor_type.shape.dim if inp is not None else []
    return (dims[0].dim_param or None) if dims else None


def batch_aligned(model: onnx.ModelProto) -> set[str]:
    """Tensors of ``model`` whose first dimension is the batch, by shape inference with the input's batch
    fixed to PROBE_BATCH: symbolic inference loses the batch symbol where a graph computes shapes (a ViT's
    class token expanded to Shape(x)[0] gives ``unk__1``), while data propagation carries a number through.
    Empty when the model has no symbolic batch or inference fails."""
    if batch_symbol(model) is None:
        return set()
    table = shapes_at_probe_batch(model)
    return {name for name, (_, dims) in (table or {}).items() if dims and dims[0] == PROBE_BATCH}


def shapes_at_probe_batch(model: onnx.ModelProto) -> dict | None:
    """:func:`tensor_table` of ``model`` inferred with its data input's batch fixed to PROBE_BATCH (data
    propagation carries the number where symbolic inference loses the batch symbol); None when inference fails."""
    inp = data_input(model.graph)
    try:
        m = light_copy(model)
        del m.graph.value_info[:]
        for vi in m.graph.input:
            if vi.name == inp.name:
                vi.type.tensor_type.shape.dim[0].Clear()
                vi.type.tensor_type.shape.dim[0].dim_value = PROBE_BATCH
        for vi in m.graph.output:
            if vi.type.tensor_type.shape.dim:
                vi.type.tensor_type.shape.dim[0].Clear()
        return tensor_table(onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True))
    except Exception:  # noqa: BLE001 - then only the symbolic rule applies
        return None


def downstream_model(model: onnx.ModelProto, start: str, value_infos: onnx.ModelProto | None = None,
                     aligned: set[str] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """The part of ``model`` that computes its first output from tensor ``start``: a model whose inputs are
    ``start`` and the other tensors that part reads (the *frontier*: e.g. a residual branch's input, or the
    graph input), each with the batch as first dimension, so that rows of all of them can be fed together.

    A frontier tensor whose first dimension is not known to be the batch (a Shape's output, a constant
    computed in the graph) is computed inside the part instead, from what feeds it. Returns (model, frontier
    names, ``start`` first). Raises ValueError where the part cannot be cut out this way: nodes with
    subgraphs, a fixed batch, an output that does not depend on ``start``, weights past the external-data
    threshold, a frontier tensor of unknown type. Shapes and types come from ``model``'s value_info and
    inputs, and from ``value_infos`` (a model with inferred shapes whose tensors ``model`` shares, e.g. the
    model before an edit downstream of ``start``). ``aligned``: tensors known to have the batch first
    (:func:`batch_aligned`), besides those whose first dimension is the input's batch symbol.
    """
    g = model.graph
    if not g.output:
        raise ValueError("no graph output")
    if approx_size(model) >= external_data_threshold():
        raise ValueError("model past the external-data threshold")
    out = g.output[0].name
    table = {**(tensor_table(value_infos) if value_infos is not None else {}), **tensor_table(model)}
    inputs = {vi.name for vi in g.input}
    inits = initializer_names(g)
    first_input = data_input(g)
    if first_input is None:
        raise ValueError("no graph input")
    batch = (table.get(first_input.name, (None, None))[1] or [None])[0]
    if not isinstance(batch, str) or not batch:
        raise ValueError("the model's batch dimension is not symbolic")
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    # nodes downstream of start
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    down, stack = set(), [start]
    while stack:
        for i in consumers.get(stack.pop(), []):
            if i not in down:
                down.add(i)
                stack.extend(o for o in g.node[i].output if o)
    # nodes the output needs
    need, stack = set(), [out]
    while stack:
        name = stack.pop()
        i = producer.get(name)
        if i is None or i in need:
            continue
        need.add(i)
        stack.extend(x for x in g.node[i].input if x)
    part = down & need
    if out not in {o for i in part for o in g.node[i].output}:
        raise ValueError(f"the first output does not depend on {start!r}")

    def batched(name: str) -> bool:
        if aligned and name in aligned:
            return True
        _, dims = table.get(name, (None, None))
        return bool(dims) and dims[0] == batch

    while True:  # pull in the producers of frontier tensors that are not batch-aligned
        made = {o for i in part for o in g.node[i].output}
        frontier = [x for i in sorted(part) for x in g.node[i].input
                    if x and x not in made and x not in inits and x != start]
        pulled = False
        for name in dict.fromkeys(frontier):
            if name in inputs or batched(name):
                continue
            i = producer.get(name)
            if i is None:
                raise ValueError(f"tensor {name!r} is read but not produced")
            part.add(i)
            pulled = True
        if not pulled:
            break
    nodes = [g.node[i] for i in sorted(part)]
    if any(a.HasField("g") or len(a.graphs) for n in nodes for a in n.attribute):
        raise ValueError("a node with a subgraph")
    frontier = [start] + [x for x in dict.fromkeys(frontier) if x != start]
    known = [] if value_infos is None else list(value_infos.graph.value_info) + list(value_infos.graph.input)
    vis = {vi.name: vi for vi in known + list(g.value_info) + list(g.input) + list(g.output)
           if vi.type.tensor_type.elem_type}
    m = onnx.ModelProto()
    m.ir_version = max(model.ir_version, 4)  # initializers need no graph input from IR 4 on
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    for name in frontier:
        vi = vis.get(name)  # typed value infos only
        if vi is None:
            raise ValueError(f"tensor {name!r} has no known type")
        m.graph.input.append(vi)
    m.graph.node.extend(nodes)
    used = {x for n in nodes for x in n.input}
    m.graph.initializer.extend(t for t in g.initializer if t.name in used)
    m.graph.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in used)
    m.graph.output.append(g.output[0])
    m.graph.name = f"{g.name}_from_{start}"
    return m, frontier
