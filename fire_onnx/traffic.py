"""Find the triggered inputs hidden in unlabeled deployment traffic (``fit --unlabeled``; numpy only).

A defender often has neither a trigger nor flagged inputs, only what the deployed model was fed:
thousands of inputs without labels, a few of which may carry a trigger. The backdoor makes those few
stand out in the model's own representations: every triggered input is sent to the target class by the
same shortcut feature, so among the inputs the model puts in that class they form a tight cluster away
from the class's clean inputs (the spectral signature of Tran et al., 2018). This module finds that
cluster and lets the model confirm it:

1. *Representations*: a late tensor (the input of the final classifier layer) for every traffic input
   and for the clean reference images (the ``--clean`` pool), with the model's predicted class.
2. *Whitening*: the representations are whitened by the clean reference's pooled within-class
   covariance (shrunk towards a multiple of the identity by ``SHRINK``), so that no direction of
   ordinary clean variation dominates the spectrum (as in SPECTRE, Hayase et al., 2021).
3. *Per predicted class* with at least ``MIN_INPUTS`` traffic inputs and ``MIN_REFERENCE`` clean
   references: the class's traffic representations are centred on its *clean reference* mean, the top
   right singular vector of that matrix is taken, and each input is scored by its projection on it
   (oriented so that the traffic lies on the positive side). Centring on the clean mean, not on the
   traffic's own mean as the original spectral signature does, matters when the triggered inputs are
   the *majority* of their class: on GTSRB (43 classes, rare target) 40 of the 42 traffic inputs the
   model put in the target class were triggered, and the traffic-centred signature found 20 % of them
   (precision 0.8) where the reference-centred one found 95 % (precision 1.0).
4. *Cut*: the inputs above the two-cluster split (1-D 2-means, exact) of the class's traffic and
   reference scores together are *flagged*. The reference anchors the clean cluster, so the split needs
   no assumed poisoning rate. A class is a *candidate* when at least ``MIN_FLAGGED`` inputs are flagged
   and at most ``REFERENCE_ABOVE_MAX`` of its clean references fall above the cut (on a clean class the
   split halves the clean distribution, and about half of the references fall above it).
5. *Confirmation*: for the candidates (most separated first, at most ``MAX_CONFIRM``), the flagged
   inputs go to the trigger reconstruction of :mod:`fire_onnx.reconstruct` (as for flagged inputs): it
   estimates a patch, blend and additive trigger from them and stamps each on held clean images of other
   classes. The class whose reconstruction the model confirms most often (at least
   ``reconstruct.CONFIRM_THRESHOLD`` of the stamped images go to it) is the attack's target, and its
   flagged inputs are the triggered ones found. No confirmed class: nothing was found. Several confirmed
   classes: step 10.
6. *Patch carriers*: when the confirmed reconstruction is a patch, the target class's traffic inputs that
   carry it (their pixels under its mask match its pattern) are added to the outlying ones, unless more
   than ``PATCH_CLEAN_MAX`` of the clean references carry it too. The spectral cut misses the triggered
   inputs that sit nearest the clean ones (recall 84 % on a CIFAR-10 BadNets model), and the repair's gate
   is set to reach the inputs it is given: adding the 12 carriers (6 of them clean images with a white
   corner, which the model also sends to the target) took the residual ASR from 5.6 % to 3.9 %.

7. *Control*: a confirmation counts only when it beats by ``CONTROL_MARGIN`` the same reconstruction run from as
   many of the class's own clean reference images (labelled and predicted so; at least ``MIN_FLAGGED`` of them,
   else no control): a "trigger" that the class's clean images also give is class content. New-user run 22
   (Fashion-MNIST traffic made brighter and noisier, ``1.15 x + 30 + N(0, 12)``, no trigger) had a repair written
   for one class on four models, confirmed at 50-62 % (blend, additive); their controls gave 51-72 %, so
   margins of -0.10 to +0.05. True finds: 0.23 (GTSRB Blended, 85 % against 63 % from 24 clean class-0 images)
   to 0.86 on the benchmark cells, 0.43 on run 22's backdoored model with shifted BadNets traffic, 0.56-0.70 on
   run 21's 2-class models. The control runs only for confirmed classes (one more reconstruction each).
8. *Global shift*: when at least ``GLOBAL_SHIFT`` of the scored classes (and 3) are candidates, the traffic as
   a whole differs from the reference (run 22: 5-10 of 10 on four models; the benchmark cells: at most 2 of 29):
   ``fit`` warns so, and a class is taken as triggered only when its reconstruction is confirmed by at least
   ``SHIFT_RATE`` (run 22's shifted BadNets traffic: 99.5 %). The same holds when the traffic's *images* look
   different from the reference's (brightness, contrast, sharpness) in most classes (:func:`look_shift`), which a
   shift can do while moving the model's representation in a few classes only. With the tail cut below on every model, the demo
   MNIST model's traffic at ``1.3 x + 50 + N(0, 20)`` gave a class-2 "patch" (saturated strokes) confirmed by
   86 % against 11 % from its clean images: the control misses what the shift gives every input.
9. *Tail cut* (models with at most ``TAIL_MAX_CLASSES`` classes): a class of several kinds of image (a 2-class
   model's "digits 0-4") is split by the two-cluster cut along its kinds, with 30-50 % of its references above
   the cut, and was no candidate: run 21's 2-class models with a 100 %-ASR BadNets backdoor found nothing
   (b2t0: 50 triggered among 602 inputs of the class, 32 % of the references above the cut; is7t1: 52 %). The cut
   is then moved up to the references' ``TAIL_QUANTILE``, and the class is a candidate when ``TAIL_EXCESS``
   times more of its traffic than of its references lies above it: b2t0 found 56 inputs (all 50 triggered, patch
   confirmed by 100 %, control 30 %), is7t1 49 of 50 (19 above the cut, the rest carrying the patch). Tried on
   every model it added candidates in shifted traffic (the class-2 case of step 8) and none in the benchmark
   cells' finds, so it stays with 2-class models.
10. *Several confirmed classes* (without ``--target``; confirmed means not refuted by steps 7-8). An all-to-one
   backdoor has one target, and several classes confirmed is what traffic unlike the clean reference gives (new-user
   run 6: a clean GTSRB model's training images as traffic, 4 classes at 63-86 %): nothing is found, with a warning
   (:func:`ambiguous`). Two exceptions: one class confirmed at ``STANDOUT_RATE`` or more and ``STANDOUT_GAP`` above
   the next is the target (:func:`standout`; run 11: 99 % against 76 % and 72 %), with a warning that names the
   others as possible targets of a second backdoor, to fit with ``--target``; and two or more classes each at
   ``STANDOUT_RATE`` or more, in traffic with no global or look shift (step 8), are several backdoors, or several
   triggers (:func:`several`): a model with a patch backdoor to class 0 and a blend one to class 3, 30 triggered
   inputs of each in 1,000 test images, had class 0 confirmed at 99 % (its clean images 52 %) and class 3 at 98 %
   (31 %), and "nothing found" with exit 0 read as a clean model. ``fit`` then stops with an error
   (:class:`SeveralFound`) that names them and says to fit each with ``--target`` (30 of 30 found for each);
   ``--force`` fits the first. A shift can give every class a strong confirmation, so under one this is not said.
11. *Unconfirmed groups*: a candidate whose reconstruction nothing confirms is not dropped silently when its group
   stands clear of the clean references (:func:`unconfirmed_groups`: separation at least ``UNCONFIRMED_SEPARATION``,
   at most ``UNCONFIRMED_REFERENCE_ABOVE`` of the references above the cut, no global or look shift): a trigger the
   patch, blend and additive models cannot express gives such a group. New-user run 25's sticker at a random place
   per image gave class 0 a group of 45 inputs, all triggered, separation 17.2, confirmed 0 %, and fit said "nothing
   to repair". ``fit`` now warns (not repaired, exit 0), records the group's indices (``unconfirmed_groups``), and
   ``--force`` fits on it (5.6 % ASR left there).

Not adopted: a stricter bar for additive reconstructions or one relative to chance among the other classes
(1 / (K - 1), 100 % for two classes): the control refuted every additive false find measured, while run 21's
b2t1 (a real 2-class backdoor) is found through an additive reconstruction at 66 % (control 10 %): the group has
113 inputs, the 50 triggered ones and 63 clean ones, too mixed for the patch to be found. A shift that gives a few
classes a common look a patch reconstruction picks up was missed before :func:`look_shift` (stroke thickening on
the demo model: class 2 at 74 %, control 8 %); a shift that leaves the images' brightness, contrast and sharpness
alone in most classes and still does that would be missed: give ``--clean`` images like the traffic.

All the flagged inputs of the confirmed class are then fitted on (:mod:`fire_onnx.fit.unlabeled`), not
only the highest scorers: the top 20 of 48 found on a CIFAR-10 Blended model are the most extreme
triggered inputs, and the unpaired repair fitted on them left 44.7 % ASR against 6.2 % with all 48 (GTSRB
Blended: 56.8 % against 25.5 %). The two-cluster cut was also compared with a cut at the clean scores'
median + 3.5 robust standard deviations: the stricter of the two found 12 of GTSRB Blended's 50 triggered
inputs (the target class has only 28 clean references, whose spread is small); the looser one let 3 clean
inputs into CIFAR-10 Blended's 52 and doubled its residual ASR (11.6 %).

Labels in the traffic file, if any, are never read. The caller supplies the model as two functions
(:func:`find_triggered`), so this module needs no torch and no onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fire_onnx.data import layout_hint
from fire_onnx.errors import FireError

MIN_INPUTS = 10  # traffic inputs a predicted class needs to be scored
MIN_REFERENCE = 3  # clean reference images (predicted as that class) a class needs to be scored
# flagged inputs a class needs to be a candidate (and to reconstruct a trigger from): a "blend" estimated
# from 3-5 clean images of one class is mostly their own content, at a large ratio (0.44-0.69), and the
# model confirms it (89-98 % on GTSRB classes 2, 6 and 16, none triggered) just as it would any strong
# blend of that class's look
MIN_FLAGGED = 10
REFERENCE_ABOVE_MAX = 0.25  # a candidate's cut leaves at most this share of its clean references above it
# when the two-cluster cut leaves more than that above it (a class made of several kinds of image, as in a
# 2-class model), the cut is moved up to the clean references' TAIL_QUANTILE; the class is a candidate when
# at least TAIL_EXCESS times the share of the clean references above it (and MIN_FLAGGED) of its traffic is
TAIL_QUANTILE = 0.99
TAIL_EXCESS = 3.0
TAIL_MIN_REFERENCE = 100  # clean references a class needs for a tail cut (its 99th percentile)
TAIL_MAX_CLASSES = 2  # the tail cut is tried on models with at most this many classes (see the module docstring)
# a confirmation counts only when it beats the same reconstruction from the class's own clean images (the
# control) by this much, if there are at least MIN_FLAGGED of them to estimate it from
CONTROL_MARGIN = 0.15
GLOBAL_SHIFT = 0.5  # candidates in at least this share of the scored classes (and 3): the traffic as a whole differs
SHIFT_RATE = 0.9  # ... and then a class is taken as triggered only when its reconstruction is confirmed this often
LOOK_EFFECT = 1.0  # a class's traffic "looks different" when a look statistic's median moves this many robust SDs
LOOK_MIN_REFERENCE = 20  # clean reference images a class needs for its look to be compared
MAX_CONFIRM = 8  # candidate classes confirmed with the model (most separated first)
AMBIGUOUS = 2  # this many confirmed classes (without --target) is no finding (but see several, standout)
# an outlying group that no reconstruction confirms is still reported, not repaired (see unconfirmed_groups), when it is
# at least this separated from its class's clean references ...
UNCONFIRMED_SEPARATION = 6.0
# ... and leaves at most this share of them above its cut
UNCONFIRMED_REFERENCE_ABOVE = 0.02
N_REFERENCE = 5000  # clean pool images whose representations are the reference
SHRINK = 0.1  # covariance shrinkage towards a multiple of the identity
MAX_DIM = 512  # representations wider than this are reduced to their top principal axes first

Represent = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]  # uint8 NHWC -> (reps (N, D), logits (N, C))
Predict = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC -> predicted classes (N,)

NOTHING_FOUND = "no triggered inputs found in the traffic"
# said instead when a strongly outlying group was found that no reconstruction confirms (see unconfirmed_groups)
NOTHING_CONFIRMED = "no triggered inputs confirmed in the traffic"


@dataclass
class ClassEvidence:
    """How one predicted class of the traffic was scored (and, if a candidate, confirmed)."""

    cls: int
    n: int  # traffic inputs the model puts in this class
    n_reference: int  # clean reference images the model puts in this class
    cut: float | None = None  # score above which an input is flagged (whitened units)
    n_flagged: int = 0
    reference_above: float | None = None  # share of the clean references above the cut
    separation: float | None = None  # (median flagged score - median reference score) / robust reference spread
    candidate: bool = False
    skipped: str = ""  # why the class was not scored
    confirmation: float | None = None  # rate of the best reconstruction (None: not confirmed with the model)
    kind: str = ""  # kind of the best reconstruction
    confirmed: bool = False
    control: float | None = None  # best rate of the same reconstruction from the class's clean reference images
    n_control: int = 0  # clean reference images the control reconstruction was estimated from
    # confirmed, but not taken: "control" (not CONTROL_MARGIN more than the control), "shift" (under SHIFT_RATE in a
    # globally shifted traffic)
    refuted: str = ""
    tail: bool = False  # flagged above the clean references' TAIL_QUANTILE (the two-cluster cut failed)
    look: float | None = None  # largest look change of the class's traffic against its references (see look_shift)

    def record(self) -> dict:
        out = {"class": self.cls, "n": self.n, "n_reference": self.n_reference, "n_flagged": self.n_flagged,
               "candidate": self.candidate, "confirmed": self.confirmed}
        for key, v in (("cut", self.cut), ("reference_above", self.reference_above),
                       ("separation", self.separation), ("confirmation", self.confirmation),
                       ("control", self.control), ("look", self.look)):
            if v is not None:
                out[key] = round(float(v), 4)
        if self.kind:
            out["kind"] = self.kind
        if self.n_control:
            out["n_control"] = self.n_control
        if self.refuted:
            out["refuted"] = True
        if self.tail:
            out["cut_kind"] = "tail"
        if self.skipped:
            out["skipped"] = self.skipped
        return out


@dataclass
class Detection:
    """Spectral scoring of the traffic, before any confirmation."""

    classes: list[ClassEvidence]
    scores: np.ndarray  # (N,) each input's score in its predicted class (nan where the class was not scored)
    flagged: dict[int, np.ndarray]  # class -> indices of its flagged inputs, highest score first
    pred: np.ndarray  # (N,) predicted class of each traffic input
    dim: int  # representation width used (after any reduction)

    def candidates(self) -> list[ClassEvidence]:
        """Candidate classes, most separated first."""
        return sorted((c for c in self.classes if c.candidate), key=lambda c: -(c.separation or 0.0))


@dataclass
class TrafficResult:
    """What ``fit --unlabeled`` found: the triggered inputs (indices into the traffic) and the evidence."""

    indices: np.ndarray  # found triggered inputs, highest score first (empty when nothing was confirmed)
    target: int | None  # the confirmed class (None: nothing confirmed)
    detection: Detection
    n_traffic: int
    tensor: str = ""  # the representation read
    n_reference: int = 0
    reconstruction: dict | None = None  # the chosen class's reconstruction record
    notes: list[str] = field(default_factory=list)
    # the model on the clean reference: near-chance accuracy or one class for nearly all (wrong preprocessing)
    warnings: list[str] = field(default_factory=list)
    forced: bool = False  # --force: target and indices picked although nothing was confirmed
    # several classes confirmed strongly (see several): several backdoors or triggers, none taken as the target
    several: list[ClassEvidence] = field(default_factory=list)
    n_patch_added: int = 0  # inputs of the target class added because they carry the confirmed patch
    # strongly outlying groups no reconstruction confirmed (see unconfirmed_groups): reported, not repaired
    unconfirmed: list[ClassEvidence] = field(default_factory=list)
    unconfirmed_warning: str = ""  # the warning on them (set by the caller, who knows the traffic file's name)

    @property
    def found(self) -> bool:
        return self.target is not None and not self.forced

    def record(self) -> dict:
        """The evidence recorded in the directions file (``meta["unlabeled"]``) and ``fit --json``."""
        cands = self.detection.candidates()
        return {"n_traffic": self.n_traffic, "n_reference": self.n_reference, "representation": self.tensor,
                "dim": self.detection.dim, "found": self.found, "forced": self.forced, "target": self.target,
                "n_found": int(len(self.indices)), "indices": [int(i) for i in self.indices],
                "n_outlying": int(len(self.indices)) - self.n_patch_added, "n_patch_added": self.n_patch_added,
                "candidates": [c.cls for c in cands],
                "chosen_confirmation": None if self.reconstruction is None else self.reconstruction.get("rate"),
                "chosen_kind": None if self.reconstruction is None else self.reconstruction.get("kind"),
                "method": ("per predicted class: whitened (clean pooled within-class covariance) representations "
                           "centred on the class's clean reference mean, projection on the top singular vector, "
                           "two-cluster cut of traffic and reference scores; confirmed by trigger reconstruction"),
                "thresholds": {"min_inputs": MIN_INPUTS, "min_reference": MIN_REFERENCE, "min_flagged": MIN_FLAGGED,
                               "reference_above_max": REFERENCE_ABOVE_MAX, "tail_quantile": TAIL_QUANTILE,
                               "tail_excess": TAIL_EXCESS, "control_margin": CONTROL_MARGIN,
                               "unconfirmed_separation": UNCONFIRMED_SEPARATION,
                               "unconfirmed_reference_above": UNCONFIRMED_REFERENCE_ABOVE},
                "classes": [c.record() for c in self.detection.classes],
                "several": [c.cls for c in self.several],
                "unconfirmed_groups": [{"class": c.cls, "n": c.n_flagged, "n_class": c.n,
                                        "separation": round(float(c.separation or 0.0), 4),
                                        "reference_above": round(float(c.reference_above or 0.0), 4),
                                        "confirmation": round(float(c.confirmation or 0.0), 4),
                                        "indices": [int(i) for i in self.detection.flagged[c.cls]]}
                                       for c in self.unconfirmed],
                "unconfirmed_warning": self.unconfirmed_warning or None,
                "notes": list(self.notes), "warnings": list(self.warnings)}


class NothingFound(Exception):
    """No class of the traffic was confirmed: nothing confirmed to repair (not a user error: exit 0). The result may
    still hold strongly outlying groups that no reconstruction confirmed (``result.unconfirmed``), which ``fit`` reports
    with a warning instead of an all-clear."""

    def __init__(self, result: TrafficResult):
        super().__init__(NOTHING_FOUND)
        self.result = result


class SeveralFound(FireError):
    """Several classes were confirmed strongly (``result.several``, see :func:`several`): several backdoors or
    triggers, and one directions file repairs one target. A FireError (exit 1, one line): exit 0 with "nothing to
    repair" read as a clean model. ``traffic``: the traffic file's name, for the commands the message gives."""

    def __init__(self, result: TrafficResult, traffic: str = "TRAFFIC"):
        super().__init__(several_message(result.several, traffic))
        self.result = result


