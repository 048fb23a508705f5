"""Correspondence of object parts across images: Zeiler & Fergus 2014, section 5.1 and Table 1.

Mask the same part (a box in each image) and see whether a layer's features change the same way
in every image. For image i, ε_i = f(x_i) − f(masked x_i), the change of the layer's feature
vector. For a pair of images, the sign change is the fraction of the vector's entries where
sign(ε_i) ≠ sign(ε_j), signs in {−1, 0, 1}: a Hamming distance divided by the vector's length.
For a part, Δ is its mean over the pairs i ≠ j (ordered or not: the distance is symmetric, so
both means are the same), with the standard deviation over the pairs beside it, as the paper's
±. The random control masks, in each repeat, a box of each part's size at a random place in each
image; its Δ is the mean over repeats of each repeat's mean sign change (over its pairs and
parts), with the standard deviation over the repeats. Lower Δ than the random control means the
layer relates that part consistently across images.

Boxes are ``[y0, x0, y1, x1]`` in pixels of the original file, end exclusive; a masked box is
painted with the dataset mean colour (to 8 bits) before preprocessing, so it is about 0 after
normalisation (exactly 0 but for the rounding and the edges that resizing blurs).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vizdeconv.errors import VizDeconvError

Box = tuple[int, int, int, int]
RANDOM = "random"


def read_parts(path: str | os.PathLike) -> dict[str, dict[str, Box]]:
    """``PARTS.json``: image file name → part name → ``[y0, x0, y1, x1]``.

    Raises:
        VizDeconvError: one line naming the file and what is wrong with it.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise VizDeconvError(f"{path}: cannot read the parts file ({error})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(boxes, dict) and boxes for boxes in data.values()):
        raise VizDeconvError(f'{path}: expected {{"image.jpg": {{"part": [y0, x0, y1, x1], ...}}, ...}}')
    parts = {}
    for image, boxes in data.items():
        for part, box in boxes.items():
            if part == RANDOM:
                raise VizDeconvError(f"{path}: {image}: 'random' names the control; call the part something else")
            if not (isinstance(box, list) and len(box) == 4 and all(type(v) is int for v in box)):
                raise VizDeconvError(f"{path}: {image}: {part!r} should be [y0, x0, y1, x1] in whole pixels, "
                                     f"got {json.dumps(box)}")
        parts[image] = {part: tuple(box) for part, box in boxes.items()}
    return parts


def match_parts(parts: dict[str, dict[str, Box]], images: Sequence[Path], source: str) -> list[str]:
    """The part names, in the order they first appear in ``PARTS.json``, after checking that every image
    has an entry (by file name, or path as given) with the same parts.

    Raises:
        VizDeconvError: an image without an entry, or with other parts than the first image.
    """
    names = None
    for path in images:
        boxes = boxes_of(parts, path, source)
        if names is None:
            names, first = set(boxes), path
        elif set(boxes) != names:
            missing, extra = sorted(set(names) - set(boxes)), sorted(set(boxes) - set(names))
            raise VizDeconvError(f"{source}: {path.name} has parts {sorted(boxes)} but {first.name} has "
                                 f"{sorted(names)}" + (f"; unknown part {extra[0]!r}" if extra else
                                                       f"; missing {missing[0]!r}") + " (every image needs the same parts)")
    return [part for part in dict.fromkeys(p for boxes in parts.values() for p in boxes) if part in (names or ())]


def boxes_of(parts: dict[str, dict[str, Box]], path: Path, source: str) -> dict[str, Box]:
    for key in (str(path), path.as_posix(), path.name):
        if key in parts:
            return parts[key]
    raise VizDeconvError(f"{source} has no entry for {path.name} (its images: {', '.join(sorted(parts))})")


def check_box(box: Box, size: tuple[int, int], part: str) -> None:
    """Raise ``VizDeconvError`` unless ``box`` is a non-empty box inside a ``(height, width)`` image."""
    y0, x0, y1, x1 = box
    height, width = size
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise VizDeconvError(f"part {part!r} box {list(box)} is empty or outside the {height}×{width} image "
                             "(boxes are [y0, x0, y1, x1], end exclusive)")


def masked(picture: Image.Image, box: Box, fill: Sequence[float]) -> Image.Image:
    """A copy of ``picture`` with ``box`` painted ``fill`` (per channel, 0..1: the dataset mean)."""
    y0, x0, y1, x1 = box
    colour = tuple(round(255 * v) for v in fill)
    picture = picture.copy()
    ImageDraw.Draw(picture).rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour[0] if picture.mode == "L" else colour)
    return picture


def random_box(rng: np.random.Generator, size: tuple[int, int], image: tuple[int, int]) -> Box:
    """A box of ``size`` (height, width) at a uniformly random place inside a ``(height, width)`` image."""
    y0 = int(rng.integers(0, image[0] - size[0] + 1))
    x0 = int(rng.integers(0, image[1] - size[1] + 1))
    return y0, x0, y0 + size[0], x0 + size[1]


def sign_changes(changes: torch.Tensor) -> torch.Tensor:
    """Per pair i < j of the ``(n, D)`` feature changes ε, the fraction of entries whose signs differ
    (pair by pair: D may be large)."""
    signs = torch.sign(changes)
    return torch.tensor([(signs[i] != signs[j]).sum(dtype=torch.float64).item() / signs.shape[1]
                         for i, j in itertools.combinations(range(len(signs)), 2)], dtype=torch.float64)


def delta(pairs: torch.Tensor) -> tuple[float, float]:
    """Δ and its standard deviation (population, over the pairs) from ``sign_changes``."""
    return pairs.mean().item(), pairs.std(unbiased=False).item()
