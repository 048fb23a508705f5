"""The ``vizdeconv`` command line: parse options, call one library function, render, report.

Results go to stdout, progress and errors to stderr. Exit codes: 0 success, 1 when some input
files failed (the others are processed), 2 for usage errors (bad model, layer, option, weights).
"""

from __future__ import annotations

import functools
import json
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from vizdeconv import distributed, ops
from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.invariance import parse_amounts
from vizdeconv.jobs import no_progress, read_list
from vizdeconv.jobs.correspondence import CorrespondenceJob
from vizdeconv.jobs.deconv import DeconvJob
from vizdeconv.jobs.evolution import EvolutionJob
from vizdeconv.jobs.filters import FiltersJob
from vizdeconv.jobs.invariance import InvarianceJob
from vizdeconv.jobs.occlude import OcclusionJob
from vizdeconv.jobs.predict import PredictJob
from vizdeconv.jobs.project import ProjectJob
from vizdeconv.jobs.reconstruct import ReconstructJob
from vizdeconv.jobs.sparse import SparseFiltersJob, SparseInferJob, SparseTrainJob, TrainProgress
from vizdeconv.layers import trace_layers
from vizdeconv.models import EMBEDDED, LoadedModel, load_model
from vizdeconv.occlusion import Approximation
from vizdeconv.report import PAGE, write_report
from vizdeconv.sparse import METHODS, POOLINGS, Pool

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class UsageFailure(click.ClickException):
    """A library error the user can fix by changing the command: exit code 2."""

    exit_code = 2


def _floats(text: str | None) -> list[float] | None:
    return None if text is None else [float(v) for v in text.split(",")]


def _ints(text: str | None) -> list[int] | None:
    return None if text is None else [int(v) for v in text.split(",")]


def rule_option(command: Callable) -> Callable:
    return click.option("--rule", type=click.Choice(ops.RULES), default="deconvnet", show_default=True,
                        help="What rectifiers do on the way down: deconvnet relu(R), guided 1[f>0]·relu(R), "
                             "gradient (plain backprop).")(command)


def model_options(command: Callable) -> Callable:
    """The options every command shares, turned into a loaded ``model`` argument.

    Library errors (bad model, weights, layer, option) become one-line messages with exit code 2.
    """

    @click.option("--model", "model_name", default=EMBEDDED, show_default=True,
                  help="embedded, efficientnet_lite0, a torchvision model (alexnet, resnet50, …), timm:NAME or "
                       "package.module:factory.")
    @click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
                  help="State_dict file (.pt/.pth with weights_only, or .safetensors) instead of the defaults.")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
    @click.option("--input-size", help="Factory models: input H,W (or one side). Default 224.")
    @click.option("--mean", help="Factory models: per-channel mean, e.g. 0.485,0.456,0.406.")
    @click.option("--std", help="Factory models: per-channel std, e.g. 0.229,0.224,0.225.")
    @functools.wraps(command)
    def wrapper(model_name, weights, device, input_size, mean, std, **kwargs):
        try:
            sizes, means, stds = _ints(input_size), _floats(mean), _floats(std)
        except ValueError as error:
            raise UsageFailure(f"bad number in --input-size/--mean/--std: {error}") from None
        try:
            model = load_model(model_name, weights=weights, device=device, input_size=sizes, mean=means, std=stds)
            return command(model=model, **kwargs)
        except VizDeconvError as error:
            if not (distributed.current().main or isinstance(error, distributed.RankFailure)):
                raise SystemExit(UsageFailure.exit_code) from None  # rank 0 says what every rank met
            raise UsageFailure(str(error)) from None

    return wrapper


def batch_size_option(command: Callable) -> Callable:
    return click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
                        help="Images (occlude: square positions) per forward pass.")(command)


def layer_option(*, required: bool, extra: str = "") -> Callable:
    return click.option("--layer", "layer_spec", required=required,
                        help="Layer number (paper numbering), module name (layer3) or one call of a module (relu@2)."
                             + extra)


def out_option(command: Callable) -> Callable:
    return click.option("--out", "out_dir", default="vizdeconv-out", show_default=True,
                        type=click.Path(file_okay=False, path_type=Path),
                        help="Output folder; OUT/index.html shows everything in it.")(command)


