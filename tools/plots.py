#!/usr/bin/env python3
"""Plots of the comparison matrix (``tools/bench.py``): score histograms, CA/ASR bars, sample efficiency.

Three kinds of PNG, written under ``--out`` (the matrix's results folder by default):

- ``hist_<dataset>_<attack>.png``, per cell: the score ``<h - mu, u>`` along the fitted direction ``u``
  (the first row of ``U``) of clean test images and of triggered non-target test images, before repair
  (``h``: the activation the repair reads) and after (``h'``: the repaired activation the rest of the
  model reads), both read in onnxruntime from the patched model; one row per FIRE sample mode (paired,
  flagged), fitted exactly as ``tools/bench.py`` fits them (its ``fit_and_patch``), with the gate
  threshold ``tau`` drawn;
- ``bars.png``: CA and ASR (RA as a marker) of every method in every cell of ``<matrix>/results.json``;
- ``efficiency_<dataset>_<attack>.png``: ASR, RA and CA vs the number of triggered samples (5, 10, 20,
  50, 100 by default), FIRE paired and flagged, each count a fresh fit as ``tools/bench.py`` does at 20
  (``tools/streaming_curve.py`` draws the streamed ``fit --update`` variant of this curve).

The backdoored models are read from the recipe cache of ``tools/bench_flagged.py`` (``--cache``, read
only); a cell whose model is not cached is skipped with a message (this tool never trains). The numbers
the plots show are written to ``<out>/plots.json`` (per cell: score summaries, the ASR the patched model
gives on the histogram's images beside results.json's; the efficiency records). Needs matplotlib
(``pip install -e .[bench]``). Example::

    python tools/plots.py --data-dir ../shared/data --matrix benchmarks/matrix \\
        --cache benchmarks/.cache/models --out benchmarks/matrix/plots
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the matrix's fit: tools/bench.py fit_and_patch)
import bench_flagged as bf  # noqa: E402  (recipes, model cache, cells, flagged split and attacks)

HIST_CELLS = "mnist5k:badnets,cifar10:badnets,cifar10:blended,gtsrb32:blended"
CURVE_CELLS = "cifar10:badnets,cifar10:blended,gtsrb32:blended"
COUNTS = (5, 10, 20, 50, 100)
DPI = 80
LABEL = {("original", None): "original", ("fire", "paired"): "FIRE paired", ("fire", "flagged"): "FIRE flagged",
         ("shrinkpad", None): "ShrinkPad", ("strip", None): "STRIP"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or a message saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("matplotlib is not installed: pip install -e .[bench]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- scores along the direction
def direction_scores(patched: Path, directions, x: np.ndarray, batch_size: int = 256) -> dict:
    """Scores along the first direction of the first target of ``directions``, for preprocessed inputs
    ``x``, read from the patched model in onnxruntime: ``before`` from the activation the repair reads,
    ``after`` from the repaired activation the model goes on with; plus ``logits`` of the patched model
    and the target's ``tau``, ``alpha`` and ``gate``."""
    import onnx

    from fire_onnx.patch import read_patched_targets
    from fire_onnx.probe import TensorReader

    model = onnx.load(str(patched))
    recorded, why = read_patched_targets(model)
    if not recorded:
        raise SystemExit(f"{patched} carries no fire-onnx repair ({why or 'no fire_onnx.targets metadata'})")
    t, rec = directions.targets[0], recorded[0]
    if t.layout == "token":
        raise SystemExit("token-layout targets have one score per token; plot a flat or vector target")
    reader = TensorReader(model, [rec["tensor"], rec["output"]], with_logits=True, batch_size=batch_size)
    acts, logits = reader(x)
    u, mu = t.U[0].astype(np.float64), t.mu.astype(np.float64)

    def score(a: np.ndarray) -> np.ndarray:
        return (a.reshape(len(a), -1).astype(np.float64) - mu) @ u

    return {"before": score(acts[rec["tensor"]]), "after": score(acts[rec["output"]]), "logits": logits,
            "tau": float(t.tau[0]), "alpha": float(t.alpha[0]), "gate": t.gate, "tensor": rec["tensor"]}


