"""Per-image deconvnet projections: the job behind ``vizdeconv deconv``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vizdeconv import render
from vizdeconv.deconv import Deconvnet, strongest
from vizdeconv.errors import ImageError
from vizdeconv.images import Batch, read_batches
from vizdeconv.layers import Layer
from vizdeconv.models import LoadedModel
from vizdeconv.outputs import save_npz, save_png


@dataclass(frozen=True)
class Projection:
    """One activation projected to input space.

    Attributes:
        channel, position, value: the seed: channel, ``(y, x)`` in the layer's map, its activation.
        box: ``(y0, x0, y1, x1)`` receptive field in input pixels, end exclusive, clipped.
        pixels: ``(C, H, W)`` float32 projection in the model's normalised input space, raw.
    """

    channel: int
    position: tuple[int, int]
    value: float
    box: tuple[int, int, int, int]
    pixels: torch.Tensor


@dataclass(frozen=True)
class ImageProjections:
    path: Path
    input: torch.Tensor
    layer: Layer
    rule: str
    projections: list[Projection]


def project_files(deconvnet: Deconvnet, paths: Sequence[Path], *, top: int = 1, channel: int | None = None,
                  position: tuple[int, int] | None = None, batch_size: int = 16
                  ) -> Iterator[ImageProjections | ImageError]:
    """For each image, project its strongest activations at the deconvnet's layer (see ``deconv.strongest``).

    Yields results in input order, and an ``ImageError`` for each file that could not be read.
    """
    model = deconvnet.model
    for batch in read_batches(paths, preprocess=model.preprocess, channels=model.input_size[0],
                              background=model.mean, batch_size=batch_size):
        if isinstance(batch, ImageError):
            yield batch
            continue
        yield from _project_batch(deconvnet, batch, top, channel, position)


def _project_batch(deconvnet: Deconvnet, batch: Batch, top, channel, position):
    model, layer = deconvnet.model, deconvnet.layer
    forward = deconvnet.forward(batch.images.to(model.device))
    seeds = strongest(forward.activations, top=top, channel=channel, position=position)
    pixels = deconvnet.project(forward, seeds).cpu()
    values = forward.activations[tuple(seeds.T)].tolist()
    height, width = model.input_size[1:]
    per_image: list[list[Projection]] = [[] for _ in batch.paths]
    for (image, c, y, x), value, projection in zip(seeds.tolist(), values, pixels):
        per_image[image].append(Projection(c, (y, x), value, layer.field.box(y, x, height, width), projection))
    for path, image, projections in zip(batch.paths, batch.images, per_image):
        yield ImageProjections(path, image, layer, deconvnet.rule, projections)


def save_image_projections(result: ImageProjections, folder: Path, model: LoadedModel) -> list[Path]:
    """Write ``<slug>.png`` (one row per projection) and ``<slug>_ch{C:03d}.npz`` per projection.

    NPZ keys: ``projection`` (float32 C×H×W, raw, normalised input space), ``input`` (the
    preprocessed input), ``layer`` (paper number, 0 for a module picked by name), ``module``,
    ``channel``, ``position`` (y, x in the layer's map), ``value`` (the seed activation), ``box``
    (y0, x0, y1, x1 receptive field in input pixels, end exclusive), ``rule``.
    """
    slug = layer_slug(result.layer)
    written = []
    picture = render.input_to_image(result.input, model.mean, model.std)
    scale = render.PANEL / max(picture.size)
    rows = []
    for p in result.projections:
        projection = render.projection_to_image(p.pixels)
        rows.append(render.labelled_row(
            [render.draw_box(render.fit(picture), p.box, scale), render.draw_box(render.fit(projection), p.box, scale),
             render.fit(render.crop(picture, p.box)), render.fit(render.crop(projection, p.box))],
            [f"input, ch {p.channel} at {p.position}", f"projection (activation {p.value:.3g})", "input patch",
             "projection patch"]))
        written.append(save_npz(
            folder / f"{slug}_ch{p.channel:03d}.npz", projection=p.pixels.numpy().astype(np.float32),
            input=result.input.numpy().astype(np.float32), layer=np.int64(result.layer.number or 0),
            module=np.str_(result.layer.name), rule=np.str_(result.rule), channel=np.int64(p.channel),
            position=np.array(p.position, dtype=np.int64), value=np.float32(p.value),
            box=np.array(p.box, dtype=np.int64)))
    title = (f"{result.path.name}: {model.name}, {result.layer.label}, {result.rule} rule; "
             "projections scaled symmetrically around 0")
    written.insert(0, save_png(folder / f"{slug}.png", render.stack(rows, title)))
    return written


def layer_slug(layer: Layer) -> str:
    """File-name stem for a layer: ``layer5``, or the module name for an unnumbered module."""
    return f"layer{layer.number}" if layer.number else layer.name.replace(".", "_").replace("@", "_call")