class RateColumn(ProgressColumn):
    """Items per second."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "", style="progress.data.speed")


@contextlib.contextmanager
def progress_bars() -> Iterator[Callable[[str, int, int | None], None]]:
    """A job's ``progress(stage, done, total)`` drawn as one rich bar per stage on stderr (rank 0's under torchrun)."""
    if not distributed.current().main:
        yield no_progress
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bars:
        tasks = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def _note(text: str) -> None:
    """A remark on the input, on stderr."""
    err.print(f"[yellow]note:[/] {escape(text)}")


def _finish(done: int, failures: list[ImageError], what: str, out_dir: Path | None = None) -> None:
    """The failures and a summary line, then exit 1 if any file failed; under torchrun rank 0 does this for the job
    (the other ranks end with 0, so that torchrun does not stop rank 0 before it is done)."""
    if not distributed.current().main:
        return
    for failure in failures:
        err.print(f"[red]failed:[/] {escape(str(failure))}")
    err.print(f"{done} {what}, {len(failures)} failed" + (f"; browse {escape(str(out_dir / PAGE))}" if out_dir else ""))
    if failures:
        raise SystemExit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vizdeconv")
@click.pass_context
def main(context: click.Context) -> None:
    """See what a convnet has learned (Zeiler & Fergus 2014): deconvnet projections and more."""
    try:
        ranks = context.with_resource(distributed.from_environment())  # under torchrun: join its process group
    except VizDeconvError as error:
        raise UsageFailure(str(error)) from None
    out.quiet = err.quiet = not ranks.main  # under torchrun rank 0 speaks for the job; the others only work


def images_command(name: str) -> Callable:
    """A command that runs a model over image files and folders: the model options, ``--batch-size``, PATHS."""
    def decorate(command: Callable) -> Callable:
        command = click.argument("paths", nargs=-1, required=True)(command)
        return main.command(name)(model_options(batch_size_option(command)))
    return decorate


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def layers(model: LoadedModel, as_json: bool) -> None:
    """List every layer: module output, shape, receptive field, and how the deconvnet passes below it."""
    found = trace_layers(model)
    rows = found.describe()
    seen = {name for row in rows for name in row["below"]}
    if as_json:
        out.print_json(json.dumps({"model": model.name, "input_size": list(model.input_size),
                                   "chain_end": found.chain.end, "layers": rows,
                                   "ops": [row for row in ops.table() if row["op"] in seen]}))
        return
    table = Table(title=f"{model.name}: input {'×'.join(map(str, model.input_size))}; layer N = ReLU of conv N")
    for column in ("layer", "module", "type", "output", "RF size/stride", "path"):
        table.add_column(column, no_wrap=True)  # module names are what --layer takes: never cut them
    table.add_column("ops below", overflow="fold", min_width=12)
    previous = None
    for row in rows:
        below = ", ".join(row["below"]) + (f"; NO RULE: {row['unknown']}" if row["unknown"] else "")
        below, previous = ("″" if below == previous else below), below  # ditto: long nets repeat their ops
        field = "×".join(map(str, row["rf_size"])) + "/" + "×".join(map(str, row["rf_stride"]))
        table.add_row(str(row["layer"] or ""), escape(row["module"]), row["type"],
                      "×".join(map(str, row["output_shape"])), field, row["path"], escape(below))
    out.print(table)
    for op in ops.OPS:
        if op.name in seen:
            out.print(f"  {op.name}: {escape(op.down)}")
    out.print("  rectifier rules (--rule): " + escape("; ".join(f"{rule} = {text}" for rule, text in ops.RULE_TEXT.items())))
    err.print(f"numbered layers follow the plain chain of modules, which ends at {escape(found.chain.end)}; "
              "RF stride 0 = the unit sees the whole image")


@images_command("predict")
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1), help="Classes per image.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines for scripts.")
def predict(model: LoadedModel, paths: tuple[str, ...], batch_size: int, top: int, as_json: bool) -> None:
    """Top classes with probabilities for each image (files or folders)."""
    with progress_bars() as bars:
        done = PredictJob(model, top=top, batch_size=batch_size).run(paths, progress=bars)
    for prediction in done.predictions:
        if as_json:
            out.print_json(json.dumps(prediction.to_json()), indent=None)
        else:
            ranked = ", ".join(f"{escape(name)} {p:.3f}" for _, name, p in prediction.classes)
            out.print(f"{escape(str(prediction.image))}: {ranked}")
    _finish(len(done.predictions), done.failures, "images")


@images_command("deconv")
@layer_option(required=True)
@rule_option
@click.option("--channel", type=click.IntRange(min=0), help="Project this channel only.")
@click.option("--position", help="Y,X in the layer's map: project the activation there.")
@click.option("--top", default=1, show_default=True, type=click.IntRange(min=1),
              help="Project the strongest activation of this many strongest channels.")
@out_option
def deconv(model: LoadedModel, paths: tuple[str, ...], batch_size: int, layer_spec: str, rule: str,
           channel: int | None, position: str | None, top: int, out_dir: Path) -> None:
    """Project each image's strongest activations at a layer back to pixels (into OUT/deconv)."""
    try:
        where = tuple(_ints(position)) if position else None
    except ValueError:
        raise UsageFailure(f"--position expects Y,X, got {position!r}") from None
    if where is not None and len(where) != 2:
        raise UsageFailure(f"--position expects Y,X, got {position!r}")
    job = DeconvJob(model, layer_spec, rule=rule, top=top, channel=channel, position=where, out=out_dir,
                    batch_size=batch_size)
    with progress_bars() as bars:
        done = job.run(paths, progress=bars)
    for result in done.results:
        out.print(f"{escape(str(result.image))} → {escape(str(result.figure))}")
    _finish(len(done.results), done.failures, "images projected", out_dir)