# ------------------------------------------------------------------------------------------ scoring
def two_means_cut(values: np.ndarray) -> float:
    """The threshold of the best split of 1-D ``values`` into two groups (least within-group sum of
    squares, exact over all split points): the midpoint between the two values it falls between."""
    v = np.sort(np.asarray(values, np.float64))
    n = len(v)
    if n < 2:
        return float(v[0]) if n else 0.0
    cs, cs2 = np.cumsum(v), np.cumsum(v * v)
    k = np.arange(1, n)
    left = cs2[:-1] - cs[:-1] ** 2 / k
    right = (cs2[-1] - cs2[:-1]) - (cs[-1] - cs[:-1]) ** 2 / (n - k)
    j = int(np.argmin(left + right))
    return float((v[j] + v[j + 1]) / 2)


def class_cut(traffic_scores: np.ndarray, reference_scores: np.ndarray) -> float:
    """The score above which a class's traffic inputs are flagged: the two-cluster split of its traffic
    and clean reference scores together."""
    return two_means_cut(np.concatenate([traffic_scores, reference_scores]))


def whitener(ref: np.ndarray, ref_pred: np.ndarray, shrink: float = SHRINK, max_dim: int = MAX_DIM) -> np.ndarray:
    """(D, d) matrix ``W`` such that ``x @ W`` whitens the clean references' pooled within-class
    covariance (shrunk towards ``trace / D`` times the identity); ``d = min(D, max_dim)``."""
    parts = [ref[ref_pred == c] - ref[ref_pred == c].mean(axis=0) for c in np.unique(ref_pred)
             if (ref_pred == c).sum() >= 2]
    if not parts:
        raise FireError("the clean images give no class with two or more images to model clean representations: "
                        "give a larger --clean pool")
    z = np.concatenate(parts)
    dim = z.shape[1]
    basis = None
    if dim > max_dim:  # top principal axes of the within-class variation
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        basis = vt[:max_dim].T
        z = z @ basis
    cov = z.T @ z / max(len(z) - 1, 1)
    d = cov.shape[0]
    scale = float(np.trace(cov)) / d
    if not np.isfinite(scale) or scale <= 0:
        raise FireError("the clean reference representations do not vary (a constant tensor): cannot score traffic")
    cov = (1 - shrink) * cov + shrink * scale * np.eye(d)
    ev, vec = np.linalg.eigh(cov)
    w = vec / np.sqrt(np.maximum(ev, 1e-12 * scale))
    return w if basis is None else basis @ w


