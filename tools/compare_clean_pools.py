#!/usr/bin/env python3
"""Training images or new images as ``--clean``: two ``tools/bench_auto.py`` runs side by side.

Both runs must evaluate on the same test images: one with ``--eval-tail`` (clean pool: training images),
one with ``--clean-from test`` (clean pool: the first 60 % of the test split, images the model was not
trained on); both are evaluated on the remaining 40 %. Per cell and repair (``fixed``, ``auto``, every
single layer), the test ASR and clean change of the two fits, and how well ``--layer auto``'s held-out
clean change predicted the test one. Writes ``<out>/results.md`` and ``<out>/results.json``. Example::

    python tools/bench_auto.py --data-dir ../shared/data --eval-tail --out benchmarks/auto_tail
    python tools/bench_auto.py --data-dir ../shared/data --clean-from test --out benchmarks/auto_val
    python tools/compare_clean_pools.py benchmarks/auto_tail benchmarks/auto_val --out benchmarks/clean_pool
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _key(r: dict) -> tuple:
    return r["dataset"], r.get("epochs"), r["attack"], r["mode"], tuple(r["layers"]) if r["mode"] == "layer" else ()


def _load(folder: Path, pool: str) -> dict:
    recs = json.loads((folder / "results.json").read_text())
    bad = [r for r in recs if not (r.get("eval_tail") or r.get("clean_from") == "test")]
    if bad:
        raise SystemExit(f"{folder}: records not evaluated on the test tail (run bench_auto.py with --eval-tail or "
                         "--clean-from test)")
    if any(r.get("clean_from", "train") != pool for r in recs):
        raise SystemExit(f"{folder}: expected a clean pool from {pool} images")
    return {_key(r): r for r in recs}


def held_out(records: dict, r: dict) -> float | None:
    """--layer auto's held-out clean change for the single layer of record ``r`` (from the auto record)."""
    auto = records.get((r["dataset"], r.get("epochs"), r["attack"], "auto", ()))
    if not auto or r["mode"] not in ("layer", "auto"):
        return None
    layer = r["layers"][0]
    return next((c.get("clean_change") for c in auto.get("ranking", []) if c.get("layer") == layer), None)


def compare(train: dict, new: dict) -> list[dict]:
    rows = []
    for k in train:
        if k not in new or k[3] == "original":
            continue
        a, b = train[k], new[k]
        rows.append({"dataset": k[0], "epochs": k[1], "attack": k[2], "mode": k[3],
                     "layer_train": a["layers"], "layer_new": b["layers"],
                     "asr_train": a["asr"], "asr_new": b["asr"], "ca_train": a["ca"], "ca_new": b["ca"],
                     "change_train": a["clean_change"], "change_new": b["clean_change"],
                     "held_change_train": held_out(train, a), "held_change_new": held_out(new, b)})
    return rows


def markdown(rows: list[dict], originals: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    pct2 = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = ["Same backdoored SmallCNNs, same 20 stamped images' trigger, 500 clean images to fit, gate auto; "
             "the clean pool is either training images or the first 60 % of the test split (images the model was "
             "not trained on); every number is measured on the remaining 40 % of the test split. ASR and clean "
             "change (test images whose class the repair changes) in %; held-out: what `--layer auto` measured on "
             "its own held-out clean images from the pool.", "",
             "| dataset | epochs | attack | original CA / ASR | repair | layer (training / new) | ASR training → new | "
             "CA training / new | clean change training → new | held-out change training / new |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = originals.get((r["dataset"], r["epochs"], r["attack"]))
        orig = f"{pct(o['ca'])} / {pct(o['asr'])}" if o else "-"
        lt, ln = ",".join(r["layer_train"]), ",".join(r["layer_new"])
        layer = lt if lt == ln else f"{lt} / {ln}"
        lines.append(f"| {r['dataset']} | {r['epochs']} | {r['attack']} | {orig} | {r['mode']} | {layer} | "
                     f"{pct(r['asr_train'])} → {pct(r['asr_new'])} | {pct(r['ca_train'])} / {pct(r['ca_new'])} | "
                     f"{pct2(r['change_train'])} → {pct2(r['change_new'])} | "
                     f"{pct2(r['held_change_train'])} / {pct2(r['held_change_new'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train_runs", help="bench_auto.py --eval-tail results folder(s), comma-separated")
    ap.add_argument("new_runs", help="bench_auto.py --clean-from test results folder(s), comma-separated")
    ap.add_argument("--out", default="benchmarks/clean_pool")
    args = ap.parse_args(argv)
    from fire_onnx.fileio import write_text_atomic

    train, new = {}, {}
    for f in args.train_runs.split(","):
        train.update(_load(Path(f), "train"))
    for f in args.new_runs.split(","):
        new.update(_load(Path(f), "test"))
    rows = compare(train, new)
    originals = {(k[0], k[1], k[2]): r for k, r in train.items() if k[3] == "original"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(rows, indent=1) + "\n")
    md = markdown(rows, originals)
    write_text_atomic(out / "results.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
