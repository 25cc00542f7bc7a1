"""Hostile inputs never crash fire-onnx (issue 5, items 11 and 12).

- Output paths are checked before any work: an output that is a folder, in a missing, non-folder or
  read-only folder, equal to an input or named twice is a one-line error (exit 1) and nothing is written.
- Directions files and ONNX metadata are untrusted: headers that are not objects, fields of the wrong
  type, 200k-deep JSON, npy headers that claim terabytes, wrong dtypes and shapes, extra or missing
  arrays, corrupt ``fire_onnx.*`` metadata. Each is either accepted (when it is valid) or refused with a
  one-line FireError; corrupt preprocessing is never replaced by defaults.
- Property-based: hypothesis feeds well over 1,000 generated malformed directions files and metadata
  to ``patch``, ``inspect`` and ``eval`` (in-process, through the click command, where anything but a
  FireError fails the test); the nastiest cases also go through the real console script.

Everything runs on a tiny ONNX model built with onnx.helper (Conv 1x1 -> Relu -> Reshape -> MatMul on
4x4 one-channel images), so each case costs milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import run_cli, set_fire_metadata, sha
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from fire_onnx import directions as dirs
from fire_onnx import probe as probes
from fire_onnx.cli import cli, main
from fire_onnx.data import Preprocess
from fire_onnx.errors import FireError

ERR = "fire-onnx: error: "
PRE = Preprocess(scale=1 / 255, mean=[0.5], std=[0.5], layout="NCHW")


# ------------------------------------------------------------------------------ the tiny model
def tiny_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(2, 1, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b"),
             numpy_helper.from_array(rng.normal(size=(32, 3)).astype(np.float32), "g"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "s")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Reshape", ["relu", "s"], ["flat"], name="flat"),
             helper.make_node("MatMul", ["flat", "g"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_directions(model: onnx.ModelProto) -> dirs.Directions:
    """Valid directions at ``relu`` with a real fingerprint of ``model`` (so patch goes all the way)."""
    x = np.random.default_rng(1).integers(0, 256, size=(16, 4, 4, 1), dtype=np.uint8)
    probe_x = probes.probe_images(x)
    acts, _ = probes.TensorReader(model, ["relu"])(PRE(probe_x))
    U = dirs.orthonormalize(np.random.default_rng(2).normal(size=(1, 32))).astype(np.float32)
    t = dirs.Target(mu=np.zeros(32, np.float32), U=U, tau=np.ones(1, np.float32), alpha=np.ones(1, np.float32),
                    layout="flat", gate="hard", tensor="relu", feature_shape=[2, 4, 4],
                    fit={"method": "mean-diff"}, fingerprint=probes.fingerprint(acts["relu"]))
    return dirs.Directions([t], preprocess=PRE.as_dict(), meta={"target": 0, "trigger": {"kind": "badnets"}},
                           probe=probe_x)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A folder with tiny.onnx, d.npz (valid directions), tiny.fire.onnx (patched) and data.npz."""
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_model()
    onnx.save(model, str(root / "tiny.onnx"))
    dirs.save(tiny_directions(model), root / "d.npz")
    x = np.random.default_rng(3).integers(0, 256, size=(8, 4, 4, 1), dtype=np.uint8)
    np.savez(root / "data.npz", x=x, y=np.arange(8) % 3)
    from fire_onnx.patch import patch_file

    patch_file(root / "tiny.onnx", root / "d.npz", root / "tiny.fire.onnx")
    return root


@pytest.fixture
def ws(base, tmp_path) -> Path:
    for name in ("tiny.onnx", "d.npz", "tiny.fire.onnx", "data.npz"):
        shutil.copyfile(base / name, tmp_path / name)
    return tmp_path


def run_here(*args, cwd) -> subprocess.CompletedProcess:
    """``fire_onnx.cli.main`` (what the console script runs) in this process, for speed: exit code, stdout
    and stderr as from the console script; an exception other than a user error propagates (fails the test)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def fire(*args, cwd, real: bool = False) -> subprocess.CompletedProcess:
    """The real console script for the main cases (``real``), else the same entry point in-process."""
    return run_cli(*args, cwd=cwd) if real else run_here(*args, cwd=cwd)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(proc, folder: Path, before: dict, *expect: str) -> str:
    """Exit 1, one 'fire-onnx: error:' line on stderr, no traceback, the folder unchanged."""
    where = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 1, where
    assert "Traceback" not in proc.stderr, where
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERR) and lines[0][len(ERR):].strip(), where
    assert snapshot(folder) == before, where
    for e in expect:
        assert e in lines[0], f"{e!r} not in {lines[0]!r}"
    return lines[0]


def header_of(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["header"][()]))


def arrays_of(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_npz(path, arrays: dict) -> None:
    """np.savez, object arrays included (pickled, which fire-onnx must refuse)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def npy_bytes(descr: str, shape: tuple, data: bytes = b"", fortran: bool = False) -> bytes:
    """A .npy member whose header claims ``shape`` of ``descr`` whatever ``data`` really holds."""
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode("latin1")
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def array_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def write_members(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def valid_members(src) -> dict[str, bytes]:
    return {f"{k}.npy": array_npy(v) for k, v in arrays_of(src).items()}


# ============================================================================ item 11: output paths
def _unwritable_folder(ws: Path) -> Path | None:
    """A read-only folder, or None where permissions do not stop this user (root)."""
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / ".probe").write_bytes(b"")
    except OSError:
        return ro
    (ro / ".probe").unlink()
    ro.chmod(0o755)
    return None


