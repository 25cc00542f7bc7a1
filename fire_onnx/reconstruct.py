"""Reconstruct a trigger from flagged inputs alone, and let the model confirm it (numpy only).

A defender often has only *flagged* images: inputs caught making the model misbehave, with no clean
twin and no true label. Fitting on them directly means measuring their shift against the clean mean,
which is noisy. Instead, this module explains the flagged images with a few simple pixel-space
trigger models, each estimated from the flagged images and clean images alone:

- ``patch``:    a replaced patch, ``x' = (1 - m) x + m p`` with a 0/1 mask ``m``. Its pixels are those on
  which the flagged images agree with each other (at least ``PATCH_AGREE`` of them within ``PATCH_TOL``
  of their median) while the clean images rarely take that value there (the share of flagged images
  that agree exceeds the share of clean ones by ``PATCH_MARGIN``). The search is location-free, so a
  patch in any corner, the center or elsewhere is found the same way. Variants: the detected pixels
  after dropping isolated ones, their largest connected component, their bounding box (which also
  covers pattern pixels equal to the background, e.g. the dark squares of a checker patch), and the
  largest component grown into neighbouring pixels that pass looser thresholds (edges that some
  flagged images cover differently); pattern = the flagged images' per-pixel median. (A blind
  one-pixel dilation was tried and dropped: its ring takes the flagged images' median *content*, which
  on a weak centre-patch MNIST model confirmed more often than the exact patch, 90 % vs 81 %, and
  left 10 % ASR against 2.7 % paired.) A patch is
  compact: a variant whose bounding box exceeds ``PATCH_MAX_AREA`` of the image is dropped (on MNIST,
  a SIG signal lifts the black background in stripes that the flagged images agree on).
- ``blend``:    ``x' = (1 - a) x + a p``. Blending scales the spread of every pixel by ``1 - a``, so ``a``
  comes from the ratio of the flagged to the clean pixel spread (pooled over pixels), and ``p`` from
  the means: ``mean_flagged = (1 - a) mean_clean + a p``.
- ``additive``: ``x' = x + d`` with ``d`` the difference of the flagged and clean means (SIG-like
  signals); variants keep only the pixels where that difference exceeds ``ADDITIVE_Z`` standard
  errors, average it along one axis (stripes), or keep only its significant frequencies along the
  other (periodic stripes, see :func:`periodic_candidates`).

The clean reference excludes images of the flagged images' majority predicted class (the flagged
images were drawn from the other classes). Each candidate is then *confirmed by the model*: stamped
onto held clean images that are not of that class, it should make the model predict that class.
The confirmation rate is the share that does. The winner is the candidate with the highest rate;
among candidates within ``TIE_TOL`` (3 points) of the best rate, or within two binomial standard
errors of it where that is more (:func:`tie_tolerance`), the most structured kind wins (patch,
then periodic stripes, then blend, then additive) and within a kind the smallest change (mean
absolute pixel change on the held images). The kind comes first because the additive model is the catch-all: the mean difference
also carries the flagged images' own content, and on a Blended MNIST model it confirmed as often as
the blend (98 %) with a slightly smaller change yet left 21.7 % ASR after the repair from 5 flagged
images, against 2.1 % with the blend. Below ``CONFIRM_THRESHOLD`` (50 %) nothing is confirmed: the
caller falls back to the unpaired estimate and warns. (``fire_onnx.fit.core`` pairs the fit on a
patch or additive winner; a blend is fitted unpaired and, in ``fit``, also on pseudo-pairs, the
cross-fitted held-out check choosing: see ``PSEUDO_PAIR_KINDS`` there and
``fire_onnx.fit.pipeline.choose_blend_fit``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fire_onnx.errors import FireError

CONFIRM_THRESHOLD = 0.5  # a candidate must move at least this share of held images to the flagged class
TIE_TOL = 0.03  # candidates within this (or 2 standard errors) of the best rate tie, see tie_tolerance
N_CONFIRM = 200  # held clean images a candidate is stamped onto to confirm it
PATCH_TOL = 12.0  # pixel values (0..255) within this of the flagged median "agree"
PATCH_AGREE = 0.8  # share of flagged images that must agree on a patch pixel
PATCH_MARGIN = 0.5  # ... exceeding the share of clean images that take that value there by this much
PATCH_AGREE_LOOSE = 0.5  # the grown variant also takes neighbouring pixels at these looser thresholds
PATCH_MARGIN_LOOSE = 0.25
PATCH_MAX_AREA = 0.25  # a "patch" whose bounding box covers more than this share of the image is not a patch
BLEND_MIN = 0.03  # blend ratios below this are no blend
ADDITIVE_Z = 3.0  # the sparse additive variant keeps mean differences above this many standard errors
PERIODIC_Z = 3.0  # a stripe signal's Fourier coefficient is kept above this many standard errors

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC images -> predicted class per image


@dataclass
class Candidate:
    """A trigger model: ``x' = clip((1 - mask) x + mask pattern + delta)`` on uint8 NHWC images."""

    kind: str  # patch | blend | additive
    name: str
    mask: np.ndarray  # (H, W, 1) float32 in [0, 1]
    pattern: np.ndarray  # (H, W, C) float32
    delta: np.ndarray  # (H, W, C) float32
    info: dict = field(default_factory=dict)  # mask size, box, blend ratio ...
    rate: float | None = None  # confirmation rate
    change: float | None = None  # mean absolute pixel change on the held images

    def apply(self, x: np.ndarray) -> np.ndarray:
        xf = x.astype(np.float32)
        out = (1 - self.mask) * xf + self.mask * self.pattern + self.delta
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def describe(self) -> dict:
        out = {"kind": self.kind, "name": self.name, **self.info}
        if self.rate is not None:
            out["rate"] = round(float(self.rate), 4)
        if self.change is not None:
            out["change"] = round(float(self.change), 3)
        return out


