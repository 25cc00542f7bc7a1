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
