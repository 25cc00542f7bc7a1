"""The directions file (``directions.npz``): schema, validation, load and save.

One file holds one or more *targets*. A target is a tensor inside the model (named by its ONNX tensor
name and/or the PyTorch module path it was fitted at) plus the repair to apply there::

    s   = (h - mu) @ U.T                    # k scores per sample (per token for layout "token")
    c   = s                                 # gate "none"
    c   = s * (s > tau)                     # gate "hard": act only where the score is above tau
    c   = 0 where s is NaN or infinite      # a non-finite activation is left as it was
    h'  = h - (alpha * c) @ U               # repair "project" (the default)
    h'  = h - (alpha * shift * [c > 0]) @ U  # repair "translate": the FIRE paper's x - alpha beta, with
                                            # beta = shift @ U the mean triggered shift (gate "none":
                                            # every input, a plain Sub of a constant)

The npz holds plain arrays only (``allow_pickle=False`` on load): ``header`` is a 0-d unicode array
with a JSON document, and target ``i`` has float32 arrays ``t{i}.mu`` (D,), ``t{i}.U`` (k, D),
``t{i}.tau`` (k,), ``t{i}.alpha`` (k,). A ``translate`` target also has ``t{i}.shift`` (k,) and makes
the file schema version 2 (older fire-onnx refuses it instead of applying a projection); files of
projections stay version 1. Optional ``t{i}.stats.*`` arrays hold the sufficient statistics of the
estimate for ``fit --update`` (:mod:`fire_onnx.streaming`); readers that do not know them ignore them.
See README.md, "Directions file".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fire_onnx.errors import FireError
from fire_onnx.fileio import atomic_path, is_int, load_npz, loads_json

FORMAT = "fire-onnx.directions"
SCHEMA_VERSION = 2  # the newest version written; 1 is still written when nothing needs 2
READABLE_VERSIONS = (1, 2)
LAYOUTS = ("flat", "vector", "token")
GATES = ("none", "hard")
REPAIRS = ("project", "translate")  # "translate" (the FIRE paper's operator) needs schema version 2
STATS_PREFIX = "stats."
ORTHO_TOL = 1e-3


@dataclass(eq=False)  # arrays inside: compare fields, not objects
class Target:
    """The repair at one tensor. Arrays are float32; ``U`` rows are orthonormal."""

    mu: np.ndarray
    U: np.ndarray
    tau: np.ndarray
    alpha: np.ndarray
    layout: str
    gate: str = "hard"
    tensor: str = ""
    module: str = ""
    feature_shape: list[int] = field(default_factory=list)  # per-sample shape, -1 for dynamic
    fit: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # see fire_onnx.probe
    repair: str = "project"
    shift: np.ndarray | None = None  # (k,) translate only: the mean shift along each row of U
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # fit --update's statistics (fire_onnx.streaming)

    @property
    def beta(self) -> np.ndarray:
        """The translation (D,) a translate target subtracts (before alpha): ``shift @ U``."""
        if self.shift is None:
            raise FireError(f"target {self.label} is not a translate repair")
        return self.shift.astype(np.float64) @ self.U.astype(np.float64)

    @property
    def dim(self) -> int:
        return int(self.U.shape[1])

    @property
    def k(self) -> int:
        return int(self.U.shape[0])

    @property
    def label(self) -> str:
        return self.tensor or self.module or "<unnamed>"

    def validate(self, where: str = "target") -> None:
        if self.layout not in LAYOUTS:
            raise FireError(f"{where}: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.gate not in GATES:
            raise FireError(f"{where}: gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if not self.tensor and not self.module:
            raise FireError(f"{where}: needs a tensor name or a module path")
        if self.repair not in REPAIRS:
            raise FireError(f"{where}: repair must be one of {', '.join(REPAIRS)}, got {self.repair!r}")
        if (self.repair == "translate") != (self.shift is not None):
            raise FireError(f"{where}: a translate repair needs the shift array (and only it has one)")
        for name in ("mu", "U", "tau", "alpha") + (("shift",) if self.shift is not None else ()):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
                raise FireError(f"{where}: {name} must be a floating-point array")
            if not np.all(np.isfinite(a)):
                raise FireError(f"{where}: {name} contains NaN or infinite values")
        if self.U.ndim != 2 or self.U.shape[0] < 1 or self.U.shape[1] < 1:
            raise FireError(f"{where}: U must have shape (k, D) with k >= 1, got {self.U.shape}")
        k, d = self.U.shape
        if k > d:
            raise FireError(f"{where}: k = {k} directions cannot exceed the dimension D = {d}")
        if self.mu.shape != (d,):
            raise FireError(f"{where}: mu has shape {self.mu.shape}, expected ({d},) to match U")
        for name in ("tau", "alpha") + (("shift",) if self.shift is not None else ()):
            if getattr(self, name).shape != (k,):
                raise FireError(f"{where}: {name} has shape {getattr(self, name).shape}, expected ({k},)")
        if np.any(self.alpha < 0):
            raise FireError(f"{where}: alpha must be >= 0")
        with np.errstate(over="ignore", invalid="ignore"):
            offset = self.U.astype(np.float64) @ self.mu.astype(np.float64)  # the patch's U mu constant
            scaled = self.alpha.astype(np.float64).max() * np.abs(self.U.astype(np.float64)).max()
            if self.shift is not None:
                scaled *= max(1.0, float(np.abs(self.shift.astype(np.float64)).max()))
            if not (np.all(np.isfinite(offset.astype(np.float32))) and np.isfinite(np.float32(scaled))):
                raise FireError(f"{where}: mu or alpha is too large for float32 (the repair's constants overflow)")
        gram = self.U.astype(np.float64) @ self.U.astype(np.float64).T
        err = float(np.max(np.abs(gram - np.eye(k))))
        if err > ORTHO_TOL:
            raise FireError(f"{where}: the rows of U are not orthonormal (max |UU^T - I| = {err:.2e})")
        if self.feature_shape:
            fs = [int(s) for s in self.feature_shape]
            if self.layout == "flat":
                if any(s <= 0 for s in fs) or math.prod(fs) != d:
                    raise FireError(f"{where}: feature_shape {_brief(fs)} does not flatten to D = {d}")
            elif fs[-1] != d:
                raise FireError(f"{where}: feature_shape {_brief(fs)} must end in D = {d} for layout {self.layout}")


def _brief(v, limit: int = 60) -> str:
    text = str(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(eq=False)  # arrays inside: the generated == raised 'truth value of an array is ambiguous'
class Directions:
    targets: list[Target]
    preprocess: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    probe: np.ndarray | None = None  # uint8 (P, H, W, C) probe images of the fingerprints (fire_onnx.probe)

    def validate(self) -> None:
        if not self.targets:
            raise FireError("directions file has no targets")
        if self.probe is not None and (not isinstance(self.probe, np.ndarray) or self.probe.dtype != np.uint8
                                       or self.probe.ndim != 4 or self.probe.shape[0] < 1):
            raise FireError("probe images must be uint8 with shape (P, H, W, C)")
        for i, t in enumerate(self.targets):
            t.validate(f"target {i} ({t.label})")
        labels = [t.tensor or t.module for t in self.targets]
        if len(set(labels)) != len(labels):
            raise FireError("directions file names the same tensor/module twice")


def _target_header(t: Target) -> dict[str, Any]:
    return {
        "tensor": t.tensor,
        "module": t.module,
        "layout": t.layout,
        "gate": t.gate,
        "dim": t.dim,
        "k": t.k,
        "feature_shape": [int(s) for s in t.feature_shape],
        "fit": t.fit,
        "fingerprint": t.fingerprint,
        "repair": t.repair,
    }


def schema_version_needed(directions: Directions) -> int:
    """1 unless a target needs what version 1 readers would misread (a translate repair)."""
    return 2 if any(t.repair != "project" for t in directions.targets) else 1


def save(directions: Directions, path: str | os.PathLike) -> None:
    """Validate and write ``directions`` atomically to ``path``."""
    directions.validate()
    from fire_onnx import __version__

    header = {
        "format": FORMAT,
        "schema_version": schema_version_needed(directions),
        "fire_onnx_version": __version__,
        "preprocess": directions.preprocess,
        "meta": directions.meta,
        "targets": [_target_header(t) for t in directions.targets],
    }
    arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header, sort_keys=True))}
    for i, t in enumerate(directions.targets):
        for name in ("mu", "U", "tau", "alpha"):
            arrays[f"t{i}.{name}"] = np.ascontiguousarray(getattr(t, name), dtype=np.float32)
        if t.shift is not None:
            arrays[f"t{i}.shift"] = np.ascontiguousarray(t.shift, dtype=np.float32)
        for name, a in t.stats.items():
            arrays[f"t{i}.{STATS_PREFIX}{name}"] = np.ascontiguousarray(a)
    if directions.probe is not None:
        arrays["probe.x"] = np.ascontiguousarray(directions.probe, dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez must not append ".npz" to the temp name
            np.savez(f, **arrays)


ARRAYS = ("mu", "U", "tau", "alpha")


def _header_text(arrays: dict, path) -> str:
    h = arrays["header"]
    if not isinstance(h, np.ndarray) or h.dtype.kind not in "US" or h.size != 1:
        raise _Damaged(f"{path}: the 'header' entry is not a JSON string")
    v = h.reshape(-1)[0]
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"{path}: the 'header' entry is not UTF-8 text") from None
    return str(v)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _target_from_header(h: dict, arr: dict, where: str) -> Target:
    """A Target from its header object and arrays; every field type-checked (FireError)."""
    def text(key: str) -> str:
        v = h.get(key)
        if v is None:
            return ""
        if not isinstance(v, str):
            raise _Damaged(f"{where}: {key} must be a string, got {_kind(v)}")
        return v

    def obj(key: str) -> dict:
        v = h.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise _Damaged(f"{where}: {key} must be an object, got {_kind(v)}")
        return v

    fs = h.get("feature_shape")
    if fs is None:
        fs = []
    if not isinstance(fs, list) or not all(is_int(x) for x in fs):
        raise _Damaged(f"{where}: feature_shape must be a list of integers")
    if any(x < -1 for x in fs):
        raise _Damaged(f"{where}: feature_shape {_brief(fs)} has a negative dimension")
    fingerprint = obj("fingerprint")
    if fingerprint:
        from fire_onnx.probe import FINGERPRINT_VERSION, valid_fingerprint

        if fingerprint.get("version") == FINGERPRINT_VERSION and not valid_fingerprint(fingerprint):
            raise _Damaged(f"{where}: its model fingerprint is malformed")
    t = Target(layout=text("layout"), gate=text("gate"), tensor=text("tensor"), module=text("module"),
               feature_shape=list(fs), fit=obj("fit"), fingerprint=fingerprint, **arr)
    for key in ("dim", "k"):
        v = h.get(key)
        if v is None:
            continue
        if not is_int(v):
            raise _Damaged(f"{where}: {key} must be an integer, got {_kind(v)}")
        a = t.U
        if isinstance(a, np.ndarray) and a.ndim == 2 and v != a.shape[1 if key == "dim" else 0]:
            raise _Damaged(f"{where}: the header says {key} = {v} but U has shape {a.shape}")
    return t


def _check_meta(meta: dict, path) -> None:
    target, trigger = meta.get("target"), meta.get("trigger")
    if target is not None and (not is_int(target) or target < 0):
        raise _Damaged(f"{path}: meta.target must be a class index (an integer >= 0), got {_kind(target)}")
    if trigger is not None and not isinstance(trigger, dict):
        raise _Damaged(f"{path}: meta.trigger must be an object, got {_kind(trigger)}")


def repaired_class(meta: dict) -> int | None:
    """The class whose backdoor a repair is for: the recorded ``target`` (``--target``, ``--trigger`` fits,
    ``--unlabeled``), else the class its trigger reconstruction confirmed (flagged inputs), else the class most of
    its held-out triggered images went to on the original model (the fit's check). None when nothing says.

    A flagged fit records no ``target``: ``patch --replace`` then could not tell that a repair for class 3 was
    swapped in for one for class 0, and the class-0 backdoor came back to 98 % with nothing said (new-user run 23)."""
    if is_int(meta.get("target")):
        return int(meta["target"])
    rc = meta.get("reconstruction") or {}
    if isinstance(rc, dict) and rc.get("confirmed") and is_int(rc.get("majority_class")):
        return int(rc["majority_class"])
    check = meta.get("check") or {}
    return int(check["target"]) if isinstance(check, dict) and is_int(check.get("target")) else None


DAMAGED = "(a damaged or hand-edited directions file: fit the directions again)"


def load(path: str | os.PathLike) -> Directions:
    """Load and fully validate a directions file; any problem raises FireError.

    The header is untrusted: every field is type-checked, deep nesting is refused, the recorded
    preprocessing must be complete and valid (it is used to check the model fingerprint and is
    recorded in the patched model, so a corrupt one is never replaced by defaults), and the arrays
    must be exactly those the header describes.
    """
    arrays = load_npz(path, "directions file")
    if "header" not in arrays:
        raise FireError(f"{path} is not a fire-onnx directions file (no 'header' entry)")
    try:
        return _load(path, arrays)
    except _Damaged as e:
        raise FireError(f"{e} {DAMAGED}") from None


class _Damaged(FireError):
    """A structural problem of a file that otherwise claims to be a directions file."""


def _load(path, arrays: dict) -> Directions:
    try:
        header = loads_json(_header_text(arrays, path))
    except ValueError as e:
        raise _Damaged(f"{path}: the header {e}") from None
    if not isinstance(header, dict):
        raise FireError(f"{path} is not a fire-onnx directions file (its header is {_kind(header)}, not an object)")
    if header.get("format") != FORMAT:
        fmt = header.get("format")
        shown = repr(fmt[:60]) if isinstance(fmt, str) else _kind(fmt)
        raise FireError(f"{path} is not a fire-onnx directions file (format {shown})")
    version = header.get("schema_version")
    if not is_int(version) or version not in READABLE_VERSIONS:
        shown = repr(version) if is_int(version) and abs(version) < 10**9 else _kind(version)
        raise FireError(f"{path} has directions schema version {shown}; this fire-onnx reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))} (a newer fire-onnx wrote it: upgrade)")
    heads = header.get("targets")
    if not isinstance(heads, list):
        raise _Damaged(f"{path}: header has no target list")
    expected = {"header", "probe.x"} | {f"t{i}.{n}" for i in range(len(heads)) for n in ARRAYS + ("shift",)}
    stats_of = tuple(f"t{i}.{STATS_PREFIX}" for i in range(len(heads)))  # fit --update's statistics
    extra = sorted(k for k in arrays if k not in expected and not k.startswith(stats_of))
    if extra:
        raise _Damaged(f"{path}: unexpected arrays {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} "
                        f"for a header with {len(heads)} target(s)")
    targets = []
    for i, h in enumerate(heads):
        if not isinstance(h, dict):
            raise _Damaged(f"{path}: target {i} header is not an object")
        arr = {}
        for name in ARRAYS:
            key = f"t{i}.{name}"
            if key not in arrays:
                raise _Damaged(f"{path}: missing array {key}")
            arr[name] = arrays[key]
        repair = h.get("repair", "project")
        if not isinstance(repair, str) or repair not in REPAIRS:
            shown = repr(repair[:40]) if isinstance(repair, str) else _kind(repair)
            raise _Damaged(f"{path}: target {i}: repair must be one of {', '.join(REPAIRS)}, got {shown}")
        if repair != "project" and version < 2:
            raise _Damaged(f"{path}: target {i} has repair {repair!r}, which needs schema version 2")
        arr["shift"] = arrays.get(f"t{i}.shift") if repair == "translate" else None
        pre = f"t{i}.{STATS_PREFIX}"
        arr["stats"] = {k[len(pre):]: v for k, v in arrays.items() if k.startswith(pre)}
        arr["repair"] = repair
        targets.append(_target_from_header(h, arr, f"{path}: target {i}"))
    for key in ("preprocess", "meta"):
        if header.get(key) is not None and not isinstance(header[key], dict):
            raise _Damaged(f"{path}: header {key} must be an object, got {_kind(header[key])}")
    preprocess = dict(header.get("preprocess") or {})
    if preprocess:
        from fire_onnx.data import preprocess_from_record

        try:
            preprocess = preprocess_from_record(preprocess).as_dict()
        except ValueError as e:
            raise _Damaged(f"{path}: the recorded preprocessing {e}") from None
    meta = dict(header.get("meta") or {})
    _check_meta(meta, path)
    d = Directions(targets=targets, preprocess=preprocess, meta=meta, probe=arrays.get("probe.x"))
    probe = d.probe
    for i, t in enumerate(targets):
        stats = t.fingerprint.get("stats")
        if isinstance(probe, np.ndarray) and probe.ndim == 4 and isinstance(stats, list) and len(stats) != len(probe):
            raise _Damaged(f"{path}: target {i}: its model fingerprint has {len(stats)} rows for {len(probe)} probe "
                            "images")
    try:
        d.validate()
    except FireError as e:
        raise _Damaged(f"{path}: {e}") from None
    return d


def orthonormalize(U: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the rows of ``U`` (Gram-Schmidt via QR, signs kept)."""
    U = np.asarray(U, dtype=np.float64)
    q, r = np.linalg.qr(U.T)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return (q * signs).T


def reference_repair(h: np.ndarray, t: Target) -> np.ndarray:
    """The repair in numpy (float64), for checks: ``h`` is a batch with the target's layout."""
    h = np.asarray(h, dtype=np.float64)
    U = t.U.astype(np.float64)
    if t.layout == "flat":
        x = h.reshape(h.shape[0], -1)
    else:
        x = h
    with np.errstate(invalid="ignore", over="ignore"):
        s = (x - t.mu.astype(np.float64)) @ U.T
    finite = np.isfinite(s)
    s = np.where(finite, s, 0.0)  # NaN/inf activations get no correction (left as they were)
    if t.repair == "translate":  # x - alpha beta where the gate fires; gate "none": every input, as a Sub
        fires = finite & (s > t.tau.astype(np.float64)) if t.gate == "hard" else np.ones_like(finite)
        s = np.where(fires, t.shift.astype(np.float64), 0.0)
    elif t.gate == "hard":
        s = np.where(s > t.tau.astype(np.float64), s, 0.0)
    x = x - (s * t.alpha.astype(np.float64)) @ U
    return x.reshape(h.shape)
