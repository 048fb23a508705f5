"""``vizdeconv evolution``: features forming over training (paper Fig. 4).

For each checkpoint, each chosen channel's strongest activation over the images (``topk.scan``
with k = 1) is projected with the deconvnet of that checkpoint. Layout under ``OUT/evolution``:
``<layer>.png`` (one row per channel, one column per checkpoint) and ``<layer>.json`` (keys in the
README), and ``index.json`` listing the figures there for the report.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vizdeconv import figures, report
from vizdeconv.deconvnet import Deconvnet, Projection
from vizdeconv.embedded import epoch_checkpoints
from vizdeconv.errors import ImageError, LayerError, ModelError
from vizdeconv.jobs import Progress, default_images, find_inputs, no_progress, save_manifest, unique_failures
from vizdeconv.layers import Layer, trace_layers
from vizdeconv.models import EMBEDDED, LoadedModel, load_weights
from vizdeconv.outputs import output_names, save_json, save_png
from vizdeconv.topk import TopK, chunk_count, hits, parse_channels, project_hits, scan

FOLDER = "evolution"
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth")
DEFAULT_CHANNELS = 8  # channels 0-7 unless --channels says otherwise


def natural_key(path: Path) -> list:
    """Sort key that puts ``epoch2`` before ``epoch10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def checkpoint_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Weights files in the order given; a folder gives its ``WEIGHTS_SUFFIXES`` files (any case, hidden
    names skipped) in natural order.

    Raises:
        ModelError: a path that does not exist, or a folder with no weights files.
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() in WEIGHTS_SUFFIXES), key=natural_key)
            if not found:
                raise ModelError(f"{path}: no weights files ({', '.join(WEIGHTS_SUFFIXES)}) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ModelError(f"{path}: no such checkpoint file or folder")
    return files


@dataclass(frozen=True)
class EvolutionReport:
    """What an ``EvolutionJob`` found and wrote for one layer.

    Attributes:
        layer: the layer. checkpoints: their names (file stems), in order.
        projections: channel → one entry per checkpoint: the projection of its strongest
            activation (``Projection``, with its ``Hit``), or None where it never fired.
        figure, data: the PNG and JSON written. scanned: images scanned. failures: files that failed.
    """

    layer: Layer
    checkpoints: list[str]
    projections: dict[int, list[Projection | None]]
    figure: Path
    data: Path
    scanned: int
    failures: list[ImageError]


class EvolutionJob:
    """Each chosen channel's strongest activation, projected, at every checkpoint (paper Fig. 4).

    Args:
        model: the loaded model, whose architecture every checkpoint must fit.
        checkpoints: weights files and folders (``checkpoint_files``); default for the embedded
            model: its shipped epochs 1, 2, 5, 10, 25.
        layers: ``Layers.select`` spec; default every numbered layer. channels: ``0-7`` style, for
            every layer; default the first ``DEFAULT_CHANNELS``. rule: ``deconvnet``, ``guided`` or
            ``gradient``. out: the output folder. batch_size: images per forward pass.

    Raises:
        ModelError: a checkpoint is missing, unsafe or does not fit (checked before any work).
        LayerError: bad layers or channels.
    """

    def __init__(self, model: LoadedModel, checkpoints: Sequence[str | os.PathLike] = (),
                 layers: int | str | Sequence[int | str] | None = None, *, channels: str | None = None,
                 rule: str = "deconvnet", out: str | os.PathLike = "vizdeconv-out", batch_size: int = 16) -> None:
        if not checkpoints and model.name != EMBEDDED:
            raise ModelError("give the checkpoints (weights files or a folder of them) for models other than the "
                             "embedded one")
        self.files = checkpoint_files(checkpoints or [epoch_checkpoints()])
        names = output_names(self.files)
        self.names = [names[file] for file in self.files]
        # One private copy of the model takes each checkpoint's weights in turn; its layers and
        # deconvnets, traced once, see them (the user's model is never touched).
        self.model = replace(model, module=copy.deepcopy(model.module))
        found = trace_layers(self.model)
        self.layers = found.select(layers) if layers is not None else found.numbered()
        if not self.layers:
            raise LayerError(f"{model.name} has no numbered layers (its plain chain ends at {found.chain.end}); "
                             "give --layer")
        self.channels = [parse_channels(channels, layer.output_shape[0]) if channels else
                         list(range(min(DEFAULT_CHANNELS, layer.output_shape[0]))) for layer in self.layers]
        self.deconvnets = [Deconvnet(self.model, found, layer, rule=rule) for layer in self.layers]
        for file in self.files:
            load_weights(self.model.module, file)  # a checkpoint that does not fit stops the job here, before any work
        self.rule, self.out, self.batch_size = rule, Path(out), batch_size

    def run(self, paths: Iterable[str | os.PathLike] = (), progress: Progress = no_progress) -> list[EvolutionReport]:
        """Scan and project at every checkpoint, write one figure and JSON per layer, refresh the report.

        ``paths``: image files or folders; default for the embedded model: its shipped samples."""
        images, failures = find_inputs(list(paths) or default_images(self.model))
        # per layer: channel → one entry per checkpoint
        projections: list[dict[int, list[Projection | None]]] = [
            {channel: [] for channel in channels} for channels in self.channels]
        read_failures: list[ImageError] = []
        for name, file in zip(self.names, self.files):
            load_weights(self.model.module, file)
            for i, chosen in enumerate(self._strongest(name, images, read_failures, progress)):
                for channel in self.channels[i]:
                    projections[i][channel].append(chosen.get(channel))
        lost = unique_failures(read_failures)  # each checkpoint's pass met the same bad files
        failures += lost
        scanned = len(images) - len(lost)
        reports = [self._write(layer, layer_projections, scanned, failures)
                   for layer, layer_projections in zip(self.layers, projections)]
        save_manifest(self.out / FOLDER, "evolution", "Feature evolution over training (paper Fig. 4)",
                      [{"png": r.figure.name, "caption": f"{r.layer.label}: channels "
                        f"{', '.join(map(str, r.projections))} at {', '.join(r.checkpoints)}"} for r in reports],
                      failures)
        report.write_report(self.out)
        return reports

    def _strongest(self, name: str, images: list[Path], failures: list[ImageError], progress: Progress
                   ) -> list[dict[int, Projection]]:
        """Per layer, channel → the projection of its strongest activation, with the weights now loaded."""
        tops = [TopK(channels, 1, self.model.device) for channels in self.channels]
        chunks = chunk_count(len(images))
        progress(f"{name}: scanning", 0, chunks)
        for done in scan(self.model, self.layers, tops, images, failures, batch_size=self.batch_size):
            progress(f"{name}: scanning", done, chunks)
        strongest = [hits(top, layer, images, self.model.input_size) for top, layer in zip(tops, self.layers)]
        chosen: list[dict[int, Projection]] = [{} for _ in self.layers]
        for i, projected in project_hits(self.deconvnets, strongest, failures, batch_size=self.batch_size):
            for projection in projected.projections:
                chosen[i][projection.hit.channel] = projection
        return chosen

    def _write(self, layer: Layer, projections: dict[int, list[Projection | None]], scanned: int,
               failures: list[ImageError]) -> EvolutionReport:
        folder, slug = self.out / FOLDER, layer.slug
        title = (f"{self.model.name}, {layer.label}: each channel's strongest activation over {scanned} images, "
                 f"projected ({self.rule} rule), at each checkpoint")
        figure = save_png(folder / f"{slug}.png",
                          figures.evolution_figure(self.model, layer, title, self.names, projections))
        data = save_json(folder / f"{slug}.json", {
            "model": self.model.name, "layer": layer.number, "module": layer.name, "label": layer.label,
            "rule": self.rule, "checkpoints": self.names, "checkpoint_files": [os.path.abspath(f) for f in self.files],
            "images": scanned,
            "channels": [{"channel": channel, "per_checkpoint": [
                {"checkpoint": name, **_hit_json(projection)} for name, projection in zip(self.names, entries)]} for channel, entries in projections.items()],
            "failed": [failure.to_json() for failure in failures]})
        return EvolutionReport(layer, self.names, projections, figure, data, scanned, failures)


def _hit_json(projection: Projection | None) -> dict:
    """The hit's image, value, position and box; all null where the channel never fired."""
    hit = projection.hit.to_json() if projection else {}
    return {key: hit.get(key) for key in ("image", "value", "position", "box")}
