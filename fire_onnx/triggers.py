"""Backdoor triggers applied in pixel space to uint8 NHWC images (pure numpy).

Used by ``fit --trigger``, ``eval --trigger`` and the demo, so the trigger a direction was fitted with
is exactly the one it is evaluated with. A trigger is written as a spec string::

    badnets                         3x3 white patch in the bottom-right corner, 1 px margin
    badnets:size=4,pos=tl,value=255,pattern=checker,margin=0
    badnets:pos=random,seed=0       the patch at a seeded random place in each image (a sticker that lands
                                    anywhere), at least ``margin`` px from the border
    blended                         seeded uniform-noise pattern blended with alpha 0.2
    blended:alpha=0.1,seed=3        or  blended:pattern=hello.npy,alpha=0.2  (uint8 HxW[xC] array)
    sig:delta=20,freq=6             sinusoidal horizontal signal (Barni et al., 2019)
    wanet:k=4,s=0.5,seed=0          smooth warp (Nguyen & Tran, 2021): a seeded k x k field of random
                                    displacements, upsampled to the image and scaled by s (BackdoorBench's
                                    s = 0.5 moves pixels by at most ~0.25 px; larger s is easier to learn)
    wanet:grid=warp.npy             the warp your own attack used: a (2, H, W) displacement field in pixels,
                                    or the (H, W, 2) grid_sample grid WaNet's code builds (WaNet.flow)
    inputaware:seed=0,density=0.06  sample-specific pattern (a simplified input-aware attack, Nguyen & Tran,
                                    2020): the pixels of a seeded mask (blobs covering ``density`` of the
                                    image) take a pattern that a fixed, seeded two-layer convolution
                                    computes from the image itself, so every image carries its own trigger

Only the test-time trigger lives here; how a model is poisoned with it (WaNet's noise mode, Adap-Blend's
partial pieces, cross samples) is a training recipe in ``tools/attacks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fire_onnx.errors import FireError

POSITIONS = ("br", "bl", "tr", "tl", "center", "random")


def _as_nhwc(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim != 4:
        raise FireError(f"triggers apply to uint8 NHWC images, got {x.dtype} with shape {x.shape}")
    return x


@dataclass(frozen=True)
class BadNets:
    size: int = 3
    pos: str = "br"
    value: int = 255
    pattern: str = "solid"  # or "checker"
    margin: int = 1
    seed: int = 0  # pos=random: the seed of the places (new-user run 25: a sticker anywhere could not be written)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = _as_nhwc(x).copy()
        n, h, w, c = x.shape
        s, m = self.size, self.margin
        if s + 2 * m > min(h, w) if self.pos == "random" else s + m > min(h, w):
            raise FireError(f"badnets patch of size {s} with margin {m} does not fit {h}x{w} images")
        patch = np.full((s, s), self.value, dtype=np.uint8)
        if self.pattern == "checker":
            ii, jj = np.indices((s, s))
            patch = np.where((ii + jj) % 2 == 0, self.value, 255 - self.value).astype(np.uint8)
        if self.pos == "random":  # one seeded place per image, the same for the same images in the same order
            rng = np.random.default_rng(self.seed)
            r0s, c0s = rng.integers(m, h - m - s + 1, n), rng.integers(m, w - m - s + 1, n)
            for i, (r0, c0) in enumerate(zip(r0s, c0s)):
                x[i, r0 : r0 + s, c0 : c0 + s, :] = patch[:, :, None]
            return x
        rows = {"t": m, "b": h - m - s, "c": (h - s) // 2}
        cols = {"l": m, "r": w - m - s, "c": (w - s) // 2}
        key = "cc" if self.pos == "center" else self.pos
        r0, c0 = rows[key[0]], cols[key[1]]
        x[:, r0 : r0 + s, c0 : c0 + s, :] = patch[None, :, :, None]
        return x


def _load_npy(p: Path, what: str) -> np.ndarray:
    """A plain .npy array (never unpickled) a trigger spec names."""
    if not p.is_file():
        raise FireError(f"{what} file not found: {p}")
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as e:
        raise FireError(f"{what} {p} is not a plain .npy array ({e})") from None


@dataclass(frozen=True)
class Blended:
    alpha: float = 0.2
    seed: int = 0
    pattern: str = ""  # path to a .npy uint8 image; empty: seeded uniform noise

    def _pattern(self, h: int, w: int, c: int) -> np.ndarray:
        if not self.pattern:
            return np.random.default_rng(self.seed).integers(0, 256, size=(h, w, c)).astype(np.float32)
        p = Path(self.pattern)
        pat = _load_npy(p, "blended pattern")
        if pat.ndim == 2:
            pat = pat[:, :, None]
        if pat.shape[:2] != (h, w):
            raise FireError(f"blended pattern {p} is {pat.shape[0]}x{pat.shape[1]}, images are {h}x{w}")
        if pat.shape[2] != c:
            pat = np.broadcast_to(pat.mean(axis=2, keepdims=True), (h, w, c))
        return pat.astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = _as_nhwc(x)
        pat = self._pattern(*x.shape[1:])
        out = (1 - self.alpha) * x.astype(np.float32) + self.alpha * pat[None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SIG:
    delta: float = 20.0
    freq: float = 6.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = _as_nhwc(x)
        w = x.shape[2]
        sig = self.delta * np.sin(2 * np.pi * np.arange(w) * self.freq / w)
        out = x.astype(np.float32) + sig[None, None, :, None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _upsample(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a (2, k, k) field to (2, h, w), corners aligned."""
    k0, k1 = a.shape[1:]
    ys, xs = np.linspace(0, k0 - 1, h), np.linspace(0, k1 - 1, w)
    y0, x0 = np.minimum(ys.astype(int), k0 - 2), np.minimum(xs.astype(int), k1 - 2)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g = lambda yi, xi: a[:, yi[:, None], xi[None, :]]  # noqa: E731
    return ((1 - fy) * (1 - fx) * g(y0, x0) + (1 - fy) * fx * g(y0, x0 + 1)
            + fy * (1 - fx) * g(y0 + 1, x0) + fy * fx * g(y0 + 1, x0 + 1))


