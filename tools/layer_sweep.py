#!/usr/bin/env python3
"""Sweep layers x layouts x methods x gates for one backdoored model: which single-layer repair works?

Trains the demo's backdoored SmallCNN or ViT (or reuses ``--workdir`` if it already holds model.pt), fits
directions at every ``--layer`` with every method and gate from the same samples, and evaluates each
repair in PyTorch (forward hooks: the same computation as the ONNX patch, tested to 1e-5) on the
test split. Writes ``<out>/layer_sweep.json`` and ``<out>/layer_sweep.md``. Example::

    python tools/layer_sweep.py --data ../shared/data/gtsrb32.npz --trigger blended:alpha=0.2 \\
        --epochs 15 --out benchmarks/gtsrb32_blended_sweep
    python tools/layer_sweep.py --arch vit --epochs 10 --layouts flat,token --methods mean-diff:1 \
        --n-triggered 20 --out benchmarks/vit_badnets_sweep
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="npz with x_train/y_train/x_test/y_test (default: bundled MNIST-5k)")
    ap.add_argument("--trigger", default="badnets")
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=["small_cnn", "vit"], default="small_cnn")
    ap.add_argument("--layer", action="append", default=None,
                    help="default: block1 block1.1 block2 fc1_act (small_cnn), blocks.0 .. blocks.3 norm (vit)")
    ap.add_argument("--layouts", default="default", help="comma-separated: default, flat, token")
    ap.add_argument("--methods", default="mean-diff:1,subspace:3,subspace:8")
    ap.add_argument("--n-triggered", default="20,100")
    ap.add_argument("--n-clean", type=int, default=300)
    ap.add_argument("--workdir", default=None,
                    help="keep the trained model here and reuse it on the next run (default: a temporary folder)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    from fire_onnx import triggers
    from fire_onnx.data import Preprocess, bundled_mnist, fit_samples, load_images
    from fire_onnx.demo import build_arch, run_demo
    from fire_onnx.fileio import write_text_atomic
    from fire_onnx.fit import apply_in_torch, fit_directions

    import tempfile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = Path(args.workdir) if args.workdir else Path(tmp.name)
    data = Path(args.data) if args.data else bundled_mnist()
    t0 = time.perf_counter()
    if not (work / "model.pt").is_file():
        run_demo(work, data=data, trigger=args.trigger, target=args.target, epochs=args.epochs, seed=args.seed,
                 arch=args.arch, log=lambda s: None)
    train, test = load_images(data, "train"), load_images(data, "test")
    c = train.x.shape[-1]
    pre = Preprocess(scale=1 / 255, mean=[0.5] * c, std=[0.5] * c)
    model = build_arch(args.arch, int(max(train.y.max(), test.y.max()) + 1), c, train.x.shape[1])
    model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    model.eval()
    trig = triggers.parse(args.trigger)
    keep = test.y != args.target
    x_clean = torch.from_numpy(pre(test.x))
    x_trig = torch.from_numpy(pre(trig.apply(test.x[keep])))

    def evaluate(directions=None) -> dict:
        handles = apply_in_torch(model, directions) if directions else []
        try:
            with torch.no_grad():
                pc, pt = model(x_clean).argmax(1).numpy(), model(x_trig).argmax(1).numpy()
        finally:
            for h in handles:
                h.remove()
        return {"ca": float((pc == test.y).mean()), "asr": float((pt == args.target).mean()),
                "ra": float((pt == test.y[keep]).mean())}

    rows = []
    base = evaluate()
    for n_trig in [int(v) for v in args.n_triggered.split(",")]:
        clean, trig_imgs, source = fit_samples(train, n_clean=args.n_clean, n_triggered=n_trig, seed=args.seed,
                                               target=args.target, trigger=trig)
        default_layers = {"small_cnn": ["block1", "block1.1", "block2", "fc1_act"],
                          "vit": ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "norm"]}[args.arch]
        methods = [(m, int(k)) for m, _, k in (item.partition(":") for item in args.methods.split(","))]
        for layer in args.layer or default_layers:
            for layout in args.layouts.split(","):
                for method, k in methods:
                    for gate in ("auto", "hard", "none"):
                        d = fit_directions(model, [layer], clean, trig_imgs, pre, method=method, k=k, gate=gate,
                                           layout=None if layout == "default" else layout, triggered_source=source)
                        t = d.targets[0]
                        rows.append({"n_triggered": n_trig, "layer": layer, "layout": t.layout, "method": method,
                                     "k": k, "gate": gate, "tau_rule": t.fit["tau_rule"],
                                     "gate_fires_clean": t.fit["gate_fires_clean"], **evaluate(d)})
                        print(json.dumps(rows[-1]), flush=True)
    result = {"data": data.name, "arch": args.arch, "trigger": args.trigger, "target": args.target, "epochs": args.epochs,
              "seed": args.seed, "n_clean": args.n_clean, "original": base, "runs": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    write_text_atomic(out / "layer_sweep.json", json.dumps(result, indent=2) + "\n")
    md = [f"{data.name}, {args.trigger}, {args.arch} {args.epochs} epochs, seed {args.seed}: original CA "
          f"{100 * base['ca']:.1f} %, ASR {100 * base['asr']:.1f} %. Repairs evaluated in PyTorch (same math as the patch).",
          "", "| triggered | layer | layout | method | k | gate | tau | fires on clean | CA | ASR | RA |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['n_triggered']} | {r['layer']} | {r['layout']} | {r['method']} | {r['k']} | {r['gate']} | {r['tau_rule']} | "
                  f"{100 * r['gate_fires_clean']:.1f} % | {100 * r['ca']:.1f} | {100 * r['asr']:.1f} | {100 * r['ra']:.1f} |")
    write_text_atomic(out / "layer_sweep.md", "\n".join(md) + "\n")
    print("\n".join(md))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
