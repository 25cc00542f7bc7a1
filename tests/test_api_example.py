"""The README's Python example runs as written (on the demo's artifacts)."""

from __future__ import annotations

import os
import re
import shutil

from conftest import REPO


def test_readme_python_example(demo_run, tmp_path):
    out, _ = demo_run
    shutil.copytree(out, tmp_path / "demo-out")
    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "fit_directions" in b)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "demo-out" / "api.fire.onnx").is_file()
    from fire_onnx import directions

    t = directions.load(tmp_path / "demo-out" / "api_directions.npz").targets[0]
    assert t.fit["reference"] == "paired" and t.module == "block2"
