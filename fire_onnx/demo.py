"""End-to-end demo: backdoor a small CNN on real MNIST digits, then repair it with FIRE in ONNX.

Steps (all seeded, CPU, about a minute on 2 cores):
1. train ``fire_onnx_models.small_cnn`` on the bundled MNIST-5k digits with BadNets poisoning
   (10 % of the training set stamped with a 3x3 patch and relabelled to the target class);
2. export it to ONNX (dynamic batch);
3. fit the backdoor direction at a layer from 20 triggered + a few hundred clean training images;
4. patch the ONNX graph;
5. evaluate original and patched models in onnxruntime: CA, ASR, RA.

Artifacts: model.onnx, directions.npz, model.fire.onnx, report.json in the output folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fire_onnx import directions as dirs
from fire_onnx import triggers
from fire_onnx.data import Images, Preprocess, bundled_mnist, fit_samples, load_images
from fire_onnx.errors import FireError
from fire_onnx.fileio import check_output_folder, check_outputs

Log = Callable[[str], None]


DEFAULT_LAYER = {"small_cnn": "block2", "vit": "blocks.0"}
ARTIFACTS = ("model.onnx", "model.pt", "directions.npz", "model.fire.onnx", "report.json", "report.md")


def build_arch(arch: str, n_classes: int, channels: int, side: int):
    """The demo's architectures: SmallCNN (2 conv + 2 fc) or a small ViT (4 blocks, 64 dims)."""
    if arch == "vit":
        from fire_onnx_models.vit import SmallViT

        return SmallViT(n_classes, channels, side, patch=7 if side % 7 == 0 else 4)
    from fire_onnx_models.small_cnn import SmallCNN

    return SmallCNN(num_classes=n_classes, in_channels=channels, image_size=side)


def poison(train: Images, trigger, target: int, rate: float, rng: np.random.Generator) -> tuple[Images, np.ndarray]:
    """Stamp ``rate`` of the training set (drawn from non-target classes) and relabel it to ``target``."""
    candidates = np.flatnonzero(train.y != target)
    n = int(round(rate * len(train)))
    idx = rng.choice(candidates, size=n, replace=False)
    x, y = train.x.copy(), train.y.copy()
    x[idx] = trigger.apply(x[idx])
    y[idx] = target
    return Images(x, y, train.classes), idx


def train_model(model, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, lr: float = 1e-3,
                batch_size: int = 64, log: Log = print):
    import torch

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(xt), batch_size):
            b = perm[i : i + batch_size]
            out = model(xt[b])
            loss = torch.nn.functional.cross_entropy(out, yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(b)
            correct += int((out.argmax(1) == yt[b]).sum())
            total += len(b)
        log(f"  epoch {ep + 1}/{epochs}: loss {loss_sum / total:.4f}, train acc {correct / total:.3f}")
    return model.eval()


def run_demo(
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    trigger: str = "badnets",
    target: int = 0,
    poison_rate: float = 0.1,
    epochs: int = 6,
    layer: str | None = None,
    arch: str = "small_cnn",
    n_clean: int = 300,
    n_triggered: int = 20,
    gate: str = "auto",
    seed: int = 0,
    log: Log = print,
) -> dict:
    """Run the whole demo and return the report (also written to ``out_dir/report.json``)."""
    out = Path(out_dir)
    data_path = Path(data) if data else bundled_mnist()
    check_output_folder(out)  # before any work: a folder that cannot be written fails now, not after training
    if out.is_dir():
        check_outputs([out / name for name in ARTIFACTS], [data_path])

    import torch

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    train, test = _splits(data_path)
    n_classes = int(max(train.y.max(), test.y.max()) + 1)
    if not 0 <= target < n_classes:
        raise FireError(f"target must be a class index in 0..{n_classes - 1}")
    h, w, c = train.x.shape[1:]
    if arch not in DEFAULT_LAYER:
        raise FireError(f"arch must be one of {', '.join(DEFAULT_LAYER)}")
    if h != w or h % 4:
        raise FireError(f"the demo models need square images with a side divisible by 4, got {h}x{w}")
    trig = triggers.parse(trigger)
    trig.apply(test.x[:1])  # a trigger that does not fit these images (a WaNet grid of another size) fails now
    pre = Preprocess(scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, layout="NCHW")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = build_arch(arch, n_classes, c, h)
    layer = layer or DEFAULT_LAYER[arch]
    if layer not in dict(model.named_modules()) or not layer:
        raise FireError(f"--layer {layer!r} is not a module of the demo's {arch} (e.g. {', '.join(_modules(model))})")

    # everything is written to a staging folder inside the output folder and moved in at the end: a demo
    # that fails (or is interrupted) leaves the folder as it found it
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".fire-onnx-demo-", dir=out))
    try:
        report = _run(out, stage, model, train, test, pre, trig, trigger, data_path, target, poison_rate, epochs,
                      arch, layer, gate, n_clean, n_triggered, seed, rng, t0, log)
        for name in ARTIFACTS:
            os.replace(stage / name, out / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return report


def _splits(data_path: Path) -> tuple[Images, Images]:
    """The labelled train and test splits of the demo's data file (they must be different images)."""
    from fire_onnx.data import load_npz

    keys = set(load_npz(data_path, "image file"))
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in keys]
    if missing:
        raise FireError(f"{data_path} has no {', '.join(missing)} (keys: {', '.join(sorted(keys))}): the demo "
                        "trains on x_train/y_train and measures on x_test/y_test, different images")
    return load_images(data_path, "train"), load_images(data_path, "test")