def detect(reps: np.ndarray, pred: np.ndarray, ref: np.ndarray, ref_pred: np.ndarray,
           n_classes: int | None = None, tail: bool | None = None) -> Detection:
    """Score every traffic input in its predicted class and flag the outlying cluster (module docstring,
    steps 2-4). ``reps``/``ref``: (N, ...) representations of the traffic and of the clean reference;
    ``pred``/``ref_pred``: the model's predicted classes. ``tail``: try the tail cut where the two-cluster cut
    leaves too many references above it (default: on models with at most ``TAIL_MAX_CLASSES`` classes)."""
    reps = np.asarray(reps, np.float64).reshape(len(reps), -1)
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    if reps.shape[1] != ref.shape[1]:
        raise FireError(f"traffic and clean representations differ in width ({reps.shape[1]} vs {ref.shape[1]})")
    finite = np.isfinite(reps).all(axis=1)
    ref_ok = np.isfinite(ref).all(axis=1)
    ref, ref_pred = ref[ref_ok], np.asarray(ref_pred)[ref_ok]
    w = whitener(ref, ref_pred)
    zt, zr = reps[finite] @ w, ref @ w
    idx_finite = np.nonzero(finite)[0]
    pred = np.asarray(pred)
    n_classes = int(max(pred.max(initial=-1), ref_pred.max(initial=-1)) + 1) if n_classes is None else n_classes
    tail = n_classes <= TAIL_MAX_CLASSES if tail is None else tail
    scores = np.full(len(reps), np.nan)
    classes, flagged = [], {}
    for c in range(n_classes):
        sel = pred[finite] == c
        members = idx_finite[sel]
        rsel = ref_pred == c
        ev = ClassEvidence(c, int(len(members)), int(rsel.sum()))
        if ev.n == 0:
            continue
        classes.append(ev)
        if ev.n < MIN_INPUTS:
            ev.skipped = f"fewer than {MIN_INPUTS} traffic inputs"
            continue
        if ev.n_reference < MIN_REFERENCE:
            ev.skipped = f"fewer than {MIN_REFERENCE} clean reference images in this class"
            continue
        mu = zr[rsel].mean(axis=0)
        xt, xr = zt[sel] - mu, zr[rsel] - mu
        _, _, vt = np.linalg.svd(xt, full_matrices=False)
        v = vt[0]
        st, sr = xt @ v, xr @ v
        if st.mean() < sr.mean():
            st, sr = -st, -sr
        cut = class_cut(st, sr)
        above = st > cut
        if tail and float((sr > cut).mean()) > REFERENCE_ABOVE_MAX and len(sr) >= TAIL_MIN_REFERENCE:
            tail_cut = float(np.quantile(sr, TAIL_QUANTILE))
            n_tail = int((st > tail_cut).sum())
            if n_tail >= MIN_FLAGGED and n_tail >= TAIL_EXCESS * max(float((sr > tail_cut).mean()), 1e-9) * len(st):
                cut, above, ev.tail = tail_cut, st > tail_cut, True
        ev.cut, ev.n_flagged = cut, int(above.sum())
        ev.reference_above = float((sr > cut).mean())
        spread = 1.4826 * float(np.median(np.abs(sr - np.median(sr))))
        spread = spread if spread > 0 else float(sr.std()) or 1.0
        if above.any():
            ev.separation = float((np.median(st[above]) - np.median(sr)) / spread)
        ev.candidate = ev.n_flagged >= MIN_FLAGGED and ev.reference_above <= REFERENCE_ABOVE_MAX
        scores[members] = st
        order = np.argsort(-st[above], kind="stable")
        flagged[c] = members[above][order]
    return Detection(classes, scores, flagged, pred, int(w.shape[1]))


