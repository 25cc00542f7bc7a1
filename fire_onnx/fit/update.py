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


def _first_update(update_path: str) -> tuple[Path, str, int]:
    """(path, base name, n) of the first default update name of ``update_path``: ``base.u{n}.npz``."""
    p = Path(update_path)
    stem = p.name[:-4] if p.name.endswith(".npz") else p.name
    m = re.fullmatch(r"(.*)\.u(\d+)", stem)
    base, n = (m.group(1), int(m.group(2)) + 1) if m else (stem, 1)
    return p, base, n


def earlier_updates(update_path: str) -> list[Path]:
    """Updates of ``update_path`` already written under the default names (``.u1`` ... up to the first free one):
    a script that runs ``fit --update directions.npz`` every round starts from the same file each time, and
    merges only its newest batch (new-user run 19)."""
    p, base, n = _first_update(update_path)
    out = []
    while p.with_name(f"{base}.u{n}.npz").exists():
        out.append(p.with_name(f"{base}.u{n}.npz"))
        n += 1
    return out


def default_update_output(update_path: str) -> Path:
    """``directions.npz`` -> ``directions.u1.npz``; ``directions.u1.npz`` -> ``directions.u2.npz``, or the next
    free ``uN`` when that exists (the update never overwrites the file it refines, nor an earlier update: updating
    directions.npz each round wrote directions.u1.npz over the last round's update, new-user run 19)."""
    p, base, n = _first_update(update_path)
    return p.with_name(f"{base}.u{n + len(earlier_updates(update_path))}.npz")


# Flagged images without twins are fitted through a trigger reconstruction, which needs the images themselves:
# statistics merged per batch made an update depend on how the images arrived (new-user run 19: 20 one-image
# batches left 18.4 % ASR where one fit on the same 20 images left 0.3 %, and the same image sent six times took
# a 0.3 % repair to 73.5 %). So such a fit keeps its flagged images in the directions file (target 0's
# ``stats.flagged_x``, which readers without this code ignore), and an update refits on all of them plus the
# new ones: the result is the fit on every distinct flagged image seen so far.
STORE_MAX_IMAGES = 256  # flagged images a directions file keeps at most ...
STORE_MAX_BYTES = 8 << 20  # ... and at most this many bytes of them (a uniform sample of the images beyond)


def flagged_mode(req, inputs) -> bool:
    """Whether this fit reconstructs the trigger from flagged images (no trigger, no twins)."""
    return (inputs.trigger is None and inputs.triggered is not None and inputs.triggered_clean is None
            and req.reconstruct == "auto")


def digests(x: np.ndarray) -> list[str]:
    """A short content hash per image (repeats across updates are recognised by it)."""
    import hashlib

    x = np.ascontiguousarray(x)
    return [hashlib.sha1(x[i].tobytes() + str(x[i].shape).encode()).hexdigest()[:16] for i in range(len(x))]


def stored_flagged(previous: dirs.Directions):
    """The flagged images a directions file keeps (``Images``), or None."""
    from fire_onnx.data import Images

    st = previous.targets[0].stats
    x = st.get("flagged_x")
    if x is None:
        return None
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) == 0:
        raise FireError("the directions file's stored flagged images (stats.flagged_x) are not uint8 (N, H, W, C) "
                        "images: a damaged file; fit again on the flagged images you have")
    y = st.get("flagged_y")
    if y is not None:
        y = np.asarray(y)
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise FireError("the directions file's stored flagged labels (stats.flagged_y) do not match its images")
        y = y.astype(np.int64)
    return Images(x, y)


