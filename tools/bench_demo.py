#!/usr/bin/env python3
"""Re-runnable benchmark of the demo pipeline: attacks x seeds on MNIST-sized data, plus latency.

For each (trigger, layer) and seed it trains a backdoored SmallCNN, fits on 20 triggered + 300 clean
training images, patches the ONNX model and evaluates CA / ASR / RA in onnxruntime; then it measures
the patched/original latency ratio of one patched model side by side (interleaved runs).

Writes ``<out>/demo_bench.json`` and ``<out>/demo_bench.md``. Example::

    python tools/bench_demo.py --out benchmarks                      # bundled MNIST-5k
    python tools/bench_demo.py --data ../shared/data/fashion_mnist.npz --out benchmarks/fmnist
    python tools/bench_demo.py --arch vit --epochs 10 --case badnets@blocks.0 --out benchmarks/vit
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

DEFAULT_CASES = ["badnets@block2", "blended:alpha=0.2@block1", "sig@block1"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="npz with x_train/y_train/x_test/y_test (default: bundled MNIST-5k)")
    ap.add_argument("--case", action="append", default=None, help="TRIGGER@LAYER (repeatable); default: %s" % DEFAULT_CASES)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--arch", choices=["small_cnn", "vit"], default="small_cnn")
    ap.add_argument("--iters", type=int, default=300, help="latency runs per model and batch size")
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)

    from fire_onnx import __version__
    from fire_onnx import bench
    from fire_onnx.demo import run_demo
    from fire_onnx.fileio import write_text_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, latency = [], None
    t0 = time.perf_counter()
    for case in args.case or DEFAULT_CASES:
        trigger, _, layer = case.partition("@")
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                r = run_demo(tmp, data=args.data, trigger=trigger, layer=layer or None, arch=args.arch,
                             epochs=args.epochs, seed=seed, log=lambda s: None)
                if latency is None:
                    latency = bench.compare(Path(tmp) / "model.onnx", Path(tmp) / "model.fire.onnx",
                                            batches=(1, 64), iters=args.iters, warmup=30, threads=1)
            rows.append({"trigger": trigger, "layer": r["config"]["layer"], "seed": seed, "gate": r["config"]["gate"],
                         "original": r["original"], "patched": r["patched"]})
            print(f"{trigger} @ {layer} seed {seed}: CA {r['original']['ca']:.3f} -> {r['patched']['ca']:.3f}, "
                  f"ASR {r['original']['asr']:.3f} -> {r['patched']['asr']:.3f}, RA {r['patched']['ra']:.3f}",
                  file=sys.stderr)
    result = {
        "fire_onnx": __version__, "data": Path(args.data).name if args.data else "mnist5k (bundled)",
        "arch": args.arch, "epochs": args.epochs, "seeds": seeds, "n_triggered_fit": 20, "n_clean_fit": 300,
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "seconds": round(time.perf_counter() - t0, 1), "runs": rows, "latency": latency,
    }
    write_text_atomic(out / "demo_bench.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "demo_bench.md", markdown(result) + "\n")
    print(markdown(result))
    return 0


def markdown(res: dict) -> str:
    lines = [
        f"Data: {res['data']}; {res.get('arch', 'small_cnn')}, {res['epochs']} epochs, 10 % poisoning, target 0; fit on "
        f"{res['n_triggered_fit']} triggered + {res['n_clean_fit']} clean images; seeds {res['seeds']}. "
        "Mean ± std over seeds, in %.",
        "",
        "| trigger | layer | gate | CA original | CA patched | ASR original | ASR patched | RA patched |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for r in res["runs"]:
        groups.setdefault((r["trigger"], r["layer"]), []).append(r)
    for (trig, layer), rs in groups.items():
        def ms(side, key):
            v = 100 * np.array([r[side][key] for r in rs])
            return f"{v.mean():.1f} ± {v.std():.1f}"
        gates = "/".join(sorted({r["gate"] for r in rs}))
        lines.append(f"| {trig} | {layer} | {gates} | {ms('original', 'ca')} | {ms('patched', 'ca')} | "
                     f"{ms('original', 'asr')} | {ms('patched', 'asr')} | {ms('patched', 'ra')} |")
    if res.get("latency"):
        from fire_onnx.bench import markdown as lat_md

        lines += ["", "Latency (first run's model, interleaved, CPU):", "", lat_md(res["latency"])]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
