"""Shared fixtures: one real backdoored model (trained once per session by the demo) and small
untrained models of each architecture exported to ONNX."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def fire_onnx_exe() -> list[str]:
    """The installed console script (what users run); falls back to the module for odd setups."""
    exe = shutil.which("fire-onnx", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "fire_onnx.cli"]


def run_cli(*args, cwd=None, check=False) -> subprocess.CompletedProcess:
    proc = subprocess.run(fire_onnx_exe() + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"fire-onnx {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def torch_repaired(model, d, x: np.ndarray) -> np.ndarray:
    """Logits of a PyTorch ``model`` with the repair of directions ``d`` hooked in (the reference for ONNX)."""
    import torch

    from fire_onnx.fit import apply_in_torch

    handles = apply_in_torch(model, d)
    try:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    finally:
        for h in handles:
            h.remove()


def set_fire_metadata(m, **props) -> None:
    """Set a model proto's ``fire_onnx.<key>`` metadata to the given strings (None: removed), in place."""
    meta = {p.key: p.value for p in m.metadata_props}
    for key, value in props.items():
        meta.pop(f"fire_onnx.{key}", None)
        if value is not None:
            meta[f"fire_onnx.{key}"] = value
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The real demo (BadNets on bundled MNIST, SmallCNN, fit, patch, eval), run once through the
    console script exactly as ``make demo`` runs it; returns (output folder, report.json)."""
    import json

    out = tmp_path_factory.mktemp("demo") / "demo-out"
    proc = run_cli("demo", "--output", out, check=True)
    assert "patched (FIRE)" in proc.stdout
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="session")
def mnist_path():
    from fire_onnx.data import bundled_mnist

    return bundled_mnist()


@pytest.fixture(scope="session")
def cnn_onnx(tmp_path_factory):
    """An untrained SmallCNN (seeded) exported with the TorchScript exporter: (torch model, onnx path)."""
    import torch

    from fire_onnx.fit import export_onnx
    from fire_onnx_models.small_cnn import build_mnist

    torch.manual_seed(0)
    model = build_mnist().eval()
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    export_onnx(model, np.zeros((2, 1, 28, 28), np.float32), path)
    return model, path