# --------------------------------------------------------------------------------------- confirmation
STANDOUT_RATE = 0.9  # among several confirmed classes, one confirmed at least this often ...
STANDOUT_GAP = 0.2  # ... and this much more often than the next is the finding (see standout)


def standout(ranked: list[ClassEvidence]) -> bool:
    """Whether the first of ``ranked`` (confirmed classes, highest confirmation first) stands apart from the
    others: new-user run 11's GTSRB traffic confirmed the real target at 99 % and two classes at 76 % and 72 %
    that clean traffic of the same model confirms too (its own outlying groups); run 6's four classes of a
    clean model sat at 63-86 %, none apart."""
    top, nxt = ranked[0].confirmation or 0.0, ranked[1].confirmation or 0.0
    return top >= STANDOUT_RATE and top - nxt >= STANDOUT_GAP


def rates(c: ClassEvidence) -> str:
    """A confirmed class's confirmation and its control, e.g. "0 (confirmed by 99%, its clean images 52%)"."""
    ctl = (f"its clean images {c.control:.0%}" if c.control is not None
           else f"no control: fewer than {MIN_FLAGGED} clean images of the class")
    return f"{c.cls} (confirmed by {c.confirmation or 0:.0%}, {ctl})"


def several(confirmed: list[ClassEvidence], shift: str | None = None) -> list[ClassEvidence]:
    """The classes of ``confirmed`` (confirmed and not refuted: each beat its control by ``CONTROL_MARGIN`` where
    there was one) confirmed at ``STANDOUT_RATE`` or more, highest first, when there are at least ``AMBIGUOUS`` of
    them and the traffic shows no global or look shift (``shift``, which can give every class a strong
    confirmation); else []. Several backdoors, or one model with several triggers: a patch backdoor to class 0 and
    a blend one to class 3 gave 99 % (control 52 %) and 98 % (31 %), where traffic unlike the clean reference gave
    63-86 % (new-user run 6) and the outlying groups of run 11's clean traffic 72-76 %. Two classes at 90 % or more
    are never a standout (:func:`standout`: 20 points apart)."""
    if shift:
        return []
    strong = sorted((c for c in confirmed if (c.confirmation or 0.0) >= STANDOUT_RATE), key=lambda c: -(c.confirmation
                                                                                                      or 0.0))
    return strong if len(strong) >= AMBIGUOUS else []


