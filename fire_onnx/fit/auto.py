"""``fit --layer auto``: choose the tensor to repair by what each candidate repair does on held-out samples.

Candidates are the tensors ``fire-onnx inspect`` lists as likely targets (module outputs and
post-activation / pooling / normalisation tensors), without the output head (the graph outputs, the
logits, and everything between the last Conv/Gemm/MatMul and the first output), tensors that
sit between a Conv/Gemm/MatMul and the activation a runtime fuses into it (a repair there breaks the
fusion; the tensor after the activation holds the same information), and tensors whose shape is not
known well enough to patch. With a PyTorch ``--model``, only candidates that are a module's output can be
read through forward hooks; the others are skipped.

The samples are split so that no candidate is judged on the samples it was fitted on:

- *clean*: the candidates are fitted on the same ``--n-clean`` images a plain ``fit`` uses; the
  held-out clean images (``--holdout``, default 1000) are other images of the ``--clean`` pool, never
  used by any fit (nor by the trigger reconstruction);
- *triggered*, ``--trigger``: the candidates are fitted on the same ``--n-triggered`` stamped images a
  plain ``fit`` uses; the held-out triggered images are the held-out clean images outside the target
  class (labels, else the original model's prediction) with the trigger stamped on: many more than the
  fit needs, and paired with the clean ones;
- *triggered*, ``--triggered FILE``: the images the fit would use are split in two (seeded): the
  candidates are fitted on one half (``n - n // 2``) and judged on the other.

Each candidate is fitted with the user's options (method, k, gate, repair, ...), patched into the ONNX
model in memory and run in onnxruntime on the held-out images (on a large model, only the images its gate
fires on, through the graph after its tensor: :meth:`HeldOut.score_many`, the same numbers). ``--repair auto`` makes every site two
candidates, one per operator (``project`` and ``translate``), ranked together; the default stays the
user's ``--repair`` (``project``): ``--repair auto`` doubles the fits, and the gated translation gained at most
0.6 pt ASR over the projection at the same layer on the benchmark cells (benchmarks/auto). Two numbers, no
labels needed:

- *held-out target rate* (the ASR proxy): the share of held-out triggered images the patched model
  classifies as the attack's target (``--target``; without it, the class the original model gives most
  of the triggered samples);
- *clean change rate*: the share of held-out clean images whose predicted class the repair changes
  (patched vs original model).

Objective: the lowest held-out target rate among the candidates whose clean change rate is at most
``--clean-budget`` (default 0.5 %); ties go to the lower clean change rate, then to the smaller *clean
shift* (the mean total-variation distance between the original and the patched softmax outputs on the
held-out clean images: how much the repair disturbs clean inputs even where their class stays), then to
the earlier tensor in the graph. When no candidate is within the budget, the one with the lowest clean
change rate is chosen (ties: lower target rate) and a warning says so. The chosen layer is then fitted again exactly as
``fit --layer <chosen>`` would (all the triggered samples; with ``--trigger`` that is the fit already
judged), and the ranking is recorded in the directions file (``meta["auto"]``).

``--max-layers N`` (:func:`grow_chain`): after the first layer, each step fits every remaining candidate
on activations of the model with the repairs chosen so far patched in (read in onnxruntime, whatever
the first step's source), scores the whole chain plus that candidate on the held-out samples, and keeps
the best by the same objective while it is within the clean budget and lowers the chain's held-out
target rate; a candidate may sit before or after the earlier ones (an earlier repair downstream does
not change its activations). Later steps fit flagged images without twins unpaired (the trigger
reconstruction would be confirmed against a model the earlier repairs changed). The chain is then
refitted on all the samples in the same order (:func:`refit_chain`) into one directions file; the
fingerprints of its later targets are taken on the unpatched model, which is what ``patch`` checks.

The candidate list is a list of :class:`Site` (a tensor and how to name it to the activation source)
and every result a :class:`Score`; a search over gate/method settings can reuse the split, the
evaluator (:class:`HeldOut`, which patches any number of targets) and the objective (:func:`rank`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from fire_onnx import directions as dirs
from fire_onnx.data import Images, triggered_order
from fire_onnx.errors import FireError, first_line

Log = Callable[[str], None]

AUTO_REPAIR = "auto"  # --repair auto (with --layer auto): try both operators at every candidate
REPAIRS = ("project", "translate")

RECONSTRUCT_POOL = 300  # pool images kept away from the held-out set for the trigger reconstruction
FEW_HELD_CLEAN = 200  # warn below this many held-out clean images
FEW_HELD_TRIGGERED = 50  # ... and say when candidates this few held-out triggered images rank differ by little
NOISE_IMAGES = 1  # held-out triggered images between two candidates' target rates that count as no difference
REFIT_SLACK = 0.005  # warn when the refitted single-layer repair exceeds the clean budget by more than this
SHIFT_TIE = 1e-6  # clean shifts closer than this count as equal (then the earlier tensor wins)
WEAK_REPAIR = 0.5  # warn when the chosen repair leaves this held-out target rate (and more than half the original)
GATE_MARGIN = 1e-4  # held-out scoring: a gate score this close to tau (relative to the norms) counts as firing
VALIDATE_ROWS = 4  # held-out scoring: images where the gate does not fire that check a cut-out graph part
VALIDATE_TOL = 1e-4  # ... whose softmax outputs must equal the unrepaired model's to this
FAST_AFTER_SECONDS = 2.0  # held-out scoring cuts the graph when one pass of the model over them takes this long
SUFFIX_BUDGET = 768 * 2**20  # held-out scoring: bytes of cut-out graph parts (weights) run in one pass
HELD_BATCH_BYTES = 256 * 2**20  # held-out scoring: bytes of tensors read per batch of the pass
ACTIVATION_BUDGET = 512 * 2**20  # bytes of activations read per fit call (candidates are grouped under it)
OBJECTIVE = ("lowest held-out target rate among candidates whose held-out clean change rate is within the clean "
             "budget; with a known trigger, among those within RESTORE_WINDOW of that rate (or of the model's own "
             "rate of clean twins at the target, when higher), the one that gives most held-out triggered images "
             "their clean twin's class, if RESTORE_MARGIN more than the lowest-rate candidate does; ties: lower "
             "clean change, then lower clean shift (mean softmax total-variation change), then earlier in the graph; "
             "none within the budget: lowest clean change")
# A repair can push triggered images out of the target class without giving them back their own class: on the
# PreAct-ResNet18 (CIFAR-10, width 16) the lowest held-out target rate was a late tensor, test ASR 0.1 % (Blended,
# layer4.0) and 0.0 % (SIG, avgpool) but RA 34 % and 26 %, where layer2 / layer1.0 left 1.1 % / 2.6 % at RA 63 % /
# 76 % (the model's own floor: 2.4-3.1 % of clean non-target images at the target). With twins (--trigger), the
# candidates within this of the lowest target rate are ranked by the share of triggered images restored ...
RESTORE_WINDOW = 0.01
# ... when one restores this much more than the candidate with the lowest target rate (a margin above the held-out
# noise: SmallCNN CIFAR-10 Blended had block1.1 at 85.9 % restored against block1's 85.1 %, 2.9 vs 2.3 % held out,
# and 4.9 vs 3.6 % test ASR; the PreAct cells differ by 55-66 points)
RESTORE_MARGIN = 0.05


@dataclass
class Site:
    """A candidate repair site: an ONNX tensor, and the name the activation source reads it by."""

    tensor: str
    module: str  # a PyTorch module path whose output the tensor is ("" if none)
    shape: list  # per-sample shape (batch dimension dropped)

    @property
    def layer(self) -> str:
        """What ``fit_directions`` gets in ``layers``: the module path where there is one, else the tensor."""
        return self.module or self.tensor

    @property
    def label(self) -> str:
        return self.module or self.tensor

    def tensors(self) -> dict[str, str] | None:
        return {self.module: self.tensor} if self.module else None


@dataclass
class Score:
    """What one candidate repair did on the held-out samples."""

    site: Site
    repair: str = "project"
    gate: str = ""
    k: int = 0
    target_rate: float | None = None  # held-out triggered images classified as the target
    clean_change: float | None = None  # held-out clean images whose prediction the repair changed
    clean_shift: float | None = None  # mean total-variation distance of the held-out clean softmax outputs
    restored: float | None = None  # held-out triggered images given their clean twin's class (None: no twins)
    gate_fires_clean: float | None = None  # on the fitting clean images (from the fit record)
    error: str = ""
    seconds: float = 0.0
    target: dirs.Target | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.error and self.target_rate is not None

    def record(self, budget: float) -> dict:
        """The row of the ranking table recorded in the directions file (flat JSON)."""
        row = {"layer": self.site.label, "tensor": self.site.tensor, "module": self.site.module,
               "repair": self.repair, "gate": self.gate, "k": self.k, "target_rate": self.target_rate,
               "clean_change": self.clean_change, "clean_shift": self.clean_shift, "restored": self.restored,
               "gate_fires_clean": self.gate_fires_clean,
               "within_budget": self.ok and self.clean_change <= budget + 1e-12, "seconds": round(self.seconds, 2)}
        if self.error:
            row["error"] = self.error
        return row


def candidate_sites(onnx_model, *, torch_model=None) -> tuple[list[Site], list[tuple[str, str]]]:
    """(candidate sites in graph order, [(tensor, why skipped)]) from ``inspect``'s likely targets."""
    from fire_onnx.inspect import BATCH_LATER_NOTE, candidates

    head = head_tensors(onnx_model.graph)
    sites, skipped = [], []
    for c in candidates(onnx_model):
        if c.note.startswith("graph output") or c.tensor in head:
            skipped.append((c.tensor, "the model's output head (the last weighted op and what follows it)"))
            continue
        if c.breaks_fusion:
            skipped.append((c.tensor, "between an op and the activation fused into it"))
            continue
        if c.note.startswith(BATCH_LATER_NOTE):  # [T, B, D]: fit would refuse it (new-user run 18: auto crashed)
            skipped.append((c.tensor, c.note.split(":")[0]))
            continue
        if not c.note.startswith("candidate"):
            continue
        if c.shape is None or c.dtype == "?":
            skipped.append((c.tensor, "shape not known"))
            continue
        module = c.layers[0] if c.layers else ""
        if torch_model is not None and not module:
            skipped.append((c.tensor, "not the output of a PyTorch module (fit from --onnx alone to try it)"))
            continue
        # dynamic per-sample dimensions (an export with dynamic H/W): None until measured (concrete_shapes)
        sites.append(Site(tensor=c.tensor, module=module,
                          shape=[d if isinstance(d, int) else None for d in c.shape[1:]]))
    return sites, skipped