@dataclass
class Reconstruction:
    """The outcome: the winning candidate (None when nothing was confirmed) and every candidate tried."""

    winner: Candidate | None
    candidates: list[Candidate]
    majority_class: int | None
    majority_share: float
    n_flagged: int
    n_confirm: int
    threshold: float = CONFIRM_THRESHOLD
    reason: str = ""
    held: np.ndarray | None = None  # the held clean images the candidates were confirmed on

    @property
    def confirmed(self) -> bool:
        return self.winner is not None

    def describe(self) -> dict:
        w = self.winner
        out = {"kind": w.kind if w else "none", "name": w.name if w else "",
               "rate": round(float(w.rate), 4) if w else
               max((round(float(c.rate), 4) for c in self.candidates if c.rate is not None), default=0.0),
               "confirmed": self.confirmed, "threshold": self.threshold,
               "tie_tolerance": round(tie_tolerance(max((c.rate or 0 for c in self.candidates), default=0),
                                                    self.n_confirm), 4),
               "majority_class": self.majority_class, "majority_share": round(float(self.majority_share), 4),
               "n_flagged": self.n_flagged, "n_confirm": self.n_confirm,
               "candidates": [c.describe() for c in self.candidates]}
        if w:
            out.update({k: v for k, v in w.info.items() if k not in out})
            out["change"] = round(float(w.change), 3)
        if self.reason:
            out["reason"] = self.reason
        return out


