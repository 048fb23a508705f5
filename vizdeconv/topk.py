"""Top-k activations per feature map over an image folder, and their projections (paper Fig. 2).

The scan keeps, per channel, the k strongest activations taking one maximum per image, so the k
come from k different images. It reduces each batch on the device as it goes: memory is
O(channels × k) whatever the folder size. Ties break by image path, then position (the first
maximum in row-major order), so the result does not depend on batch size, workers, file order, where
a resumed scan restarted, or how many ranks shared it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from vizdeconv.deconvnet import Deconvnet, ImageProjections
from vizdeconv.errors import ImageError, LayerError
from vizdeconv.layers import Hit, Layer
from vizdeconv.models import LoadedModel
from vizdeconv.switches import record_points

# Conv kernels choose their algorithm by batch size, so an activation can differ in its last bits
# between batch sizes; the scan always runs chunks of this many consecutive files (the images that
# load, zero-padded to this many), so that rankings, and ties, are identical for any --batch-size,
# --workers, resume point or number of ranks.
SCAN_CHUNK = 16


class TopK:
    """Running top-k of per-image channel maxima, on the device; ``update`` once per chunk.

    Each kept activation is a column of ``values``, ``ranks`` (the image's place in the sorted
    file list) and ``places`` (its row-major position in the map).
    """

    def __init__(self, channels: Sequence[int], k: int, device: torch.device) -> None:
        self.channels = torch.tensor(list(channels), device=device)
        self.k = k
        self.values = torch.full((len(channels), 0), float("-inf"), device=device)
        self.ranks = torch.zeros((len(channels), 0), dtype=torch.long, device=device)
        self.places = torch.zeros((len(channels), 0), dtype=torch.long, device=device)

    def update(self, activations: torch.Tensor, ranks: torch.Tensor) -> None:
        """Fold in ``(B, K, h, w)`` activations of images whose global ranks (path order) are ``ranks``."""
        maxima, places = activations[:, self.channels].flatten(2).max(2)  # first maximum on ties
        self.fold(maxima.T, ranks.to(maxima.device)[None].expand(len(self.channels), -1), places.T)

    def fold(self, values: torch.Tensor, ranks: torch.Tensor, places: torch.Tensor) -> None:
        """Keep the k best of the kept columns and these: highest value, then lowest rank.

        Exact whatever order columns come in, so ranks that scanned different chunks merge into
        the single-process answer.
        """
        device = self.values.device
        values = torch.cat([self.values, values.to(device)], dim=1)
        ranks = torch.cat([self.ranks, ranks.to(device)], dim=1)
        places = torch.cat([self.places, places.to(device)], dim=1)
        # Sort by rank, then stably by value (descending): equal values keep path order.
        order = ranks.argsort(dim=1, stable=True)
        order = order.gather(1, values.gather(1, order).argsort(dim=1, descending=True, stable=True))[:, : self.k]
        self.values, self.ranks, self.places = values.gather(1, order), ranks.gather(1, order), places.gather(1, order)

    def columns(self) -> dict[str, torch.Tensor]:
        """The kept columns on the CPU (to save, or to send to another rank)."""
        return {"values": self.values.cpu(), "ranks": self.ranks.cpu(), "places": self.places.cpu()}


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


def chunk_count(files: int) -> int:
    """How many ``SCAN_CHUNK``-file chunks a sorted list of ``files`` files makes (the last may be short)."""
    return math.ceil(files / SCAN_CHUNK)


def scan(model: LoadedModel, layers: Sequence[Layer], tops: Sequence[TopK], paths: Sequence[Path],
         failures: list[ImageError], *, chunks: Sequence[int] | None = None, batch_size: int = 32, workers: int = 0,
         decode: str = "cpu") -> Iterator[int]:
    """Run the files of ``chunks`` (default: all) through the model, folding each layer's activations into its ``top``.

    Chunk ``c`` is files ``c·SCAN_CHUNK`` to ``(c+1)·SCAN_CHUNK`` of ``paths``, which must be in
    the order that breaks ties (``find_images`` sorts them). One pass per chunk records every
    layer (in graph order) and stops at the last. Files that fail go to ``failures``. Yields how
    many of ``chunks`` are done after each batch (batches hold whole chunks).
    """
    if chunks is None:
        chunks = range(chunk_count(len(paths)))
    files = [path for chunk in chunks for path in paths[chunk * SCAN_CHUNK:(chunk + 1) * SCAN_CHUNK]]
    rank = {path: i for i, path in enumerate(paths)}
    points = [layer.point for layer in layers]
    per_read = chunk_count(batch_size) * SCAN_CHUNK
    for batch in model.read(files, failures, batch_size=per_read, workers=workers, decode=decode):
        images = batch.images.to(model.device, non_blocking=True)  # one copy per batch; chunks are cut there
        ranks = torch.tensor([rank[path] for path in batch.paths])
        _, sizes = torch.unique_consecutive(ranks // SCAN_CHUNK, return_counts=True)
        on_device = ranks.to(model.device, non_blocking=True)  # copied once: a blocking copy per chunk would wait on the device
        for chunk, chunk_ranks in zip(images.split(sizes.tolist()), on_device.split(sizes.tolist())):
            padded = torch.cat([chunk, chunk.new_zeros(SCAN_CHUNK - len(chunk), *chunk.shape[1:])])
            for top, activations in zip(tops, record_points(model.module, points, padded)):
                top.update(activations[: len(chunk)], chunk_ranks)
        yield chunk_count(batch.done)


def hits(top: TopK, layer: Layer, paths: Sequence[Path], input_size: tuple[int, int, int]) -> dict[int, list[Hit]]:
    """The scan's result: channel → its hits, strongest first.

    Only positive maxima count (a channel silent on an image has nothing to project), so a
    channel can have fewer than k hits, or none (a dead filter).
    """
    map_width = layer.output_shape[2]
    result = {}
    for channel, values, ranks, places in zip(top.channels.tolist(), top.values.tolist(), top.ranks.tolist(),
                                              top.places.tolist()):
        result[channel] = [layer.hit(paths[rank], channel, divmod(place, map_width), value, input_size)
                           for value, rank, place in zip(values, ranks, places)
                           if value > 0]  # the unit never fired on this image: nothing to project
    return result


def project_hits(deconvnets: Sequence[Deconvnet], found: Sequence[dict[int, list[Hit]]], failures: list[ImageError],
                 *, only: set[tuple[int, int]] | None = None, batch_size: int = 32, decode: str = "cpu"
                 ) -> Iterator[tuple[int, ImageProjections]]:
    """Project the hits ``found[i]`` (channel → hits) through ``deconvnets[i]``, reading each image once.

    Each image runs alone, and all its hits at a layer go down together, so a projection's bits
    depend on nothing but the image and its hits: not on the batch size, nor on which
    ``(layer index, channel)`` pairs are asked for (``only``; default all), which is how ranks
    that draw different channels still draw what one process draws. Yields ``(i, one image's
    projections at layer i)`` for the pairs asked for, images in path order. Images are read again
    (the scan kept none), with the scan's decoder; one that no longer loads goes to ``failures``.
    """
    def asked(i: int, hit: Hit) -> bool:
        return only is None or (i, hit.channel) in only

    model = deconvnets[0].model
    every: dict[Path, dict[int, list[Hit]]] = defaultdict(lambda: defaultdict(list))  # image → layer → its hits
    for i, layer_found in enumerate(found):
        for hit in (hit for channel_hits in layer_found.values() for hit in channel_hits):
            every[hit.image][i].append(hit)
    paths = sorted(path for path, layers in every.items() if any(asked(i, hit) for i in layers for hit in layers[i]))
    for batch in model.read(paths, failures, batch_size=batch_size, decode=decode):
        for path, image in zip(batch.paths, batch.images):
            on_device, on_cpu = image[None].to(model.device), image.cpu()
            for i, image_hits in sorted(every[path].items()):
                if not deconvnets[i].walks:  # autograd projects each seed on its own: only those asked
                    image_hits = [hit for hit in image_hits if asked(i, hit)]
                if any(asked(i, hit) for hit in image_hits):
                    (projections,) = deconvnets[i].project_hits(deconvnets[i].forward(on_device), [image_hits])
                    yield i, ImageProjections(path, on_cpu, [p for p in projections if asked(i, p.hit)])
