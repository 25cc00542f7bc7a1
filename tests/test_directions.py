"""Directions file: round trip and validation (no torch, no onnxruntime needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fire_onnx import directions as dirs
from fire_onnx.errors import FireError


def target(d=12, k=2, **kw):
    U = dirs.orthonormalize(np.random.default_rng(0).normal(size=(k, d))).astype(np.float32)
    base = dict(mu=np.arange(d, dtype=np.float32), U=U, tau=np.ones(k, np.float32), alpha=np.ones(k, np.float32),
                layout="flat", gate="hard", module="block2", feature_shape=[3, 2, 2])
    base.update(kw)
    return dirs.Target(**base)


def test_round_trip(tmp_path):
    d = dirs.Directions([target(fit={"method": "mean-diff", "n_triggered": 20})],
                        preprocess={"scale": 1 / 255, "mean": [0.5], "std": [0.5], "layout": "NCHW"},
                        meta={"trigger": {"kind": "badnets"}})
    p = tmp_path / "d.npz"
    dirs.save(d, p)
    back = dirs.load(p)
    t0, t1 = d.targets[0], back.targets[0]
    for name in ("mu", "U", "tau", "alpha"):
        np.testing.assert_array_equal(getattr(t0, name), getattr(t1, name))
        assert getattr(t1, name).dtype == np.float32
    assert (t1.layout, t1.gate, t1.module, t1.feature_shape) == ("flat", "hard", "block2", [3, 2, 2])
    assert t1.fit["n_triggered"] == 20
    assert back.preprocess["mean"] == [0.5] and back.meta["trigger"]["kind"] == "badnets"
    with np.load(p, allow_pickle=False) as z:  # plain arrays only
        header = json.loads(str(z["header"][()]))
    assert header["format"] == dirs.FORMAT and header["schema_version"] == 1  # projections only: still version 1


def test_save_is_atomic_on_invalid_input(tmp_path):
    p = tmp_path / "d.npz"
    bad = target()
    bad.mu = bad.mu.copy()
    bad.mu[0] = np.nan
    with pytest.raises(FireError, match="NaN"):
        dirs.save(dirs.Directions([bad]), p)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mutate,match", [
    (lambda t: setattr(t, "mu", np.full(12, np.nan, np.float32)), "NaN"),
    (lambda t: setattr(t, "U", t.U * 2), "orthonormal"),
    (lambda t: setattr(t, "mu", np.zeros(5, np.float32)), "mu has shape"),
    (lambda t: setattr(t, "tau", np.zeros(3, np.float32)), "tau has shape"),
    (lambda t: setattr(t, "alpha", -np.ones(2, np.float32)), "alpha"),
    (lambda t: setattr(t, "layout", "grid"), "layout"),
    (lambda t: setattr(t, "gate", "soft"), "gate"),
    (lambda t: setattr(t, "feature_shape", [5, 5]), "flatten"),
    (lambda t: (setattr(t, "module", ""), setattr(t, "tensor", "")), "tensor name or a module"),
])
def test_validation_rejects(mutate, match):
    t = target()
    mutate(t)
    with pytest.raises(FireError, match=match):
        dirs.Directions([t]).validate()


def _rewrite(src, dst, **changes):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays["header"][()]))
    for k, v in changes.items():
        if k.startswith("t0."):
            arrays[k] = v
        else:
            header[k] = v
    arrays["header"] = np.array(json.dumps(header))
    np.savez(dst, **arrays)


@pytest.fixture
def saved(tmp_path):
    p = tmp_path / "good.npz"
    dirs.save(dirs.Directions([target()]), p)
    return p


@pytest.mark.parametrize("changes,match", [
    (dict(schema_version=99), "schema version 99"),
    (dict(format="something-else"), "not a fire-onnx directions file"),
    ({"t0.mu": np.full(12, np.nan, np.float32)}, "NaN"),
    ({"t0.U": np.ones((2, 12), np.float32)}, "orthonormal"),
])
def test_load_rejects_tampered_files(saved, tmp_path, changes, match):
    p = tmp_path / "bad.npz"
    _rewrite(saved, p, **changes)
    with pytest.raises(FireError, match=match):
        dirs.load(p)


def test_load_refuses_pickles_and_garbage(tmp_path):
    p = tmp_path / "pickled.npz"
    np.savez(p, header=np.array([{"format": dirs.FORMAT}], dtype=object))
    with pytest.raises(FireError, match="pickled"):
        dirs.load(p)
    g = tmp_path / "garbage.npz"
    g.write_bytes(b"not a zip file at all")
    with pytest.raises(FireError, match="not a valid npz"):
        dirs.load(g)
    with pytest.raises(FireError, match="not found"):
        dirs.load(tmp_path / "missing.npz")
    e = tmp_path / "empty.npz"
    np.savez(e, x=np.zeros(3))
    with pytest.raises(FireError, match="no 'header'"):
        dirs.load(e)


def test_reference_repair_projects_out_the_direction():
    t = target(gate="none")
    h = np.random.default_rng(1).normal(size=(5, 3, 2, 2))
    out = dirs.reference_repair(h, t).reshape(5, -1)
    scores = (out - t.mu) @ t.U.T.astype(np.float64)
    np.testing.assert_allclose(scores, 0, atol=1e-5)
