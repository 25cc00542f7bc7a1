"""Latency of an original vs a patched ONNX model, measured side by side in one process.

Both sessions get identical options; their runs are interleaved (A, B, A, B, ...) on the same input so
that machine noise hits both alike. The overhead reported is the ratio of median latencies.
"""

from __future__ import annotations

import time

import numpy as np

from fire_onnx.errors import FireError, first_line


def _input_for(sess, batch: int, seed: int = 0) -> dict:
    inp = sess.get_inputs()
    if len(inp) != 1:
        raise FireError("bench supports single-input models")
    fixed = fixed_batch(sess)
    if fixed and fixed != batch:
        raise FireError(f"input {inp[0].name!r} has a fixed batch of {fixed}; bench it with --batch {fixed}")
    shape = [batch] + [d if isinstance(d, int) and d > 0 else None for d in inp[0].shape[1:]]
    if any(d is None for d in shape):
        raise FireError(f"input {inp[0].name!r} has dynamic non-batch dimensions {inp[0].shape}; bench needs them static")
    from fire_onnx.evaluate import INPUT_DTYPES

    dtype = INPUT_DTYPES.get(inp[0].type)
    if dtype is None:
        raise FireError(f"bench feeds float or integer inputs; input {inp[0].name!r} is {inp[0].type}")
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):  # raw pixels
        x = rng.integers(0, min(256, np.iinfo(dtype).max + 1), size=shape).astype(dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    return {inp[0].name: x}


DEFAULT_BATCHES = (1, 64)


def fixed_batch(sess) -> int | None:
    """The batch size the model's single input is fixed to, or None where it is dynamic."""
    inp = sess.get_inputs()
    b = inp[0].shape[0] if len(inp) == 1 and inp[0].shape else None
    return b if isinstance(b, int) and b > 0 else None


def compare(original, patched, *, batches=None, iters: int = 200, warmup: int = 20,
            provider: str = "cpu", threads: int = 1) -> dict:
    """Median/p90 latency (ms) of both models per batch size and the patched/original ratio. ``batches``
    None: DEFAULT_BATCHES, or the one batch size a fixed-batch model takes (said in ``notes``)."""
    from fire_onnx.evaluate import session

    if iters < 5 or warmup < 0:
        raise FireError("bench needs --iters >= 5 and --warmup >= 0")
    sa = session(original, provider, threads=threads)
    sb = session(patched, provider, threads=threads)
    notes = []
    if not batches:
        fixed = fixed_batch(sa)
        batches = (fixed,) if fixed else DEFAULT_BATCHES
        if fixed:
            notes.append(f"the model's input has a fixed batch of {fixed}: timed at that batch only")
    rows = []
    for batch in batches:
        if batch < 1:
            raise FireError("batch sizes must be >= 1")
        feed = _input_for(sa, batch)
        if [i.name for i in sb.get_inputs()] != list(feed):
            raise FireError("the two models have different inputs; bench compares a model with its patched copy")
        for which, s in (("first", sa), ("second", sb)):
            try:  # one run each before timing: a model that rejects the input is a user error, not a traceback
                s.run(None, feed)
            except Exception as e:  # noqa: BLE001 - onnxruntime's InvalidArgument / Fail
                raise FireError(f"the {which} model rejects a batch of {batch} inputs shaped for the first "
                                f"({first_line(e)}); bench compares a model with its patched copy") from None
        for _ in range(warmup):
            sa.run(None, feed)
            sb.run(None, feed)
        ta, tb = [], []
        for i in range(iters):
            order = ((sa, ta), (sb, tb)) if i % 2 == 0 else ((sb, tb), (sa, ta))
            for s, acc in order:
                t0 = time.perf_counter()
                s.run(None, feed)
                acc.append(time.perf_counter() - t0)
        a, b = np.array(ta) * 1e3, np.array(tb) * 1e3
        rows.append({
            "batch": batch,
            "original_ms_p50": float(np.median(a)), "original_ms_p90": float(np.quantile(a, 0.9)),
            "patched_ms_p50": float(np.median(b)), "patched_ms_p90": float(np.quantile(b, 0.9)),
            "ratio_p50": float(np.median(b) / np.median(a)),
            "overhead_us_per_sample": float((np.median(b) - np.median(a)) * 1e3 / batch),
        })
    import onnxruntime as ort

    return {"provider": provider, "threads": threads, "iters": iters, "warmup": warmup,
            "onnxruntime": ort.__version__, "rows": rows, "notes": notes}


def markdown(result: dict) -> str:
    lines = [
        f"onnxruntime {result['onnxruntime']}, provider {result['provider']}, {result['threads']} thread(s), "
        f"{result['iters']} interleaved runs each after {result['warmup']} warm-up runs",
        "",
        "| batch | original p50 (ms) | patched p50 (ms) | original p90 | patched p90 | patched/original (p50) | overhead per sample (µs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {r['original_ms_p50']:.3f} | {r['patched_ms_p50']:.3f} | {r['original_ms_p90']:.3f} | "
            f"{r['patched_ms_p90']:.3f} | {r['ratio_p50']:.3f}× | {r['overhead_us_per_sample']:.2f} |"
        )
    return "\n".join(lines)
