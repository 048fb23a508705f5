"""``vizdeconv reconstruct``: whole layers sent down the deconvnet with known and fixed switches
(Zhang, Lee & Lee 2016; ``reconstruct.py``).

Layout under ``OUT/reconstruct``: ``<image>/reconstruct_<layer>.png`` (the input and each
reconstruction, with their similarity to the input) and ``<image>/reconstruct_<layer>.npz`` (keys
in the README); ``similarity.csv`` with a row per image, layer and switches; ``index.json`` for the report.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vizdeconv import render, report
from vizdeconv.deconvnet import check_projectable
from vizdeconv.errors import ImageError, LayerError, VizDeconvError
from vizdeconv.jobs import Progress, find_outputs, no_progress, reading, save_manifest
from vizdeconv.layers import Layer, trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.outputs import save_csv, save_npz, save_png
from vizdeconv.reconstruct import SWITCHES, display, has_max_pool, pearson, reconstruct
from vizdeconv.similarity import ssim

FOLDER = "reconstruct"
CSV_COLUMNS = ("image", "layer", "switches", "pearson", "ssim")


@dataclass(frozen=True)
class Similarity:
    """How close one reconstruction is to its input: ``pearson`` in the normalised input space,
    ``ssim`` between the displayed images (``reconstruct.display``)."""

    image: Path
    layer: str
    switches: str
    pearson: float
    ssim: float


@dataclass(frozen=True)
class ReconstructReport:
    """What a ``ReconstructJob`` wrote: similarities in input, layer and switches order; figures;
    notes (layers where fixed switches are the known ones); files that failed."""

    folder: Path
    similarities: list[Similarity]
    figures: list[Path]
    notes: list[str]
    failures: list[ImageError]

    def means(self) -> dict[tuple[str, str], tuple[float, float]]:
        """``(layer, switches)`` → the mean Pearson r and SSIM over the images, layers in run order."""
        groups: dict[tuple[str, str], list[Similarity]] = {}
        for row in self.similarities:
            groups.setdefault((row.layer, row.switches), []).append(row)
        return {key: (float(np.mean([r.pearson for r in rows])), float(np.mean([r.ssim for r in rows])))
                for key, rows in groups.items()}


class ReconstructJob:
    """Reconstruct each image from whole layers.

    Args:
        model: the loaded model. layers: ``all`` (every numbered layer) or specs as ``Layers.select`` takes.
        switches: any of ``known`` and ``fixed``, in the order shown.
        out: the output folder (results go to ``out/reconstruct``). batch_size: images per pass.

    Raises:
        LayerError: an unknown layer, or one without a spatial output.
    """

    def __init__(self, model: LoadedModel, layers: str | Sequence[int | str] = "all", *,
                 switches: Sequence[str] = SWITCHES, out: str | os.PathLike = "vizdeconv-out",
                 batch_size: int = 16) -> None:
        traced = trace_layers(model)
        self.layers = traced.numbered() if layers == "all" else traced.select(layers)
        if not self.layers:
            raise LayerError(f"{model.name} has no numbered layers; name modules with --layer (see `vizdeconv layers`)")
        for layer in self.layers:
            check_projectable(layer)
        unknown = [s for s in switches if s not in SWITCHES]
        if unknown or not switches:
            raise VizDeconvError((f"unknown switches {unknown[0]!r}" if unknown else "no switches given")
                                 + f"; expected {' and/or '.join(SWITCHES)}")
        self.model, self.switches = model, list(dict.fromkeys(switches))
        self.out, self.batch_size = Path(out), batch_size

    @property
    def notes(self) -> list[str]:
        """Where ``fixed`` was asked for but changes nothing: layers with no max-pool below them."""
        if "fixed" not in self.switches:
            return []
        return [f"{layer.label}: no max-pool below it, so fixed switches give the known reconstruction"
                for layer in self.layers if not has_max_pool(layer)]

    def run(self, paths: Iterable[str | os.PathLike], progress: Progress = no_progress) -> ReconstructReport:
        folder = self.out / FOLDER
        images, failures, folders = find_outputs(paths, folder)
        similarities, made = [], []
        for batch in reading(self.model, images, failures, progress, "reconstructing", batch_size=self.batch_size):
            inputs = batch.images.to(self.model.device)
            pixels = {(layer, s): reconstruct(self.model, layer, inputs, switches=s).cpu()
                      for layer in self.layers for s in self.switches}
            for i, (path, image) in enumerate(zip(batch.paths, batch.images)):
                shown_input = display(image)
                for layer in self.layers:
                    kept = {s: pixels[layer, s][i] for s in self.switches}
                    shown = {s: display(p) for s, p in kept.items()}
                    rows = [Similarity(path, layer.key, s, pearson(image, kept[s]), ssim(shown_input, shown[s]))
                            for s in self.switches]
                    made.append(self._save(folders[path], path, layer, image, kept, rows,
                                           [shown_input] + [shown[s] for s in self.switches]))
                    similarities.extend(rows)
        save_csv(folder / "similarity.csv", CSV_COLUMNS, [
            (os.path.abspath(s.image), s.layer, s.switches, f"{s.pearson:.6f}", f"{s.ssim:.6f}") for s in similarities])
        save_manifest(folder, "reconstruct", "Whole-layer reconstructions, known vs fixed switches (Zhang et al. 2016)",
                      [{"png": png.relative_to(folder).as_posix(), "caption": caption} for png, caption in made],
                      failures)
        report.write_report(self.out)
        return ReconstructReport(folder, similarities, [png for png, _ in made], self.notes, failures)

    def _save(self, folder: Path, path: Path, layer: Layer, image: torch.Tensor, pixels: dict[str, torch.Tensor],
              rows: list[Similarity], shown: list[torch.Tensor]) -> tuple[Path, str]:
        """Write ``reconstruct_<layer>.png`` (``shown``: the input and each reconstruction as displayed)
        and ``.npz``; return the PNG and its caption."""
        stem = f"reconstruct_{layer.slug}"
        arrays = {"input": image.numpy().astype(np.float32), "layer": np.int64(layer.number or 0),
                  "module": np.str_(layer.name)}
        for row in rows:
            arrays[row.switches] = pixels[row.switches].numpy().astype(np.float32)
            arrays[f"{row.switches}_pearson"] = np.float64(row.pearson)
            arrays[f"{row.switches}_ssim"] = np.float64(row.ssim)
        save_npz(folder / f"{stem}.npz", **arrays)
        panels = [render.fit(render.to_rgb(picture)) for picture in shown]
        labels = ["input"] + [f"{row.switches}: r={row.pearson:.2f} SSIM={row.ssim:.2f}" for row in rows]
        title = f"{path.name}: {layer.label} of {self.model.name}, whole layer"
        figure = save_png(folder / f"{stem}.png", render.stack([render.labelled_row(panels, labels)], title))
        caption = f"{path.name}, {layer.label}: " + ", ".join(f"{r.switches} r={r.pearson:.2f}" for r in rows)
        return figure, caption