def several_message(strong: list[ClassEvidence], traffic: str = "TRAFFIC") -> str:
    """The error of :class:`SeveralFound`: which classes, how surely, and the commands that fit one repair each."""
    names = ", ".join(rates(c) for c in strong[:-1]) + f" and {rates(strong[-1])}"
    fits = " and ".join(f"'fire-onnx fit --unlabeled {traffic} ... --target {c.cls}'" for c in strong)
    than = ("far more often than from the class's own clean images" if all(c.control is not None for c in strong)
            else "more often than from the class's own clean images where there are enough of them")
    return (f"{len(strong)} backdoors (or {len(strong)} triggers) likely: classes {names} each have an outlying group "
            f"in the traffic whose reconstructed trigger the model confirms, {than}, and the traffic shows no global "
            f"shift. One directions file repairs one target, so none was written: run {fits} for one repair per "
            "backdoor (then 'fire-onnx patch --add' the second into the first's patched model), or --force to fit "
            f"class {strong[0].cls} alone")


def ambiguous(confirmed: list[ClassEvidence]) -> str | None:
    """Why ``confirmed`` (the classes whose outlying group's reconstruction the model confirmed) is no
    finding, or None. An all-to-one backdoor has one target: several confirmed classes is what traffic
    that differs from the clean reference looks like (new-user run 6: the model's own training images as
    traffic, validation images as --clean; 4 classes confirmed at 63-86 % on a *clean* GTSRB model, and
    the repair written for one of them cost 1.1 pt of clean accuracy). Every benchmark cell confirmed one.
    :func:`find_triggered` asks :func:`several` first: two or more classes at ``STANDOUT_RATE`` are several
    backdoors, not this."""
    if len(confirmed) < AMBIGUOUS:
        return None
    ranked = sorted(confirmed, key=lambda c: -(c.confirmation or 0))
    if standout(ranked):
        return None
    names = ", ".join(f"{c.cls} ({c.confirmation:.0%})" for c in ranked)
    return (f"{len(confirmed)} classes have an outlying group whose reconstruction the model confirms: {names}. A "
            "backdoor with one target does not look like that; traffic that differs from the --clean reference does "
            "(other cameras or lighting, or images the model was trained on against new ones as --clean), so nothing "
            "is taken as found. Give --clean images like the traffic, or --target CLASS to fit on one class's group "
            "anyway")


def global_shift(det: Detection) -> str | None:
    """A warning when most scored classes have an outlying group (``GLOBAL_SHIFT``, at least 3): the traffic as a
    whole differs from the clean reference, not one class's few inputs. New-user run 22: Fashion-MNIST test images
    made brighter and noisier (``1.15 x + 30 + N(0, 12)``) against unshifted --clean images gave 5-10 candidate
    classes of 10 on four models (every benchmark cell: at most 2)."""
    scored = [c for c in det.classes if c.cut is not None]
    n = len(det.candidates())
    if n < 3 or n < GLOBAL_SHIFT * len(scored):
        return None
    return (f"{n} of the {len(scored)} scored classes have an outlying group: the traffic as a whole differs from the "
            "--clean reference (other cameras, lighting, noise or preprocessing), which hides triggered inputs among "
            "the class's own shifted ones, and gives every class's inputs a common look a reconstruction can pick up; a "
            f"class is taken as triggered only when its reconstruction is confirmed by at least {SHIFT_RATE:.0%}. Give "
            "--clean images like the traffic")


LOOKS = ("brightness", "contrast", "sharpness")


def image_looks(x: np.ndarray) -> np.ndarray:
    """(N, 3) what images look like before any model reads them: mean pixel value (brightness), pixel
    standard deviation (contrast) and mean absolute difference of neighbouring pixels (sharpness)."""
    out = np.empty((len(x), 3))
    for i in range(0, len(x), 512):  # chunks: a float copy of 50k images would not fit beside the rest
        b = x[i: i + 512].astype(np.float32)
        out[i: i + 512, 0] = b.mean(axis=(1, 2, 3))
        out[i: i + 512, 1] = b.std(axis=(1, 2, 3))
        out[i: i + 512, 2] = (np.abs(np.diff(b, axis=1)).mean(axis=(1, 2, 3))
                              + np.abs(np.diff(b, axis=2)).mean(axis=(1, 2, 3)))
    return out


def look_shift(det: Detection, traffic: np.ndarray, reference: np.ndarray, ref_pred: np.ndarray) -> str | None:
    """A warning when the traffic's *images* differ from the clean reference's in most classes: per predicted class
    (at least ``MIN_INPUTS`` traffic inputs and ``LOOK_MIN_REFERENCE`` references), the median of each look
    statistic (:func:`image_looks`) of the traffic against the references' median, in robust standard deviations
    of the references; a class looks different when one moves by ``LOOK_EFFECT`` or more. Records each class's
    largest move in ``ClassEvidence.look``.

    The spectral check (:func:`global_shift`) reads the model's representation, which a shift can leave alone in
    most classes: the demo MNIST model's traffic with every stroke thickened by one pixel (a 2x2 dilation) gave 3
    candidate classes of 10, and class 2's "patch" (112 pixels of thick stroke) was confirmed by 74 % against 8 %
    from its clean images, so a repair was written for a clean input stream. Its looks moved by 1.6-2.5 SDs in all
    10 classes. Unshifted traffic (test images against training ones, 5 % triggered) moved at most 0.4 SDs in every
    class of MNIST, Fashion-MNIST and CIFAR-10 outside the target class (0.8 there), and above 1 SD in 3 of 30 GTSRB
    classes (the target class at 2.8-4.3, the triggered inputs being most of it)."""
    t_look, r_look = image_looks(traffic), image_looks(reference)
    moved, compared = [], 0
    for ev in det.classes:
        t, r = t_look[det.pred == ev.cls], r_look[ref_pred == ev.cls]
        if len(t) < MIN_INPUTS or len(r) < LOOK_MIN_REFERENCE:
            continue
        compared += 1
        centre = np.median(r, axis=0)
        spread = 1.4826 * np.median(np.abs(r - centre), axis=0)
        spread = np.where(spread > 0, spread, r.std(axis=0) + 1e-6)
        effect = (np.median(t, axis=0) - centre) / spread
        ev.look = float(np.abs(effect).max())
        if ev.look >= LOOK_EFFECT:
            moved.append(int(np.abs(effect).argmax()))
    if len(moved) < 3 or len(moved) < GLOBAL_SHIFT * compared:
        return None
    what = LOOKS[int(np.bincount(moved, minlength=3).argmax())]
    return (f"the traffic's images differ from the --clean reference's in {len(moved)} of the {compared} classes "
            f"compared (mostly in {what}: the images themselves, before the model reads them; other cameras, "
            "lighting, noise or preprocessing), which gives every class's inputs a common look a reconstruction can "
            f"pick up; a class is taken as triggered only when its reconstruction is confirmed by at least "
            f"{SHIFT_RATE:.0%}. Give --clean images like the traffic")


