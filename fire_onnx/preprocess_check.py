"""Is the preprocessing the fit was given the one the model was trained with?

Directions fitted on activations of wrongly preprocessed images do not match what the model computes in
deployment, so the repair they make is wrong, and nothing later in ``fit`` can see it: the held-out
check compares the repaired model with the original under the same wrong preprocessing. The only sign
is the model's accuracy on the labelled clean images, and an absolute "near chance" rule misses a
model at 33 % on MNIST (seen in a new-user trial: 0..255 inputs to a model trained on 0..1).

So, when the clean images are labelled and the model gets fewer than ``PROBE_BELOW`` of them right,
``fit`` also scores a few common preprocessings (0..1, -1..1, 0..255, ImageNet and the images' own
per-channel standardisation; the layout is the model's input shape's business). When one of them is
clearly better than the one given on the same images, that is almost certainly the right one: ``fit``
warns (``WARN_GAP`` and ``WARN_Z``: the demo model given 0..1 inputs instead of -1..1 gets 88 % instead
of 98 %, and its repair leaves 9 % ASR instead of 0 %), or refuses (``REFUSE_GAP``; ``--force`` fits
with the given preprocessing anyway).
"""

from __future__ import annotations

import numpy as np

from fire_onnx.data import Preprocess
from fire_onnx.errors import FireError

N_PROBE = 200  # labelled clean images scored per preprocessing
N_FIRST = 64  # images every alternative is scored on first
PROBE_BELOW = 0.95  # score alternatives only when the given preprocessing gets fewer right than this
WARN_GAP = 0.05  # warn when an alternative gets at least this much more right ...
WARN_Z = 3.0  # ... and that is no accident of the sample (McNemar's statistic over the same images)
REFUSE_GAP = 0.3  # refuse (without --force) from this gap on
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def candidates(x: np.ndarray, layout: str) -> list[tuple[str, Preprocess]]:
    """(command-line options, preprocessing) of common choices for uint8 NHWC images ``x``."""
    c = x.shape[-1]
    own = x.reshape(-1, c).astype(np.float64) / 255.0
    mean, std = own.mean(axis=0), np.maximum(own.std(axis=0), 1e-3)
    fmt = lambda v: ",".join(f"{float(a):.3g}" for a in v)  # noqa: E731
    out = [("--scale 1/255 (0..1)", Preprocess(1 / 255, [0.0], [1.0], layout)),
           ("--mean 0.5 --std 0.5 (-1..1)", Preprocess(1 / 255, [0.5], [0.5], layout)),
           ("--scale 1 (0..255)", Preprocess(1.0, [0.0], [1.0], layout)),
           (f"--mean {fmt(mean)} --std {fmt(std)} (the images' own standardisation)",
            Preprocess(1 / 255, [float(v) for v in mean], [float(v) for v in std], layout))]
    if c == 3:
        out.append((f"--mean {fmt(IMAGENET[0])} --std {fmt(IMAGENET[1])} (ImageNet)",
                    Preprocess(1 / 255, *IMAGENET, layout)))
    return out


def _same(a: Preprocess, b: Preprocess, c: int) -> bool:
    def full(v):
        return np.broadcast_to(np.asarray(v, np.float64), (c,))

    return (np.isclose(a.scale, b.scale, rtol=1e-6) and np.allclose(full(a.mean), full(b.mean), atol=2e-3)
            and np.allclose(full(a.std), full(b.std), atol=2e-3))


