"""Turning tensors into pictures people look at.

Display conventions (also in the README): inputs are un-normalised back to pixels; a projection
is scaled symmetrically around zero, ``0.5 + 0.5 · p / max|p|``, so zero is mid-grey and the sign
shows as brighter or darker, with all of a projection's channels sharing one scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PANEL = 192
BOX_COLOUR = (255, 40, 40)


def input_to_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """A normalised ``(C, H, W)`` input back as an 8-bit RGB picture."""
    pixels = image.detach().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return _to_rgb(pixels)


def projection_to_image(projection: torch.Tensor) -> Image.Image:
    """A ``(C, H, W)`` projection as RGB, scaled symmetrically around zero (zero is mid-grey)."""
    projection = projection.detach().cpu().float()
    peak = projection.abs().max().clamp_min(1e-12)
    return _to_rgb(0.5 + 0.5 * projection / peak)


def _to_rgb(pixels: torch.Tensor) -> Image.Image:
    array = (pixels.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(array, mode="RGB")


def fit(image: Image.Image, side: int = PANEL) -> Image.Image:
    """Scale to ``side`` on the longer edge: nearest neighbour when enlarging, so pixels stay visible."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def draw_box(image: Image.Image, box: tuple[int, int, int, int], scale: float) -> Image.Image:
    """A copy of ``image`` with the ``(y0, x0, y1, x1)`` box outlined (box in unscaled pixels)."""
    y0, x0, y1, x1 = box
    image = image.copy()
    ImageDraw.Draw(image).rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1],
                                    outline=BOX_COLOUR, width=2)
    return image


def crop(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    y0, x0, y1, x1 = box
    return image.crop((x0, y0, x1, y1))


def font(size: int = 13) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def labelled_row(panels: Sequence[Image.Image], labels: Sequence[str], *, side: int = PANEL) -> Image.Image:
    """Panels side by side in ``side``-pixel cells, each with a caption above it."""
    caption = 18
    row = Image.new("RGB", (len(panels) * (side + 8) + 8, side + caption + 8), "white")
    draw = ImageDraw.Draw(row)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        left = 8 + i * (side + 8)
        draw.text((left, 2), label, fill="black", font=font())
        row.paste(panel, (left + (side - panel.width) // 2, caption + (side - panel.height) // 2))
    return row


def stack(rows: Sequence[Image.Image], title: str = "") -> Image.Image:
    """Rows one above the other under an optional title line."""
    top = 24 if title else 0
    sheet = Image.new("RGB", (max(r.width for r in rows), top + sum(r.height for r in rows)), "white")
    if title:
        ImageDraw.Draw(sheet).text((8, 4), title, fill="black", font=font(15))
    y = top
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    return sheet
