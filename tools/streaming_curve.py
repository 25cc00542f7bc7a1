#!/usr/bin/env python3
"""Sample efficiency of the repair as flagged inputs arrive: ASR / RA / CA after 5, 10, 20, 50, 100.

One backdoored model (trained or reused by ``tools/bench_flagged.py``'s recipe cache, so both tools
share models), repaired from the ONNX model alone, in onnxruntime:

- ``flagged-stream``: flagged images (triggered non-target training images, no clean twin, no label)
  arrive in order; the first batch is fitted (``run_fit``, defaults: trigger reconstruction on), every
  later batch only refines the directions file (``fit --update``: the earlier images are not read
  again; each batch's trigger is reconstructed from that batch), and the deployed model's repair is
  swapped (``patch --replace``) at each step;
- ``flagged-stream-unpaired``: the same with ``--reconstruct off`` (the unpaired, shrunk shift), where
  the update is exactly a fit on the union;
- ``paired``: for reference, a fit with the trigger known (stamped clean images with their twins) at the
  same counts.

At every step the streamed directions are also compared with a fresh fit (same mode) on all flagged
images so far (``refit_max_diff``: largest absolute difference of mu, U, tau; 0 up to float noise when
the update is exact, i.e. without reconstruction; with it, one reconstruction from the union differs).

Writes ``<out>/results.json`` (records ``{dataset, model, attack, mode, n_triggered, seed, ca, asr, ra,
...}``, fractions; records of other cells already there are kept), ``<out>/results.md`` and
``<out>/<dataset>_<attack>.png``. Needs matplotlib (``pip install -e .[bench]``) for the plot. Example::

    python tools/streaming_curve.py --data-dir /work/shared/data --dataset mnist5k --attack badnets \\
        --out benchmarks/streaming
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_flagged as bf  # noqa: E402  (training, caching and the flagged-image split are shared)

COUNTS = (5, 10, 20, 50, 100)
MODES = ("flagged-stream", "flagged-stream-unpaired", "paired")
STREAMED = {"flagged-stream": "auto", "flagged-stream-unpaired": "off"}  # mode -> fit --reconstruct


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_curve(args) -> list[dict]:
    from fire_onnx import directions as dirs
    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.fit.pipeline import FitRequest, run_fit
    from fire_onnx.patch import patch_file

    spec, layer = bf.ATTACKS[args.attack]
    data_path = Path(args.data_dir) / f"{args.dataset}.npz"
    recipe = bf.make_recipe(data_path, "small_cnn", spec, args.epochs, args.seed)
    onnx_path, train_s = bf.train_or_reuse(recipe, data_path, Path(args.cache))
    train, test, pre, trig, trig_test = bf.load_cell(data_path, spec, args.limit)
    c = train.x.shape[-1]
    flag_src, pool = bf.flagged_split(train, args.seed)  # the same split as bench_flagged
    counts = sorted(int(n) for n in args.counts.split(","))
    if counts[-1] > len(flag_src):
        raise SystemExit(f"only {len(flag_src)} flagged images available, fewer than {counts[-1]}")
    base = {"dataset": args.dataset, "model": "small_cnn", "attack": args.attack, "trigger": spec, "layer": layer,
            "seed": args.seed, "epochs": args.epochs, "train_seconds": round(train_s, 1)}
    common = dict(layers=[layer], clean_path="", onnx_path=str(onnx_path), target=bf.TARGET, n_clean=bf.N_CLEAN,
                  seed=args.seed, scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, force=True)

    def evaluate(model) -> dict:
        m = compute_metrics(session(str(model)), test, pre, trig_test, bf.TARGET)
        return {"ca": m.ca, "asr": m.asr, "ra": m.ra, "n_clean_test": m.n_clean, "n_triggered_test": m.n_triggered}

    records = [dict(base, mode="original", n_triggered=0, **evaluate(onnx_path))]
    log(f"original: CA {records[0]['ca']:.3f} ASR {records[0]['asr']:.3f} RA {records[0]['ra']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean_file = tmp / "clean.npz"
        np.savez(clean_file, x_train=train.x[pool], y_train=train.y[pool])
        common["clean_path"] = str(clean_file)
        prev = {mode: (None, None) for mode in STREAMED}  # mode -> (directions, patched model)
        done = 0
        for n in counts:
            batch = tmp / f"flagged_{done}_{n}.npz"
            np.savez(batch, x=trig.apply(train.x[flag_src[done:n]]))  # no labels, no clean twins
            union = tmp / f"flagged_0_{n}.npz"
            np.savez(union, x=trig.apply(train.x[flag_src[:n]]))
            for mode, recon in STREAMED.items():
                # ------------------------------------------------ flagged, streamed: fit once, then update
                prev_dirs, prev_model = prev[mode]
                t0 = time.perf_counter()
                if prev_dirs is None:
                    d = run_fit(FitRequest(**common, triggered_path=str(batch), n_triggered=n - done,
                                           reconstruct=recon))
                else:
                    d = run_fit(FitRequest(**dict(common, layers=[]), triggered_path=str(batch), n_triggered=n - done,
                                           update_path=str(prev_dirs), reconstruct=recon))
                dpath = tmp / f"{mode}_{n}.npz"
                dirs.save(d, dpath)
                fit_s = time.perf_counter() - t0
                model = tmp / f"{mode}_{n}.fire.onnx"
                if prev_model is None:
                    patch_file(onnx_path, dpath, model)
                else:  # swap the repair in the deployed (patched) model
                    patch_file(prev_model, dpath, model, replace=True)
                # the same mode from scratch on every flagged image so far: is the update exact?
                ref = run_fit(FitRequest(**common, triggered_path=str(union), n_triggered=n, reconstruct=recon))
                t, rt = d.targets[0], ref.targets[0]
                diff = max(float(np.abs(getattr(t, a) - getattr(rt, a)).max()) for a in ("mu", "U", "tau"))
                rc = d.meta.get("reconstruction") or {}
                rec = dict(base, mode=mode, n_triggered=n, batch=n - done, updates=t.fit.get("updates", 0),
                           reference=t.fit.get("reference"), gate=t.gate, tau_rule=t.fit.get("tau_rule"),
                           separation_sigma=t.fit.get("separation_sigma", [None])[0], refit_max_diff=diff,
                           fit_seconds=round(fit_s, 2), stats_bytes=int(sum(a.nbytes for a in t.stats.values())),
                           reconstruction=rc.get("kind"), reconstruction_rate=rc.get("rate"), **evaluate(model))
                records.append(rec)
                log(f"{mode:24s} n={n:3d} (update {rec['updates']}): CA {rec['ca']:.3f} ASR {rec['asr']:.3f} "
                    f"RA {rec['ra']:.3f}  |refit diff| {diff:.2e}  {rec['reference']} {rc.get('kind', '')}")
                prev[mode] = (dpath, model)
            done = n
            # ------------------------------------------------ paired reference at the same count
            d = run_fit(FitRequest(**common, trigger_spec=spec, n_triggered=n))
            ppath = tmp / f"paired_{n}.npz"
            dirs.save(d, ppath)
            pmodel = tmp / f"paired_{n}.fire.onnx"
            patch_file(onnx_path, ppath, pmodel)
            t = d.targets[0]
            rec = dict(base, mode="paired", n_triggered=n, reference=t.fit.get("reference"), gate=t.gate,
                       separation_sigma=t.fit.get("separation_sigma", [None])[0], **evaluate(pmodel))
            records.append(rec)
            log(f"{'paired':24s} n={n:3d}: CA {rec['ca']:.3f} ASR {rec['asr']:.3f} RA {rec['ra']:.3f}")
    return records


def markdown(records: list[dict]) -> str:
    lines = ["CA / ASR / RA in % on the test split (ASR and RA over triggered non-target images), SmallCNN, 10 % "
             "poisoning, target 0, 500 clean training images; repair fitted from the ONNX model. "
             "`flagged-stream`: flagged images (no twin, no label) arrive in order, first fit then `fit --update` "
             "per batch and `patch --replace` (defaults: each batch's trigger reconstructed from it); "
             "`flagged-stream-unpaired`: the same with `--reconstruct off`; `paired`: trigger known, fitted from "
             "scratch at the same count. `diff`: largest |difference| of mu, U, tau between the streamed "
             "directions and a fresh fit in the same mode on all flagged images so far.", ""]
    cells: dict = {}
    for r in records:
        cells.setdefault((r["model"], r["dataset"], r["attack"], r["seed"]), []).append(r)
    for (model, ds, att, seed), recs in cells.items():
        orig = next((r for r in recs if r["mode"] == "original"), None)
        lines += [f"### {model} / {ds} / {att} / seed {seed}", ""]
        if orig:
            lines += [f"Original model: CA {100 * orig['ca']:.1f}, ASR {100 * orig['asr']:.1f}, "
                      f"RA {100 * orig['ra']:.1f}.", ""]
        lines += [f"![streaming curve]({ds}_{att}.png)", "",
                  "| flagged / triggered images | flagged-stream | diff | flagged-stream-unpaired | diff | paired |",
                  "|---|---|---|---|---|---|"]
        by = {(r["mode"], r["n_triggered"]): r for r in recs}
        for n in sorted({r["n_triggered"] for r in recs if r["mode"] != "original"}):
            row = [str(n)]
            for mode in MODES:
                r = by.get((mode, n))
                row.append("" if r is None else f"{100 * r['ca']:.1f} / {100 * r['asr']:.1f} / {100 * r['ra']:.1f}")
                if mode in STREAMED:
                    row.append("" if r is None else f"{r['refit_max_diff']:.1e}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed (pip install -e .[bench]): no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.2), dpi=120)
    styles = {"flagged-stream": ("tab:red", "flagged, streamed (--update)"),
              "flagged-stream-unpaired": ("tab:orange", "flagged, streamed, --reconstruct off"),
              "paired": ("tab:blue", "paired (trigger known)")}
    from plots import draw_curves

    draw_curves(ax, records, styles, xlabel="flagged (triggered) images seen", title=title, title_size=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with <dataset>.npz")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--attack", default="badnets", choices=sorted(bf.ATTACKS))
    ap.add_argument("--out", default="benchmarks/streaming")
    ap.add_argument("--cache", default="benchmarks/.cache/models", help="trained models (shared with bench_flagged)")
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot of this cell from results.json")
    args = ap.parse_args(argv)
    from fire_onnx import __version__
    from fire_onnx.fileio import write_text_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"SmallCNN {args.dataset} {args.attack}: repair vs flagged images seen"
    if args.plot_only:
        recs = [r for r in json.loads((out / "results.json").read_text())
                if (r["dataset"], r["attack"], r["seed"]) == (args.dataset, args.attack, args.seed)]
        plot(recs, out / f"{args.dataset}_{args.attack}.png", title)
        return 0
    t0 = time.perf_counter()
    new = run_curve(args)
    # every record of this cell is replaced (the counts may differ from the earlier run's)
    records = bf.save_records(out / "results.json", new, lambda r: (r["dataset"], r["attack"], r["seed"]))
    plot(new, out / f"{args.dataset}_{args.attack}.png", title)
    md = markdown(records)
    write_text_atomic(out / "results.md", md + f"\nfire-onnx {__version__}, python {platform.python_version()}; last run "
                      f"{round(time.perf_counter() - t0)} s (training included unless cached).\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
