#!/usr/bin/env python3
"""Repair from unlabeled traffic (``fit --unlabeled``): the triggered inputs are found, not given.

For each (dataset, attack) the benchmark's backdoored SmallCNN (tools/bench_flagged.py: 10 % poisoning,
target 0, cached by recipe) sees *traffic*: ``--traffic`` (1,000) test-split images in a seeded random
order, of which ``--rate`` (5 %) carry the trigger (drawn from the non-target classes), the rest clean,
no labels. ``fit --unlabeled`` finds the triggered ones (fire_onnx.traffic) and fits on them as flagged
inputs, at the benchmark's layer for that attack (bench_flagged.ATTACKS) and with ``--layer auto``. The
repair is patched into the ONNX model and evaluated on the rest of the test split (the images not in the
traffic): CA, ASR (triggered non-target images classified as the target), RA.

Writes ``<out>/results.json`` (records keyed by dataset, model, attack, mode, layer; ``mode`` is
``unlabeled``; fractions) and ``<out>/unlabeled.md``. Example::

    python tools/bench_unlabeled.py --data-dir ../shared/data --out benchmarks/trigger_free \\
        --cache ../main/benchmarks/.cache/models
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_flagged import (ATTACKS, N_CLEAN, TARGET, flagged_split, load_cell, load_records,  # noqa: E402
                           make_recipe, save_records, train_or_reuse, write_table)

CELLS = [("cifar10", "badnets"), ("cifar10", "blended"), ("gtsrb32", "badnets"), ("gtsrb32", "blended"),
         ("mnist5k", "badnets"), ("mnist5k", "blended")]
MODE = "unlabeled"
CLEAN_MODE = "unlabeled-clean-traffic"  # the control: the same traffic without triggered inputs


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_traffic(test, trig, n: int, rate: float, seed: int):
    """(traffic images, is-triggered mask, test indices in the traffic): ``n`` test images (at most half
    the split) in a seeded random order, ``round(rate * n)`` of them (non-target classes) stamped with the trigger."""
    n = min(n, len(test) // 2)  # keep half the test split for the evaluation (MNIST-5k has 1,000 test images)
    order = np.random.default_rng(3000 + seed).permutation(len(test))[:n]
    n_trig = int(round(rate * n))
    non_target = np.nonzero(test.y[order] != TARGET)[0]
    pick = np.random.default_rng(4000 + seed).choice(non_target, size=n_trig, replace=False) if n_trig else []
    is_trig = np.zeros(n, bool)
    is_trig[pick] = True
    x = test.x[order].copy()
    if n_trig:
        x[is_trig] = trig.apply(x[is_trig])
    return x, is_trig, order


def run_cell(dataset: str, attack: str, args, layers: list[str], seed: int = 0, rate: float | None = None,
             mode: str = MODE) -> list[dict]:
    """The records of one cell: one per layer. ``rate`` (default ``args.rate``) is the triggered share of
    the traffic; ``rate=0`` with ``mode=CLEAN_MODE`` is the clean-traffic control (should find nothing)."""
    from fire_onnx import directions as dirs
    from fire_onnx.data import Images
    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.fit.pipeline import FitRequest, run_fit
    from fire_onnx.patch import patch_file
    from fire_onnx.traffic import NothingFound, SeveralFound

    spec, bench_layer = ATTACKS[attack]
    data_path = Path(args.data_dir) / f"{dataset}.npz"
    recipe = make_recipe(data_path, "small_cnn", spec, args.epochs, seed)
    onnx_path, _ = train_or_reuse(recipe, data_path, Path(args.cache))
    train, test, pre, trig, _ = load_cell(data_path, spec)
    c = train.x.shape[-1]
    _, pool = flagged_split(train, seed)
    rate = args.rate if rate is None else rate
    x_traffic, is_trig, in_traffic = make_traffic(test, trig, args.traffic, rate, seed)
    rest = np.setdiff1d(np.arange(len(test)), in_traffic)
    eval_clean = test.subset(rest)
    eval_trig = Images(trig.apply(eval_clean.x), eval_clean.y)
    orig = compute_metrics(session(str(onnx_path)), eval_clean, pre, eval_trig, TARGET)
    base = {"dataset": dataset, "model": "small_cnn", "attack": attack, "trigger": spec, "mode": mode, "seed": seed,
            "n_traffic": int(len(x_traffic)), "n_triggered_traffic": int(is_trig.sum()),
            "n_eval": int(len(rest)), "ca_original": orig.ca, "asr_original": orig.asr, "ra_original": orig.ra,
            "asr_floor": orig.asr_floor}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean_file, traffic_file = tmp / "clean.npz", tmp / "traffic.npz"
        np.savez(clean_file, x_train=train.x[pool], y_train=train.y[pool])
        np.savez(traffic_file, x=x_traffic)  # no labels
        for layer in layers:
            name = bench_layer if layer == "bench" else layer
            t0 = time.perf_counter()
            rec = dict(base, layer=name)
            req = FitRequest(layers=[name], clean_path=str(clean_file), onnx_path=str(onnx_path),
                             unlabeled_path=str(traffic_file), n_clean=N_CLEAN, seed=seed, scale=1 / 255,
                             mean=[0.5] * c, std=[0.5] * c)
            try:
                d = run_fit(req)
            except (NothingFound, SeveralFound) as e:  # SeveralFound: several classes confirmed, no repair
                ev = e.result.record()
                several = isinstance(e, SeveralFound)
                rec.update(target_found=False, n_found=0, precision=None, recall=0.0 if is_trig.any() else None,
                           ca=orig.ca, asr=orig.asr, ra=orig.ra, evidence=_short(ev),
                           candidate_classes=[cl for cl in ev["classes"] if cl.get("candidate")],
                           seconds=round(time.perf_counter() - t0, 1),
                           note=("several classes confirmed (several backdoors?): no repair" if several
                                 else "nothing confirmed: no repair"))
                out.append(rec)
                log(f"  {dataset} {attack} {name}: {'several classes confirmed' if several else 'nothing found'}")
                continue
            ev = d.meta["unlabeled"]
            found = np.zeros(len(x_traffic), bool)
            idx = np.asarray([int(i) for i in np.asarray(_found_indices(d, x_traffic))], np.int64)
            found[idx] = True
            tp = int((found & is_trig).sum())
            dpath, model = tmp / "d.npz", tmp / "m.fire.onnx"
            dirs.save(d, dpath)
            patch_file(onnx_path, dpath, model)
            m = compute_metrics(session(str(model)), eval_clean, pre, eval_trig, TARGET)
            t = d.targets[0]
            rc = d.meta.get("reconstruction") or {}
            rec.update(chosen_layer=t.module or t.tensor, target_found=bool(ev["found"] and ev["target"] == TARGET),
                       found_class=ev["target"], n_found=int(found.sum()),
                       precision=tp / max(int(found.sum()), 1),
                       recall=tp / int(is_trig.sum()) if is_trig.any() else None,
                       ca=m.ca, asr=m.asr, ra=m.ra, reconstruction=rc.get("kind"),
                       reconstruction_rate=rc.get("rate"), fit=rc.get("fit"),
                       evidence=_short(ev),
                       candidate_classes=[cl for cl in ev["classes"] if cl.get("candidate")],
                       seconds=round(time.perf_counter() - t0, 1))
            if layer == "bench" and is_trig.any() and args.references:
                rec.update(references(args, onnx_path, clean_file, tmp, x_traffic[is_trig], name, spec, c, seed,
                                      eval_clean, eval_trig, pre))
            out.append(rec)
            log(f"  {dataset} {attack} {name} ({rec['chosen_layer']}): class {ev['target']} found {rec['n_found']} "
                f"(precision {rec['precision']:.2f}, recall {rec['recall']:.2f}); CA {orig.ca:.3f}->{m.ca:.3f} "
                f"ASR {orig.asr:.3f}->{m.asr:.3f} RA {m.ra:.3f} ({rec['seconds']} s)")
    return out


def references(args, onnx_path, clean_file, tmp: Path, x_true, layer: str, spec: str, c: int, seed: int,
               eval_clean, eval_trig, pre) -> dict:
    """What the same layer reaches on the same evaluation split when the detection is perfect (``oracle``:
    the traffic's truly triggered inputs given as flagged inputs, ``--triggered``) and when the trigger
    is known (``paired``: ``--trigger``, 20 stamped clean images with their twins)."""
    from fire_onnx import directions as dirs
    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.fit.pipeline import FitRequest, run_fit
    from fire_onnx.patch import patch_file

    true_file = tmp / "true_triggered.npz"
    np.savez(true_file, x=x_true)
    out = {}
    for name, extra in (("oracle", {"triggered_path": str(true_file), "n_triggered": len(x_true)}),
                        ("paired", {"trigger_spec": spec, "target": TARGET, "n_triggered": 20})):
        req = FitRequest(layers=[layer], clean_path=str(clean_file), onnx_path=str(onnx_path), n_clean=N_CLEAN,
                         seed=seed, scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, force=True, **extra)
        dpath, model = tmp / f"{name}.npz", tmp / f"{name}.fire.onnx"
        dirs.save(run_fit(req), dpath)
        patch_file(onnx_path, dpath, model)
        m = compute_metrics(session(str(model)), eval_clean, pre, eval_trig, TARGET)
        out.update({f"ca_{name}": m.ca, f"asr_{name}": m.asr})
    return out


def _short(ev: dict) -> dict:
    """The evidence recorded with a benchmark record: without the per-class table and the indices."""
    return {k: v for k, v in ev.items() if k not in ("classes", "indices")}


def _found_indices(d, x_traffic: np.ndarray) -> np.ndarray:
    """The traffic indices ``fit`` found, from the evidence recorded in the directions file."""
    return np.asarray(d.meta["unlabeled"]["indices"], np.int64)


def markdown(records: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["Traffic: 1,000 test images (MNIST-5k: 500, half its test split), 5 % of them (non-target classes) "
             "triggered, no labels; the repair is fitted on the inputs `fit --unlabeled` found and confirmed (500 "
             "clean training images; the clean pool is the reference), evaluated on the rest of the test split. "
             "CA / ASR / RA in %. ASR floor: clean non-target images of the evaluation split the original model "
             "puts in the target class. At the benchmark's layer, on the same evaluation split: oracle = fitted on "
             "the traffic's truly triggered inputs as flagged inputs (perfect detection); paired = the trigger "
             "known (`--trigger`, 20 stamped clean images).", "",
             "| dataset | attack | layer | target found | found | precision | recall | reconstruction | "
             "original CA / ASR | ASR floor | repaired CA / ASR / RA | oracle ASR | paired ASR |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted((r for r in records if r.get("mode") == MODE), key=lambda r: (r["dataset"], r["attack"], r["layer"]))
    for r in rows:
        layer = r["layer"] + (f" ({r['chosen_layer']})" if r["layer"] == "auto" and r.get("chosen_layer") else "")
        lines.append(f"| {r['dataset']} | {r['attack']} | {layer} | {'yes' if r['target_found'] else 'no'} | "
                     f"{r['n_found']} | {pct(r['precision'])} | {pct(r['recall'])} | {r.get('reconstruction') or '-'} "
                     f"{pct(r.get('reconstruction_rate'))} | {pct(r['ca_original'])} / {pct(r['asr_original'])} | "
                     f"{pct(r.get('asr_floor'))} | {pct(r['ca'])} / {pct(r['asr'])} / {pct(r['ra'])} | "
                     f"{pct(r.get('asr_oracle'))} | {pct(r.get('asr_paired'))} |")
    clean = sorted((r for r in records if r.get("mode") == CLEAN_MODE), key=lambda r: (r["dataset"], r["attack"]))
    if clean:
        lines += ["", "Control: the same traffic with no triggered input (the backdoored models):", "",
                  "| dataset | attack | outcome | CA / ASR after |", "|---|---|---|---|"]
        for r in clean:
            what = ("nothing found (no repair)" if not r["n_found"] else
                    f"found {r['n_found']} inputs of class {r.get('found_class')} (a false find)")
            lines.append(f"| {r['dataset']} | {r['attack']} | {what} | {pct(r['ca'])} / {pct(r['asr'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="benchmarks/trigger_free")
    ap.add_argument("--cache", default="benchmarks/.cache/models", help="trained models, keyed by recipe hash")
    ap.add_argument("--cells", default=",".join(f"{d}:{a}" for d, a in CELLS), help="dataset:attack,...")
    ap.add_argument("--layers", default="bench,auto",
                    help="bench (the benchmark's layer for the attack), auto, or layer names")
    ap.add_argument("--traffic", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--no-references", dest="references", action="store_false",
                    help="skip the oracle (true triggered inputs) and paired (known trigger) fits at the bench layer")
    ap.add_argument("--clean-traffic", action="store_true",
                    help="also the control: the same traffic without triggered inputs, at the benchmark's layer")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    key = lambda r: (r["dataset"], r["model"], r["attack"], r["mode"], r.get("layer"))  # noqa: E731
    t0 = time.perf_counter()
    for cell in args.cells.split(","):
        ds, att = cell.split(":")
        log(f"[{ds} / {att}]")
        save_records(results, run_cell(ds, att, args, args.layers.split(",")), key)
        if args.clean_traffic:
            save_records(results, run_cell(ds, att, args, ["bench"], rate=0.0, mode=CLEAN_MODE), key)
    md = markdown(load_records(results))
    notes = out / "unlabeled_notes.md"  # the reading, kept by hand beside the generated table
    if notes.is_file():
        md += "\n\n" + notes.read_text().strip()
    write_table(out / "unlabeled.md", md, f"{round(time.perf_counter() - t0)} s for the last run.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