@main.command("project")
@model_options
@batch_size_option
@click.option("--layer", "layer_spec", required=True,
              help="Layer number (paper numbering), module name (layer3) or one call of a module (relu@2); "
                   "several in one pass: 1-5 or 1,3,layer4.")
@rule_option
@click.option("--images", "folders", multiple=True, help="Image folder or file (repeatable). Default for the "
              "embedded model: its shipped Fashion-MNIST samples.")
@click.option("--images-from", "lists", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A text file of image paths, one per line (relative ones from the file's folder; # comments).")
@click.option("--top", default=9, show_default=True, type=click.IntRange(min=1), help="Activations per channel.")
@click.option("--channels", "channel_spec", default="all", show_default=True, help="all, or e.g. 0-15,32.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Processes decoding images during the scan.")
@click.option("--decode", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="gpu: decode JPEGs in batches on the model's device (other files on the CPU).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), metavar="IMAGES",
              help="Save the scan's state every this many images [default: every 3 minutes].")
@click.option("--restart", is_flag=True, help="Discard an interrupted scan's checkpoints and scan from the start.")
@out_option
def project_command(model: LoadedModel, batch_size: int, layer_spec: str, rule: str, folders: tuple[str, ...],
                    lists: tuple[Path, ...], top: int, channel_spec: str, workers: int, decode: str,
                    checkpoint_every: int | None, restart: bool, out_dir: Path) -> None:
    """Top-k grids (paper Fig. 2): each channel's strongest activations over a folder, projected.

    Resumes an interrupted scan; under torchrun the ranks share the work (see the README).
    """
    job = ProjectJob(model, layer_spec, k=top, channels=channel_spec, rule=rule, out=out_dir, batch_size=batch_size,
                     workers=workers, decode=decode, checkpoint_every=checkpoint_every, restart=restart)
    paths = [*folders, *(path for listed in lists for path in read_list(listed))]
    with progress_bars() as bars:
        reports = job.run(paths, progress=bars)
    for done, channels in zip(reports, job.channels):
        shown = sum(1 for channel_hits in done.hits.values() if channel_hits)
        out.print(f"{escape(done.layer.label)}: {shown} of {len(channels)} channels fired, top {top} over "
             f"{done.scanned} images → {escape(str(done.folder))}/ (ch*.png, overview.png, index.json)")
    _finish(reports[0].scanned, reports[0].failures, "images scanned", out_dir)


@images_command("occlude")
@click.option("--size", type=click.IntRange(min=1), help="Square side in input pixels [default: 50 at 224², scaled].")
@click.option("--stride", type=click.IntRange(min=1), help="Square step in input pixels [default: 8 at 224², scaled].")
@click.option("--fill", default="mean", show_default=True,
              help="mean (zero after normalisation) or a pixel value in 0..1, e.g. 0.5.")
@click.option("--target", default="auto", show_default=True, help="Class index or name; auto = top-1 unoccluded.")
@layer_option(required=False, extra=" [default: the last conv layer, or the last module output of a graph]")
@rule_option
@click.option("--brute-force", is_flag=True, help="One full forward pass per position instead of incremental.")
@click.option("--approximate", is_flag=False, flag_value="default", metavar="[tau=T,factor=F,share=S]",
              help="Faster, inexact maps, labelled as such: projective-field threshold tau and adaptive drill-down "
                   "(coarse step factor, share of blocks drilled into) [default: tau=0.75,factor=4,share=0.25].")
@out_option
def occlude_command(model: LoadedModel, paths: tuple[str, ...], batch_size: int, size: int | None,
                    stride: int | None, fill: str, target: str, layer_spec: str | None, rule: str,
                    brute_force: bool, approximate: str | None, out_dir: Path) -> None:
    """Occlusion maps (paper Fig. 7) into OUT/occlusion: p(target), top class and a feature map's total per square."""
    job = OcclusionJob(model, layer_spec, size=size, stride=stride, fill=fill, target=target, rule=rule,
                       approximate=Approximation.parse(approximate) if approximate else None,
                       brute_force=brute_force, out=out_dir, batch_size=batch_size)
    if job.not_incremental:
        _note(f"exact incremental inference is not possible ({job.not_incremental}); using brute force")
    with progress_bars() as bars:
        done = job.run(paths, progress=bars)
    resumed = sum(result.resumed for result in done.results)
    if resumed:
        err.print(f"{resumed} images already done in {escape(str(done.folder))}, skipped")
    for result, row in zip(done.results, done.rows):
        if result.resumed:
            continue
        out.print(f"{escape(str(result.image))}: {escape(row['target_name'])} p={float(row['prob_clean']):.3f}, lowest "
             f"{float(row['prob_min']):.3f} with the square at ({row['prob_min_y']}, {row['prob_min_x']})"
             + (f", often {escape(row['other_name'])}" if row["other_name"] else ""))
    _finish(len(done.results), done.failures, f"images with occlusion maps in {escape(str(done.folder))}", out_dir)


@main.command("filters")
@model_options
@batch_size_option
@click.option("--layer", "layer_spec", default="1", show_default=True,
              help="Layer number (its conv's filters) or a Conv2d module name.")
@click.option("--images", "folders", multiple=True,
              help="Image folder or file (repeatable): also how often each filter fires; one that never does is dead.")
@out_option
def filters_command(model: LoadedModel, batch_size: int, layer_spec: str, folders: tuple[str, ...],
                    out_dir: Path) -> None:
    """Filter sheet and diagnostics (paper Fig. 6): dead filters, frequency bands, aliasing, RMS (into OUT/filters)."""
    job = FiltersJob(model, layer_spec, out=out_dir, batch_size=batch_size)
    with progress_bars() as bars:
        done = job.run(folders, progress=bars)
    out.print(f"{escape(done.layer.label)}: {escape(FiltersJob.caption(done.summary))} → {escape(str(done.figure))}, "
         f"{escape(done.data.name)}")
    if folders:
        _finish(done.summary["images"], done.failures, "images measured", out_dir)


@main.command("evolution")
@model_options
@batch_size_option
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=Path))
@click.option("--layer", "layer_spec", help="Layer number, module name, or several: 1-5, 1,3 "
              "[default: every numbered layer].")
