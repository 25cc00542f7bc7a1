"""Insert FIRE's projection-subtraction after target tensors of an ONNX model.

Only onnx, onnx-graphsurgeon and numpy are used here (no torch). The inserted nodes use ops that
every TensorRT >= 8 parses (Reshape, Shape, Gemm, MatMul, Sub, Greater, Where, Cast) and keep every
dynamic dimension dynamic. For a target ``h`` with directions ``U`` (k, D)::

    flat   (N, C, H, W): x = Reshape(h, [0, D])         ... y = Reshape(x', Shape(h))
    vector (N, D)      : x = h
    token  (N, T, D)   : x = h   (MatMul broadcasts over tokens)

    s  = Gemm(x, U, -U mu, transB=1)        # scores x U^T - U mu, constants folded in numpy
    c  = Where(s > tau, s, 0)               # gate "hard" (gate "none": tau = -MAX, every finite score)
    c  = Where(MAX > c, c, 0)               # non-finite scores (NaN/inf in h) give no correction
    x' = Gemm(c, diag(alpha) U, x, alpha=-1, beta=1)    # x - c (alpha U)

(token: MatMul + Sub in place of each Gemm, which is 2-D only).

Repair ``translate`` (the FIRE paper's operator, ``x - alpha beta``): with gate "none" one node,
``Sub(h, alpha beta)`` (beta reshaped to the per-sample shape); with gate "hard" the scores and gate as
above, then ``c = Where(s > tau, 1, 0)`` (0 for non-finite scores) and ``x' = Gemm(c, diag(alpha shift) U,
x, alpha=-1, beta=1)``.

Consumers are rewired from ``h`` to the result (subgraph bodies included, since onnx-graphsurgeon
shares outer tensors with them); a target that is a graph output keeps its public name.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from fire_onnx import directions as dirs
from fire_onnx.errors import FireError, first_line, suggest
from fire_onnx.fileio import check_outputs, is_int, sha256_file
from fire_onnx.onnxutil import (
    FLOAT_TYPES,
    approx_size,
    atomic_model_path,
    batch_symbol,
    check_written_model,
    external_data_threshold,
    infer_shapes,
    initializer_names,
    keep_source_inputs,
    load_model,
    module_outputs,
    module_paths,
    opset_of,
    tensor_info,
    tensor_table,
    write_model,
)

PREFIX = "fire_onnx"
META_VERSION = "fire_onnx.version"
META_SHA = "fire_onnx.directions_sha256"
META_TARGETS = "fire_onnx.targets"
META_PREPROCESS = "fire_onnx.preprocess"
META_ATTACK = "fire_onnx.attack"  # {"target": ..., "trigger": ...} from the directions' meta, for eval's checks
MIN_OPSET = 9  # Where


@dataclass
class PatchedTarget:
    tensor: str  # the tensor the repair reads (the original activation)
    output: str  # the tensor consumers now read
    module: str
    layout: str
    gate: str
    k: int
    shape: list = field(default_factory=list)
    nodes: int = 0
    repair: str = "project"
    target_class: int | None = None  # the class whose backdoor this repair is for (directions.repaired_class)
    activation: str = ""  # a repair added on top of another at the same tensor (--add): that model activation
    directions_sha256: str = ""  # the directions file this repair was patched from (a stack keeps each one's)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        for k in ("activation", "directions_sha256"):
            if not out[k]:
                del out[k]
        return out

    @property
    def shown(self) -> str:
        return self.activation or shown_tensor(self.tensor, self.output)


OUTPUT_INPUT_SUFFIX = ".fire_onnx_in"  # a repaired graph output keeps its name; the activation it reads gets this


def shown_tensor(tensor: str, output: str | None) -> str:
    """The name a user knows a repaired tensor by: a graph output's public name, not its renamed activation."""
    return output if output and tensor == f"{output}{OUTPUT_INPUT_SUFFIX}" else tensor


@dataclass
class PatchResult:
    model: onnx.ModelProto
    targets: list[PatchedTarget]
    warnings: list[str]
    source: onnx.ModelProto | None = None  # the unpatched graph the repair was built on
    source_tensors: list[str] = field(default_factory=list)  # each target's tensor name in ``source``
    checked: bool = True  # onnx.checker passed in memory; False: too large, check the written file


def is_patched(model: onnx.ModelProto) -> bool:
    """Recorded as repaired (metadata) or carrying repair nodes; :func:`has_repair_nodes` for the nodes alone."""
    return any(p.key == META_VERSION for p in model.metadata_props) or has_repair_nodes(model)


def repair_nodes(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.name.startswith(PREFIX + "/")]


def has_repair_nodes(model: onnx.ModelProto) -> bool:
    return any(n.name.startswith(PREFIX + "/") for n in model.graph.node)


# static quantization (calibrated ranges); dynamic quantization (DynamicQuantizeLinear + MatMulInteger) sets the
# range per batch from the inputs themselves and kept the repair (run 16: ASR 0.4 %), so it is not listed
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QGemm", "QLinearMatMul", "QLinearConv", "QLinearAdd", "QLinearMul"}


def quantized_repair_nodes(model: onnx.ModelProto, weights: bool = True) -> list:
    """The repair's nodes that a quantizer added or replaced (``QUANT_OPS`` among the ``fire_onnx/`` nodes: the
    quantizers name theirs after the node they quantize). ``weights=False`` leaves out DequantizeLinear nodes of
    stored weights, which keep the repair computed in float."""
    inits = initializer_names(model.graph)
    return [n for n in repair_nodes(model) if n.op_type in QUANT_OPS
            and (weights or not (n.op_type == "DequantizeLinear" and n.input and n.input[0] in inits))]


