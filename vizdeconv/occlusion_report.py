"""Occlusion runs over files: ``occlusion.png`` and ``maps.npz`` per image, ``summary.csv``, resuming."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vizdeconv import render
from vizdeconv.errors import ImageError
from vizdeconv.images import read_batches
from vizdeconv.deconv import Deconvnet
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import (
    OcclusionMaps,
    occlude,
    strongest_projection,
    summary_csv,
    summary_row,
)
from vizdeconv.outputs import save_npz, save_png, write_atomic

MAPS = "maps.npz"
FIGURE = "occlusion.png"


def figure(model: LoadedModel, image: torch.Tensor, projection: torch.Tensor, maps: OcclusionMaps, rule: str):
    """Paper Fig. 7: (a) input and square, (b) feature map total, (c) its projection, (d) p(target),
    (e) most probable class, then (b), (d), (e) overlaid on the input."""
    picture = render.input_to_image(image, model.mean, model.std)
    scale = render.PANEL / max(picture.size)
    square = render.fit(picture)
    corner = np.unravel_index(int(maps.prob_true.argmin()), maps.prob_true.shape)
    y, x = int(maps.positions_y[corner[0]]), int(maps.positions_x[corner[1]])
    square = render.draw_box(square, (y, x, y + maps.size, x + maps.size), scale)
    name = model.categories[maps.target]
    features = render.heatmap(maps.feature_total, float(maps.feature_total.min()), float(maps.feature_total.max()))
    probability = render.heatmap(maps.prob_true, 0.0, 1.0)
    classes = render.class_colours(maps.top_class)
    top = render.labelled_row(
        [square, render.fit(features), render.fit(render.projection_to_image(projection)), render.fit(probability),
         render.fit(classes)],
        [f"(a) square {maps.size}px, stride {maps.stride}", f"(b) ch {maps.channel} total "
         f"{maps.feature_total.min():.3g}..{maps.feature_total.max():.3g}", f"(c) ch {maps.channel} projection ({rule})",
         f"(d) p({name[:16]}) 0..1", "(e) most probable class"])
    overlays = [render.overlay(picture, cells, maps.positions_y, maps.positions_x, maps.size)
                for cells in (features, probability, classes)]
    bottom = render.labelled_row([render.fit(o) for o in overlays] + [_legend(model, maps)],
                                 ["(b) over the input", "(d) over the input", "(e) over the input", "classes (e)"])
    title = (f"{model.name}, {'layer ' + str(maps.layer) if maps.layer else maps.module}: target {name} "
             f"(p = {maps.prob_clean:.3f} unoccluded; lowest {maps.prob_true.min():.3f}, square marked in (a))"
             + ("; APPROXIMATE maps" if maps.method.startswith("approximate") else ""))
    return render.stack([top, bottom], title)


def _legend(model: LoadedModel, maps: OcclusionMaps):
    counts = np.bincount(maps.top_class.ravel())
    shown = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c]][:10]
    panel = Image.new("RGB", (render.PANEL, render.PANEL), "white")
    draw = ImageDraw.Draw(panel)
    for row, index in enumerate(shown):
        draw.rectangle([4, 4 + row * 18, 16, 16 + row * 18], fill=render.PALETTE[index % len(render.PALETTE)])
        share = counts[index] / maps.top_class.size
        draw.text((22, 3 + row * 18), f"{model.categories[index][:18]} {share:.0%}", fill="black", font=render.font(12))
    return panel


def save(folder: Path, model: LoadedModel, image: torch.Tensor, projection: torch.Tensor, maps: OcclusionMaps,
         rule: str):
    """Figure first, maps last: a ``maps.npz`` present means this image's outputs are complete."""
    save_png(folder / FIGURE, figure(model, image, projection, maps, rule))
    save_npz(folder / MAPS, **maps.arrays())


def load_complete(folder: Path) -> OcclusionMaps | None:
    """The maps of an image done earlier, if both its files are there and readable."""
    if not (folder / FIGURE).exists():
        return None
    try:
        with np.load(folder / MAPS) as arrays:
            return OcclusionMaps.from_arrays(arrays)
    except (OSError, KeyError, ValueError):
        return None



def split_done(out: Path, names: dict[Path, str], model: LoadedModel, is_same: Callable[[OcclusionMaps], bool]
               ) -> tuple[dict[Path, dict], list[Path]]:
    """Summary rows of the images already complete in ``out`` for this run's question, and the rest."""
    rows, todo = {}, []
    for path, name in names.items():
        done = load_complete(out / name)
        if done is not None and is_same(done):
            rows[path] = summary_row(path, done, model.categories)
        else:
            todo.append(path)
    return rows, todo


def occlude_files(deconvnet: Deconvnet, paths: list[Path], out: Path,
                  names: dict[Path, str], *, squares: Callable[[int, int], None] | None = None,
                  **options) -> Iterator[tuple[Path, dict] | ImageError]:
    """Occlusion maps of each image, saved under ``out/<name>/``; yields ``(path, summary row)`` per image
    and an ``ImageError`` per file that failed. ``options`` go to ``occlusion.occlude``; panel (c)
    uses the deconvnet's rule."""
    model = deconvnet.model
    for batch in read_batches(paths, preprocess=model.preprocess, channels=model.input_size[0],
                              background=model.mean, batch_size=1):
        if isinstance(batch, ImageError):
            yield batch
            continue
        path, image = batch.paths[0], batch.images[0].to(model.device)
        maps = occlude(model, deconvnet.layers, deconvnet.layer, image, progress=squares, **options)
        projection = strongest_projection(deconvnet, image, maps.channel)
        save(out / names[path], model, batch.images[0], projection, maps, deconvnet.rule)
        yield path, summary_row(path, maps, model.categories)


def save_summary(out: Path, rows: dict[Path, dict]) -> Path:
    """``summary.csv``, one row per image (columns in ``occlusion.SUMMARY_COLUMNS``), sorted by path."""
    return write_atomic(out / "summary.csv", lambda file: file.write(summary_csv([rows[p] for p in sorted(rows)])))
