"""``fit --unlabeled TRAFFIC``: find the triggered inputs in unlabeled traffic and hand them to the
flagged-input path as if they had been given with ``--triggered`` (see :mod:`fire_onnx.traffic`).

This module reads the model (the representation and the class scores, from the ONNX model in
onnxruntime or from the PyTorch model through a forward pre-hook) and wires the result into the fit
request; the detection itself is numpy in :mod:`fire_onnx.traffic`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fire_onnx import preprocess_check
from fire_onnx import traffic as tr
from fire_onnx.data import Images, load_images, pool_order
from fire_onnx.errors import FireError


def representation_tensor(onnx_model) -> str:
    """The input of the model's final classifier layer (the last Conv/Gemm/MatMul before the first
    output): the late representation the traffic is scored on."""
    from fire_onnx.fit.auto import HEAD_OPS, head_tensors

    graph = onnx_model.graph
    producer = {o: n for n in graph.node for o in n.output}
    weights = {t.name for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    for name in head_tensors(graph):
        node = producer.get(name)
        if node is not None and node.op_type in HEAD_OPS:
            data = [i for i in node.input if i and i not in weights]
            if data and data[0] not in inputs:
                return data[0]
    raise FireError("--unlabeled scores the traffic at the input of the model's final classifier layer, and this "
                    "ONNX model has none (no Conv/Gemm/MatMul before its first output that reads an inner tensor)")


def _onnx_represent(onnx_model, batch_size: int):
    from fire_onnx.probe import TensorReader

    tensor = representation_tensor(onnx_model)
    reader = TensorReader(onnx_model, [tensor], with_logits=True, batch_size=batch_size)

    def represent(x):
        acts, logits = reader(x)
        return acts[tensor].reshape(len(x), -1), logits

    return represent, tensor


def _torch_represent(model, batch_size: int):
    """The input of the model's last ``nn.Linear`` (in module order), read with a forward pre-hook."""
    import torch

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise FireError("--unlabeled scores the traffic at the input of the model's final classifier layer and "
                        "this PyTorch model has no nn.Linear: give --onnx MODEL.onnx as well")
    name, layer = linears[-1]

    def represent(x):
        store, outs = [], []
        hook = layer.register_forward_pre_hook(lambda _m, inp: store.append(inp[0].detach().float().cpu().numpy()))
        try:
            with torch.no_grad():
                for i in range(0, len(x), batch_size):
                    y = model(torch.from_numpy(x[i:i + batch_size]))
                    y = y[0] if isinstance(y, (tuple, list)) else y
                    outs.append(y.detach().float().cpu().numpy())
        finally:
            hook.remove()
        reps = np.concatenate([s.reshape(len(s), -1) for s in store])
        if len(reps) != len(x):
            raise FireError(f"module {name!r} (the last nn.Linear) does not run once per batch: give --onnx MODEL.onnx "
                            "so the traffic is scored on the ONNX model")
        return reps, np.concatenate(outs)

    return represent, f"input of module {name}"


def attach(req, inputs, log=None) -> None:
    """Find the triggered inputs of ``req.unlabeled_path`` and make them ``inputs.triggered`` (no clean
    twins, no labels); records the evidence in ``inputs.meta["unlabeled"]``. Raises
    :class:`fire_onnx.traffic.NothingFound` when no class is confirmed, and :class:`fire_onnx.traffic.SeveralFound`
    (a FireError: exit 1) when several classes are confirmed strongly, several backdoors (unless ``req.force``)."""
    traffic = load_images(req.unlabeled_path, req.split).x  # any labels in the file are not used
    pre = inputs.preprocess
    if inputs.onnx_model is not None:
        rep, tensor = _onnx_represent(inputs.onnx_model, req.batch_size)
    else:
        rep, tensor = _torch_represent(inputs.model, req.batch_size)

    def represent(x):
        return rep(pre(x))

    def predict(x):
        return represent(x)[1].argmax(axis=1)

    pool = inputs.pool
    clean_idx, rest_idx, _ = pool_order(pool, n_clean=req.n_clean, seed=req.seed)
    clean, rest = pool.subset(clean_idx), pool.subset(rest_idx)
    if len(rest) == 0:
        rest = clean
    reference = pool.subset(np.concatenate([clean_idx, rest_idx])[:tr.N_REFERENCE])
    result = tr.find_triggered(traffic, represent, predict, clean.x, reference.x, rest.x, clean_y=clean.y,
                               held_y=rest.y, target=req.target, tensor=tensor, log=log, reference_y=reference.y)
    name = Path(req.unlabeled_path).name
    if not result.found:
        if result.several and not req.force:  # several backdoors: not "nothing to repair" (exit 0)
            raise tr.SeveralFound(result, name)
        if not req.force:
            if warning := preprocess_check.warning_of(inputs.meta):  # "nothing found" under a doubtful preprocessing
                result.warnings.insert(0, warning)
            # a strongly outlying group no trigger model confirms is said, not dropped (new-user run 25: a moving
            # sticker's 45 inputs, all triggered, read "nothing to repair"); fit's NothingFound handling prints it
            if warning := tr.unconfirmed_warning(result, name):
                result.warnings.append(warning)
                result.unconfirmed_warning = warning
            raise tr.NothingFound(result)
        tr.force_pick(result)
    if warning := tr.unconfirmed_warning(result, name):  # a group beside the one fitted on is not repaired
        result.warnings.append(warning)
        result.unconfirmed_warning = warning
    found = result.indices
    inputs.triggered = Images(traffic[found])
    inputs.triggered_clean = None
    inputs.meta["unlabeled"] = result.record()
    inputs.meta["unlabeled_file"] = name
    if req.target is None:
        req.target = result.target
        inputs.meta["target"] = result.target
    # every input found is fitted on (--n-triggered caps images the user picked, not what detection found)
    req.n_triggered = max(len(found), 1)
    req.notes.extend(result.notes)
    inputs.meta["unlabeled_warnings"] = list(result.warnings)  # fit's warnings (core.fit_target) carry them
    req.notes.append(f"--unlabeled: fitting on the {len(found)} inputs found in {name} "
                     f"(target class {result.target})")
