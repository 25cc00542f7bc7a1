"""A regular (non-editable) install must ship every subpackage: setup.cfg lists packages by hand."""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = {p.strip() for p in cfg["options"]["packages"].replace("\n", ",").split(",") if p.strip()}
    roots = {"fire_onnx": REPO / "fire_onnx", "fire_onnx_models": REPO / "models"}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"packages missing from setup.cfg: {sorted(found - listed)}"


def test_every_tool_answers_help():
    """Each script in tools/ prints its options (new-user run 9: bench_auto.py --help raised a TypeError from a
    '%' in an option's help)."""
    import subprocess
    import sys

    tools = [t for t in sorted((REPO / "tools").glob("*.py")) if "ArgumentParser(" in t.read_text()]
    assert len(tools) >= 10  # attacks.py is a module of the others, without a command line
    for tool in tools:
        proc = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (tool.name, proc.stderr[-500:])
