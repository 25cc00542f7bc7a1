"""List the tensors of an ONNX model that a repair could target (onnx only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from fire_onnx.estimate import default_layout
from fire_onnx.onnxutil import (FLOAT_TYPES, PROBE_BATCH, ScopeIndex, batch_symbol, infer_shapes, node_module,
                                shapes_at_probe_batch, tensor_table)
from fire_onnx.patch import (ACTIVATIONS, fused_ops, is_patched, patched_targets, read_patched_targets, repair_problems,
                              shown_tensor)

POST_OPS = ACTIVATIONS | {"MaxPool", "AveragePool", "GlobalAveragePool", "LayerNormalization"}
POOLED_OPS = {"Gather", "ReduceMean"}  # (N, D) outputs: a CLS token picked out of the tokens, or their mean


@dataclass
class Candidate:
    tensor: str
    shape: list | None  # None: unknown (shape inference could not tell; the tensor is still listed)
    dtype: str  # "?" when unknown
    op: str
    module: str  # innermost module whose code produced the tensor
    layers: list  # module paths whose output this tensor is: the values ``fit --layer`` accepts
    consumers: int
    layout: str
    breaks_fusion: bool
    note: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def candidates(model: onnx.ModelProto, include_all: bool = False) -> list[Candidate]:
    """Float activations of rank >= 2 in graph order, with shape, producer and module scope.

    By default only likely targets are listed: module outputs, post-activation/pooling/norm tensors
    and graph outputs; ``include_all`` lists every float activation. A tensor whose type or shape
    shape inference could not tell (after a custom op, say) is listed too, with shape None and a
    note: it may well be a float activation, and ``patch`` says what it needs if it is not.
    """
    inferred = infer_shapes(model, weights=False)
    graph = inferred.graph
    layers_of = ScopeIndex(graph).output_map()
    folded = folded_weights(graph)
    shapes = tensor_table(inferred)
    batch_sym = batch_symbol(model)
    batch_first, later = batch_axes(model, shapes)
    consumers: dict[str, list[str]] = {}  # tensor -> consumer op types
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    outputs = {o.name for o in graph.output}
    repaired = {t["tensor"] for t in patched_targets(model)}
    out = []
    for n in graph.node:
        if n.name.startswith("fire_onnx/"):
            continue
        for name in n.output:
            elem, dims = shapes.get(name, (None, None))
            if not elem:
                elem = None  # 0: UNDEFINED
            if (elem is not None and elem not in FLOAT_TYPES) or (dims is not None and len(dims) < 2):
                continue
            unknown = elem is None or dims is None
            pair = fused_ops(n.op_type, consumers.get(name, []))
            layers = layers_of.get(name, [])
            own = node_module(n)
            folded_note = ""
            if n.output[0] in folded and own in layers:
                # the exporter rewrote this node's weights (a BatchNorm folded into it): the tensor holds what
                # the module after it outputs, not what ``own`` outputs, so ``fit --layer own`` would be wrong
                layers = [path for path in layers if path != own]
                folded_note = f"; weights folded by the exporter: not the output of {own}"
            if name in repaired:
                note = "repaired by fire-onnx"
            elif name in later and (layers or n.op_type in POST_OPS):
                tbd = " ([T, B, D])" if later[name] == 1 and dims is not None and len(dims) == 3 else ""
                note = (f"{BATCH_LATER_NOTE} {later[name]}{tbd}: not repairable, fit needs the batch first "
                        "(the CLS token or pooled features: 'candidate (pooled features)' below, where the model has them)")
            elif pair:
                note = f"splits {pair[0]}+{pair[1]} fusion"
            elif name in outputs:
                note = "graph output"
            elif layers or n.op_type in POST_OPS:
                note = "candidate"
            elif n.op_type in POOLED_OPS and dims is not None and len(dims) == 2 and name in batch_first:
                # a transformer's CLS token (x[:, 0]) or mean-pooled tokens: no module of its own and no activation
                # op, so it was listed only under --all, yet on a batch_first=False encoder it was the one tensor
                # that could be repaired (new-user run 18: ASR 98 -> 6.7 %)
                note = "candidate (pooled features)"
            else:
                note = ""
            note += folded_note if note else folded_note[2:]
            if unknown:
                what = "type and shape" if elem is None and dims is None else ("type" if elem is None else "shape")
                note += f"; {what} unknown" if note else f"{what} unknown"
            if not include_all and not note.startswith(("candidate", "graph", "repaired", BATCH_LATER_NOTE)) \
                    and not ((layers or folded_note) and pair):
                continue
            out.append(Candidate(
                tensor=name,
                shape=None if dims is None else [batch_sym if (i == 0 and name in batch_first) or later.get(name) == i
                                                 else "?" if d is None else d for i, d in enumerate(dims)],
                dtype=FLOAT_TYPES.get(elem, "?"),
                op=n.op_type,
                module=own,
                layers=layers,
                consumers=len(consumers.get(name, [])),
                layout=default_layout(dims) if dims is not None else "?",
                breaks_fusion=pair is not None,
                note=note,
            ))
    return out


BATCH_LATER_NOTE = "batch on axis"  # the note of a tensor whose batch is not its first axis


def batch_axes(model: onnx.ModelProto, shapes: dict | None = None) -> tuple[set[str], dict[str, int]]:
    """(tensors whose first dimension is the batch, {tensor: axis} for those that hold it on a later axis).

    Symbolic shape inference loses the batch symbol where a graph computes shapes (a ViT's class token expanded
    to Shape(x)[0] reads unk__1 x 17 x 64), so where a dimension other than the batch symbol is symbolic the
    shapes are inferred again with the input's batch fixed to PROBE_BATCH (data propagation carries a number
    through; as :func:`fire_onnx.onnxutil.batch_aligned`). A later axis is the batch where it is dynamic in the
    model and reads PROBE_BATCH with the batch fixed while the first axis does not: the [T, B, D] blocks of
    nn.TransformerEncoderLayer(batch_first=False) read 17 x unk__1 x 64 (TorchScript export) or 17 x batch x 64
    (dynamo export), and were listed as candidates that fit could only refuse or misread (new-user run 18).
    Both are empty when the batch is fixed (nothing tells it from another dimension then)."""
    batch_sym = batch_symbol(model)
    if not batch_sym:
        return set(), {}
    if shapes is None:
        shapes = tensor_table(infer_shapes(model, weights=False))
    first = {name for name, (_, d) in shapes.items() if d and d[0] == batch_sym}
    later = {name: d.index(batch_sym, 1) for name, (_, d) in shapes.items() if d and d[0] != batch_sym
             and batch_sym in d[1:]}
    if not any(isinstance(v, str) and v != batch_sym for _, d in shapes.values() if d for v in d):
        return first, later
    fixed = shapes_at_probe_batch(model)
    if fixed is None:
        return first, later
    for name, (_, d) in fixed.items():
        if not d:
            continue
        if d[0] == PROBE_BATCH:
            first.add(name)
            later.pop(name, None)
            continue
        sym = shapes.get(name, (None, None))[1]
        axis = next((i for i, v in enumerate(d) if i and v == PROBE_BATCH
                     and sym is not None and len(sym) == len(d) and not isinstance(sym[i], int)), None)
        if axis is not None and name not in first:
            later[name] = axis
    return first, later


WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def folded_weights(graph: onnx.GraphProto) -> set[str]:
    """Outputs of the nodes whose weight the PyTorch TorchScript exporter replaced by a folded constant.

    That exporter keeps a parameter's state-dict name ("block1.0.weight") for an initializer it leaves
    as is, and names a constant it computed "onnx::Conv_26": a Conv whose weight is such a constant,
    in a graph whose other weights carry state-dict names, had a BatchNorm (or a scale) folded into it.
    """
    inits = {t.name for t in graph.initializer}
    named = any("." in name and not name.startswith("onnx::") for name in inits)
    if not named:
        return set()
    return {n.output[0] for n in graph.node
            if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in inits
            and n.input[1].startswith("onnx::") and node_module(n)}


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
        "fire_onnx_targets_error": read_patched_targets(model)[1],
        "fire_onnx": _recorded(model),
        "repair_problems": repair_problems(model),
    }


def _recorded(model: onnx.ModelProto) -> dict:
    """What ``patch`` recorded in the model's metadata besides the targets: version, directions hash, and the
    preprocessing and attack as ``eval`` reads them (:func:`fire_onnx.evaluate.model_info`; an unreadable
    record gives its error instead)."""
    from fire_onnx.evaluate import model_info
    from fire_onnx.patch import META_SHA, META_VERSION

    props = {p.key: p.value for p in model.metadata_props}
    info = model_info(model)
    out = {"version": props.get(META_VERSION), "directions_sha256": props.get(META_SHA),
           "preprocess": info.preprocess.as_dict() if info.preprocess else None, "attack": info.attack}
    out.update({k: v for k, v in (("preprocess_error", info.preprocess_error), ("attack_error", info.attack_error))
                if v})
    return out


def _dims(vi) -> list:
    if not vi.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def describe_repair(summ: dict) -> list[str]:
    """Text lines on the repair a patched model carries (from :func:`summary`)."""
    rec = summ.get("fire_onnx") or {}
    sha = str(rec.get("directions_sha256") or "")[:12]
    problems = summ.get("repair_problems") or []
    lines = [f"warning: {w}" for w in problems]
    lines.append(f"repaired by fire-onnx {rec.get('version') or '?'}" + (f" (directions sha256 {sha})" if sha else "")
                 + (" as recorded, NOT WORKING (see the warning above)" if problems else "") + ":")
    targets = summ.get("fire_onnx_targets") or []
    if not targets:
        lines.append(f"  ({summ.get('fire_onnx_targets_error') or 'no targets recorded'})")
    for t in targets:
        what = [f"layout {t['layout']}" if t.get("layout") else "", f"k={t['k']}" if t.get("k") else "",
                f"gate {t['gate']}" if t.get("gate") else "", f"repair {t.get('repair', 'project')}",
                f"{t['nodes']} nodes" if t.get("nodes") else "",
                f"for class {t['target_class']}" if t.get("target_class") is not None else "",
                "after the repair above at the same tensor (--add)" if t.get("activation") else "",
                f"directions {str(t['directions_sha256'])[:12]}" if len(targets) > 1 and t.get("directions_sha256")
                else ""]
        shown = t.get("activation") or shown_tensor(t['tensor'], t.get('output'))
        lines.append(f"  {shown}" + (f" (module {t['module']})" if t.get("module") else "") + ": "
                     + ", ".join(w for w in what if w))
    attack = rec.get("attack")
    if isinstance(attack, dict) and isinstance(attack.get("targets"), list) and attack["targets"]:
        lines.append("recorded attack: several backdoors repaired, targets "
                     + ", ".join(str(c) for c in attack["targets"]))
    elif isinstance(attack, dict) and (attack.get("target") is not None or attack.get("trigger")):
        trig = attack.get("trigger")
        if isinstance(trig, dict):
            opts = ", ".join(f"{k}={v}" for k, v in trig.items() if k != "kind" and not k.endswith("_sha256"))
            trig = f"{trig.get('kind', '?')}" + (f" ({opts})" if opts else "")
        lines.append("recorded attack: " + ", ".join(
            x for x in (f"target {attack['target']}" if attack.get("target") is not None else "",
                        f"trigger {trig}" if trig else "") if x))
    if rec.get("attack_error"):
        lines.append(f"recorded attack: unreadable ({rec['attack_error']})")
    if rec.get("preprocess"):
        from fire_onnx.data import Preprocess
        from fire_onnx.evaluate import describe_preprocess

        lines.append("recorded preprocessing: " + describe_preprocess(Preprocess.from_dict(rec["preprocess"])))
    elif rec.get("preprocess_error"):
        lines.append(f"recorded preprocessing: unreadable ({rec['preprocess_error']})")
    return lines
