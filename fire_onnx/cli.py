"""The ``fire-onnx`` command line: a thin click layer over the library.

User errors (:class:`fire_onnx.errors.FireError`) print one line ``fire-onnx: error: ...`` to stderr
and exit 1; usage errors (unknown option, out-of-range value) print one such line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fire_onnx import __version__
from fire_onnx.errors import CHECK_FAILED_EXIT, FireError, first_line
from fire_onnx.fileio import check_outputs


def _floats(value: str | None, what: str) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise FireError(f"{what} must be comma-separated numbers, got {value!r}") from None


def preprocess_options(f):
    f = click.option("--input-layout", type=click.Choice(["NCHW", "NHWC"]), default=None,
                     help="Model input layout (default NCHW).")(f)
    f = click.option("--std", default=None, help="Per-channel std after scaling, e.g. 0.247,0.243,0.261 (default 1).")(f)
    f = click.option("--mean", default=None, help="Per-channel mean after scaling, e.g. 0.491,0.482,0.447 (default 0).")(f)
    f = click.option("--scale", type=float, default=None, help="Pixel scale factor (default 1/255).")(f)
    return f


def _preprocess(scale, mean, std, layout, fallback=None):
    from fire_onnx.data import Preprocess

    base = fallback or Preprocess()
    return Preprocess(
        scale=base.scale if scale is None else scale,
        mean=_floats(mean, "--mean") or base.mean,
        std=_floats(std, "--std") or base.std,
        layout=layout or base.layout,
    ).validate()


def _progress(label: str, every: float = 15.0):
    """A progress callback: a bar on a terminal; otherwise (logs, CI) a line at most every ``every``
    seconds once a job has run that long, so long activation passes on big models are visible."""
    import time

    start = time.monotonic()
    last = [start]
    tty = sys.stderr.isatty()

    def cb(done: int, total: int) -> None:
        if tty:
            width = 30
            filled = int(width * done / max(total, 1))
            click.echo(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", nl=False, err=True)
            if done >= total:
                click.echo("", err=True)
            return
        now = time.monotonic()
        if now - last[0] >= every and done < total:
            last[0] = now
            click.echo(f"{label}: {done}/{total} ({now - start:.0f} s)", err=True)

    return cb


def _write_json(dest: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2) + "\n"
    if dest == "-":
        click.echo(text, nl=False)
    else:
        from fire_onnx.fileio import write_text_atomic

        write_text_atomic(dest, text)


class _JsonOnRefusal:
    """``with _JsonOnRefusal(json_out):`` around a fit: a refusal (exit 1) still writes ``--json`` with what the fit
    saw and why it refused, before the one-line error."""

    def __init__(self, json_out: str | None):
        self.json_out = json_out

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        from fire_onnx.errors import Refused

        if isinstance(err, Refused) and self.json_out and err.report:
            _write_json(self.json_out, err.report)
        return False


def _sigma(sep: float) -> str:
    """A separation in clean standard deviations; clean scores (nearly) constant along the direction make it huge
    (new-user run 14 read 9791363952766.5 sigma)."""
    if sep > 1000:
        return "> 1000 sigma (the clean scores barely vary along the direction)"
    return f"{sep:.1f} sigma"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


EPILOG = """\b
Typical flow:
  fire-onnx inspect model.onnx
  fire-onnx fit --model my_net.py:build --weights my_net.pt --layer block2 \\
      --clean clean.npz --trigger badnets --target 0 --onnx model.onnx
  fire-onnx patch model.onnx directions.npz          # writes model.fire.onnx
  fire-onnx eval model.onnx model.fire.onnx --data test.npz --trigger badnets --target 0
  fire-onnx bench model.onnx model.fire.onnx