def summarize(s_clean: dict, s_trig: dict) -> dict:
    """What the histogram shows, as numbers: where the gate fires (before repair) and the medians before
    and after repair."""
    tau = s_clean["tau"]
    out = {"tau": tau, "alpha": s_clean["alpha"], "gate": s_clean["gate"], "tensor": s_clean["tensor"]}
    for name, s in (("clean", s_clean), ("triggered", s_trig)):
        out[f"{name}_gated"] = float((s["before"] > tau).mean()) if s["gate"] == "hard" else 1.0
        for when in ("before", "after"):
            out[f"{name}_{when}_median"] = float(np.median(s[when]))
    # how far the triggered bulk sits from the clean tail: (median triggered - median clean) / clean spread
    q = np.percentile(s_clean["before"], [25, 75])
    out["separation_iqr"] = float((out["triggered_before_median"] - out["clean_before_median"]) / max(q[1] - q[0], 1e-12))
    return out


def plot_histograms(rows: list[tuple[str, dict, dict]], path: Path, title: str) -> None:
    """One row per (label, clean scores, triggered scores) as returned by :func:`direction_scores`:
    before repair on the left, after on the right (log counts: the repaired scores pile up at
    (1 - alpha) s), the gate threshold as a dashed line."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 2.6 * len(rows) + 0.5), dpi=DPI, squeeze=False)
    for (label, sc, st), ax_row in zip(rows, axes):
        s = summarize(sc, st)
        both = np.concatenate([sc["before"], st["before"], sc["after"], st["after"]])
        lo, hi = np.percentile(both, [0.1, 99.9])
        pad = 0.05 * (hi - lo + 1e-9)
        bins = np.linspace(lo - pad, hi + pad, 61)
        for ax, when in zip(ax_row, ("before", "after")):
            for sv, color, name in ((sc, "tab:blue", "clean"), (st, "tab:red", "triggered")):
                v = np.clip(sv[when], bins[0], bins[-1])
                ax.hist(v, bins=bins, color=color, alpha=0.55, label=f"{name} (n={len(v)})")
            if sc["gate"] == "hard":
                ax.axvline(sc["tau"], color="k", ls="--", lw=1, label=f"gate τ = {sc['tau']:.3g}")
            ax.set_xlabel("score ⟨h − μ, u⟩", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        ax_row[0].set_title(f"{label}, before repair: gate fires on {100 * s['triggered_gated']:.1f} % triggered, "
                            f"{100 * s['clean_gated']:.1f} % clean", fontsize=8.5)
        med = {k: round(v, 2) + 0.0 for k, v in s.items() if k.endswith("_median")}  # + 0.0: no "-0.00"
        ax_row[1].set_title(f"after repair: median triggered {med['triggered_before_median']:.2f} → "
                            f"{med['triggered_after_median']:.2f}, clean {med['clean_before_median']:.2f} → "
                            f"{med['clean_after_median']:.2f}", fontsize=8.5)
        ax_row[1].set_yscale("log")
        ax_row[0].set_ylabel("images", fontsize=8)
        ax_row[1].set_ylabel("images (log)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig, path: Path) -> None:
    """Write the figure atomically (a reader never sees half a PNG) and close it."""
    from fire_onnx.fileio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)


# ----------------------------------------------------------------------------- cells
def cached_model(data_path: Path, attack: str, args) -> tuple[Path | None, str]:
    """(cached ONNX model of the cell's recipe, or None, the recipe key); this tool never trains."""
    spec, _ = bf.ATTACKS[attack]
    key = bf.recipe_key(bf.make_recipe(data_path, "small_cnn", spec, args.epochs, args.seed))
    path = Path(args.cache) / key / "model.onnx"
    return (path if path.is_file() else None), key


def open_cell(dataset: str, attack: str, args):
    """Everything a cell's fits need, or None (with a message) when its model is not cached."""
    if attack not in bf.ATTACKS:
        log(f"{dataset} {attack}: skipped (no such attack in tools/bench_flagged.py ATTACKS)")
        return None
    data_path = Path(args.data_dir) / f"{dataset}.npz"
    if not data_path.is_file():
        log(f"{dataset} {attack}: skipped (no {data_path})")
        return None
    onnx_path, key = cached_model(data_path, attack, args)
    if onnx_path is None:
        log(f"{dataset} {attack}: skipped (model {key} is not in {args.cache}; train it with tools/bench.py)")
        return None
    spec, layer = bf.ATTACKS[attack]
    train, test, pre, trig, trig_test = bf.load_cell(data_path, spec, args.limit)
    flag_src, pool = bf.flagged_split(train, args.seed)
    return dict(seed=args.seed, onnx=onnx_path, spec=spec, layer=layer, train=train, test=test, pre=pre, trig=trig,
                trig_test=trig_test, flag_src=flag_src, pool=pool, c=train.x.shape[-1])


def fit(cell: dict, mode: str, n: int, tmp: Path) -> tuple[Path, object]:
    """(patched model, directions) for FIRE in ``mode`` from ``n`` triggered samples, as the matrix fits."""
    from fire_onnx import directions as dirs

    clean_file = tmp / "clean.npz"
    if not clean_file.is_file():
        np.savez(clean_file, x_train=cell["train"].x[cell["pool"]], y_train=cell["train"].y[cell["pool"]])
    sub = tmp / f"{mode}-{n}"
    sub.mkdir(exist_ok=True)
    model, _ = bench.fit_and_patch(mode, cell["onnx"], cell["layer"], cell["spec"], cell["trig"], cell["train"],
                                   cell["flag_src"], clean_file, cell["c"], cell["seed"], sub, n_triggered=n)
    return model, dirs.load(sub / f"{mode}.npz")


def histogram_cell(dataset: str, attack: str, args, matrix: list[dict]) -> dict | None:
    cell = open_cell(dataset, attack, args)
    if cell is None:
        return None
    test, trig_test, pre = cell["test"], cell["trig_test"], cell["pre"]
    keep = trig_test.y != bf.TARGET  # triggered non-target images: the ones ASR counts
    x_clean, x_trig = pre(test.x), pre(trig_test.x[keep])
    rows, summary = [], {"dataset": dataset, "attack": attack, "seed": args.seed, "layer": cell["layer"],
                         "n_clean": int(len(x_clean)), "n_triggered": int(len(x_trig)), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            log(f"{dataset} {attack} {mode}: fitting at {cell['layer']} from {bench.N_TRIGGERED} samples")
            model, d = fit(cell, mode, bench.N_TRIGGERED, Path(tmp))
            sc, st = direction_scores(model, d, x_clean), direction_scores(model, d, x_trig)
            s = summarize(sc, st)
            s["asr_patched"] = float((st["logits"].argmax(1) == bf.TARGET).mean())
            s["ca_patched"] = float((sc["logits"].argmax(1) == test.y).mean())
            ref = next((r for r in matrix if (r["dataset"], r["attack"], r["seed"], r["method"], r.get("mode"))
                        == (dataset, attack, args.seed, "fire", mode) and "asr" in r), None)
            s["asr_results_json"] = None if ref is None else ref["asr"]
            summary["modes"][mode] = s
            t = d.targets[0]
            s.update(tau_rule=t.fit.get("tau_rule"), fit_gate_fires_clean=t.fit.get("gate_fires_clean"),
                     fit_separation_sigma=t.fit.get("separation_sigma", [None])[0])
            log(f"  tau {s['tau']:.3g} ({s['tau_rule']}); gate fires on {100 * s['triggered_gated']:.1f} % triggered, "
                f"{100 * s['clean_gated']:.2f} % clean; median triggered {s['triggered_before_median']:.3g} -> "
                f"{s['triggered_after_median']:.3g}; "
                f"ASR {100 * s['asr_patched']:.1f} % (results.json: {'-' if ref is None else round(100 * ref['asr'], 1)} %)")
            rows.append((f"FIRE {mode}", sc, st))
    name = f"hist_{dataset}_{attack}.png"
    plot_histograms(rows, Path(args.out) / name,
                    f"SmallCNN {dataset} {attack}: score along the fitted direction at {cell['layer']} "
                    f"({bench.N_TRIGGERED} triggered samples)")
    summary["png"] = name
    return summary


def efficiency_cell(dataset: str, attack: str, args) -> list[dict]:
    from fire_onnx.evaluate import compute_metrics, session

    cell = open_cell(dataset, attack, args)
    if cell is None:
        return []
    base = {"dataset": dataset, "attack": attack, "seed": args.seed, "layer": cell["layer"], "limit": args.limit}
    m = compute_metrics(session(cell["onnx"], threads=2), cell["test"], cell["pre"], cell["trig_test"], bf.TARGET)
    recs = [dict(base, mode="original", n_triggered=0, ca=m.ca, asr=m.asr, ra=m.ra, asr_floor=m.asr_floor)]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            if n > len(cell["flag_src"]):
                log(f"{dataset} {attack}: only {len(cell['flag_src'])} flagged images, not {n}: stopping there")
                break
            for mode in args.modes:
                model, d = fit(cell, mode, n, Path(tmp))
                m = compute_metrics(session(model, threads=2), cell["test"], cell["pre"], cell["trig_test"], bf.TARGET)
                recs.append(dict(base, mode=mode, n_triggered=n, ca=m.ca, asr=m.asr, ra=m.ra,
                                 tau=float(d.targets[0].tau[0]),
                                 separation_sigma=d.targets[0].fit.get("separation_sigma", [None])[0]))
                log(f"{dataset} {attack} {mode} n={n}: CA {m.ca:.3f} ASR {m.asr:.3f} RA {m.ra:.3f}")
    plot_efficiency(recs, Path(args.out) / f"efficiency_{dataset}_{attack}.png",
                    f"SmallCNN {dataset} {attack}: repair vs triggered samples (fresh fit per count)")
    return recs


def draw_curves(ax, recs: list[dict], styles: dict, *, xlabel: str, title: str, title_size: int = 9,
                floor: bool = False) -> None:
    """ASR (solid), RA (dashed) and CA (dotted) in % against the number of triggered samples, one colour
    per mode (``styles``: mode -> (colour, label)), the original model's CA (and, with ``floor``, its ASR
    floor) as gray lines, on a log axis ticked at the sample counts. Shared with tools/streaming_curve.py."""
    for mode, (color, label) in styles.items():
        rs = sorted((r for r in recs if r["mode"] == mode), key=lambda r: r["n_triggered"])
        if not rs:
            continue
        n = [r["n_triggered"] for r in rs]
        ax.plot(n, [100 * r["asr"] for r in rs], "o-", color=color, label=f"ASR, {label}")
        ax.plot(n, [100 * r["ra"] for r in rs], "s--", color=color, alpha=0.7, label=f"RA, {label}")
        ax.plot(n, [100 * r["ca"] for r in rs], ":", color=color, alpha=0.6, label=f"CA, {label}")
    orig = next((r for r in recs if r["mode"] == "original"), None)
    if orig:
        ax.axhline(100 * orig["ca"], color="gray", lw=0.8, ls="-.", label="CA, original")
        if floor and orig.get("asr_floor") is not None:
            ax.axhline(100 * orig["asr_floor"], color="gray", lw=0.8, ls=":", label="ASR floor (original)")
    ticks = sorted({r["n_triggered"] for r in recs if r["mode"] != "original"})
    ax.set_xscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))