def find_triggered(traffic: np.ndarray, represent: Represent, predict: Predict, clean: np.ndarray,
                   reference: np.ndarray, held: np.ndarray, *, clean_y: np.ndarray | None = None,
                   held_y: np.ndarray | None = None, target: int | None = None, tensor: str = "",
                   log: Callable[[str], None] | None = None, reference_y: np.ndarray | None = None) -> TrafficResult:
    """Find the triggered inputs of ``traffic`` (uint8 NHWC): score (:func:`detect`), then confirm.

    ``represent(x)`` -> (representations, logits) and ``predict(x)`` -> classes take uint8 NHWC images.
    ``reference``: clean images whose representations model clean inputs; ``clean``/``held``: clean images
    the trigger reconstruction takes as its clean reference and stamps its candidates on (with labels
    ``clean_y``/``held_y`` when known, used only to leave out images of the candidate class). ``target``:
    consider only that predicted class. ``reference_y``: the reference's labels, when known, to check the
    model's accuracy on it. Returns the result; nothing confirmed -> ``target`` None.
    """
    from fire_onnx import reconstruct as rc
    from fire_onnx.fit.core import model_checks

    say = log or (lambda msg: None)
    if traffic.dtype != np.uint8 or traffic.ndim != 4:
        raise FireError(f"traffic images must be uint8 (N, H, W, C), got {traffic.dtype} {list(traffic.shape)}")
    if traffic.shape[1:] != reference.shape[1:]:
        raise FireError(f"traffic images are {list(traffic.shape[1:])} but the clean images are "
                        f"{list(reference.shape[1:])} (H, W, C): they must be inputs of the same model"
                        + layout_hint(list(traffic.shape[1:]), list(reference.shape[1:])))
    reps, logits = represent(traffic)
    if logits is None or logits.ndim != 2 or logits.shape[1] < 2:
        raise FireError("--unlabeled needs the model's class scores ((N, classes) output) to group the traffic by "
                        "predicted class")
    ref_reps, ref_logits = represent(reference)
    ref_pred = ref_logits.argmax(axis=1)
    n_classes = logits.shape[1]
    det = detect(reps, logits.argmax(axis=1), ref_reps, ref_pred, n_classes)
    result = TrafficResult(np.zeros(0, np.int64), None, det, len(traffic), tensor, len(reference))
    # a model that misreads its inputs (wrong --scale/--mean/--std/--input-layout) puts the traffic in one
    # class or at random: "no triggered inputs found" would then be a wrong all-clear (it was, exit 0, with
    # every input of a 98 %-ASR model's traffic in one class)
    chk = model_checks(ref_logits, reference_y, None, None, 0)
    if chk["warnings"]:
        how = (f"classifies only {chk['clean_accuracy']:.1%} of the clean reference images correctly (chance is "
               f"{chk['chance']:.1%})" if "clean_accuracy" in chk
               else f"predicts class {chk['clean_top_class']} for {chk['clean_top_share']:.0%} of the clean reference "
                    "images")
        result.warnings.append(f"the model {how}: the preprocessing (--scale/--mean/--std/--input-layout) or the "
                               "model is probably wrong, and the traffic cannot be read with it")
    cands = det.candidates()
    if target is not None:
        if not 0 <= target < n_classes:
            raise FireError(f"--target {target} is not a class of this model (it has {n_classes} outputs)")
        cands = [c for c in cands if c.cls == target]
        result.notes.append(f"only class {target} (--target) was considered")
    if len(cands) > MAX_CONFIRM:
        result.notes.append(f"{len(cands)} candidate classes; the {MAX_CONFIRM} most separated were confirmed")
        cands = cands[:MAX_CONFIRM]
    looks = look_shift(det, traffic, reference, ref_pred)  # records each class's look change either way
    shift = (global_shift(det) or looks) if target is None else None
    def reconstruct(images: np.ndarray, cls: int):
        """The trigger reconstruction of ``images`` as flagged inputs at ``cls`` (the class's clean images left out
        of those it stamps)."""
        return rc.reconstruct(images, clean, held, predict, flagged_pred=np.full(len(images), cls),
                              clean_excluded=None if clean_y is None else clean_y == cls,
                              held_excluded=None if held_y is None else held_y == cls)

    best, best_rec, best_r = None, None, None
    for ev in cands:
        idx = det.flagged[ev.cls]
        r = reconstruct(traffic[idx], ev.cls)
        rec = r.describe()
        ev.confirmation, ev.kind, ev.confirmed = float(rec.get("rate", 0.0)), rec.get("kind", ""), r.confirmed
        ctl = control_group(ref_pred, reference_y, ev.cls, len(idx)) if r.confirmed else np.zeros(0, np.int64)
        if len(ctl) >= MIN_FLAGGED:  # the control: the same reconstruction from the class's own clean images
            ev.n_control = int(len(ctl))
            ev.control = max((float(c.rate) for c in reconstruct(reference[ctl], ev.cls).candidates
                              if c.rate is not None), default=0.0)
            if ev.confirmation - ev.control < CONTROL_MARGIN:
                ev.confirmed, ev.refuted = False, "control"
        if ev.confirmed and shift and ev.confirmation < SHIFT_RATE:
            ev.confirmed, ev.refuted = False, "shift"
        say(f"unlabeled: class {ev.cls}: {ev.n_flagged} of {ev.n} inputs flagged, reconstruction "
            f"{ev.kind or 'none'} confirmed by {ev.confirmation:.0%}"
            + ("" if ev.control is None else f" (from {ev.n_control} of its clean images: {ev.control:.0%})"))
        if ev.confirmed and (best is None or (ev.confirmation, ev.separation or 0) > (best.confirmation,
                                                                                      best.separation or 0)):
            best, best_rec, best_r = ev, rec, r
    confirmed = [ev for ev in cands if ev.confirmed]
    by_control = [ev for ev in cands if ev.refuted == "control"]
    if by_control:
        names = ", ".join(f"{ev.cls} ({ev.confirmation:.0%} against {ev.control:.0%})" for ev in by_control)
        result.notes.append(f"not taken as triggered: the outlying group of class {names} (its reconstruction against "
                            f"the same reconstruction from as many of the class's clean images; at least "
                            f"{CONTROL_MARGIN:.0%} more is needed): what the class's own clean images also give is "
                            "the class's content, not a trigger")
    if by_shift := [ev for ev in cands if ev.refuted == "shift"]:
        result.notes.append("not taken as triggered under the traffic's global shift (below "
                            f"{SHIFT_RATE:.0%}): class " + ", ".join(f"{ev.cls} ({ev.confirmation:.0%})" for ev in by_shift))
    if shift:
        result.warnings.append(shift)
    if target is None and (strong := several(confirmed, shift)):
        result.several = strong  # several backdoors: fit --unlabeled stops (SeveralFound), --force fits the first
        best = None
    elif target is None and (why := ambiguous(confirmed)):
        result.warnings.append(why)
        best = None
    elif target is None and best is not None and len(confirmed) >= AMBIGUOUS:
        rest = [c for c in sorted(confirmed, key=lambda c: -(c.confirmation or 0)) if c is not best]
        others = ", ".join(f"{c.cls} ({c.confirmation:.0%})" for c in rest)
        result.warnings.append(f"class {best.cls} is taken as the target: its outlying group is confirmed by "
                               f"{best.confirmation:.0%}, apart from the other confirmed classes {others} (outlying "
                               "groups of the traffic itself, which clean traffic can show too); --target CLASS "
                               "chooses another. If the model may carry a second backdoor, "
                               + ("that class" if len(rest) == 1 else "one of those classes") + " may be its target: "
                               + " or ".join(f"'fire-onnx fit --unlabeled TRAFFIC ... --target {c.cls}'" for c in rest)
                               + " fits a repair of its own (then 'fire-onnx patch --add' it beside this one)")
    if not result.several:  # several backdoors stop fit with an error of their own
        result.unconfirmed = unconfirmed_groups(det, shift)
    if best is not None:
        result.target, result.indices, result.reconstruction = best.cls, det.flagged[best.cls], best_rec
        if best_r.winner.kind == "patch":
            extra = patch_carriers(traffic, det.pred == best.cls, best_r.winner, reference)
            new = np.setdiff1d(extra, result.indices)
            if len(new):
                result.indices = np.concatenate([result.indices, new])
            result.n_patch_added = int(len(new))
    return result