def check(predict, x: np.ndarray, y: np.ndarray, given: Preprocess, labels_in_range: bool = False) -> dict | None:
    """Score ``given`` and, when it does poorly, the alternatives. ``predict`` maps model inputs to
    (N, classes) scores, or None when the model has no class scores (then nothing is checked).
    Returns ``{accuracy, n, alternatives: [{options, accuracy, n, gap, z}], best, gap}`` (per
    alternative: scored on its first ``n`` images, ``gap`` its accuracy minus the given one's there,
    ``z`` McNemar's statistic against the given one on the same images), or None."""
    scores = predict(given(x))
    if scores is None or scores.ndim != 2 or scores.shape[1] < 2:
        return None
    pred = scores.argmax(axis=1)
    if labels_in_range:  # fit: before any other work (it refused only after collecting every activation:
        # 19 minutes on a ResNet-50, new-user run 7)
        from fire_onnx.evaluate import check_labels_in_range

        check_labels_in_range(pred, y, scores.shape[1])
    right = pred == y
    acc = float(right.mean())
    out: dict = {"accuracy": acc, "n": int(len(y)), "alternatives": [], "gap": 0.0}
    if acc >= PROBE_BELOW:
        return out
    if (ren := renumbered(pred, y, scores.shape[1])) is not None:
        out["renumbered"] = ren  # another class numbering explains it, not the preprocessing (alternatives not scored)
        return out
    n0 = min(N_FIRST, len(y))
    for options, pre in candidates(x, given.layout):
        if _same(pre, given, x.shape[-1]):
            continue
        # first on a few images: only an alternative that does better there is scored on all of them
        # (a 76 %-accurate ImageNet model would otherwise pay 1,000 extra forward passes)
        s = predict(pre(x[:n0]))
        alt = s.argmax(axis=1) == y[:n0] if s is not None else np.zeros(n0, bool)
        n = n0
        if int(alt.sum()) - int(right[:n0].sum()) >= max(2, WARN_GAP * n0) and n0 < len(y):
            s = predict(pre(x))
            alt, n = (s.argmax(axis=1) == y if s is not None else np.zeros_like(right)), len(y)
        gained, lost = int((alt & ~right[:n]).sum()), int((right[:n] & ~alt).sum())
        z = (gained - lost) / np.sqrt(gained + lost) if gained + lost else 0.0
        out["alternatives"].append({"options": options, "accuracy": float(alt.mean()), "n": n,
                                    "gap": float(alt.mean() - right[:n].mean()), "z": round(float(z), 2)})
    if out["alternatives"]:
        best = max(out["alternatives"], key=lambda r: (r["n"], r["gap"]))
        out["best"], out["gap"] = best, best["gap"]
    return out


RENUMBERED = 0.8  # predictions that match the labels this often under another class numbering ...
RENUMBERED_GAIN = 0.3  # ... and this much more often than as they are: the labels are numbered differently


def renumbered(pred: np.ndarray, y: np.ndarray, n_classes: int) -> dict | None:
    """The labels under another numbering than the model's: each labelled class's images mostly go to one class,
    a different one for each label, and not their own (new-user run 21: a binary model's labels inverted, 3 % right,
    was told to change --scale, which only gave chance). ``{mapping, agreement, accuracy}`` or None."""
    pred, y = np.asarray(pred), np.asarray(y)
    classes = [int(c) for c in np.unique(y)]
    if len(classes) < 2:
        return None
    mapping = {c: int(np.bincount(pred[y == c], minlength=n_classes).argmax()) for c in classes}
    if len(set(mapping.values())) < len(mapping) or all(k == v for k, v in mapping.items()):
        return None
    agreement = float((np.array([mapping[int(c)] for c in y]) == pred).mean())
    accuracy = float((pred == y).mean())
    if agreement < RENUMBERED or agreement - accuracy < RENUMBERED_GAIN:
        return None
    return {"mapping": mapping, "agreement": agreement, "accuracy": accuracy}


def renumbered_message(rec: dict) -> str:
    r = rec["renumbered"]
    moved = [(k, v) for k, v in r["mapping"].items() if k != v]
    shown = ", ".join(f"{k} -> {v}" for k, v in moved[:6]) + (", ..." if len(moved) > 6 else "")
    return (f"the model classifies only {r['accuracy']:.1%} of {rec['n']} labelled clean images correctly, but "
            f"{r['agreement']:.1%} of them match their label under another class numbering (label -> the model's "
            f"class: {shown}): the clean file's labels are numbered differently from the model's classes (inverted "
            "binary labels, another class order); renumber them")


FIT_ADVICE = ("directions fitted on inputs the model does not see in deployment give a wrong repair; pass the "
              "preprocessing the model was trained with")
EVAL_ADVICE = "CA, ASR and RA measured this way describe inputs the model does not see in deployment"


def message(rec: dict, given: Preprocess, advice: str = FIT_ADVICE) -> str:
    from fire_onnx.evaluate import describe_preprocess

    best = rec["best"]
    return (f"with the preprocessing given ({describe_preprocess(given)}) the model classifies only "
            f"{rec['accuracy']:.1%} of {rec['n']} labelled clean images correctly, but {best['accuracy']:.1%} with "
            f"{best['options']}: {advice}")