@dataclass(frozen=True)
class WaNet:
    k: int = 4
    s: float = 0.5
    seed: int = 0
    grid: str = ""  # path to a .npy warp of your own model's attack (see flow); empty: seeded from k, s, seed

    def flow(self, h: int, w: int) -> np.ndarray:
        """The displacement field in pixels, (2, h, w): rows then columns.

        From ``grid`` when given: a ``(2, H, W)`` array of displacements in pixels (rows, columns), or the
        ``(H, W, 2)`` / ``(1, H, W, 2)`` sampling grid WaNet's own code feeds ``grid_sample`` (normalized
        coordinates in [-1, 1], x then y, ``align_corners=True``: ``clamp(identity_grid + s * noise_grid /
        H, -1, 1)``)."""
        if self.grid:
            return _grid_flow(self.grid, h, w)
        noise = np.random.default_rng(self.seed).uniform(-1, 1, size=(2, self.k, self.k))
        noise /= np.abs(noise).mean()
        # grid_sample coordinates span [-1, 1]; a displacement of s * noise / h there is s * noise / 2 px
        return _upsample(noise, h, w) * self.s / 2

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = _as_nhwc(x)
        return warp(x, self.flow(*x.shape[1:3]))


def _grid_flow(path: str, h: int, w: int) -> np.ndarray:
    p = Path(path)
    g = np.asarray(_load_npy(p, "wanet grid"), dtype=np.float64)
    if g.ndim == 4 and g.shape[0] == 1:
        g = g[0]
    if g.shape == (2, h, w):
        return g
    if g.shape == (h, w, 2):  # grid_sample's normalized sampling grid, x then y, corners aligned
        if np.abs(g).max() > 1 + 1e-6:
            raise FireError(f"wanet grid {p} is (H, W, 2) but not in grid_sample's [-1, 1] coordinates")
        rows = (g[..., 1] + 1) / 2 * (h - 1) - np.arange(h)[:, None]
        cols = (g[..., 0] + 1) / 2 * (w - 1) - np.arange(w)[None, :]
        return np.stack([rows, cols])
    raise FireError(f"wanet grid {p} has shape {g.shape}; images are {h}x{w}: give a (2, {h}, {w}) displacement "
                    f"field in pixels or a ({h}, {w}, 2) grid_sample grid")


