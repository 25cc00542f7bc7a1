"""The README's worked example, executed command by command through the real console script."""

from __future__ import annotations

import json
import re
import shlex
import shutil

from conftest import REPO, run_cli


def worked_example() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- worked-example -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its worked-example block"
    joined = block.group(1).replace("\\\n", " ")
    cmds = [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert cmds and all(c[0] == "fire-onnx" for c in cmds)
    return cmds


def test_readme_worked_example_runs(demo_run, tmp_path):
    out, _ = demo_run
    shutil.copytree(out, tmp_path / "demo-out")
    (tmp_path / "fire_onnx" / "data").mkdir(parents=True)
    shutil.copy(REPO / "fire_onnx" / "data" / "mnist5k.npz", tmp_path / "fire_onnx" / "data")
    cmds = worked_example()
    assert [c[1] for c in cmds] == ["inspect", "fit", "patch", "eval", "bench"]
    for cmd in cmds:
        proc = run_cli(*cmd[1:], cwd=tmp_path)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    res = json.loads((tmp_path / "demo-out" / "eval.json").read_text())["models"]
    orig, patched = res["demo-out/model.onnx"], res["demo-out/model.fire.onnx"]
    assert orig["asr"] >= 0.9 and patched["asr"] <= 0.02
    assert orig["ca"] - patched["ca"] <= 0.005


def test_readme_flagged_example_runs(demo_run, tmp_path):
    """The "You only have some flagged inputs" block: flagged images only (no x_clean, no labels)."""
    import sys

    out, _ = demo_run
    shutil.copytree(out, tmp_path / "demo-out")
    (tmp_path / "fire_onnx" / "data").mkdir(parents=True)
    shutil.copy(REPO / "fire_onnx" / "data" / "mnist5k.npz", tmp_path / "fire_onnx" / "data")
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- flagged-example -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its flagged-example block"
    cmds = [shlex.split(line) for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[0] for c in cmds] == ["python", "fire-onnx", "fire-onnx", "fire-onnx"]
    import subprocess

    subprocess.run([sys.executable] + cmds[0][1:], cwd=tmp_path, check=True, timeout=120)
    for cmd in cmds[1:]:
        proc = run_cli(*cmd[1:], cwd=tmp_path)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
        if cmd[1] == "fit":
            assert "trigger reconstruction: patch" in proc.stdout, proc.stdout
    res = json.loads((tmp_path / "demo-out" / "flagged_eval.json").read_text())["models"]
    orig, patched = res["demo-out/model.onnx"], res["demo-out/model.flagged.onnx"]
    assert orig["asr"] >= 0.9 and patched["asr"] <= 0.03
    assert orig["ca"] - patched["ca"] <= 0.01
