"""The ``fire-onnx`` console script, run for real in a subprocess.

Every test works on copies of the session's demo artifacts inside its own ``tmp_path``, so no two
tests share an output. User errors must give exit code 1, exactly one ``fire-onnx: error: ...`` line
on stderr, no traceback, and leave the folder exactly as it was (inputs byte-identical, no output,
no temp files).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO, run_cli, sha

from fire_onnx import __version__
from fire_onnx import directions as dirs

TENSOR = "/block2/block2.2/MaxPool_output_0"
ERR = "fire-onnx: error: "
FACTORY = "fire_onnx_models.small_cnn:build_mnist"


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture
def ws(demo_run, mnist_path, tmp_path) -> Path:
    """A private folder with copies of the demo artifacts and of the MNIST npz."""
    out, _ = demo_run
    for name in ("model.onnx", "model.pt", "directions.npz", "model.fire.onnx"):
        shutil.copyfile(out / name, tmp_path / name)
    shutil.copyfile(mnist_path, tmp_path / "mnist.npz")
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with its sha256."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(proc, folder: Path, before: dict[str, str], *expect: str, code: int = 1) -> str:
    """Exit 1 (2 for usage errors), one non-empty stderr line 'fire-onnx: error: ...', no traceback,
    folder unchanged."""
    where = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == code, where
    assert "Traceback" not in proc.stderr, where
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, where
    assert lines[0].startswith(ERR) and lines[0][len(ERR):].strip(), where
    after = snapshot(folder)
    assert after == before, f"folder changed: new/changed {sorted(set(after.items()) - set(before.items()))}\n{where}"
    assert not [p for p in folder.rglob("*.tmp")], where
    msg = lines[0]
    for e in expect:
        assert e in msg, f"{e!r} not in {msg!r}"
    return msg


def fire_nodes(model: onnx.ModelProto) -> int:
    return sum(n.name.startswith("fire_onnx/") for n in model.graph.node)


def meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def npz_arrays(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def fit_args(ws: Path, *extra, layer: str = "block2") -> list:
    """A fit command line; an option in ``extra`` replaces the default one (an option given twice is an error)."""
    base = {"--clean": ws / "mnist.npz", "--mean": "0.5", "--std": "0.5"}
    base = [v for k, val in base.items() if k not in extra for v in (k, val)]
    return ["fit", "--model", FACTORY, "--weights", ws / "model.pt", "--layer", layer, *base, *extra]


def eval_json(ws: Path, *models: str, name: str = "out.json") -> dict:
    run_cli("eval", *models, "--data", "mnist.npz", "--trigger", "badnets", "--target", "0", "--json", name,
            cwd=ws, check=True)
    return json.loads((ws / name).read_text())


# --------------------------------------------------------------------------------- happy path
def test_fit_patch_eval_pipeline(ws):
    for name in ("directions.npz", "model.fire.onnx"):
        (ws / name).unlink()
    proc = run_cli(*fit_args(ws, "--trigger", "badnets", "--target", "0", "--onnx", "model.onnx", "-o", "d.npz"),
                   cwd=ws, check=True)
    assert "wrote d.npz" in proc.stdout and TENSOR in proc.stdout
    d = dirs.load(ws / "d.npz")
    assert [(t.module, t.tensor, t.layout, t.dim) for t in d.targets] == [("block2", TENSOR, "flat", 64 * 7 * 7)]
    assert d.preprocess["mean"] == [0.5] and d.preprocess["std"] == [0.5]

    model_sha = sha(ws / "model.onnx")
    proc = run_cli("patch", "model.onnx", "d.npz", cwd=ws, check=True)
    assert (ws / "model.fire.onnx").is_file()  # default output: next to the input
    assert "wrote model.fire.onnx" in proc.stdout
    assert sha(ws / "model.onnx") == model_sha

    res = eval_json(ws, "model.onnx", "model.fire.onnx")
    assert sha(ws / "model.onnx") == model_sha
    assert res["preprocess"]["mean"] == [0.5] and res["preprocess"]["std"] == [0.5]  # recorded by patch
    orig, fixed = res["models"]["model.onnx"], res["models"]["model.fire.onnx"]
    assert orig["asr"] >= 0.9
    assert fixed["asr"] <= 0.02
    assert fixed["ca"] >= orig["ca"] - 0.005
    assert orig["n_clean"] == fixed["n_clean"] > 0 and orig["n_triggered"] == fixed["n_triggered"] > 0


def test_fit_with_file_path_model_spec(ws):
    spec = f"{REPO / 'models' / 'small_cnn.py'}:build_mnist"
    args = fit_args(ws, "--trigger", "badnets", "--target", "0", "--onnx", "model.onnx", "-o", "f.npz")
    args[2] = spec
    run_cli(*args, cwd=ws, check=True)
    d = dirs.load(ws / "f.npz")
    assert d.targets[0].module == "block2" and d.targets[0].tensor == TENSOR
    assert d.meta["model"] == spec
    run_cli("patch", "model.onnx", "f.npz", "-o", "f.onnx", cwd=ws, check=True)
    res = eval_json(ws, "f.onnx")
    assert res["models"]["f.onnx"]["asr"] <= 0.02


def test_inspect_text_and_json(ws):
    before = sha(ws / "model.onnx")
    proc = run_cli("inspect", "model.onnx", cwd=ws, check=True)
    assert TENSOR in proc.stdout and "block2" in proc.stdout
    proc = run_cli("inspect", "model.onnx", "--json", "-", cwd=ws, check=True)
    doc = json.loads(proc.stdout)
    assert isinstance(doc["candidates"], list) and doc["candidates"]
    assert TENSOR in [c["tensor"] for c in doc["candidates"]]
    assert doc["model"]["patched"] is False
    proc = run_cli("inspect", "model.fire.onnx", cwd=ws, check=True)
    # what the repair is, as recorded by patch: target, operator, attack, preprocessing
    assert "repaired by fire-onnx" in proc.stdout and "(directions sha256 " in proc.stdout
    assert f"{TENSOR} (module block2): layout flat, k=1, gate hard, repair project" in proc.stdout
    assert "recorded attack: target 0, trigger badnets (" in proc.stdout
    assert "recorded preprocessing: scale=1/255 mean=0.5 std=0.5 layout=NCHW" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith(f"  {TENSOR} "))  # the table's row
    assert row.rstrip().endswith("repaired by fire-onnx")  # not offered as a candidate again
    doc = json.loads(run_cli("inspect", "model.fire.onnx", "--json", "-", cwd=ws, check=True).stdout)
    assert doc["model"]["fire_onnx"]["attack"]["target"] == 0
    assert sha(ws / "model.onnx") == before


def test_bench_writes_json_and_markdown(ws):
    proc = run_cli("bench", "model.onnx", "model.fire.onnx", "--iters", "5", "--warmup", "1", "--batch", "1",
                   "--json", "b.json", "--markdown", "b.md", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((ws / "b.json").read_text())
    assert [r["batch"] for r in res["rows"]] == [1]
    assert "| batch |" in (ws / "b.md").read_text()


def test_bench_notes_what_makes_the_ratio_mean_something_else(ws):
    """The same model twice, an unrepaired PATCHED, or the two swapped: bench runs and says so."""
    args = ("--iters", "5", "--warmup", "1", "--batch", "1", "--json", "b.json")
    for pair, expect in ((("model.onnx", "model.onnx"), "are the same model"),
                         (("model.fire.onnx", "model.onnx"), "the arguments look swapped"),
                         (("model.pt.onnx", "model.onnx"), "carries no fire-onnx repair")):
        if pair[0] == "model.pt.onnx":  # the same graph, other bytes
            m = onnx.load(str(ws / "model.onnx"))
            m.doc_string = "copy"
            onnx.save(m, str(ws / "model.pt.onnx"))
        proc = run_cli("bench", *pair, *args, cwd=ws)
        assert proc.returncode == 0, proc.stderr
        assert expect in proc.stderr, proc.stderr
        assert any(expect in n for n in json.loads((ws / "b.json").read_text())["notes"])
    proc = run_cli("bench", "model.onnx", "model.fire.onnx", *args, cwd=ws)
    assert "note:" not in proc.stderr and json.loads((ws / "b.json").read_text())["notes"] == []


def test_bench_of_models_with_other_inputs_is_one_line(ws):
    """A second model that rejects the first's input (another image size) raised onnxruntime's traceback
    (new-user run 9); nothing is written."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["logits"])], "other",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 192])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(ws / "other.onnx"))
    before = snapshot(ws)
    proc = run_cli("bench", "model.onnx", "other.onnx", "--iters", "5", "--json", "b.json", "--markdown", "b.md",
                   cwd=ws)
    assert_user_error(proc, ws, before, "the second model rejects a batch of 1 inputs shaped for the first")