def plot_efficiency(recs: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=DPI)
    styles = {"paired": ("tab:blue", "paired (trigger known)"), "flagged": ("tab:red", "flagged (no twins, no labels)")}
    draw_curves(ax, recs, styles, xlabel="triggered samples the fit sees", title=title, floor=True)
    fig.tight_layout()
    save_png(fig, path)


# ----------------------------------------------------------------------------- bars from results.json
def plot_bars(records: list[dict], path: Path) -> int:
    """CA and ASR bars (RA as a black marker) per method, one panel per cell of ``records``; returns the
    number of cells drawn."""
    plt = pyplot()
    cells: dict = {}
    for r in records:
        if "error" not in r and r.get("ca") is not None:
            cells.setdefault((r["dataset"], r["attack"]), {})[(r["method"], r.get("mode"))] = r
    if not cells:
        raise SystemExit("results.json holds no measured cell to draw")
    datasets = list(dict.fromkeys(k[0] for k in cells))
    attacks = list(dict.fromkeys(k[1] for k in cells))
    methods = [m for m in LABEL if any(m in by for by in cells.values())]
    methods += sorted({m for by in cells.values() for m in by} - set(methods), key=str)  # methods added later
    fig, axes = plt.subplots(len(datasets), len(attacks), figsize=(2.6 * len(attacks) + 0.6, 2.3 * len(datasets) + 0.8),
                             dpi=DPI, squeeze=False, sharey=True)
    x = np.arange(len(methods))
    for i, ds in enumerate(datasets):
        for j, att in enumerate(attacks):
            ax = axes[i][j]
            by = cells.get((ds, att))
            if by is None:
                ax.set_axis_off()
                continue
            get = lambda m, k: 100 * by[m][k] if m in by and by[m].get(k) is not None else np.nan  # noqa: E731
            ax.bar(x - 0.2, [get(m, "ca") for m in methods], 0.4, color="tab:blue", label="CA")
            ax.bar(x + 0.2, [get(m, "asr") for m in methods], 0.4, color="tab:red", label="ASR")
            ax.plot(x, [get(m, "ra") for m in methods], "kd", ms=3.5, label="RA")
            ax.set_title(f"{ds} {att}", fontsize=8)
            ax.set_ylim(0, 102)
            ax.set_xticks(x)
            ax.set_xticklabels([LABEL.get(m, f"{m[0]} {m[1] or ''}".strip()) for m in methods], rotation=55,
                               ha="right", fontsize=6.5)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
        axes[i][0].set_ylabel("%", fontsize=8)
    h, lab = next(ax for row in axes for ax in row if ax.axison).get_legend_handles_labels()
    fig.legend(h, lab, loc="upper right", ncol=3, fontsize=8)
    lim = sorted({r.get("limit") or 0 for r in records})
    fig.suptitle(f"Matrix: CA / ASR (bars) and RA (marker) per method, SmallCNN, "
                 f"{'full test split' if lim == [0] else f'first {lim[0]} test images'}", fontsize=10, x=0.4)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    save_png(fig, path)
    return len(cells)


