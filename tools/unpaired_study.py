"""Which feature-space estimate of the backdoor direction works best from flagged inputs alone?

Issue 6, item 2: triggers that no pixel model explains (warps, sample-specific patterns) leave the
flagged-input path with an *unpaired* estimate: the flagged images' mean activation minus a clean
reference. This study compares reference constructions on the same backdoored models, the same 20
flagged images and the same 500 clean images, each turned into a repair by the library's own
``fit_target`` (the reference enters as the per-sample "twin" activations), patched into the ONNX model
and evaluated in onnxruntime:

- ``paired``      oracle: the flagged images' real clean twins (the upper bound; not available in practice)
- ``unpaired``    the plain clean mean (what fit does today without twins or labels)
- ``augment``     the paper's idea: activations averaged over 8 random augmentations that keep the trigger
                  (gaussian noise, brightness/contrast jitter) for both sets, then the clean mean
- ``shrink``      the mean difference, its coefficients on the clean principal axes shrunk by their noise
                  (Wiener-style: coefficient * max(0, 1 - var_j (1/n_t + 1/n_c) / coefficient^2)); the
                  library's ``fire_onnx.estimate.shrunk_shift``, what ``fit`` does without twins
- ``shrink-class``  self-class's predicted classes as the reference, then the library's shrinkage on the
                  within-class axes (3 rounds)
- ``knn``         per-flagged-image pseudo-twins: the mean of its 5 nearest clean activations measured
                  orthogonally to the current direction estimate (3 rounds)
- ``self-class``  self-consistent class-matched reference: the repaired model predicts each flagged image's
                  true class, the reference becomes that class's clean mean, refit (3 rounds)
- ``knn-class``   knn restricted to clean images of the class the repaired model predicts

    python tools/unpaired_study.py --data-dir ../shared/data --out benchmarks/unpaired
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_flagged as bf  # noqa: E402

ATTACKS = {"badnets": ("badnets", "block2"), "blended": ("blended:alpha=0.2", "block1"),
           "wanet": ("wanet:k=4,s=2", "block2"), "sig": ("sig", "block1")}
METHODS = ["paired", "unpaired", "augment", "shrink", "knn", "self-class", "knn-class", "shrink-class"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    xf = x.astype(np.float32)
    gain = rng.uniform(0.85, 1.15, size=(len(x), 1, 1, 1))
    bias = rng.uniform(-15, 15, size=(len(x), 1, 1, 1))
    xf = xf * gain + bias + rng.normal(0, 6, size=x.shape)
    return np.clip(np.rint(xf), 0, 255).astype(np.uint8)


def rows(a):
    return a.reshape(len(a), -1)


def shrink_shift(C, T, yc=None, yt=None):
    """The library's shrunk mean shift (fire_onnx.estimate.shrunk_shift), against the clean mean or, with
    predicted classes ``yt`` for the flagged rows, against those classes' clean means."""
    from fire_onnx.estimate import shrunk_shift

    if yt is None:
        d = T.mean(0) - C.mean(0)
    else:
        mu = C.mean(0)
        means = {k: C[yc == k].mean(0) for k in np.unique(yc)}
        d = (T - np.stack([means.get(k, mu) for k in yt])).mean(0)
    return shrunk_shift(d, C, n_t=len(T), labels=yc, triggered_labels=yt)[0]


def knn_iterate(C, T, u, rounds, allowed=None):
    """Pseudo-twins by nearest neighbours orthogonal to the direction ``u``, re-estimated ``rounds`` times."""
    for _ in range(rounds):
        ref = knn_ref(C, T, u, allowed=allowed)
        d = (T - ref).mean(0)
        u = d / np.linalg.norm(d)
    return ref


def knn_ref(C, T, u, k=5, allowed=None):
    P = lambda a: a - np.outer(a @ u, u)  # noqa: E731
    Cp, Tp = P(C), P(T)
    ref = np.empty_like(T)
    for i in range(len(T)):
        cand = np.arange(len(C)) if allowed is None else allowed[i]
        d = ((Cp[cand] - Tp[i]) ** 2).sum(1)
        ref[i] = C[cand[np.argsort(d)[:k]]].mean(0)
    return ref


