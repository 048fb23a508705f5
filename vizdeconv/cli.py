"""The ``vizdeconv`` command line: parse options, call one library function, render, report.

Results go to stdout, progress and errors to stderr. Exit codes: 0 success, 1 when some input
files failed (the others are processed), 2 for usage errors (bad model, layer, option, weights).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
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

from vizdeconv import occlusion_report, report
from vizdeconv import ops
from vizdeconv.deconv import Deconvnet
from vizdeconv.embedded import sample_folder
from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.images import find_images
from vizdeconv.incremental import unsupported
from vizdeconv.layers import trace_layers
from vizdeconv.models import EMBEDDED, LoadedModel, load_model
from vizdeconv.occlusion import default_geometry, fill_values, is_same_run
from vizdeconv.outputs import output_names
from vizdeconv.predict import predict_files
from vizdeconv.projections import project_files, save_image_projections
from vizdeconv.topk import TopK, hits, parse_channels, project_hits, scan

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
    @click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
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
            raise UsageFailure(str(error)) from None

    return wrapper


class RateColumn(ProgressColumn):
    """Items per second."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "", style="progress.data.speed")


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeRemainingColumn(), console=err, transient=True)


def _inputs(paths: Iterable[str]) -> tuple[list[Path], list[ImageError]]:
    images, missing = find_images(paths)
    failures = [ImageError(path, reason) for path, reason in missing]
    if not images and not failures:
        raise UsageFailure("no image files found in " + ", ".join(paths))
    return images, failures


def _finish(done: int, failures: list[ImageError], what: str) -> None:
    for failure in failures:
        err.print(f"[red]failed:[/] {escape(str(failure))}")
    err.print(f"{done} {what}, {len(failures)} failed")
    if failures:
        raise SystemExit(1)


def _track(items: Iterator, total: int, description: str, failures: list[ImageError]) -> Iterator:
    """Advance a progress bar per image; collect failures for the summary."""
    with progress() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            if isinstance(item, ImageError):
                failures.append(item)
            else:
                yield item
            bar.advance(task)


def _advancing(items: Iterable, bar: Progress, task) -> Iterator:
    """Pass items through, advancing the bar by one for each."""
    for item in items:
        yield item
        bar.advance(task)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vizdeconv")
def main() -> None:
    """See what a convnet has learned (Zeiler & Fergus 2014): deconvnet projections and more."""


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def layers(model: LoadedModel, batch_size: int, as_json: bool) -> None:
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


@main.command()
@model_options
@click.argument("paths", nargs=-1, required=True)
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1), help="Classes per image.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines for scripts.")
def predict(model: LoadedModel, paths: tuple[str, ...], batch_size: int, top: int, as_json: bool) -> None:
    """Top classes with probabilities for each image (files or folders)."""
    images, failures = _inputs(paths)
    count = 0
    for prediction in _track(predict_files(model, images, top=top, batch_size=batch_size), len(images),
                             "predicting", failures):
        count += 1
        if as_json:
            out.print_json(json.dumps({"image": str(prediction.path), "classes": [
                {"index": i, "name": name, "probability": p} for i, name, p in prediction.classes]}), indent=None)
        else:
            ranked = ", ".join(f"{escape(name)} {p:.3f}" for _, name, p in prediction.classes)
            out.print(f"{escape(str(prediction.path))}: {ranked}")
    _finish(count, failures, "images")


@main.command()
@model_options
@click.argument("paths", nargs=-1, required=True)
@click.option("--layer", "layer_spec", required=True,
              help="Layer number (paper numbering), module name (layer3) or one call of a module (relu@2).")
@rule_option
@click.option("--channel", type=click.IntRange(min=0), help="Project this channel only.")
@click.option("--position", help="Y,X in the layer's map: project the activation there.")
@click.option("--top", default=1, show_default=True, type=click.IntRange(min=1),
              help="Project the strongest activation of this many strongest channels.")
