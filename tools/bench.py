#!/usr/bin/env python3
"""The comparison matrix: original / FIRE / ShrinkPad / STRIP on the same backdoored models and inputs.

For each (dataset, attack, seed) the SmallCNN backdoored model of ``tools/bench_flagged.py`` is reused from
its cache (keyed by the recipe hash; trained there once if missing: 10 % poisoning, all-to-one, target 0),
then, in onnxruntime on the test split (or its first ``--limit`` images):

- ``original``: the model as it is;
- ``fire``: repaired with ``fit`` from the ONNX model (500 clean training images) and patched into the
  graph, in sample modes ``paired`` (the trigger is known: 20 stamped clean images with their twins) and
  ``flagged`` (20 triggered images, no twins, no labels; the same flagged split as bench_flagged);
- ``shrinkpad``: ShrinkPad in front of the original model (``fire_onnx.peers.ShrinkPad``, shrink 4 px);
- ``strip``: STRIP as a filter in front of the original model (``fire_onnx.peers.Strip``: 20 superimpositions
  per input, pixels added as in the paper, from a bank of 100 clean training images, threshold at 5 % false rejections on 500 other held
  clean training images); rejected inputs abstain and count as neither correct nor attack successes.

Each method's cost per input is timed against the original model's, all methods interleaved in one loop
at batch 64 (``fire_onnx.peers.measure_costs``: uint8 pixels to decision, preprocessing included).

Writes ``<out>/results.json`` (a list of records ``{dataset, model, attack, method, mode, n_triggered,
seed, ca, asr, ra, cost_ratio, ...}``, fractions; STRIP's with ``clean_rejected`` and
``triggered_rejected``) and ``<out>/results.md``. Records of cells not re-measured are kept. Example::

    python tools/bench.py --data-dir ../shared/data --out benchmarks/matrix
    python tools/bench.py --data-dir ../shared/data --out /tmp/m --quick --limit 300
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
import bench_flagged as bf  # noqa: E402  (recipes, model cache, flagged split and attacks are shared)

MODES = ["paired", "flagged"]
METHODS = ["original", "fire", "shrinkpad", "strip"]
N_TRIGGERED = 20
N_BANK, N_HELD = 100, 500  # STRIP's clean images: the blend bank and the held images its threshold is set on
# the "Done when" bar of issue 7 for a repair (fractions)
BAR = {"asr": 0.02, "ca_drop": 0.01, "ra_gap": 0.05}
MIN_ASR = 0.85  # issue 7: a backdoored model must reach this ASR before repair, or the table says why


MODEL_NAMES = {"small_cnn": "SmallCNN", "preact18-w16": "PreAct-RN18 w16"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def record_key(r: dict) -> tuple:
    return (r["model"], r["dataset"], r["attack"], r["seed"], r["method"], r.get("mode"))


def fit_and_patch(mode: str, onnx_path: Path, layer: str, spec: str, trig, train, flag_src, clean_file: Path,
                  c: int, seed: int, tmp: Path, n_triggered: int = N_TRIGGERED) -> tuple[Path, dict]:
    """(patched model, record fields) for FIRE in sample ``mode`` from ``n_triggered`` triggered samples,
    fitted as bench_flagged fits it (tools/plots.py varies the count for its sample-efficiency curve)."""
    from fire_onnx import directions as dirs
    from fire_onnx.fit.pipeline import FitRequest, run_fit
    from fire_onnx.patch import patch_file

    req = dict(layers=[layer], clean_path=str(clean_file), onnx_path=str(onnx_path), target=bf.TARGET,
               n_clean=bf.N_CLEAN, seed=seed, scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, n_triggered=n_triggered,
               force=True)  # measure also what fit's held-out check refuses (fields["check"] says)
    if mode == "paired":
        req["trigger_spec"] = spec
    elif mode == "flagged":
        flagged = tmp / "flagged.npz"
        np.savez(flagged, x=trig.apply(train.x[flag_src[:n_triggered]]))  # no labels, no clean twins
        req["triggered_path"] = str(flagged)
    else:
        raise ValueError(mode)
    d = run_fit(FitRequest(**req))
    dpath = tmp / f"{mode}.npz"
    dirs.save(d, dpath)
    model = tmp / f"{mode}.fire.onnx"
    patch_file(onnx_path, dpath, model)
    t = d.targets[0]
    fields = {"gate": t.gate, "separation_sigma": t.fit.get("separation_sigma", [None])[0],
              "warnings": list(t.fit.get("warnings", [])) + list(d.meta.get("checks", {}).get("warnings", []))}
    if d.meta.get("reconstruction"):
        fields["reconstruction"] = d.meta["reconstruction"]
    if d.meta.get("check"):
        fields["check"] = d.meta["check"]
    return model, fields


def run_cell(dataset: str, attack: str, seed: int, args, step: str) -> list[dict]:
    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.peers import ShrinkPad, Strip, evaluate_shrinkpad, evaluate_strip, measure_costs, plain_runner

    spec, layer = bf.ATTACKS[attack]
    data_path = Path(args.data_dir) / f"{dataset}.npz"
    recipe = bf.make_recipe(data_path, args.arch, spec, args.epochs, seed)
    model_name = "small_cnn"
    if args.arch == "preact18":  # the recipe bench_flagged trains its PreAct-ResNet18 with (same cache keys)
        recipe = bf.preact_recipe(recipe, dataset)
        layer, model_name = bf.PREACT["layers"][attack], f"preact18-w{bf.PREACT['width']}"
    log(f"{step} model: {'reusing' if (Path(args.cache) / bf.recipe_key(recipe) / 'model.onnx').is_file() else 'training'} "
        f"{bf.recipe_key(recipe)}")
    onnx_path, train_s = bf.train_or_reuse(recipe, data_path, Path(args.cache))
    train, test, pre, trig, trig_test = bf.load_cell(data_path, spec, args.limit)
    c = train.x.shape[-1]
    flag_src, pool = bf.flagged_split(train, seed)
    # STRIP's clean images come from the same pool FIRE's clean samples do (the defender's clean data)
    order = np.random.default_rng(2000 + seed).permutation(pool)
    bank, held = train.x[order[:N_BANK]], train.x[order[N_BANK: N_BANK + N_HELD]]
    base = {"dataset": dataset, "model": model_name, "attack": attack, "trigger": spec, "seed": seed,
            "epochs": recipe["epochs"], "train_seconds": round(train_s, 1), "limit": args.limit}
    sess = {"original": session(onnx_path, threads=args.threads)}
    out: list[dict] = []

    def add(method: str, mode, m, t0: float, **extra) -> None:
        rec = dict(base, method=method, mode=mode, **extra, ca=m.ca, asr=m.asr, ra=m.ra, asr_floor=m.asr_floor,
                   n_clean_test=m.n_clean, n_triggered_test=m.n_triggered, seconds=round(time.perf_counter() - t0, 1))
        for k in ("clean_rejected", "triggered_rejected"):
            if getattr(m, k, None) is not None and method == "strip":
                rec[k] = getattr(m, k)
        out.append(rec)
        name = method if mode is None else f"{method} {mode}"
        rej = f" rejected clean {m.clean_rejected:.3f} triggered {m.triggered_rejected:.3f}" if method == "strip" else ""
        log(f"{step} {name}: CA {m.ca:.3f} ASR {m.asr:.3f} RA {m.ra:.3f}{rej} ({rec['seconds']} s)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean_file = tmp / "clean.npz"
        np.savez(clean_file, x_train=train.x[pool], y_train=train.y[pool])
        t0 = time.perf_counter()
        if "original" in args.methods:
            add("original", None, compute_metrics(sess["original"], test, pre, trig_test, bf.TARGET), t0,
                n_triggered=0, layer=None)
        if "fire" in args.methods:
            for mode in args.modes:
                t0 = time.perf_counter()
                log(f"{step} fire {mode}: fitting at {layer} from {N_TRIGGERED} {mode} images")
                try:
                    model, fields = fit_and_patch(mode, onnx_path, layer, spec, trig, train, flag_src, clean_file,
                                                  c, seed, tmp)
                except Exception as e:  # a benchmark records failures instead of stopping
                    out.append(dict(base, method="fire", mode=mode, n_triggered=N_TRIGGERED, layer=layer,
                                    error=f"{type(e).__name__}: {e}"))
                    log(f"{step} fire {mode}: fit failed: {e}")
                    continue
                sess[f"fire-{mode}"] = session(model, threads=args.threads)
                add("fire", mode, compute_metrics(sess[f"fire-{mode}"], test, pre, trig_test, bf.TARGET), t0,
                    n_triggered=N_TRIGGERED, layer=layer, **fields)
        sp = ShrinkPad(shrink=args.shrink, seed=seed)
        if "shrinkpad" in args.methods:
            t0 = time.perf_counter()
            log(f"{step} shrinkpad: shrink {args.shrink} px")
            add("shrinkpad", None, evaluate_shrinkpad(sess["original"], sp, test, pre, trig_test, bf.TARGET), t0,
                n_triggered=0, params={"shrink": args.shrink})
        strip = Strip(bank, n_blend=args.n_blend, frr=args.frr, seed=seed, blend=args.strip_blend)
        if "strip" in args.methods:
            t0 = time.perf_counter()
            log(f"{step} strip: calibrating on {len(held)} held clean images ({args.n_blend} blends each)")
            strip.calibrate(sess["original"], held, pre)
            log(f"{step} strip: filtering {len(test)} clean + triggered test images")
            add("strip", None, evaluate_strip(sess["original"], strip, test, pre, trig_test, bf.TARGET), t0,
                n_triggered=0, params={"n_blend": args.n_blend, "blend": args.strip_blend, "frr": args.frr, "n_bank": len(bank),
                        **strip.calibration})

        costs = {}
        if args.cost_repeats > 0:
            log(f"{step} cost: interleaved timing at batch {args.cost_batch}, {args.cost_repeats} repeats")
            timed = session(onnx_path, threads=args.cost_threads)
            runners = {"original": plain_runner(timed, pre)}
            for mode in args.modes:  # fresh sessions of the patched models, with the timing thread count
                if f"fire-{mode}" in sess:
                    runners[f"fire-{mode}"] = plain_runner(session(tmp / f"{mode}.fire.onnx", threads=args.cost_threads), pre)
            if "shrinkpad" in args.methods:
                runners["shrinkpad"] = lambda x: sp.predict(timed, x, pre)
            if "strip" in args.methods:
                runners["strip"] = lambda x: strip.decide(timed, x, pre)
            costs = measure_costs(runners, test.x, batch=args.cost_batch, repeats=args.cost_repeats)
            log(f"{step} cost ratios: " + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in costs.items()))

    for r in out:
        name = r["method"] if r["mode"] is None or r["method"] != "fire" else f"fire-{r['mode']}"
        if name in costs:
            r.update(cost_ratio=costs[name]["ratio"], cost_us_per_input=costs[name]["us_per_input"],
                     cost_batch=args.cost_batch, cost_threads=args.cost_threads)
    return out


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _triple(r) -> str:
    if r is None:
        return ""
    if "error" in r:
        return "error"
    return f"{_pct(r['ca'])} / {_pct(r['asr'])} / {_pct(r['ra'])}"


def columns(records: list[dict]) -> list[tuple[str, str | None]]:
    cols = [("original", None)] + [("fire", m) for m in MODES] + [("shrinkpad", None), ("strip", None)]
    return [c for c in cols if any((r["method"], r.get("mode")) == c for r in records)]


def meets_bar(r: dict, orig: dict, above_floor: bool = False) -> bool:
    """The issue-7 bar; ``above_floor``: ASR counted above the original model's ASR floor (the clean
    non-target images it already puts in the target class, which no repair removes)."""
    asr = r["asr"] - (orig.get("asr_floor") or 0) if above_floor else r["asr"]
    return ("error" not in r and asr <= BAR["asr"] + 1e-9 and orig["ca"] - r["ca"] <= BAR["ca_drop"] + 1e-9
            and r["ra"] >= r["ca"] - BAR["ra_gap"] - 1e-9)


def markdown(records: list[dict]) -> str:
    cols = columns(records)
    label = {("original", None): "original", ("fire", "paired"): "FIRE paired", ("fire", "flagged"): "FIRE flagged",
             ("shrinkpad", None): "ShrinkPad", ("strip", None): "STRIP (filter)"}
    cells: dict = {}
    for r in records:
        cells.setdefault((r["model"], r["dataset"], r["attack"], r["seed"]), {})[(r["method"], r.get("mode"))] = r
    sp = next((r for r in records if r["method"] == "shrinkpad" and "params" in r), None)
    shrink = sp["params"]["shrink"] if sp else "?"
    st = next((r for r in records if r["method"] == "strip" and "params" in r), None)
    how = {"add": "pixels added, saturating at 255, as in the paper", "average": "pixel mean 0.5 / 0.5"}
    strip_desc = (f"{st['params']['n_blend']} superimpositions per input ({how[st['params'].get('blend', 'add')]}) from a bank of {st['params']['n_bank']} clean "
                  f"training images, threshold at {100 * st['params']['frr']:g} % false rejections on "
                  f"{st['params']['n_held']} other held clean training images") if st else "not run"
    limits = sorted({r.get("limit") or 0 for r in records})
    test_desc = "full test split" if limits == [0] else (
        f"first {limits[0]} test images" if len(limits) == 1 else f"first {', '.join(map(str, limits))} test images per cell (0 = all)")
    methods = {c[0] for c in cols}
    desc = [f"CA / ASR / RA in % ({test_desc}; ASR and RA over triggered non-target images). 10 % poisoning, "
            "all-to-one (target 0)."]
    if "fire" in methods:
        desc.append(f"FIRE: {N_TRIGGERED} triggered + {bf.N_CLEAN} clean training images.")
    if "shrinkpad" in methods:
        desc.append(f"ShrinkPad: shrink {shrink} px + random zero pad.")
    if "strip" in methods:
        desc.append(f"STRIP: {strip_desc}; a rejected input abstains (counts as wrong for CA and RA, as no success "
                    "for ASR).")
    rej_col = " STRIP rejects clean / triggered |" if "strip" in methods else ""
    lines = [" ".join(desc), "",
             "| model | dataset | attack | ASR floor | " + " | ".join(label[c] for c in cols) + " |" + rej_col,
             "|---|---|---|---|" + "---|" * len(cols) + ("---|" if rej_col else "")]
    for (model, ds, att, seed), by in cells.items():
        s = by.get(("strip", None))
        rej = f"{_pct(s.get('clean_rejected'))} / {_pct(s.get('triggered_rejected'))}" if s and "error" not in s else ""
        floor = _pct(by.get(("original", None), {}).get("asr_floor"))
        lines.append(f"| {MODEL_NAMES.get(model, model)} | {ds} | {att} | {floor} | "
                     + " | ".join(_triple(by.get(c)) for c in cols) + " |"
                     + (f" {rej} |" if rej_col else ""))
    weak = [(f"{MODEL_NAMES.get(model, model)} {ds}", att, by[("original", None)]["asr"]) for (model, ds, att, seed), by in cells.items()
            if ("original", None) in by and by[("original", None)]["asr"] < MIN_ASR]
    if weak:
        lines += ["", f"Backdoors below {100 * MIN_ASR:.0f} % ASR before any defense (the cells stay in the table; "
                  "a repair there is judged on the ASR that is left):", ""]
        by_attack: dict = {}
        for ds, att, asr in weak:
            by_attack.setdefault(att, []).append(f"{ds} {_pct(asr)} %")
        lines += [f"- {att}: {', '.join(cells)}. Why: {bf.WEAK.get(att, 'the 6-epoch SmallCNN did not learn it fully')}."
                  for att, cells in by_attack.items()]
    timed = [by for by in cells.values() if by.get(("original", None), {}).get("cost_ratio") is not None]
    lines += [] if not timed else ["", "Cost per input as a ratio to the original model (uint8 pixels to decision, preprocessing included; "
              "all methods interleaved in one loop, median of repeats; onnxruntime CPU):", "",
              "| model | dataset | attack | batch | threads | original (µs/input) | " +
              " | ".join(label[c] for c in cols if c != ("original", None)) + " |",
              "|---|---|---|---|---|---|" + "---|" * (len(cols) - 1)]
    for (model, ds, att, seed), by in cells.items():
        o = by.get(("original", None), {})
        if o.get("cost_ratio") is None:
            continue
        row = [f"{by[c]['cost_ratio']:.2f}×" if by.get(c, {}).get("cost_ratio") is not None else ""
               for c in cols if c != ("original", None)]
        lines.append(f"| {MODEL_NAMES.get(model, model)} | {ds} | {att} | {o['cost_batch']} | {o['cost_threads']} | "
                     f"{o['cost_us_per_input']:.1f} | "
                     + " | ".join(row) + " |")
    if len(timed) > 1:
        med = []
        for c in cols:
            if c == ("original", None):
                continue
            v = [by[c]["cost_ratio"] for by in timed if by.get(c, {}).get("cost_ratio") is not None]
            med.append(f"**{float(np.median(v)):.2f}×**" if v else "")
        lines.append(f"| median over {len(timed)} cells | | | | | | " + " | ".join(med) + " |")
    # the bar, per method
    lines += ["", f"Cells meeting the issue-7 bar (ASR ≤ {100 * BAR['asr']:.0f} %, CA drop ≤ {100 * BAR['ca_drop']:.0f} pt, "
              f"RA ≥ CA − {100 * BAR['ra_gap']:.0f} pt); second column: the same with ASR counted above the ASR floor:", "",
              "| method | cells meeting the bar | ... with ASR − floor | median ASR | median CA drop (pt) | median RA |",
              "|---|---|---|---|---|---|"]
    models = sorted({key[0] for key in cells}, key=lambda m: (m != "small_cnn", m))
    groups = [(None, "")] + ([(m, f" ({MODEL_NAMES.get(m, m)})") for m in models] if len(models) > 1 else [])
    for (only, suffix), c in ((g, c) for g in groups for c in cols):
        if c == ("original", None):
            continue
        rs = [(by[c], by[("original", None)]) for key, by in cells.items() if c in by and ("original", None) in by
              and "error" not in by[c] and only in (None, key[0])]
        if not rs:
            continue
        ok = sum(meets_bar(r, o) for r, o in rs)
        ok_floor = sum(meets_bar(r, o, above_floor=True) for r, o in rs)
        lines.append(f"| {label[c]}{suffix} | {ok} / {len(rs)} | {ok_floor} / {len(rs)} | "
                     f"{_pct(float(np.median([r['asr'] for r, _ in rs])))} | "
                     f"{100 * float(np.median([o['ca'] - r['ca'] for r, o in rs])):.1f} | "
                     f"{_pct(float(np.median([r['ra'] for r, _ in rs])))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from fire_onnx.peers import DEFAULT_COST_BATCH, DEFAULT_FRR, DEFAULT_N_BLEND, DEFAULT_SHRINK

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with mnist5k.npz, fashion_mnist.npz, cifar10.npz, gtsrb32.npz")
    ap.add_argument("--out", default="benchmarks/matrix", help="results folder (results.json, results.md)")
    ap.add_argument("--cache", default="benchmarks/.cache/models", help="trained models, keyed by recipe hash "
                    "(shared with bench_flagged)")
    ap.add_argument("--arch", default="small_cnn", choices=["small_cnn", "preact18"],
                    help="small_cnn (6 epochs), or preact18: PreAct-ResNet18 at width 16, 12 epochs of one-cycle SGD "
                         "with crop (and flip on CIFAR-10 only; bench_flagged's recipe; about 16 min per CIFAR-10 model, 25-30 per "
                         "GTSRB model on 2 shared cores)")
    ap.add_argument("--datasets", default=",".join(bf.DATASETS))
    ap.add_argument("--attacks", default=",".join(bf.ATTACKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--modes", default=",".join(MODES), help="FIRE sample modes: paired, flagged")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--shrink", type=int, default=DEFAULT_SHRINK, help="ShrinkPad's shrink in pixels")
    ap.add_argument("--n-blend", type=int, default=DEFAULT_N_BLEND, help="STRIP's blends per input")
    ap.add_argument("--strip-blend", default="add", choices=["add", "average"],
                    help="STRIP's superimposition: add (the paper's, saturating) or average (0.5 / 0.5)")
    ap.add_argument("--frr", type=float, default=DEFAULT_FRR, help="STRIP's false-rejection rate on held clean images")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads for evaluation")
    ap.add_argument("--cost-batch", type=int, default=DEFAULT_COST_BATCH)
    ap.add_argument("--cost-repeats", type=int, default=40, help="interleaved timing repeats (0: no timing)")
    ap.add_argument("--cost-threads", type=int, default=1, help="onnxruntime threads for the timing sessions")
    ap.add_argument("--fresh", action="store_true", help="drop the records of earlier runs in --out")
    ap.add_argument("--quick", action="store_true", help="one cell: mnist5k badnets, seed 0")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite <out>/results.md from <out>/results.json")
    args = ap.parse_args(argv)
    if args.markdown_only:
        from fire_onnx.fileio import write_text_atomic

        path = Path(args.out) / "results.json"
        if not path.is_file():
            ap.error(f"no {path} to rewrite results.md from")
        md = markdown(json.loads(path.read_text()))
        old = (Path(args.out) / "results.md")
        tail = old.read_text().rsplit("\n\nfire-onnx ", 1) if old.is_file() else []
        meta = f"\n\nfire-onnx {tail[1]}" if len(tail) == 2 else "\n"
        write_text_atomic(old, md + meta)
        print(md)
        return 0
    datasets, attacks = args.datasets.split(","), args.attacks.split(",")
    if args.quick:
        datasets, attacks = ["mnist5k"], ["badnets"]
    for a in attacks:
        if a not in bf.ATTACKS:
            ap.error(f"unknown attack {a!r} (known: {', '.join(bf.ATTACKS)})")
    for d in datasets:
        if not (Path(args.data_dir) / f"{d}.npz").is_file():
            ap.error(f"no {d}.npz in {args.data_dir}")
    args.methods = args.methods.split(",")
    args.modes = args.modes.split(",")
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    for m in args.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    if args.cost_repeats > 0 and args.limit is not None and args.limit < args.cost_batch:
        ap.error(f"--limit {args.limit} leaves fewer test images than --cost-batch {args.cost_batch}")
    if "original" not in args.methods:
        ap.error("--methods must include original (the reference for the CA drop and the cost ratio)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    t0 = time.perf_counter()
    if args.fresh and results_path.is_file():
        from fire_onnx.fileio import write_text_atomic

        write_text_atomic(results_path, "[]\n")
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = [(ds, att, seed) for ds in datasets for att in attacks for seed in seeds]
    for i, (ds, att, seed) in enumerate(cells, 1):
        step = f"[{i}/{len(cells)} {ds} {att} seed {seed}]"
        # a re-measured record replaces its old one; after every cell, so an interrupted run keeps what it measured
        bf.save_records(results_path, run_cell(ds, att, seed, args, step), record_key)
    records = bf.load_records(results_path)
    from fire_onnx import __version__
    from fire_onnx.fileio import write_text_atomic

    import onnxruntime as ort

    md = markdown(records)
    meta = (f"\n\nfire-onnx {__version__}, onnxruntime {ort.__version__}, python {platform.python_version()}, "
            f"{round(time.perf_counter() - t0)} s for the last run ({len(cells)} cell(s)).")
    write_text_atomic(out / "results.md", md + meta + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
