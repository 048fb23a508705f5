"""Invariance of features to translation, scaling and rotation: Zeiler & Fergus 2014, Fig. 5.

Each transformation works on the preprocessed input, so every image is transformed the same way
in the model's own pixels, and fills what it uncovers with 0, the dataset mean after
normalisation:

- ``translate`` by d pixels: rows shift down by d (up for negative d), whole pixels, no interpolation.
- ``scale`` by s about the centre: output pixel p samples the input at c + (p − c)/s, bilinear.
- ``rotate`` by θ degrees about the centre, anticlockwise as displayed: output pixel p samples the
  input at c + R(−θ)(p − c), bilinear.

c = ((H − 1)/2, (W − 1)/2) is the centre in pixel coordinates. The identity (d = 0, s = 1,
θ a multiple of 360) returns the input itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vizdeconv.errors import VizDeconvError
from vizdeconv.features import FeatureLayer, features
from vizdeconv.models import LoadedModel

TRANSFORMS = ("translate", "scale", "rotate")
PAPER_SIDE = 224  # the default translations are the paper's pixels at this side


def default_amounts(transform: str, side: int) -> list[float]:
    """The default range of one transformation for inputs ``side`` pixels high.

    translate: −60..60 px in steps of 5 at 224 px, scaled to ``side`` and rounded (duplicates
    dropped); scale: 0.6..1.4 in steps of 0.05; rotate: 0..360° in steps of 10.
    """
    check_transform(transform)
    if transform == "translate":
        return sorted({float(round(d * side / PAPER_SIDE)) for d in range(-60, 61, 5)})
    if transform == "scale":
        return [round(0.6 + 0.05 * i, 2) for i in range(17)]
    return [float(angle) for angle in range(0, 361, 10)]


def parse_amounts(text: str) -> tuple[str, list[float]]:
    """``rotate=0:90:15`` (start, stop and step, the stop included when the steps reach it) or
    ``rotate=0,45,90`` → the transformation and its amounts.

    Raises:
        VizDeconvError: anything else, with the forms it takes.
    """
    transform, equals, values = text.partition("=")
    transform = transform.strip()
    try:
        check_transform(transform)
        if ":" in values:
            start, stop, step = (float(v) for v in values.split(":"))
            if not all(map(math.isfinite, (start, stop, step))) or step <= 0 or stop < start:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            return transform, [round(start + i * step, 10) for i in range(count)]
        amounts = [float(v) for v in values.split(",")]
        if not equals or not all(map(math.isfinite, amounts)):
            raise ValueError
        return transform, amounts
    except ValueError:
        raise VizDeconvError(f"--amounts {text!r}: expected TRANSFORM=START:STOP:STEP (finite, STOP ≥ START, "
                             "STEP > 0) or TRANSFORM=A,B,C, e.g. rotate=0:90:15") from None


def check_amount(transform: str, amount: float) -> None:
    """Raise ``VizDeconvError`` unless ``amount`` is finite and fits ``transform``: whole pixels for
    ``translate``, a positive factor for ``scale``."""
    check_transform(transform)
    if not math.isfinite(amount):
        raise VizDeconvError(f"{transform} by {amount}: amounts must be finite numbers")
    if transform == "translate" and amount != int(amount):
        raise VizDeconvError(f"translation by {amount} pixels: translations are whole pixels")
    if transform == "scale" and amount <= 0:
        raise VizDeconvError(f"scale factor {amount} must be positive")


def check_transform(transform: str) -> None:
    if transform not in TRANSFORMS:
        raise VizDeconvError(f"unknown transform {transform!r}; expected one of {', '.join(TRANSFORMS)}")


def is_identity(transform: str, amount: float) -> bool:
    return {"translate": amount == 0, "scale": amount == 1, "rotate": amount % 360 == 0}[transform]


def transformed(images: torch.Tensor, transform: str, amount: float) -> torch.Tensor:
    """``(N, C, H, W)`` preprocessed images moved by ``amount`` (pixels, factor or degrees), mean-filled."""
    check_amount(transform, amount)
    if is_identity(transform, amount):
        return images
    if transform == "translate":
        return translate(images, int(amount))
    if transform == "scale":
        inverse = torch.eye(2, dtype=torch.float64) / amount
    else:
        angle = math.radians(amount)
        # image rows grow downwards, so anticlockwise on screen is (y, x) → (y cos θ − x sin θ, ...) in these axes
        inverse = torch.tensor([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]],
                               dtype=torch.float64)
    return _resample(images, inverse)


def translate(images: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows shifted down by ``rows`` (up when negative); the uncovered rows are 0."""
    out = torch.zeros_like(images)
    height = images.shape[2]
    if abs(rows) >= height:
        return out
    if rows >= 0:
        out[:, :, rows:] = images[:, :, : height - rows]
    else:
        out[:, :, : height + rows] = images[:, :, -rows:]
    return out


def _resample(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Bilinear samples at c + inverse·(p − c) for each output pixel p = (y, x); 0 outside the input."""
    height, width = images.shape[2:]
    centre = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    offsets = torch.stack([ys, xs], dim=-1) - centre
    source = offsets @ inverse.T + centre  # (H, W, 2) as (y, x)
    # grid_sample wants (x, y) in [-1, 1], with align_corners=True meaning -1 and 1 are the edge pixels' centres
    grid = torch.stack([2 * source[..., 1] / max(width - 1, 1) - 1, 2 * source[..., 0] / max(height - 1, 1) - 1],
                       dim=-1)
    grid = grid.to(images.dtype).to(images.device).expand(len(images), height, width, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


@dataclass(frozen=True)
class Measurement:
    """One transformation amount on a batch of N images.

    Attributes:
        distances: ``(layers, N)`` Euclidean distance between original and transformed feature vectors.
        p_true: ``(N,)`` softmax probability of each image's true class on the transformed image.
        classes: ``(N,)`` the true classes used.
    """

    transform: str
    amount: float
    distances: torch.Tensor
    p_true: torch.Tensor
    classes: torch.Tensor


@torch.no_grad()
def measure(model: LoadedModel, chosen: Sequence[FeatureLayer], images: torch.Tensor,
            amounts: dict[str, Sequence[float]], targets: Sequence[int | None]) -> Iterator[Measurement]:
    """Distances and p(true class) of a batch under each transformation amount.

    Args:
        images: ``(N, C, H, W)`` preprocessed, on the model's device.
        amounts: transformation → its amounts, measured in this order.
        targets: each image's true class, or None for its top-1 class untransformed.
    """
    originals, original_logits = features(model, list(chosen), images)
    top = original_logits.argmax(1).tolist()
    classes = torch.tensor([top[i] if target is None else target for i, target in enumerate(targets)],
                           device=original_logits.device)
    for transform, values in amounts.items():
        for amount in values:
            moved, logits = (originals, original_logits) if is_identity(transform, amount) else \
                features(model, list(chosen), transformed(images, transform, amount))
            distances = torch.stack([(a - b).norm(dim=1) for a, b in zip(originals, moved)])
            p_true = logits.softmax(1).gather(1, classes[:, None])[:, 0]
            yield Measurement(transform, float(amount), distances.cpu(), p_true.cpu(), classes.cpu())

