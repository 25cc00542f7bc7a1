"""Trigger-free repair benchmark: ``fit --trigger-free`` on backdoored and on clean SmallCNN models.

For every backdoored cell (dataset x attack, the models tools/bench_flagged.py trains and caches) and
every clean model (trained here, no poisoning; cached the same way), the defender has only the clean
pool of the cell and the PyTorch model: ``fit --trigger-free --layer LAYER`` scans every class, and the
repair (forced where nothing was found, to measure what a repair would cost) is patched into the ONNX
model and evaluated in onnxruntime on the test split.

Records (``--out``/results.json, keyed by dataset, model, attack, mode, seed, layer):
``{dataset, model, attack, mode: "trigger-free", seed, layer, backdoor_found, suspect, target_found,
anomaly_index, kind, rounds, ca, asr, ra, asr_floor, ca_original, asr_original, ra_original, seconds,
steps}``; ``target_found``: a backdoor was reported *and* its class is the attack's target (clean
models: null). A markdown table goes to ``--out``/results.md.

    python tools/bench_trigger_free.py --data-dir ../shared/data --out benchmarks/trigger_free
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flagged import (ATTACKS, TARGET, flagged_split, load_cell, load_records, log, make_recipe,  # noqa: E402
                           save_records, train_or_reuse, write_table)

DATASETS = ["mnist5k", "cifar10", "gtsrb32"]
TF_ATTACKS = ["badnets", "blended", "sig"]
CLEAN_MODELS = [("mnist5k", 0), ("mnist5k", 1), ("mnist5k", 2), ("cifar10", 0), ("cifar10", 1), ("cifar10", 2),
                ("gtsrb32", 0), ("gtsrb32", 1), ("fashion_mnist", 0), ("fashion_mnist", 1)]
FACTORY = {"mnist5k": "build_mnist", "fashion_mnist": "build_mnist", "cifar10": "build_cifar", "gtsrb32": "build_gtsrb"}
CLEAN_LAYER = "block2"  # a clean model has no attack to pick the layer from: the patch attacks' layer
N_CLEAN = 500


def clean_recipe(data_path: Path, seed: int, epochs: int) -> dict:
    r = make_recipe(data_path, "small_cnn", "", epochs, seed)
    r["poison_rate"] = 0.0
    return r


def run(dataset: str, attack: str | None, seed: int, layer: str, args) -> dict:
    from fire_onnx import directions as dirs
    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.fit.pipeline import FitRequest
    from fire_onnx.fit.trigger_free import run_trigger_free
    from fire_onnx.patch import patch_file

    data_path = Path(args.data_dir) / f"{dataset}.npz"
    spec = ATTACKS[attack][0] if attack else "badnets"
    recipe = make_recipe(data_path, "small_cnn", spec, args.epochs, seed) if attack else \
        clean_recipe(data_path, seed, args.epochs)
    onnx_path, _ = train_or_reuse(recipe, data_path, Path(args.cache))
    train, test, pre, trig, trig_test = load_cell(data_path, spec, args.limit)
    c = train.x.shape[-1]
    _, pool = flagged_split(train, seed)
    rec = {"dataset": dataset, "model": "small_cnn", "attack": attack or "none", "mode": "trigger-free",
           "seed": seed, "layer": layer, "repair": args.repair, "layer_choice": args.layer or "benchmark"}
    if args.priority:  # a study of which form should name the suspect (fire_onnx.invert.PRIORITY)
        rec["priority"] = args.priority
    if args.both_global:  # a study: repair both global forms' triggers (fire_onnx.fit.trigger_free.BOTH_GLOBAL)
        rec["both_global"] = True
    m0 = compute_metrics(session(onnx_path), test, pre, trig_test, TARGET)
    rec.update(ca_original=m0.ca, asr_original=m0.asr if attack else None, ra_original=m0.ra if attack else None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean_file = tmp / "clean.npz"
        np.savez(clean_file, x_train=train.x[pool], y_train=train.y[pool])
        req = FitRequest(layers=["auto"] if args.layer == "auto" else [layer], clean_path=str(clean_file), onnx_path=str(onnx_path),
                         model_spec=f"fire_onnx_models.small_cnn:{FACTORY[dataset]}",
                         weights=str(Path(onnx_path).parent / "model.pt"), n_clean=N_CLEAN, seed=seed,
                         scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, trigger_free=True, force=True,
                         budget=args.budget, repair=args.repair)
        from fire_onnx import invert
        from fire_onnx.fit import trigger_free

        default, both = invert.PRIORITY, trigger_free.BOTH_GLOBAL
        invert.PRIORITY = tuple(args.priority.split(",")) if args.priority else default
        trigger_free.BOTH_GLOBAL = bool(args.both_global)
        try:
            res = run_trigger_free(req)
        finally:
            invert.PRIORITY, trigger_free.BOTH_GLOBAL = default, both
        ev = res.evidence
        scan = ev["scan"]
        rec.update(backdoor_found=ev["backdoor_found"], suspect=scan["suspect"], kind=scan["kind"],
                   anomaly_index=scan["anomaly_index"], steps=scan["steps"], rounds=len(ev["rounds"]),
                   stopped=ev.get("stopped"), round_info=ev["rounds"],
                   scan_loss={k: scan[k]["loss"] for k in ("patch", "blend", "additive") if k in scan},
                   scan_rate={k: scan[k]["flip_rate"] for k in ("patch", "blend", "additive") if k in scan},
                   target_found=(ev["backdoor_found"] and scan["suspect"] == TARGET) if attack else None)
        d = res.directions
        dpath = tmp / "d.npz"
        dirs.save(d, dpath)
        patched = tmp / "m.fire.onnx"
        patch_file(onnx_path, dpath, patched)
        rec["layer"] = d.targets[0].module or d.targets[0].tensor
        m = compute_metrics(session(patched), test, pre, trig_test, TARGET)
    rec.update(ca=m.ca, asr=m.asr if attack else None, ra=m.ra if attack else None,
               asr_floor=m.asr_floor if attack else None, seconds=round(time.perf_counter() - t0, 1))
    log(f"  {dataset} {attack or 'clean'} seed {seed}: found {rec['backdoor_found']} (class {rec['suspect']}, "
        f"index {rec['anomaly_index']}), CA {m0.ca:.3f} -> {m.ca:.3f}"
        + (f", ASR {m0.asr:.3f} -> {m.asr:.3f}, RA {m.ra:.3f}" if attack else "") + f" ({rec['seconds']:.0f} s)")
    return rec


def _decision(scan_loss: dict, scan_rate: dict | None = None, priority: str | None = None) -> dict:
    from fire_onnx import invert

    scan = invert.Scan(n_classes=len(next(iter(scan_loss.values()))))
    rates = scan_rate or {}
    scan.results = {kind: [None if v is None else invert.ClassSearch(c, kind, v, (rates.get(kind) or [1.0] * len(losses))[c],
                                                                     None, None, 0.0)
                           for c, v in enumerate(losses)] for kind, losses in scan_loss.items()}
    default = invert.PRIORITY
    invert.PRIORITY = tuple(priority.split(",")) if priority else default
    try:
        cls, kind, index = scan.suspect
    finally:
        invert.PRIORITY = default
    return {"anomaly_index": index, "suspect": cls, "kind": kind, "backdoor_found": scan.found}


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def markdown(records: list[dict]) -> str:
    rows = ["| dataset | attack | seed | found (class, index) | target found | CA before → after | "
            "ASR before → after | RA after | rounds | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["attack"] == "none", r["dataset"], r["attack"], r["seed"])):
        if r.get("mode") != "trigger-free":
            continue
        if r.get("scan_loss"):  # the index as fire_onnx.invert computes it now, from the recorded losses
            r = dict(r, **_decision(r["scan_loss"], r.get("scan_rate"), r.get("priority")))
        found = f"{'yes' if r['backdoor_found'] else 'no'} ({r['suspect']}, {r['anomaly_index']:.2f} {r['kind']})"
        tf = "—" if r["target_found"] is None else ("yes" if r["target_found"] else "no")
        op = (" (translate)" if r.get("repair") == "translate" else "") + (
            f" ({r['priority'].split(',')[0]} first)" if r.get("priority") else "") + (
            " (both global forms)" if r.get("both_global") else "") + (
            f" (auto: {r['layer']})" if r.get("layer_choice") == "auto" else "")
        rows.append(f"| {r['dataset']} | {r['attack']}{op} | {r['seed']} | {found} | {tf} | {_pct(r['ca_original'])} → "
                    f"{_pct(r['ca'])} | {_pct(r['asr_original'])} → {_pct(r['asr'])} | {_pct(r['ra'])} | "
                    f"{r['rounds']} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="benchmarks/trigger_free")
    ap.add_argument("--cache", default="benchmarks/.cache/models")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--attacks", default=",".join(TF_ATTACKS))
    ap.add_argument("--clean", default="all", help="clean models to run: all, none, or dataset:seed,...")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--budget", type=float, default=900.0,
                    help="fit --budget (large by default, so the scan keeps its full steps on a busy machine)")
    ap.add_argument("--repair", default="project", choices=["project", "translate"],
                    help="fit --repair: the operator of the repair (gated either way)")
    ap.add_argument("--layer", default=None, choices=["auto"],
                    help="auto: fit --layer auto chooses where to repair (default: the benchmark's layer per attack)")
    ap.add_argument("--priority", default=None,
                    help="study: the order in which anomalous forms name the suspect, e.g. additive,blend,patch "
                         "(default: fire-onnx's, blend,additive,patch); recorded, and kept apart from default rows")
    ap.add_argument("--both-global", action="store_true",
                    help="study: where the suspect is anomalous as a blend and as an additive change, repair both "
                         "recovered triggers (one direction each); recorded, and kept apart from default rows")
    ap.add_argument("--quick", action="store_true", help="one cell: mnist5k badnets")
    args = ap.parse_args(argv)
    cells = [(ds, a, 0, ATTACKS[a][1]) for ds in args.datasets.split(",") for a in args.attacks.split(",") if a]
    if args.clean == "all":
        clean = CLEAN_MODELS
    elif args.clean == "none":
        clean = []
    else:
        clean = [(s.split(":")[0], int(s.split(":")[1])) for s in args.clean.split(",")]
    cells += [(ds, None, seed, CLEAN_LAYER) for ds, seed in clean]
    if args.quick:
        cells = [("mnist5k", "badnets", 0, ATTACKS["badnets"][1])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    key = lambda r: (r["dataset"], r["model"], r["attack"], r["mode"], r.get("seed"), r.get("layer"),  # noqa: E731
                     r.get("repair") or "project", r.get("layer_choice") or "benchmark", r.get("priority") or "",
                     bool(r.get("both_global")))
    t0 = time.perf_counter()
    for ds, attack, seed, layer in cells:
        log(f"[{ds} / {attack or 'clean model'} / seed {seed}]")
        save_records(path, [run(ds, attack, seed, layer, args)], key)
    write_table(out / "results.md", markdown(load_records(path)), f"{round(time.perf_counter() - t0)} s for this run.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