OUTPUT_CASES = {
    # name: (argv with OUT for the bad output, expected message part)
    "patch-o-folder": (["patch", "tiny.onnx", "d.npz", "-o", "OUT_DIR"], "is a folder"),
    "patch-default-folder": (["patch", "tiny.onnx", "d.npz"], "is a folder"),
    "patch-json-folder": (["patch", "tiny.onnx", "d.npz", "-o", "p.onnx", "--json", "OUT_DIR"], "is a folder"),
    "patch-json-missing-folder": (["patch", "tiny.onnx", "d.npz", "-o", "p.onnx", "--json", "no/p.json"],
                                  "does not exist"),
    "patch-json-under-file": (["patch", "tiny.onnx", "d.npz", "-o", "p.onnx", "--json", "data.npz/p.json"],
                              "not a folder"),
    "patch-json-is-output": (["patch", "tiny.onnx", "d.npz", "-o", "p.onnx", "--json", "p.onnx"], "named twice"),
    "patch-o-is-model": (["patch", "tiny.onnx", "d.npz", "-o", "tiny.onnx"], "never overwrites"),
    "patch-o-is-link-to-model": (["patch", "tiny.onnx", "d.npz", "-o", "LINK"], "never overwrites"),
    "fit-o-folder": (["fit", "--onnx", "tiny.onnx", "--layer", "relu", "--clean", "data.npz", "--trigger", "badnets",
                      "--target", "0", "-o", "OUT_DIR"], "is a folder"),
    "fit-default-folder": (["fit", "--onnx", "tiny.onnx", "--layer", "relu", "--clean", "data.npz", "--trigger",
                            "badnets", "--target", "0"], "is a folder"),
    "fit-json-under-file": (["fit", "--onnx", "tiny.onnx", "--layer", "relu", "--clean", "data.npz", "--trigger",
                             "badnets", "--target", "0", "-o", "f.npz", "--json", "d.npz/f.json"], "not a folder"),
    "inspect-json-folder": (["inspect", "tiny.onnx", "--json", "OUT_DIR"], "is a folder"),
    "eval-json-folder": (["eval", "tiny.onnx", "--data", "data.npz", "--json", "OUT_DIR"], "is a folder"),
    "eval-json-missing-folder": (["eval", "tiny.onnx", "--data", "data.npz", "--json", "no/e.json"], "does not exist"),
    "bench-json-folder": (["bench", "tiny.onnx", "tiny.fire.onnx", "--iters", "5", "--json", "OUT_DIR"], "is a folder"),
    "bench-markdown-is-json": (["bench", "tiny.onnx", "tiny.fire.onnx", "--iters", "5", "--json", "b.json",
                                "--markdown", "b.json"], "named twice"),
    "demo-output-is-file": (["demo", "-o", "data.npz"], "not a folder"),
    "demo-output-under-file": (["demo", "-o", "data.npz/out"], "not a folder"),
    "demo-artifact-is-folder": (["demo", "-o", "demo", "--data", "data.npz"], "is a folder"),
    "demo-artifact-is-data": (["demo", "-o", "demo", "--data", "demo/model.onnx"], "never overwrites"),
}


REAL_OUTPUT_CASES = {"patch-json-folder", "patch-o-is-link-to-model", "eval-json-missing-folder", "demo-output-is-file"}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_bad_output_path_is_refused_before_any_work(ws, case):
    argv, expect = OUTPUT_CASES[case]
    (ws / "OUT_DIR").mkdir()
    (ws / "tiny.fire.onnx").rename(ws / "tiny.fire.onnx.keep")
    (ws / "tiny.fire.onnx").mkdir()  # the default output of 'patch tiny.onnx' is a folder
    (ws / "directions.npz").mkdir()  # the default output of 'fit'
    (ws / "demo" / "model.fire.onnx").mkdir(parents=True)
    shutil.copyfile(ws / "tiny.onnx", ws / "demo" / "model.onnx")
    os.symlink(ws / "tiny.onnx", ws / "LINK")
    argv = ["tiny.fire.onnx.keep" if a == "tiny.fire.onnx" and argv[0] == "bench" else a for a in argv]
    before = snapshot(ws)
    assert_user_error(fire(*argv, cwd=ws, real=case in REAL_OUTPUT_CASES), ws, before, expect)


