#!/usr/bin/env python3
"""Study: gradient refinement of a flagged-input blend reconstruction (issue 6), against what ``fit`` does.

A blend reconstructed from flagged images, ``p = (mean_flagged - (1 - a) mean_clean) / a``, carries the
flagged images' own content amplified by ``(1 - a) / a``; ``fit`` therefore records a confirmed blend
but fits unpaired (``fire_onnx.fit.core.PSEUDO_PAIR_KINDS``). This study asks whether refining the
pattern by gradient descent on the PyTorch model (Neural-Cleanse style, started from the estimate)
rescues the pseudo-pairs. Per cell (a cached ``tools/bench_flagged.py`` model), from the same flagged
images, 500 clean images and held images as the benchmark:

- ``flagged``: what ``fit`` does today (blend confirmed, unpaired shrunk estimate);
- ``pairs-raw``: pseudo-pairs stamped with the reconstructed blend;
- ``pairs-refined``: the pattern refined for ``--steps`` Adam steps on: cross-entropy to the flagged class
  of held clean images stamped with it, plus (``away``) the flagged images un-blended with it,
  ``(F - a p) / (1 - a)``, pushed away from that class (a right pattern removes the trigger from them),
  plus (``stay``) an L2 pull towards the estimate;

each patched into the ONNX model and evaluated in onnxruntime on the first ``--limit`` test images.
Writes ``<out>/results.json`` (records ``{dataset, attack, n_flagged, variant, ca, asr, ra,
pattern_corr, rate}``) and ``<out>/results.md``. Example::

    python tools/refine_study.py --data-dir ../shared/data --cells cifar10:blended --out benchmarks/refine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_flagged as bf  # noqa: E402

VARIANTS = {"flagged": None, "pairs-raw": None,  # name -> (away weight, stay weight) of the refinement
            "pairs-refined": (1.0, 0.0), "pairs-refined-noaway": (0.0, 0.0), "pairs-refined-stay": (1.0, 10.0)}


def refine_blend(net, cand, held: np.ndarray, flagged: np.ndarray, cls: int, *, steps: int, away: float,
                 stay: float, lr: float = 2.0, seed: int = 0):
    import torch

    from fire_onnx.reconstruct import Candidate

    F = torch.nn.functional
    a = float(cand.mask.mean())
    p0 = torch.tensor(cand.pattern)
    p = p0.clone().requires_grad_(True)
    H, Ft = torch.from_numpy(held.astype(np.float32)), torch.from_numpy(flagged.astype(np.float32))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(H), (32,), generator=g)
        loss = F.cross_entropy(net((1 - a) * H[idx] + a * p), torch.full((32,), cls))
        if away:
            pm = torch.softmax(net(((Ft - a * p) / (1 - a)).clamp(0, 255)), 1)[:, cls]
            loss = loss - away * torch.log(1 - pm + 1e-6).mean()
        if stay:
            loss = loss + stay * ((p - p0) ** 2).mean() / 255 ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            p.clamp_(0, 255)
    return Candidate(kind="blend", name="refined", mask=cand.mask, pattern=p.detach().numpy(), delta=cand.delta,
                     info=dict(cand.info))


def run_cell(ds: str, attack: str, args) -> list[dict]:
    import torch

    from fire_onnx import directions as dirs
    from fire_onnx import invert
    from fire_onnx import reconstruct as rc
    from fire_onnx.demo import build_arch
    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.fit.pipeline import FitRequest, run_fit
    from fire_onnx.patch import patch_file

    torch.set_num_threads(args.threads)
    spec, layer = bf.ATTACKS[attack]
    dp = Path(args.data_dir) / f"{ds}.npz"
    onnx, _ = bf.train_or_reuse(bf.make_recipe(dp, "small_cnn", spec, args.epochs, 0), dp, Path(args.cache))
    train, test, pre, trig, trig_test = bf.load_cell(dp, spec, args.limit)
    c, h = train.x.shape[-1], train.x.shape[1]
    model = build_arch("small_cnn", int(train.y.max() + 1), c, h)
    model.load_state_dict(torch.load(onnx.parent / "model.pt", weights_only=True))
    net = invert.Model(model.eval(), pre)
    flag_src, pool = bf.flagged_split(train, 0)
    flagged = trig.apply(train.x[flag_src[:args.n_flagged]])
    rng = np.random.default_rng(0)
    clean_idx = rng.choice(pool, bf.N_CLEAN, replace=False)
    held_idx = np.setdiff1d(pool, clean_idx)[:600]
    r = rc.reconstruct(flagged, train.x[clean_idx], train.x[held_idx], lambda x: net.logits(x).argmax(1),
                       clean_excluded=train.y[clean_idx] == bf.TARGET, held_excluded=train.y[held_idx] == bf.TARGET)
    if r.winner is None or r.winner.kind != "blend":
        bf.log(f"{ds} {attack}: the reconstruction is {r.winner.kind if r.winner else 'none'}, not a blend: skipped")
        return []
    truth = trig._pattern(*train.x.shape[1:]) if hasattr(trig, "_pattern") else None
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean_file = tmp / "clean.npz"
        np.savez(clean_file, x_train=train.x[pool], y_train=train.y[pool])
        for variant in args.variants:
            cand, path = None, tmp / f"{variant}.npz"
            if variant == "flagged":
                np.savez(path, x=flagged)
            else:
                cand = r.winner
                if VARIANTS[variant]:
                    away, stay = VARIANTS[variant]
                    cand = refine_blend(net, r.winner, r.held, flagged, r.majority_class, steps=args.steps,
                                        away=away, stay=stay)
                originals = r.held[:max(100, args.n_flagged)]
                np.savez(path, x=cand.apply(originals), x_clean=originals)
            n = len(np.load(path)["x"])
            d = run_fit(FitRequest(layers=[layer], clean_path=str(clean_file), onnx_path=str(onnx), target=bf.TARGET,
                                   n_clean=bf.N_CLEAN, seed=0, scale=1 / 255, mean=[0.5] * c, std=[0.5] * c,
                                   triggered_path=str(path), n_triggered=n, force=True))
            dirs.save(d, tmp / "d.npz")
            patch_file(onnx, tmp / "d.npz", tmp / "m.onnx")
            m = compute_metrics(session(tmp / "m.onnx"), test, pre, trig_test, bf.TARGET)
            rec = {"dataset": ds, "attack": attack, "n_flagged": args.n_flagged, "variant": variant, "ca": m.ca,
                   "asr": m.asr, "ra": m.ra, "steps": args.steps if cand is not None and VARIANTS[variant] else 0,
                   "blend_ratio": r.winner.info.get("blend_ratio")}
            if cand is not None:
                rec["rate"] = float((net.logits(cand.apply(r.held)).argmax(1) == r.majority_class).mean())
                if truth is not None:
                    rec["pattern_corr"] = float(np.corrcoef(cand.pattern.ravel(), truth.ravel())[0, 1])
            bf.log(f"{ds} {attack} {variant}: CA {m.ca:.3f} ASR {m.asr:.3f} RA {m.ra:.3f}")
            out.append(rec)
    return out


def markdown(records: list[dict]) -> str:
    lines = ["CA / ASR / RA in % after the repair (SmallCNN, 6 epochs; pattern correlation with the true blend "
             "pattern in brackets)", "", "| dataset | attack | flagged | " + " | ".join(VARIANTS) + " |",
             "|---|---|---|" + "---|" * len(VARIANTS)]
    cells: dict = {}
    for r in records:
        cells.setdefault((r["dataset"], r["attack"], r["n_flagged"]), {})[r["variant"]] = r
    for (ds, att, n), by in cells.items():
        row = []
        for v in VARIANTS:
            r = by.get(v)
            corr = f" ({r['pattern_corr']:.2f})" if r and r.get("pattern_corr") is not None else ""
            row.append(f"{100 * r['ca']:.1f} / {100 * r['asr']:.1f} / {100 * r['ra']:.1f}{corr}" if r else "")
        lines.append(f"| {ds} | {att} | {n} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--cells", default="cifar10:blended", help="dataset:attack,...")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n-flagged", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="benchmarks/.cache/models")
    ap.add_argument("--out", default="benchmarks/refine")
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = bf.load_records(out / "results.json")
    for cell in args.cells.split(","):
        ds, attack = cell.split(":")
        records = bf.save_records(out / "results.json", run_cell(ds, attack, args),
                                  key=lambda r: (r["dataset"], r["attack"], r["n_flagged"], r["variant"]))
    (out / "results.md").write_text(markdown(records))
    print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