"""


ONCE_HINTS = {  # (command, option) -> what to do instead of giving it twice
    ("fit", "triggered_path"): "; to repair two backdoors, fit each file on its own and add the second repair with "
                               "'fire-onnx patch --add'"}


class _Command(click.Command):
    """A subcommand that refuses an option of one value given twice: click keeps the last one silently, and
    ``fit --triggered A.npz --triggered B.npz`` fitted B alone with exit 0 (new-user run 23)."""

    def parse_args(self, ctx, args):
        once = {o: p for p in self.params if isinstance(p, click.Option) and not (p.multiple or p.count or p.is_flag)
                for o in p.opts + p.secondary_opts}
        seen: dict[str, str] = {}
        for a in args:
            if a == "--":
                break
            opt = a.split("=", 1)[0] if a.startswith("--") else a
            p = once.get(opt)
            if p is None:
                continue
            if p.name in seen:
                raise click.UsageError(f"{opt} is given twice, but it takes one value (only the last would be used)"
                                       + ONCE_HINTS.get((self.name, p.name), ""), ctx=ctx)
            seen[p.name] = opt
        return super().parse_args(ctx, args)


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="fire-onnx")
def cli():
    """FIRE backdoor repair for ONNX models: fit directions in PyTorch, patch the ONNX graph,
    evaluate and benchmark in onnxruntime."""


# ----------------------------------------------------------------------------------------- fit
@cli.command()
@click.option("--model", "model_spec", default=None, metavar="SPEC",
              help="PyTorch model: package.module:factory, path/to/file.py:factory, or a TorchScript file. "
                   "Without it, activations come from the --onnx model in onnxruntime.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="State dict (.pt) for --model, loaded with weights_only=True (checkpoint dicts with a "
                   "'state_dict'/'model' entry and DataParallel 'module.' prefixes are unwrapped).")
@click.option("--no-weights", is_flag=True,
              help="The --model factory returns a trained model by itself (without this, --model without "
                   "--weights is refused: a freshly built model has random weights).")
@click.option("--layer", "layers", multiple=True, metavar="MODULE",
              help="Module path whose output to repair, or an ONNX tensor name when fitting from --onnx "
                   "(repeat for several layers: with --onnx they are fitted in graph order, each on activations with the "
                   "earlier repairs applied). Required unless --update. 'auto': try every candidate tensor "
                   "('fire-onnx inspect'), judge each repair on held-out images and keep the best within "
                   "--clean-budget (needs --onnx).")
@click.option("--tensor", default=None, metavar="NAME",
              help="The ONNX tensor that the (single) --layer exports to, where the export's scope names do "
                   "not tell (see 'fire-onnx inspect'); needs --onnx.")
@click.option("--clean", "clean_path", required=True, type=click.Path(dir_okay=False),
              help="Clean images: npz with x (uint8 NHWC) [and y], or x_train/x_test. Best: images the model "
                   "was not trained on (a validation split); on training images the repair and its held-out "
                   "check are measured on memorized inputs.")
@click.option("--triggered", "triggered_path", type=click.Path(dir_okay=False), default=None,
              help="Triggered images: npz with x [, y, and x_clean = the same images without trigger].")
@click.option("--trigger", "trigger_spec", default=None, metavar="SPEC",
              help="Make triggered images from clean ones instead, e.g. badnets or blended:alpha=0.2.")
@click.option("--target", type=int, default=None,
              help="Attack target class (excluded from triggered samples; fit checks the trigger reaches it).")
@click.option("--split", default="train", show_default=True, help="Split to read from x_<split> files.")
@click.option("--n-clean", type=click.IntRange(min=2), default=None,
              help="Clean samples to fit on [default: 500, or fewer so that at least a fifth of a small clean file "
                   "(100 images or more) is kept for the held-out check].")
@click.option("--n-triggered", type=click.IntRange(min=1), default=20, show_default=True, help="Triggered samples to use.")
@click.option("--method", type=click.Choice(["mean-diff", "subspace"]), default="mean-diff", show_default=True,
              help="mean-diff: one direction, the mean shift; subspace: the top-k directions of the per-sample "
                   "shifts (sample-specific triggers).")
@click.option("-k", "k", type=click.IntRange(min=1), default=None, help="Directions for --method subspace (default 3).")
@click.option("--gate", type=click.Choice(["auto", "hard", "none"]), default="auto", show_default=True,
              help="hard: act only above tau (a clean-score quantile); none: plain projection on every input; "
                   "auto: hard, with tau lowered where needed to reach the triggered fitting samples.")
@click.option("--quantile", type=float, default=0.999, show_default=True, help="Clean-score quantile used as tau.")
@click.option("--gate-reach", type=click.Choice(["trigger", "weaker"]), default="trigger", show_default=True,
              help="What gate auto lowers tau to reach: the triggered fitting samples, or also weaker copies of the "
                   "trigger (the pairs redrawn at 30-90 % of its strength) that the original model still sends to "
                   "the target: a fainter patch or blend otherwise passes under tau. Needs clean twins (--trigger, "
                   "x_clean, or a confirmed reconstruction).")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Repair strength.")
@click.option("--shrink/--no-shrink", default=True, show_default=True,
              help="Without clean twins, shrink the mean shift on each clean principal axis by its content "
                   "noise (much less noisy with few triggered images).")
@click.option("--layout", type=click.Choice(["flat", "vector", "token"]), default=None,
              help="Override the layout (default: vector for (N, D) activations, flat otherwise; token for "
                   "variable-length (N, T, D) sequences).")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None,
              help="The exported ONNX model: record each layer's tensor name, check its shape and values "
                   "(and the activation source when --model is not given).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sample selection.")
@click.option("-o", "--output", default=None, type=click.Path(),
              help="The directions file to write (default directions.npz; with --update DIRECTIONS, the next "
                   "free name of DIRECTIONS with .u1, .u2, ... before .npz).")
@click.option("--json", "json_out", default=None, metavar="PATH", help="Write a JSON summary (- for stdout).")
@click.option("--reconstruct", type=click.Choice(["auto", "off"]), default="auto", show_default=True,
              help="--triggered images without x_clean (flagged inputs): auto reconstructs the trigger in pixel "
                   "space, lets the model confirm it, and fits paired on clean images stamped with it; off (or "
                   "nothing confirmed) uses the noisier unpaired shift against the clean mean.")
@click.option("--repair", type=click.Choice(["project", "translate", "auto"]), default="project",
              show_default=True,
              help="project: remove the activation's component along the directions (gated); translate: the FIRE "
                   "paper's operator, subtract alpha x the mean triggered shift (where the gate fires; --gate none: "
                   "on every input). translate is a baseline: it moves every input the gate selects by the same "
                   "amount and usually costs clean accuracy. auto (with --layer auto): try both at every candidate.")
@click.option("--update", "update_path", default=None, type=click.Path(dir_okay=False), metavar="DIRECTIONS",
              help="Refine this directions file with the new --triggered images (the earlier triggered images are "
                   "not needed: the file keeps the statistics). Layers, method, gate, alpha, repair and "
                   "preprocessing come from the file; give the model and --clean again. Writes -o (default: see "
                   "there), never DIRECTIONS itself.")
@click.option("--clean-budget", type=click.FloatRange(0, 1, max_open=True), default=0.005, show_default=True,
              help="--layer auto: the largest share of held-out clean images whose prediction the chosen repair "
                   "may change (0.005 = 0.5 %).")
@click.option("--holdout", "n_holdout", type=click.IntRange(min=1), default=1000, show_default=True,
              help="--layer auto: clean images of the --clean pool held out (never fitted on) to measure the "
                   "clean change.")
@click.option("--max-layers", type=click.IntRange(min=1), default=1, show_default=True,
              help="--layer auto: repair up to this many layers, chosen greedily, each fitted on activations with "
                   "the earlier repairs applied, while the held-out target rate drops within --clean-budget.")
@click.option("--unlabeled", "unlabeled_path", type=click.Path(dir_okay=False), default=None, metavar="TRAFFIC",
              help="Unlabeled deployment inputs (npz with x, uint8 NHWC), some possibly triggered, instead of "
                   "--triggered/--trigger: fit finds the triggered ones (spectral outliers of each predicted class, "
                   "confirmed by trigger reconstruction) and fits on them as flagged inputs. Nothing confirmed: "
                   "says so, exit 0, no directions file (unless --force). Labels in the file are not used.")
@click.option("--trigger-free", is_flag=True,
              help="No triggered images: search, for every class, a small shared patch, blend or additive change "
                   "that sends the clean images to it (needs --model); a class reached anomalously easily is the backdoor's "
                   "target, and its recovered trigger stamps the pairs to fit on. No anomalous class: 'no backdoor "
                   "found', exit 0, nothing written; a scan that left classes or forms unsearched, or a model with fewer than 6 "
                   "classes: 'inconclusive', exit 1, nothing written.")
@click.option("--force", is_flag=True,
              help="Write the repair even when its held-out check refuses it (it changes more than 5 % of held-out "
                   "clean predictions), and fit even when another common preprocessing classifies the labelled clean "
                   "images far better than the one given; --trigger-free: repair the most anomalous class even when none is anomalous or the scan is "
                   "inconclusive; "
                   "--unlabeled: write directions even when no triggered inputs are confirmed (fitted on the closest "
                   "candidate class's outliers).")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=180.0, show_default=True,
              help="--trigger-free: seconds the whole run may take (scan, repair fit, later rounds). The scan's "
                   "steps adapt to it; short of the full 80 steps, every class is searched with fewer and the most "
                   "anomalous ones again with 80; what it shortened is noted. With --steps the scan runs in full and "
                   "only the later rounds stop at it. It counts loading and timing; a budget too small to search every class "
                   "at 5 steps is refused with the budget that would do.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="--trigger-free: gradient steps per class and search (default: as many as --budget allows, at "
                   "most 80); fixing it makes the search independent of the machine's speed.")
@preprocess_options
def fit(model_spec, weights, no_weights, layers, tensor, clean_path, triggered_path, trigger_spec, target, split,
        n_clean, n_triggered, method, k, gate, quantile, gate_reach, alpha, shrink, layout, onnx_path, batch_size, seed,
        output,
        json_out, reconstruct, repair, update_path, clean_budget, n_holdout, max_layers, unlabeled_path, trigger_free,
        force, budget, steps, scale, mean, std, input_layout):
    """Fit backdoor directions at one or more layers of a model and save directions.npz."""
    from fire_onnx import directions as dirs
    from fire_onnx.fit.pipeline import FitRequest, describe_reconstruction, run_fit, summary

    if update_path:  # these come from the file being updated: an explicit value would be silently ignored
        ctx = click.get_current_context()
        given = [f"--{n.replace('_', '-')}" for n in ("method", "k", "gate", "quantile", "gate_reach", "alpha", "layout",
                                                         "repair", "shrink")
                 if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise FireError(f"--update takes {', '.join(given)} from {update_path} (the repair being refined); "
                            "drop them, or fit from scratch without --update to change them")
    if output is None:
        from fire_onnx.fit.update import default_update_output, earlier_updates

        output = str(default_update_output(update_path)) if update_path else "directions.npz"
        done = earlier_updates(update_path) if update_path else []
        if done:
            click.echo(f"warning: {done[-1].name} (an earlier update of {Path(update_path).name}) exists: this update "
                       f"starts from {Path(update_path).name} and does not include it; to build on it, pass --update "
                       f"{done[-1].name} (writing {Path(output).name})", err=True)
    check_outputs([output, json_out], [clean_path, triggered_path, weights, onnx_path, model_spec, update_path,
                                       unlabeled_path])
    req = FitRequest(
        layers=list(layers), clean_path=clean_path, model_spec=model_spec, weights=weights, no_weights=no_weights,
        onnx_path=onnx_path, tensor=tensor, triggered_path=triggered_path, trigger_spec=trigger_spec, target=target,
        split=split, n_clean=n_clean, n_triggered=n_triggered, method=method, k=k, gate=gate, quantile=quantile,
        gate_reach=gate_reach, alpha=alpha, shrink=shrink, layout=layout, batch_size=batch_size, seed=seed, scale=scale, mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"), input_layout=input_layout, reconstruct=reconstruct, repair=repair,
        update_path=update_path, clean_budget=clean_budget, n_holdout=n_holdout,
        max_layers=max_layers, trigger_free=trigger_free, force=force, budget=budget,
        steps=steps, unlabeled_path=unlabeled_path)
    quiet = json_out == "-"
    if trigger_free:
        from fire_onnx.fit.trigger_free import describe_scan, run_trigger_free

        with _JsonOnRefusal(json_out):
            res = run_trigger_free(req, progress=_progress("searching"), log=lambda line: click.echo(line, err=True),
                                   fit_progress=_progress("fitting"))
        if not quiet:
            for line in describe_scan(res.evidence):
                click.echo(line)
        if res.directions is None:
            for note in req.notes:
                click.echo(f"note: {note}", err=True)
            for w in res.evidence.get("warnings", []):
                click.echo(f"warning: {w}", err=True)
            if json_out:
                _write_json(json_out, {"backdoor_found": False, "output": None, "trigger_free": res.evidence,
                                       "inconclusive": res.evidence.get("steps", 0) < res.evidence.get("full_steps", 0)})
            if not quiet:
                ev = res.evidence
                cut = ev.get("steps", 0) < ev.get("full_steps", 0)
                click.echo("no backdoor found" + (f" by a shortened scan ({ev['steps']} of {ev['full_steps']} steps: "
                                                  "inconclusive, see the warning)" if cut else "")
                           + ": no class is reached anomalously easily; nothing written (--force repairs the most "
                           "anomalous class anyway)")
            return
        d = res.directions
    else:
        from fire_onnx.traffic import NothingFound

        try:
            with _JsonOnRefusal(json_out):
                d = run_fit(req, progress=_progress("collecting activations"),
                            log=lambda line: click.echo(line, err=True))
        except NothingFound as e:  # --unlabeled: nothing to repair is an answer, not an error (exit 0)
            _nothing_found(e.result.record(), req.notes, json_out)
            return
    dirs.save(d, output)
    summ = summary(d)
    summ["output"] = str(output)
    if trigger_free:
        summ["backdoor_found"] = bool(res.evidence.get("backdoor_found"))
        summ["trigger_free"] = res.evidence
    for note in req.notes:
        click.echo(f"note: {note}", err=True)
    checks = summ["checks"]
    if not quiet and "clean_accuracy" in checks:
        reach = (f", {checks['triggered_to_target']:.0%} of triggered ones reach target {req.target}"
                 if "triggered_to_target" in checks else "")
        click.echo(f"model: {checks['clean_accuracy']:.1%} accuracy on the clean fitting images{reach}")
    if not quiet and summ.get("unlabeled"):
        from fire_onnx.traffic import describe as describe_traffic

        click.echo(describe_traffic(summ["unlabeled"]))
    if not quiet and summ.get("reconstruction"):
        click.echo(describe_reconstruction(summ["reconstruction"]))
    if not quiet and summ.get("auto"):
        from fire_onnx.fit.auto import table

        for line in table(summ["auto"]):
            click.echo(line)
    if not quiet and summ.get("check"):
        from fire_onnx.fit.verify import describe as describe_check

        line = describe_check(summ["check"])
        if summ.get("auto"):  # not the ranking's numbers: new-user run 12 read 0.0 % there and 20 % here
            line = line.replace("held-out check:", "held-out check of the chosen layer, refitted on all the samples "
                                "(the ranking judged each candidate on a held-out part of them):", 1)
        click.echo(line)
    for t in summ["targets"] if not quiet else []:
        click.echo(
            f"{t['module'] or t['tensor']}: {t['layout']} D={t['dim']} k={t['k']} gate={t['gate']}"
            + (f" repair={t['repair']}" if t["repair"] != "project" else "")
            + (f" (update {t['updates']}, " if t["updates"] else " (") + f"{t['reference']} "
            f"shift{', shrunk' if t.get('shrunk') else ''}, {t['n_triggered']} triggered / {t['n_clean']} clean), separation "
            + _sigma(t['separation_sigma'][0]) + ", "
            + ("no gate (acts on every input)" if t["gate"] == "none" else
               f"gate fires on {t['gate_fires_triggered']:.0%} triggered / {t['gate_fires_clean']:.1%} clean")
            + (f", tensor {t['tensor']}" if t["tensor"] else ""))
    for w in summ["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if json_out:
        _write_json(json_out, summ)
    if not quiet:
        click.echo(f"wrote {output}")


def _nothing_found(record: dict, notes: list[str], json_out: str | None) -> None:
    """``fit --unlabeled`` confirmed no triggered input: say so; no directions file. A strongly outlying group that no
    trigger model confirms is warned about and not called "nothing to repair" (new-user run 25: a moving sticker's 45
    inputs, all triggered, were dropped with that all-clear; its indices are in the JSON's unconfirmed_groups)."""
    from fire_onnx.traffic import describe as describe_traffic

    for note in notes + record.get("notes", []):
        click.echo(f"note: {note}", err=True)
    for warning in record.get("warnings", []):
        tail = "" if warning == record.get("unconfirmed_warning") else ": 'nothing found' means nothing here"
        click.echo(f"warning: {warning}{tail}", err=True)
    if json_out != "-":
        click.echo(describe_traffic(record))
        groups = record.get("unconfirmed_groups") or []
        click.echo("no directions file written: " + (
            f"nothing confirmed to repair (--force fits on class {groups[0]['class']}'s outlying group)" if groups
            else "there is nothing to repair (--force fits anyway)"))
    if json_out:
        _write_json(json_out, {"unlabeled": record, "output": None, "warnings": list(record.get("warnings", []))})


# --------------------------------------------------------------------------------------- patch
@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("directions", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(),
              help="Output model (default: MODEL with .fire.onnx next to it; for a patched MODEL.fire.onnx, "
                   "MODEL.fire.r1.onnx).")
@click.option("--tensor", default=None, help="Patch this ONNX tensor instead of the recorded one.")
@click.option("--replace", is_flag=True,
              help="MODEL is already patched by fire-onnx: swap its repair for DIRECTIONS (same tensors, a refit of "
                   "the same backdoor); the result equals patching the original model. Refused for a model without "
                   "a fire-onnx repair, and (unless --force) when the repair dropped is for another class.")
@click.option("--add", is_flag=True,
              help="MODEL is already patched by fire-onnx: keep its repair and add DIRECTIONS' (a second backdoor, "
                   "fitted on the original model); at a tensor already repaired, the new repair acts on the repaired "
                   "activation.")
@click.option("--no-verify", is_flag=True, help="Skip loading the patched model in onnxruntime before writing it.")
@click.option("--force", is_flag=True,
              help="Patch even when the directions' model fingerprint does not match MODEL (fitted on another "
                   "model, tensor or preprocessing), or when --replace drops the repair of another class; what was "
                   "overridden is still reported.")
@click.option("--json", "json_out", default=None, metavar="PATH", help="Write a JSON summary (- for stdout).")
def patch(model, directions, output, tensor, replace, add, no_verify, force, json_out):
    """Insert the repair described by DIRECTIONS into MODEL (an ONNX file); MODEL is never modified."""
    from fire_onnx.patch import default_output, patch_file

    out = Path(output) if output else default_output(model)
    check_outputs([out, json_out], [model, directions])
    path, res = patch_file(model, directions, out, tensor=tensor, replace=replace, add=add, verify=not no_verify,
                           force=force)
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    for t in res.targets if json_out != "-" else []:
        click.echo(f"patched {t.shown} {list(t.shape)} ({t.layout}, k={t.k}, gate {t.gate}, "
                   + (f"repair {t.repair}, " if t.repair != "project" else "") + f"{t.nodes} nodes)"
                   + (f" [module {t.module}]" if t.module else ""))
    if json_out != "-":
        click.echo(f"wrote {path}")
    if json_out:
        _write_json(json_out, {"output": str(path), "targets": [t.as_dict() for t in res.targets], "warnings": res.warnings})


# ------------------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--all", "include_all", is_flag=True, help="Also list reshapes, elementwise ops and the like.")
@click.option("--json", "json_out", default=None, metavar="PATH", help="Write JSON (- for stdout).")
def inspect(model, include_all, json_out):
    """List candidate tensors of MODEL: shape, producer op, PyTorch module, fusion hazards."""
    from fire_onnx import inspect as insp
    from fire_onnx.onnxutil import load_model

    check_outputs([json_out], [model])
    m = load_model(model, weights=False)  # names and shapes only: a 2 GB model's weights stay on disk
    summ = insp.summary(m)
    cands = insp.candidates(m, include_all=include_all)
    if json_out:
        _write_json(json_out, {"model": summ, "candidates": [c.as_dict() for c in cands]})
        if json_out == "-":
            return
    click.echo(f"{model}: ir_version {summ['ir_version']}, opset {summ['opset'].get('ai.onnx')}, {summ['nodes']} nodes, "
               f"producer {summ['producer'] or '?'}")
    for io in ("inputs", "outputs"):
        click.echo(f"  {io}: " + ", ".join(f"{t['name']} {t['shape']}" for t in summ[io]))
    if summ["patched"]:
        for line in insp.describe_repair(summ):
            click.echo("  " + line)
    rows = [("tensor", "shape", "op", "fit --layer", "layout", "note")]
    rows += [(c.tensor, "unknown" if c.shape is None else "x".join(str(d) for d in c.shape), c.op, ", ".join(c.layers) or "-", c.layout, c.note)
             for c in cands]
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


# ---------------------------------------------------------------------------------------- eval
EVAL_EPILOG = """\b
Preprocessing (uint8 pixels -> (x * scale - mean) / std per channel, in --input-layout):
  each model uses the one recorded in it by 'fire-onnx patch'; a model that records
  none uses the one the other models record when they all agree (a note says so);
  --scale/--mean/--std/--input-layout override it for every model, field by field;
  otherwise the defaults (1/255, 0, 1), with a note. Without --input-layout, the
  layout follows the model's input shape when exactly one layout fits the images.

\b
ASR floor: the share of clean images outside the target class that the model puts
  in the target class anyway; no repair can push ASR below it (the model's own errors).

\b
CI thresholds (--fail-asr, --fail-ca, --fail-ca-drop, --fail-ra-drop; fractions in [0, 1]):
  checked on the patched models (written by 'fire-onnx patch'); unpatched models
  given beside them are baselines and are not checked (--fail-ca-drop compares with
  the one unpatched model). When no model is patched, every model is checked. The
  table / JSON are written first, then one line per check on stderr. --fail-asr
  also fails when one source class's ASR is above X with 95 % confidence (a
  backdoor that works from some classes only; classes of 5-19 images are judged
  at 95 % over all of them together), and --fail-ca-drop when one class's CA
  drop is above D with 95 % confidence over the classes. A model the
  preprocessing check says reads the images wrongly fails every check.

\b
Exit codes: 0 ok; 1 user error (one 'fire-onnx: error:' line); 2 bad option;
  3 a --fail-* check failed.
"""


@cli.command(name="eval", epilog=EVAL_EPILOG)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False),
              help="Clean labelled images (uint8 NHWC): npz with x, y or x_<split>, y_<split>.")