@pytest.mark.parametrize("cmd", ["patch-o", "patch-json", "eval-json", "inspect-json", "demo"])
def test_read_only_folder_is_refused_before_any_work(ws, cmd):
    ro = _unwritable_folder(ws)
    if ro is None:
        pytest.skip("permissions do not stop this user (root); the unwritable cases above still run")
    argv = {"patch-o": ["patch", "tiny.onnx", "d.npz", "-o", ro / "p.onnx"],
            "patch-json": ["patch", "tiny.onnx", "d.npz", "-o", "p.onnx", "--json", ro / "p.json"],
            "eval-json": ["eval", "tiny.onnx", "--data", "data.npz", "--json", ro / "e.json"],
            "inspect-json": ["inspect", "tiny.onnx", "--json", ro / "i.json"],
            "demo": ["demo", "-o", ro / "out"]}[cmd]
    before = snapshot(ws)
    try:
        assert_user_error(fire(*argv, cwd=ws, real=cmd == "patch-o"), ws, before, "cannot write")
    finally:
        ro.chmod(0o755)


def test_a_pipe_or_device_report_is_written_in_place_not_replaced(ws):
    """A JSON report to a device or pipe (``--json /dev/null``, a CI idiom) is written into it, never
    replaced by a regular file; a model output there is refused (models are moved into place)."""
    import threading

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    fifo = ws / "report.pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    proc = run_here("patch", "tiny.onnx", "d.npz", "-o", "p.onnx", "--json", fifo, cwd=ws)
    reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(got[0])["output"] == "p.onnx" and (ws / "p.onnx").is_file()
    assert not fifo.is_file() and fifo.exists()  # still the pipe
    before = snapshot(ws)
    assert_user_error(run_here("patch", "tiny.onnx", "d.npz", "-o", fifo, cwd=ws), ws, before, "not a regular file")
    assert not fifo.is_file() and fifo.exists()


def test_library_patch_file_checks_its_output(ws):
    from fire_onnx.patch import patch_file

    (ws / "folder.onnx").mkdir()
    before = snapshot(ws)
    for out, msg in ((ws / "folder.onnx", "is a folder"), (ws / "tiny.onnx", "never overwrites"),
                     (ws / "d.npz" / "x.onnx", "not a folder")):
        with pytest.raises(FireError, match=msg):
            patch_file(ws / "tiny.onnx", ws / "d.npz", out)
    assert snapshot(ws) == before


# =========================================================== item 12: hostile headers, library level
def rewrite(src, dst, header=None, drop=(), arrays=None, **named):
    """A copy of the npz ``src`` with its header (a JSON value, or text) and arrays replaced, some dropped."""
    a = arrays_of(src)
    if header is not None:
        a["header"] = np.array(header if isinstance(header, str) else json.dumps(header))
    for k in drop:
        a.pop(k, None)
    a.update(arrays or {}, **named)
    write_npz(dst, a)
    return dst


def _set(h: dict, path: tuple, value):
    node = h
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return h


