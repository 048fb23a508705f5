"""``vizdeconv deconv``: each image's strongest activations at a layer, projected back to pixels.

Layout under ``OUT/deconv``: ``<image>/<layer>.png`` (one row per projection) and
``<image>/<layer>_ch{C:03d}.npz`` per projection, and ``index.json`` listing every figure there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vizdeconv import figures, report
from vizdeconv.deconvnet import Deconvnet, ImageProjections
from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.jobs import Progress, find_outputs, no_progress, reading, save_manifest
from vizdeconv.layers import Hit, Layer, trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.outputs import save_npz, save_png

FOLDER = "deconv"


@dataclass(frozen=True)
class DeconvResult:
    """One image's projections as written: the hits projected (strongest first), the figure and the NPZ files."""

    image: Path
    hits: list[Hit]
    figure: Path
    arrays: list[Path]


@dataclass(frozen=True)
class DeconvReport:
    """What a ``DeconvJob`` wrote: per image results in input order, and the files that failed."""

    folder: Path
    layer: Layer
    rule: str
    results: list[DeconvResult]
    failures: list[ImageError]


class DeconvJob:
    """Per-image projections at one layer.

    Args:
        model: the loaded model. layer: paper number, module name or ``name@k``.
        rule: ``deconvnet``, ``guided`` or ``gradient``.
        top: project the strongest activation of this many strongest channels;
        channel: only this channel; position: only the activation at this ``(y, x)`` of the map.
        out: the output folder (results go to ``out/deconv``). batch_size: images per forward pass.
    """

    def __init__(self, model: LoadedModel, layer: int | str, *, rule: str = "deconvnet", top: int = 1,
                 channel: int | None = None, position: tuple[int, int] | None = None,
                 out: str | os.PathLike = "vizdeconv-out", batch_size: int = 16) -> None:
        if channel is not None and top != 1:
            raise VizDeconvError("top ranks the channels; with a channel given there is only that one")
        layers = trace_layers(model)
        self.model, self.layer = model, layers.layer(layer)
        self.deconvnet = Deconvnet(model, layers, self.layer, rule=rule)
        self.choice = {"top": top, "channel": channel, "position": position}
        self.rule, self.out, self.batch_size = rule, Path(out), batch_size

    def run(self, paths: Iterable[str | os.PathLike], progress: Progress = no_progress) -> DeconvReport:
        folder = self.out / FOLDER
        images, failures, folders = find_outputs(paths, folder)
        results = []
        for batch in reading(self.model, images, failures, progress, f"projecting {self.layer.label}",
                             batch_size=self.batch_size):
            forward = self.deconvnet.forward(batch.images.to(self.model.device))
            hits = self.deconvnet.strongest_hits(forward, batch.paths, **self.choice)
            for path, image, projections in zip(batch.paths, batch.images, self.deconvnet.project_hits(forward, hits)):
                results.append(self._save(ImageProjections(path, image, projections), folders[path]))
        self._save_index(folder, results, failures)
        report.write_report(self.out)
        return DeconvReport(folder, self.layer, self.rule, results, failures)

    def _save(self, result: ImageProjections, folder: Path) -> DeconvResult:
        """Write ``<slug>.png`` and one NPZ per projection (keys in the README)."""
        slug, layer = self.layer.slug, self.layer
        title = (f"{result.path.name}: {self.model.name}, {layer.label}, {self.rule} rule; "
                 "projections scaled symmetrically around 0")
        figure = save_png(folder / f"{slug}.png",
                          figures.deconv_figure(self.model, title, result.input, result.projections))
        picture = result.input.numpy().astype(np.float32)
        arrays = [save_npz(
            folder / f"{slug}_ch{p.hit.channel:03d}.npz", projection=p.pixels.numpy().astype(np.float32),
            input=picture, layer=np.int64(layer.number or 0),
            module=np.str_(layer.name), rule=np.str_(self.rule), channel=np.int64(p.hit.channel),
            position=np.array(p.hit.position, dtype=np.int64), value=np.float32(p.hit.value),
            box=np.array(p.hit.box, dtype=np.int64)) for p in result.projections]
        for stale in folder.glob(f"{slug}_ch*.npz"):
            if stale not in arrays:  # from an earlier run with other channels
                stale.unlink()
        return DeconvResult(result.path, [p.hit for p in result.projections], figure, arrays)

    def _save_index(self, folder: Path, results: list[DeconvResult], failures: list[ImageError]) -> None:
        """``index.json``: this run's figures merged with earlier runs' figures that are still there,
        and this run's failed files."""
        save_manifest(folder, "deconv", "Deconv projections", [
            {"png": r.figure.relative_to(folder).as_posix(), "image": os.path.abspath(r.image), "model": self.model.name,
             "layer": self.layer.number, "module": self.layer.name, "label": self.layer.label, "rule": self.rule,
             "hits": [hit.to_json() for hit in r.hits]} for r in results], failures)
