"""``vizdeconv project``: each channel's top-k activations over image files, projected (paper Fig. 2).

Layout under ``OUT``: ``<layer>/ch{C:03d}.png`` per channel, ``<layer>/overview.png``
(``overview-2.png`` … past ``SHEET`` channels) and ``<layer>/index.json``; ``index.html`` over
everything in ``OUT``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vizdeconv import figures, render, report
from vizdeconv.deconvnet import Deconvnet
from vizdeconv.embedded import sample_folder
from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.jobs import Progress, find_inputs, no_progress
from vizdeconv.layers import Hit, Layer, trace_layers
from vizdeconv.models import EMBEDDED, LoadedModel
from vizdeconv.outputs import save_json, save_png
from vizdeconv.topk import TopK, hits, parse_channels, project_hits, scan

SHEET = 64  # channel figures per overview sheet



def figure_name(channel: int) -> str:
    return f"ch{channel:03d}.png"


def default_images(model: LoadedModel) -> list[Path]:
    """What ``project`` scans when no images are given: the embedded model's shipped samples."""
    if model.name != EMBEDDED:
        raise VizDeconvError("--images is needed for models other than the embedded one")
    return [sample_folder()]


@dataclass(frozen=True)
class TopKReport:
    """What a ``ProjectJob`` found and wrote.

    Attributes:
        folder: ``OUT/<layer slug>``. layer, rule, k: what was asked.
        hits: channel → its top hits, strongest first (fewer than k, or none, for channels that rarely fire).
        scanned: images scanned. failures: files that could not be read, with their reasons.
    """

    folder: Path
    layer: Layer
    rule: str
    k: int
    hits: dict[int, list[Hit]]
    scanned: int
    failures: list[ImageError]

    def figure(self, channel: int) -> Path:
        return self.folder / figure_name(channel)


class ProjectJob:
    """Top-k grids of one layer.

    Args:
        model: the loaded model. layer: paper number, module name or ``name@k`` (``Layers.layer``).
        k: activations per channel, each from a different image. channels: ``all`` or ``0-15,32``.
        rule: ``deconvnet``, ``guided`` or ``gradient``. out: the output folder.
        batch_size, workers: images per forward pass, processes decoding images during the scan.
    """

    def __init__(self, model: LoadedModel, layer: int | str, *, k: int = 9, channels: str = "all",
                 rule: str = "deconvnet", out: str | os.PathLike = "vizdeconv-out", batch_size: int = 16,
                 workers: int = 0) -> None:
        layers = trace_layers(model)
        self.model, self.layer = model, layers.layer(layer)
        self.deconvnet = Deconvnet(model, layers, self.layer, rule=rule)
        self.channels = parse_channels(channels, self.layer.output_shape[0])
        self.k, self.rule, self.out, self.batch_size, self.workers = k, rule, Path(out), batch_size, workers

    def run(self, paths: Iterable[str | os.PathLike], progress: Progress = no_progress) -> TopKReport:
        """Scan ``paths`` (files or folders), project every hit, write the figures and refresh the report."""
        images, failures = find_inputs(paths)
        missing = len(failures)
        best = TopK(self.channels, self.k, self.model.device)
        scanning = f"scanning for {self.layer.label}"
        progress(scanning, 0, len(images))
        for done in scan(self.deconvnet, images, best, failures, batch_size=self.batch_size, workers=self.workers):
            progress(scanning, done, len(images))
        progress(scanning, len(images), len(images))
        scanned = len(images) - (len(failures) - missing)
        found = hits(best, self.layer, images, self.model.input_size)
        tiles = self._tiles(found, failures, progress)
        found = {channel: [hit for hit in channel_hits if hit in tiles] for channel, channel_hits in found.items()}
        folder = self._write(found, tiles, scanned, failures)
        report.write_report(self.out)
        return TopKReport(folder, self.layer, self.rule, self.k, found, scanned, failures)

    def _tiles(self, found: dict[int, list[Hit]], failures: list[ImageError], progress: Progress
               ) -> dict[Hit, tuple[Image.Image, Image.Image]]:
        """Each hit's (projection, patch) tiles; hits on a file that no longer loads are left out."""
        images = {hit.image for channel_hits in found.values() for hit in channel_hits}
        projecting = f"projecting {sum(map(len, found.values()))} activations"
        progress(projecting, 0, len(images))
        tiles = {}
        for done, result in enumerate(project_hits(self.deconvnet, found, failures, batch_size=self.batch_size), 1):
            pairs = figures.image_tiles(self.model, self.layer, result.input, result.projections)
            tiles.update(zip((projection.hit for projection in result.projections), pairs))
            progress(projecting, done, len(images))
        progress(projecting, len(images), len(images))
        return tiles

    def _write(self, found: dict[int, list[Hit]], tiles: dict[Hit, tuple[Image.Image, Image.Image]], scanned: int,
               failures: list[ImageError]) -> Path:
        folder = self.out / self.layer.slug
        columns = math.ceil(math.sqrt(self.k))
        drawn, channels = [], []
        for channel, channel_hits in found.items():
            if not channel_hits:
                continue
            title = f"{self.layer.label}, channel {channel}: top {len(channel_hits)} of {scanned} images"
            figure = figures.channel_figure(title, [tiles[h][0] for h in channel_hits], [tiles[h][1] for h in channel_hits],
                                            [h.value for h in channel_hits], [h.image.stem for h in channel_hits],
                                            columns)
            save_png(folder / figure_name(channel), figure)
            drawn.append(figure)
            channels.append({"channel": channel, "png": figure_name(channel),
                             "hits": [hit.to_json() for hit in channel_hits]})
        sheets = []
        for number, start in enumerate(range(0, len(drawn), SHEET), start=1):
            name = "overview.png" if number == 1 else f"overview-{number}.png"
            sheet = channels[start:start + SHEET]
            title = (f"{self.model.name}, {self.layer.label}, {self.rule} rule: channels {sheet[0]['channel']}.."
                     f"{sheet[-1]['channel']}, top {self.k} over {scanned} images")
            labels = [f"channel {c['channel']}: max {c['hits'][0]['value']:.3g}" for c in sheet]
            save_png(folder / name, figures.overview(drawn[start:start + SHEET], labels, title))
            sheets.append(name)
        field = self.layer.field
        save_json(folder / "index.json", {
            "kind": "project", "model": self.model.name, "weights": self.model.weights, "layer": self.layer.number,
            "module": self.layer.name, "label": self.layer.label, "rule": self.rule,
            "input_size": list(self.model.input_size), "k": self.k,
            "receptive_field": {"size": list(field.size), "stride": list(field.stride), "offset": list(field.offset)},
            "images_scanned": scanned, "failed": [failure.to_json() for failure in failures],
            "display": render.DISPLAY, "overview": sheets, "channels": channels,
        })
        written = {channel["png"] for channel in channels} | set(sheets)
        for stale in [*folder.glob("ch*.png"), *folder.glob("overview*.png")]:
            if stale.name not in written:  # from an earlier run with other channels or k
                stale.unlink()
        return folder