@click.option("--channels", "channel_spec", help="Channels to follow, e.g. 0-7,12 [default: the first 8].")
@rule_option
@click.option("--images", "folders", multiple=True, help="Image folder or file (repeatable). Default for the "
              "embedded model: its shipped Fashion-MNIST samples.")
@out_option
def evolution_command(model: LoadedModel, batch_size: int, checkpoints: tuple[Path, ...], layer_spec: str | None,
                      channel_spec: str | None, rule: str, folders: tuple[str, ...], out_dir: Path) -> None:
    """Features forming over training (paper Fig. 4): each channel's strongest activation, projected, per checkpoint.

    CHECKPOINTS are weights files in order, or folders of them (sorted naturally: epoch2 before
    epoch10); default for the embedded model: its shipped epochs 1, 2, 5, 10 and 25.
    """
    job = EvolutionJob(model, checkpoints, layer_spec, channels=channel_spec, rule=rule, out=out_dir,
                       batch_size=batch_size)
    with progress_bars() as bars:
        reports = job.run(folders, progress=bars)
    for done in reports:
        out.print(f"{escape(done.layer.label)}: {len(done.projections)} channels at {len(done.checkpoints)} checkpoints "
             f"({escape(', '.join(done.checkpoints))}) → {escape(str(done.figure))}")
    _finish(reports[0].scanned, reports[0].failures, "images scanned", out_dir)