DEEP = "[" * 200_000 + "]" * 200_000
HEADER_CASES = {
    "list": ([1, 2, 3], "not an object"),
    "number": (42, "not an object"),
    "string": ('"just text"', "not an object"),
    "deep": (DEEP, "nested too deeply"),
    "deep-70": ("[" * 70 + "]" * 70, "nested more than"),
    "not-json": ("{format: nope", "not valid JSON"),
    "huge-int": ('{"format": 1' + "0" * 5000 + "}", "not valid JSON"),
    "format-list": (("format",), ["x"]),
    "schema-bool": (("schema_version",), True),
    "schema-huge": (("schema_version",), 10**400),
    "preprocess-str": (("preprocess",), "NCHW"),
    "preprocess-list": (("preprocess",), [1 / 255]),
    "preprocess-partial": (("preprocess",), {"mean": [0.5]}),
    "preprocess-scale-str": (("preprocess", "scale"), "1/255"),
    "preprocess-std-nan": (("preprocess", "std"), [float("nan")]),
    "preprocess-std-huge": (("preprocess", "std"), [10**400]),
    "preprocess-mean-bool": (("preprocess", "mean"), [True]),
    "meta-list": (("meta",), ["target", 0]),
    "meta-target-str": (("meta", "target"), "0"),
    "meta-target-bool": (("meta", "target"), True),
    "meta-trigger-str": (("meta", "trigger"), "badnets"),
    "targets-dict": (("targets",), {"0": {}}),
    "target-list": (("targets", 0), ["relu"]),
    "layout-list": (("targets", 0, "layout"), ["flat"]),
    "tensor-number": (("targets", 0, "tensor"), 7),
    "feature-shape-str": (("targets", 0, "feature_shape"), "2x4x4"),
    "feature-shape-floats": (("targets", 0, "feature_shape"), [2.0, 4.5, 4]),
    "feature-shape-bools": (("targets", 0, "feature_shape"), [True, True]),
    "feature-shape-huge": (("targets", 0, "feature_shape"), [10**400]),
    "fit-str": (("targets", 0, "fit"), "mean-diff"),
    "fit-pairs": (("targets", 0, "fit"), [["method", "x"]]),
    "fingerprint-list": (("targets", 0, "fingerprint"), [1, 2]),
    "fingerprint-stats-str": (("targets", 0, "fingerprint", "stats"), "0.1,0.2"),
    "fingerprint-stats-huge": (("targets", 0, "fingerprint", "stats"), [[10**400] * 10] * 3),
    "fingerprint-stats-rows": (("targets", 0, "fingerprint", "stats"), [[0.0] * 10] * 2),
    "dim-wrong": (("targets", 0, "dim"), 31),
    "k-str": (("targets", 0, "k"), "1"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_hostile_header_is_a_one_line_error(base, tmp_path, case):
    a, b = HEADER_CASES[case]
    if isinstance(a, tuple):
        header = _set(header_of(base / "d.npz"), a, b)
        expect = None
    else:
        header, expect = (a if isinstance(a, str) else json.dumps(a)), b
    p = rewrite(base / "d.npz", tmp_path / "bad.npz", header=header)
    with pytest.raises(FireError) as e:
        dirs.load(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and len(msg) < 600
    if expect:
        assert expect in msg


ARRAY_CASES = {
    "mu-complex": ({"t0.mu": np.zeros(32, np.complex64)}, "floating-point"),
    "mu-int": ({"t0.mu": np.zeros(32, np.int64)}, "floating-point"),
    "mu-bool": ({"t0.mu": np.zeros(32, bool)}, "floating-point"),
    "mu-str": ({"t0.mu": np.array(["a"] * 32)}, "floating-point"),
    "mu-object": ({"t0.mu": np.array([{"a": 1}], dtype=object)}, "pickled"),
    "mu-shape": ({"t0.mu": np.zeros((4, 8), np.float32)}, "mu has shape"),
    "mu-huge": ({"t0.mu": "HUGE"}, "too large"),
    "U-3d": ({"t0.U": np.zeros((1, 32, 1), np.float32)}, "shape (k, D)"),
    "U-empty": ({"t0.U": np.zeros((0, 32), np.float32)}, "U has shape (0, 32)"),
    "U-scalar": ({"t0.U": np.float32(1)}, "shape (k, D)"),
    "tau-inf": ({"t0.tau": np.array([np.inf], np.float32)}, "infinite"),
    "alpha-shape": ({"t0.alpha": np.ones(3, np.float32)}, "alpha has shape"),
    "probe-float": ({"probe.x": np.zeros((3, 4, 4, 1), np.float32)}, "uint8"),
    "probe-3d": ({"probe.x": np.zeros((3, 4, 4), np.uint8)}, "uint8"),
    "header-number": ({"header": np.array(3.5)}, "not a JSON string"),
    "header-2": ({"header": np.array(["{}", "{}"])}, "not a JSON string"),
    "extra-target": ({"t1.mu": np.zeros(32, np.float32)}, "unexpected arrays t1.mu"),
    "extra-member": ({"junk": np.zeros(3)}, "unexpected arrays junk"),
}


@pytest.mark.parametrize("case", list(ARRAY_CASES))
def test_hostile_arrays_are_one_line_errors(base, tmp_path, case):
    arrays, expect = ARRAY_CASES[case]
    if "t0.mu" in arrays and isinstance(arrays["t0.mu"], str):  # U mu overflows float32
        arrays = {"t0.mu": (np.sign(arrays_of(base / "d.npz")["t0.U"][0]) * 3e38).astype(np.float32)}
    p = rewrite(base / "d.npz", tmp_path / "bad.npz", arrays=arrays)
    with pytest.raises(FireError, match=re.escape(expect)):
        dirs.load(p)


@pytest.mark.parametrize("member", ["t0.U", "t0.mu", "header"])
def test_missing_arrays_are_named(base, tmp_path, member):
    p = rewrite(base / "d.npz", tmp_path / "bad.npz", drop=[member])
    with pytest.raises(FireError, match="missing array t0.U" if member == "t0.U" else
                       ("missing array t0.mu" if member == "t0.mu" else "no 'header'")):
        dirs.load(p)


@pytest.mark.parametrize("descr,shape", [
    ("<f4", (10**12,)),  # 4 TB of float32
    ("<f8", (2**40, 2**20)),  # far past any memory
    ("<c16", (10**9, 10**9)),
    ("<U100", (10**13,)),
    ("<f4", (-1,)),
    ("<f4", (2**62, 2**62)),  # overflows intp
    ("|V0", (10**30,)),  # zero-size items: nothing to read, but no 10**30-element array either
], ids=["4TB", "huge-2d", "complex", "unicode", "negative", "overflow", "void0"])
def test_npy_header_claiming_huge_arrays_is_refused_before_allocating(base, tmp_path, descr, shape):
    members = valid_members(base / "d.npz")
    members["t0.U.npy"] = npy_bytes(descr, shape, b"\0" * 128)
    p = tmp_path / "huge.npz"
    write_members(p, members)
    with pytest.raises(FireError) as e:
        dirs.load(p)
    assert "not a valid npz" in str(e.value) or "t0.U" in str(e.value)


def test_non_npy_members_and_broken_zips_are_refused(base, tmp_path):
    members = valid_members(base / "d.npz")
    members["readme.txt"] = b"hello"
    write_members(tmp_path / "a.npz", members)
    with pytest.raises(FireError, match="not a .npy array"):
        dirs.load(tmp_path / "a.npz")
    members = valid_members(base / "d.npz")
    members["t0.U.npy"] = b"not npy at all"
    write_members(tmp_path / "b.npz", members)
    with pytest.raises(FireError, match="not a valid npz"):
        dirs.load(tmp_path / "b.npz")
    raw = (base / "d.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(raw[: len(raw) // 2] + raw[-200:])  # truncated data, intact-looking tail
    with pytest.raises(FireError):
        dirs.load(tmp_path / "c.npz")


def test_valid_file_still_loads_and_round_trips(base, tmp_path):
    d = dirs.load(base / "d.npz")
    assert d.preprocess == PRE.as_dict() and d.meta["target"] == 0
    dirs.save(d, tmp_path / "again.npz")
    assert dirs.load(tmp_path / "again.npz").targets[0].tensor == "relu"


# ================================================================== item 12: hostile ONNX metadata
def with_meta(src: Path, dst: Path, scopes: str | None = None, **props) -> Path:
    """A copy of ``src`` whose fire_onnx.<key> metadata are set to the given strings (None: removed) and,
    with ``scopes``, every node's ``pkg.torch.onnx.name_scopes`` (the dynamo exporter's module scopes)."""
    m = onnx.load(str(src))
    if scopes is not None:
        for node in m.graph.node:
            node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes)
    set_fire_metadata(m, **props)
    dst.write_bytes(m.SerializeToString())
    return dst


@pytest.mark.parametrize("value", ['5', '"relu"', '[1, 2]', '[{"tensor": 3, "output": "x"}]', "{not json", DEEP,
                                   '{"tensor": "relu"}'],
                         ids=["number", "string", "list-of-ints", "tensor-int", "not-json", "deep", "object"])
def test_corrupt_targets_metadata(ws, value):
    bad = with_meta(ws / "tiny.fire.onnx", ws / "bad.onnx", targets=value)
    real = value is DEEP
    proc = fire("inspect", bad, cwd=ws, real=real)  # inspect still lists the model and says what is wrong
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "repaired by fire-onnx" in proc.stdout and "(its fire_onnx.targets metadata" in proc.stdout
    before = snapshot(ws)
    assert_user_error(fire("patch", bad, "d.npz", "--replace", "-o", "p.onnx", cwd=ws, real=real), ws, before,
                      "fire_onnx.targets")


@pytest.mark.parametrize("value,why", [
    (DEEP, "nested too deeply"),
    ('{"scale": 1' + "0" * 400 + ', "mean": [0.5], "std": [0.5], "layout": "NCHW"}', "non-finite"),
    ('{"scale": 0.0039, "mean": [1e39], "std": [0.5], "layout": "NCHW"}', "non-finite"),
    ('{"scale": 0.0039, "mean": [0.5], "std": [0.5], "layout": ["NCHW"]}', "layout"),
    ('null', "not a JSON object"),
], ids=["deep", "huge-int", "float32-overflow", "layout-list", "null"])
def test_corrupt_preprocess_metadata_is_an_error_not_a_default(ws, value, why):
    bad = with_meta(ws / "tiny.fire.onnx", ws / "bad.onnx", preprocess=value)
    before = snapshot(ws)
    assert_user_error(fire("eval", bad, "--data", "data.npz", "--json", "e.json", cwd=ws, real=value is DEEP), ws,
                      before, "bad.onnx", "fire_onnx.preprocess", why)


@pytest.mark.parametrize("value", [DEEP, '{"target": true}', '{"target": "0"}', '[0]', '{"trigger": "badnets"}'],
                         ids=["deep", "bool", "str", "list", "trigger-str"])
def test_corrupt_attack_metadata_is_a_loud_warning(ws, value):
    bad = with_meta(ws / "tiny.fire.onnx", ws / "bad.onnx", attack=value)
    proc = fire("eval", bad, "--data", "data.npz", "--trigger", "badnets", "--target", "0", "--json", "-", cwd=ws,
                real=value is DEEP)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "bad.onnx: its fire_onnx.attack metadata is not a JSON object" in proc.stderr


# ===================================================================== the nastiest, via the console script
NASTY = {
    "deep-header": lambda p, base: rewrite(base / "d.npz", p, header=DEEP),
    "list-header": lambda p, base: rewrite(base / "d.npz", p, header=[{"format": dirs.FORMAT}]),
    "preprocess-string": lambda p, base: rewrite(base / "d.npz", p,
                                                 header=_set(header_of(base / "d.npz"), ("preprocess",), "x")),
    "terabyte-npy": lambda p, base: write_members(p, {**valid_members(base / "d.npz"),
                                                      "t0.U.npy": npy_bytes("<f4", (2**38, 4), b"\0" * 64)}),
    "object-dtype": lambda p, base: rewrite(base / "d.npz", p, arrays={"t0.alpha": np.array([None], dtype=object)}),
}


@pytest.mark.parametrize("case", list(NASTY))
def test_nastiest_directions_through_the_console_script(ws, base, case):
    NASTY[case](ws / "bad.npz", base)
    before = snapshot(ws)
    assert_user_error(fire("patch", "tiny.onnx", "bad.npz", "-o", "p.onnx", "--json", "p.json", cwd=ws,
                           real=case in ("deep-header", "list-header", "terabyte-npy")), ws, before, "bad.npz")


# ============================================================================ property-based
FIELDS = ["format", "schema_version", "preprocess", "meta", "targets", "scale", "mean", "std", "layout", "target",
          "trigger", "tensor", "module", "gate", "feature_shape", "fit", "fingerprint", "version", "stats", "dim",
          "k", "kind"]
WORDS = ["flat", "vector", "token", "hard", "none", "NCHW", "NHWC", "relu", "conv", "logits", "x", dirs.FORMAT, ""]
LEAVES = (st.none() | st.booleans() | st.integers() | st.sampled_from([0, 1, -1, 32, 2**63, 10**400, -10**30])
          | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(WORDS) | st.text(max_size=12))
JSON = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), kids, max_size=4), max_leaves=10)
PATHS = [(), ("format",), ("schema_version",), ("preprocess",), ("preprocess", "scale"), ("preprocess", "mean"),
         ("preprocess", "std"), ("preprocess", "layout"), ("meta",), ("meta", "target"), ("meta", "trigger"),
         ("targets",), ("targets", 0), ("targets", 0, "layout"), ("targets", 0, "gate"), ("targets", 0, "tensor"),
         ("targets", 0, "module"), ("targets", 0, "feature_shape"), ("targets", 0, "feature_shape", 0),
         ("targets", 0, "fit"), ("targets", 0, "fingerprint"), ("targets", 0, "fingerprint", "version"),
         ("targets", 0, "fingerprint", "stats"), ("targets", 0, "fingerprint", "stats", 0),
         ("targets", 0, "fingerprint", "stats", 0, 0), ("targets", 0, "dim"), ("targets", 0, "k"), ("targets", 1)]


