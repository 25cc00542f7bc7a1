#!/usr/bin/env python3
"""A clean file drawn from the poisoned training set: what fit writes when the defender's "clean" images
hold the attack's poisoned images.

A defender often has no clean data but the training set the model was trained on, and that set carries
the attack: a tenth of it stamped with the trigger and relabelled to the target. For each (dataset, attack)
of ``tools/bench_flagged.py`` (same recipes, same model cache: nothing is retrained that it has trained),
the clean pool is the model's own *poisoned* training set (the images outside the flagged tenth, as the
model saw them), and the repair is fitted from the ONNX model alone in these modes:

- ``clean-pool``: the same images without the poisoning (the baseline: a clean validation file);
- ``poisoned``: the poisoned pool, ``--trigger`` known (20 stamped images): what ``fit`` writes now (it
  leaves the images that look triggered out of the clean reference and fits again);
- ``poisoned-no-exclusion``: the same with that step turned off (what ``fit`` wrote before; ``--force``,
  since fit's held-out check refused most of these);
- ``poisoned-flagged``: the poisoned pool with 20 flagged images (no trigger known);
- ``poisoned-auto``: the poisoned pool, ``--trigger``, ``--layer auto``.

Every repair is written with ``force`` (what the held-out check refuses is recorded in ``refused``), patched
into the ONNX model and evaluated on the test split. Records: ``{dataset, attack, mode, layer, ca, asr, ra,
asr_floor, n_poisoned_pool, clean_excluded, carry_trigger, refused, warnings}`` in ``<out>/results.json``,
and ``<out>/results.md``. Example::

    python tools/bench_poisoned_clean.py --data-dir ../shared/data --out benchmarks/poisoned_clean
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_flagged as bf  # noqa: E402 - the benchmark models, their recipes and cache

DATASETS = ["mnist5k", "fashion_mnist", "cifar10", "gtsrb32"]
ATTACKS = ["badnets", "blended"]
MODES = ["clean-pool", "poisoned", "poisoned-no-exclusion", "poisoned-flagged", "poisoned-auto"]
POOL = 1500  # clean-file images (the first of the pool, in the benchmark's order)


def run_cell(dataset: str, attack: str, args, modes: list[str]) -> list[dict]:
    from fire_onnx import directions as dirs
    from fire_onnx import triggers
    from fire_onnx.demo import poison
    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.fit import pipeline
    from fire_onnx.fit.pipeline import FitRequest, run_fit
    from fire_onnx.patch import patch_file

    spec, layer = bf.ATTACKS[attack]
    data_path = Path(args.data_dir) / f"{dataset}.npz"
    recipe = bf.make_recipe(data_path, "small_cnn", spec, args.epochs, 0)
    onnx_path, train_s = bf.train_or_reuse(recipe, data_path, Path(args.cache))
    train, test, pre, trig, trig_test = bf.load_cell(data_path, spec, args.limit)
    # the training set as the model saw it (train_or_reuse's poisoning, same seed)
    poisoned, idx = poison(train, triggers.parse(spec), bf.TARGET, recipe["poison_rate"], np.random.default_rng(0))
    flag_src, pool = bf.flagged_split(train, 0)
    pool = pool[:POOL]
    n_poisoned = int(np.isin(pool, idx).sum())
    c = train.x.shape[-1]
    base = {"dataset": dataset, "model": "small_cnn", "attack": attack, "trigger": spec, "epochs": recipe["epochs"],
            "pool": len(pool), "n_poisoned_pool": n_poisoned}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean_file, poisoned_file, flagged = tmp / "clean.npz", tmp / "poisoned.npz", tmp / "flagged.npz"
        np.savez(clean_file, x=train.x[pool], y=train.y[pool])
        np.savez(poisoned_file, x=poisoned.x[pool], y=poisoned.y[pool])
        np.savez(flagged, x=trig.apply(train.x[flag_src[:20]]))
        m = compute_metrics(session(onnx_path), test, pre, trig_test, bf.TARGET)
        out.append(dict(base, mode="original", layer="", ca=m.ca, asr=m.asr, ra=m.ra, asr_floor=m.asr_floor))
        for mode in modes:
            t0 = time.perf_counter()
            req = dict(layers=[layer], clean_path=str(poisoned_file), onnx_path=str(onnx_path), target=bf.TARGET,
                       seed=0, scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, trigger_spec=spec, n_triggered=20,
                       force=True)
            if mode == "clean-pool":
                req["clean_path"] = str(clean_file)
            if mode == "poisoned-flagged":
                req.update(trigger_spec=None, triggered_path=str(flagged))
            if mode == "poisoned-auto":
                req["layers"] = ["auto"]
            saved = pipeline.SUSPECT_ROUNDS
            if mode == "poisoned-no-exclusion":
                pipeline.SUSPECT_ROUNDS = 0
            try:
                d = run_fit(FitRequest(**req))
            except Exception as e:  # a benchmark records failures instead of stopping
                out.append(dict(base, mode=mode, error=f"{type(e).__name__}: {e}"))
                bf.log(f"  {dataset} {attack} {mode}: fit failed: {e}")
                continue
            finally:
                pipeline.SUSPECT_ROUNDS = saved
            dpath, model = tmp / f"directions-{mode}.npz", tmp / f"{mode}.fire.onnx"
            dirs.save(d, dpath)
            patch_file(onnx_path, dpath, model)
            m = compute_metrics(session(model), test, pre, trig_test, bf.TARGET)
            t = d.targets[0]
            ex = d.meta.get("clean_excluded") or {}
            out.append(dict(base, mode=mode, layer=t.module or t.tensor, ca=m.ca, asr=m.asr, ra=m.ra,
                            asr_floor=m.asr_floor, clean_excluded=ex.get("n", 0), carry_trigger=ex.get("carry_trigger"),
                            refused=(d.meta.get("check") or {}).get("refuse"),
                            warnings=list(d.meta.get("checks", {}).get("warnings", [])),
                            seconds=round(time.perf_counter() - t0, 1)))
            bf.log(f"  {dataset} {attack} {mode}: CA {m.ca:.3f} ASR {m.asr:.3f} RA {m.ra:.3f}, "
                   f"{ex.get('n', 0)} left out of {n_poisoned} poisoned")
    return out


def markdown(records: list[dict]) -> str:
    cells: dict = {}
    for r in records:
        cells.setdefault((r["dataset"], r["attack"]), {})[r["mode"]] = r
    cols = ["original"] + MODES
    lines = ["| dataset | attack | poisoned in pool | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    for (ds, att), by in sorted(cells.items()):
        row = []
        for mode in cols:
            r = by.get(mode)
            if r is None or "error" in r:
                row.append("-" if r is None else "error")
                continue
            cell = f"{100 * r['ca']:.1f} / {100 * r['asr']:.1f} / {100 * r['ra']:.1f}"
            if r.get("clean_excluded"):
                cell += f" ({r['clean_excluded']} left out)"
            if r.get("refused"):
                cell += " (refused)"
            if mode == "poisoned-auto" and r.get("layer"):
                cell += f" [{r['layer']}]"
            row.append(cell)
        n = next(iter(by.values()))["n_poisoned_pool"]
        pool = next(iter(by.values()))["pool"]
        lines.append(f"| {ds} | {att} | {n} of {pool} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with mnist5k.npz, fashion_mnist.npz, cifar10.npz, gtsrb32.npz")
    ap.add_argument("--out", default="benchmarks/poisoned_clean", help="results folder (results.json, results.md)")
    ap.add_argument("--cache", default="benchmarks/.cache/models", help="trained models, keyed by recipe hash")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--limit", type=int, default=3000, help="evaluate on the first N test images")
    args = ap.parse_args(argv)
    for a in args.attacks.split(","):
        if a not in bf.ATTACKS:
            ap.error(f"unknown attack {a!r} (known: {', '.join(bf.ATTACKS)})")
    for m in args.modes.split(","):  # an unknown one ran as a poisoned fit and replaced the 'original' record
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (known: {', '.join(MODES)}; 'original' is always measured)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    t0 = time.perf_counter()
    key = lambda r: (r["dataset"], r["attack"], r["mode"])  # noqa: E731
    for ds in args.datasets.split(","):
        for att in args.attacks.split(","):
            bf.log(f"[{ds} / {att}]")
            bf.save_records(results, run_cell(ds, att, args, args.modes.split(",")), key)
    bf.write_table(out / "results.md", markdown(bf.load_records(results)),
                   f"{round(time.perf_counter() - t0)} s for this run (training included unless cached).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
