#!/usr/bin/env python3
"""``fit --layer auto`` vs fixed layers on the cached benchmark models, in onnxruntime on the test split.

For each (dataset, attack) whose backdoored SmallCNN is in the model cache of ``tools/bench_flagged.py``
(same recipe, same clean pool: the training images outside the flagged tenth; nothing is trained here),
the repair is fitted from the ONNX model alone with the trigger known (20 stamped training images with
their clean twins, 500 clean images, target 0, gate auto) at:

- ``fixed``: the layer bench_flagged uses (block2 for BadNets, block1 for Blended and SIG);
- ``layer``: every candidate tensor ``--layer auto`` considers, one at a time (a hand sweep);
- ``auto``: ``--layer auto`` (default clean budget 0.5 %, 1000 held-out clean training images).

Each repair is patched and evaluated on the test split: CA, ASR and RA (triggered non-target images), and
the clean change (test images whose predicted class the repair changes). Writes ``<out>/results.json``
(records ``{dataset, model, attack, mode, layers, ca, asr, ra, clean_change, ...}``) and
``<out>/results.md``. Example::

    python tools/bench_auto.py --data-dir ../shared/data --cache benchmarks/.cache/models --limit 3000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fire_onnx.errors import FireError  # noqa: E402


TEST_POOL = 0.6  # --clean-from test: this share of the test split is the clean pool, the rest is evaluated


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_cell(dataset: str, attack: str, args) -> list[dict]:
    import bench_flagged as bf

    from fire_onnx import directions as dirs
    from fire_onnx.evaluate import compute_metrics, predict_logits, session
    from fire_onnx.fit.auto import candidate_sites
    from fire_onnx.fit.pipeline import FitRequest, run_fit
    from fire_onnx.onnxutil import load_model
    from fire_onnx.patch import patch_file

    spec, fixed_layer = bf.ATTACKS[attack]
    data_path = Path(args.data_dir) / f"{dataset}.npz"
    recipe = bf.make_recipe(data_path, args.arch, spec, args.epochs, 0)
    model_name = "small_cnn"
    if args.arch == "preact18":  # bench_flagged's PreAct-ResNet18 (width 16, 12 epochs) and its fixed layers
        recipe, fixed_layer = bf.preact_recipe(recipe, dataset), bf.PREACT["layers"][attack]
        model_name = f"preact18-w{bf.PREACT['width']}"
    onnx_path = Path(args.cache) / bf.recipe_key(recipe) / "model.onnx"
    if not onnx_path.is_file():
        log(f"  {dataset} {attack}: no cached model ({onnx_path.parent.name}); skipped (this tool does not train: "
            f"tools/bench_flagged.py --archs {args.arch} trains it)")
        return []
    train, test, pre, trig, trig_test = bf.load_cell(data_path, spec, args.limit)
    c = train.x.shape[-1]
    _, pool = bf.flagged_split(train, 0)
    clean_x, clean_y = train.x[pool], train.y[pool]
    n = int(round(TEST_POOL * len(test)))
    if args.clean_from == "test":  # images the model was not trained on: the first part of the test split
        clean_x, clean_y = test.x[:n], test.y[:n]
    if args.clean_from == "test" or args.eval_tail:  # evaluated on the rest
        test, trig_test = test.subset(np.arange(n, len(test))), trig_test.subset(np.arange(n, len(trig_test)))
    base = {"dataset": dataset, "model": model_name, "attack": attack, "trigger": spec, "seed": 0,
            "epochs": recipe["epochs"], "n_triggered": 20, "n_clean_test": len(test), "clean_from": args.clean_from,
            "eval_tail": bool(args.clean_from == "test" or args.eval_tail)}
    original = session(onnx_path)
    x_test = pre(test.x)
    pred0 = predict_logits(original, x_test).argmax(axis=1)
    sites, _ = candidate_sites(load_model(onnx_path))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean_file = tmp / "clean.npz"
        np.savez(clean_file, x_train=clean_x, y_train=clean_y)

        def measure(model, rec: dict) -> dict:
            sess = session(model)
            m = compute_metrics(sess, test, pre, trig_test, bf.TARGET)
            change = float((predict_logits(sess, x_test).argmax(axis=1) != pred0).mean())
            rec.update(ca=m.ca, asr=m.asr, ra=m.ra, asr_floor=m.asr_floor, clean_change=change,
                       n_triggered_test=m.n_triggered)
            log(f"  {dataset} {attack} {rec['mode']:6s} {','.join(rec['layers']) or '-':9s}: CA {m.ca:.3f} "
                f"ASR {m.asr:.3f} RA {m.ra:.3f} clean change {change:.3%}")
            return rec

        out.append(measure(onnx_path, dict(base, mode="original", layers=[])))
        wanted = args.modes.split(",")
        budgets = [float(b) for b in args.budgets.split(",")]
        runs = [("auto", "auto", budgets[0], "project", 1)] if "auto" in wanted else []
        runs += [(f"auto@{b:g}", "auto", b, "project", 1) for b in budgets[1:]]
        runs += [("auto-repair", "auto", budgets[0], "auto", 1)] if "auto-repair" in wanted else []
        runs += [(f"auto-chain{n}" + (f"@{budgets[0]:g}" if budgets[0] != 0.005 else ""), "auto", budgets[0], "project",
                  n) for n in args.max_layers]
        runs += [("fixed", fixed_layer, budgets[0], "project", 1)] if "fixed" in wanted else []
        runs += [("layer", s.layer, budgets[0], "project", 1) for s in sites] if "layers" in wanted else []
        suffix = "" if args.method == "mean-diff" else f"+subspace{args.k}"
        runs = [(mode + suffix, *rest) for mode, *rest in runs]
        for mode, layer, budget, repair, max_layers in runs:
            t0 = time.perf_counter()
            req = FitRequest(layers=[layer], clean_path=str(clean_file), onnx_path=str(onnx_path),
                             trigger_spec=spec, target=bf.TARGET, n_clean=bf.N_CLEAN, n_triggered=20, seed=0,
                             scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, clean_budget=budget, repair=repair,
                             max_layers=max_layers, method=args.method, k=args.k if args.method == "subspace" else None,
                             force=True)  # a fixed layer is measured even where fit's held-out check refuses it
            d = run_fit(req)
            safe = layer.strip("/").replace("/", "_")  # a tensor name (PreAct's Relu outputs) holds slashes
            path = tmp / f"{mode}-{safe}.npz"
            dirs.save(d, path)
            patched = tmp / f"{mode}-{safe}.fire.onnx"
            patch_file(onnx_path, path, patched)
            t = d.targets[0]
            rec = dict(base, mode=mode, layers=[x.module or x.tensor for x in d.targets], tensor=t.tensor, gate=t.gate,
                       repair=t.repair,
                       fit_seconds=round(time.perf_counter() - t0, 1))
            if layer == "auto":
                a = d.meta["auto"]
                rec.update(clean_budget=a["clean_budget"], within_budget=a["within_budget"], why=a["why"],
                           ranking=[{k: r.get(k) for k in ("layer", "repair", "target_rate", "clean_change", "rank")}
                                    for r in a["candidates"]])
                if max_layers > 1:
                    rec.update(max_layers=max_layers, stopped=a["stopped"], chain_target_rate=a["chain_target_rate"],
                               chain_clean_change=a["chain_clean_change"])
            out.append(measure(patched, rec))
    return out


def markdown(records: list[dict]) -> str:
    lines = ["CA / ASR / RA / clean change in % (test split, ASR and RA over triggered non-target images; clean "
             "change: test images whose class the repair changes). Trigger known (20 stamped + 500 clean training "
             "images), gate auto, fitted from the ONNX model.", "",
             "| dataset | attack | original | fixed (layer) | auto (chosen) | best hand-picked layer (test ASR) |",
             "|---|---|---|---|---|---|"]
    cells: dict = {}
    for r in records:
        cells.setdefault((r["dataset"], r.get("model", "small_cnn"), r["attack"]), []).append(r)

    def fmt(r):
        return (f"{100 * r['ca']:.1f} / {100 * r['asr']:.1f} / {100 * r['ra']:.1f} / "
                f"{100 * r['clean_change']:.2f}")

    def name(ds, model):
        return ds if model == "small_cnn" else f"{ds} ({model})"

    for (ds, model, att), rs in cells.items():
        ds = name(ds, model)
        orig = next(r for r in rs if r["mode"] == "original")
        fixed = next((r for r in rs if r["mode"] == "fixed"), None)
        auto = next((r for r in rs if r["mode"] == "auto"), None)
        layers = [r for r in rs if r["mode"] == "layer"]
        best = min(layers, key=lambda r: (r["asr"], -r["ca"])) if layers else None
        lines.append(f"| {ds} | {att} | {fmt(orig)} | "
                     + (f"{fmt(fixed)} ({fixed['layers'][0]})" if fixed else "") + " | "
                     + (f"{fmt(auto)} ({auto['layers'][0]})" if auto else "") + " | "
                     + (f"{fmt(best)} ({best['layers'][0]})" if best else "") + " |")
    lines += ["", "Every single layer (CA / ASR / RA / clean change, %):", "",
              "| dataset | attack | layer | test CA / ASR / RA / change | auto's held-out target rate | auto's held-out "
              "clean change |", "|---|---|---|---|---|---|"]
    for (ds, model, att), rs in cells.items():
        ds = name(ds, model)
        auto = next((r for r in rs if r["mode"] == "auto"), None)
        held = {row["layer"]: row for row in (auto or {}).get("ranking", [])}
        for r in rs:
            if r["mode"] != "layer":
                continue
            h = held.get(r["layers"][0], {})
            mark = " (auto)" if auto and auto["layers"] == r["layers"] else ""
            tr = "-" if h.get("target_rate") is None else f"{100 * h['target_rate']:.1f}"
            cc = "-" if h.get("clean_change") is None else f"{100 * h['clean_change']:.2f}"
            lines.append(f"| {ds} | {att} | {r['layers'][0]}{mark} | {fmt(r)} | {tr} | {cc} |")
    extra = [r for rs in cells.values() for r in rs if r["mode"].startswith("auto") and r["mode"] != "auto"]
    if extra:
        lines += ["", "Other settings of `--layer auto` (`auto@B`: `--clean-budget B`; `auto-repair`: `--repair auto`; "
                  "`auto-chainN`: `--max-layers N`):",
                  "", "| dataset | attack | mode | chosen | test CA / ASR / RA / change |", "|---|---|---|---|---|"]
        for r in extra:
            chosen = " -> ".join(r["layers"]) + ("" if r.get("repair", "project") == "project" else f" ({r['repair']})")
            lines.append(f"| {name(r['dataset'], r.get('model', 'small_cnn'))} | {r['attack']} | {r['mode']} | {chosen} | {fmt(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--cache", default="benchmarks/.cache/models")
    ap.add_argument("--out", default="benchmarks/auto")
    ap.add_argument("--datasets", default="mnist5k,cifar10,gtsrb32")
    ap.add_argument("--attacks", default="badnets,blended,sig")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--arch", choices=["small_cnn", "preact18"], default="small_cnn",
                    help="the cached models' architecture (preact18: bench_flagged's width-16 PreAct-ResNet18, CIFAR-10)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--budgets", default="0.005",
                    help="clean budgets: the first for mode auto, each further one adds a mode auto@BUDGET")
    ap.add_argument("--max-layers", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="comma-separated: for each N, a mode auto-chainN (--layer auto --max-layers N)")
    ap.add_argument("--method", choices=["mean-diff", "subspace"], default="mean-diff",
                    help="estimation method for every fit (subspace: modes get a +subspaceK suffix)")
    ap.add_argument("--k", type=int, default=3, help="directions for --method subspace")
    ap.add_argument("--clean-from", choices=["train", "test"], default="train",
                    help=f"the --clean pool: training images (default), or the first {round(100 * TEST_POOL)} %% of "
                         "the test split (images the model was not trained on; evaluated on the rest)")
    ap.add_argument("--eval-tail", action="store_true",
                    help="evaluate on the test images --clean-from test leaves (to compare the two pools on the same images)")
    ap.add_argument("--modes", default="auto,fixed,layers",
                    help="comma-separated: auto, auto-repair (--repair auto), fixed, layers")
    args = ap.parse_args(argv)
    import bench_flagged as bf
    from fire_onnx.fileio import write_text_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    records = bf.load_records(path)
    t0 = time.perf_counter()
    failed = 0
    for ds in args.datasets.split(","):
        for att in args.attacks.split(","):
            log(f"[{ds} / {att}]")
            try:
                new = run_cell(ds, att, args)
            except FireError as e:  # a setting the cell cannot run with (e.g. --limit leaves too few clean images)
                log(f"  {ds} / {att}: error: {e}")
                failed += 1
                continue
            if not new:
                continue
            key = lambda r: (r["dataset"], r.get("model", "small_cnn"), r["attack"], r["mode"], tuple(r["layers"]) if r["mode"] == "layer" else ())  # noqa: E731
            records = bf.save_records(path, new, key)
    md = markdown(records)
    write_text_atomic(out / "results.md", md + f"\n\n{round(time.perf_counter() - t0)} s for this run.\n")
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