def unconfirmed_groups(det: Detection, shift: str | None = None) -> list[ClassEvidence]:
    """The candidate classes whose outlying group no trigger reconstruction confirmed (tried, not confirmed, not
    refuted) although it stands clear of the class's clean references: separation at least ``UNCONFIRMED_SEPARATION``
    and at most ``UNCONFIRMED_REFERENCE_ABOVE`` of the references above the cut; most separated first. None under a
    global or look shift (``shift``), which gives outlying groups of its own and is warned about already.

    New-user run 25: a 4x4 checkerboard at a random place per image (ASR 99.6 %) gave class 0 a group of 45 inputs,
    all 45 triggered, separation 17.2 and no clean reference above the cut; no patch, blend or additive trigger
    reproduces a moving sticker (confirmed 0 %), and fit said "no triggered inputs found ... nothing to repair", exit
    0, where --force on the same group left 5.6 % ASR. The bounds keep clean traffic quiet: the benchmark's clean-
    traffic controls (benchmarks/trigger_free/results.json, "unlabeled-clean-traffic") had candidates at separation
    2.5-3.7 with 9-22 % of the references above the cut, and the non-target candidates beside real finds 2.1-2.9 with
    10-24 %; the real targets there were at 3.0-53.9 and 0-11 % (so a weak real group, GTSRB Blended's 3.0, would not
    be reported by this rule if it went unconfirmed)."""
    if shift:
        return []
    return sorted((c for c in det.classes if c.candidate and c.confirmation is not None and not c.confirmed
                   and not c.refuted and (c.separation or 0.0) >= UNCONFIRMED_SEPARATION
                   and (c.reference_above or 0.0) <= UNCONFIRMED_REFERENCE_ABOVE),
                  key=lambda c: -(c.separation or 0.0))


def _group_text(c: ClassEvidence) -> str:
    """e.g. "class 0 (45 of its 152 inputs, separation 17.2, no clean reference image above the cut)"."""
    ref = ("no clean reference image above the cut" if not c.reference_above
           else f"{c.reference_above:.0%} of its clean reference images above the cut")
    return f"class {c.cls} ({c.n_flagged} of its {c.n} inputs, separation {c.separation or 0:.1f}, {ref})"


def unconfirmed_warning(result: TrafficResult, traffic: str = "TRAFFIC") -> str | None:
    """The warning on ``result.unconfirmed`` (other than a group --force fitted on), or None: where it is, what it may
    be, that it is not repaired, and how to fit on it. ``traffic``: the traffic file's name."""
    groups = [c for c in result.unconfirmed if not (result.forced and c.cls == result.target)]
    if not groups:
        return None
    one = len(groups) == 1
    what = (f"an outlying group in {_group_text(groups[0])}" if one else
            "outlying groups in " + " and ".join(_group_text(c) for c in groups))
    best = max(c.confirmation or 0.0 for c in groups)
    # --force takes the most separated group when no class is taken (force_pick); beside a target, --target picks it
    force = f"{'--force' if result.target is None else f'--target {groups[0].cls} --force'} fits on class " \
            f"{groups[0].cls}'s group, "
    return (f"{what} that no trigger model confirms (patch, blend and additive reconstructions: best {best:.0%}): a "
            "trigger these pixel models cannot express (a moving patch, a warp, a sample-specific trigger) or natural "
            f"outliers; not repaired. {'Its' if one else 'Their'} indices into {traffic} are in fit --json "
            f"(unlabeled.unconfirmed_groups); {force}or save those inputs as a flagged file (np.savez('flagged.npz', "
            f"x=np.load('{traffic}')['x'][indices])) and fit --triggered flagged.npz on them; then check the repair with "
            "eval on triggered inputs (new-user run 25: a sticker at a random place per image, 45 of 45 of the group "
            "triggered, 5.6 % ASR left by --force)")