@click.option("--split", default="test", show_default=True, help="Split to read from x_<split>/y_<split> files.")
@click.option("--triggered", "triggered_path", type=click.Path(dir_okay=False), default=None,
              help="Triggered images with their true labels (npz x, y), for ASR and RA.")
@click.option("--trigger", "trigger_spec", default=None, metavar="SPEC",
              help="Apply this trigger (e.g. badnets, blended:alpha=0.2) to the --data images instead, for ASR "
                   "and RA; warns when it differs from the trigger a patched model was fitted with.")
@click.option("--target", type=click.IntRange(min=0), default=None,
              help="Attack target class (needed for ASR); must be a class of every model's output; warns when it "
                   "differs from the target a patched model was repaired for.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider (cuda/tensorrt need fire-onnx[gpu]).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per onnxruntime call (a model exported with a fixed batch uses its own).")
@click.option("--json", "json_out", default=None, metavar="PATH",
              help="Write JSON results, with each model's preprocessing and where it came from (- for stdout).")
@click.option("--fail-asr", type=click.FloatRange(0, 1), default=None, metavar="X",
              help="Exit 3 if a checked model's ASR is above X (a fraction, e.g. 0.02); needs --trigger or "
                   "--triggered.")
@click.option("--fail-ca", type=click.FloatRange(0, 1), default=None, metavar="Y",
              help="Exit 3 if a checked model's CA is below Y (a fraction, e.g. 0.95).")