def concrete_shapes(sites: list[Site], inputs, images) -> list[Site]:
    """Sites whose per-sample shape has dynamic dimensions get the shape one of ``images`` gives them
    (the size every fitted image has: fit reads them all at once)."""
    dynamic = [s for s in sites if any(d is None for d in s.shape)]
    if not dynamic:
        return sites
    from fire_onnx.probe import TensorReader

    x = inputs.preprocess(images.x[:1])
    acts, _ = TensorReader(inputs.onnx_model, [s.tensor for s in dynamic], batch_size=1)(x)
    return [replace(s, shape=list(acts[s.tensor].shape[1:])) if s in dynamic else s for s in sites]


HEAD_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def head_tensors(graph) -> set[str]:
    """The tensors from the last weighted op (Conv/Gemm/MatMul) before the first graph output up to that
    output: the logits and what only rescales them (Softmax, a bias Add, a Reshape). A repair there would
    act on the model's answer itself, not on a feature."""
    producer = {o: n for n in graph.node for o in n.output}
    weights = {t.name for t in graph.initializer}
    if not graph.output:
        return set()
    out, stack = set(), [graph.output[0].name]
    while stack:
        name = stack.pop()
        if name in out or name not in producer:
            continue
        out.add(name)
        node = producer[name]
        if node.op_type in HEAD_OPS:
            continue
        stack.extend(i for i in node.input if i and i not in weights)
    return out


@dataclass
class Split:
    """The fit part and the held-out part of the samples (see the module docstring)."""

    clean: Images  # fit part: the clean samples
    triggered: Images  # fit part: triggered samples
    source: Images | None  # their clean twins (paired fit), or None
    held_clean: Images  # held out: clean images
    held_triggered: Images  # held out: triggered images
    reconstruct_pool: Images | None  # pool images the trigger reconstruction may stamp (never held out)
    how: str  # one line on how the triggered samples were split
    refit_sees_held: bool = False  # the final refit (on all triggered samples) includes the held-out triggered ones
    twins: Images | None = None  # the held-out triggered images' clean originals (--trigger), in the same order