def test_replace_default_output_is_not_fire_fire(ws):
    run_cli("patch", "model.fire.onnx", "directions.npz", "--replace", cwd=ws, check=True)
    assert (ws / "model.fire.r1.onnx").is_file() and not (ws / "model.fire.fire.onnx").exists()
    run_cli("patch", "model.fire.r1.onnx", "directions.npz", "--replace", cwd=ws, check=True)
    assert (ws / "model.fire.r2.onnx").is_file()


def test_eval_names_an_nchw_data_file(ws):
    from fire_onnx.data import load_images

    test = load_images(ws / "mnist.npz", "test")
    np.savez(ws / "nchw.npz", x=test.x[:50].transpose(0, 3, 1, 2), y=test.y[:50])
    proc = run_cli("eval", "model.onnx", "--data", "nchw.npz", "--trigger", "badnets", "--target", "0", cwd=ws)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "looks like an NCHW array" in proc.stderr and "transpose(0, 2, 3, 1)" in proc.stderr, proc.stderr


def test_version_and_help():
    proc = run_cli("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("fit", "patch", "inspect", "eval", "bench", "demo"):
        assert cmd in proc.stdout
    for cmd in ("fit", "patch", "inspect", "eval", "bench", "demo"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, (cmd, proc.stderr)


# ------------------------------------------------------------------------ patched model checks
def test_patched_model_keeps_ir_opset_metadata_and_dynamic_batch(ws):
    src_sha, dir_sha = sha(ws / "model.onnx"), sha(ws / "directions.npz")
    run_cli("patch", "model.onnx", "directions.npz", "-o", "p.onnx", cwd=ws, check=True)
    assert sha(ws / "model.onnx") == src_sha and sha(ws / "directions.npz") == dir_sha
    src, out = onnx.load(str(ws / "model.onnx")), onnx.load(str(ws / "p.onnx"))
    assert out.ir_version == src.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in src.opset_import]
    m = meta(out)
    assert m["fire_onnx.version"] == __version__
    assert m["fire_onnx.directions_sha256"] == dir_sha
    targets = json.loads(m["fire_onnx.targets"])
    assert [t["tensor"] for t in targets] == [TENSOR]
    assert targets[0]["directions_sha256"] == dir_sha  # each repair records its own file (a stack keeps them all)
    assert fire_nodes(out) == targets[0]["nodes"] > 0
    assert fire_nodes(src) == 0
    for vi in (out.graph.input[0], out.graph.output[0]):
        first = vi.type.tensor_type.shape.dim[0]
        assert first.HasField("dim_param") and first.dim_param, vi
    assert [i.name for i in out.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in src.graph.output]
    onnx.checker.check_model(out)


def test_replace_swaps_the_repair_instead_of_stacking(ws):
    """--replace on an already patched model: one set of fire_onnx nodes, and the new directions rule.

    The replacement directions have alpha = 0 (a no-op repair): if the old repair were kept, the
    backdoor would stay removed."""
    first = onnx.load(str(ws / "model.fire.onnx"))
    d = dirs.load(ws / "directions.npz")
    d.targets[0].alpha = np.zeros_like(d.targets[0].alpha)
    dirs.save(d, ws / "noop.npz")
    patched_sha = sha(ws / "model.fire.onnx")
    run_cli("patch", "model.fire.onnx", "noop.npz", "--replace", "-o", "re.onnx", cwd=ws, check=True)
    assert sha(ws / "model.fire.onnx") == patched_sha
    out = onnx.load(str(ws / "re.onnx"))
    assert fire_nodes(out) == fire_nodes(first) > 0
    assert len(json.loads(meta(out)["fire_onnx.targets"])) == 1
    assert meta(out)["fire_onnx.directions_sha256"] == sha(ws / "noop.npz")
    res = eval_json(ws, "model.fire.onnx", "re.onnx")
    assert res["models"]["model.fire.onnx"]["asr"] <= 0.02
    assert res["models"]["re.onnx"]["asr"] >= 0.9


# --------------------------------------------------------------------------------- bad inputs
def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _edit_directions(ws: Path, name: str, fn) -> Path:
    """Copy the real directions file's arrays, let ``fn`` edit them, save with np.savez by hand."""
    arrays = npz_arrays(ws / "directions.npz")
    fn(arrays)
    with open(ws / name, "wb") as f:
        np.savez(f, **arrays)
    return ws / name


def _nan_mu(a):
    a["t0.mu"] = a["t0.mu"].copy()
    a["t0.mu"][0] = np.nan


def _pickled_header(a):
    a["header"] = np.array([{"a": 1}], dtype=object)


def _schema_3(a):
    h = json.loads(str(a["header"][()]))
    h["schema_version"] = 3
    a["header"] = np.array(json.dumps(h))


def _dim_100(ws: Path) -> Path:
    u = np.random.default_rng(0).standard_normal(100)
    u /= np.linalg.norm(u)
    t = dirs.Target(mu=np.zeros(100, np.float32), U=u[None].astype(np.float32), tau=np.ones(1, np.float32),
                    alpha=np.ones(1, np.float32), layout="flat", gate="hard", tensor=TENSOR)
    dirs.save(dirs.Directions([t]), ws / "d100.npz")
    return ws / "d100.npz"


def _truncated(ws: Path) -> Path:
    data = (ws / "model.onnx").read_bytes()
    return _write(ws / "trunc.onnx", data[: len(data) // 2])


def _digits8(ws: Path) -> Path:
    """8x8 digit images: the wrong size for the 28x28 model."""
    rng = np.random.default_rng(0)
    path = ws / "digits8.npz"
    np.savez(path, x=rng.integers(0, 256, size=(600, 8, 8, 1)).astype(np.uint8), y=rng.integers(0, 10, size=600))
    return path


# name -> (setup(ws) -> argv, substrings the error line must contain)
BAD = {
    "patch-missing-model": (lambda ws: ["patch", ws / "absent.onnx", "directions.npz"], ["absent.onnx", "not found"]),
    "patch-random-bytes-model": (
        lambda ws: ["patch", _write(ws / "rand.onnx", np.random.default_rng(0).bytes(4096)), "directions.npz"],
        ["rand.onnx"]),
    "patch-text-file-model": (
        lambda ws: ["patch", _write(ws / "notes.onnx", b"this is not a model\n"), "directions.npz"], ["notes.onnx"]),
    "patch-empty-model": (lambda ws: ["patch", _write(ws / "empty.onnx", b""), "directions.npz"], ["empty.onnx"]),
    "patch-truncated-model": (lambda ws: ["patch", _truncated(ws), "directions.npz"], ["trunc.onnx"]),
    "patch-unknown-tensor": (lambda ws: ["patch", "model.onnx", "directions.npz", "--tensor", "nope", "-o", "o.onnx"],
                             ["'nope'", TENSOR]),
    "patch-dimension-mismatch": (lambda ws: ["patch", "model.onnx", _dim_100(ws), "-o", "o.onnx"],
                                 ["dimension mismatch", "100", "3136"]),
    "patch-nan-directions": (lambda ws: ["patch", "model.onnx", _edit_directions(ws, "nan.npz", _nan_mu)],
                             ["nan.npz", "NaN"]),
    "patch-pickled-directions": (
        lambda ws: ["patch", "model.onnx", _edit_directions(ws, "pick.npz", _pickled_header), "-o", "o.onnx"],
        ["pick.npz", "pickle"]),
    "patch-schema-version": (
        lambda ws: ["patch", "model.onnx", _edit_directions(ws, "v3.npz", _schema_3), "-o", "o.onnx"],
        ["schema version 3"]),
    "patch-missing-directions": (lambda ws: ["patch", "model.onnx", "absent.npz", "-o", "o.onnx"], ["absent.npz"]),
    "patch-garbage-directions": (
        lambda ws: ["patch", "model.onnx", _write(ws / "junk.npz", b"not an npz\n"), "-o", "o.onnx"], ["junk.npz"]),
    "patch-already-patched": (lambda ws: ["patch", "model.fire.onnx", "directions.npz"], ["already patched", "--replace", "--add"]),
    "patch-output-is-model": (lambda ws: ["patch", "model.onnx", "directions.npz", "-o", "model.onnx"],
                              ["never overwrites"]),
    "patch-output-is-model-abs": (lambda ws: ["patch", "model.onnx", "directions.npz", "-o", ws / "." / "model.onnx"],
                                  ["never overwrites"]),
    "patch-output-is-directions": (lambda ws: ["patch", "model.onnx", "directions.npz", "-o", "directions.npz"],
                                   ["never overwrites"]),
    "patch-output-folder-missing": (lambda ws: ["patch", "model.onnx", "directions.npz", "-o", ws / "no" / "o.onnx"],
                                    ["does not exist"]),
    "fit-unknown-layer": (lambda ws: fit_args(ws, "--trigger", "badnets", "--target", "0", "-o", "f.npz",
                                              layer="block9"), ["block9", "candidates", "block2"]),
    "fit-missing-clean": (lambda ws: ["fit", "--model", FACTORY, "--weights", "model.pt", "--layer", "block2",
                                      "--clean", "absent.npz", "--trigger", "badnets", "--target", "0", "-o", "f.npz"],
                          ["absent.npz"]),
    "fit-trigger-and-triggered": (lambda ws: fit_args(ws, "--trigger", "badnets", "--triggered", "mnist.npz",
                                                      "--target", "0", "-o", "f.npz"), ["--trigger", "--triggered"]),
    "fit-bad-trigger-spec": (lambda ws: fit_args(ws, "--trigger", "badnets:size=abc", "--target", "0", "-o", "f.npz"),
                             ["size", "abc"]),
    "fit-corrupt-onnx": (lambda ws: fit_args(ws, "--trigger", "badnets", "--target", "0", "--onnx",
                                             _write(ws / "rand.onnx", np.random.default_rng(1).bytes(2048)),
                                             "-o", "f.npz"), ["rand.onnx"]),
    "fit-output-is-clean": (lambda ws: fit_args(ws, "--trigger", "badnets", "--target", "0", "-o", "mnist.npz"),
                            ["never overwrites"]),
    "fit-wrong-image-size": (lambda ws: fit_args(ws, "--trigger", "badnets", "--target", "0", "-o", "f.npz",
                                                 "--clean", _digits8(ws)), ["model rejects", "[1, 8, 8]"]),
    "fit-wrong-layout": (lambda ws: fit_args(ws, "--trigger", "badnets", "--target", "0", "--input-layout", "NHWC",
                                             "-o", "f.npz"), ["model rejects", "--input-layout"]),
    "fit-onnx-wrong-image-size": (lambda ws: ["fit", "--onnx", "model.onnx", "--layer", "block2", "--clean",
                                              _digits8(ws), "--trigger", "badnets:margin=0", "--target", "0",
                                              "-o", "f.npz"], ["expects shape", "8, 8"]),
    "fit-mean-channels": (lambda ws: fit_args(ws, "--trigger", "badnets", "--target", "0", "--mean", "0.5,0.5,0.5",
                                              "-o", "f.npz"), ["mean/std"]),
    "eval-wrong-image-size": (lambda ws: ["eval", "model.onnx", "--data", _digits8(ws), "--json", "e.json"],
                              ["expects shape"]),
    "eval-missing-data": (lambda ws: ["eval", "model.onnx", "--data", "absent.npz", "--json", "e.json"],
                          ["absent.npz"]),
    "eval-trigger-without-target": (lambda ws: ["eval", "model.onnx", "--data", "mnist.npz", "--trigger", "badnets",
                                                "--json", "e.json"], ["--target"]),
    "eval-bad-trigger-spec": (lambda ws: ["eval", "model.onnx", "--data", "mnist.npz", "--trigger", "badnets:size=abc",
                                          "--target", "0", "--json", "e.json"], ["size", "abc"]),
    "eval-missing-model": (lambda ws: ["eval", "absent.onnx", "--data", "mnist.npz", "--json", "e.json"],
                           ["absent.onnx"]),
    "eval-corrupt-model": (lambda ws: ["eval", _truncated(ws), "--data", "mnist.npz", "--json", "e.json"], []),
    "inspect-missing-model": (lambda ws: ["inspect", "absent.onnx", "--json", "i.json"], ["absent.onnx"]),
    "inspect-corrupt-model": (lambda ws: ["inspect", _truncated(ws), "--json", "i.json"], ["trunc.onnx"]),
    "bench-corrupt-model": (lambda ws: ["bench", "model.onnx", _truncated(ws), "--iters", "5", "--json", "b.json"], []),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_error_and_changes_nothing(ws, mnist_path, case):
    setup, expect = BAD[case]
    argv = setup(ws)
    before = snapshot(ws)
    data_sha = sha(mnist_path)
    proc = run_cli(*argv, cwd=ws)
    assert_user_error(proc, ws, before, *expect)
    assert sha(mnist_path) == data_sha


@pytest.mark.parametrize("data", [b"not an npz\n", np.random.default_rng(2).bytes(512)], ids=["text", "random"])
def test_garbage_npz_is_not_called_pickled(ws, data):
    """A non-zip file must be reported as 'not a valid npz', not as 'contains pickled objects'."""
    (ws / "junk.npz").write_bytes(data)
    before = snapshot(ws)
    msg = assert_user_error(run_cli("patch", "model.onnx", "junk.npz", "-o", "o.onnx", cwd=ws), ws, before)
    assert "pickle" not in msg and "not a valid npz" in msg


def test_unknown_module_in_directions_suggests_candidates(ws):
    d = dirs.load(ws / "directions.npz")
    d.targets[0].tensor = ""
    d.targets[0].module = "block9"
    dirs.save(d, ws / "m9.npz")
    before = snapshot(ws)
    msg = assert_user_error(run_cli("patch", "model.onnx", "m9.npz", cwd=ws), ws, before, "block9")
    assert "did you mean" in msg or "candidates" in msg
    assert "block2" in msg


def test_replace_after_refusal_patches_once(ws):
    """The refusal leaves nothing behind; then --replace to a new output has one set of repair nodes."""
    before = snapshot(ws)
    assert_user_error(run_cli("patch", "model.fire.onnx", "directions.npz", "-o", "again.onnx", cwd=ws), ws, before,
                      "already patched")
    run_cli("patch", "model.fire.onnx", "directions.npz", "--replace", "-o", "again.onnx", cwd=ws, check=True)
    assert fire_nodes(onnx.load(str(ws / "again.onnx"))) == fire_nodes(onnx.load(str(ws / "model.fire.onnx")))
    assert {k: v for k, v in snapshot(ws).items() if k != "again.onnx"} == before


# ------------------------------------------------------------- regressions (bugs found while writing these)
@pytest.mark.parametrize("argv", [
    ["inspect", "model.onnx", "--json", "model.onnx"],
    ["patch", "model.onnx", "directions.npz", "-o", "p.onnx", "--json", "model.onnx"],
    ["patch", "model.onnx", "directions.npz", "-o", "p.onnx", "--json", "directions.npz"],
    ["eval", "model.onnx", "--data", "mnist.npz", "--limit", "50", "--json", "model.onnx"],
    ["bench", "model.onnx", "model.fire.onnx", "--iters", "5", "--warmup", "0", "--batch", "1", "--json", "model.onnx"],
    ["bench", "model.onnx", "model.fire.onnx", "--iters", "5", "--warmup", "0", "--batch", "1",
     "--markdown", "model.onnx"],
], ids=["inspect-json", "patch-json-model", "patch-json-directions", "eval-json", "bench-json", "bench-markdown"])
def test_report_output_never_overwrites_an_input(ws, argv):
    before = snapshot(ws)
    assert_user_error(run_cli(*argv, cwd=ws), ws, before, "never overwrites")


@pytest.mark.parametrize("cmd", ["eval", "fit"])
def test_batch_size_zero_is_a_user_error(ws, cmd):
    if cmd == "eval":
        argv = ["eval", "model.onnx", "--data", "mnist.npz", "--batch-size", "0", "--json", "e.json"]
    else:
        argv = fit_args(ws, "--trigger", "badnets", "--target", "0", "--batch-size", "0", "-o", "f.npz")
    before = snapshot(ws)
    assert_user_error(run_cli(*argv, cwd=ws), ws, before, "--batch-size", code=2)


def test_outputs_respect_umask(ws):
    old = os.umask(0o022)  # inherited by the subprocess
    try:
        run_cli("patch", "model.onnx", "directions.npz", "-o", "p.onnx", "--json", "p.json", cwd=ws, check=True)
    finally:
        os.umask(old)
    for name in ("p.onnx", "p.json"):
        assert (ws / name).stat().st_mode & 0o777 == 0o644, oct((ws / name).stat().st_mode)


def test_negative_limit_is_a_user_error(ws):
    before = snapshot(ws)
    assert_user_error(run_cli("eval", "model.onnx", "--data", "mnist.npz", "--limit", "-5", "--json", "e.json", cwd=ws),
                      ws, before, "--limit", code=2)


# ------------------------------------------------------------------ triggered files and fit sources
def _triggered_file(ws: Path, with_clean: bool) -> Path:
    from fire_onnx import triggers

    with np.load(ws / "mnist.npz", allow_pickle=False) as z:
        x, y = z["x_train"][:400], z["y_train"][:400]
    keep = np.flatnonzero(y != 0)[:30]
    arrays = {"x": triggers.parse("badnets").apply(x[keep]), "y": y[keep]}
    if with_clean:
        arrays["x_clean"] = x[keep]
    path = ws / ("trig_paired.npz" if with_clean else "trig.npz")
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("with_clean,reference", [(True, "paired"), (False, "class-matched")])
def test_fit_from_a_triggered_file(ws, with_clean, reference):
    """With twins the fit is paired; without them and with reconstruction off, the labels make the clean
    reference class-matched (reconstruction is tested in test_reconstruct.py)."""
    trig = _triggered_file(ws, with_clean)
    extra = [] if with_clean else ["--reconstruct", "off"]
    run_cli(*fit_args(ws, "--triggered", trig.name, "--target", "0", "-o", "t.npz", *extra), cwd=ws, check=True)
    t = dirs.load(ws / "t.npz").targets[0]
    assert t.fit["reference"] == reference and t.fit["n_triggered"] == 20
    run_cli("patch", "model.onnx", "t.npz", "-o", "t.onnx", cwd=ws, check=True)
    res = eval_json(ws, "model.onnx", "t.onnx", name="t.json")
    # pairing cancels image content; the unpaired (class-matched) estimate is noisier
    assert res["models"]["t.onnx"]["asr"] <= (0.02 if with_clean else 0.10)
    assert res["models"]["model.onnx"]["asr"] >= 0.9


def test_eval_with_a_triggered_file(ws):
    trig = _triggered_file(ws, True)
    proc = run_cli("eval", "model.onnx", "model.fire.onnx", "--data", "mnist.npz", "--triggered", trig.name,
                   "--target", "0", "--json", "-", cwd=ws, check=True)
    res = json.loads(proc.stdout)["models"]  # with --json - stdout is the JSON alone
    assert res["model.onnx"]["n_triggered"] == 30
    assert res["model.fire.onnx"]["asr"] <= 0.05 and res["model.onnx"]["asr"] >= 0.9


def test_fit_from_onnx_only_and_torchscript(ws):
    """No PyTorch model code: activations from the ONNX model in onnxruntime, or from a TorchScript file."""
    import torch

    from fire_onnx.fit import load_model

    common = ["--layer", "block2", "--clean", "mnist.npz", "--trigger", "badnets", "--target", "0",
              "--mean", "0.5", "--std", "0.5"]
    run_cli("fit", "--onnx", "model.onnx", *common, "-o", "o.npz", cwd=ws, check=True)
    torch.jit.script(load_model(FACTORY, str(ws / "model.pt"))).save(str(ws / "model.ts"))
    run_cli("fit", "--model", "model.ts", *common, "-o", "s.npz", cwd=ws, check=True)
    a, b = dirs.load(ws / "o.npz").targets[0], dirs.load(ws / "s.npz").targets[0]
    assert a.tensor == TENSOR and float(a.U[0] @ b.U[0]) > 0.9999
    for name in ("o", "s"):
        run_cli("patch", "model.onnx", f"{name}.npz", "-o", f"{name}.onnx", cwd=ws, check=True)
    res = eval_json(ws, "o.onnx", "s.onnx", name="os.json")["models"]
    assert res["o.onnx"]["asr"] <= 0.02 and res["s.onnx"]["asr"] <= 0.02


def test_fixed_batch_of_four_and_float16_and_uint8_inputs(ws):
    """Exports a user may have: a fixed batch of 4 (fit, patch and eval pad the last call and drop the
    padding's results), float16 weights and input (fed float16; the float32 directions' fingerprints still
    match) and a model that takes raw uint8 NHWC pixels and does its own preprocessing (fed the pixels with
    --scale 1; with the default scale a one-line error says so). Each repairs the demo backdoor."""
    import torch

    from fire_onnx.fit import load_model

    model = load_model(FACTORY, str(ws / "model.pt"))
    kw = dict(dynamo=False, input_names=["input"], output_names=["logits"])
    torch.onnx.export(model, (torch.zeros(4, 1, 28, 28),), str(ws / "fixed4.onnx"), **kw)
    half = load_model(FACTORY, str(ws / "model.pt")).half()
    torch.onnx.export(half, (torch.zeros(1, 1, 28, 28).half(),), str(ws / "fp16.onnx"),
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, **kw)

    class Pixels(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net((x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)

    torch.onnx.export(Pixels(model), (torch.zeros(1, 28, 28, 1, dtype=torch.uint8),), str(ws / "u8.onnx"),
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, **kw)
    # fit from the fixed-batch model itself (its probe images, 3, and 20 triggered ones are not multiples of 4)
    run_cli("fit", "--onnx", "fixed4.onnx", "--tensor", TENSOR, "--layer", "block2", "--clean", "mnist.npz",
            "--trigger", "badnets", "--target", "0", "--mean", "0.5", "--std", "0.5", "-o", "d4.npz", cwd=ws,
            check=True)
    run_cli("patch", "fixed4.onnx", "d4.npz", cwd=ws, check=True)
    run_cli("patch", "fp16.onnx", "directions.npz", cwd=ws, check=True)
    res = eval_json(ws, "fixed4.onnx", "fixed4.fire.onnx", "fp16.onnx", "fp16.fire.onnx", name="e.json")["models"]
    for name in ("fixed4", "fp16"):
        assert res[f"{name}.onnx"]["asr"] >= 0.9 and res[f"{name}.fire.onnx"]["asr"] <= 0.02, (name, res)
        assert abs(res[f"{name}.onnx"]["ca"] - res["fixed4.onnx"]["ca"]) <= 0.01
    u8 = ws / "u8.onnx"
    proc = run_cli("eval", u8.name, "--data", "mnist.npz", "--limit", "50", cwd=ws)
    assert proc.returncode == 1 and "takes raw pixel values" in proc.stderr and "--scale 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    run_cli("fit", "--onnx", u8.name, "--tensor", "/net" + TENSOR, "--layer", "block2", "--clean", "mnist.npz",
            "--trigger", "badnets", "--target", "0", "--scale", "1", "--mean", "0", "--std", "1", "-o", "d8.npz",
            cwd=ws, check=True)
    run_cli("patch", u8.name, "d8.npz", cwd=ws, check=True)
    proc = run_cli("eval", "u8.onnx", "u8.fire.onnx", "--data", "mnist.npz", "--trigger", "badnets", "--target", "0",
                   "--scale", "1", "--mean", "0", "--std", "1", "--json", "-", cwd=ws, check=True)
    res = json.loads(proc.stdout)["models"]
    assert res["u8.onnx"]["asr"] >= 0.9 and res["u8.fire.onnx"]["asr"] <= 0.02, res
    # the PyTorch model without the graph's preprocessing beside it: no preprocessing suits both; said up front,
    # with and without --scale 1 (new-user run 10 was sent from one model's error to the other's)
    for extra, why in (((), "is fed normalized images"), (("--scale", "1", "--mean", "0", "--std", "1"), "rejects them")):
        before = snapshot(ws)
        proc = run_cli("fit", "--model", FACTORY, "--weights", "model.pt", "--onnx", u8.name, "--layer", "block2",
                       "--clean", "mnist.npz", "--trigger", "badnets", "--target", "0", *extra, "-o", "dm.npz", cwd=ws)
        assert_user_error(proc, ws, before, "takes raw uint8 pixels", why, "drop --model and --weights")


def test_static_batch_model(ws):
    """A model exported with a fixed batch of 1 is patched, evaluated one image at a time, and bench
    names the batch it needs."""
    import torch

    from fire_onnx.fit import load_model

    model = load_model(FACTORY, str(ws / "model.pt"))
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(ws / "static.onnx"), dynamo=False,
                      input_names=["input"], output_names=["logits"])
    run_cli("patch", "static.onnx", "directions.npz", cwd=ws, check=True)
    res = eval_json(ws, "static.onnx", "static.fire.onnx", name="s.json")["models"]
    assert res["static.fire.onnx"]["asr"] <= 0.02 and res["static.onnx"]["asr"] >= 0.9
    before = snapshot(ws)
    assert_user_error(run_cli("bench", "static.onnx", "static.fire.onnx", "--batch", "64", "--iters", "5", cwd=ws),
                      ws, before, "fixed batch of 1", "--batch 1")


def test_eval_blames_the_repair_not_the_preprocessing_when_only_the_patched_model_is_worse(ws):
    """A repair that breaks clean accuracy used to get eval's preprocessing hint ("62.5 % with --scale 1"):
    beside the unpatched model fed the same way, eval now says the repair costs it."""
    d = dirs.load(ws / "directions.npz")
    d.targets[0].gate, d.targets[0].alpha = "none", d.targets[0].alpha * 40
    dirs.save(d, ws / "broken.npz")
    run_cli("patch", "model.onnx", "broken.npz", "-o", "broken.onnx", cwd=ws, check=True)
    proc = run_cli("eval", "model.onnx", "broken.onnx", "--data", "mnist.npz", "--limit", "300", cwd=ws, check=True)
    assert "broken.onnx: clean accuracy" in proc.stderr and "the repair costs clean accuracy" in proc.stderr, proc.stderr
    assert "--scale 1" not in proc.stderr


def test_repeated_flagged_images_count_once_and_one_image_is_warned(ws):
    """20 copies of one flagged image are one image: the copies are left out with a note, and a repair checked
    only on the image it was fitted on is warned (new-user run 12: the copies were cross-fitted as '0 % left'
    while the repair left 95 % ASR, exit 0, no warning)."""
    import numpy as np

    from fire_onnx import triggers

    d = np.load(ws / "mnist.npz")
    x = triggers.parse("badnets").apply(d["x_test"][d["y_test"] != 0][:4])
    np.savez(ws / "dup.npz", x=np.repeat(x[:1], 20, axis=0))
    np.savez(ws / "dup4.npz", x=np.repeat(x, 5, axis=0), y=np.repeat(d["y_test"][d["y_test"] != 0][:4], 5))
    common = ("--onnx", "model.onnx", "--layer", "block2", "--clean", "mnist.npz", "--mean", "0.5", "--std", "0.5",
              "--json", "-")
    one = run_cli("fit", "--triggered", "dup.npz", *common, "-o", "d1.npz", cwd=ws, check=True)
    assert "19 of its 20 images repeat others and are left out (1 distinct)" in one.stderr
    assert "checked only on the 1 triggered image(s) it was fitted on" in one.stderr
    four = run_cli("fit", "--triggered", "dup4.npz", *common, "-o", "d4.npz", cwd=ws, check=True)
    assert "16 of its 20 images repeat others and are left out (4 distinct)" in four.stderr
    out = json.loads(four.stdout)
    assert out["check"]["n_triggered"] == 4 and out["check"]["cross_fit"]["n"] == 4


def test_a_poisoned_clean_file_is_cleaned_and_refitted(ws):
    """Clean images drawn from a poisoned training set (a tenth of them stamped and relabelled to the target):
    the repair moves those away from the target on the held-out part, which reads as changed clean predictions.
    fit leaves the images that look triggered out of the clean reference and fits again, saying so (new-user run
    12: such a file was refused as 'it will cost clean accuracy', blaming the triggered images)."""
    import numpy as np

    from fire_onnx import triggers

    d = np.load(ws / "mnist.npz")
    x, y = d["x_train"][:1500].copy(), d["y_train"][:1500].copy()
    bad = np.flatnonzero(y != 0)[::10]
    x[bad], y[bad] = triggers.parse("badnets").apply(x[bad]), 0
    np.savez(ws / "poisoned.npz", x=x, y=y)
    proc = run_cli("fit", "--onnx", "model.onnx", "--layer", "block2", "--clean", "poisoned.npz", "--trigger",
                   "badnets", "--target", "0", "--mean", "0.5", "--std", "0.5", "-o", "p.npz", "--json", "-", cwd=ws,
                   check=True)
    out = json.loads(proc.stdout)
    n_bad = len(bad)
    excluded = out["clean_excluded"]["n"]
    assert "clean images look triggered" in proc.stderr and "left out of the clean reference" in proc.stderr
    assert out["clean_excluded"]["carry_trigger"] >= 0.9 * excluded  # stamping leaves them as they are: a note
    assert not [w for w in out["warnings"] if "look triggered" in w]
    assert out["check"]["clean_change"] <= 0.01 and out["check"]["target_rate_after"] <= 0.05, out["check"]
    assert n_bad * 0.8 <= excluded <= n_bad * 1.2, (excluded, n_bad)
    # --layer auto: every layer that removes the trigger 'changes' the poisoned held-out images, so none was within
    # the clean budget and it chose one that removed little (run 12: 48 % ASR); it leaves them out and chooses again
    proc = run_cli("fit", "--onnx", "model.onnx", "--layer", "auto", "--clean", "poisoned.npz", "--trigger", "badnets",
                   "--target", "0", "--mean", "0.5", "--std", "0.5", "-o", "pa.npz", "--json", "-", cwd=ws, check=True)
    out = json.loads(proc.stdout)
    assert "--layer auto:" in proc.stderr and "clean images look triggered" in proc.stderr
    assert out["auto"]["within_budget"] and out["check"]["target_rate_after"] <= 0.05, out["check"]
    # without the trigger to confirm them, left-out images may be genuine target-class ones: a warning says what
    # the held-out check no longer sees
    from types import SimpleNamespace

    from fire_onnx import directions as dirs
    from fire_onnx.data import Images
    from fire_onnx.fit.pipeline import report_excluded

    d = dirs.Directions([])
    fake = SimpleNamespace(trigger=None, pool=Images(x[:10]), clean_left_out=[x[bad[:5]]])  # one round, 5 images
    report_excluded(SimpleNamespace(notes=[]), fake, d, 0)
    assert d.meta["clean_excluded"]["n"] == 5 and "genuine class-0 images" in d.meta["checks"]["warnings"][0]
    # what it says when the clean file is left as it is: the hint names the poisoned images, not the triggered ones
    from fire_onnx.fit.verify import poisoned_clean_hint

    hint = poisoned_clean_hint({"changed": 40, "changed_from_target": 39, "changed_to_label": 0,
                                "changed_labelled_target": 39, "target": 0,
                                "poison_evidence": {"n": 35, "carried_share": 0.97}})
    assert "labelled 0 in the clean file, as relabelled poisoned training images are" in hint
    assert "carry 97% of the trigger's pixel change" in hint
    assert "the clean file probably holds triggered (poisoned) images" in hint
    # without pixel evidence (no clean image scores like the triggered ones, or no trigger estimate) it names both
    # causes: a test split's genuine class-0 images were blamed as poisoned (new-user runs 18 and 20)
    hint = poisoned_clean_hint({"changed": 40, "changed_from_target": 39, "changed_to_label": 0,
                                "changed_labelled_target": 39, "target": 0})
    assert "probably holds" not in hint and "as relabelled poisoned" not in hint
    assert "either the repair removes features that genuine class-0 images share" in hint
