#!/usr/bin/env python3
"""Compatibility sweep: ``inspect`` and ``patch`` every model of the onnx package's backend tests.

Walks ``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple,light}`` of the installed
onnx (models older than opset 9 are upgraded to opset 9 with ``onnx.version_converter`` first, as a
user would), and for each model:

1. runs ``fire-onnx inspect --all --json`` through the console script;
2. picks one float activation of rank >= 2 (an intermediate tensor, module outputs and
   post-activation tensors first; a graph output when the model has no other, as one-node models), runs the model in onnxruntime with that tensor exposed as an extra
   output (inputs: the test-data inputs next to the model, else seeded random ones), and builds a
   random directions file for it with :mod:`fire_onnx.directions` (random orthonormal ``U``, ``mu``
   near the activation mean, gate ``hard`` at tau = 0 or ``none``, layout flat / vector / token);
3. runs ``fire-onnx patch --json`` through the console script (input file hashed before and after);
4. runs the patched model with its repaired tensor exposed and checks it against
   :func:`fire_onnx.directions.reference_repair` of the original activation (numpy, float64), and
   checks the wiring: the original graph with the target tensor replaced by an input, fed the patched
   model's repaired tensor, must give the patched model's outputs.

Outcomes: ``ok``; ``refused`` (a clean one-line ``fire-onnx: error:``, grouped by reason); ``skipped``
(no float intermediate tensor, the version converter or onnxruntime rejects the *original* model: not
fire-onnx's business); ``traceback`` and ``mismatch`` (bugs; the sweep exits 1 when there is any).
Writes ``<out>/results.json`` and ``<out>/results.md``. Example::

    python tools/compat_sweep.py --out benchmarks/compat
    python tools/compat_sweep.py --suite light --only resnet --out /tmp/compat
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx

SUITES = ("pytorch-converted", "pytorch-operator", "simple", "light")
MIN_OPSET = 9
PREFERRED_NOTES = ("candidate", "splits")
TOL = {np.dtype(np.float16): 4e-3, np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-9}


def data_root() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def list_models(suites=SUITES, only: str | None = None) -> list[tuple[str, str, Path]]:
    """(suite, name, path) of every model of the suites, sorted; ``only`` filters names by substring."""
    out = []
    for suite in suites:
        root = data_root() / suite
        for entry in sorted(root.iterdir()):
            path = entry / "model.onnx" if entry.is_dir() else entry
            if path.suffix != ".onnx" or not path.is_file():
                continue
            name = entry.name if entry.is_dir() else entry.stem
            if only and only not in name:
                continue
            out.append((suite, name, path))
    return out


def fire_onnx_exe() -> list[str]:
    exe = shutil.which("fire-onnx", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "fire_onnx.cli"]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(fire_onnx_exe() + [str(a) for a in args], capture_output=True, text=True, timeout=600)


def cli_outcome(proc: subprocess.CompletedProcess) -> tuple[str, str]:
    """("ok", "") | ("refused", message) | ("traceback", tail) for one console-script run."""
    err = proc.stderr
    if "Traceback (most recent call last)" in err or proc.returncode not in (0, 1):
        return "traceback", err.strip()[-2000:] or f"exit {proc.returncode}"
    if proc.returncode == 1:
        lines = [ln for ln in err.splitlines() if ln.startswith("fire-onnx: error:")]
        if len(lines) != 1:
            return "traceback", f"exit 1 without exactly one error line: {err.strip()[-2000:]}"
        return "refused", lines[0][len("fire-onnx: error:"):].strip()
    return "ok", ""


def reason_of(message: str) -> str:
    """A refusal message with its names and numbers replaced, for grouping."""
    s = re.sub(r"'[^']*'", "'…'", message)
    s = re.sub(r"\([^()]*\)", "(…)", s)
    s = re.sub(r"\b\d+\b", "N", s)
    return s.split(";")[0].strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- models
def prepare(path: Path, dest: Path) -> tuple[onnx.ModelProto, str]:
    """Copy (or upgrade to opset 9) the model to ``dest``; returns (model, note)."""
    model = onnx.load(str(path))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    note = ""
    if opset < MIN_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, MIN_OPSET)
        note = f"opset {opset} -> {MIN_OPSET}"
    onnx.save(model, str(dest))
    return onnx.load(str(dest)), note


def _initializers(graph) -> set[str]:
    return {t.name for t in graph.initializer}


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = _initializers(model.graph)
    return [i for i in model.graph.input if i.name not in inits]


def load_inputs(model: onnx.ModelProto, model_path: Path, rng) -> dict | None:
    """Test-data inputs beside the model when there are any, else seeded random ones; None when an
    input is not a plain tensor (sequences, optionals, strings)."""
    inputs = real_inputs(model)
    data = model_path.parent / "test_data_set_0"
    if model_path.name == "model.onnx" and data.is_dir():
        feeds = {}
        files = sorted(data.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        if len(files) == len(inputs):
            for vi, f in zip(inputs, files):
                if not vi.type.HasField("tensor_type"):
                    return None
                t = onnx.TensorProto()
                t.ParseFromString(f.read_bytes())
                arr = onnx.numpy_helper.to_array(t)
                if arr.dtype.kind in "OSU":
                    return None
                feeds[vi.name] = arr
            return feeds
    feeds = {}
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            return None
        tt = vi.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except Exception:
            return None
        if dtype.kind in "OSU":
            return None
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


def session(model: onnx.ModelProto | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: list[str], elem: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` with intermediate tensors ``names`` added as graph outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, elem[n], None))
    return m


def with_tensor_as_input(model: onnx.ModelProto, name: str, elem: int, shape) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` whose readers of ``name`` (subgraphs included) read a new graph input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    new = "compat_sweep/replaced_input"

    def rewire(graph):
        for node in graph.node:
            for i, x in enumerate(node.input):
                if x == name:
                    node.input[i] = new
            for a in node.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    rewire(g)

    rewire(m.graph)
    m.graph.input.append(onnx.helper.make_tensor_value_info(new, elem, list(shape)))
    return m, new


def pick_tensor(cands: list[dict], outputs: set[str], elem: dict[str, int]) -> list[dict]:
    """Float activations (tensors computed by a node) of rank >= 2 from ``inspect --all``, best first:
    intermediate tensors before graph outputs (a one-node model has only its output to patch), static
    feature dimensions first, then inspect's likely targets."""
    pool = [c for c in cands if c["tensor"] in elem and isinstance(c.get("shape"), list) and len(c["shape"]) >= 2]

    def rank(c):
        static = all(isinstance(d, int) for d in c["shape"][1:])
        return (c["tensor"] in outputs, not static, not c["note"].startswith(PREFERRED_NOTES), not c["layers"])

    return sorted(pool, key=rank)