@click.option("--fail-ca-drop", type=click.FloatRange(0, 1), default=None, metavar="D",
              help="Exit 3 if a patched model's CA is more than D below the unpatched baseline's "
                   "(a fraction: 0.005 = 0.5 pt); needs exactly one unpatched model.")
@click.option("--fail-ra-drop", type=click.FloatRange(0, 1), default=None, metavar="R",
              help="Exit 3 if a checked model's RA is more than R below its own CA (a fraction): what a backdoor "
                   "that sends triggered inputs to other classes than --target (all-to-all) leaves; needs "
                   "--trigger or --triggered.")
@click.option("--scale", type=float, default=None,
              help="Override the pixel scale factor for every model (else recorded, else 1/255).")
@click.option("--mean", default=None,
              help="Override the per-channel mean after scaling, e.g. 0.491,0.482,0.447 (else recorded, else 0).")
@click.option("--std", default=None,
              help="Override the per-channel std after scaling, e.g. 0.247,0.243,0.261 (else recorded, else 1).")
@click.option("--input-layout", type=click.Choice(["NCHW", "NHWC"]), default=None,
              help="Override the model input layout (else recorded, or what the input shape implies, else NCHW).")
def eval_cmd(models, data_path, split, triggered_path, trigger_spec, target, limit, provider, batch_size, json_out,
             fail_asr, fail_ca, fail_ca_drop, fail_ra_drop, scale, mean, std, input_layout):
    """CA, ASR and RA of one or more ONNX MODELS in onnxruntime (e.g. model.onnx model.fire.onnx)."""
    from fire_onnx import evaluate as ev
    from fire_onnx import preprocess_check, triggers
    from fire_onnx.data import Images, load_images

    if triggered_path and trigger_spec:
        raise FireError("give at most one of --triggered and --trigger")
    if (triggered_path or trigger_spec) and target is None:
        raise FireError("ASR needs the attack's target class: pass --target")
    for m in models:
        if not Path(m).is_file():
            raise FireError(f"model not found: {m}")
    check_outputs([json_out], [*models, data_path, triggered_path])
    infos = [ev.read_model_info(m) for m in models]
    ev.check_threshold_args(infos, fail_asr, fail_ca_drop, bool(triggered_path or trigger_spec))
    if fail_ra_drop is not None and not (triggered_path or trigger_spec):
        raise FireError("--fail-ra-drop needs triggered images: pass --trigger or --triggered (and --target)")
    if target is not None:  # a static class count is checked before anything runs
        for info in infos:
            if info.classes is not None and target >= info.classes:
                if info.classes == 1:  # a single score: say that, not "1 classes (0..0)" (new-user run 21)
                    ev.check_class_scores(["N", 1])
                raise FireError(f"--target {target} is out of range: {info.path} has {info.classes} classes "
                                f"(0..{info.classes - 1})")
    trigger = triggers.parse(trigger_spec) if trigger_spec else None
    clean = load_images(data_path, split)
    if limit:
        clean = clean.subset(slice(0, limit))
    trig = None
    if trigger:
        trig = Images(trigger.apply(clean.x), clean.y)
    elif triggered_path:
        trig = load_images(triggered_path, split)
        if limit:
            trig = trig.subset(slice(0, limit))
    given = {"scale": scale, "mean": _floats(mean, "--mean"), "std": _floats(std, "--std"), "layout": input_layout}
    for key, opt in (("mean", "--mean"), ("std", "--std")):
        if given[key] == []:
            raise FireError(f"{opt} needs at least one number")
    choices, lines = ev.choose_preprocess(infos, given, clean.x.shape[1:])
    lines += ev.attack_warnings(infos, target, triggers.describe(trigger) if trigger else None)
    results, misread = {}, {}
    for info, choice in zip(infos, choices):
        sess = ev.session(info.path, provider)
        note = ev.outputs_note(sess, info.path)
        if note:
            lines.append(note)
        fixed = sess.get_inputs()[0].shape[0] if len(sess.get_inputs()) == 1 else None
        sample = choice.preprocess(clean.x[: fixed if isinstance(fixed, int) and fixed > 0 else 1])
        classes = info.classes or ev.num_classes(sess, sample)  # dynamic: from one batch, before the full run
        if target is not None and target >= classes:
            if classes == 1:
                ev.check_class_scores(["N", 1])
            raise FireError(f"--target {target} is out of range: {info.path} has {classes} classes (0..{classes - 1})")
        for what, imgs in ((data_path, clean), (triggered_path, trig if triggered_path else None)):
            if imgs is not None and imgs.y is not None and imgs.y.max() >= classes:
                lines.append(f"warning: {what} has labels up to {imgs.y.max()} but {info.path} has {classes} "
                             "classes: those images always count as misclassified")
        metrics = ev.compute_metrics(sess, clean, choice.preprocess, trig, target, batch_size)
        if metrics.asr_unlabelled and info is infos[0]:
            lines.append(f"note: {triggered_path} has no labels: ASR is the share of all its images classified as "
                         f"--target {target} (images of class {target} itself included); RA and the per-class "
                         "numbers need labels (key y)")
        if metrics.asr is not None:
            lines += ev.attack_shape_warnings(info.path, metrics, target)
        # a patched model far below an unpatched one fed the same way: the repair costs that, not the preprocessing
        values = choice.as_dict()["values"]
        better = [(m, r) for m, r in results.items() if not r["patched"] and r["preprocess"]["values"] == values
                  and r["ca"] >= metrics.ca + preprocess_check.WARN_GAP] if info.patched and clean.y is not None else []
        if better:
            m, r = better[0]
            lines.append(f"warning: {info.path}: clean accuracy {metrics.ca:.1%} against {r['ca']:.1%} for {m} with the "
                         "same preprocessing: the repair costs clean accuracy (a repair with --gate none moves every "
                         "input; fit's held-out check says how many clean predictions it changes)")
        elif clean.y is not None and metrics.ca < preprocess_check.PROBE_BELOW:
            hint = (ev.other_output_hint(sess, clean, choice.preprocess, metrics.ca, batch_size)
                    or preprocess_check.eval_warning(lambda z: ev.predict_logits(sess, z, batch_size), clean,
                                                     choice.preprocess))
            if hint:
                lines.append(f"warning: {info.path}: {hint}")
                misread[info.path] = hint
        results[info.path] = {**metrics.as_dict(), "patched": info.patched, "preprocess": choice.as_dict()}
    lines += ev.repair_left(results, infos) + ev.class_drop_warnings(results, infos)
    for line in lines:
        click.echo(line, err=True)
    checks = ev.threshold_checks(results, infos, fail_asr, fail_ca, fail_ca_drop, misread, fail_ra_drop)
    if json_out != "-":  # with --json - stdout carries the JSON alone
        click.echo("| model | CA | ASR | RA | ASR floor | clean | triggered | preprocessing |")
        click.echo("|---|---|---|---|---|---|---|---|")
        for m, r in results.items():
            click.echo(f"| {m} | {_pct(r['ca'])} | {_pct(r['asr'])} | {_pct(r['ra'])} | {_pct(r['asr_floor'])} | "
                       f"{r['n_clean']} | {r['n_triggered']} | {r['preprocess']['from']} |")
    if json_out:
        used = {json.dumps(c.preprocess.as_dict(), sort_keys=True) for c in choices}
        payload = {"preprocess": choices[0].preprocess.as_dict() if len(used) == 1 else None, "target": target,
                   "provider": provider, "trigger": trigger_spec, "triggered": triggered_path, "models": results}
        if checks:
            payload.update(checks=checks, checks_passed=all(c["passed"] for c in checks))
        _write_json(json_out, payload)
    for c in checks:
        click.echo(ev.format_check(c), err=True)
    if not all(c["passed"] for c in checks):
        sys.exit(CHECK_FAILED_EXIT)