@images_command("invariance")
@click.option("--layers", "layer_spec", default="1,fc", show_default=True,
              help="Layer numbers, module names, and fc (the input of the last nn.Linear: the paper's layer 7).")
@click.option("--transform", "transforms", default="translate,scale,rotate", show_default=True,
              help="Transformations, in row order (the README defines each and its default amounts).")
@click.option("--amounts", "amount_specs", multiple=True, metavar="TRANSFORM=START:STOP:STEP",
              help="Amounts of one transformation instead of its defaults, e.g. rotate=0:90:15 or "
                   "scale=0.5,1,2 (repeatable).")
@click.option("--target", "targets", multiple=True,
              help="True class (index or name) for every image, or IMAGE=CLASS for one (repeatable) "
                   "[default: the top-1 class of the untransformed image].")
@out_option
def invariance_command(model: LoadedModel, paths: tuple[str, ...], batch_size: int, layer_spec: str,
                       transforms: str, amount_specs: tuple[str, ...], targets: tuple[str, ...], out_dir: Path) -> None:
    """Feature distances and p(true class) under translation, scaling and rotation (paper Fig. 5), into OUT/invariance."""
    job = InvarianceJob(model, layer_spec, transforms=[t.strip() for t in transforms.split(",") if t.strip()],
                        amounts=dict(map(parse_amounts, amount_specs)), targets=targets, out=out_dir,
                        batch_size=batch_size)
    with progress_bars() as bars:
        done = job.run(paths, progress=bars)
    if done.figure:
        for transform, amounts in done.amounts.items():
            out.print(f"{transform}: {len(amounts)} amounts, {amounts[0]:g} to {amounts[-1]:g}; mean p(true class) "
                 f"{done.p_true[transform].mean():.3f}, lowest {done.p_true[transform].min():.3f}")
        out.print(f"→ {escape(str(done.figure))}, {escape(done.table.name)}")
    _finish(len(done.images), done.failures, "images measured", out_dir)