def deep(n: int, inner: str = "0") -> str:
    return "[" * n + inner + "]" * n


def mutate_json(draw, doc) -> str:
    """``doc`` (a JSON value) as text after 1-3 edits at known or random paths: set to any JSON value,
    delete, or replace by deep nesting; sometimes the text itself is garbage."""
    kind = draw(st.sampled_from(["edit"] * 6 + ["any", "text", "deep", "truncate"]))
    if kind == "any":
        return json.dumps(draw(JSON))
    if kind == "text":
        return draw(st.text(max_size=40))
    if kind == "deep":
        return deep(draw(st.sampled_from([65, 1000, 5000, 200_000])))
    text = json.dumps(doc)
    if kind == "truncate":
        return text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    doc = json.loads(text)
    placeholder = "@@DEEP@@"
    deep_text = None
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        op = draw(st.sampled_from(["set", "set", "set", "delete", "deep"]))
        value = draw(JSON) if op == "set" else placeholder
        if op == "deep":
            deep_text = deep(draw(st.sampled_from([63, 64, 200, 200_000])))
        if not path:
            doc = value if op != "delete" else {}
            continue
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            last = path[-1]
            if op == "delete":
                if isinstance(node, dict):
                    node.pop(last, None)
                elif isinstance(node, list) and isinstance(last, int) and last < len(node):
                    node.pop(last)
            elif isinstance(node, dict):
                node[last] = value
            elif isinstance(node, list) and isinstance(last, int):
                if last < len(node):
                    node[last] = value
                else:
                    node.append(value)
        except (KeyError, IndexError, TypeError):
            pass
    text = json.dumps(doc)
    return text.replace(json.dumps(placeholder), deep_text or "null")


DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_, np.complex64, "<U3", "S2",
          ">f4"]
MEMBERS = ["t0.mu", "t0.U", "t0.tau", "t0.alpha", "probe.x", "header", "t1.mu", "extra"]


@st.composite
def directions_file(draw, base_header: dict, base_arrays: dict):
    """(zip members, note): a directions file damaged at the header, the arrays, the npy headers or the zip."""
    arrays = {k: array_npy(v) for k, v in base_arrays.items()}
    what = draw(st.sampled_from(["header"] * 5 + ["array"] * 3 + ["npy-header", "zip", "mixed"]))
    if what in ("header", "mixed"):
        arrays["header"] = array_npy(np.array(mutate_json(draw, base_header)))
    if what in ("array", "mixed"):
        for _ in range(draw(st.integers(1, 2))):
            name = draw(st.sampled_from(MEMBERS))
            op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "object"]))
            if op == "delete":
                arrays.pop(name, None)
            elif op == "object":
                arrays[name] = array_npy(np.array([draw(JSON)], dtype=object))
            else:
                arr = draw(hnp.arrays(dtype=st.sampled_from(DTYPES),
                                      shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40)))
                arrays[name] = array_npy(arr)
    if what == "npy-header":
        name = draw(st.sampled_from(MEMBERS[:6]))
        descr = draw(st.sampled_from(["<f4", "<f8", "|u1", "<c8", "<i8", "|O", "<U4", "|V0", "bogus", "<f4,<f4"]))
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 3, 32, -1, 2**31, 10**12, 2**62]), max_size=3)))
        raw = npy_bytes(descr, shape, draw(st.binary(max_size=256)), fortran=draw(st.booleans()))
        if draw(st.booleans()):  # and sometimes a damaged header dictionary
            cut = draw(st.integers(10, len(raw)))
            raw = raw[:cut] + draw(st.binary(max_size=8)) + raw[cut + 8:]
        arrays[name] = raw
    members = {f"{k}.npy": v for k, v in arrays.items()}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    raw = buf.getvalue()
    if what == "zip":
        op = draw(st.sampled_from(["flip", "truncate", "flip"]))
        if op == "truncate":
            raw = raw[: draw(st.integers(0, len(raw)))]
        else:
            b = bytearray(raw)
            for _ in range(draw(st.integers(1, 8))):
                b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
            raw = bytes(b)
    return raw