def warp(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``x`` (uint8 NHWC) resampled bilinearly at each pixel plus its displacement ``d`` in pixels:
    (2, H, W) for all images, or (N, 2, H, W) per image (WaNet's noise mode)."""
    x = _as_nhwc(x)
    n, h, w, c = x.shape
    d = np.broadcast_to(d, (n, 2, h, w)) if d.ndim == 4 else np.broadcast_to(d[None], (n, 2, h, w))
    rr = np.clip(np.arange(h)[None, :, None] + d[:, 0], 0, h - 1)
    cc = np.clip(np.arange(w)[None, None, :] + d[:, 1], 0, w - 1)
    r0, c0 = np.floor(rr).astype(int), np.floor(cc).astype(int)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (rr - r0)[..., None], (cc - c0)[..., None]
    i = np.arange(n)[:, None, None]
    xf = x.astype(np.float32)
    out = ((1 - fr) * (1 - fc) * xf[i, r0, c0] + (1 - fr) * fc * xf[i, r0, c1]
           + fr * (1 - fc) * xf[i, r1, c0] + fr * fc * xf[i, r1, c1])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _conv3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Same-padded 3x3 convolution of (N, H, W, Cin) floats with (3, 3, Cin, Cout) weights."""
    n, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros((n, h, wd, w.shape[3]), np.float32)
    for dy in range(3):
        for dx in range(3):
            out += xp[:, dy:dy + h, dx:dx + wd] @ w[dy, dx]
    return out


@dataclass(frozen=True)
class InputAware:
    """A sample-specific trigger: ``x' = (1 - m) x + m g(x)``. ``g`` is a fixed two-layer convolution
    (3x3, 8 hidden channels, tanh) with seeded random weights, squashed to high-contrast pixel values, so
    the pattern follows each image's own edges; ``m`` is a seeded mask of smooth random blobs covering
    ``density`` of the pixels. The original attack trains the generator and a per-image mask with the
    model; here both are fixed (the mask's location does not depend on the image), which keeps the
    trigger reproducible from its spec alone."""

    seed: int = 0
    density: float = 0.06

    def mask(self, h: int, w: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed + 7)
        field = _upsample(rng.normal(size=(2, 6, 6)), h, w)[0]
        return (field >= np.quantile(field, 1 - self.density)).astype(np.float32)[:, :, None]

    def pattern(self, x: np.ndarray) -> np.ndarray:
        c = x.shape[3]
        rng = np.random.default_rng(self.seed)
        w1 = rng.normal(size=(3, 3, c, 8)).astype(np.float32) / np.sqrt(9 * c)
        w2 = rng.normal(size=(3, 3, 8, c)).astype(np.float32) / np.sqrt(9 * 8)
        z = (x.astype(np.float32) - 127.5) / 64
        hdn = np.tanh(_conv3x3(z, w1) * 2)
        out = _conv3x3(hdn, w2)
        out = out / (out.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
        return 255 / (1 + np.exp(-3 * out))

    def apply(self, x: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
        """Stamp each image with its own pattern, or with the pattern of ``source`` (same shape: the
        attack's cross samples, which keep their label)."""
        x = _as_nhwc(x)
        m = self.mask(*x.shape[1:3])
        p = self.pattern(x if source is None else _as_nhwc(source))
        out = (1 - m) * x.astype(np.float32) + m * p
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


KINDS = {"badnets": BadNets, "blended": Blended, "sig": SIG, "wanet": WaNet, "inputaware": InputAware}


def parse(spec: str):
    """Parse a trigger spec string (see module docstring) into a trigger object."""
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise FireError(f"unknown trigger {kind!r} in {spec!r}; known: {', '.join(KINDS)}")
    cls = KINDS[kind]
    fields = cls.__dataclass_fields__
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or key not in fields:
            raise FireError(f"bad trigger option {item!r} for {kind}; options: {', '.join(fields)}")
        typ = type(fields[key].default)
        try:
            kwargs[key] = typ(val)
        except ValueError:
            raise FireError(f"trigger option {key}={val!r} must be {typ.__name__}") from None
    trig = cls(**kwargs)
    if isinstance(trig, BadNets):
        if trig.pos not in POSITIONS:
            raise FireError(f"badnets pos must be one of {', '.join(POSITIONS)}")
        if (trig.pattern not in ("solid", "checker") or not 0 <= trig.value <= 255 or trig.size < 1
                or trig.margin < 0):  # margin=-1 broke numpy's broadcast with a traceback (new-user run 27)
            raise FireError("badnets needs size >= 1, margin >= 0, value in 0..255, pattern solid|checker")
    if isinstance(trig, WaNet) and not trig.grid and not (2 <= trig.k <= 64 and 0 < trig.s <= 16):
        raise FireError("wanet needs k in 2..64 and s in (0, 16]")
    if isinstance(trig, InputAware) and not 0 < trig.density <= 0.5:
        raise FireError("inputaware density must be in (0, 0.5]")
    if isinstance(trig, Blended) and not 0 < trig.alpha <= 1:
        raise FireError("blended alpha must be in (0, 1]")
    return trig


FILE_FIELDS = ("pattern", "grid")  # trigger fields that name a file: described by its content too


def describe(trig) -> dict:
    """The trigger as a JSON-able dict (recorded by ``fit``, compared by ``eval``). A field naming a file
    also gets ``<field>_sha256`` (the file's content), so the same pattern under another name is the same
    trigger."""
    import hashlib

    out = {"kind": type(trig).__name__.lower(), **trig.__dict__}
    if isinstance(trig, BadNets) and trig.pos != "random":
        del out["seed"]  # places only a random patch: records made before it existed stay the same trigger
    for f in FILE_FIELDS:
        if out.get(f):
            try:
                out[f"{f}_sha256"] = hashlib.sha256(Path(out[f]).read_bytes()).hexdigest()[:16]
            except OSError:
                pass
    return out


def same_trigger(recorded: dict, given: dict) -> bool:
    """Whether two :func:`describe` dicts are the same trigger: file fields count by content where both
    sides have it (an older record without it, by name)."""
    def norm(d: dict, other: dict) -> dict:
        d = dict(d)
        for f in FILE_FIELDS:
            if d.get(f"{f}_sha256") and other.get(f"{f}_sha256"):
                d.pop(f, None)
            elif f"{f}_sha256" in d and f"{f}_sha256" not in other:
                d.pop(f"{f}_sha256")
        return d

    return norm(recorded, given) == norm(given, recorded)
