#!/usr/bin/env python3
"""Repair from flagged inputs vs a known trigger: datasets x attacks x sample modes, in onnxruntime.

For each (dataset, attack, seed) a backdoored model is trained (10 % poisoning, all-to-one, target 0) or
reused from the cache (keyed by a hash of its recipe), exported to ONNX, and repaired with ``fit`` from the
ONNX model alone (activations read in onnxruntime; no model code), in several modes:

- ``original``: no repair;
- ``paired``: the trigger is known (``--trigger``): 20 stamped clean images, each with its clean twin;
- ``flagged``: 20 *flagged* images: triggered non-target training images, with no clean twin and no
  label (``--triggered flagged.npz`` holding only ``x``), drawn from images the clean pool does not hold;
- ``flagged-5``: the same with 5 flagged images;
- ``flagged-unpaired``: 20 flagged images, trigger reconstruction off (the plain unpaired estimate),
  when ``fit`` has a reconstruction to turn off;
- ``translate``: the FIRE paper's operator (subtract the unnormalized mean shift from every input,
  ``--repair translate --gate none``), paired, when ``fit`` has ``--repair translate``;
- ``translate-gated``: the same translation applied only where fire-onnx's gate fires (``--gate auto``);
- ``flagged-translate``: 20 flagged images (as ``flagged``), gated translation (``--repair translate``);
- ``flagged-auto``: 20 flagged images, ``fit --layer auto`` (the layer is chosen on held-out halves of
  the flagged images and held-out clean images; ``layer`` in the record is the chosen one).

Each repair is patched into the ONNX model and evaluated on the test split: CA, ASR (triggered
non-target images classified as the target), RA (triggered images classified as their true label).

Writes ``<out>/results.json`` (a list of records ``{dataset, model, attack, mode, n_triggered, seed, ca,
asr, ra, ...}``, fractions) and ``<out>/results.md``. Example::

    python tools/bench_flagged.py --data-dir ../shared/data --out benchmarks/flagged
    python tools/bench_flagged.py --data-dir ../shared/data --datasets mnist5k --attacks badnets --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ATTACKS = {  # name -> (trigger spec, layer of the SmallCNN to repair)
    "badnets": ("badnets", "block2"),
    "badnets-5x5": ("badnets:size=5", "block2"),
    "badnets-center": ("badnets:pos=center", "block2"),
    "blended": ("blended:alpha=0.2", "block1"),
    "sig": ("sig", "block1"),
    "wanet": ("wanet:k=4,s=2", "block2"),
    "adap-blend": ("blended:alpha=0.2,seed=5", "block1"),
    "inputaware": ("inputaware", "block2"),
}
# why an attack's 6-epoch SmallCNN may stay below 85 % ASR (tools/bench.py lists such cells)
WEAK = {
    "wanet": "a warp of about 1 px (s = 2, four times BackdoorBench's strength) against the same warp plus "
             "random 0.5 px jitter on twice as many correctly labelled images (noise mode): 6 epochs learn it only "
             "partly; BackdoorBench trains 100 epochs at s = 0.5",
    "adap-blend": "by design: poisoned and cover images carry the same partial triggers, so the full trigger "
                  "reaches the target only by extrapolation (Qi et al. report 60-80 % on ResNet-18)",
    "inputaware": "cross samples (the mask filled with another image's pattern, label kept) make the model check "
                  "that the pattern belongs to the image; 6 epochs learn that only partly on some datasets",
}
# attacks whose training recipe is not "stamp 10 % and relabel" (tools/attacks.py), keyed by trigger spec
POISON = {
    "wanet:k=4,s=2": {"kind": "wanet-noise", "rate": 0.1, "cross": 2, "noise": 0.5},
    "blended:alpha=0.2,seed=5": {"kind": "adap-blend", "rate": 0.1, "cover": 0.05, "pieces": 16, "keep": 0.5,
                                 "alpha_train": 0.15},
    "inputaware": {"kind": "inputaware-cross", "rate": 0.1, "cross": 1},
}
DATASETS = ["mnist5k", "fashion_mnist", "cifar10", "gtsrb32"]
MODES = ["original", "paired", "flagged", "flagged-5", "flagged-unpaired", "translate", "translate-gated",
         "flagged-translate", "flagged-auto"]
# PreAct-ResNet18 (BackdoorBench's network) at a quarter of its width, trained on CIFAR-10 only: 2 CPU cores
PREACT = {"arch": "preact18", "width": 16, "epochs": 12, "datasets": ["cifar10"], "attacks": ["badnets", "blended"],
          # the SmallCNN's block1 (global triggers) -> layer2, block2 (local and sample-specific ones) -> layer3
          "layers": {"badnets": "layer3", "blended": "layer2", "sig": "layer2", "adap-blend": "layer2",
                     "wanet": "layer3", "inputaware": "layer3", "badnets-5x5": "layer3", "badnets-center": "layer3"}}
TARGET = 0
POISON_RATE = 0.1
N_CLEAN = 500


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_recipe(data_path: Path, arch: str, spec: str, epochs: int, seed: int) -> dict:
    """The training recipe of a backdoored model (its hash keys the model cache; keep the keys stable)."""
    recipe = {"data": data_path.name, "size": data_path.stat().st_size, "arch": arch, "trigger": spec,
              "target": TARGET, "poison_rate": POISON_RATE, "epochs": epochs, "seed": seed}
    if spec in POISON:  # only then, so the hashes (cache keys) of the plain recipes stay as they were
        recipe.update(poison=POISON[spec], poison_rate=POISON[spec]["rate"])
    return recipe


def flagged_split(train, seed: int) -> tuple[list, np.ndarray]:
    """(indices of flagged-image sources, indices of the clean pool): flagged images come from a tenth of
    the training images (non-target ones) that the clean pool never sees."""
    order = np.random.default_rng(1000 + seed).permutation(len(train))
    flag_src = [i for i in order[: len(train) // 10] if train.y[i] != TARGET]
    return flag_src, order[len(train) // 10:]


def load_cell(data_path: Path, spec: str, limit: int | None = None):
    """(train, test, preprocess, trigger, triggered test images) of one benchmark cell: the test split
    cut to its first ``limit`` images, the preprocessing the benchmark models are trained with."""
    from fire_onnx import triggers
    from fire_onnx.data import Images, Preprocess, load_images

    train, test = load_images(data_path, "train"), load_images(data_path, "test")
    if limit:
        test = test.subset(slice(0, limit))
    c = train.x.shape[-1]
    pre = Preprocess(scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, layout="NCHW")
    trig = triggers.parse(spec)
    return train, test, pre, trig, Images(trig.apply(test.x), test.y)


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def train_or_reuse(recipe: dict, data_path: Path, cache: Path):
    """(onnx path, seconds spent training) for ``recipe``; trained once, then reused from ``cache``."""
    import torch

    from fire_onnx import triggers
    from fire_onnx.data import Preprocess, load_images
    from fire_onnx.demo import build_arch, poison, train_model
    from fire_onnx.fileio import atomic_path
    from fire_onnx.fit import export_onnx

    folder = cache / recipe_key(recipe)
    onnx_path = folder / "model.onnx"
    if onnx_path.is_file():
        return onnx_path, 0.0
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = load_images(data_path, "train"), load_images(data_path, "test")
    n_classes = int(max(train.y.max(), test.y.max()) + 1)
    h, _, c = train.x.shape[1:]
    pre = Preprocess(scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, layout="NCHW")
    poisoned = train  # a clean model (tools/bench_trigger_free.py): no trigger, nothing poisoned
    if recipe.get("poison"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import attacks
        from fire_onnx.data import Images

        px, py, _ = attacks.poison(train.x, train.y, triggers.parse(recipe["trigger"]), TARGET, recipe["poison"],
                                   np.random.default_rng(recipe["seed"]))
        poisoned = Images(px, py, train.classes)
    elif recipe["trigger"]:
        poisoned, _ = poison(train, triggers.parse(recipe["trigger"]), TARGET, recipe["poison_rate"],
                             np.random.default_rng(recipe["seed"]))
    torch.manual_seed(recipe["seed"])
    torch.set_num_threads(2)
    if recipe["arch"] == "preact18":
        from fire_onnx_models.preact_resnet import build

        model = build(n_classes, c, width=recipe["width"])
        train_augmented(model, pre(poisoned.x), poisoned.y, epochs=recipe["epochs"], seed=recipe["seed"],
                        flip=recipe["train"].endswith("-flip"))
    else:
        model = build_arch(recipe["arch"], n_classes, c, h)
        train_model(model, pre(poisoned.x), poisoned.y, epochs=recipe["epochs"], seed=recipe["seed"], log=log)
    with atomic_path(folder / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    with atomic_path(onnx_path) as tmp:
        export_onnx(model, pre(test.x[:2]), tmp)
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return onnx_path, time.perf_counter() - t0


def preact_recipe(recipe: dict, dataset: str) -> dict:
    """``recipe`` (make_recipe's) for the PreAct-ResNet18 of PREACT. Horizontal flips on CIFAR-10 only, as
    BackdoorBench trains: a mirrored traffic sign is another sign (keep left / keep right)."""
    flip = "-flip" if dataset == "cifar10" else ""
    return dict(recipe, width=PREACT["width"], epochs=PREACT["epochs"], train=f"sgd-onecycle-crop{flip}")


def train_augmented(model, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, batch_size: int = 128,
                    flip: bool = True):
    """SGD (momentum 0.9, weight decay 5e-4) with a one-cycle learning rate, random crop (pad 4) and
    (``flip``) horizontal flip, as BackdoorBench trains its networks (poisoning is applied before
    augmentation)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.25)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        correct = 0
        t0 = time.perf_counter()
        for i in range(0, len(xt), batch_size):
            b = perm[i: i + batch_size]
            xb = F.pad(xt[b], (4, 4, 4, 4), mode="reflect")
            dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
            xb = xb[:, :, dy: dy + x.shape[2], dx: dx + x.shape[3]]
            flip_b = (torch.rand(len(b), generator=g) < 0.5) & flip
            xb = torch.where(flip_b[:, None, None, None], xb.flip(3), xb)
            out = model(xb)
            loss = F.cross_entropy(out, yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((out.argmax(1) == yt[b]).sum())
        log(f"  epoch {ep + 1}/{epochs}: train acc {correct / len(xt):.3f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def fit_fields() -> set[str]:
    from fire_onnx.fit.pipeline import FitRequest

    return {f.name for f in dataclasses.fields(FitRequest)}


def run_cell(dataset: str, attack: str, seed: int, args, modes: list[str], arch: str = "small_cnn") -> list[dict]:
    from fire_onnx import directions as dirs
    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.fit.pipeline import FitRequest, run_fit
    from fire_onnx.patch import patch_file

    spec, layer = ATTACKS[attack]
    data_path = Path(args.data_dir) / f"{dataset}.npz"
    recipe = make_recipe(data_path, arch, spec, args.epochs, seed)
    if arch == "preact18":
        recipe = preact_recipe(recipe, dataset)
        layer = PREACT["layers"][attack]
    onnx_path, train_s = train_or_reuse(recipe, data_path, Path(args.cache))
    train, test, pre, trig, trig_test = load_cell(data_path, spec, args.limit)
    c = train.x.shape[-1]
    have = fit_fields()
    flag_src, pool = flagged_split(train, seed)
    model_name = f"preact18-w{PREACT['width']}" if arch == "preact18" else arch
    base = {"dataset": dataset, "model": model_name, "attack": attack, "trigger": spec, "layer": layer,
            "seed": seed, "epochs": recipe["epochs"], "train_seconds": round(train_s, 1)}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean_file = tmp / "clean.npz"
        np.savez(clean_file, x_train=train.x[pool], y_train=train.y[pool])

        def flagged_file(n: int) -> Path:
            p = tmp / f"flagged{n}.npz"
            np.savez(p, x=trig.apply(train.x[flag_src[:n]]))  # no labels, no clean twins
            return p

        for mode in modes:
            t0 = time.perf_counter()
            rec = dict(base, mode=mode)
            if mode == "original":
                model = onnx_path
                rec["n_triggered"] = 0
            else:
                req = dict(layers=[layer], clean_path=str(clean_file), onnx_path=str(onnx_path), target=TARGET,
                           n_clean=N_CLEAN, seed=seed, scale=1 / 255, mean=[0.5] * c, std=[0.5] * c,
                           force=True)  # measure also what fit's held-out check refuses (rec["check"] says)
                n = 5 if mode == "flagged-5" else 20
                if mode in ("paired", "translate", "translate-gated"):
                    req.update(trigger_spec=spec, n_triggered=n)
                else:
                    req.update(triggered_path=str(flagged_file(n)), n_triggered=n)
                if mode == "translate":
                    if "repair" not in have:
                        log(f"  {mode}: skipped (fit has no --repair translate)")
                        continue
                    req["repair"] = "translate"
                    req["gate"] = "none"  # the paper's operator: every input is translated
                if mode == "flagged-translate":  # flagged inputs, gated translation
                    if "repair" not in have:
                        continue
                    req["repair"] = "translate"
                if mode == "translate-gated":  # the paper's translation where fire-onnx's gate fires
                    if "repair" not in have:
                        continue
                    req["repair"] = "translate"
                if mode == "flagged-auto":  # flagged inputs and fit --layer auto: no layer given
                    if "clean_budget" not in have:
                        continue
                    req["layers"] = ["auto"]
                if mode == "flagged-unpaired":
                    if "reconstruct" not in have:
                        log(f"  {mode}: skipped (fit has no trigger reconstruction to turn off)")
                        continue
                    req["reconstruct"] = "off"
                try:
                    d = run_fit(FitRequest(**req))
                except Exception as e:  # a benchmark records failures instead of stopping
                    rec.update(error=f"{type(e).__name__}: {e}")
                    out.append(rec)
                    log(f"  {mode}: fit failed: {e}")
                    continue
                dpath = tmp / f"{mode}.npz"
                dirs.save(d, dpath)
                model = tmp / f"{mode}.fire.onnx"
                patch_file(onnx_path, dpath, model)
                t = d.targets[0]
                if mode == "flagged-auto":
                    rec["layer"] = t.module or t.tensor
                rec.update(n_triggered=n, gate=t.gate, separation_sigma=t.fit.get("separation_sigma", [None])[0],
                           reference=t.fit.get("reference"), warnings=list(t.fit.get("warnings", [])) +
                           list(d.meta.get("checks", {}).get("warnings", [])))
                if d.meta.get("reconstruction"):
                    rec["reconstruction"] = d.meta["reconstruction"]
                if d.meta.get("check"):
                    rec["check"] = d.meta["check"]
            m = compute_metrics(session(model), test, pre, trig_test, TARGET)
            rec.update(ca=m.ca, asr=m.asr, ra=m.ra, asr_floor=m.asr_floor, n_clean_test=m.n_clean,
                       n_triggered_test=m.n_triggered,
                       seconds=round(time.perf_counter() - t0, 1))
            out.append(rec)
            log(f"  {model_name} {dataset} {attack} seed {seed} {mode}: CA {m.ca:.3f} ASR {m.asr:.3f} RA {m.ra:.3f}")
    return out


def markdown(records: list[dict]) -> str:
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    lines = ["CA / ASR / RA in % (test split; ASR and RA over triggered non-target images). "
             "10 % poisoning, target 0; fit from the ONNX model with 500 clean training images.", "",
             "ASR floor: clean non-target test images the original model itself puts in the target class "
             "(no repair goes below it).", "",
             "| model | dataset | attack | seed | ASR floor | " + " | ".join(modes) + " |",
             "|---|---|---|---|---|" + "---|" * len(modes)]
    cells: dict = {}
    for r in records:
        cells.setdefault((r["model"], r["dataset"], r["attack"], r["seed"]), {})[r["mode"]] = r
    for (model, ds, att, seed), by in cells.items():
        row = []
        for m in modes:
            r = by.get(m)
            if r is None:
                row.append("")
            elif "error" in r:
                row.append("error")
            else:
                row.append(f"{100 * r['ca']:.1f} / {100 * r['asr']:.1f} / {100 * r['ra']:.1f}")
        floor = by.get("original", {}).get("asr_floor")
        floor = "" if floor is None else f"{100 * floor:.1f}"
        lines.append(f"| {model} | {ds} | {att} | {seed} | {floor} | " + " | ".join(row) + " |")
    recon = [(k, by["flagged"]["reconstruction"]) for k, by in cells.items()
             if "flagged" in by and by["flagged"].get("reconstruction")]
    if recon:
        lines += ["", "Trigger reconstruction chosen in `flagged` mode:", "",
                  "| model | dataset | attack | seed | chosen | confirmation |", "|---|---|---|---|---|---|"]
        for (model, ds, att, seed), rc in recon:
            lines.append(f"| {model} | {ds} | {att} | {seed} | {rc.get('kind', '?')} | {rc.get('rate', rc.get('confirmation', ''))} |")
    checked = [(k, m, by[m]) for k, by in cells.items() for m in ("flagged", "flagged-5")
               if m in by and "cross_fit" in (by[m].get("check") or {})]
    if checked:
        lines += ["", "What `fit` itself said (its held-out check, cross-fitted: each fold of the flagged images held out "
                  "of a fit on the others) beside the measured ASR:", "",
                  "| model | dataset | attack | mode | measured ASR | cross-fitted target rate | fit warned | blend fit "
                  "(cross-fitted rate: unpaired / pseudo-pairs) |", "|---|---|---|---|---|---|---|---|"]
        for (model, ds, att, _), m, r in checked:
            cross = r["check"]["cross_fit"].get("target_rate_after")
            warned = any("held out of the fit" in w for w in r.get("warnings", []))
            choice = (r.get("reconstruction") or {}).get("fit_choice")
            if choice and "error" in choice.get("pseudo-pairs", {}):
                choice = None
            blend = (f"{choice['chosen']} ({100 * choice['unpaired']['cross_fit_rate']:.0f} / "
                     f"{100 * choice['pseudo-pairs']['cross_fit_rate']:.0f})" if choice else "")
            lines.append(f"| {model} | {ds} | {att} | {m} | {100 * r['asr']:.1f} | "
                         f"{'' if cross is None else f'{100 * cross:.0f}'} | {'yes' if warned else 'no'} | {blend} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with mnist5k.npz, fashion_mnist.npz, cifar10.npz, gtsrb32.npz")
    ap.add_argument("--out", default="benchmarks/flagged", help="results folder (results.json, results.md)")
    ap.add_argument("--cache", default="benchmarks/.cache/models", help="trained models, keyed by recipe hash")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--archs", default="small_cnn,preact18",
                    help="small_cnn on every dataset x attack; preact18 (width 16) on cifar10 x badnets, blended")
    ap.add_argument("--fresh", action="store_true", help="drop the records of earlier runs in --out")
    ap.add_argument("--quick", action="store_true", help="one cell: mnist5k badnets, seed 0")
    args = ap.parse_args(argv)
    datasets, attacks = args.datasets.split(","), args.attacks.split(",")
    if args.quick:
        datasets, attacks = datasets[:1], attacks[:1]
    for a in attacks:
        if a not in ATTACKS:
            ap.error(f"unknown attack {a!r} (known: {', '.join(ATTACKS)})")
    modes = args.modes.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    t0 = time.perf_counter()
    archs = ["small_cnn"] if args.quick else args.archs.split(",")
    cells = [("small_cnn", ds, att) for ds in datasets for att in attacks] if "small_cnn" in archs else []
    if "preact18" in archs:
        cells += [("preact18", ds, att) for ds in PREACT["datasets"] for att in PREACT["attacks"]
                  if ds in datasets and att in attacks]
    # cells measured by earlier runs stay (a cell re-measured here replaces its old records)
    if args.fresh and results_path.is_file():
        from fire_onnx.fileio import write_text_atomic

        write_text_atomic(results_path, "[]\n")
    key = lambda r: (r["model"], r["dataset"], r["attack"], r["seed"], r["mode"])  # noqa: E731
    for arch, ds, att in cells:
        for seed in (int(s) for s in args.seeds.split(",")):
            log(f"[{arch} / {ds} / {att} / seed {seed}]")
            # written after every cell, so an interrupted run keeps what it measured
            save_records(results_path, run_cell(ds, att, seed, args, modes, arch=arch), key)
    write_table(out / "results.md", markdown(load_records(results_path)),
                f"{round(time.perf_counter() - t0)} s for this run (training included unless cached).")
    return 0


def write_table(path: Path, md: str, tail: str) -> None:
    """Write a benchmark's markdown table with the footer every results file ends with (fire-onnx and python
    versions, then ``tail``: the run's time and what it includes), and print the table."""
    from fire_onnx import __version__
    from fire_onnx.fileio import write_text_atomic

    write_text_atomic(path, md + f"\n\nfire-onnx {__version__}, python {platform.python_version()}, {tail}\n")
    print(md)


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def save_records(path: Path, new: list[dict], key) -> list[dict]:
    """Merge ``new`` into the records file ``path`` and return all its records: a record whose ``key``
    one of ``new`` has is replaced, the others stay. The file is re-read before every write, so runs of
    other cells at the same time do not drop each other's records; written atomically."""
    from fire_onnx.fileio import write_text_atomic

    fresh = {key(r) for r in new}
    records = [r for r in load_records(path) if key(r) not in fresh] + new
    write_text_atomic(path, json.dumps(records, indent=1, default=float) + "\n")
    return records


if __name__ == "__main__":
    raise SystemExit(main())
