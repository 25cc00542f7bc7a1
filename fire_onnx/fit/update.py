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
        req.scale = req.scale if req.scale is not None else pre.get("scale")
        req.mean = req.mean or pre.get("mean")
        req.std = req.std or pre.get("std")
        req.input_layout = req.input_layout or pre.get("layout")
    if req.target is None:
        req.target = previous.meta.get("target")
    rc = previous.meta.get("reconstruction") or {}
    if req.target is None and rc.get("confirmed") and rc.get("majority_class") is not None:
        # the new batch's trigger reconstruction must reach the class the earlier one confirmed, not
        # whatever a small batch's majority happens to be
        req.target = int(rc["majority_class"])
        req.notes.append(f"target class {req.target}: the class the trigger reconstruction of "
                         f"{Path(req.update_path).name} confirmed")


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