def _bytes(model) -> bytes:
    try:
        return model.SerializeToString()
    except ValueError as e:  # protobuf's 2 GB limit
        raise FireError(f"--layer auto patches the model in memory and this one is too large for that "
                        f"({first_line(e)}); choose the layer by hand (fire-onnx inspect, --layer)") from None


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class HeldOut:
    """Runs the original and candidate-patched ONNX models on the held-out samples in onnxruntime."""

    # score_many cuts the graph only where one pass over the held-out images takes this long: on small
    # models, building the cut-out parts costs more than it saves
    fast_after = FAST_AFTER_SECONDS
    # with twins (see __init__): the original model's class for each held-out triggered image's clean twin, and the
    # share of them it puts at the target
    base_twin: np.ndarray | None = None
    floor: float | None = None

    def __init__(self, onnx_model, preprocess, held_clean: Images, held_triggered: Images, batch_size: int = 256,
                 base_session=None, twins: Images | None = None, target: int | None = None):
        from fire_onnx.evaluate import session

        self.model, self.pre, self.batch_size = onnx_model, preprocess, batch_size
        self.base = base_session or session(_bytes(onnx_model))
        self._held(held_clean, held_triggered)
        # a repair that restores a triggered image gives it back its twin's class
        if twins is not None and len(twins) == len(self.x_trig) and len(twins):
            self.base_twin = self.runner(None)(self.pre(twins.x)).argmax(axis=1)
            if target is not None:  # twins the model itself puts at the target: no repair takes those away
                self.floor = float((self.base_twin == target).mean())

    def _held(self, held_clean: Images, held_triggered: Images) -> None:
        """The preprocessed held-out images and the original model's outputs on them."""
        self.x_clean = self.pre(held_clean.x)
        self.x_trig = self.pre(held_triggered.x)
        run = self.runner(None)
        t0 = time.perf_counter()
        self.base_clean = run(self.x_clean)
        self._base_trig_p = run(self.x_trig) if len(self.x_trig) else None
        self.base_trig = self._base_trig_p.argmax(axis=1) if len(self.x_trig) else None
        self.pass_seconds = time.perf_counter() - t0  # one pass of the model over the held-out images
        self._refs: dict = {}
        self.suffix_stats = {"suffix": 0, "full": 0, "rows_run": 0, "rows": 0}

    def runner(self, d: dirs.Directions | None):
        """A function from preprocessed images to the softmax of the first output (float64) of the model
        patched with ``d`` (None: the original)."""
        from fire_onnx.evaluate import predict_logits, session
        from fire_onnx.patch import patch_model

        sess = self.base if d is None else session(_bytes(patch_model(self.model, d).model))
        return lambda x: _softmax(predict_logits(sess, x, self.batch_size).astype(np.float64))

    def triggered_at(self, d: dirs.Directions, target: int, idx: np.ndarray) -> np.ndarray:
        """Whether each held-out triggered image ``idx`` goes to ``target`` in the model patched with ``d``."""
        return self.runner(d)(self.x_trig[idx]).argmax(axis=1) == target

    def score(self, d: dirs.Directions, target: int) -> tuple[float, float, float, float | None]:
        """(held-out target rate, clean change rate, clean shift, restored) of the model patched with ``d``: the
        share of held-out triggered images it classifies as ``target``, the share of held-out clean images whose
        class it changes, the mean total-variation distance of their softmax outputs (the tie-breaker), and the
        share of held-out triggered images given their clean twin's class (None without twins)."""
        return self.rates(*self.outputs(d), target)

    def outputs(self, d: dirs.Directions) -> tuple[np.ndarray, np.ndarray | None]:
        """The softmax outputs of the model patched with ``d`` on the held-out clean and triggered images."""
        run = self.runner(d)
        return run(self.x_clean), (run(self.x_trig) if len(self.x_trig) else None)

    def rates(self, pc: np.ndarray, pt: np.ndarray | None, target: int) -> tuple[float, float, float, float | None]:
        """:meth:`score` of the outputs ``pc`` (clean) and ``pt`` (triggered) of a patched model."""
        has_trig = pt is not None and len(pt)
        rate = float((pt.argmax(axis=1) == target).mean()) if has_trig else 0.0
        change = float((pc.argmax(axis=1) != self.base_clean.argmax(axis=1)).mean())
        shift = float(0.5 * np.abs(pc - self.base_clean).sum(axis=1).mean())
        restored = (float((pt.argmax(axis=1) == self.base_twin).mean()) if has_trig and self.base_twin is not None
                    else None)
        return rate, change, shift, restored

    def _reference(self, model, prefix: list[dirs.Target]) -> tuple[np.ndarray, np.ndarray | None]:
        """Softmax outputs of ``model`` (the original with ``prefix`` patched in) on the held-out clean and
        triggered images: what a candidate leaves unchanged wherever its gate does not fire."""
        if not prefix:
            return self.base_clean, self._base_trig_p
        key = tuple((t.tensor, id(t)) for t in prefix)
        if key not in self._refs:
            from fire_onnx.evaluate import predict_logits, session

            sess = session(_bytes(model))
            run = lambda x: _softmax(predict_logits(sess, x, self.batch_size).astype(np.float64))  # noqa: E731
            self._refs = {key: (run(self.x_clean), run(self.x_trig) if len(self.x_trig) else None)}
        return self._refs[key]

    def score_many(self, model, prefix: list[dirs.Target], candidates: list[dirs.Target], target: int,
                   progress=None) -> list[tuple[float, float, float] | FireError]:
        """:meth:`score` of ``[*prefix, c]`` for each candidate ``c``: the same numbers at a fraction of the cost.

        ``model`` is the original with ``prefix`` patched in (or the original). A gated candidate changes
        only the images whose score passes its gate; on every other image the patched model's output is
        ``model``'s. So one pass of ``model`` over the held-out images reads every candidate's tensor (and
        whatever else the graph after it reads: a residual branch, the input); each gate is evaluated in
        numpy with a margin for float32 rounding (images that near the threshold count as firing), and only
        the images that fire run, through the part of the patched graph after the tensor
        (:func:`fire_onnx.onnxutil.downstream_model`). Each cut-out part is checked on images where its gate
        does not fire (it must reproduce ``model``'s output there). A candidate whose part cannot be cut out
        or fails that check, or whose gate is "none", is scored by :meth:`score`; so is every candidate when
        there are fewer than two or one pass over the held-out images takes less than ``fast_after`` seconds
        (a small model). Candidates share a pass while their parts stay within SUFFIX_BUDGET bytes of weights.
        Returns per candidate (target rate, clean change, clean shift), or the FireError its patch raised."""
        results: list = [None] * len(candidates)
        if len(candidates) >= 2 and self.pass_seconds >= self.fast_after:
            self._score_cut(model, prefix, candidates, target, results, progress)
        pre = dict(self.pre.as_dict())
        for i, t in enumerate(candidates):
            if results[i] is None:  # the whole patched model on every held-out image
                try:
                    results[i] = self.score(dirs.Directions(targets=[*prefix, t], preprocess=pre), target)
                    self.suffix_stats["full"] += 1
                except FireError as e:
                    results[i] = e
        return results

    def _score_cut(self, model, prefix: list[dirs.Target], candidates: list[dirs.Target], target: int,
                   results: list, progress=None) -> None:
        """Fill ``results`` for the candidates whose graph part can be cut out and checked (the others stay
        None), one pass of ``model`` per chunk of parts within SUFFIX_BUDGET (see :meth:`score_many`)."""
        from fire_onnx.onnxutil import batch_aligned, infer_shapes

        ref_c, ref_t = self._reference(model, prefix)
        ref_all = np.concatenate([ref_c, ref_t]) if ref_t is not None else ref_c
        shapes, aligned = infer_shapes(model), batch_aligned(model)
        chunk: dict[int, dict] = {}

        def flush() -> None:
            self._pass(model, chunk, candidates, ref_all, progress)
            for j, f in chunk.items():
                results[j] = self._finish(f, ref_t is not None, target)
            chunk.clear()

        for i, t in enumerate(candidates):
            part = self._cut(shapes, aligned, prefix, t, ref_all) if t.gate == "hard" else None
            if isinstance(part, FireError):
                results[i] = part
            elif part is not None:
                if chunk and sum(f["bytes"] for f in chunk.values()) + part["bytes"] > SUFFIX_BUDGET:
                    flush()
                chunk[i] = part
        if chunk:
            flush()

    def _cut(self, shapes, aligned: set[str], prefix: list[dirs.Target], t: dirs.Target, ref_all: np.ndarray):
        """The part of the model patched with ``[*prefix, t]`` after ``t``'s tensor, ready to run (a dict);
        None where it cannot be cut out; the FireError the patch raised."""
        from fire_onnx.evaluate import session
        from fire_onnx.onnxutil import downstream_model
        from fire_onnx.patch import patch_model

        d = dirs.Directions(targets=[*prefix, t], preprocess=dict(self.pre.as_dict()))
        try:
            patched = patch_model(self.model, d).model
        except FireError as e:
            return e
        try:
            part, frontier = downstream_model(patched, t.tensor, value_infos=shapes, aligned=aligned)
            data = part.SerializeToString()
            return {"sess": session(data), "bytes": len(data), "frontier": frontier, "ok": False, "failed": False,
                    "out": ref_all.copy(), "rows": 0}
        except (ValueError, FireError):
            return None

    def _pass(self, model, chunk: dict[int, dict], candidates: list[dirs.Target], ref_all: np.ndarray,
              progress=None) -> None:
        """One pass of ``model`` over the held-out images for the candidates of ``chunk`` (see :meth:`score_many`)."""
        from fire_onnx.evaluate import as_input
        from fire_onnx.probe import session_reading

        x_all = np.concatenate([self.x_clean, self.x_trig]) if len(self.x_trig) else self.x_clean
        graph_inputs = {i.name for i in model.graph.input}
        read = list(dict.fromkeys(n for f in chunk.values() for n in f["frontier"] if n not in graph_inputs))
        try:
            reader = session_reading(model, read)
        except FireError:
            for f in chunk.values():
                f["failed"] = True
            return
        inp = reader.get_inputs()[0]
        per_image = 8 * sum(int(np.prod([d for d in o.shape[1:] if isinstance(d, int)] or [1]))
                            for o in reader.get_outputs())
        batch = max(1, min(self.batch_size, HELD_BATCH_BYTES // max(per_image, 1)))
        for lo in range(0, len(x_all), batch):
            xb = as_input(inp, x_all[lo:lo + batch])
            vals = dict(zip(read, reader.run(read, {inp.name: xb})))
            vals[inp.name] = xb
            for i, f in chunk.items():
                if f["failed"]:
                    continue
                t = candidates[i]
                fires = _gate_fires(vals[t.tensor], t)
                rows = np.flatnonzero(fires)
                check = np.flatnonzero(~fires)[:0 if f["ok"] else VALIDATE_ROWS]
                run_rows = np.concatenate([rows, check])
                if not len(run_rows):
                    continue
                try:
                    z = f["sess"].run(None, {n: vals[n][run_rows] for n in f["frontier"]})[0]
                except Exception:  # noqa: BLE001 - scored on the whole patched model instead
                    f["failed"] = True
                    continue
                p = _softmax(np.asarray(z, dtype=np.float64))
                if p.shape[1:] != ref_all.shape[1:]:
                    f["failed"] = True
                    continue
                if len(check):
                    if not np.allclose(p[len(rows):], ref_all[lo + check], rtol=0, atol=VALIDATE_TOL):
                        f["failed"] = True
                        continue
                    f["ok"] = True
                f["out"][lo + rows] = p[:len(rows)]
                f["rows"] += len(rows)
            if progress:
                progress(min(lo + batch, len(x_all)), len(x_all))

    def _finish(self, f: dict, has_trig: bool, target: int):
        """The scores of a candidate from its pass; None (scored by :meth:`score`) when the pass failed or
        never checked its cut-out part."""
        f.pop("sess", None)
        if f["failed"] or not f["ok"]:
            return None
        n_c = len(self.x_clean)
        self.suffix_stats["suffix"] += 1
        self.suffix_stats["rows_run"] += f["rows"]
        self.suffix_stats["rows"] += len(f["out"])
        return self.rates(f["out"][:n_c], f["out"][n_c:] if has_trig else None, target)


def _gate_fires(h: np.ndarray, t: dirs.Target) -> np.ndarray:
    """Per image, whether the hard gate of ``t`` may fire on activations ``h`` (a batch in the target's layout):
    the score of :func:`fire_onnx.directions.reference_repair` is above tau minus a margin for the float32
    rounding of onnxruntime's score (1e-4 of the norms of the activation and of mu: images that close to the
    threshold count as firing and are run through the patched graph, which decides)."""
    n = len(h)
    x = np.asarray(h, dtype=np.float32)  # float32 BLAS: its rounding is far inside the margin
    x = x.reshape(n, -1) if t.layout == "flat" else x
    U = t.U.astype(np.float32)
    mu = t.mu.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = (x @ U.T).astype(np.float64) - mu @ t.U.astype(np.float64).T
        norm = np.linalg.norm(x, axis=-1, keepdims=True).astype(np.float64)
    margin = GATE_MARGIN * (norm + float(np.linalg.norm(mu)))
    # a non-finite score leaves the activation as it is (reference_repair): never a change
    fires = np.isfinite(s) & np.isfinite(margin) & (s > t.tau.astype(np.float64) - margin)
    return fires.reshape(n, -1).any(axis=1)


class TorchHeldOut(HeldOut):
    """:class:`HeldOut` for a fit with a PyTorch model and no ONNX model: the repair runs as forward hooks
    (``fire_onnx.fit.torch_model.apply_in_torch``, the computation the ONNX patch is tested equal to)."""

    def __init__(self, model, preprocess, held_clean: Images, held_triggered: Images, batch_size: int = 256):
        self.model, self.pre, self.batch_size = model, preprocess, batch_size
        self._held(held_clean, held_triggered)

    def runner(self, d: dirs.Directions | None):
        import torch

        from fire_onnx.fit.torch_model import apply_in_torch

        def run(x: np.ndarray) -> np.ndarray:
            handles = apply_in_torch(self.model, d) if d is not None else []
            out = []
            try:
                with torch.no_grad():
                    for i in range(0, len(x), self.batch_size):
                        z = self.model(torch.from_numpy(np.ascontiguousarray(x[i:i + self.batch_size])))
                        z = z[0] if isinstance(z, (tuple, list)) else z
                        if z.ndim != 2:
                            raise FireError(f"the model's first output has shape {tuple(z.shape)}, not (N, classes)")
                        out.append(z.double().numpy())
            finally:
                for h in handles:
                    h.remove()
            return _softmax(np.concatenate(out)) if out else np.zeros((0, 0))

        return run


def _shift_key(s: Score) -> int:
    """The clean output shift as :func:`rank` compares it: differences below SHIFT_TIE are float noise."""
    return round((s.clean_shift or 0.0) / SHIFT_TIE)


def rank(scores: list[Score], budget: float, floor: float | None = None,
         restore: bool = False) -> tuple[list[Score], bool]:
    """(the scores best first, whether the best is within the budget); failed candidates come last. ``restore``:
    where every candidate within the budget has a restored share (twins known), those whose target rate is within
    RESTORE_WINDOW of the lowest (or of ``floor``, the original model's rate of twins at the target, when higher)
    come first, most restored first (see RESTORE_WINDOW)."""
    ok = [s for s in scores if s.ok]
    order = {id(s): i for i, s in enumerate(scores)}
    within = sorted((s for s in ok if s.clean_change <= budget + 1e-12),
                    key=lambda s: (s.target_rate, s.clean_change, _shift_key(s), order[id(s)]))
    if restore and within and all(s.restored is not None for s in within):
        bar = max(within[0].target_rate, floor or 0.0) + RESTORE_WINDOW + 1e-12
        better = within[0].restored + RESTORE_MARGIN - 1e-12
        near = sorted((s for s in within if s.target_rate <= bar and s.restored >= better),
                      key=lambda s: (-s.restored, s.target_rate, s.clean_change, _shift_key(s), order[id(s)]))
        within = near + [s for s in within if s not in near]
    over = sorted((s for s in ok if s.clean_change > budget + 1e-12),
                  key=lambda s: (s.clean_change, s.target_rate, _shift_key(s), order[id(s)]))
    failed = [s for s in scores if not s.ok]
    if within:
        return within + over + failed, True
    return over + failed, False


def too_close(ranked: list[Score], within: bool, budget: float, n_triggered: int) -> list[Score]:
    """The candidates after the winner of ``ranked`` (within the budget when the winner is) whose held-out target
    rate is at most NOISE_IMAGES of ``n_triggered`` held-out images above the winner's, when those are fewer than
    FEW_HELD_TRIGGERED: the ranking cannot tell them apart."""
    best = ranked[0] if ranked else None
    if best is None or not best.ok or best.target_rate is None or not 0 < n_triggered < FEW_HELD_TRIGGERED:
        return []
    return [s for s in ranked[1:] if s.ok and s.target_rate is not None
            and (not within or s.clean_change <= budget)
            and round((s.target_rate - best.target_rate) * n_triggered) <= NOISE_IMAGES]


def _name(s: Score) -> str:
    return s.site.label + ("" if s.repair == "project" else f" ({s.repair})")


def why(ranked: list[Score], within: bool, budget: float, n_held_clean: int, original_rate: float | None) -> str:
    """One line on why the winner won."""
    best = ranked[0]
    base = "" if original_rate is None else f", original model {original_rate:.1%}"
    if not within:
        return (f"{_name(best)}: no candidate keeps the clean change within the budget {budget:.1%}; this one "
                f"changes the fewest held-out clean predictions ({best.clean_change:.1%} of {n_held_clean}; "
                f"held-out target rate {best.target_rate:.1%}{base})")
    n_within = sum(1 for s in ranked if s.ok and s.clean_change <= budget + 1e-12)
    inside = [s for s in ranked[:n_within] if s.ok]
    lowest = min(inside, key=lambda s: s.target_rate) if inside else best
    if best.restored is not None and lowest.target_rate < best.target_rate:  # chosen by the restored share
        return (f"{_name(best)}: held-out target rate {best.target_rate:.1%}{base}, within {RESTORE_WINDOW:.0%} of the "
                f"lowest ({_name(lowest)}, {lowest.target_rate:.1%}) or of the model's own rate of clean twins at the "
                f"target, and it gives {best.restored:.1%} of the held-out triggered images their clean twin's class "
                f"({_name(lowest)}: {lowest.restored:.1%}), the most of those; it changes {best.clean_change:.1%} of "
                f"{n_held_clean} held-out clean predictions")
    line = (f"{_name(best)}: lowest held-out target rate ({best.target_rate:.1%}{base}) among the {n_within} "
            f"candidate(s) within the clean budget {budget:.1%} (it changes {best.clean_change:.1%} of "
            f"{n_held_clean} held-out clean predictions)")
    tied = [s for s in ranked[1:n_within] if s.target_rate == best.target_rate]
    if tied:
        same = [s for s in tied if s.clean_change == best.clean_change]
        line += f"; tied on target rate with {_names(tied)}"
        if not same:
            return line + ": it changes fewer clean predictions"
        line += f", and on clean change with {_names(same)}"
        moved_more = [s for s in same if _shift_key(s) > _shift_key(best)]
        even = [s for s in same if _shift_key(s) == _shift_key(best)]
        if moved_more:
            line += (f"; it moves the held-out clean outputs less than {_names(moved_more)} (mean softmax change "
                     f"{best.clean_shift:.3g} vs {min(s.clean_shift for s in moved_more):.3g} or more)")
        if even:
            line += f"; as little as {_names(even)}, and it comes first in the graph"
    return line


def _names(scores: list[Score], shown: int = 3) -> str:
    names = [_name(s) for s in scores[:shown]]
    return ", ".join(names) + (f" and {len(scores) - shown} more" if len(scores) > shown else "")


def split_samples(req, inputs, clean: Images, triggered: Images, source: Images | None,
                  target: int | None, base_predict) -> Split:
    """Hold out clean pool images (and, for triggered files, half the triggered samples); see the module
    docstring. ``target`` is the attack's target class (given or inferred); ``base_predict(x_uint8)`` gives
    the original model's classes (for unlabelled pools)."""
    pool = inputs.pool
    order = np.random.default_rng(req.seed).permutation(len(pool))
    rest = order[req.n_clean:]
    if inputs.trigger is not None:  # the stamped images' sources, chosen as fit_samples chooses them
        given = req.target
        src = rest[pool.y[rest] != given] if given is not None and pool.y is not None else rest
        used = set(src[:req.n_triggered].tolist())
        rest = np.array([i for i in rest if i not in used], dtype=np.int64)
    needs_pool = inputs.trigger is None and source is None and req.reconstruct == "auto"
    n_held = min(req.n_holdout, max(len(rest) - RECONSTRUCT_POOL, len(rest) // 2) if needs_pool else len(rest))
    if n_held < 1:
        raise FireError(f"--layer auto needs clean images beyond the {req.n_clean} it fits on, to judge each "
                        f"candidate on images it was not fitted on: {req.clean_path} has {len(pool)}; lower "
                        "--n-clean or give a larger --clean file")
    held_idx, pool_idx = rest[len(rest) - n_held:], rest[:len(rest) - n_held]
    held_clean = pool.subset(held_idx)
    recon = pool.subset(pool_idx) if len(pool_idx) else None
    if inputs.trigger is not None:
        if held_clean.y is not None and target is not None:
            keep = held_clean.y != target
        else:
            keep = base_predict(held_clean.x) != target
        src_imgs = held_clean.subset(keep)
        how = (f"fitted on the {len(triggered)} stamped images a plain fit uses; judged on {len(src_imgs)} "
               "held-out clean images (outside the target class) stamped with the trigger")
        if len(src_imgs) < req.n_holdout:
            # a small pool: the clean images the fit uses, stamped, are triggered images no fit has seen (a 600-image
            # validation pool left 67 held-out triggered images, rates in steps of 1.5 %: on MNIST SIG auto chose a
            # layer at 1.5 % held out over one at 3.0 %, 6.5 % vs 3.4 % ASR on new images)
            if clean.y is not None and target is not None:
                keep_fit = clean.y != target
            else:
                keep_fit = base_predict(clean.x) != target
            more = clean.subset(np.flatnonzero(keep_fit)[:req.n_holdout - len(src_imgs)])
            if len(more):
                how += f" and {len(more)} of the clean images the fit uses, stamped"
                src_imgs = Images(np.concatenate([src_imgs.x, more.x]),
                                  None if src_imgs.y is None or more.y is None else np.concatenate([src_imgs.y, more.y]),
                                  src_imgs.classes)
        held_trig = Images(inputs.trigger.apply(src_imgs.x), src_imgs.y)
        return Split(clean, triggered, source, held_clean, held_trig, recon, how, twins=src_imgs)
    n = len(triggered)
    # a file with more triggered images than the fit takes: fit each candidate on the ones a plain fit uses and
    # judge it on the others (a 200-image file was judged on 10, rates in steps of 10 %, six layers tied)
    extra = triggered_order(inputs.triggered, req.target)[n:]  # fit_samples took the first n
    if target is not None and inputs.triggered.y is not None:
        extra = extra[inputs.triggered.y[extra] != target]
    extra = extra[:req.n_holdout]
    if len(extra) >= max(1, n // 2):
        how = (f"fitted on the {n} triggered images a plain fit uses; judged on {len(extra)} other images of the "
               "triggered file")
        return Split(clean, triggered, source, held_clean, inputs.triggered.subset(extra), recon, how)
    if n < 2:
        raise FireError("--layer auto needs at least 2 triggered images (it fits on some and judges each candidate "
                        "on the others); give more --triggered images or choose --layer by hand")
    perm = np.random.default_rng(req.seed + 1).permutation(n)
    fit_idx, held_t = np.sort(perm[:n - n // 2]), np.sort(perm[n - n // 2:])
    how = f"fitted on {len(fit_idx)} of the {n} triggered images, judged on the other {len(held_t)}"
    return Split(clean, triggered.subset(fit_idx), None if source is None else source.subset(fit_idx),
                 held_clean, triggered.subset(held_t), recon, how, refit_sees_held=True)


def _groups(sites: list[Site], n_samples: int) -> list[list[Site]]:
    """Candidates in groups whose activations (float32, ``n_samples`` images) fit ACTIVATION_BUDGET."""
    groups: list[list[Site]] = [[]]
    used = 0
    for s in sites:
        size = 4 * n_samples * int(np.prod(s.shape))
        if groups[-1] and used + size > ACTIVATION_BUDGET:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += size
    return [g for g in groups if g]


def _fit_group(req, inputs, group: list[Site], split: Split, progress) -> dict[str, dirs.Target | str]:
    """Fit every site of ``group`` on the fit part; site tensor -> Target, or the error message."""
    from fire_onnx.fit.pipeline import fit_inputs

    tensors = {s.module: s.tensor for s in group if s.module}
    try:
        d = fit_inputs(req, inputs, [s.layer for s in group], split.clean, split.triggered, split.source,
                       progress=progress, held=split.reconstruct_pool, tensors=tensors or None)
        return {s.tensor: t for s, t in zip(group, d.targets)}
    except FireError as e:
        if len(group) == 1:
            return {group[0].tensor: str(e)}
    out: dict = {}
    for s in group:  # one failed: fit each alone to tell which
        out.update(_fit_group(req, inputs, [s], split, progress))
    return out


def run_auto(req, *, progress=None, log: Log | None = None, inputs=None) -> dirs.Directions:
    """``fit --layer auto``: rank the candidate sites, refit the winner, record the ranking and fit's held-out
    check in its meta (refusing, like any fit, what the check refuses).
    ``inputs``: what :func:`fire_onnx.fit.pipeline.load_inputs` loaded (default: load them from ``req``)."""
    from fire_onnx.fit.verify import refuse_or_record

    say = log or (lambda msg: None)
    d, check = auto_fit(req, progress=progress, log=log, inputs=inputs)
    if check.get("refuse") and not req.force:  # what the fit saw, before the one-line refusal
        for w in d.meta.get("checks", {}).get("warnings", []) + check.get("warnings", []):
            say(f"warning: {w}")
    refuse_or_record(req, d, check)
    return d


def auto_fit(req, *, progress=None, log: Log | None = None, inputs=None) -> tuple[dirs.Directions, dict]:
    """:func:`run_auto` without recording the check: (directions, fit's held-out check of them)."""
    from fire_onnx.fit.pipeline import load_inputs, select_samples
    from fire_onnx.patch import has_repair_nodes

    say = log or (lambda msg: None)
    if inputs is None:
        inputs = load_inputs(req)
    if inputs.onnx_model is None:
        raise FireError("--layer auto judges each candidate by patching the ONNX model: give --onnx MODEL.onnx")
    if has_repair_nodes(inputs.onnx_model):
        raise FireError("--layer auto needs the original model, and this one is already patched by fire-onnx: give "
                        "the unpatched model to --onnx")
    sites, skipped = candidate_sites(inputs.onnx_model, torch_model=inputs.model)
    if not sites:
        why_not = "; ".join(f"{t}: {w}" for t, w in skipped[:4])
        raise FireError("--layer auto found no candidate tensor to repair" + (f" ({why_not})" if why_not else "")
                        + ": see 'fire-onnx inspect' and give --layer")
    clean, triggered, source = select_samples(req, inputs)
    sites = concrete_shapes(sites, inputs, clean)

    from fire_onnx.evaluate import predict_logits, session

    t0 = time.perf_counter()
    pre = inputs.preprocess
    base = session(_bytes(inputs.onnx_model))

    def base_predict(x: np.ndarray) -> np.ndarray:
        return predict_logits(base, pre(x), req.batch_size).argmax(axis=1)

    target, target_from = req.target, "--target"
    if target is None:  # the class the original model gives most of the triggered samples
        target = int(np.bincount(base_predict(triggered.x)).argmax())
        target_from = "the class the original model gives most triggered samples"
    split = split_samples(req, inputs, clean, triggered, source, target, base_predict)
    held = HeldOut(inputs.onnx_model, pre, split.held_clean, split.held_triggered, req.batch_size, base_session=base,
                   twins=split.twins, target=target)
    original_rate = float((held.base_trig == target).mean()) if held.base_trig is not None else None
    notes = []
    if len(split.held_clean) < FEW_HELD_CLEAN:
        notes.append(f"--layer auto judged the clean change on only {len(split.held_clean)} held-out clean images "
                     f"(one image is {1 / len(split.held_clean):.1%}): give a larger --clean pool for a finer measure")
    if req.clean_budget * len(split.held_clean) < 1 and req.clean_budget > 0:
        notes.append(f"the clean budget {req.clean_budget:.2%} is less than one of the {len(split.held_clean)} "
                     "held-out clean images: only candidates that change no held-out prediction are within it")
    say(f"layer auto: {len(sites)} candidate(s); {split.how}; {len(split.held_clean)} held-out clean images; "
        f"target class {target}")
    if skipped:
        reasons: dict[str, list[str]] = {}
        for t, w in skipped:
            reasons.setdefault(w, []).append(t)
        say("layer auto: skipped " + "; ".join(f"{', '.join(ts[:3])}{f' and {len(ts) - 3} more' if len(ts) > 3 else ''}"
                                               f" ({w})" for w, ts in reasons.items()))

    repairs = list(REPAIRS) if req.repair == AUTO_REPAIR else [req.repair]
    scores = score_sites(req, inputs, sites, repairs, split, held, target, [], progress, say)
    ranked, within = rank(scores, req.clean_budget, held.floor, restore=True)
    from fire_onnx.fit.pipeline import SUSPECT_ROUNDS

    rounds = len(inputs.clean_left_out)  # the pool is known to hold poisoned images from the first on
    ok = [s for s in scores if s.ok]
    top = min(ok, key=lambda s: s.target_rate) if ok else None  # the candidate that removes most of the trigger
    # over the budget and better than what is within it: its changes may be poisoned clean images it repairs
    blocked = top is not None and top.clean_change > req.clean_budget and top.target_rate < ranked[0].target_rate
    if (not within or blocked or rounds) and not req.trigger_free and rounds < SUSPECT_ROUNDS:
        if _poisoned_pool(req, inputs, scores, held, split, target, pre, seek=bool(rounds)):
            # the candidates that remove the trigger also 'change' the poisoned clean images: choose again
            say(f"layer auto: {len(inputs.clean_left_out[-1])} clean images look triggered (a clean file drawn from "
                "the training set can hold the attack's poisoned images): left out, and the candidates judged again")
            return auto_fit(req, progress=progress, log=log, inputs=inputs)
    best = ranked[0]
    if not best.ok:
        hint = ("; its candidates are ONNX tensors: without --model, fit reads them from the --onnx model itself "
                "(PyTorch needs a module called once per candidate)" if inputs.model is not None else "")
        raise FireError(f"--layer auto could not fit any candidate (first error: {best.error}){hint}")
    reason = why(ranked, within, req.clean_budget, len(split.held_clean), original_rate)
    n_t = len(split.held_triggered)
    close = too_close(ranked, within, req.clean_budget, n_t)
    if close:
        # new-user run 20: 10 held-out flagged images, fc at 0 % against 10 % (one image) elsewhere; fc left 4.9 % ASR
        # where c1.1 left 2.4 %: a one-image difference decided the layer, and nothing said so
        notes.append(f"--layer auto ranked on only {n_t} held-out triggered images (one image is {1 / n_t:.0%}): "
                     f"{_name(best)} ({best.target_rate:.0%}) and {_names(close)} differ by at most {NOISE_IMAGES} "
                     "image(s), which so few cannot tell apart; give more triggered images, or compare them with "
                     "fit --layer ... and eval")
    chain, steps, stopped = [best], [], ""
    if req.max_layers > 1:
        if within:
            chain, steps, stopped = grow_chain(req, inputs, sites, repairs, split, held, target, best, progress, say)
        else:
            stopped = "the first layer is already over the clean budget"

    # the chosen layer(s), fitted exactly as `fit --layer <chosen>` fits them (all triggered samples)
    d = refit_chain(req, inputs, chain, clean, triggered, source, progress)
    # The refit is not the repair that was judged: fitted on all the triggered samples, a later layer of a
    # chain sees a different residual, and its gate (set to reach it) may fire on other clean inputs. So the
    # refitted repair is scored on the same held-out clean images (no fit uses them), and a chain over the
    # budget loses its last layer until it is within it.
    refit_rate, refit_change, *_ = held.score(d, target)
    dropped = []
    while len(chain) > 1 and refit_change > req.clean_budget + 1e-12:
        dropped.append({"layer": chain[-1].site.label, "chain_clean_change": refit_change})
        say(f"layer auto: refitted on all samples, the chain changes {refit_change:.2%} of the held-out clean "
            f"predictions (budget {req.clean_budget:.2%}): dropping {chain[-1].site.label}")
        chain = chain[:-1]
        d = refit_chain(req, inputs, chain, clean, triggered, source, progress)
        refit_rate, refit_change, *_ = held.score(d, target)
    # judged like `fit --layer <chosen>`: auto's own held-out triggered images were half of a triggered file
    # (10 of 20 flagged images: a layer it rated 10 % left 32 % ASR), so the refit gets fit's held-out check,
    # cross-fitted over all the flagged images, and a confirmed blend's fit is chosen by it (one layer); a
    # chain is cross-fitted by refitting the whole chain on each fold
    if len(chain) == 1:
        chosen, check = check_refit(req, inputs, chain[0], d, clean, triggered, source)
        if chosen is not d:  # the blend's pseudo-pair fit won: score what is written
            d = chosen
            refit_rate, refit_change, *_ = held.score(d, target)
    else:
        from fire_onnx.fit.verify import verify

        check = verify(req, inputs, d, triggered, clean, source,
                       refit=lambda t, src: refit_chain(req, inputs, chain, clean, t, src))
    position = {id(s): i + 1 for i, s in enumerate(ranked) if s.ok}
    rows = []
    for s in scores:
        row = s.record(req.clean_budget)
        row["rank"] = position.get(id(s))
        row["chosen"] = s is best
        rows.append(row)
    d.meta["auto"] = {
        "objective": OBJECTIVE, "clean_budget": req.clean_budget, "within_budget": within,
        "target": target, "target_from": target_from, "original_target_rate": original_rate,
        "split": split.how, "n_held_clean": len(split.held_clean), "n_held_triggered": len(split.held_triggered),
        "n_fit_triggered": len(split.triggered), "repairs": repairs, "chosen_repair": best.repair,
        "candidates": rows, "skipped": [{"tensor": t, "why": w} for t, w in skipped],
        "chosen": best.site.label, "chosen_tensor": best.site.tensor, "why": reason,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    d.meta["auto"]["refit"] = {"target_rate": refit_rate, "clean_change": refit_change,
                               "target_rate_in_sample": split.refit_sees_held, "dropped": dropped}
    if dropped:
        stopped = (f"refitted on all samples the chain exceeded the clean budget; dropped "
                   f"{', '.join(x['layer'] for x in dropped)}")
    if len(chain) > 1:  # each target fitted with the earlier ones applied: fit --update must do the same
        d.meta["chain"] = [s.site.label for s in chain]
    if req.max_layers > 1:
        last = chain[-1]
        d.meta["auto"].update(max_layers=req.max_layers, steps=steps, stopped=stopped,
                              chain=[s.site.label for s in chain], chain_repairs=[s.repair for s in chain],
                              chain_target_rate=last.target_rate, chain_clean_change=last.clean_change)
    checks = d.meta.setdefault("checks", {})
    warnings = checks.setdefault("warnings", [])
    if within and refit_change > req.clean_budget + REFIT_SLACK:
        warnings.append(f"layer auto: refitted on all the samples, the repair changes {refit_change:.2%} of the "
                        f"held-out clean predictions, over the --clean-budget {req.clean_budget:.2%} it was chosen "
                        "within")
    layout_hint = (f"; --layout {req.layout} was given: try without it (the default layout of each tensor)"
                   if req.layout else "")
    if not within:
        warnings.append(f"layer auto: {reason}; raise --clean-budget, or check the trigger and the samples"
                        + layout_hint)
    elif original_rate and best.target_rate >= WEAK_REPAIR and best.target_rate > original_rate / 2:
        warnings.append(f"layer auto: the best candidate ({_name(best)}) still sends {best.target_rate:.0%} of the "
                        f"held-out triggered images to class {target} (original model {original_rate:.0%}): no single "
                        "layer removes this trigger; check --trigger/--triggered and --target, or try --method "
                        "subspace")
    lowest = min((s.target_rate for s in scores if s.ok), default=best.target_rate)
    if original_rate and lowest >= original_rate:
        warnings.append(f"layer auto: no candidate lowers the share of held-out triggered images sent to class "
                        f"{target} ({lowest:.0%} at best, original model {original_rate:.0%}): this repair removes "
                        "nothing; check that the --triggered images carry the trigger (and --target)" + layout_hint)
        after = (check.get("cross_fit") or {}).get("target_rate_after", check.get("target_rate_after"))
        if after is not None and after > WEAK_REPAIR and not check.get("refuse"):
            # new-user run 25: 5 flagged images of a moving sticker, no candidate lowered the held-out rate (100 %) and
            # the written repair's cross-fit left 80 %; exit 0 and 69 % ASR measured, where --layer block2 was refused
            check["refuse"] = (f"no candidate layer lowers the share of held-out triggered images sent to class {target} "
                               f"({lowest:.0%} at best, original model {original_rate:.0%}), and fit's check of the repair "
                               f"leaves {after:.0%} of the triggered images there: it does not remove the backdoor")
    req.notes.extend(notes)
    if inputs.clean_left_out and "clean_excluded" not in d.meta:
        from fire_onnx.fit.pipeline import report_excluded

        report_excluded(req, inputs, d, target, "--layer auto: ")
    return d, check


SUSPECT_CANDIDATES = 3  # candidates (lowest target rate first) tried for the poisoned clean images


def _poisoned_pool(req, inputs, scores: list[Score], held: HeldOut, split, target: int, pre, seek: bool = False) -> bool:
    """When no candidate is within the clean budget, or the one that removes most of the trigger is not, whether
    that candidate changes mostly held-out clean predictions at the target (as for a clean file holding poisoned images,
    ``fire_onnx.fit.verify.poisoned_clean_hint``); then the pool's images that look triggered to it are left
    out of ``inputs.pool`` (``fire_onnx.fit.pipeline.leave_out``; False: nothing done). New-user run 12: every
    effective layer broke the budget on such a file, and auto chose one that left 48 % ASR."""
    from fire_onnx.fit.pipeline import leave_out
    from fire_onnx.fit.verify import _changed_from_target, _pool_suspects, poisoned_clean_hint

    ok = sorted((s for s in scores if s.ok and s.target is not None), key=lambda s: s.target_rate)
    for cand in ok[:SUSPECT_CANDIDATES]:  # the score rule needs a layer where the trigger stands apart
        d = dirs.Directions([cand.target], preprocess=pre.as_dict())
        if not seek and not poisoned_clean_hint({**_changed_from_target(held, d, split.held_clean, target),
                                                 "target": target}):
            return False
        sus = _pool_suspects(req, inputs, held, d, target)
        if sus["applies"]:  # the first layer with evidence decides: a later one also read 47 genuine images
            return leave_out(inputs, sus)
    return False


def check_refit(req, inputs, chosen: Score, d: dirs.Directions, clean: Images, triggered: Images,
                source: Images | None) -> tuple[dirs.Directions, dict]:
    """fit's held-out check (:func:`fire_onnx.fit.verify.verify`) and blend-fit choice on the refitted single
    layer, with the request a plain ``fit --layer <chosen>`` would have; returns (directions, check)."""
    from fire_onnx.fit.pipeline import choose_blend_fit
    from fire_onnx.fit.verify import verify

    one = replace(req, layers=[chosen.site.layer], tensors=chosen.site.tensors(), tensor=None, repair=chosen.repair,
                  max_layers=1, chosen_by_auto=True)
    check = verify(one, inputs, d, triggered, clean, source)
    return choose_blend_fit(one, inputs, clean, triggered, source, d, check)


def score_sites(req, inputs, sites: list[Site], repairs: list[str], split: Split, held: HeldOut, target: int,
                prefix: list[dirs.Target], progress=None, say: Log = lambda m: None, step: int = 1) -> list[Score]:
    """Fit every site (with every operator in ``repairs``) on the fit part, patch it into the model together
    with the repairs of ``prefix`` (earlier steps of a chain; ``inputs.onnx_model`` must then already carry
    them, so the sites are fitted on activations with those repairs applied), and score it on the held-out
    samples."""
    n_fit = len(split.clean) + 2 * len(split.triggered)
    model = inputs.onnx_model  # the original, or (chain steps) the original with the prefix patched in
    fitted: list[tuple[Site, str, dirs.Target | str, float]] = []
    for group, repair in ((g, r) for g in _groups(sites, n_fit) for r in repairs):
        g0 = time.perf_counter()
        got = _fit_group(replace(req, repair=repair), inputs, group, split, progress)
        fit_s = (time.perf_counter() - g0) / len(group)
        fitted += [(site, repair, got.get(site.tensor, "not fitted"), fit_s) for site in group]
    ok = [got for _, _, got, _ in fitted if not isinstance(got, str)]
    say(f"layer auto{f' step {step}' if step > 1 else ''}: {len(ok)} candidate repair(s) fitted; judging them on "
        f"{len(held.x_clean)} clean and {len(held.x_trig)} triggered held-out images")
    s0 = time.perf_counter()
    judged = iter(held.score_many(model, prefix, ok, target, progress))
    score_s = (time.perf_counter() - s0) / max(len(ok), 1)
    scores: list[Score] = []
    for n, (site, repair, got, fit_s) in enumerate(fitted, 1):
        sc = Score(site=site, repair=repair, seconds=fit_s)
        if isinstance(got, str):
            sc.error = got
        else:
            sc.target, sc.gate, sc.k = got, got.gate, got.k
            sc.gate_fires_clean = got.fit.get("gate_fires_clean")
            sc.seconds += score_s
            res = next(judged)
            if isinstance(res, FireError):
                sc.error = str(res)
            else:
                sc.target_rate, sc.clean_change, sc.clean_shift, sc.restored = res
        scores.append(sc)
        say(f"layer auto{f' step {step}' if step > 1 else ''} [{n}/{len(fitted)}] {site.label}"
            + (f" ({repair})" if len(repairs) > 1 else "") + ": "
            + (f"failed ({sc.error})" if sc.error else
               f"held-out target rate {sc.target_rate:.1%}, clean change {sc.clean_change:.2%}"))
    return scores


def chained_inputs(inputs, targets: list[dirs.Target]):
    """``inputs`` with the ONNX model patched with ``targets`` as the activation source (ONNX, no torch)."""
    from fire_onnx.patch import patch_model

    pre = inputs.preprocess.as_dict()
    patched = patch_model(inputs.onnx_model, dirs.Directions(targets=list(targets), preprocess=pre)).model
    return replace(inputs, onnx_model=patched, model=None)


def grow_chain(req, inputs, sites: list[Site], repairs: list[str], split: Split, held: HeldOut, target: int,
               first: Score, progress=None, say: Log = lambda m: None) -> tuple[list[Score], list[dict], str]:
    """Greedy chain (``--max-layers``): after ``first``, each step fits every remaining site on activations
    with the chosen repairs applied, scores the chain plus that site on the held-out samples, and keeps the
    best by the same objective, while it stays within the clean budget and lowers the held-out target rate.
    Returns (the chain's scores in order, a record per step, why it stopped)."""
    chain, steps = [first], []
    while len(chain) < req.max_layers:
        used = {s.site.tensor for s in chain}
        rest = [s for s in sites if s.tensor not in used]
        if not rest:
            return chain, steps, "no candidate left"
        if chain[-1].target_rate == 0:
            return chain, steps, "the held-out target rate is already 0"
        # later steps fit unpaired on flagged images without twins: the trigger reconstruction would be
        # confirmed against a model the earlier repairs already changed
        step_req = replace(req, reconstruct="off")
        scores = score_sites(step_req, chained_inputs(inputs, [s.target for s in chain]), rest, repairs, split,
                             held, target, [s.target for s in chain], progress, say, step=len(chain) + 1)
        ranked, within = rank(scores, req.clean_budget)
        best = ranked[0]
        position = {id(s): i + 1 for i, s in enumerate(ranked) if s.ok}
        record = {"step": len(chain) + 1, "after": [s.site.label for s in chain],
                  "candidates": [dict(s.record(req.clean_budget), rank=position.get(id(s)), chosen=False)
                                 for s in scores]}
        steps.append(record)
        current = chain[-1].target_rate
        if not best.ok:
            return chain, steps, f"step {record['step']}: no candidate could be fitted"
        if not within:
            return chain, steps, f"step {record['step']}: every candidate would exceed the clean budget"
        if best.target_rate >= current:
            return chain, steps, (f"step {record['step']}: no candidate lowers the held-out target rate below "
                                  f"{current:.1%}")
        record["candidates"][scores.index(best)]["chosen"] = True
        record["chosen"] = best.site.label
        chain.append(best)
    return chain, steps, f"--max-layers {req.max_layers} reached"


def refit_chain(req, inputs, chain: list[Score], clean: Images, triggered: Images, source: Images | None,
                progress=None, first: dirs.Directions | None = None) -> dirs.Directions:
    """Fit the chosen site(s) on all the samples, in order, each on activations with the earlier ones'
    repairs applied; one directions file with a target per site (fingerprints of the original model).
    ``first``: a fit on the original activations (with these samples and options) that holds the first
    site's target already; it is taken as it is instead of fitting that site again."""
    from fire_onnx.fit.pipeline import fit_inputs
    from fire_onnx.probe import TensorReader, fingerprint

    d, targets = None, []
    for i, sc in enumerate(chain):
        if i == 0 and first is not None:
            di = first
            t = next(x for x in first.targets if x.tensor == sc.site.tensor)
            targets.append(t)
            d = di
            continue
        step_inputs = inputs if i == 0 else chained_inputs(inputs, targets)
        step_req = replace(req, repair=sc.repair) if i == 0 else replace(req, repair=sc.repair, reconstruct="off")
        di = fit_inputs(step_req, step_inputs, [sc.site.layer], clean, triggered, source, progress=progress,
                        tensors=sc.site.tensors())
        t = di.targets[0]
        if i:  # patch checks fingerprints on the unpatched model: record what it computes there
            x = inputs.preprocess(di.probe)
            acts, _ = TensorReader(inputs.onnx_model, [t.tensor], batch_size=len(x))(x)
            t.fingerprint = fingerprint(acts[t.tensor])
        targets.append(t)
        d = d or di
    d.targets = targets
    return d


def table(auto: dict) -> list[str]:
    """The ranking table of ``meta["auto"]`` as text lines (printed by ``fit``)."""
    both = len(auto.get("repairs") or []) > 1
    rows = [("rank", "layer", "tensor") + (("repair",) if both else ()) + ("gate", "target rate", "clean change", "")]
    for r in auto.get("candidates", []):
        rank_ = "-" if r.get("rank") is None else str(r["rank"])
        first = (rank_, r["layer"], r["tensor"]) + ((r.get("repair", ""),) if both else ())
        if r.get("error"):
            rows.append(first + ("-", "-", "-", f"failed: {r['error']}"))
            continue
        mark = "chosen" if r.get("chosen") else ("" if r.get("within_budget") else "over budget")
        rows.append(first + (r.get("gate") or "-", f"{100 * r['target_rate']:.1f}%", f"{100 * r['clean_change']:.2f}%",
                             mark))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    orig = auto.get("original_target_rate")
    head = (f"layer auto: held-out target rate (class {auto.get('target')}) and clean change over "
            f"{auto.get('n_held_triggered')} triggered / {auto.get('n_held_clean')} clean held-out images, "
            f"clean budget {100 * auto.get('clean_budget', 0):.2f}%"
            + ("" if orig is None else f"; original model: {100 * orig:.1f}%"))
    lines = [head]
    lines += ["  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"chosen {auto.get('why')}")
    for st in auto.get("steps", []):
        ok = [r for r in st["candidates"] if not r.get("error")]
        top = sorted(ok, key=lambda r: r.get("rank") or 10**6)[:3]
        lines.append(f"step {st['step']} (after {', '.join(st['after'])}): " + ", ".join(
            f"{r['layer']}{'' if r.get('repair', 'project') == 'project' else ' (' + r['repair'] + ')'} "
            f"{100 * r['target_rate']:.1f}% / {100 * r['clean_change']:.2f}%"
            + (" chosen" if r.get("chosen") else "") for r in top))
    if auto.get("max_layers", 1) > 1:
        lines.append(f"chain: {' -> '.join(auto.get('chain', []))}, held-out target rate "
                     f"{100 * auto.get('chain_target_rate', 0):.1f}%, clean change "
                     f"{100 * auto.get('chain_clean_change', 0):.2f}% (stopped: {auto.get('stopped')})")
    return lines
