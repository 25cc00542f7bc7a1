"""Sufficient statistics of a fitted target, so ``fit --update`` can refine it with new triggered
(flagged) inputs without the earlier ones (numpy only).

What the estimate in :func:`fire_onnx.estimate.fit_target` needs from the triggered samples, and what is
kept of it in the directions file (``t{i}.stats.*`` arrays, ignored by readers that do not know them):

- the mean shift (the direction of ``mean-diff``, the translation of ``translate``): the count and the
  sums of the triggered activations and of their references (the paired clean twins, or the
  class-matched means); observations whose reference is the plain clean mean are counted apart and use
  the clean mean of the *current* fit. Exact for any number of inputs, 2 x D float64.
- the shifts' second moment (the directions of ``subspace``): a sketch ``B`` (r x D, r <= 32) with
  ``B^T B`` equal to the sum of ``shift shift^T`` while the shifts span at most r dimensions, and the
  top-r part of it afterwards (merging = SVD of the stacked sketch and new shifts, truncated: the
  Frequent-Directions idea without shrinkage). The top-k directions are exact while that holds.
- the triggered scores along the (new) directions, for the gate threshold of gate ``auto`` and the
  reported recall: the triggered activation rows themselves (with the real flagged inputs behind a
  reconstructed trigger, which the gate must reach too), at most ``MAX_ROWS`` of them and at most
  ``MAX_ROWS_BYTES`` (float32). Up to that many, an update equals a fit on all inputs seen so far;
  beyond, a uniform sample of the rows is kept (reservoir) and the gate's quantiles are estimates.

With trigger reconstruction (flagged images without twins) the directions file also keeps the flagged images
themselves (:mod:`fire_onnx.fit.update`), and an update refits on them and the new ones instead of merging
these statistics; files that keep none (written before) merge each batch's reconstruction as before.

The clean side (mean, clean-score quantile for tau) is recomputed from the clean images at every update:
fit needs them anyway and they are not the scarce part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fire_onnx.errors import FireError

MAX_ROWS = 128
MAX_ROWS_BYTES = 2 << 20  # 2 MiB of float32 rows per target
SKETCH_ROWS = 32


def row_cap(d: int) -> int:
    """How many triggered activation rows of dimension ``d`` a directions file keeps."""
    return int(max(8, min(MAX_ROWS, MAX_ROWS_BYTES // (4 * max(d, 1)))))


@dataclass
class ShiftStats:
    n_images: int  # triggered images
    n_obs: int  # triggered observations (rows; images x tokens for layout token)
    n_unpaired: int  # observations whose reference is the clean mean
    sum_triggered: np.ndarray  # (D,) float64
    sum_reference: np.ndarray  # (D,) float64, references of the other observations
    rows: np.ndarray  # (m, D) float32 rows the gate must reach (all, or a uniform sample beyond the cap)
    sketch: np.ndarray | None = None  # (r, D) float32, subspace only
    n_gate_rows: int = 0  # rows that reach the gate without entering the shift (real flagged inputs)

    @property
    def dim(self) -> int:
        return int(self.sum_triggered.shape[0])

    def mean_shift(self, mu: np.ndarray) -> np.ndarray:
        """The mean shift of all observations, with ``mu`` the reference of the unpaired ones."""
        total = self.sum_triggered - self.sum_reference - self.n_unpaired * np.asarray(mu, np.float64)
        return total / max(self.n_obs, 1)

    @classmethod
    def from_rows(cls, T: np.ndarray, ref: np.ndarray | None, mu: np.ndarray, *, n_images: int,
                  sketch: bool = False, gate_rows: np.ndarray | None = None) -> "ShiftStats":
        """Statistics of triggered rows ``T`` (M, D) with references ``ref`` (M, D), or the clean mean
        ``mu`` when ``ref`` is None; ``gate_rows`` only join the rows kept for the gate."""
        T = np.asarray(T, np.float64)
        d = T.shape[1]
        if ref is None:
            n_unp, sum_ref = T.shape[0], np.zeros(d)
            shifts = T - np.asarray(mu, np.float64)[None, :]
        else:
            ref = np.broadcast_to(np.asarray(ref, np.float64), T.shape)
            n_unp, sum_ref = 0, ref.sum(axis=0)
            shifts = T - ref
        rows = T if gate_rows is None else np.concatenate([T, np.asarray(gate_rows, np.float64)])
        n_gate = 0 if gate_rows is None else int(len(gate_rows))
        return cls(n_images=int(n_images), n_obs=int(T.shape[0]), n_unpaired=int(n_unp), sum_triggered=T.sum(axis=0),
                   sum_reference=sum_ref, rows=_cap_rows(rows.astype(np.float32), None, len(rows)),
                   sketch=_sketch(shifts) if sketch else None, n_gate_rows=n_gate)

    def merge(self, new: "ShiftStats") -> "ShiftStats":
        """The statistics of both sets of observations (``self`` first)."""
        if new.dim != self.dim:
            raise FireError(f"the new activations have D = {new.dim} but the directions file's statistics D = "
                            f"{self.dim}: another layer or model")
        sketch = None
        if self.sketch is not None and new.sketch is not None:
            sketch = _sketch(np.concatenate([self.sketch, new.sketch]).astype(np.float64))
        elif self.sketch is not None or new.sketch is not None:
            raise FireError("cannot merge subspace statistics with mean-diff ones (refit with the same --method)")
        n_obs = self.n_obs + new.n_obs
        seen = (self.n_obs + self.n_gate_rows, new.n_obs + new.n_gate_rows)
        return ShiftStats(
            n_images=self.n_images + new.n_images, n_obs=n_obs, n_unpaired=self.n_unpaired + new.n_unpaired,
            sum_triggered=self.sum_triggered + new.sum_triggered, sum_reference=self.sum_reference + new.sum_reference,
            rows=_cap_rows(self.rows, new.rows, sum(seen), weights=seen), sketch=sketch,
            n_gate_rows=self.n_gate_rows + new.n_gate_rows)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "count": np.array([self.n_images, self.n_obs, self.n_unpaired, self.n_gate_rows], dtype=np.int64),
            "sum_triggered": self.sum_triggered.astype(np.float64),
            "sum_reference": self.sum_reference.astype(np.float64),
            "rows": self.rows.astype(np.float32),
        }
        if self.sketch is not None:
            out["sketch"] = self.sketch.astype(np.float32)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], d: int, where: str = "target") -> "ShiftStats":
        """Read and check the ``stats.*`` arrays of a target of dimension ``d``."""
        need = ("count", "sum_triggered", "sum_reference", "rows")
        missing = [k for k in need if k not in arrays]
        if missing:
            raise FireError(f"{where}: the update statistics are incomplete (missing stats.{missing[0]})")
        a = {k: np.asarray(v) for k, v in arrays.items()}
        count = a["count"]
        if count.dtype.kind not in "iu" or count.shape != (4,) or np.any(count < 0) or count[1] < 1 or count[2] > count[1]:
            raise FireError(f"{where}: stats.count must be 4 non-negative integers (images, observations, unpaired, "
                            "gate-only rows)")
        for k in ("sum_triggered", "sum_reference"):
            if a[k].dtype.kind != "f" or a[k].shape != (d,) or not np.all(np.isfinite(a[k])):
                raise FireError(f"{where}: stats.{k} must be {d} finite floats")
        rows = a["rows"]
        if rows.dtype.kind != "f" or rows.ndim != 2 or rows.shape[1] != d or not 1 <= rows.shape[0] <= count[1] + count[3] \
                or not np.all(np.isfinite(rows)):
            raise FireError(f"{where}: stats.rows must be (m, {d}) finite floats, 1 <= m <= the rows seen")
        sketch = a.get("sketch")
        if sketch is not None and (sketch.dtype.kind != "f" or sketch.ndim != 2 or sketch.shape[1] != d
                                   or not np.all(np.isfinite(sketch))):
            raise FireError(f"{where}: stats.sketch must be (r, {d}) finite floats")
        return cls(n_images=int(count[0]), n_obs=int(count[1]), n_unpaired=int(count[2]),
                   sum_triggered=a["sum_triggered"].astype(np.float64),
                   sum_reference=a["sum_reference"].astype(np.float64), rows=rows.astype(np.float32),
                   sketch=None if sketch is None else sketch.astype(np.float32), n_gate_rows=int(count[3]))


def _sketch(shifts: np.ndarray) -> np.ndarray:
    """At most SKETCH_ROWS rows B with B^T B the best rank-r approximation of shifts^T shifts."""
    _, sv, vt = np.linalg.svd(np.asarray(shifts, np.float64), full_matrices=False)
    r = min(SKETCH_ROWS, len(sv))
    return (sv[:r, None] * vt[:r]).astype(np.float32)


def _cap_rows(a: np.ndarray, b: np.ndarray | None, n_obs: int, weights: tuple[int, int] | None = None) -> np.ndarray:
    """``a`` (and ``b``) stacked, or a uniform sample of ``row_cap`` rows of them when there are more.

    ``weights`` are the observation counts ``a`` and ``b`` stand for (a may already be a sample)."""
    rows = a if b is None else np.concatenate([a, b])
    cap = row_cap(rows.shape[1])
    if rows.shape[0] <= cap:
        return np.ascontiguousarray(rows, dtype=np.float32)
    rng = np.random.default_rng(n_obs)  # deterministic: the same inputs give the same file
    if b is None:
        return np.ascontiguousarray(rows[np.sort(rng.choice(len(rows), cap, replace=False))], dtype=np.float32)
    wa, wb = weights or (len(a), len(b))
    ka = int(round(cap * wa / max(wa + wb, 1)))
    ka = min(max(ka, cap - len(b)), len(a))
    kb = cap - ka
    ia = np.sort(rng.choice(len(a), ka, replace=False))
    ib = np.sort(rng.choice(len(b), kb, replace=False))
    return np.ascontiguousarray(np.concatenate([a[ia], b[ib]]), dtype=np.float32)