# ----------------------------------------------------------------------------- main
def parse_cells(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, text.split(",")):
        if ":" not in item:
            raise SystemExit(f"a cell is dataset:attack, got {item!r}")
        ds, att = item.split(":", 1)
        out.append((ds, att))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with <dataset>.npz")
    ap.add_argument("--matrix", default="benchmarks/matrix", help="the matrix's results folder (results.json)")
    ap.add_argument("--cache", default="benchmarks/.cache/models", help="trained models by recipe hash (read only)")
    ap.add_argument("--out", default=None, help="where the PNGs and plots.json go (default: <matrix>/plots)")
    ap.add_argument("--hist", default=HIST_CELLS, help="cells (dataset:attack,...) to draw score histograms for; "
                    "'all': every cell of results.json; '': none")
    ap.add_argument("--curve", default=CURVE_CELLS, help="cells for the sample-efficiency curve ('' : none)")
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)), help="triggered-sample counts of the curve")
    ap.add_argument("--modes", default="paired,flagged", help="FIRE sample modes: paired, flagged")
    ap.add_argument("--no-bars", action="store_true", help="skip the CA/ASR bar chart")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6, help="the cached models' training epochs (part of the recipe)")
    ap.add_argument("--limit", type=int, default=None,
                    help="test images per cell (default: results.json's limit, so the numbers match the table)")
    args = ap.parse_args(argv)
    pyplot()  # fail early, before any fit, when matplotlib is missing
    matrix_path = Path(args.matrix) / "results.json"
    matrix = json.loads(matrix_path.read_text()) if matrix_path.is_file() else []
    args.out = Path(args.out or Path(args.matrix) / "plots")
    args.out.mkdir(parents=True, exist_ok=True)
    args.modes = args.modes.split(",")
    for m in args.modes:
        if m not in bench.MODES:
            ap.error(f"unknown mode {m!r} (known: {', '.join(bench.MODES)})")
    args.counts = sorted(int(n) for n in args.counts.split(","))
    if args.limit is None:
        limits = sorted({r.get("limit") or 0 for r in matrix})
        args.limit = (limits[0] or None) if len(limits) == 1 else None
    log(f"test images per cell: {args.limit or 'all'}")
    summary_path = args.out / "plots.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if not args.no_bars:
        if not matrix:
            ap.error(f"no {matrix_path} to draw the bar chart from (or pass --no-bars)")
        n = plot_bars(matrix, args.out / "bars.png")
        log(f"bars.png: {n} cells")
    hist_cells = (list(dict.fromkeys((r["dataset"], r["attack"]) for r in matrix)) if args.hist == "all"
                  else parse_cells(args.hist))
    hists = {f"{h['dataset']}:{h['attack']}": h for h in summary.get("histograms", [])}
    for ds, att in hist_cells:
        s = histogram_cell(ds, att, args, matrix)
        if s is not None:
            hists[f"{ds}:{att}"] = s
    curves = {f"{c['dataset']}:{c['attack']}": c for c in summary.get("efficiency", [])}
    for ds, att in parse_cells(args.curve):
        recs = efficiency_cell(ds, att, args)
        if recs:
            curves[f"{ds}:{att}"] = {"dataset": ds, "attack": att, "png": f"efficiency_{ds}_{att}.png", "records": recs}
    from fire_onnx.fileio import write_text_atomic

    write_text_atomic(summary_path, json.dumps({"limit": args.limit, "histograms": list(hists.values()),
                                                "efficiency": list(curves.values())}, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