def run_cell(dataset, attack, args):
    from fire_onnx import directions as dirs
    from fire_onnx import triggers
    from fire_onnx.data import Images, Preprocess, load_images
    from fire_onnx.estimate import fit_target
    from fire_onnx.evaluate import compute_metrics, predict_logits, session
    from fire_onnx.fit.core import OnnxSource
    from fire_onnx.onnxutil import load_model
    from fire_onnx.patch import patch_file

    spec, layer = ATTACKS[attack]
    data_path = Path(args.data_dir) / f"{dataset}.npz"
    recipe = bf.make_recipe(data_path, "small_cnn", spec, args.epochs, 0)
    onnx_path, _ = bf.train_or_reuse(recipe, data_path, Path(args.cache))
    train, test = load_images(data_path, "train"), load_images(data_path, "test")
    test = test.subset(slice(0, args.limit))
    c = train.x.shape[-1]
    pre = Preprocess(scale=1 / 255, mean=[0.5] * c, std=[0.5] * c, layout="NCHW")
    trig = triggers.parse(spec)
    flag_all, pool = bf.flagged_split(train, 0)
    flag_src = np.array(flag_all[: args.n_flagged])
    clean = train.subset(pool[: 500])
    xf_clean = train.x[flag_src]
    xf = trig.apply(xf_clean)
    model = load_model(onnx_path)
    src = OnnxSource(model, [layer])
    acts = lambda x: src.run(pre(x))  # noqa: E731
    (ac, _), (at, _), (ap, _) = acts(clean.x), acts(xf), acts(xf_clean)
    C, T, Pd = ac[layer], at[layer], ap[layer]
    shape = C.shape
    trig_test = Images(trig.apply(test.x), test.y)
    base_ca = compute_metrics(session(onnx_path), test, pre, trig_test, bf.TARGET)
    out = [{"dataset": dataset, "attack": attack, "method": "original", "ca": base_ca.ca, "asr": base_ca.asr,
            "ra": base_ca.ra}]
    log(f"{dataset} {attack}: original CA {base_ca.ca:.3f} ASR {base_ca.asr:.3f}")
    Cr, Tr = rows(C), rows(T)
    true_u = (Tr - rows(Pd)).mean(0)
    true_u /= np.linalg.norm(true_u)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def repair(ref_rows, C_use=C, T_use=T, name="x"):
            t = fit_target(C_use, T_use, layout="flat", paired=ref_rows.reshape(T_use.shape),
                           tensor=src.tensor_of[layer], module=layer)
            d = dirs.Directions(targets=[t], preprocess=pre.as_dict(), meta={})
            dp, mp = tmp / f"{name}.npz", tmp / f"{name}.onnx"
            dirs.save(d, dp)
            patch_file(onnx_path, dp, mp, force=True)
            return t, mp

        def evaluate(method, ref_rows, **kw):
            t0 = time.perf_counter()
            t, mp = repair(ref_rows, name=method, **kw)
            sess = session(mp)
            m = compute_metrics(sess, test, pre, trig_test, bf.TARGET)
            cos = float(abs(t.U[0] @ true_u))
            rec = {"dataset": dataset, "attack": attack, "method": method, "ca": m.ca, "asr": m.asr, "ra": m.ra,
                   "cos_true": cos, "gate_fires_clean": t.fit.get("gate_fires_clean"),
                   "seconds": round(time.perf_counter() - t0, 1)}
            log(f"  {method:10s} CA {m.ca:.3f} ASR {m.asr:.3f} RA {m.ra:.3f} cos {cos:.3f}")
            out.append(rec)
            return t, sess

        mu = Cr.mean(0)
        evaluate("paired", rows(Pd))
        t_un, sess_un = evaluate("unpaired", np.tile(mu, (len(T), 1)))
        # augmentation: average activations over random augmentations (both sets)
        arng = np.random.default_rng(7)
        Ca = np.mean([rows(acts(augment(clean.x, arng))[0][layer]) for _ in range(8)], axis=0)
        Ta = np.mean([rows(acts(augment(xf, arng))[0][layer]) for _ in range(8)], axis=0)
        evaluate("augment", np.tile(Ca.mean(0), (len(T), 1)), C_use=Ca.reshape(shape), T_use=Ta.reshape(T.shape))
        ds = shrink_shift(Cr, Tr)
        evaluate("shrink", Tr - ds)
        evaluate("knn", knn_iterate(Cr, Tr, t_un.U[0].astype(np.float64), 3))
        def self_consistent(reference, name, rounds=3):
            """Predict the flagged images' classes with the repaired model, refit on ``reference(yhat)``,
            repeat; returns (last reference, last target, predicted classes under the last repair)."""
            sess, t = sess_un, None
            for it in range(rounds):
                ref = reference(predict_logits(sess, pre(xf)).argmax(1))
                t, mp = repair(ref, name=f"{name}{it}")
                sess = session(mp)
            return ref, t, predict_logits(sess, pre(xf)).argmax(1)

        means = {k: Cr[clean.y == k].mean(0) for k in np.unique(clean.y)}
        ref, t, yhat = self_consistent(lambda yh: np.stack([means.get(k, mu) for k in yh]), "sc")
        evaluate("self-class", ref)
        allowed = [np.flatnonzero(clean.y == k) if (clean.y == k).sum() >= 5 else np.arange(len(Cr)) for k in yhat]
        evaluate("knn-class", knn_iterate(Cr, Tr, t.U[0].astype(np.float64), 2, allowed=allowed))
        ref, _, yhat = self_consistent(lambda yh: Tr - shrink_shift(Cr, Tr, clean.y, yh), "shc")
        evaluate("shrink-class", ref)
        acc_yhat = float((yhat == train.y[flag_src]).mean())
        log(f"  self-class predicted the flagged images' true class for {acc_yhat:.0%}")
        out[-1]["true_class_accuracy"] = acc_yhat
    return out


