"""``vizdeconv occlude``: occlusion maps of image files (paper Fig. 7), resumable.

Layout under ``OUT/occlusion``: ``<image>/occlusion.png`` and ``<image>/maps.npz`` per image,
``summary.csv`` (one row per image, ``SUMMARY_COLUMNS``) and ``index.json`` for the report. Under
``torchrun`` the ranks share the images and rank 0 writes the summary, the index and the report.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vizdeconv import distributed, figures, report
from vizdeconv.deconvnet import Deconvnet, strongest
from vizdeconv.errors import ImageError
from vizdeconv.jobs import Progress, find_outputs, no_progress, reading, unique_failures
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import Approximation, OcclusionMaps, OcclusionSpec, not_incremental, occlude
from vizdeconv.outputs import save_json, save_npz, save_png, write_atomic

FOLDER, MAPS, FIGURE = "occlusion", "maps.npz", "occlusion.png"
SUMMARY_COLUMNS = ["image", "target", "target_name", "prob_clean", "prob_min", "prob_min_y", "prob_min_x",
                   "other_class", "other_name", "other_fraction"]


@dataclass(frozen=True)
class ImageOcclusion:
    """One image's maps and where they are; ``resumed`` when they were found from an earlier run."""

    image: Path
    folder: Path
    maps: OcclusionMaps
    resumed: bool


@dataclass(frozen=True)
class OcclusionReport:
    """What an ``OcclusionJob`` run covers: every image's maps (done now or resumed), by path, each one's
    ``summary.csv`` row (``SUMMARY_COLUMNS``), and the failures."""

    folder: Path
    spec: OcclusionSpec
    results: list[ImageOcclusion]
    rows: list[dict]
    failures: list[ImageError]


