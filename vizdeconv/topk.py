"""Top-k activations per feature map over an image folder, and their projections (paper Fig. 2).

The scan keeps, per channel, the k strongest activations taking one maximum per image, so the k
come from k different images. It reduces each batch on the device as it goes: memory is
O(channels × k) whatever the folder size. Ties break by image path, then position (the first
maximum in row-major order), so the result does not depend on batch size, workers or file order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from vizdeconv.deconvnet import Deconvnet, ImageProjections
from vizdeconv.errors import ImageError, LayerError
from vizdeconv.layers import Hit, Layer

# Conv kernels choose their algorithm by batch size, so an activation can differ in its last bits
# between batch sizes; the scan always runs chunks of this many images (the last one zero-padded)
# so that rankings, and ties, are identical for any --batch-size or --workers.
SCAN_CHUNK = 16


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


def scan(deconvnet: Deconvnet, paths: Sequence[Path], top: TopK, failures: list[ImageError], *,
         batch_size: int = 32, workers: int = 0) -> Iterator[int]:
    """Run the images through the model up to the deconvnet's layer, folding each batch into ``top``.

    ``paths`` must be in the order that breaks ties (``find_images`` sorts them). Files that fail
    go to ``failures``. Yields how many files are done (read or failed) after each batch.
    """
    model = deconvnet.model
    rank = {path: i for i, path in enumerate(paths)}
    for batch in model.read(paths, failures, batch_size=batch_size, workers=workers):
        ranks = torch.tensor([rank[p] for p in batch.paths])
        for images, chunk_ranks in zip(batch.images.split(SCAN_CHUNK), ranks.split(SCAN_CHUNK)):
            padded = torch.cat([images, images.new_zeros(SCAN_CHUNK - len(images), *images.shape[1:])])
            activations = deconvnet.activations(padded.to(model.device, non_blocking=True))
            top.update(activations[: len(images)], chunk_ranks)
        yield batch.done


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


def project_hits(deconvnet: Deconvnet, found: dict[int, list[Hit]], failures: list[ImageError], *,
                 batch_size: int = 32) -> Iterator[ImageProjections]:
    """Project every hit, one forward pass per image, images in path order.

    Images are read again (nothing was kept by the scan); one that no longer loads goes to ``failures``.
    """
    model = deconvnet.model
    wanted: dict[Path, list[Hit]] = defaultdict(list)
    for channel_hits in found.values():
        for hit in channel_hits:
            wanted[hit.image].append(hit)
    for batch in model.read(sorted(wanted), failures, batch_size=batch_size):
        forward = deconvnet.forward(batch.images.to(model.device))
        projected = deconvnet.project_hits(forward, [wanted[path] for path in batch.paths])
        for path, image, projections in zip(batch.paths, batch.images, projected):
            yield ImageProjections(path, image, projections)