class Outcomes:
    """Runs commands in-process through click; anything but success or a FireError fails the test."""

    def __init__(self):
        self.runner = CliRunner()
        self.count = 0
        self.errors = 0

    def run(self, args: list, outputs: list[Path] = ()) -> str | None:
        self.count += 1
        res = self.runner.invoke(cli, [str(a) for a in args], standalone_mode=False, catch_exceptions=True)
        exc = res.exception
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            return None
        if isinstance(exc, SystemExit) and exc.code == 3:  # eval's --fail-* exit (not used here, but not a crash)
            return "exit 3"
        if isinstance(exc, FireError):
            msg = str(exc)
            assert msg and "\n" not in msg, repr(msg)
            for out in outputs:  # a refusal writes nothing
                assert not Path(out).exists(), f"{out} written although the command failed: {msg}"
            self.errors += 1
            return msg
        import traceback

        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        raise AssertionError(f"fire-onnx {' '.join(map(str, args))} raised {type(exc).__name__} (a traceback, not "
                             f"a one-line error):\n{tb}")


PROPERTY = settings(max_examples=700, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_generated_malformed_directions_never_crash_patch(base, tmp_path):
    header, arrays = header_of(base / "d.npz"), arrays_of(base / "d.npz")
    out = Outcomes()
    seq = itertools.count()

    @PROPERTY
    @given(directions_file(header, arrays))
    def case(raw):
        i = next(seq)
        src = tmp_path / f"d{i}.npz"
        src.write_bytes(raw)
        target, report = tmp_path / f"p{i}.onnx", tmp_path / f"p{i}.json"
        out.run(["patch", base / "tiny.onnx", src, "-o", target, "--json", report], [target, report])
        for p in (src, target, report):
            if p.exists():
                p.unlink()
        assert not list(tmp_path.glob("*.tmp"))

    case()
    assert out.count >= 700 and out.errors >= 0.7 * out.count, (out.count, out.errors)


@st.composite
def metadata(draw, recorded: dict):
    """fire_onnx.* metadata values: absent, valid, edited, any JSON, garbage text or deep nesting; and
    node scope metadata (valid, garbage or deep)."""
    props = {}
    for key in ("targets", "preprocess", "attack", "version"):
        how = draw(st.sampled_from(["keep", "edit", "edit", "absent", "any"]))
        valid = recorded.get(key)
        if how == "keep":
            props[key] = valid
        elif how == "absent":
            props[key] = None
        elif how == "any":
            props[key] = draw(st.one_of(st.text(max_size=30), JSON.map(json.dumps)))
        else:
            doc = json.loads(valid) if key != "version" else valid
            props[key] = mutate_json(draw, doc)
    props["scopes"] = draw(st.one_of(st.none(), st.text(max_size=30), JSON.map(repr), st.sampled_from(
        ["[" * 5000, "(" * 300 + ")" * 300, "{'a': 1}", "7"]),
        st.lists(st.sampled_from(["", "block", "block.0", "relu", "aten::relu"]), max_size=4).map(repr)))
    return props


def test_generated_malformed_metadata_never_crash_inspect_eval_patch(base, tmp_path):
    model = onnx.load(str(base / "tiny.fire.onnx"))
    recorded = {p.key[len("fire_onnx."):]: p.value for p in model.metadata_props if p.key.startswith("fire_onnx.")}
    assert {"targets", "preprocess", "attack"} <= set(recorded)
    out = Outcomes()
    seq = itertools.count()

    @settings(PROPERTY, max_examples=300)
    @given(metadata(recorded), st.booleans())
    def case(props, patched):
        i = next(seq)
        src = base / ("tiny.fire.onnx" if patched else "tiny.onnx")
        bad = with_meta(src, tmp_path / f"m{i}.onnx", **props)
        outs = [tmp_path / f"{n}{i}.json" for n in "iep"] + [tmp_path / f"p{i}.onnx"]
        out.run(["inspect", bad, "--all", "--json", outs[0]], [outs[0]])
        out.run(["eval", bad, "--data", base / "data.npz", "--trigger", "badnets", "--target", "1", "--json", outs[1]],
                [outs[1]])
        out.run(["patch", bad, base / "d.npz", "--replace", "-o", outs[3], "--json", outs[2]], [outs[3], outs[2]])
        for p in (bad, *outs):
            if p.exists():
                p.unlink()

    case()
    assert out.count >= 900, out.count


def test_running_out_of_memory_is_one_line(monkeypatch, capsys, tmp_path):
    """numpy's MemoryError (a ResNet-50 stem: 500 x 802,816 activations, new-user run 7) came out as a
    traceback; it is a one-line error with what to change, exit 1, and nothing written."""
    import fire_onnx.fit.pipeline as pipeline
    from fire_onnx import cli

    def oom(*a, **k):
        raise MemoryError("Unable to allocate 383. MiB for an array with shape (500, 802816) and data type bool")

    monkeypatch.setattr(pipeline, "run_fit", oom)
    clean = tmp_path / "c.npz"
    np.savez(clean, x=np.zeros((4, 4, 4, 1), np.uint8), y=np.arange(4))
    with pytest.raises(SystemExit) as e:
        cli.main(["fit", "--onnx", str(tmp_path / "m.onnx"), "--layer", "h", "--clean", str(clean), "--trigger",
                  "badnets", "-o", str(tmp_path / "d.npz")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fire-onnx: error: out of memory (Unable to allocate 383. MiB") and "--n-clean" in err
    assert not (tmp_path / "d.npz").exists()


def test_fit_on_an_already_repaired_model_names_the_way_out(ws):
    """fit reads activations from --onnx; a repaired model's are the repaired ones. It is refused up front with
    what to do (new-user run 10: the refusal came from the patch step and advised a patch-only option)."""
    proc = run_cli("fit", "--onnx", "tiny.fire.onnx", "--layer", "relu", "--clean", "data.npz", "--trigger",
                   "badnets", "--target", "0", "-o", "f.npz", cwd=ws)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "already repaired by fire-onnx: fit on the original model" in proc.stderr
    assert "patch --replace" in proc.stderr and not (ws / "f.npz").exists()


def test_bench_times_a_fixed_batch_model_at_its_batch_by_default(ws):
    """A model exported with a fixed batch of 4 is timed at 4 when no --batch is given, with a note (new-user
    run 10: the default 1 and 64 made bench refuse it); an explicit other batch is still a one-line error."""
    from fire_onnx.patch import patch_file

    m = onnx.load(str(ws / "tiny.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(m, str(ws / "fixed.onnx"))
    patch_file(ws / "fixed.onnx", ws / "d.npz", ws / "fixed.fire.onnx")
    proc = run_cli("bench", "fixed.onnx", "fixed.fire.onnx", "--iters", "5", "--warmup", "0", "--json", "b.json", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((ws / "b.json").read_text())
    assert [r["batch"] for r in res["rows"]] == [4]
    assert "fixed batch of 4" in proc.stderr and any("fixed batch of 4" in n for n in res["notes"])
    proc = run_cli("bench", "fixed.onnx", "fixed.fire.onnx", "--iters", "5", "--batch", "8", cwd=ws)
    assert proc.returncode == 1 and "fixed batch of 4; bench it with --batch 4" in proc.stderr, proc.stderr