class OcclusionJob:
    """Occlusion maps for one spec (``OcclusionSpec.create`` takes the same options).

    Args:
        model: the loaded model. layer: the feature map's layer; default the last conv layer, or
            the last module output of a graph (``Layers.last``).
        approximate: Krypton's approximations (``Approximation``), or None for exact maps.
        brute_force: one full forward pass per position instead of exact incremental inference.
        out: the output folder (results go to ``out/occlusion``). batch_size: square positions per pass.
    """

    def __init__(self, model: LoadedModel, layer: int | str | None = None, *, size: int | None = None,
                 stride: int | None = None, fill: str | float = "mean", target: str | int = "auto",
                 rule: str = "deconvnet", approximate: Approximation | None = None, brute_force: bool = False,
                 out: str | os.PathLike = "vizdeconv-out", batch_size: int = 64) -> None:
        self.layers = trace_layers(model)
        self.layer = self.layers.last() if layer is None else self.layers.layer(layer)
        self.deconvnet = Deconvnet(model, self.layers, self.layer, rule=rule)
        self.spec = OcclusionSpec.create(model, self.layer, size=size, stride=stride, fill=fill, target=target,
                                         rule=rule, approximate=approximate)
        self.model, self.brute_force, self.out, self.batch_size = model, brute_force, Path(out), batch_size
        self.not_incremental = None if brute_force else not_incremental(model, self.layer, self.spec.size,
                                                                        self.spec.fill)
        """Why exact incremental inference is impossible here (brute force runs instead), or None."""

    def run(self, paths: Iterable[str | os.PathLike], progress: Progress = no_progress) -> OcclusionReport:
        """Maps for every image not already done for this spec in ``OUT``; then the summary and the report."""
        folder = self.out / FOLDER
        images, failures, folders = find_outputs(paths, folder)
        results = {path: done for path in images if (done := self._done(path, folders[path])) is not None}
        ranks = distributed.current()
        todo = ranks.gather([path for path in images if path not in results])[0]  # rank 0's view, for every rank
        todo = ranks.share(todo)
        for batch in reading(self.model, todo, failures, progress, "images", batch_size=1):
            path = batch.paths[0]
            maps = occlude(self.model, self.layers, batch.images[0], self.spec, batch_size=self.batch_size,
                           brute_force=self.brute_force or self.not_incremental is not None,
                           progress=lambda done, total: progress("squares", done, total))
            projection = self._strongest_projection(batch.images[0], maps.channel)
            save_png(folders[path] / FIGURE,
                     figures.occlusion_figure(self.model, batch.images[0], projection, maps))
            save_npz(folders[path] / MAPS, **maps.arrays())  # last: a maps.npz present means the image is done
            results[path] = ImageOcclusion(path, folders[path], maps, resumed=False)
        failures = unique_failures(f for rank_failures in ranks.gather(failures) for f in rank_failures)
        if ranks.main:
            failed = {str(failure.path) for failure in failures}
            for path in images:  # what the other ranks did
                results[path] = results.get(path) or self._done(path, folders[path], resumed=False)
                if results[path] is None and str(path) not in failed:
                    failures.append(ImageError(path, f"no maps in {folders[path]} (a rank stopped writing them?)"))
        ordered = [results[path] for path in sorted(results) if results[path]]
        rows = [self._summary_row(result) for result in ordered]
        if ranks.main:
            write_atomic(folder / "summary.csv", lambda file: file.write(_summary_csv(rows)))
            self._save_index(folder, ordered, rows, failures)
            report.write_report(self.out)
        ranks.barrier()  # no rank leaves (and exits) before rank 0 has written
        return OcclusionReport(folder, self.spec, ordered, rows, failures)

    def _done(self, path: Path, folder: Path, *, resumed: bool = True) -> ImageOcclusion | None:
        """The image's maps for this spec on disk (from an earlier run, or another rank), if both its files
        are there and readable."""
        if not (folder / FIGURE).exists():
            return None
        try:
            with np.load(folder / MAPS) as arrays:
                maps = OcclusionMaps.from_arrays(arrays)
        except (OSError, KeyError, ValueError):
            return None
        return ImageOcclusion(path, folder, maps, resumed) if maps.spec == self.spec else None

    def _strongest_projection(self, image: torch.Tensor, channel: int) -> torch.Tensor:
        """Panel (c): the projection of ``channel``'s strongest activation on the unoccluded image."""
        forward = self.deconvnet.forward(image[None].to(self.model.device))
        return self.deconvnet.project(forward, strongest(forward.activations, channel=channel))[0].cpu()

    def _summary_row(self, result: ImageOcclusion) -> dict:
        """One ``summary.csv`` row: the lowest p(target) and where, and the most frequent other class."""
        maps = result.maps
        where = np.unravel_index(int(maps.prob_true.argmin()), maps.prob_true.shape)
        others = maps.top_class[maps.top_class != maps.target]
        other = int(np.bincount(others).argmax()) if others.size else -1
        return {"image": os.path.abspath(result.image), "target": maps.target,
                "target_name": self.model.category(maps.target),
                "prob_clean": f"{maps.prob_clean:.6f}", "prob_min": f"{maps.prob_true[where]:.6f}",
                "prob_min_y": int(maps.positions_y[where[0]]), "prob_min_x": int(maps.positions_x[where[1]]),
                "other_class": other, "other_name": self.model.category(other) if other >= 0 else "",
                "other_fraction": f"{others.size / maps.top_class.size:.4f}"}

    def _save_index(self, folder: Path, results: list[ImageOcclusion], rows: list[dict],
                    failures: list[ImageError]) -> None:
        spec = self.spec
        save_json(folder / "index.json", {
            "kind": "occlude", "model": spec.model, "module": spec.layer, "label": self.layer.label,
            "size": spec.size, "stride": spec.stride, "fill": list(spec.fill), "target": spec.target,
            "rule": spec.rule, "approximate": spec.approximate.describe(not self.not_incremental and not self.brute_force)
            if spec.approximate else "",
            "images": [{"png": (r.folder / FIGURE).relative_to(folder).as_posix(), "method": r.maps.method, **row}
                       for r, row in zip(results, rows)],
            "failed": [failure.to_json() for failure in failures],
        })


def _summary_csv(rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()