def _modules(model, shown: int = 6) -> list[str]:
    names = [n for n, m in model.named_modules() if n and "." not in n]
    return names[:shown]


def _run(out, stage, model, train, test, pre, trig, trigger, data_path, target, poison_rate, epochs, arch, layer,
         gate, n_clean, n_triggered, seed, rng, t0, log) -> dict:
    """The demo's five steps, writing into ``stage`` (report paths name ``out``)."""
    import torch

    from fire_onnx.evaluate import compute_metrics, session
    from fire_onnx.fit import export_onnx, fit_directions
    from fire_onnx.patch import patch_file

    log(f"[1/5] training a backdoored {arch} on {data_path.name} ({len(train)} train images, "
        f"{trigger}, {poison_rate:.0%} poisoned, target {target})")
    poisoned, pidx = poison(train, trig, target, poison_rate, rng)
    train_model(model, pre(poisoned.x), poisoned.y, epochs=epochs, seed=seed, log=log)

    log("[2/5] exporting to ONNX")
    model_path = stage / "model.onnx"
    export_onnx(model, pre(test.x[:2]), model_path)
    torch.save(model.state_dict(), stage / "model.pt")

    log(f"[3/5] fitting the backdoor direction at '{layer}' from {n_triggered} triggered + {n_clean} clean images")
    unpoisoned = train.subset(np.setdiff1d(np.arange(len(train)), pidx))
    clean, trig_imgs, source = fit_samples(unpoisoned, n_clean=n_clean, n_triggered=n_triggered, seed=seed,
                                           target=target, trigger=trig)
    import onnx

    d = fit_directions(model, [layer], clean, trig_imgs, pre, gate=gate, onnx_model=onnx.load(str(model_path)),
                       triggered_source=source,
                       meta={"trigger": triggers.describe(trig), "target": target, "source": "fire-onnx demo"})
    dir_path = stage / "directions.npz"
    dirs.save(d, dir_path)
    t = d.targets[0]
    log(f"  tensor {t.tensor!r}, D = {t.dim}, " + ("gate none (acts on every input)" if t.gate == "none" else
        f"gate {t.gate}, tau {float(t.tau[0]):.3f}, gate fires on {t.fit['gate_recall_triggered']:.0%} of triggered "
        f"fit samples, {t.fit['gate_fires_clean']:.1%} of clean ones"))

    log("[4/5] patching the ONNX graph")
    patched_path = stage / "model.fire.onnx"
    _, res = patch_file(model_path, dir_path, patched_path)
    for wmsg in res.warnings:
        log(f"  warning: {wmsg}")
    log(f"  inserted {sum(p.nodes for p in res.targets)} nodes after {res.targets[0].tensor!r}")

    log(f"[5/5] evaluating in onnxruntime on {len(test)} test images")
    trig_test = Images(trig.apply(test.x), test.y)
    report = {"original": {}, "patched": {}}
    for key, path in (("original", model_path), ("patched", patched_path)):
        m = compute_metrics(session(path), test, pre, trig_test, target)
        report[key] = {"ca": m.ca, "asr": m.asr, "ra": m.ra, "n_clean": m.n_clean, "n_triggered": m.n_triggered}
    o, p = report["original"], report["patched"]
    report["checks"] = {
        "original_asr_ge_50pct": o["asr"] >= 0.5,  # no backdoor implanted: the repair below demonstrates nothing
        "ca_drop_le_0.5pt": (o["ca"] - p["ca"]) <= 0.005 + 1e-12,
        "asr_le_2pct": p["asr"] <= 0.02,
        "ra_ge_ca_minus_3pt": p["ra"] >= p["ca"] - 0.03,
    }
    report["config"] = {
        "data": data_path.name, "trigger": triggers.describe(trig), "target": target, "poison_rate": poison_rate,
        "epochs": epochs, "arch": arch, "layer": layer, "tensor": t.tensor, "gate": t.gate, "n_clean": n_clean,
        "n_triggered": n_triggered, "seed": seed,
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["artifacts"] = {k: str(out / v) for k, v in (("model", "model.onnx"), ("weights", "model.pt"),
                           ("directions", "directions.npz"), ("patched", "model.fire.onnx"),
                           ("report", "report.md"))}
    (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (stage / "report.md").write_text(format_report(report) + "\n")
    return report


def format_report(report: dict) -> str:
    o, p = report["original"], report["patched"]
    rows = [
        "| model | CA | ASR | RA |",
        "|---|---|---|---|",
        f"| original | {o['ca']:.1%} | {o['asr']:.1%} | {o['ra']:.1%} |",
        f"| patched (FIRE) | {p['ca']:.1%} | {p['asr']:.1%} | {p['ra']:.1%} |",
    ]
    checks = [f"  {'ok ' if v else 'FAIL'} {k}" for k, v in report.get("checks", {}).items()]
    return "\n".join(rows + ["", "checks:"] + checks)