@click.option("--out", "out_dir", default="vizdeconv-out/deconv", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
def deconv(model: LoadedModel, paths: tuple[str, ...], batch_size: int, layer_spec: str, rule: str,
           channel: int | None, position: str | None, top: int, out_dir: Path) -> None:
    """Project each image's strongest activations at a layer back to pixels."""
    images, failures = _inputs(paths)
    found = trace_layers(model)
    layer = found.layer(layer_spec)
    deconvnet = Deconvnet(model, found, layer, rule=rule)
    try:
        where = tuple(_ints(position)) if position else None
    except ValueError:
        raise UsageFailure(f"--position expects Y,X, got {position!r}") from None
    if where is not None and len(where) != 2:
        raise UsageFailure(f"--position expects Y,X, got {position!r}")
    names = output_names(images)
    count = 0
    results = project_files(deconvnet, images, top=top, channel=channel, position=where, batch_size=batch_size)
    for result in _track(results, len(images), f"projecting {layer.label}", failures):
        written = save_image_projections(result, out_dir / names[result.path], model)
        count += 1
        out.print(f"{escape(str(result.path))} → {escape(str(written[0]))}")
    _finish(count, failures, "images projected")


@main.command("project")
@model_options
@click.option("--layer", "layer_spec", required=True,
              help="Layer number (paper numbering), module name (layer3) or one call of a module (relu@2).")
@rule_option
@click.option("--images", "folders", multiple=True, help="Image folder or file (repeatable). Default for the "
              "embedded model: its shipped Fashion-MNIST samples.")
@click.option("--top", default=9, show_default=True, type=click.IntRange(min=1), help="Activations per channel.")
@click.option("--channels", "channel_spec", default="all", show_default=True, help="all, or e.g. 0-15,32.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Processes decoding images during the scan.")
@click.option("--out", "out_dir", default="vizdeconv-out", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
def project_command(model: LoadedModel, batch_size: int, layer_spec: str, rule: str, folders: tuple[str, ...],
                    top: int, channel_spec: str, workers: int, out_dir: Path) -> None:
    """Top-k grids (paper Fig. 2): each channel's strongest activations over a folder, projected."""
    if not folders:
        if model.name != EMBEDDED:
            raise UsageFailure("--images is needed for models other than the embedded one")
        folders = (str(sample_folder()),)
    images, failures = _inputs(folders)
    found = trace_layers(model)
    layer = found.layer(layer_spec)
    deconvnet = Deconvnet(model, found, layer, rule=rule)
    channels = parse_channels(channel_spec, layer.output_shape[0])
    best = TopK(channels, top, model.device)
    scanned = len(images)
    with progress() as bar:
        task = bar.add_task(f"scanning for {layer.label}", total=len(images))
        for done in scan(deconvnet, images, best, batch_size=batch_size, workers=workers):
            if isinstance(done, ImageError):
                failures.append(done)
                scanned -= 1
                done = 1
            bar.advance(task, done)
    top_hits = hits(best, layer, images, model.input_size)
    wanted = {hit.image for channel_hits in top_hits.values() for hit in channel_hits}
    with progress() as bar:
        task = bar.add_task(f"projecting {sum(map(len, top_hits.values()))} activations", total=len(wanted))
        projected = _advancing(project_hits(deconvnet, top_hits, batch_size=batch_size), bar, task)
        tiles = report.make_tiles(model, layer, top_hits, projected)
    folder = report.write_layer(out_dir, model, layer, rule, top, top_hits, tiles, scanned, failures)
    out.print(f"{escape(layer.label)}: {len(channels)} channels, top {top} over {scanned} images → "
              f"{escape(str(folder))}/ (overview.png, index.json); browse {escape(str(out_dir / 'index.html'))}")
    _finish(scanned, failures, "images scanned")


@main.command("occlude")
@model_options
@click.argument("paths", nargs=-1, required=True)
@click.option("--size", type=click.IntRange(min=1), help="Square side in input pixels [default: 50 at 224², scaled].")
@click.option("--stride", type=click.IntRange(min=1), help="Square step in input pixels [default: 8 at 224², scaled].")
@click.option("--fill", default="mean", show_default=True,
              help="mean (zero after normalisation) or a pixel value in 0..1, e.g. 0.5.")
@click.option("--target", default="auto", show_default=True, help="Class index or name; auto = top-1 unoccluded.")
@click.option("--layer", "layer_spec", help="Layer of the feature map [default: the last conv layer, or the last "
              "module output of a graph].")
@rule_option
@click.option("--brute-force", is_flag=True, help="One full forward pass per position instead of incremental.")
@click.option("--approximate", is_flag=True, help="Faster, inexact maps (adaptive drill-down), labelled as such.")
@click.option("--out", "out_dir", default="vizdeconv-out/occlusion", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
def occlude_command(model: LoadedModel, paths: tuple[str, ...], batch_size: int, size: int | None,
                    stride: int | None, fill: str, target: str, layer_spec: str | None, rule: str,
                    brute_force: bool, approximate: bool, out_dir: Path) -> None:
    """Occlusion maps (paper Fig. 7): p(target), top class and a feature map's total per square position."""
    images, failures = _inputs(paths)
    found = trace_layers(model)
    layer = found.layer(layer_spec) if layer_spec else found.last()
    deconvnet = Deconvnet(model, found, layer, rule=rule)
    default_size, default_stride = default_geometry(model.input_size)
    size, stride = size or default_size, stride or default_stride
    fill_value = fill_values(fill, model)
    reason = unsupported(found, layer)
    if reason and not brute_force:
        err.print(f"note: exact incremental inference is not possible ({escape(reason)}); using brute force")
    names = output_names(images)
    rows, todo = occlusion_report.split_done(out_dir, names, model, lambda done: is_same_run(
        done, model.name, layer.name, size, stride, fill_value, target, approximate))
    if rows:
        err.print(f"{len(rows)} images already done in {escape(str(out_dir))}, skipped")
    with progress() as bar:
        image_task = bar.add_task("images", total=len(todo))
        square_task = bar.add_task("squares", total=None)
        results = occlusion_report.occlude_files(
            deconvnet, todo, out_dir, names, size=size, stride=stride, fill=fill_value, target=target,
            batch_size=batch_size, brute_force=brute_force, approximate=approximate,
            squares=lambda done, total: bar.update(square_task, completed=done, total=total))
        for result in results:
            bar.advance(image_task)
            if isinstance(result, ImageError):
                failures.append(result)
                continue
            path, row = result
            rows[path] = row
            out.print(f"{escape(str(path))}: {escape(row['target_name'])} p={float(row['prob_clean']):.3f}, lowest "
                      f"{float(row['prob_min']):.3f} with the square at ({row['prob_min_y']}, {row['prob_min_x']})"
                      + (f", often {escape(row['other_name'])}" if row["other_name"] else ""))
    if rows:
        occlusion_report.save_summary(out_dir, rows)
    _finish(len(rows), failures, f"images with occlusion maps in {escape(str(out_dir))}")