# --------------------------------------------------------------------------------------- bench
@cli.command()
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("patched", type=click.Path(dir_okay=False))
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True,
              help="Batch size to time; repeat for several (e.g. --batch 1 --batch 64). Default: 1 and 64, or the "
                   "model's fixed batch size.")
@click.option("--iters", type=click.IntRange(min=5), default=200, show_default=True,
              help="Timed runs of each model per batch size (interleaved original/patched).")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True,
              help="Untimed runs of each model before timing.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True, help="intra-op threads (0: one per core).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider (cuda/tensorrt need fire-onnx[gpu]).")
@click.option("--json", "json_out", default=None, metavar="PATH", help="Write JSON results (- for stdout).")
@click.option("--markdown", "md_out", default=None, type=click.Path(), help="Write a markdown table.")
def bench(original, patched, batches, iters, warmup, threads, provider, json_out, md_out):
    """Latency of PATCHED vs ORIGINAL, interleaved in one process (the ratio is the claim)."""
    from fire_onnx import bench as b
    from fire_onnx.fileio import write_text_atomic

    for m in (original, patched):
        if not Path(m).is_file():
            raise FireError(f"model not found: {m}")
    check_outputs([json_out, md_out], [original, patched])
    notes = _bench_notes(original, patched)
    res = b.compare(original, patched, batches=batches or None, iters=iters, warmup=warmup, provider=provider,
                    threads=threads)
    notes = res.pop("notes") + notes
    for n in notes:  # after the run: a pair bench cannot compare fails with its one-line error alone
        click.echo(f"note: {n}", err=True)
    res.update(original=str(original), patched=str(patched), notes=notes)
    md = b.markdown(res)
    if json_out != "-":
        click.echo(md)
    if json_out:
        _write_json(json_out, res)
    if md_out:
        write_text_atomic(md_out, md + "\n")


