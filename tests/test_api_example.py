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


def test_library_refuses_bad_arguments_with_fire_error():
    """From Python (new-user run 7): a zero std or an unknown layout is refused by fit_directions before any
    work, and a fit of no layer instead of returning empty directions that fail only when saved."""
    import numpy as np
    import pytest

    from fire_onnx.data import Images, Preprocess
    from fire_onnx.errors import FireError
    from fire_onnx.fit import fit_directions

    x = Images(np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(FireError, match="std must be non-zero"):
        fit_directions(None, ["h"], x, x, Preprocess(std=[0.0]))
    with pytest.raises(FireError, match="NCHW or NHWC"):
        fit_directions(None, ["h"], x, x, Preprocess(layout="CHW"))
    with pytest.raises(FireError, match="no layer to fit"):
        fit_directions(None, [], x, x, Preprocess())
