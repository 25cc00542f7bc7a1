"""The directions file (``directions.npz``): schema, validation, load and save.

One file holds one or more *targets*. A target is a tensor inside the model (named by its ONNX tensor
name and/or the PyTorch module path it was fitted at) plus the repair to apply there::

    s   = (h - mu) @ U.T                    # k scores per sample (per token for layout "token")
    c   = s                                 # gate "none"
    c   = s * (s > tau)                     # gate "hard": act only where the score is above tau
    c   = 0 where s is NaN or infinite      # a non-finite activation is left as it was
    h'  = h - (alpha * c) @ U

The npz holds plain arrays only (``allow_pickle=False`` on load): ``header`` is a 0-d unicode array
with a JSON document, and target ``i`` has float32 arrays ``t{i}.mu`` (D,), ``t{i}.U`` (k, D),
``t{i}.tau`` (k,), ``t{i}.alpha`` (k,). See README.md, "Directions file".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fire_onnx.errors import FireError
from fire_onnx.fileio import atomic_path, load_npz

FORMAT = "fire-onnx.directions"
SCHEMA_VERSION = 1
LAYOUTS = ("flat", "vector", "token")
GATES = ("none", "hard")
ORTHO_TOL = 1e-3


@dataclass
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
        for name in ("mu", "U", "tau", "alpha"):
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
        for name in ("tau", "alpha"):
            if getattr(self, name).shape != (k,):
                raise FireError(f"{where}: {name} has shape {getattr(self, name).shape}, expected ({k},)")
        if np.any(self.alpha < 0):
            raise FireError(f"{where}: alpha must be >= 0")
        gram = self.U.astype(np.float64) @ self.U.astype(np.float64).T
        err = float(np.max(np.abs(gram - np.eye(k))))
        if err > ORTHO_TOL:
            raise FireError(f"{where}: the rows of U are not orthonormal (max |UU^T - I| = {err:.2e})")
        if self.feature_shape:
            fs = [int(s) for s in self.feature_shape]
            if self.layout == "flat":
                if any(s <= 0 for s in fs) or math.prod(fs) != d:
                    raise FireError(f"{where}: feature_shape {fs} does not flatten to D = {d}")
            elif fs[-1] != d:
                raise FireError(f"{where}: feature_shape {fs} must end in D = {d} for layout {self.layout}")


@dataclass
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
    }


def save(directions: Directions, path: str | os.PathLike) -> None:
    """Validate and write ``directions`` atomically to ``path``."""
    directions.validate()
    from fire_onnx import __version__

    header = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "fire_onnx_version": __version__,
        "preprocess": directions.preprocess,
        "meta": directions.meta,
        "targets": [_target_header(t) for t in directions.targets],
    }
    arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header, sort_keys=True))}
    for i, t in enumerate(directions.targets):
        for name in ("mu", "U", "tau", "alpha"):
            arrays[f"t{i}.{name}"] = np.ascontiguousarray(getattr(t, name), dtype=np.float32)
    if directions.probe is not None:
        arrays["probe.x"] = np.ascontiguousarray(directions.probe, dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez must not append ".npz" to the temp name
            np.savez(f, **arrays)


def load(path: str | os.PathLike) -> Directions:
    """Load and fully validate a directions file; any problem raises FireError."""
    arrays = load_npz(path, "directions file")
    if "header" not in arrays:
        raise FireError(f"{path} is not a fire-onnx directions file (no 'header' entry)")
    try:
        header = json.loads(str(arrays["header"][()]))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise FireError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FireError(f"{path} is not a fire-onnx directions file (format {header.get('format')!r})")
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FireError(
            f"{path} has directions schema version {version!r}; this fire-onnx reads version {SCHEMA_VERSION}"
        )
    heads = header.get("targets")
    if not isinstance(heads, list):
        raise FireError(f"{path}: header has no target list")
    targets = []
    for i, h in enumerate(heads):
        if not isinstance(h, dict):
            raise FireError(f"{path}: target {i} header is not an object")
        arr = {}
        for name in ("mu", "U", "tau", "alpha"):
            key = f"t{i}.{name}"
            if key not in arrays:
                raise FireError(f"{path}: missing array {key}")
            arr[name] = arrays[key]
        try:
            t = Target(
                layout=str(h.get("layout", "")),
                gate=str(h.get("gate", "")),
                tensor=str(h.get("tensor") or ""),
                module=str(h.get("module") or ""),
                feature_shape=[int(s) for s in h.get("feature_shape") or []],
                fit=dict(h.get("fit") or {}),
                fingerprint=h.get("fingerprint") if isinstance(h.get("fingerprint"), dict) else {},
                **arr,
            )
        except (TypeError, ValueError) as e:
            raise FireError(f"{path}: target {i} header is malformed ({e})") from None
        targets.append(t)
    d = Directions(targets=targets, preprocess=dict(header.get("preprocess") or {}), meta=dict(header.get("meta") or {}),
                   probe=arrays.get("probe.x"))
    try:
        d.validate()
    except FireError as e:
        raise FireError(f"{path}: {e}") from None
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
    s = np.where(np.isfinite(s), s, 0.0)  # NaN/inf activations get no correction (left as they were)
    if t.gate == "hard":
        s = np.where(s > t.tau.astype(np.float64), s, 0.0)
    x = x - (s * t.alpha.astype(np.float64)) @ U
    return x.reshape(h.shape)