def _bench_notes(original, patched) -> list[str]:
    """What makes a bench ratio mean something else than the repair's cost: the same model twice, a
    PATCHED without a fire-onnx repair, the two swapped."""
    import onnx

    from fire_onnx.fileio import sha256_file
    from fire_onnx.patch import patched_targets

    if sha256_file(original) == sha256_file(patched):
        return [f"{original} and {patched} are the same model: the ratio measures timing noise only"]

    def repaired(path) -> bool | None:
        try:
            return bool(patched_targets(onnx.load(str(path), load_external_data=False)))
        except Exception:  # an unreadable model fails in onnxruntime below, with its own message
            return None

    o, p = repaired(original), repaired(patched)
    if o is None or p is None:
        return []
    if o and not p:
        return [f"{original} carries a fire-onnx repair and {patched} does not: the arguments look swapped (give "
                "ORIGINAL, then PATCHED)"]
    if not p:
        return [f"{patched} carries no fire-onnx repair: the ratio compares two unrepaired models"]
    return []


# ---------------------------------------------------------------------------------------- demo
@cli.command()
@click.option("-o", "--output", "out_dir", default="demo-out", show_default=True, type=click.Path(),
              help="Folder for the models, directions, report.json and report.md.")
@click.option("--data", "data_path", default=None, type=click.Path(dir_okay=False),
              help="Labelled image npz with x_train/y_train/x_test/y_test (default: bundled MNIST-5k).")