def merge_flagged(req, inputs) -> None:
    """``--update`` of a file that keeps its flagged images, with new flagged images: ``inputs.triggered``
    becomes the stored images and the new ones not seen before, fitted all together (``inputs.refit_all``)."""
    from fire_onnx.data import Images

    previous = inputs.previous
    stored = stored_flagged(previous)
    if stored is None:
        if flagged_mode(req, inputs):
            req.notes.append(f"{Path(req.update_path).name} keeps no flagged images (written by an older fire-onnx, or "
                             "fitted on a trigger or twins): the new images' trigger is reconstructed from them alone "
                             "and merged into its statistics")
        return
    if not flagged_mode(req, inputs):
        return
    if stored.x.shape[1:] != inputs.triggered.x.shape[1:]:
        raise FireError(f"the new flagged images are {list(inputs.triggered.x.shape[1:])} but the ones "
                        f"{Path(req.update_path).name} was fitted on are {list(stored.x.shape[1:])} (H, W, C)")
    seen = list(previous.meta.get("flagged_seen") or digests(stored.x))
    known = set(seen)
    new_keys = digests(inputs.triggered.x)
    keep = [i for i, k in enumerate(new_keys) if k not in known]
    name = Path(req.triggered_path).name
    if not keep:
        raise FireError(f"every image of {name} was already merged into {Path(req.update_path).name} (an earlier "
                        "update or its fit): sent again, the same images would only weigh more; nothing to update")
    if len(keep) < len(new_keys):
        req.notes.append(f"{name}: {len(new_keys) - len(keep)} of its {len(new_keys)} images were already merged "
                         f"into {Path(req.update_path).name} and are left out ({len(keep)} new)")
    new = inputs.triggered.subset(np.asarray(keep))
    y = None if stored.y is None or new.y is None else np.concatenate([stored.y, new.y])
    inputs.new_flagged = new
    inputs.triggered = Images(np.concatenate([stored.x, new.x]), y, new.classes)
    inputs.flagged_seen = seen + [new_keys[i] for i in keep]
    inputs.refit_all = True
    req.n_triggered = len(inputs.triggered)
    req.notes.append(f"refitted on the {len(stored)} flagged images {Path(req.update_path).name} keeps and the "
                     f"{len(new)} new ones ({len(inputs.triggered)} in all), as one fit on all of them would be")


def store_flagged(d: dirs.Directions, req, inputs) -> None:
    """Keep the flagged images of a reconstruction fit in ``d`` (see STORE_MAX_*), and the hashes of every
    flagged image merged so far in ``d.meta["flagged_seen"]``."""
    if not flagged_mode(req, inputs):
        for t in d.targets:  # a paired update of a file that kept flagged images: they no longer describe it
            t.stats.pop("flagged_x", None)
            t.stats.pop("flagged_y", None)
        d.meta.pop("flagged_seen", None)
        return
    imgs = inputs.triggered
    seen = inputs.flagged_seen or digests(imgs.x)
    per = max(int(imgs.x[0].nbytes), 1)
    cap = max(1, min(STORE_MAX_IMAGES, STORE_MAX_BYTES // per))
    idx = np.arange(len(imgs))
    if len(idx) > cap:  # deterministic, like the statistics' row sample
        idx = np.sort(np.random.default_rng(len(seen)).choice(len(idx), cap, replace=False))
        d.meta.setdefault("checks", {}).setdefault("warnings", []).append(
            f"the directions file keeps {cap} of the {len(imgs)} flagged images (at most {STORE_MAX_IMAGES}, "
            f"{STORE_MAX_BYTES >> 20} MiB): a later --update refits on those and the new ones")
    t0 = d.targets[0]
    t0.stats["flagged_x"] = np.ascontiguousarray(imgs.x[idx], dtype=np.uint8)
    if imgs.y is not None:
        t0.stats["flagged_y"] = np.asarray(imgs.y[idx], dtype=np.int64)
    else:
        t0.stats.pop("flagged_y", None)
    d.meta["flagged_seen"] = list(seen)


def new_reach(inputs, target: int) -> float | None:
    """The share of the new flagged images (``inputs.new_flagged``) the model classifies as ``target``."""
    if inputs.new_flagged is None or target is None:
        return None
    from fire_onnx.fit.core import OnnxSource, TorchSource

    src = TorchSource(inputs.model, []) if inputs.model is not None else OnnxSource(inputs.onnx_model, [])
    logits = src.run(inputs.preprocess(inputs.new_flagged.x))[1]
    if logits is None:
        return None
    return float((logits.argmax(axis=1) == int(target)).mean())