def markdown(records):
    methods = ["original"] + METHODS
    lines = ["CA / ASR / RA in % (SmallCNN, 6 epochs, 10 % poisoning, target 0; 20 flagged images, 500 clean; "
             "repair at the layer in parentheses). `paired` uses the flagged images' real clean twins (oracle).", "",
             "| dataset | attack | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    cells = {}
    for r in records:
        cells.setdefault((r["dataset"], r["attack"]), {})[r["method"]] = r
    for (ds, att), by in cells.items():
        row = [f"{100 * by[m]['ca']:.1f} / {100 * by[m]['asr']:.1f} / {100 * by[m]['ra']:.1f}" if m in by else ""
               for m in methods]
        lines.append(f"| {ds} | {att} ({ATTACKS[att][1]}) | " + " | ".join(row) + " |")
    lines += ["", "Cosine of each estimated direction with the oracle (paired) direction:", "",
              "| dataset | attack | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for (ds, att), by in cells.items():
        lines.append(f"| {ds} | {att} | " + " | ".join(f"{by[m]['cos_true']:.2f}" if m in by else "" for m in METHODS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="benchmarks/unpaired")
    ap.add_argument("--cache", default="benchmarks/.cache/models")
    ap.add_argument("--datasets", default="mnist5k,cifar10")
    ap.add_argument("--attacks", default="badnets,blended,wanet")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--n-flagged", type=int, default=20)
    ap.add_argument("--limit", type=int, default=2000)
    args = ap.parse_args(argv)
    records = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for ds in args.datasets.split(","):
        for att in args.attacks.split(","):
            records += run_cell(ds, att, args)
            (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
            (out / "results.md").write_text(markdown(records))
    print(markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