def probe(images) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to ``N_PROBE`` images and their labels, None when unlabelled (seeded: a file sorted by class still
    gives every class)."""
    idx = np.sort(np.random.default_rng(0).permutation(len(images))[:N_PROBE])
    return images.x[idx], None if images.y is None else images.y[idx]


def _safe(predict):
    """``predict`` with a FireError for an input (e.g. a fixed-batch model and a probe that does not divide into
    its batches) read as no scores for it."""
    def run(z):
        try:
            return predict(z)
        except FireError:
            return None

    return run


def assess(predict, images, given: Preprocess, labels_in_range: bool = False) -> dict | None:
    """:func:`check` on up to ``N_PROBE`` of ``images``; None when they are unlabelled or too few, or the
    model gives no class scores. A ``predict`` that raises FireError for an input (e.g. a fixed-batch
    model and a probe that does not divide into its batches) counts as no scores for it."""
    if images.y is None or len(images) < 20:
        return None
    return check(_safe(predict), *probe(images), given, labels_in_range)


def clearly_better(rec: dict) -> bool:
    """An alternative beats the given preprocessing by ``WARN_GAP`` on the same images, and by more than
    chance (McNemar's ``WARN_Z``)."""
    return rec["gap"] >= WARN_GAP and rec["best"]["z"] >= WARN_Z


def warning_of(meta: dict) -> str | None:
    """The warning :func:`run` recorded in a fit's ``meta``, if any (every path that reports warnings
    carries it: a fit, a trigger-free scan or an unlabeled search that found nothing)."""
    return (meta.get("preprocess_check") or {}).get("warning")


def eval_warning(predict, images, given: Preprocess) -> str | None:
    """``eval``'s use: the warning line when an alternative clearly beats ``given`` on ``images``
    (labelled), else None. It measures; it refuses nothing."""
    rec = assess(predict, images, given)
    if rec is not None and "renumbered" in rec:
        return renumbered_message(rec)
    return message(rec, given, EVAL_ADVICE) if rec is not None and clearly_better(rec) else None


COLLAPSED = 0.7  # unlabelled: the given preprocessing sends at least this share of clean images to one class ...
SPREAD = 0.35  # ... and an alternative sends at most this share to any one class: warn (never refuse)


def _top_share(scores) -> float | None:
    if scores is None or scores.ndim != 2 or scores.shape[1] < 2 or not len(scores):
        return None
    return float(np.bincount(scores.argmax(axis=1), minlength=scores.shape[1]).max() / len(scores))


def assess_unlabeled(predict, images, given: Preprocess) -> dict | None:
    """Without labels accuracy cannot be measured, but a preprocessing the model was not trained with often
    sends most clean images to one class (a -1..1 model fed 0..255 pixels: fit said '100 % -> 6 %' under it
    and the deployed repair left 100 % ASR, new-user run 12). When the given preprocessing does that and a
    common alternative spreads the same images over the classes, the record carries a ``warning``. A clean
    file of one class would collapse under every preprocessing, so it is never flagged."""
    if len(images) < 20:
        return None
    x, _ = probe(images)
    predict = _safe(predict)

    def share(pre):
        return _top_share(predict(pre(x)))

    top = share(given)
    if top is None:
        return None
    out: dict = {"labels": False, "top_class_share": top, "n": int(len(x)), "alternatives": []}
    if top < COLLAPSED:
        return out
    for options, pre in candidates(x, given.layout):
        if _same(pre, given, x.shape[-1]):
            continue
        alt = share(pre)
        if alt is not None:
            out["alternatives"].append({"options": options, "top_class_share": alt})
    spread = [a for a in out["alternatives"] if a["top_class_share"] <= SPREAD]
    if spread:
        from fire_onnx.evaluate import describe_preprocess

        best = min(spread, key=lambda a: a["top_class_share"])
        out["warning"] = (f"with the preprocessing given ({describe_preprocess(given)}) the model puts {top:.0%} of "
                          f"{len(x)} clean images in one class, and at most {best['top_class_share']:.0%} with "
                          f"{best['options']}: the preprocessing is probably not the one the model was trained with "
                          "(the clean file has no labels to measure its accuracy); " + FIT_ADVICE)
    return out


def run(req, pool, given: Preprocess, source) -> dict | None:
    """Check ``given`` on up to ``N_PROBE`` labelled images of ``pool`` with ``source`` (a
    TorchSource or OnnxSource reading no layers). Returns the record (with ``warning`` when fit should
    say so), None when there is nothing to check (no labels, no class scores); raises FireError when it
    refuses and ``req.force`` is not set."""
    if pool.y is None:
        rec = assess_unlabeled(lambda z: source.run(z)[1], pool, given)
        if rec is not None and "warning" not in rec:
            req.notes.append("the clean file has no labels: the preprocessing was checked only for predictions that "
                             "collapse onto one class, not against the model's accuracy")
        return rec
    rec = assess(lambda z: source.run(z)[1], pool, given, labels_in_range=True)
    if rec is None:
        return None
    if "renumbered" in rec:
        text = renumbered_message(rec)
        if not req.force:
            raise FireError(f"not fitted: {text} (--force fits with these labels anyway)")
        rec["warning"] = f"fitted with --force although {text}"
    elif rec["gap"] >= REFUSE_GAP:
        text = message(rec, given)
        if not req.force:
            raise FireError(f"not fitted: {text} (--force fits with the given preprocessing anyway)")
        rec["warning"] = f"fitted with --force although {text}"
    elif clearly_better(rec):
        rec["warning"] = message(rec, given)
    return rec