def control_group(ref_pred: np.ndarray, reference_y: np.ndarray | None, cls: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``n`` clean reference images of class ``cls`` (predicted so, and labelled so when
    labels are known), seeded: the control group of the class's reconstruction."""
    ok = ref_pred == cls
    if reference_y is not None:
        ok &= np.asarray(reference_y) == cls
    idx = np.flatnonzero(ok)
    if len(idx) > n:
        idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
    return idx


PATCH_MATCH = 0.8  # an input carries a reconstructed patch when this share of its mask pixels match it
# ... unless more than this share of clean reference images carry it too (2.3 % of CIFAR-10's have a white corner)
PATCH_CLEAN_MAX = 0.05


def carries(x: np.ndarray, cand) -> np.ndarray:
    """(N,) bool: images whose pixels under a patch candidate's mask match its pattern (within
    ``reconstruct.PATCH_TOL`` on every channel, on at least ``PATCH_MATCH`` of the mask pixels)."""
    from fire_onnx.reconstruct import PATCH_TOL

    m = cand.mask[:, :, 0] > 0
    diff = np.abs(x[:, m, :].astype(np.float32) - cand.pattern[m][None])
    return (diff <= PATCH_TOL).all(axis=-1).mean(axis=1) >= PATCH_MATCH


def patch_carriers(traffic: np.ndarray, in_class: np.ndarray, cand, reference: np.ndarray) -> np.ndarray:
    """Indices of the traffic inputs of the target class that carry the confirmed patch; none when clean
    reference images carry it too (more than ``PATCH_CLEAN_MAX`` of them)."""
    if carries(reference, cand).mean() > PATCH_CLEAN_MAX:
        return np.zeros(0, np.int64)
    return np.flatnonzero(in_class & carries(traffic, cand))


def force_pick(result: TrafficResult) -> TrafficResult:
    """``--force`` after no class was taken as the target: take the flagged inputs of the confirmed class whose
    reconstruction was confirmed most often (several backdoors, or several classes none apart), else of the most
    separated strongly outlying group no reconstruction confirmed (:func:`unconfirmed_groups`: new-user run 25's moving
    sticker, where the candidate whose reconstruction came closest could have been a weak clean group), else of the
    candidate whose reconstruction came closest, else of the most separated class with flagged inputs. The note says
    which of these it was."""
    det = result.detection
    tried = [c for c in det.classes if c.confirmation is not None]
    confirmed = sorted((c for c in tried if c.confirmed), key=lambda c: -(c.confirmation or 0))
    pool = confirmed or list(result.unconfirmed) or sorted(tried, key=lambda c: -(c.confirmation or 0)) or sorted(
        (c for c in det.classes if c.n_flagged >= MIN_FLAGGED), key=lambda c: -(c.separation or 0))
    if not pool:
        raise FireError(f"{NOTHING_FOUND}, and no class has even {MIN_FLAGGED} outlying inputs to fit on: "
                        "--force has nothing to use")
    pick = result.several[0] if result.several else pool[0]
    result.target, result.indices, result.forced = pick.cls, det.flagged[pick.cls], True
    head = f"--force: fitted on the {len(result.indices)} flagged inputs of class {pick.cls}"
    if result.several:  # a warning: the other backdoors stay in the model
        others = " and ".join(f"'fire-onnx fit --unlabeled ... --target {c.cls}'" for c in result.several[1:])
        result.warnings.append(f"{head} although several classes were confirmed strongly "
                               f"({', '.join(rates(c) for c in result.several)}): several backdoors or triggers, of "
                               f"which this repairs one; fit the others with {others} and 'fire-onnx patch --add' "
                               "them")
        return result
    if confirmed:
        why = (f"although several classes were confirmed, none apart from the others "
               f"({', '.join(rates(c) for c in confirmed)})")
    elif pick.refuted == "control":
        why = (f"although its reconstruction, confirmed by {pick.confirmation:.0%}, is confirmed by "
               f"{pick.control:.0%} from the class's own clean images too (class content, not a trigger)")
    elif pick.refuted == "shift":
        why = (f"although its reconstruction, confirmed by {pick.confirmation:.0%}, stays under the {SHIFT_RATE:.0%} "
               "that the traffic's shift requires")
    elif pick in result.unconfirmed:
        why = (f"although no trigger model confirmed them: an outlying group in {_group_text(pick)}, which a trigger the "
               "pixel models cannot express (a moving patch, a warp) gives, and so can natural outliers")
    else:
        why = "although no reconstruction was confirmed"
    result.notes.append(f"{head} {why}")
    return result


def describe(rec: dict) -> str:
    """One line on what ``fit --unlabeled`` found (printed by ``fit``)."""
    tried = [c for c in rec.get("classes", []) if "confirmation" in c]
    tries = ", ".join(f"class {c['class']} {c['n_flagged']}/{c['n']} flagged, confirmed {c['confirmation']:.0%}"
                      + (f" (its clean images {c['control']:.0%})" if "control" in c else "")
                      for c in sorted(tried, key=lambda c: -c["confirmation"]))
    head = (f"unlabeled traffic: {rec['n_traffic']} inputs, {len([c for c in rec.get('classes', []) if 'cut' in c])} "
            f"classes scored at {rec.get('representation') or 'the classifier input'}")
    groups = rec.get("unconfirmed_groups") or []
    if not rec.get("found") and not rec.get("forced"):
        if groups:  # not "no triggered inputs found": new-user run 25's moving sticker was such a group, 45 of 45
            where = " and ".join(f"class {g['class']} ({g['n']} inputs, separation {g['separation']:.1f})" for g in groups)
            return (f"{head}; {NOTHING_CONFIRMED}, but {'an outlying group' if len(groups) == 1 else 'outlying groups'} "
                    f"in {where} that no trigger model confirms (see the warning; tried: {tries})")
        return f"{head}; {NOTHING_FOUND}" + (f" (tried: {tries})" if tries else " (no class had an outlying cluster)")
    if rec.get("forced"):
        picked = rec["target"]
        if rec.get("several"):
            what = f"classes {', '.join(str(c) for c in rec['several'])} confirmed (several backdoors or triggers)"
        elif any(g["class"] == picked for g in groups):
            what = f"an outlying group of class {picked} was found but no trigger model confirms it"
        else:
            what = f"the outlying group of class {picked} was found but not taken as triggered"
        return (f"{head}; {what}; --force: fitting on its {rec['n_found']} inputs anyway"
                if not rec.get("several") else
                f"{head}; {what}; --force: fitting on the {rec['n_found']} outlying inputs of class {picked} anyway"
                ) + (f" (tried: {tries})" if tries else "")
    added = rec.get("n_patch_added", 0)
    how = f" ({rec['n_found'] - added} outlying, {added} more carrying the patch)" if added else ""
    return (f"{head}; found {rec['n_found']} triggered inputs{how} predicted as class {rec['target']} (reconstruction "
            f"{rec.get('chosen_kind')} confirmed by {rec['chosen_confirmation']:.0%}; tried: {tries})")