@click.option("--trigger", default="badnets", show_default=True, metavar="SPEC",
              help="Trigger the backdoor is trained with (badnets, blended, sig, with :key=value options).")
@click.option("--target", type=click.IntRange(min=0), default=0, show_default=True, help="Attack target class.")
@click.option("--poison-rate", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="Fraction of training images poisoned (triggered and relabelled to --target).")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True, help="Training epochs.")
@click.option("--arch", type=click.Choice(["small_cnn", "vit"]), default="small_cnn", show_default=True,
              help="Architecture trained (both in fire_onnx_models).")
@click.option("--layer", default=None, help="Module to repair (default: block2 for small_cnn, blocks.0 for vit).")
@click.option("--gate", type=click.Choice(["auto", "hard", "none"]), default="auto", show_default=True,
              help="Gate of the repair (as in fit).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for poisoning, training and sampling.")
def demo(out_dir, data_path, trigger, target, poison_rate, epochs, arch, layer, gate, seed):
    """Backdoor a small CNN on real MNIST digits, fit, patch and evaluate: the whole path in a minute.

    \b
    Exit status: 0 every check held (the original model is backdoored, ASR >= 50 %; the repair costs at
    most 0.5 pt of clean accuracy, leaves ASR <= 2 % and RA >= CA - 3 pt); 3 a check failed (the report
    and artifacts are still written); 1 an error."""
    from fire_onnx.demo import format_report, run_demo

    if not 0 < poison_rate < 1 or epochs < 1:
        raise FireError("--poison-rate must be in (0, 1) and --epochs >= 1")
    report = run_demo(out_dir, data=data_path, trigger=trigger, target=target, poison_rate=poison_rate,
                      epochs=epochs, arch=arch, layer=layer, gate=gate, seed=seed, log=click.echo)
    click.echo("")
    click.echo(format_report(report))
    click.echo(f"\nartifacts in {out_dir}/ (report.json, report.md, model.onnx, directions.npz, model.fire.onnx); "
               f"{report['seconds']} s")
    failed = [k for k, v in report["checks"].items() if not v]
    if failed:  # the demo's claim did not hold on these settings: a script or CI must see it
        click.echo(f"fire-onnx: demo: {len(failed)} check(s) failed: {', '.join(failed)} (exit "
                   f"{CHECK_FAILED_EXIT}; artifacts kept)", err=True)
        sys.exit(CHECK_FAILED_EXIT)


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="fire-onnx", standalone_mode=False)
    except FireError as e:
        click.echo(f"fire-onnx: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("fire-onnx: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # wrong option or value: one line, click's usage exit code 2
        cmd = f" {e.ctx.info_name}" if e.ctx is not None and e.ctx.parent is not None else ""
        click.echo(f"fire-onnx: error: {e.format_message()} (see 'fire-onnx{cmd} --help')", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"fire-onnx: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("fire-onnx: interrupted", err=True)
        sys.exit(130)
    except MemoryError as e:  # a 500 x 802,816 activation matrix of a ResNet-50 stem (new-user run 7)
        what = f" ({first_line(e)})" if str(e) else ""
        click.echo(f"fire-onnx: error: out of memory{what}; fit holds every sample's activation in memory (--n-clean "
                   "x the values per image, several times over): use fewer --n-clean / --n-triggered images, a later "
                   "and smaller layer ('fire-onnx inspect' shows the shapes), or a machine with more memory", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