def random_directions(h: np.ndarray, name: str, layout: str, gate: str, seed: int):
    from fire_onnx import directions as dirs

    rng = np.random.default_rng(seed)
    x = h.reshape(-1, h.shape[-1]) if layout == "token" else (h.reshape(h.shape[0], -1) if layout == "flat" else h)
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[1]
    k = min(2, d)
    with np.errstate(all="ignore"):
        finite = np.where(np.isfinite(x), x, 0.0)
        mu = finite.mean(axis=0) + 0.1 * (finite.std() + 1e-3) * rng.standard_normal(d)
    # directions are stored in float32: some test data is uninitialised memory (1e223 in a double tensor)
    mu = np.clip(np.nan_to_num(mu), -1e30, 1e30)
    U = dirs.orthonormalize(rng.standard_normal((k, d)))
    t = dirs.Target(mu=mu.astype(np.float32), U=U.astype(np.float32), tau=np.zeros(k, np.float32),
                    alpha=np.array([1.0, 0.5][:k], np.float32), layout=layout, gate=gate, tensor=name,
                    feature_shape=[int(s) for s in h.shape[1:]])
    return dirs.Directions(targets=[t])


def close(a: np.ndarray, b: np.ndarray, tol: float) -> tuple[bool, float]:
    """Equal where both finite (to ``tol`` relative to the largest magnitude), same non-finite pattern."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False, float("inf")
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(fa, fb) or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False, float("inf")
    if not fa.any():
        return True, 0.0
    scale = max(1.0, float(np.max(np.abs(b[fb]))))
    err = float(np.max(np.abs(a[fa] - b[fb]))) / scale
    return err <= tol, err


# ------------------------------------------------------------------------------------ one model
def check_model(suite: str, name: str, path: Path, work: Path, index: int = 0) -> dict:
    """Run the whole check on one model; returns its result record."""
    from fire_onnx import directions as dirs
    from fire_onnx.onnxutil import infer_shapes, tensor_table

    rec: dict = {"suite": suite, "model": name}
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    model_path = work / "model.onnx"
    try:
        model, note = prepare(path, model_path)
    except Exception as e:  # the version converter or onnx itself: not fire-onnx
        return {**rec, "status": "skipped", "reason": f"onnx.version_converter fails: {str(e).splitlines()[0][:120]}"}
    rec.update(ir_version=int(model.ir_version), upgrade=note)

    proc = run_cli("inspect", model_path, "--all", "--json", work / "inspect.json")
    status, msg = cli_outcome(proc)
    rec["inspect"] = status
    if status == "traceback":
        return {**rec, "status": "traceback", "stage": "inspect", "reason": msg}
    if status == "refused":
        return {**rec, "status": "refused", "stage": "inspect", "reason": msg}
    cands = json.loads((work / "inspect.json").read_text())["candidates"]
    rec["candidates"] = len(cands)

    table = tensor_table(infer_shapes(model))
    elem = {n: e for n, (e, _) in table.items() if e in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                             onnx.TensorProto.DOUBLE)}
    outputs = {o.name for o in model.graph.output}
    pool = pick_tensor(cands, outputs, elem)
    if not pool:
        return {**rec, "status": "skipped", "reason": "no float activation of rank >= 2"}
    rng = np.random.default_rng(index)
    feeds = load_inputs(model, path, rng)
    if feeds is None:
        return {**rec, "status": "skipped", "reason": "inputs are not plain numeric tensors"}
    cand = pool[0]
    tname = cand["tensor"]
    rec["tensor"] = tname
    rec["graph_output"] = tname in outputs
    try:
        sess = session(with_outputs(model, [tname], elem))
        orig = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    except Exception as e:
        return {**rec, "status": "skipped", "reason": f"onnxruntime cannot run the original: {str(e).splitlines()[0][:120]}"}
    h = orig[tname]
    if h.ndim < 2 or h.size == 0:
        return {**rec, "status": "skipped", "reason": "the chosen tensor is empty or rank < 2 at run time"}
    layout = "vector" if h.ndim == 2 else ("token" if h.ndim == 3 and index % 2 else "flat")
    gate = "hard" if index % 3 else "none"
    rec.update(layout=layout, gate=gate, shape=list(h.shape))
    d = random_directions(h, tname, layout, gate, seed=index)
    dpath = work / "directions.npz"
    dirs.save(d, dpath)

    out_path = work / "model.fire.onnx"
    before = sha256(model_path)
    proc = run_cli("patch", model_path, dpath, "-o", out_path, "--json", work / "patch.json")
    status, msg = cli_outcome(proc)
    if sha256(model_path) != before:
        return {**rec, "status": "mismatch", "stage": "patch", "reason": "the input model was modified"}
    if status != "ok":
        if out_path.exists():
            return {**rec, "status": "mismatch", "stage": "patch", "reason": f"{status} but output written: {msg}"}
        return {**rec, "status": status, "stage": "patch", "reason": msg}
    summary = json.loads((work / "patch.json").read_text())
    repaired = summary["targets"][0]["output"]
    patched = onnx.load(str(out_path))
    rec["patched_ir_version"] = int(patched.ir_version)
    if patched.ir_version != model.ir_version or list(patched.opset_import) != list(model.opset_import):
        return {**rec, "status": "mismatch", "stage": "patch", "reason": "ir_version or opset changed"}
    try:
        onnx.checker.check_model(patched)
    except Exception as e:
        return {**rec, "status": "mismatch", "stage": "checker", "reason": str(e).splitlines()[0][:200]}
    try:
        ps = session(with_outputs(patched, [repaired], {repaired: elem[tname]}))
        got = dict(zip([o.name for o in ps.get_outputs()], ps.run(None, feeds)))
    except Exception as e:
        return {**rec, "status": "mismatch", "stage": "onnxruntime", "reason": str(e).splitlines()[0][:200]}
    y = got[repaired]
    tol = TOL.get(h.dtype, 2e-4)
    ref = dirs.reference_repair(h, d.targets[0])
    ok, err = close(y, ref, tol)
    rec["target_err"] = err
    if not ok:
        return {**rec, "status": "mismatch", "stage": "repair", "reason": f"repaired tensor differs from numpy (err {err:.3g})"}
    # wiring: the original graph fed the patched model's repaired tensor gives the patched outputs
    try:
        wired, inp = with_tensor_as_input(model, tname, elem[tname], h.shape)
        ws = session(wired)
        want = dict(zip([o.name for o in ws.get_outputs()], ws.run(None, {**feeds, inp: y})))
    except Exception as e:
        return {**rec, "status": "mismatch", "stage": "wiring", "reason": f"reference graph fails: {str(e).splitlines()[0][:160]}"}
    worst = 0.0
    for o in model.graph.output:
        if o.name == tname:  # the target itself is an output: its repaired value was checked above
            continue
        a, b = got.get(o.name), want.get(o.name)
        if a is None or b is None:
            return {**rec, "status": "mismatch", "stage": "wiring", "reason": f"output {o.name!r} missing"}
        if a.dtype.kind == "f":
            ok, err = close(a, b, 1e-4)
        else:
            ok, err = bool(np.array_equal(a, b)), 0.0
        worst = max(worst, err)
        if not ok:
            return {**rec, "status": "mismatch", "stage": "wiring", "reason": f"output {o.name!r} differs (err {err:.3g})"}
    rec.update(output_err=worst, status="ok", seconds=round(time.perf_counter() - t0, 2))
    return rec


# ------------------------------------------------------------------------------------- report
def render(records: list[dict]) -> str:
    suites = list(dict.fromkeys(r["suite"] for r in records))
    lines = ["# Compatibility sweep: the onnx package's backend test models", "",
             f"onnx {onnx.__version__}; each model: `fire-onnx inspect --all`, then `fire-onnx patch` at one float "
             "activation with random directions, checked in onnxruntime against a numpy reference of the repair and "
             "of the rewiring (tools/compat_sweep.py). Models older than opset 9 are upgraded with "
             "onnx.version_converter first.", "",
             "| suite | models | ok | clean refusals | skipped | tracebacks | mismatches |", "|---|---|---|---|---|---|---|"]
    tot = Counter()
    for s in suites:
        c = Counter(r["status"] for r in records if r["suite"] == s)
        n = sum(c.values())
        tot.update(c)
        lines.append(f"| {s} | {n} | {c['ok']} | {c['refused']} | {c['skipped']} | {c['traceback']} | {c['mismatch']} |")
    lines.append(f"| **all** | {sum(tot.values())} | {tot['ok']} | {tot['refused']} | {tot['skipped']} | "
                 f"{tot['traceback']} | {tot['mismatch']} |")
    for status, title in (("refused", "Clean refusals"), ("skipped", "Skipped (not fire-onnx's business)"),
                          ("traceback", "Tracebacks"), ("mismatch", "Mismatches")):
        groups = defaultdict(list)
        for r in records:
            if r["status"] == status:
                groups[(r.get("stage", ""), reason_of(r["reason"]))].append(r["model"])
        if not groups:
            continue
        lines += ["", f"## {title}", "", "| stage | reason | models |", "|---|---|---|"]
        for (stage, reason), models in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(models[:6]) + (f" … (+{len(models) - 6})" if len(models) > 6 else "")
            lines.append(f"| {stage or '-'} | {reason.replace('|', '/')} | {len(models)}: {shown} |")
    ok = [r for r in records if r["status"] == "ok"]
    ir3 = [r for r in ok if r.get("ir_version", 99) < 4]
    layouts = Counter(f"{r['layout']}/{r['gate']}" for r in ok)
    lines += ["", f"Patched and verified: {len(ok)} models, {len(ir3)} of them IR version < 4; "
              f"{sum(1 for r in records if r.get('upgrade'))} upgraded from an older opset; "
              f"{sum(1 for r in ok if r.get('graph_output'))} at a graph output (one-node models), the rest at an "
              f"intermediate tensor; layout/gate: " + ", ".join(f"{k} {v}" for k, v in sorted(layouts.items())) +
              f". Largest relative error of the repaired tensor: {max((r['target_err'] for r in ok), default=0):.2g}; "
              f"of the outputs (rewiring): {max((r['output_err'] for r in ok), default=0):.2g}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", action="append", choices=SUITES, help="default: all four")
    ap.add_argument("--only", default=None, help="only models whose name contains this")
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--keep", default=None, help="keep each model's work folder under this folder")
    ap.add_argument("--render", action="store_true", help="only rewrite results.md from <out>/results.json")
    args = ap.parse_args(argv)
    if args.render:
        records = json.loads((Path(args.out) / "results.json").read_text())["models"]
        (Path(args.out) / "results.md").write_text(render(records))
        print(render(records))
        return 0

    models = list_models(tuple(args.suite or SUITES), args.only)
    records = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for i, (suite, name, path) in enumerate(models):
            try:
                rec = check_model(suite, name, path, base / suite / name, index=i)
            except Exception as e:  # a bug in this tool: report it as a traceback, keep going
                import traceback

                rec = {"suite": suite, "model": name, "status": "traceback", "stage": "sweep",
                       "reason": "".join(traceback.format_exception(e))[-2000:]}
            records.append(rec)
            print(f"[{i + 1}/{len(models)}] {suite}/{name}: {rec['status']} {rec.get('reason', '')[:150]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"onnx": onnx.__version__, "seconds": round(time.perf_counter() - t0, 1),
                                                  "models": records}, indent=1) + "\n")
    (out / "results.md").write_text(render(records))
    print(render(records))
    bad = sum(r["status"] in ("traceback", "mismatch") for r in records)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