def _f(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim != 4:
        raise FireError(f"trigger reconstruction needs uint8 NHWC images, got {x.dtype} with shape {x.shape}")
    return x.astype(np.float32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a 2-D boolean mask, largest first (each a boolean mask); diagonal
    neighbours connect, so the bright squares of a checker patch form one component."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        stack = [(r0, c0)]
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            comp[r, c] = True
            for rr, cc in ((r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        comps.append(comp)
    return sorted(comps, key=lambda m: -int(m.sum()))


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _filled_box(mask: np.ndarray) -> np.ndarray:
    r0, r1, c0, c1 = _box(mask)
    out = np.zeros_like(mask, dtype=bool)
    out[r0:r1, c0:c1] = True
    return out


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def patch_pixels(flagged: np.ndarray, clean: np.ndarray, tol: float = PATCH_TOL, agree: float = PATCH_AGREE,
                 margin: float = PATCH_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) boolean mask of pixels that look replaced, and the flagged per-pixel median (H, W, C)."""
    share_f, share_c, med = _shares(flagged, clean, tol)
    return (share_f >= agree) & (share_f - share_c >= margin), med


def _shares(flagged: np.ndarray, clean: np.ndarray, tol: float = PATCH_TOL):
    """Per pixel: the share of flagged and of clean images within ``tol`` of the flagged median, and
    that median."""
    F, X = _f(flagged), _f(clean)
    med = np.median(F, axis=0)
    share_f = (np.abs(F - med) <= tol).all(axis=-1).mean(axis=0)
    share_c = (np.abs(X - med) <= tol).all(axis=-1).mean(axis=0)
    return share_f, share_c, med


def _grow(mask: np.ndarray, loose: np.ndarray) -> np.ndarray:
    """Grow ``mask`` into neighbouring pixels that pass the ``loose`` test, until it stops growing."""
    while True:
        grown = mask | (_dilate(mask) & loose)
        if grown.sum() == mask.sum():
            return grown
        mask = grown


def patch_candidates(flagged: np.ndarray, clean: np.ndarray) -> list[Candidate]:
    """Replaced-patch candidates (see the module docstring); none when no pixel looks replaced."""
    share_f, share_c, med = _shares(flagged, clean)
    raw = (share_f >= PATCH_AGREE) & (share_f - share_c >= PATCH_MARGIN)
    h, w = raw.shape
    if not raw.any():
        return []
    comps = _components(raw)
    kept = [c for c in comps if c.sum() >= 2] or comps  # drop isolated pixels unless nothing else is left
    union = np.logical_or.reduce(kept)
    masks = {"patch": union, "patch-largest": comps[0], "patch-box": _filled_box(union),
             "patch-grown": _grow(comps[0], (share_f >= PATCH_AGREE_LOOSE) & (share_f - share_c >= PATCH_MARGIN_LOOSE))}
    out, seen = [], []
    zeros = np.zeros_like(med, dtype=np.float32)
    for name, m in masks.items():
        # a patch is compact: its bounding box covers at most PATCH_MAX_AREA of the image (pixels
        # scattered over the image, e.g. where an additive signal lifts a black background, are not one)
        if _filled_box(m).sum() > PATCH_MAX_AREA * h * w or any(np.array_equal(m, s) for s in seen):
            continue
        seen.append(m)
        br0, br1, bc0, bc1 = _box(m)
        info = {"mask_pixels": int(m.sum()), "mask_box": [br0, br1, bc0, bc1]}
        out.append(Candidate("patch", name, m[:, :, None].astype(np.float32), med.astype(np.float32), zeros, info))
    return out


def blend_ratio(flagged: np.ndarray, clean: np.ndarray, exclude: np.ndarray | None = None) -> float:
    """``a`` of ``x' = (1 - a) x + a p``: 1 - (flagged / clean pixel spread), pooled over pixels
    (variances summed over pixels and channels; ``exclude``: (H, W) pixels to leave out)."""
    F, X = _f(flagged), _f(clean)
    if len(F) < 2:
        return 0.0
    vf, vc = F.var(axis=0, ddof=1), X.var(axis=0, ddof=1)
    keep = np.ones(vf.shape[:2], bool) if exclude is None else ~exclude
    sf, sc = float(vf[keep].sum()), float(vc[keep].sum())
    if sc <= 0:
        return 0.0
    return float(np.clip(1 - np.sqrt(sf / sc), 0.0, 1.0))


def blend_candidates(flagged: np.ndarray, clean: np.ndarray, exclude: np.ndarray | None = None) -> list[Candidate]:
    a = blend_ratio(flagged, clean, exclude)
    if a < BLEND_MIN:
        return []
    F, X = _f(flagged), _f(clean)
    p = np.clip((F.mean(axis=0) - (1 - a) * X.mean(axis=0)) / a, 0, 255).astype(np.float32)
    h, w, _ = p.shape
    mask = np.full((h, w, 1), a, np.float32)
    return [Candidate("blend", "blend", mask, p, np.zeros_like(p), {"blend_ratio": round(a, 4)})]


def additive_candidates(flagged: np.ndarray, clean: np.ndarray) -> list[Candidate]:
    F, X = _f(flagged), _f(clean)
    d = (F.mean(axis=0) - X.mean(axis=0)).astype(np.float32)
    zeros = np.zeros((*d.shape[:2], 1), np.float32)
    out = [Candidate("additive", "additive", zeros, np.zeros_like(d), d,
                     {"delta_l2": round(float(np.linalg.norm(d)), 2)})]
    # signals that vary along one axis only (SIG's sinusoid): the mean difference averaged along the
    # other axis, which averages the flagged images' own content away
    for name, axis in (("additive-columns", 0), ("additive-rows", 1)):
        dp = np.broadcast_to(d.mean(axis=axis, keepdims=True), d.shape).astype(np.float32)
        out.append(Candidate("additive", name, zeros, np.zeros_like(d), np.ascontiguousarray(dp),
                             {"delta_l2": round(float(np.linalg.norm(dp)), 2)}))
    if len(F) >= 2:
        out += periodic_candidates(F, X)
        se = np.sqrt(F.var(axis=0, ddof=1) / len(F) + X.var(axis=0, ddof=1) / max(len(X), 1))
        keep = np.abs(d) > ADDITIVE_Z * np.maximum(se, 1e-3)
        if keep.any() and not keep.all():
            ds = np.where(keep, d, 0).astype(np.float32)
            out.append(Candidate("additive", "additive-sparse", zeros, np.zeros_like(d), ds,
                                 {"delta_l2": round(float(np.linalg.norm(ds)), 2),
                                  "delta_pixels": int(keep.any(axis=-1).sum())}))
    return out


def periodic_candidates(F: np.ndarray, X: np.ndarray) -> list[Candidate]:
    """Stripes: an additive signal that varies along one axis only and is periodic along it (SIG's
    sinusoid). The mean-difference profile along the axis is denoised in its Fourier basis: the
    ``-periodic`` variant keeps the coefficients above ``PERIODIC_Z`` standard errors (each
    coefficient's spread over the flagged and over the clean images' own profiles),
    the ``-sine`` variant only the strongest non-constant one. The profile of 20 flagged images
    still carries their content (Fashion-MNIST SIG: correlation 0.66 with the true signal); one
    significant frequency carries the signal alone (0.95). Nothing when no frequency is significant.
    ``F``, ``X``: float flagged and clean images (N, H, W, C)."""
    out = []
    zeros = np.zeros((*F.shape[1:3], 1), np.float32)
    for name, axis in (("additive-columns", 1), ("additive-rows", 2)):
        pf, px = F.mean(axis=axis), X.mean(axis=axis)  # (N, L, C): each image's profile along the other axis
        cf, cx = np.fft.rfft(pf, axis=1), np.fft.rfft(px, axis=1)  # (N, L // 2 + 1, C) per image
        coef = cf.mean(axis=0) - cx.mean(axis=0)

        def var(c):  # spread of complex coefficients over images (neighbouring points correlate: no formula)
            return (c.real.var(axis=0, ddof=1) + c.imag.var(axis=0, ddof=1)) / len(c) if len(c) > 1 else 0.0

        se = np.sqrt(var(cf) + var(cx))
        keep = np.abs(coef) >= PERIODIC_Z * np.maximum(se, 1e-6)
        if not keep[1:].any():
            continue
        power = (np.abs(coef[1:]) ** 2).sum(axis=-1)
        k = int(power.argmax()) + 1
        one = np.zeros_like(coef)
        one[k] = coef[k]
        for suffix, c in (("-periodic", np.where(keep, coef, 0)), ("-sine", one)):
            prof = np.fft.irfft(c, n=pf.shape[1], axis=0).astype(np.float32)
            dp = prof[None, :, :] if axis == 1 else prof[:, None, :]
            dp = np.ascontiguousarray(np.broadcast_to(dp, F.shape[1:]))
            freqs = [int(f) for f in np.nonzero(np.abs(c).any(axis=-1))[0]]
            out.append(Candidate("additive", name + suffix, zeros, np.zeros_like(dp), dp,
                                 {"delta_l2": round(float(np.linalg.norm(dp)), 2), "frequencies": freqs}))
    return out


def candidates(flagged: np.ndarray, clean: np.ndarray) -> list[Candidate]:
    """Every trigger model estimated from ``flagged`` and ``clean`` uint8 NHWC images."""
    if flagged.shape[1:] != clean.shape[1:]:
        raise FireError(f"flagged images {flagged.shape[1:]} and clean images {clean.shape[1:]} differ in shape")
    patches = patch_candidates(flagged, clean)
    exclude = None
    if patches:
        exclude = patches[0].mask[:, :, 0] > 0
    return patches + blend_candidates(flagged, clean, exclude) + additive_candidates(flagged, clean)


def tie_tolerance(best: float, n: int) -> float:
    """Rates within this of the best tie: ``TIE_TOL`` or two binomial standard errors of the best rate
    measured on ``n`` images, whichever is larger (a rate of 0.85 on 200 images is +-0.025)."""
    return max(TIE_TOL, 2 * float(np.sqrt(best * (1 - best) / max(n, 1))))


KIND_RANK = {"patch": 0, "stripes": 1, "blend": 2, "additive": 3}  # near-ties: the more structured first
PREFER_STRUCTURED = True  # False: near-ties go to the smallest change alone (benchmarks only)


def rank(c: Candidate) -> int:
    """Structure rank of a candidate: periodic stripes (an additive signal with significant Fourier
    coefficients along one axis) rank above a blend: 5 CIFAR-10 images carrying SIG read as a 0.27
    blend that confirmed as often (100 %) and, fitted unpaired, left 41 % ASR."""
    return KIND_RANK["stripes"] if c.kind == "additive" and "frequencies" in c.info else KIND_RANK[c.kind]


def _preference(c: Candidate):
    return (rank(c), c.change) if PREFER_STRUCTURED else (c.change,)


def reconstruct(flagged: np.ndarray, clean: np.ndarray, held: np.ndarray, predict: Predict, *,
                flagged_pred: np.ndarray | None = None, clean_excluded: np.ndarray | None = None,
                held_excluded: np.ndarray | None = None, threshold: float = CONFIRM_THRESHOLD,
                n_confirm: int = N_CONFIRM, target: int | None = None) -> Reconstruction:
    """Estimate trigger candidates from ``flagged`` and ``clean`` images and confirm them with the model.

    ``predict`` maps uint8 NHWC images to predicted classes. ``flagged_pred`` are the predictions on the
    flagged images (computed when not given); their majority is the class a trigger must reach, unless
    ``target`` names it (the attack's known target: a small or mixed batch's majority can be another class).
    ``clean``/``held`` images whose label or prediction is that class are left out of the clean
    reference and of the confirmation; ``clean_excluded``/``held_excluded`` (boolean, optional) mark
    images to leave out as well (e.g. labelled with that class). Up to ``n_confirm`` held images
    confirm each candidate.
    """
    if len(flagged) == 0:
        raise FireError("no flagged images to reconstruct a trigger from")
    fp = predict(flagged) if flagged_pred is None else np.asarray(flagged_pred)
    counts = np.bincount(fp)
    maj = int(counts.argmax()) if target is None else int(target)
    share = float(counts[maj] / len(fp)) if maj < len(counts) else 0.0
    ref = clean[~clean_excluded] if clean_excluded is not None else clean
    hold = held[~held_excluded] if held_excluded is not None else held
    hold = hold[:3 * n_confirm]  # enough to find n_confirm the model does not already put in that class
    hold = hold[predict(hold) != maj][:n_confirm] if len(hold) else hold
    ref_pred = predict(ref) if len(ref) else np.zeros(0, int)
    ref = ref[ref_pred != maj]
    if len(ref) < 2 or len(hold) == 0:
        return Reconstruction(None, [], maj, share, len(flagged), len(hold), threshold,
                              reason="too few clean images outside the flagged images' class")
    cands = candidates(flagged, ref)
    for c in cands:
        stamped = c.apply(hold)
        c.rate = float((predict(stamped) == maj).mean())
        c.change = float(np.abs(stamped.astype(np.float32) - hold.astype(np.float32)).mean())
    best = max((c.rate for c in cands), default=0.0)
    winner = None
    if cands and best >= threshold:
        near = [c for c in cands if c.rate >= best - tie_tolerance(best, len(hold))]
        winner = min(near, key=_preference)
    tried = sorted({c.kind for c in cands}, key=lambda k: KIND_RANK.get(k, 9))
    # name what was tried: a moving sticker gives no patch candidate at all, and "(best 0%)" alone did not say so
    # (new-user run 25)
    no_patch = ("; no patch was tried: the flagged images agree on no pixel the clean images lack (a trigger that "
                "moves or differs per image)" if "patch" not in tried else "")
    reason = "" if winner else (f"no trigger model moves at least {threshold:.0%} of held clean images to class {maj} "
                                f"(best {best:.0%}; tried {', '.join(tried) or 'none'}{no_patch})")
    return Reconstruction(winner, cands, maj, share, len(flagged), len(hold), threshold, reason, held=hold)
