"""Top-k activations per feature map over an image folder, and their projections (paper Fig. 2).

The scan keeps, per channel, the k strongest activations taking one maximum per image, so the k
come from k different images. It reduces each batch on the device as it goes: memory is
O(channels × k) whatever the folder size. Ties break by image path, then position (the first
maximum in row-major order), so the result does not depend on batch size, workers or file order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vizdeconv.deconv import Deconvnet
from vizdeconv.errors import ImageError, LayerError
from vizdeconv.images import read_batches
from vizdeconv.layers import Layer

# Conv kernels choose their algorithm by batch size, so an activation can differ in its last bits
# between batch sizes; the scan always runs chunks of this many images (the last one zero-padded)
# so that rankings, and ties, are identical for any --batch-size or --workers.
SCAN_CHUNK = 16


@dataclass(frozen=True)
class Hit:
    """One of a channel's top activations.

    Attributes:
        image: the image file.
        value: the activation (the maximum of the channel's map on that image).
        position: ``(y, x)`` in the layer's map.
        box: ``(y0, x0, y1, x1)`` receptive field in input pixels, end exclusive, clipped.
        clipped: whether the receptive field reaches past the image border.
    """

    image: Path
    value: float
    position: tuple[int, int]
    box: tuple[int, int, int, int]
    clipped: bool


class TopK:
    """Running top-k of per-image channel maxima, on the device; ``update`` once per batch."""

    def __init__(self, channels: Sequence[int], k: int, device: torch.device) -> None:
        self.channels = torch.tensor(list(channels), device=device)
        self.k = k
        self.values = torch.full((len(channels), 0), float("-inf"), device=device)
        self.ranks = torch.zeros((len(channels), 0), dtype=torch.long, device=device)
        self.places = torch.zeros((len(channels), 0), dtype=torch.long, device=device)

    def update(self, activations: torch.Tensor, ranks: torch.Tensor) -> None:
        """Fold in ``(B, K, h, w)`` activations of images whose global ranks (path order) are ``ranks``."""
        maxima, places = activations[:, self.channels].flatten(2).max(2)  # first maximum on ties
        values = torch.cat([self.values, maxima.T], dim=1)
        ranks = torch.cat([self.ranks, ranks.to(values.device)[None].expand(len(self.channels), -1)], dim=1)
        places = torch.cat([self.places, places.T], dim=1)
        # Sort by rank, then stably by value (descending): equal values keep path order.
        order = ranks.argsort(dim=1, stable=True)
        order = order.gather(1, values.gather(1, order).argsort(dim=1, descending=True, stable=True))[:, : self.k]
        self.values, self.ranks, self.places = values.gather(1, order), ranks.gather(1, order), places.gather(1, order)


def parse_channels(spec: str, count: int) -> list[int]:
    """``all`` or a list such as ``0-15,32`` → sorted channel numbers, checked against ``count``."""
    if spec.strip() == "all":
        return list(range(count))
    chosen: set[int] = set()
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            chosen.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise LayerError(f"--channels expects 'all' or a list such as 0-15,32, got {spec!r}") from None
    wrong = sorted(c for c in chosen if not 0 <= c < count)
    if wrong or not chosen:
        raise LayerError(f"channels {wrong or spec} out of range; the layer has channels 0..{count - 1}")
    return sorted(chosen)


def scan(deconvnet: Deconvnet, paths: Sequence[Path], top: TopK, *, batch_size: int = 32,
         workers: int = 0) -> Iterator[int | ImageError]:
    """Run the images through the model up to the deconvnet's layer, folding each batch into ``top``.

    ``paths`` must be in the order that breaks ties (``find_images`` sorts them). Yields the
    number of images in each batch done, and an ``ImageError`` per file that failed.
    """
    model = deconvnet.model
    rank = {path: i for i, path in enumerate(paths)}
    for batch in read_batches(paths, preprocess=model.preprocess, channels=model.input_size[0],
                              background=model.mean, batch_size=batch_size, workers=workers):
        if isinstance(batch, ImageError):
            yield batch
            continue
        ranks = torch.tensor([rank[p] for p in batch.paths])
        for images, chunk_ranks in zip(batch.images.split(SCAN_CHUNK), ranks.split(SCAN_CHUNK)):
            padded = torch.cat([images, images.new_zeros(SCAN_CHUNK - len(images), *images.shape[1:])])
            activations = deconvnet.activations(padded.to(model.device, non_blocking=True))
            top.update(activations[: len(images)], chunk_ranks)
        yield len(batch.paths)


def hits(top: TopK, layer: Layer, paths: Sequence[Path], input_size: tuple[int, int, int]) -> dict[int, list[Hit]]:
    """The scan's result: channel → its hits, strongest first.

    Only positive maxima count (a channel silent on an image has nothing to project), so a
    channel can have fewer than k hits, or none (a dead filter).
    """
    height, width = input_size[1:]
    map_width = layer.output_shape[2]
    result = {}
    for channel, values, ranks, places in zip(top.channels.tolist(), top.values.tolist(), top.ranks.tolist(),
                                              top.places.tolist()):
        result[channel] = []
        for value, rank, place in zip(values, ranks, places):
            if value <= 0:  # the unit never fired on this image: nothing to project
                continue
            y, x = divmod(place, map_width)
            box = layer.field.box(y, x, height, width)
            result[channel].append(Hit(paths[rank], value, (y, x), box, box != layer.field.window(y, x)))
    return result


def project_hits(deconvnet: Deconvnet, found: dict[int, list[Hit]], *, batch_size: int = 32
                 ) -> Iterator[tuple[Path, torch.Tensor, list[tuple[int, int, torch.Tensor]]]]:
    """Project every hit, one forward pass per image: yields ``(image, input, [(channel, slot, projection)])``.

    ``slot`` is the hit's place in its channel's list. Images are read again (nothing was kept by
    the scan); one that no longer loads raises its ``ImageError``.
    """
    model = deconvnet.model
    wanted: dict[Path, list[tuple[int, int, Hit]]] = defaultdict(list)
    for channel, channel_hits in found.items():
        for slot, hit in enumerate(channel_hits):
            wanted[hit.image].append((channel, slot, hit))
    images = sorted(wanted)
    for batch in read_batches(images, preprocess=model.preprocess, channels=model.input_size[0],
                              background=model.mean, batch_size=batch_size):
        if isinstance(batch, ImageError):
            raise batch
        forward = deconvnet.forward(batch.images.to(model.device))
        seeds = [(i, channel, *hit.position) for i, path in enumerate(batch.paths)
                 for channel, _, hit in wanted[path]]
        pixels = deconvnet.project(forward, torch.tensor(seeds, dtype=torch.long)).cpu()
        start = 0
        for i, path in enumerate(batch.paths):
            entries = wanted[path]
            yield path, batch.images[i], [(channel, slot, pixels[start + j])
                                          for j, (channel, slot, _) in enumerate(entries)]
            start += len(entries)