@images_command("correspondence")
@click.option("--parts", "parts_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help='JSON: {"image.jpg": {"part": [y0, x0, y1, x1], ...}, ...} in pixels of the original files.')
@click.option("--layers", "layer_spec", default="5,fc", show_default=True,
              help="Layer numbers, module names, and fc (the input of the last nn.Linear: the paper's layer 7).")
@click.option("--random", "repeats", default=10, show_default=True, type=click.IntRange(min=1),
              help="Repeats of the random control (each part's box at random places).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random control.")
@out_option
def correspondence_command(model: LoadedModel, paths: tuple[str, ...], batch_size: int, parts_file: Path,
                           layer_spec: str, repeats: int, seed: int, out_dir: Path) -> None:
    """Do layers change the same way when the same part is masked in each image? (paper Table 1), into OUT/correspondence."""
    job = CorrespondenceJob(model, parts_file, layer_spec, random=repeats, seed=seed, out=out_dir,
                            batch_size=batch_size)
    with progress_bars() as bars:
        done = job.run(paths, progress=bars)
    for note in done.notes:
        _note(note)
    table = Table("part", *(layer.label for layer in done.layers), title="mean sign change Δ ± std (lower: more consistent)")
    for part in done.parts:
        table.add_row(escape(part), *(f"{done.table[part, layer.name][0]:.3f} ± {done.table[part, layer.name][1]:.3f}"
                                      for layer in done.layers))
    out.print(table)
    out.print(f"→ {escape(str(done.csv))}, {escape(done.figure.name)}")
    _finish(len(done.images), done.failures, "images compared", out_dir)


@images_command("reconstruct")
@click.option("--layer", "layer_spec", default="all", show_default=True,
              help="Layer number, module name, several (1,3 or 2-4), or all (every numbered layer).")
@click.option("--switches", default="known,fixed", show_default=True,
              help="known (recorded on the image), fixed (top-left of each pooling window), or both.")
@out_option
def reconstruct_command(model: LoadedModel, paths: tuple[str, ...], batch_size: int, layer_spec: str, switches: str,
                        out_dir: Path) -> None:
    """Each image from whole layers, down the deconvnet with known and fixed switches (Zhang et al. 2016), into OUT/reconstruct."""
    job = ReconstructJob(model, layer_spec, switches=[s.strip() for s in switches.split(",") if s.strip()],
                         out=out_dir, batch_size=batch_size)
    for note in job.notes:
        _note(note)
    with progress_bars() as bars:
        done = job.run(paths, progress=bars)
    means = done.means()
    table = Table("layer", *(f"{s} r / SSIM" for s in job.switches), title="mean similarity to the input")
    for layer in dict.fromkeys(layer for layer, _ in means):
        table.add_row(escape(layer), *(f"{means[layer, s][0]:.3f} / {means[layer, s][1]:.3f}" for s in job.switches))
    if means:
        out.print(table)
    _finish(len({s.image for s in done.similarities}), done.failures,
            f"images reconstructed into {escape(str(done.folder))}", out_dir)


@main.group("sparse")
def sparse_group() -> None:
    """Deconvolutional networks (Zeiler et al. 2010/2011): convolutional sparse coding, learned without labels."""


SPARSE_MAPS = (16, 48, 96, 192)


def sparse_model_option(command: Callable) -> Callable:
    return click.option("--model", "model_file", default="embedded", show_default=True,
                        help="A model file from vizdeconv sparse train, or embedded (trained on Fashion-MNIST).")(command)


def usage_errors(command: Callable) -> Callable:
    """Library errors anywhere in the command (bad model file, option, settings) become one-line usage errors
    (exit 2); the jobs report bad input files themselves."""

    @functools.wraps(command)
    def wrapper(**kwargs):
        try:
            return command(**kwargs)
        except VizDeconvError as error:
            raise UsageFailure(str(error)) from None

    return wrapper


@sparse_group.command("train")
@click.option("--images", "folders", multiple=True, required=True, help="Image folder or file (repeatable).")
@click.option("--layers", default=2, show_default=True, type=click.IntRange(min=1), help="Layers to learn.")
@click.option("--maps", help="Feature maps per layer [default: the first --layers of 16,48,96,192].")
@click.option("--kernel", default=7, show_default=True, type=click.IntRange(min=1), help="Filter side.")
@click.option("--lam", default="5", show_default=True, help="λ, weight of the reconstruction term: one, or one per layer.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1), help="Passes per layer.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="FISTA steps of each batch's inference.")
@click.option("--pool", "pool_spec", default="2,2", show_default=True,
              help="3D max pooling between layers: MAPS,SIZE (neighbouring maps, spatial side).")
@click.option("--nonnegative", is_flag=True, help="Keep the codes ≥ 0.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per filter update.")
@click.option("--seed", default=0, show_default=True, type=int, help="Initial filters and image order.")
@click.option("--restart", is_flag=True, help="Discard another training run in --out and start afresh.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--out", "model_out", default="sparse-model.safetensors", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The model file, written after every epoch; rerun to go on from it.")
@usage_errors
def sparse_train(folders: tuple[str, ...], layers: int, maps: str, kernel: int, lam: str, epochs: int, steps: int,
                 pool_spec: str, nonnegative: bool, batch_size: int, seed: int, restart: bool, device: str,
                 model_out: Path) -> None:
    """Learn the filters layer by layer: infer sparse codes (FISTA), least squares on the filters, unit norm."""
    try:
        counts = _ints(maps) if maps else list(SPARSE_MAPS[:layers])
        lams, pool = _floats(lam), _ints(pool_spec)
    except ValueError:
        raise UsageFailure(f"--maps, --lam and --pool take comma-separated numbers, got {maps!r}, {lam!r}, "
                           f"{pool_spec!r}") from None
    if len(pool) != 2:
        raise UsageFailure(f"--pool takes MAPS,SIZE (two numbers), got {pool_spec!r}")
    if len(counts) != layers:
        raise UsageFailure(f"--maps gives {len(counts)} layers, --layers {layers}: give one count per layer")
    lams = lams * layers if len(lams) == 1 else lams
    job = SparseTrainJob(model_out, maps=counts, kernel=kernel, lams=lams, epochs=epochs, steps=steps,
                         batch_size=batch_size, pool=Pool(*pool), nonnegative=nonnegative, seed=seed, restart=restart,
                         device=device)
    with Progress(TextColumn("layer {task.fields[layer]} epoch {task.fields[epoch]}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("{task.fields[cost]}"), TimeRemainingColumn(),
                  console=err, transient=True) as bars:
        task = bars.add_task("training", total=None, layer="", epoch="", cost="")

        def show(step: TrainProgress) -> None:
            cost = (f"cost {step.cost.cost:.2f} = fit {step.cost.fit:.2f} + |z| {step.cost.penalty:.2f}"
                    if step.cost else "")
            bars.update(task, completed=step.batch, total=step.batches, layer=step.layer,
                        epoch=f"{step.epoch}/{step.epochs}", cost=cost)

        done = job.run(folders, progress=show)
    if not done.epochs_run:
        _note(f"{done.model} is already trained with these settings: nothing to do (--restart trains afresh)")
    elif done.resumed_from:
        _note(f"went on from {done.model}: layer {done.resumed_from[0]}, {done.resumed_from[1]} epochs done")
    for layer, cost in enumerate(done.costs):
        out.print(f"layer {layer + 1}: cost {cost['cost']:.3f} per image = fit {cost['fit']:.3f} + |z| "
                  f"{cost['penalty']:.3f} (last epoch's mean)")
    out.print(f"→ {escape(str(done.model))}")
    _finish(done.images, done.failures, "images learned from")


@sparse_group.command("infer")
@click.argument("paths", nargs=-1, required=True)
@sparse_model_option
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="ISTA/FISTA steps per layer.")
@click.option("--method", type=click.Choice(METHODS), default="fista", show_default=True)
@click.option("--pooling", type=click.Choice(POOLINGS), default="max", show_default=True,
              help="max: switches; gaussian: a 2D Gaussian per region, moved by the image's error.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Images inferred together.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@out_option
@usage_errors
def sparse_infer(paths: tuple[str, ...], model_file: str, steps: int, method: str, pooling: str, batch_size: int,
                 device: str, out_dir: Path) -> None:
    """Each image's sparse codes at every layer, its reconstructions and projections (into OUT/sparse/<image>)."""
    job = SparseInferJob(model_file, steps=steps, method=method, pooling=pooling, out=out_dir, batch_size=batch_size,
                         device=device)
    with progress_bars() as bars:
        done = job.run(paths, progress=bars)
    for result in done.results:
        layers = ", ".join(f"layer {l + 1} {p:.1f} dB, {z:.0%} zero" for l, (p, z) in
                           enumerate(zip(result.psnr, result.sparsity)))
        out.print(f"{escape(str(result.image))}: {layers} → {escape(str(result.figure))}")
    _finish(len(done.results), done.failures, "images coded", out_dir)


@sparse_group.command("filters")
@sparse_model_option
@out_option
@usage_errors
def sparse_filters(model_file: str, out_dir: Path) -> None:
    """The filter sheets: layer 1's filters, higher layers' projected to pixels (into OUT/sparse/filters.png)."""
    done = SparseFiltersJob(model_file, out=out_dir).run()
    out.print(f"{', '.join(f'layer {l + 1}: {c} filters' for l, c in enumerate(done.counts))} → "
              f"{escape(str(done.figure))}")


@main.command("report")
@click.argument("out_dir", default="vizdeconv-out", type=click.Path(file_okay=False, exists=True, path_type=Path))
def report_command(out_dir: Path) -> None:
    """Rebuild OUT/index.html over every result in OUT (default vizdeconv-out)."""
    page = write_report(out_dir)
    out.print(f"{escape(str(page))}: open it in a browser (no server needed)")
