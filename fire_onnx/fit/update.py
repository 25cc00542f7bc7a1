"""``fit --update``: refine an existing repair with newly flagged inputs, without the earlier ones.

The directions file keeps, per target, the sufficient statistics of the estimate
(:mod:`fire_onnx.streaming`); an update reads the new triggered images' activations, merges them in, and
re-estimates as a fit on all triggered inputs seen so far would. What the earlier fit decided (layers and
their tensors, method, k, gate rule, quantile, alpha, layout, repair operator, preprocessing) comes from
the file; the model (``--model``/``--onnx``) and the clean images (``--clean``) are given again.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fire_onnx import directions as dirs
from fire_onnx.errors import FireError


def load_for_update(path: str) -> dirs.Directions:
    """Load a directions file that ``--update`` can refine (every target has its statistics)."""
    d = dirs.load(path)
    for t in d.targets:
        if not t.stats:
            raise FireError(f"{path} has no update statistics for {t.label} (written by an older fire-onnx or by "
                            "hand): --update needs a file written by this fire-onnx's fit; fit again on all the "
                            "triggered inputs you have, then update that file")
    return d


def apply_previous(req, previous: dirs.Directions) -> None:
    """Take over into ``req`` (a FitRequest) what the earlier fit decided; notes what was overridden."""
    t0 = previous.targets[0]
    methods = {t.fit.get("method", "mean-diff") for t in previous.targets}
    if len(methods) != 1:
        raise FireError("the directions file mixes estimation methods across targets; update each target apart")
    given = [layer for layer in req.layers]
    req.layers = [t.module or t.tensor for t in previous.targets]
    if given and sorted(given) != sorted(req.layers):
        raise FireError(f"--layer {', '.join(given)} differs from the targets of the directions file being updated "
                        f"({', '.join(req.layers)}); leave --layer out with --update")
    req.tensors = {t.module: t.tensor for t in previous.targets if t.module and t.tensor}
    req.method = methods.pop()
    req.k = t0.k
    req.gate = str(t0.fit.get("gate_requested", t0.gate))
    req.quantile = float(t0.fit.get("gate_quantile", req.quantile))
    req.alpha = float(t0.alpha[0])
    req.layout = t0.layout
    req.repair = t0.repair
    pre = previous.preprocess or {}
    if pre:
        differ = [f"{flag} {_show(given)} (recorded: {_show(pre.get(key))})"
                  for flag, key, given in (("--scale", "scale", req.scale), ("--mean", "mean", req.mean),
                                           ("--std", "std", req.std), ("--input-layout", "layout", req.input_layout))
                  if given is not None and pre.get(key) is not None and not _same(given, pre[key])]
        if differ:  # merged with statistics of activations under the recorded preprocessing, they would mix two inputs
            raise FireError(f"{'; '.join(differ)}: the repair in {Path(req.update_path).name} was fitted with its "
                            "recorded preprocessing, and its statistics can only be merged with activations of the "
                            "same inputs; leave the preprocessing options out with --update (or fit from scratch)")
        req.scale = req.scale if req.scale is not None else pre.get("scale")
        req.mean = req.mean or pre.get("mean")
        req.std = req.std or pre.get("std")
        req.input_layout = req.input_layout or pre.get("layout")
    recorded = previous.meta.get("target")
    rc = previous.meta.get("reconstruction") or {}
    how = "the target class"
    if recorded is None and rc.get("confirmed") and rc.get("majority_class") is not None:
        # a flagged fit without --target: the new batch's trigger reconstruction must reach the class the
        # earlier one confirmed, not whatever a small batch's majority happens to be
        recorded, how = int(rc["majority_class"]), "the class the trigger reconstruction confirmed"
    if req.target is not None and recorded is not None and int(req.target) != int(recorded):
        raise FireError(f"--target {req.target} differs from {how} ({recorded}) of the repair in "
                        f"{Path(req.update_path).name}; leave --target out with --update (a repair of another "
                        "target is a new fit)")
    if req.target is None and recorded is not None:
        req.target = int(recorded)
        if previous.meta.get("target") is None:
            req.notes.append(f"target class {req.target}: the class the trigger reconstruction of "
                             f"{Path(req.update_path).name} confirmed")


def _same(given, recorded) -> bool:
    if isinstance(given, str) or isinstance(recorded, str):
        return str(given) == str(recorded)
    try:
        a, b = np.broadcast_arrays(np.asarray(given, dtype=np.float64), np.asarray(recorded, dtype=np.float64))
    except ValueError:
        return False
    return bool(np.allclose(a, b, rtol=1e-6, atol=1e-9))


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(f"{x:g}" for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def chain_of(d: dirs.Directions) -> list[str]:
    """The targets of a chained repair (``--layer auto --max-layers N``: each fitted on activations with the
    earlier ones' repairs applied), in order; [] for independent targets."""
    chain = d.meta.get("chain") or (d.meta.get("auto") or {}).get("chain") or []
    return list(chain) if len(chain) > 1 and len(d.targets) > 1 else []


def update_targets(req, inputs, clean, triggered, source, progress=None) -> dirs.Directions:
    """Refit every target of the file being updated with its own recorded settings (layout, gate, quantile,
    alpha, k, operator), merging the new samples into its statistics. A chain's later targets read their
    activations with the earlier (updated) repairs applied, as the chain was fitted: measured without them,
    a 2-layer Fashion-MNIST chain's second target took the first one's unrepaired statistics, its gate fired
    on 47 % of clean images and the update raised ASR from 3.3 % to 5.3 %."""
    from dataclasses import replace

    from fire_onnx.fit.pipeline import fit_inputs

    previous = inputs.previous
    chained = bool(chain_of(previous))
    if chained:
        if inputs.onnx_model is None:
            raise FireError("this directions file is a chain of repairs (--layer auto --max-layers): updating it "
                            "applies the earlier repairs in onnxruntime, so give --onnx as well")
        _check_fingerprints(previous, inputs)
    d, targets, warnings = None, [], []
    for i, old in enumerate(previous.targets):
        step_inputs = inputs
        if chained and i:
            from fire_onnx.fit.auto import chained_inputs

            # the earlier targets' fingerprints are of the original model: checked above, not on the chain
            step_inputs = replace(chained_inputs(inputs, targets), previous=replace(previous, probe=None))
        label = old.module or old.tensor
        step_req = replace(req, layers=[label], layout=old.layout, repair=old.repair, k=old.k,
                           gate=str(old.fit.get("gate_requested", old.gate)),
                           quantile=float(old.fit.get("gate_quantile", req.quantile)), alpha=float(old.alpha[0]),
                           reconstruct=req.reconstruct if not (chained and i) else "off", notes=req.notes)
        step_inputs = replace(step_inputs, k=old.k)
        tensors = {label: old.tensor} if old.tensor else {}
        di = fit_inputs(step_req, step_inputs, [label], clean, triggered, source, progress=progress, tensors=tensors)
        t = di.targets[0]
        if chained and i:  # patch checks fingerprints on the unpatched model: keep the recorded one
            t.fingerprint = old.fingerprint
        targets.append(t)
        warnings += [w for w in di.meta.get("checks", {}).get("warnings", []) if w not in warnings]
        d = d or di
    d.targets = targets
    d.meta.setdefault("checks", {})["warnings"] = warnings
    if chained:
        d.meta["chain"] = chain_of(previous)
    return d


def _check_fingerprints(previous: dirs.Directions, inputs) -> None:
    """Every target's fingerprint against the original ONNX model (a chain's later targets are then read on
    the patched model, where the recorded fingerprints do not apply)."""
    from fire_onnx.probe import check_fingerprints

    bad, _ = check_fingerprints(inputs.onnx_model, previous, [t.tensor for t in previous.targets])
    if bad:
        raise FireError(f"{bad[0]}: --update needs the same model (and layer) as the earlier fit")


def stamp_update(d: dirs.Directions, previous: dirs.Directions, update_path: str) -> None:
    """Record in ``d.meta`` which file it refines (and keep the earlier attack description)."""
    history = list(previous.meta.get("update_history") or [])
    history.append(Path(update_path).name)
    d.meta["update_history"] = history
    for key in ("trigger", "triggered_file"):
        if d.meta.get(key) is None and previous.meta.get(key) is not None:
            d.meta[key] = previous.meta[key]


def default_update_output(update_path: str) -> Path:
    """``directions.npz`` -> ``directions.u1.npz``; ``directions.u1.npz`` -> ``directions.u2.npz`` (the
    update never overwrites the file it refines)."""
    p = Path(update_path)
    stem = p.name[:-4] if p.name.endswith(".npz") else p.name
    m = re.fullmatch(r"(.*)\.u(\d+)", stem)
    base, n = (m.group(1), int(m.group(2)) + 1) if m else (stem, 1)
    return p.with_name(f"{base}.u{n}.npz")
