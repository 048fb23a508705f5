"""``vizdeconv filters``: a conv layer's filter sheet and diagnostics (paper Fig. 6, ``filters.py``).

Layout under ``OUT/filters``: ``<layer>.png`` (the sheet) and ``<layer>.json`` (keys in the README),
and ``index.json`` listing the sheets there for the report.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from vizdeconv import figures, report
from vizdeconv.errors import ImageError
from vizdeconv.filters import (
    ALIASING_FLAG,
    DEAD_NORM,
    RENORMALISE_RMS,
    FilterStats,
    Responses,
    check_convolutional,
    conv_of,
    diagnose,
)
from vizdeconv.jobs import Progress, find_inputs, no_progress, reading, save_manifest
from vizdeconv.layers import Layer, trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.outputs import save_json, save_png
from vizdeconv.switches import record_points

FOLDER = "filters"


@dataclass(frozen=True)
class FiltersReport:
    """What a ``FiltersJob`` found and wrote: per filter stats, the layer's summary, the sheet and the JSON."""

    layer: Layer
    module: str
    stride: tuple[int, int]
    filters: list[FilterStats]
    summary: dict
    figure: Path
    data: Path
    failures: list[ImageError]


class FiltersJob:
    """Diagnose one conv layer's filters; with images, also how often each fires.

    Args:
        model: the loaded model. layer: paper number (its conv) or a ``Conv2d`` module's name.
        out: the output folder (results go to ``out/filters``). batch_size: images per forward pass.

    Raises:
        LayerError: the model has no conv, or the layer is not one.
    """

    def __init__(self, model: LoadedModel, layer: int | str = 1, *, out: str | os.PathLike = "vizdeconv-out",
                 batch_size: int = 16) -> None:
        check_convolutional(model)
        layers = trace_layers(model)
        self.model, self.layer = model, layers.layer(layer)
        self.module, self.conv = conv_of(model.module, layers, self.layer)
        self.out, self.batch_size = Path(out), batch_size

    def run(self, paths: Iterable[str | os.PathLike] = (), progress: Progress = no_progress) -> FiltersReport:
        """Write the sheet and the JSON (``paths``: image files or folders to measure firing on; none: weights only)."""
        paths, failures, responses = list(paths), [], None
        if paths:
            images, failures = find_inputs(paths)
            responses = self._responses(images, failures, progress)
        weight = self.conv.weight.detach().cpu()
        stride, dilation = tuple(self.conv.stride), tuple(self.conv.dilation)
        diagnosis = diagnose(weight, stride, responses, dilation=dilation)
        stats, summary = diagnosis.filters, diagnosis.summary
        folder, slug = self.out / FOLDER, self.layer.slug
        figure = save_png(folder / f"{slug}.png", figures.filter_sheet(
            self._title(weight), self._notes(summary, stride), weight, diagnosis.spectra, stats, stride))
        data = save_json(folder / f"{slug}.json", {
            "model": self.model.name, "weights": self.model.weights, "layer": self.layer.number,
            "module": self.module, "kernel": list(weight.shape[2:]), "stride": list(stride), "dilation": list(dilation),
            "filters": [s.to_json() for s in stats], "summary": summary,
            "failed": [failure.to_json() for failure in failures]})
        save_manifest(folder, "filters", "Filters and their spectra (paper Fig. 6)",
                      [{"png": figure.name, "caption": f"{self.layer.label}: {self.caption(summary)}"}], failures)
        report.write_report(self.out)
        return FiltersReport(self.layer, self.module, stride, stats, summary, figure, data, failures)

    def _responses(self, images: list[Path], failures: list[ImageError], progress: Progress) -> Responses:
        """How often each filter fires over the images: the layer's rectified output for a numbered
        layer, else the conv's output rectified. Files that fail go to ``failures``."""
        responses = Responses.empty(self.conv.out_channels)
        for batch in reading(self.model, images, failures, progress, f"responses of {self.layer.label}",
                             batch_size=self.batch_size):
            (output,) = record_points(self.model.module, [self.layer.point], batch.images.to(self.model.device))
            responses = responses.update(output.clamp(min=0))
        return responses

    def _title(self, weight: torch.Tensor) -> str:
        out_channels, in_channels, height, width = weight.shape
        dilation = "" if self.conv.dilation == (1, 1) else f", dilation {'x'.join(map(str, self.conv.dilation))}"
        return (f"{self.model.name}, {self.layer.label}: {out_channels} filters of {in_channels}x{height}x{width} "
                f"({self.module}, stride {'x'.join(map(str, self.conv.stride))}{dilation})")

    @staticmethod
    def _notes(summary: dict, stride: tuple[int, int]) -> list[str]:
        nyquist = summary["definitions"]["nyquist_cycles_per_pixel"]
        return [
            "left: the filter, scaled on its own (1 or 3 input channels: weights symmetric around zero, mid-grey = 0; "
            "more: the L2 norm over input channels per tap, black = 0)",
            "right: its magnitude spectrum |W(f)|, DC at the centre, ±0.5 cycles/pixel at the edges, scaled on its own"
            + (f"; white box: the stride's Nyquist frequency {nyquist[0]:g} x {nyquist[1]:g}, energy outside it aliases"
               if stride != (1, 1) else ""),
            f"red: dead (norm at most {DEAD_NORM:.0%} of the median{', or never fires' if summary['images'] else ''}), "
            f"alias (over {ALIASING_FLAG:.0%} of its energy beyond Nyquist); orange: rms>{RENORMALISE_RMS:g} "
            f"(ZF renormalise to {RENORMALISE_RMS:g})",
            FiltersJob.caption(summary),
        ]

    @staticmethod
    def caption(summary: dict) -> str:
        """The summary in one line."""
        def percent(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.0%}"

        return (f"{summary['filters']} filters: {summary['dead']} dead, {summary['aliased']} aliased, "
                f"{summary['renormalise']} over RMS {RENORMALISE_RMS:g}; energy low {percent(summary['energy_low'])}, "
                f"mid {percent(summary['energy_mid'])}, high {percent(summary['energy_high'])}")