def repair_problems(model: onnx.ModelProto) -> list[str]:
    """What makes a model that looks repaired not carry a working repair (new-user run 16):

    - fire-onnx metadata without any fire-onnx node (a pipeline that copied the metadata onto the unrepaired
      model: inspect said "repaired", the model kept 99.9 % ASR);
    - quantized repair nodes: static INT8 quantization calibrated on clean images sets the score tensor's range
      from clean scores, so the gate's scores saturate below tau and it never fires (ASR 0.4 -> 99.9 %). Where the
      scale and zero point are readable, the largest representable score is compared with tau.
    """
    from onnx import numpy_helper

    out = []
    nodes = repair_nodes(model)
    if not nodes:
        if any(p.key in (META_VERSION, META_TARGETS) for p in model.metadata_props):
            out.append("the model's metadata records a fire-onnx repair, but the graph has no fire-onnx nodes: it is "
                       "not repaired (the metadata was copied onto another model?); patch the original model again")
        return out
    # weights stored in INT8 and dequantized keep the repair in float: not a problem
    quant = quantized_repair_nodes(model, weights=False)
    if not quant:
        return out
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def value(name):
        t = inits.get(name)
        if t is None or (t.data_location == onnx.TensorProto.EXTERNAL):
            return None
        return numpy_helper.to_array(t)

    closed = []
    for gate in (n for n in nodes if n.name.endswith("/gate_mask") and n.op_type == "Greater"):
        dq = producer.get(gate.input[0])
        tau = value(gate.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or tau is None or len(dq.input) < 3:
            continue
        scale, zp = value(dq.input[1]), value(dq.input[2])
        if scale is None or zp is None:
            continue
        qmax = float(np.iinfo(zp.dtype).max) if zp.dtype.kind in "iu" else None
        if qmax is None:
            continue
        top = float(np.max((qmax - zp.astype(np.float64)) * scale.astype(np.float64)))
        if top <= float(np.min(tau)):
            closed.append(f"{gate.name.rsplit('/', 1)[0]}: scores quantized to at most {top:.4g}, tau {float(np.min(tau)):.4g}")
    what = (f"the repair's scores cannot reach the gate's threshold ({'; '.join(closed)}): the gate never fires and "
            "the repair does nothing" if closed else
            "its correction and gate are computed in integers, which can clip the scores and the correction")
    out.append(f"the repair's nodes are quantized ({len(quant)} quantization nodes among the fire_onnx/ ones): {what}. "
               "Quantize with the fire_onnx/ nodes excluded (onnxruntime's quantize_static(..., nodes_to_exclude=[...])) "
               "and check with 'fire-onnx eval --fail-asr'")
    return out


def patched_targets(model: onnx.ModelProto) -> list[dict]:
    """The targets an earlier patch recorded (``fire_onnx.targets``); [] when absent or unreadable."""
    return read_patched_targets(model)[0]


def recorded_classes(model: onnx.ModelProto) -> list[int]:
    """The classes whose backdoors a patched model's repairs are for: each recorded target's ``target_class``, else
    the ``fire_onnx.attack`` metadata's ``targets`` / ``target`` (models patched before targets carried a class)."""
    from fire_onnx.fileio import loads_json

    out = [int(r["target_class"]) for r in patched_targets(model) if is_int(r.get("target_class"))]
    if not out:
        raw = {p.key: p.value for p in model.metadata_props}.get(META_ATTACK)
        try:
            attack = loads_json(raw) if raw else {}
        except ValueError:
            attack = {}
        out = attack_classes(attack)
    return list(dict.fromkeys(out))


def attack_classes(attack) -> list[int]:
    """The classes a ``fire_onnx.attack`` record names: its ``targets`` (several repairs stacked with --add), else
    its ``target``; [] when it names none (or is not a dict)."""
    if not isinstance(attack, dict):
        return []
    listed = attack.get("targets") if isinstance(attack.get("targets"), list) else [attack.get("target")]
    return [int(c) for c in listed if is_int(c)]


def _repair_index(node_name: str) -> int | None:
    """``i`` of a repair node named ``fire_onnx/<i>/...`` (see _build), else None."""
    parts = node_name.split("/")
    return int(parts[1]) if len(parts) > 2 and parts[0] == PREFIX and parts[1].isdigit() else None


def next_repair_index(model: onnx.ModelProto) -> int:
    """The first ``fire_onnx/<i>/`` node index not used yet (a repair added with --add is named after the others)."""
    used = [i for n in model.graph.node if (i := _repair_index(n.name)) is not None]
    return max(used, default=-1) + 1


def read_patched_targets(model: onnx.ModelProto) -> tuple[list[dict], str | None]:
    """(recorded targets, None), or ([], why) when the ``fire_onnx.targets`` metadata is corrupt: it
    must be a JSON list of objects with string ``tensor`` and ``output`` entries."""
    from fire_onnx.fileio import loads_json

    for p in model.metadata_props:
        if p.key == META_TARGETS:
            try:
                recs = loads_json(p.value)
            except ValueError as e:
                return [], f"its {META_TARGETS} metadata {e}"
            if not isinstance(recs, list) or not all(
                    isinstance(r, dict) and isinstance(r.get("tensor"), str) and isinstance(r.get("output"), str)
                    for r in recs):
                return [], f"its {META_TARGETS} metadata is not a list of {{tensor, output}} records"
            return recs, None
    return [], None


def _all_tensor_names(model: onnx.ModelProto) -> list[str]:
    """Activations: node outputs and graph inputs (before IR 4 initializers are graph inputs too, but
    they are weights, not activations)."""
    initializers = {i.name for i in model.graph.initializer}
    names = [o for n in model.graph.node for o in n.output if o]
    names += [i.name for i in model.graph.input if i.name not in initializers]
    return list(dict.fromkeys(names))


def resolve_target(model: onnx.ModelProto, target: dirs.Target, override: str | None = None) -> str:
    """The ONNX tensor name a target applies to: ``override``, else its tensor, else its module."""
    return resolve_tensor(model, tensor=target.tensor, module=target.module, override=override)


def resolve_tensor(model: onnx.ModelProto, *, tensor: str = "", module: str = "", override: str | None = None,
                   by_suffix: bool = False) -> str:
    """The ONNX tensor named ``override``, else ``tensor`` if the graph has it, else the single output
    of the PyTorch module ``module`` (found through the exporter's scope names). ``by_suffix``: a module
    path the scopes lack may be found by its last components (the TorchScript exporter drops a
    ModuleDict's name: ``heads.feat`` is scoped ``feat``); only for callers that then check the tensor's
    values against the module's output."""
    names = _all_tensor_names(model)
    initializers = {i.name for i in model.graph.initializer}
    if override:
        if override not in names or override in initializers:
            _refuse_subgraph_tensor(model, override)
            raise FireError(f"tensor {override!r} is not an activation in the model{suggest(override, names)}")
        return override
    if tensor and tensor in names:
        return tensor
    if module:
        outs = module_outputs(model.graph, module)
        if len(outs) == 1:
            return outs[0]
        if len(outs) > 1:
            raise FireError(
                f"module {module!r} has {len(outs)} output tensors in the ONNX graph "
                f"({', '.join(outs[:6])}); choose one with --tensor"
            )
        paths = module_paths(model.graph)
        parts = module.split(".")
        for i in range(1, len(parts)) if by_suffix and module not in paths else ():
            shorter = ".".join(parts[i:])
            if shorter in paths and len(outs := module_outputs(model.graph, shorter)) == 1:
                return outs[0]
        if not paths:
            raise FireError(
                f"module {module!r} not found: the model's node names carry no PyTorch scopes; "
                "find the tensor with 'fire-onnx inspect' and pass --tensor"
            )
        raise FireError(f"module {module!r} not found in the ONNX graph{suggest(module, paths)}")
    _refuse_subgraph_tensor(model, tensor)
    raise FireError(
        f"tensor {tensor!r} is not in the model{suggest(tensor, names)}; pass --tensor"
    )


def _subgraph_tensors(graph, owner: str = "") -> dict[str, str]:
    """Tensors made inside the bodies of If / Loop / Scan nodes: name -> the node (op and name) owning it."""
    found: dict[str, str] = {}
    for n in graph.node:
        for a in n.attribute:
            bodies = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in bodies:
                here = owner or (f"{n.op_type} node {n.name!r}" if n.name else f"{n.op_type} node")
                found.update({o: here for m in g.node for o in m.output if o})
                found.update(_subgraph_tensors(g, here))
    return found


def _refuse_subgraph_tensor(model: onnx.ModelProto, name: str) -> None:
    inner = _subgraph_tensors(model.graph).get(name) if name else None
    if inner:
        raise FireError(f"tensor {name!r} is made inside the body of the {inner}: fire-onnx repairs tensors of the "
                        "main graph only (the If/Loop output, or a tensor before it, holds what the body computed)")


def batch_later_message(name: str, axis: int, dims) -> str:
    from fire_onnx.probe import batch_later_text

    return batch_later_text(f"tensor {name!r} (shape {_fmt(dims)})", axis, dims)


def check_layout(target: dirs.Target, name: str, dims, model: onnx.ModelProto | None = None,
                 notes: list | None = None) -> list:
    """Check the tensor's shape against the target's layout and D; returns the dims. Dynamic per-sample
    dimensions of a flat target are accepted where they agree with the shape it was fitted at (the
    patch's Reshape to (N, D) then fails loudly at any other size), with a note in ``notes``."""
    d = target.dim
    if dims is None:
        foreign = sorted({f"{n.domain}.{n.op_type}" for n in (model.graph.node if model is not None else [])
                          if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise FireError(
                f"the shape of tensor {name!r} is unknown after shape inference: the model contains ops of other "
                f"domains ({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}), such as the fused ops "
                "onnxruntime's graph optimizer writes, which ONNX shape inference cannot follow; patch the model "
                "as exported, before such optimization (onnxruntime applies it again when it loads the patched model)"
            )
        raise FireError(
            f"the shape of tensor {name!r} is unknown after shape inference; "
            "fire-onnx needs at least its rank (export the model with shape information)"
        )
    rank = len(dims)
    want = {"flat": "rank >= 2", "vector": "rank 2 (N, D)", "token": "rank 3 (N, T, D)"}[target.layout]
    ok_rank = rank >= 2 if target.layout == "flat" else rank == (2 if target.layout == "vector" else 3)
    if not ok_rank:
        raise FireError(f"tensor {name!r} has shape {_fmt(dims)}; layout {target.layout!r} needs {want}")
    if target.layout == "flat":
        feat = dims[1:]
        if all(isinstance(x, int) for x in feat):
            if int(np.prod(feat)) != d:
                raise FireError(
                    f"dimension mismatch: tensor {name!r} has per-sample shape {_fmt(feat)} "
                    f"({int(np.prod(feat))} values) but the directions have D = {d}"
                )
        else:
            fitted = [int(v) for v in target.feature_shape] if target.feature_shape else []
            if (len(fitted) == len(feat) and int(np.prod(fitted)) == d
                    and all(not isinstance(a, int) or a == b for a, b in zip(feat, fitted))):
                if notes is not None:
                    notes.append(
                        f"tensor {name!r} has dynamic dimensions {_fmt(feat)} and the repair was fitted at per-sample "
                        f"shape {_fmt(fitted)}: the patched model repairs inputs of the size it was fitted on, and "
                        "inputs of another size stop with a Reshape error in the runtime (export the model with a "
                        "static input size to make that explicit)")
                return dims
            token = (" (for (N, T, D) token sequences of variable length, fit with --layout token)"
                     if rank == 3 else "")
            raise FireError(
                f"tensor {name!r} has dynamic feature dimensions {_fmt(feat)}"
                + (f" that do not match the per-sample shape {_fmt(fitted)} the directions were fitted at"
                   if fitted else ", and the directions do not record the per-sample shape they were fitted at")
                + f"; layout 'flat' needs them to{token}: export the model with a static input size (the one you "
                "deploy), or repair a tensor after Flatten/Gemm"
            )
    elif isinstance(dims[-1], int) and dims[-1] != d:
        raise FireError(f"dimension mismatch: tensor {name!r} has last dimension {dims[-1]} but the directions have D = {d}")
    elif not isinstance(dims[-1], int):
        raise FireError(f"tensor {name!r} has a dynamic last dimension; layout {target.layout!r} needs D static")
    return dims


def _fmt(dims) -> str:
    return "(" + ", ".join("?" if x is None else str(x) for x in dims) + ")"


def fusion_pair(model: onnx.ModelProto, name: str) -> tuple[str, str] | None:
    """(producer op, consumer op) when ``name`` sits between a Conv/Gemm/MatMul and the op a runtime
    fuses into it (activation, bias Add, BatchNormalization); patching there breaks that fusion."""
    producer = next((n.op_type for n in model.graph.node if name in n.output), None)
    return fused_ops(producer, [n.op_type for n in model.graph.node if name in n.input])


def fused_ops(producer: str | None, consumers: list[str]) -> tuple[str, str] | None:
    """The fusion rule of :func:`fusion_pair`, on op types (for callers that index the graph)."""
    if producer not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
        return None
    if len(consumers) == 1 and consumers[0] in ACTIVATIONS | {"Add", "BatchNormalization"}:
        return producer, consumers[0]
    return None


def fusion_hazard(model: onnx.ModelProto, name: str) -> str | None:
    pair = fusion_pair(model, name)
    if pair is None:
        return None
    return (f"tensor {name!r} sits between {pair[0]} and {pair[1]}: patching there breaks the runtime's "
            f"{pair[0]}+{pair[1]} fusion; the tensor after the {pair[1]} is usually a better target")


ACTIVATIONS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu",
               "PRelu", "Gelu", "Softplus", "Mish", "ThresholdedRelu"}


def _build(graph, gs, h, target: dirs.Target, idx: int, np_dtype, cast_to, dims):
    """Append the repair nodes reading ``h`` (whose shape is ``dims``, per-sample dims static for layout
    flat); return (output variable, node count)."""
    p = f"{PREFIX}/{idx}"
    nodes_before = len(graph.nodes)
    ctype = np.float64 if np_dtype == np.float64 else np.float32

    def var(name, dtype=None):
        return gs.Variable(f"{p}/{name}", dtype=dtype)

    def const(name, arr):
        return gs.Constant(f"{p}/{name}", values=np.ascontiguousarray(arr))

    def node(op, name, inputs, out_dtype=ctype, attrs=None):
        out = var(name, out_dtype)
        graph.nodes.append(gs.Node(op=op, name=f"{p}/{name}", inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    U = target.U.astype(np.float64)

    def flatten(v):  # (N, D) with D spelled out: a -1 cannot be inferred from an empty batch, and another
        # per-sample size fails here instead of being repaired wrongly
        return node("Reshape", "flatten", [v, const("flat_shape", np.array([0, U.shape[1]], dtype=np.int64))])

    def unflatten(v):
        return node("Reshape", "unflatten", [v, node("Shape", "orig_shape", [h], out_dtype=np.int64)])

    x = h
    if cast_to is not None:
        x = node("Cast", "cast_in", [x], attrs={"to": onnx.TensorProto.FLOAT})
    translate = target.repair == "translate"
    if translate and target.gate != "hard":  # the paper's operator on every input: one Sub of a constant
        beta = target.alpha.astype(np.float64) @ (target.shift.astype(np.float64)[:, None] * U)
        dynamic = target.layout == "flat" and not all(isinstance(v, int) for v in dims[1:])
        if dynamic:  # (N, D) and back, so that another per-sample size fails in Reshape instead of broadcasting
            x = flatten(x)
            beta = beta.reshape(1, -1)
        elif target.layout == "flat":  # in this tensor's own per-sample shape, which may differ from the one
            # fitted on (--tensor onto a flattened copy of the same values)
            beta = beta.reshape([1] + [int(v) for v in dims[1:]])
        y = node("Sub", "repaired", [x, const("alpha_beta", beta.astype(ctype))])
        if dynamic:
            y = unflatten(y)
        if cast_to is not None:
            y = node("Cast", "cast_out", [y], out_dtype=np_dtype, attrs={"to": cast_to})
        return y, len(graph.nodes) - nodes_before
    if target.layout == "flat":
        x = flatten(x)
    u_mu = U @ target.mu.astype(np.float64)
    w = target.alpha.astype(np.float64)[:, None] * U
    if translate:  # the correction is the shift itself where the gate fires
        w = (target.alpha.astype(np.float64) * target.shift.astype(np.float64))[:, None] * U
    two_d = target.layout in ("flat", "vector")
    if two_d:  # Gemm folds the offset into the score product: s = x U^T - U mu
        s = node("Gemm", "scores", [x, const("U", U.astype(ctype)), const("neg_U_mu", (-u_mu).astype(ctype))],
                 attrs={"transB": 1})
    else:  # (N, T, D): Gemm is 2-D only, MatMul broadcasts over tokens
        s = node("MatMul", "scores_raw", [x, const("U_T", U.T.astype(ctype))])
        s = node("Sub", "scores", [s, const("U_mu", u_mu.astype(ctype))])
    # The gate, and the guard that keeps non-finite activations no worse than the original: a NaN or
    # infinite entry of h makes its scores NaN/inf, and subtracting c (alpha U) would then spread NaN
    # over the whole sample. Greater is false for NaN, so Where(s > tau, s, 0) zeroes NaN and -inf
    # scores; Where(MAX > c, c, 0) zeroes +inf. Gate "none" uses tau = -MAX (every finite score).
    big = np.finfo(ctype).max
    tau = target.tau.astype(ctype) if target.gate == "hard" else np.full((1,), -big, dtype=ctype)
    zero = const("zero", np.zeros((1,), dtype=ctype))
    mask = node("Greater", "gate_mask", [s, const("tau", tau)], out_dtype=np.bool_)
    if translate:  # 1 where the gate fires and the score is finite, else 0
        finite = node("Greater", "finite_mask", [const("max", np.full((1,), big, dtype=ctype)), s], out_dtype=np.bool_)
        s = node("Where", "gated", [mask, const("one", np.ones((1,), dtype=ctype)), zero])
        s = node("Where", "finite", [finite, s, zero])
    else:
        s = node("Where", "gated", [mask, s, zero])
        finite = node("Greater", "finite_mask", [const("max", np.full((1,), big, dtype=ctype)), s],
                      out_dtype=np.bool_)
        s = node("Where", "finite", [finite, s, zero])
    if two_d:  # and the subtraction into the correction product: x' = x - c (alpha U)
        y = node("Gemm", "repaired", [s, const("alpha_U", w.astype(ctype)), x], attrs={"alpha": -1.0, "beta": 1.0})
    else:
        corr = node("MatMul", "correction", [s, const("alpha_U", w.astype(ctype))])
        y = node("Sub", "repaired", [x, corr])
    if target.layout == "flat":
        y = unflatten(y)
    if cast_to is not None:
        y = node("Cast", "cast_out", [y], out_dtype=np_dtype, attrs={"to": cast_to})
    return y, len(graph.nodes) - nodes_before


def _exported(gs, graph, model: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` exported with ``model``'s IR version, opsets and graph inputs."""
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    keep_source_inputs(out, model)
    return out


def _repair_prefixes(graph, recs: list[dict]) -> list[str]:
    """The node-name prefixes (``fire_onnx/<i>/``) of the repairs ``recs``: of the node that computes each output."""
    tensors = graph.tensors()
    out = []
    for rec in recs:
        y = tensors.get(rec.get("output", ""))
        idx = _repair_index(y.inputs[0].name) if y is not None and y.inputs else None
        if idx is None:
            raise FireError("cannot replace one repair of the model: its recorded output is not computed by a fire-onnx "
                            "node; patch the original (unpatched) model instead")
        out.append(f"{PREFIX}/{idx}/")
    return out


def _rebased(kept: list[dict], dropped: list[dict]) -> list[dict]:
    """The records of the repairs ``kept`` once ``dropped`` are removed: one that read a dropped repair's output reads
    what that repair read (and, back on the model's own activation, is no longer stacked)."""
    reads = {r["output"]: r["tensor"] for r in dropped}
    out = []
    for r in kept:
        r = dict(r)
        while r["tensor"] in reads:
            r["tensor"] = reads[r["tensor"]]
        if r.get("activation") and r["tensor"] == r["activation"]:
            del r["activation"]
        out.append(r)
    return out


def _check_preprocess(model: onnx.ModelProto, directions: dirs.Directions, force: bool, notes: list[str]) -> None:
    """--add / --replace: the new directions must be fitted with the preprocessing the model records (its repairs'):
    a model records one, and a repair fitted under another does not see the activations it was fitted on (new-user
    run 24: --add of a repair fitted with --mean 0 --std 1 onto one fitted with 0.5 / 0.5 rewrote the recorded
    preprocessing with exit 0, and the new repair left 97 % ASR)."""
    from fire_onnx.data import Preprocess
    from fire_onnx.evaluate import describe_preprocess, parse_recorded_preprocess

    raw = {p.key: p.value for p in model.metadata_props}.get(META_PREPROCESS)
    if not raw or not directions.preprocess:
        return
    try:
        old = parse_recorded_preprocess(raw)
    except (ValueError, FireError):
        return
    new = Preprocess.from_dict(directions.preprocess)
    if old.as_dict() == new.as_dict():
        return
    msg = (f"the new directions were fitted with other preprocessing ({describe_preprocess(new)}) than the model's "
           f"repair records ({describe_preprocess(old)})")
    if not force:
        raise FireError(f"{msg}: one of them reads the images wrongly; fit both with the model's preprocessing "
                        "(--scale/--mean/--std/--input-layout), or --force")
    notes.append(f"{msg} (--force): the model now records the new one")


def _unpatch(graph, gs, recorded: list[dict], only: list[str] | None = None) -> list[str]:
    """Remove an earlier fire-onnx patch (for --replace): rewire consumers back, restore names. ``only``: node-name
    prefixes of the repairs ``recorded`` (the ones removed; the model's other repairs stay).
    Returns the names of the tensors the earlier repair read, as they are in the restored graph."""
    tensors = graph.tensors()
    restored = []
    for rec in reversed(recorded):  # a repair added on top of another (--add) reads its output: remove it first
        h = tensors.get(rec.get("tensor", ""))
        y = tensors.get(rec.get("output", ""))
        if h is None or y is None:
            raise FireError("cannot replace the earlier patch: its recorded tensors are missing from the model")
        for n in list(y.outputs):
            for i, t in enumerate(n.inputs):
                if t is y:
                    n.inputs[i] = h
        if y in graph.outputs:
            public = y.name
            y.name = public + ".fire_onnx_old"
            h.name = public
            graph.outputs = [h if t is y else t for t in graph.outputs]
        if not rec.get("activation"):  # a stacked repair's own input is the repair below it, not an activation
            restored.append(h.name)
    graph.nodes = [n for n in graph.nodes if not (n.name.startswith(tuple(only)) if only is not None
                                                  else n.name.startswith(PREFIX + "/"))]
    graph.cleanup()
    return restored[::-1]


def patch_model(
    model: onnx.ModelProto,
    directions: dirs.Directions,
    *,
    tensor: str | None = None,
    replace: bool = False,
    add: bool = False,
    force: bool = False,
    directions_sha256: str = "",
) -> PatchResult:
    """Return a patched copy of ``model`` (the argument is not modified). ``replace``: swap the repair of a patched
    model for ``directions`` (refused, unless ``force``, when that drops the repair of another class); ``add``: keep
    it and add ``directions`` (a second backdoor; at a tensor already repaired, the new repair reads the repaired
    activation)."""
    import onnx_graphsurgeon as gs
    from fire_onnx import __version__

    notes: list[str] = []
    if tensor and len(directions.targets) != 1:
        raise FireError("--tensor needs a directions file with exactly one target")
    if replace and add:
        raise FireError("--replace swaps the model's repair for the new one, --add keeps it and adds the new one: give "
                        "one of them")
    already = has_repair_nodes(model)
    if is_patched(model) and not already:  # metadata copied onto an unrepaired model: patch it as one
        notes.append("the model carries fire-onnx metadata but no repair nodes (copied from a repaired model?): it is "
                     "patched as the unrepaired model it is, and the stale metadata is replaced")
        if replace:
            raise FireError("--replace swaps the repair of a model patched by fire-onnx, but this model has fire-onnx "
                            "metadata and no repair nodes: it is not repaired; patch it without --replace")
    if already and quantized_repair_nodes(model):
        # the quantizer names its nodes after the repair's (fire_onnx/0/scores_QuantizeLinear): removing the old
        # repair by name cut the graph apart and failed on an unrelated lookup (new-user run 16)
        raise FireError("the model's fire-onnx repair was quantized (quantization nodes among its fire_onnx/ nodes): it "
                        "cannot be removed safely; replace the repair in the float model, then quantize again with the "
                        "fire_onnx/ nodes excluded" if replace else
                        "model is already patched by fire-onnx, and its repair was quantized; patch the float model "
                        "(before quantization) instead")
    if already and not replace and not add:
        raise FireError("model is already patched by fire-onnx: --add keeps its repair and adds this one (another "
                        "backdoor), --replace swaps its repair for this one (a refit of the same backdoor: the repair "
                        "it drops is gone)")
    if (replace or add) and not already:
        opt = "--replace" if replace else "--add"
        raise FireError(f"{opt} {'swaps' if replace else 'adds to'} the repair of a model patched by fire-onnx, but this "
                        "model has no fire-onnx repair (no fire_onnx.targets metadata, no fire_onnx/ nodes); patch it "
                        f"without {opt}")
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise FireError(f"model opset {opset} is older than {MIN_OPSET}, the oldest fire-onnx patches")

    src = model  # only read (a copy only where an old patch is removed): big models are not held twice
    recorded, why = read_patched_targets(src) if already else ([], None)
    if already and not recorded:
        raise FireError(f"the model carries fire-onnx nodes but {why or 'no fire_onnx.targets metadata'}, so the old "
                        "repair cannot be " + ("kept safely" if add else "removed safely")
                        + "; patch the original (unpatched) model instead")
    new_class = dirs.repaired_class(directions.meta)
    old_classes = recorded_classes(model) if already else []
    if add and new_class is not None and new_class in old_classes:
        notes.append(f"the model's repair is already for class {new_class}: --add stacks a second repair for the same "
                     "class (to refine that repair instead: 'fit --update', then 'patch --replace', which swaps the "
                     f"class-{new_class} repair and keeps the others)")
    # --replace on a model repaired for several classes (--add) swaps the repairs of the new directions' class only
    # and keeps the others, as --add would add them (new-user run 24: updating one of two repairs had no way but
    # rebuilding from the original model)
    swap_one = (replace and new_class is not None and len(old_classes) > 1 and new_class in old_classes
                and all(is_int(r.get("target_class")) for r in recorded))
    if add or swap_one:  # the repairs kept were fitted with the preprocessing the model records
        _check_preprocess(model, directions, force, notes)
    if swap_one:
        drop = [r for r in recorded if r["target_class"] == new_class]
        g0 = gs.import_onnx(src)
        _unpatch(g0, gs, drop, only=_repair_prefixes(g0, drop))
        before = [r.get("activation") or r["tensor"] for r in drop]  # the model activations they repaired
        recorded = _rebased([r for r in recorded if r["target_class"] != new_class], drop)
        src = _exported(gs, g0, model)
        replace, add = False, True  # the rest is an --add onto the model without the dropped repairs
        notes.append(f"--replace swapped the class-{new_class} repair and kept the repair of class "
                     + ", ".join(str(c) for c in old_classes if c != new_class))
    elif replace:
        # --replace swaps, it does not add: new-user run 13 swapped a repair for class 0 for one for class 7, and the
        # class-0 backdoor came back to 99 % (a note said so); run 23's flagged fits recorded no target, and a repair
        # for class 3 replaced one for class 0 with nothing said (ASR 4.6 -> 98.3 %)
        dropped = [c for c in old_classes if c != new_class] if new_class is not None else []
        if dropped:
            what = ", ".join(str(c) for c in dropped)
            msg = (f"the repair replaced is for class {what}, the new one for class {new_class}: --replace drops the "
                   f"class-{what} repair, and that backdoor works again in the output")
            if not force:
                how = (f"To keep it and repair class {new_class} too: 'fire-onnx patch --add' (the repaired model and "
                       "the new directions)" if new_class not in old_classes else
                       "The model's repairs record no class each (patched before fire-onnx recorded it): patch the "
                       "original model with each repair again ('patch', then 'patch --add')")
                raise FireError(f"{msg}. {how}; to drop it anyway: --force")
            notes.append(f"{msg} (--force)")
        g0 = gs.import_onnx(src)
        before = _unpatch(g0, gs, recorded)
        src = _exported(gs, g0, model)
    unrepaired = src  # what fingerprints are checked on: the model without any repair
    if add:
        g1 = gs.import_onnx(src)
        _unpatch(g1, gs, recorded)
        unrepaired = _exported(gs, g1, model)
    inferred = infer_shapes(src, weights=False)  # names, shapes and types only

    plan = []
    later = None  # tensors with the batch on a later axis, found once when a target's first axis is not the batch
    below = {r["tensor"]: r for r in recorded} if add else {}  # --add: the repairs already at each tensor
    outputs = {r["output"] for r in recorded} if add else set()
    for t in directions.targets:
        name = resolve_target(inferred, t, tensor)
        if name in outputs:  # a repaired graph output keeps its public name on the repaired tensor
            raise FireError(f"tensor {name!r} is a graph output the model's repair already acts on: --add cannot "
                            "stack another repair there; patch the original model, then --add the other repair")
        elem, dims = tensor_info(inferred, name)
        if elem is not None and elem not in FLOAT_TYPES:
            raise FireError(f"tensor {name!r} has element type {onnx.TensorProto.DataType.Name(elem)}; fire-onnx repairs float tensors only")
        if dims and dims[0] != batch_symbol(src):
            if later is None:
                from fire_onnx.inspect import batch_axes

                later = batch_axes(src, tensor_table(inferred))[1]
            if name in later:
                # a file fitted there before fit refused such tensors has no fingerprint or a wrong one; patched, its
                # Reshape to (N, D) took the T token positions as N (new-user run 18: written with exit 0)
                raise FireError(f"cannot patch the directions: {batch_later_message(name, later[name], dims)}")
        dims = check_layout(t, name, dims, inferred, notes)
        if any(p[1] == name for p in plan):
            raise FireError(f"two targets resolve to the same tensor {name!r}")
        warn = fusion_hazard(inferred, name)
        if warn:
            notes.append(warn)
        plan.append((t, name, elem, dims))
    if (replace or swap_one) and not tensor and sorted(p[1] for p in plan) != sorted(before):
        raise FireError(f"the new directions repair {', '.join(sorted(p[1] for p in plan))} but the model's fire-onnx "
                        f"repair is at {', '.join(sorted(before))}: --replace swaps a repair at the same tensors; to "
                        "repair other tensors, patch the original (unpatched) model")

    # Build on the source graph, not the shape-inferred one: persisting inferred value_info changes
    # which optimizations onnxruntime applies (measured: a ViT ran 12 % slower at batch 64 with
    # nothing but inferred shapes added). Shapes and dtypes come from ``inferred`` above.
    graph = gs.import_onnx(src)
    tensors = graph.tensors()
    patched: list[PatchedTarget] = []
    first = next_repair_index(src) if add else 0
    for idx, (t, name, elem, dims) in enumerate(plan, start=first):
        activation = ""
        if name in below:  # --add at a repaired tensor: read the topmost repair's output
            top = below[name]
            while top["output"] in below:
                top = below[top["output"]]
            name, activation = top["output"], top.get("activation") or name
        h = tensors[name]
        if h.dtype is None and elem is not None:
            h.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        np_dtype = np.dtype(h.dtype) if h.dtype is not None else np.dtype(np.float32)
        cast_to = None
        if np_dtype not in (np.float32, np.float64):
            cast_to = elem if elem is not None else onnx.TensorProto.FLOAT16
            notes.append(f"tensor {name!r} is {FLOAT_TYPES.get(elem, np_dtype)}: the repair runs in float32 between Casts")
        consumers = list(h.outputs)  # snapshot before the patch adds its own readers of h
        y, count = _build(graph, gs, h, t, idx, np_dtype, cast_to, dims)
        y.dtype = h.dtype
        y.shape = h.shape
        if h in graph.outputs:  # keep the public output name on the repaired tensor
            public = h.name
            h.name = f"{public}{OUTPUT_INPUT_SUFFIX}"
            y.name = public
            graph.outputs = [y if o is h else o for o in graph.outputs]
        for n in consumers:
            for i, inp in enumerate(n.inputs):
                if inp is h:
                    n.inputs[i] = y
        patched.append(PatchedTarget(tensor=h.name, output=y.name, module=t.module, layout=t.layout,
                                     gate=t.gate, k=t.k, shape=[d if d is not None else "?" for d in dims],
                                     nodes=count, repair=t.repair, target_class=new_class, activation=activation,
                                     directions_sha256=directions_sha256))
    graph.cleanup().toposort()
    try:
        graph.tensors(check_duplicates=True)
    except Exception as e:
        raise FireError(f"patching would create duplicate tensor names ({e})") from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = gs.export_onnx(graph, do_type_check=False)
    # onnx-graphsurgeon writes a fresh ModelProto: keep what it drops from the source model
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    keep_source_inputs(out, model)  # IR < 4: every initializer is also a graph input
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.domain, out.model_version, out.doc_string = model.domain, model.model_version, model.doc_string
    # drop stale value_info for the renamed tensors: shapes stay inferable from the nodes
    keep = {p.key: p.value for p in model.metadata_props if not p.key.startswith("fire_onnx.")}
    keep.update({
        META_VERSION: __version__,
        META_SHA: directions_sha256,
        META_TARGETS: json.dumps((list(recorded) if add else []) + [p.as_dict() for p in patched]),
    })
    if directions.preprocess:
        keep[META_PREPROCESS] = json.dumps(directions.preprocess, sort_keys=True)
    classes = list(dict.fromkeys(old_classes + [new_class])) if add else [new_class]
    classes = [c for c in classes if c is not None]
    if len(classes) > 1:  # several backdoors repaired (--add): eval compares --target with each
        keep[META_ATTACK] = json.dumps({"target": None, "targets": classes, "trigger": None}, sort_keys=True)
    elif classes or directions.meta.get("trigger") is not None:
        keep[META_ATTACK] = json.dumps({"target": classes[0] if classes else None,
                                        "trigger": directions.meta.get("trigger")}, sort_keys=True)
    del out.metadata_props[:]
    for k, v in keep.items():
        out.metadata_props.add(key=k, value=v)
    checked = approx_size(out) < external_data_threshold()  # else serializing for the checker fails
    if checked:
        _check(lambda: onnx.checker.check_model(out, full_check=False),
               lambda: onnx.checker.check_model(model, full_check=False), notes)
    return PatchResult(model=out, targets=patched, warnings=notes, source=unrepaired,
                       source_tensors=[name for _, name, _, _ in plan], checked=checked)


def _check(check_patched, check_source, notes: list[str]) -> None:
    """onnx.checker on the patched model: a failure is a fire-onnx bug unless the source fails too."""
    try:
        check_patched()
    except onnx.checker.ValidationError as e:
        try:
            check_source()
        except onnx.checker.ValidationError:
            notes.append("the input model itself fails onnx.checker; the patched model does too")
        else:
            raise RuntimeError(f"internal error: the patched model fails onnx.checker: {e}") from e


def replace_repair(patched: onnx.ModelProto, directions: dirs.Directions, *, directions_sha256: str = "") -> PatchResult:
    """Swap the fire-onnx repair of ``patched`` for ``directions`` (same tensors); the result equals
    patching the original model with ``directions``. Refuses a model without a fire-onnx repair."""
    return patch_model(patched, directions, replace=True, directions_sha256=directions_sha256)


def check_model_fingerprint(result: PatchResult, directions: dirs.Directions, *, force: bool = False) -> None:
    """Refuse (FireError) directions fitted on another model: the probe activations recorded by ``fit``
    must match this model's activations at the tensors the targets resolved to. With ``force`` a
    mismatch becomes a warning; files without a fingerprint get a warning."""
    from fire_onnx.probe import check_fingerprints

    bad, notes = check_fingerprints(result.source, directions, result.source_tensors)
    result.warnings.extend(notes)
    if bad and not force:
        raise FireError(f"{bad[0]}: these directions were fitted on another model (or another tensor, or with other "
                        "preprocessing), so the repair would not remove the backdoor; fit them on this model, or pass "
                        "--force to patch anyway")
    result.warnings.extend(f"{b}: the directions were probably fitted on another model, so the repair may not remove "
                           "the backdoor (patched anyway: --force)" for b in bad)


def _batch_later_target(model: onnx.ModelProto, directions_path) -> str | None:
    """Why a directions file's fingerprint has more rows than probe images, when it is because its target holds the
    batch on a later axis: fit before it refused such tensors recorded one fingerprint row per token position (17
    rows for 3 probes, new-user run 18), which ``directions.load`` can only call a damaged file. None otherwise."""
    from fire_onnx.fileio import load_npz
    from fire_onnx.inspect import batch_axes

    try:
        header = json.loads(str(load_npz(directions_path, "directions file")["header"][()]))
        names = [t.get("tensor") for t in header.get("targets", []) if isinstance(t, dict)]
        inferred = infer_shapes(model, weights=False)
        modules = [t.get("module") for t in header.get("targets", []) if isinstance(t, dict) and not t.get("tensor")]
        for module in modules:
            try:
                names.append(resolve_tensor(inferred, module=module))
            except FireError:
                pass
        table = tensor_table(inferred)
        later = batch_axes(model, table)[1]
    except Exception:  # noqa: BLE001 - only a better message is at stake: keep the original one
        return None
    for name in names:
        if isinstance(name, str) and name in later:
            dims = table[name][1]
            return (f"{directions_path}: it was fitted at tensor {name!r} before fit refused such tensors, so it holds a "
                    f"wrong repair (token positions taken as samples), not a damaged one; "
                    f"{batch_later_message(name, later[name], dims)}")
    return None


def default_output(model_path: str | os.PathLike) -> Path:
    """``m.onnx`` -> ``m.fire.onnx``; an already patched ``m.fire.onnx`` (``--replace``) -> ``m.fire.r1.onnx``,
    ``m.fire.r1.onnx`` -> ``m.fire.r2.onnx``, or the next free ``rN`` when that exists (never the input itself,
    never ``m.fire.fire.onnx``, never an earlier round's result)."""
    import re

    p = Path(model_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    m = re.fullmatch(r"(.*\.fire)(?:\.r(\d+))?", stem)
    if not m:
        return p.with_name(stem + ".fire.onnx")
    n = int(m.group(2) or 0) + 1
    # the next free name: replacing the repair of m.fire.onnx each round wrote m.fire.r1.onnx over the last
    # round's result (new-user run 19)
    while p.with_name(f"{m.group(1)}.r{n}.onnx").exists():
        n += 1
    return p.with_name(f"{m.group(1)}.r{n}.onnx")


def verify_in_onnxruntime(path: str | os.PathLike, original: str | os.PathLike) -> str | None:
    """Load the patched model in onnxruntime (CPU) if it is installed; returns a note when skipped.

    A patched model that onnxruntime rejects while it accepts the original is a fire-onnx bug and
    raises RuntimeError; when it rejects the original too (custom ops, say) the check is skipped.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed: the patched model was checked with onnx.checker only"
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        return None
    except Exception as patched_error:
        try:
            ort.InferenceSession(str(original), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception:
            return "onnxruntime cannot load the input model either; skipped the onnxruntime check"
        raise RuntimeError(
            f"fire-onnx produced a model onnxruntime rejects although it accepts the input (please report): "
            f"{first_line(patched_error)}"
        ) from patched_error


def patch_file(
    model_path: str | os.PathLike,
    directions_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    tensor: str | None = None,
    replace: bool = False,
    add: bool = False,
    verify: bool = True,
    force: bool = False,
) -> tuple[Path, PatchResult]:
    """Patch ``model_path`` with ``directions_path`` and write the result atomically to ``output``
    (default ``<model>.fire.onnx``). An existing output is replaced; the input never is. With
    ``verify``, the written model must load in onnxruntime before it replaces ``output``. Directions
    whose recorded fingerprint does not match the model are refused unless ``force``."""
    out_path = Path(output) if output else default_output(model_path)
    check_outputs([out_path], [model_path, directions_path], special_ok=False)
    model = load_model(model_path)
    try:
        d = dirs.load(directions_path)
    except FireError as e:
        if "model fingerprint has" in str(e) and (hint := _batch_later_target(model, directions_path)):
            raise FireError(hint) from None
        raise
    result = patch_model(model, d, tensor=tensor, replace=replace, add=add, force=force,
                         directions_sha256=sha256_file(directions_path))
    check_model_fingerprint(result, d, force=force)
    with atomic_model_path(out_path) as tmp:  # the model and its .data file (past ~1.9 GB), or neither
        write_model(result.model, tmp, out_path.name + ".data")
        if not result.checked:  # too large to check in memory: check the file (external data by path)
            _check(lambda: check_written_model(tmp), lambda: check_written_model(model_path), result.warnings)
        if verify:
            note = verify_in_onnxruntime(tmp, model_path)
            if note:
                result.warnings.append(note)
    return out_path, result
