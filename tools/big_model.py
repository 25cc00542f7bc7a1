#!/usr/bin/env python3
"""Patch a model past protobuf's 2 GiB limit end to end, and measure what it costs (not run in CI).

Builds a ~2.2 GB MLP on MNIST-shaped input (1x28x28 -> 784 -> H -> H -> H -> 10, ReLUs, random
weights; default H = 16384: two H x H float32 weights of 1 GiB each) whose weights live in an
external data file, then runs, each through the ``fire-onnx`` console script under
``/usr/bin/time -v`` (wall time and peak resident memory per step):

1. ``fire-onnx inspect`` (must list the hidden tensors),
2. ``fire-onnx fit --onnx`` (ONNX-only fit: activations read in onnxruntime, BadNets on the bundled
   MNIST digits; records the model fingerprint),
3. ``fire-onnx patch`` (checks the fingerprint, writes ``big.fire.onnx`` + ``big.fire.onnx.data``),

and checks the patched model's logits in onnxruntime against a numpy reference of the network and the
repair (weights read back from the data file with a memory map). Prints and writes a JSON summary.
Needs about 4x the model size of free disk and ~10 GB of memory; run it alone::

    nice -n 10 python tools/big_model.py --workdir /tmp/big --json benchmarks/big_model.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096
IN_DIM = 784
CLASSES = 10


def fire_onnx_exe() -> list[str]:
    exe = shutil.which("fire-onnx", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "fire_onnx.cli"]


def layer_shapes(hidden: int) -> list[tuple[str, tuple[int, int]]]:
    return [("w0", (IN_DIM, hidden)), ("w1", (hidden, hidden)), ("w2", (hidden, hidden)), ("w3", (hidden, CLASSES))]


def build(path: Path, hidden: int, seed: int = 0) -> None:
    """Write the model and its ``.data`` file, one weight in memory at a time."""
    data_name = path.name + ".data"
    inits = []
    rng = np.random.default_rng(seed)
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        for name, shape in layer_shapes(hidden):
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / shape[0]))
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(w.tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += w.nbytes
            inits.append(t)
            del w
    nodes = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w0"], ["mm0"], name="fc0"),
        helper.make_node("Relu", ["mm0"], ["hidden0"], name="relu0"),
        helper.make_node("MatMul", ["hidden0", "w1"], ["mm1"], name="fc1"),
        helper.make_node("Relu", ["mm1"], ["hidden1"], name="relu1"),
        helper.make_node("MatMul", ["hidden1", "w2"], ["mm2"], name="fc2"),
        helper.make_node("Relu", ["mm2"], ["hidden2"], name="relu2"),
        helper.make_node("MatMul", ["hidden2", "w3"], ["logits"], name="fc3"),
    ]
    inits.append(onnx.numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat_shape"))
    graph = helper.make_graph(
        nodes, "big_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="big_model.py")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))


def weights(path: Path) -> dict[str, np.ndarray]:
    """The weights of a model with external data, memory-mapped (read-only) from its data file(s)."""
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if "location" not in info:
            out[t.name] = onnx.numpy_helper.to_array(t)
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        out[t.name] = np.memmap(path.parent / info["location"], dtype=dtype, mode="r",
                                offset=int(info.get("offset", 0)), shape=tuple(t.dims))
    return out


def reference(w: dict, x: np.ndarray, repair=None) -> np.ndarray:
    """The network in numpy (float64 accumulation per layer), with ``repair`` applied to hidden1."""
    h = x.reshape(len(x), -1).astype(np.float32)
    h = np.maximum(h @ w["w0"], 0)
    h = np.maximum(h @ w["w1"], 0)
    if repair is not None:
        h = repair(h).astype(np.float32)
    h = np.maximum(h @ w["w2"], 0)
    return h @ w["w3"]


def timed(args: list, log: Path) -> dict:
    """Run the console script under /usr/bin/time -v; wall seconds and peak RSS (MB)."""
    cmd = (["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []) + fire_onnx_exe() + [str(a) for a in args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"fire-onnx {args[0]} failed ({proc.returncode}); see {log}:\n{proc.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None}


def sizes(path: Path) -> dict:
    data = path.with_name(path.name + ".data")
    return {"model_bytes": path.stat().st_size, "data_bytes": data.stat().st_size if data.exists() else 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="folder for the models (needs ~4x the model size of disk)")
    ap.add_argument("--hidden", type=int, default=16384, help="hidden width H (16384: ~2.2 GB of weights)")
    ap.add_argument("--n-clean", type=int, default=200)
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the models in --workdir")
    args = ap.parse_args(argv)

    from fire_onnx import directions as dirs
    from fire_onnx.data import bundled_mnist, load_images

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    big, dpath, out = work / "big.onnx", work / "big_directions.npz", work / "big.fire.onnx"
    summary: dict = {"hidden": args.hidden}
    t0 = time.perf_counter()
    build(big, args.hidden)
    summary["build_s"] = round(time.perf_counter() - t0, 1)
    summary["input"] = sizes(big)
    print(f"built {big}: {summary['input']}", flush=True)

    summary["inspect"] = timed(["inspect", big, "--json", work / "inspect.json"], work / "inspect.log")
    cands = json.loads((work / "inspect.json").read_text())["candidates"]
    listed = {c["tensor"]: c for c in cands}
    assert "hidden1" in listed and listed["hidden1"]["shape"] == ["N", args.hidden], listed.get("hidden1")
    print(f"inspect: {summary['inspect']}", flush=True)

    summary["fit"] = timed(["fit", "--onnx", big, "--layer", "hidden1", "--clean", bundled_mnist(), "--trigger", "badnets",
                            "--target", "0", "--n-clean", args.n_clean, "--n-triggered", 20, "--gate", "none",
                            "--batch-size", 32, "-o", dpath], work / "fit.log")
    print(f"fit: {summary['fit']}", flush=True)

    before = (big.stat().st_mtime_ns, big.stat().st_size)
    summary["patch"] = timed(["patch", big, dpath, "-o", out, "--json", work / "patch.json"], work / "patch.log")
    assert (big.stat().st_mtime_ns, big.stat().st_size) == before, "the input model changed"
    summary["output"] = sizes(out)
    patch_warnings = json.loads((work / "patch.json").read_text()).get("warnings", [])
    assert not any("fingerprint" in w for w in patch_warnings), patch_warnings  # checked, and it matched
    print(f"patch: {summary['patch']} -> {summary['output']}", flush=True)

    # onnxruntime vs numpy, on clean test digits and the same digits with the BadNets trigger
    import onnxruntime as ort

    from fire_onnx import triggers

    d = dirs.load(dpath)
    imgs = load_images(bundled_mnist(), "test")
    xs = imgs.x[:16]
    trig = triggers.parse("badnets").apply(xs)
    x = np.concatenate([xs, trig]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    w = weights(big)
    ref_orig = reference(w, x)
    ref_patched = reference(w, x, lambda h: dirs.reference_repair(h, d.targets[0]))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    res = {}
    for name, path in (("original", big), ("patched", out)):
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        res[name] = sess.run(None, {"input": x})[0]
        del sess
    scale = float(np.abs(ref_patched).max())
    err_orig = float(np.abs(res["original"] - ref_orig).max()) / scale
    err_patched = float(np.abs(res["patched"] - ref_patched).max()) / scale
    changed = float(np.abs(ref_patched - ref_orig).max()) / scale
    summary["check"] = {"max_rel_err_original": err_orig, "max_rel_err_patched": err_patched,
                        "repair_changes_logits_by": changed}
    print(f"check: {summary['check']}", flush=True)
    assert err_orig < 1e-3 and err_patched < 1e-3, summary["check"]
    assert changed > 10 * err_patched, "the repair did not change the logits measurably"
    import resource

    summary["check_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    if not args.keep:
        for p in (big, out):
            for q in (p, p.with_name(p.name + ".data")):
                if q.exists():
                    q.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
