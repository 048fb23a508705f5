"""Turning tensors into pictures people look at.

Display conventions (also in the README): inputs are un-normalised back to pixels; a projection
is scaled symmetrically around zero, ``0.5 + 0.5 · p / s`` clipped to 0..1, so zero is mid-grey
and the sign shows as brighter or darker, all of a projection's channels sharing one scale ``s``:
the ``CONTRAST`` quantile of its nonzero ``|p|``, so that a few extreme pixels (the checkerboards
of strided transposed convs) do not leave the rest grey. Saved arrays keep the raw values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PANEL = 192
BOX_COLOUR = (255, 40, 40)
CONTRAST = 0.99  # quantile of |p| shown at full brightness (Captum's visualisation clips 2 %)
DISPLAY = ("projections scaled symmetrically around zero (zero is mid-grey), each on its own: 0.5 + 0.5·p/s clipped, "
           f"s the {round(100 * CONTRAST)}th percentile of its nonzero |p|; top-k tiles show the unit's receptive "
           "field (the whole image along an axis where the field covers it), grey where the field reaches past the image")


def input_to_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """A normalised ``(C, H, W)`` input back as an 8-bit RGB picture."""
    pixels = image.detach().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return to_rgb(pixels)


def projection_to_image(projection: torch.Tensor) -> Image.Image:
    """A ``(C, H, W)`` projection as RGB, scaled symmetrically around zero (zero is mid-grey), ``CONTRAST``."""
    projection = projection.detach().cpu().float()
    magnitudes = projection.abs().flatten()
    magnitudes = magnitudes[magnitudes > 0]
    scale = magnitudes.quantile(CONTRAST).item() if len(magnitudes) else 1.0
    return to_rgb(0.5 + 0.5 * projection / scale)


def to_rgb(pixels: torch.Tensor) -> Image.Image:
    """A ``(C, H, W)`` picture in 0..1 (clipped) as 8-bit RGB; one channel is shown grey."""
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


OUTSIDE = (170, 170, 170)  # a receptive field's part beyond the image: neutral grey, lighter than a zero projection
TILE_MIN, TILE_MAX = 96, 192  # display side of a receptive-field tile


def display_window(window: tuple[int, int, int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """What a tile shows of a unit's field ``window``: the field itself, or, along an axis where the
    field is at least as long as the image (the unit sees all of it), the whole image."""
    y0, x0, y1, x1 = window
    if y1 - y0 >= height:
        y0, y1 = 0, height
    if x1 - x0 >= width:
        x0, x1 = 0, width
    return y0, x0, y1, x1


def tile_size(window: tuple[int, int, int, int]) -> tuple[int, int]:
    """Display ``(width, height)`` of a tile: small windows enlarged by a whole factor (nearest
    neighbour) to at least ``TILE_MIN`` px, large ones reduced to ``TILE_MAX``, others as they are."""
    y0, x0, y1, x1 = window
    longer = max(y1 - y0, x1 - x0)
    scale = -(-TILE_MIN // longer) if longer < TILE_MIN else min(1.0, TILE_MAX / longer)
    return max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))


def field_tile(picture: Image.Image, window: tuple[int, int, int, int]) -> Image.Image:
    """``picture``'s ``window`` (from ``display_window``) as a tile of ``tile_size``; where the window
    reaches past the image, ``OUTSIDE`` grey, so every tile of a layer has the same scale and alignment."""
    y0, x0, y1, x1 = window
    canvas = Image.new("RGB", (x1 - x0, y1 - y0), OUTSIDE)
    inside = picture.crop((max(x0, 0), max(y0, 0), min(x1, picture.width), min(y1, picture.height)))
    canvas.paste(inside, (max(x0, 0) - x0, max(y0, 0) - y0))
    size = tile_size(window)
    return canvas.resize(size, Image.NEAREST if size[0] >= canvas.width else Image.LANCZOS)


def fit_text(text: str, width: int, size: int = 12) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels in ``font(size)``."""
    face = font(size)
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
# Okabe & Ito's colour-blind-safe colours (their black left out: it reads as a hole in an overlay).
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167)]
OTHER = (110, 110, 110)  # classes beyond the palette


def heatmap(values: np.ndarray, low: float, high: float) -> Image.Image:
    """An h × w array in a viridis-like colour map, ``low`` dark purple to ``high`` yellow."""
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1) * (len(VIRIDIS) - 1)
    below = np.floor(scaled).astype(int).clip(0, len(VIRIDIS) - 2)
    weight = (scaled - below)[..., None]
    colours = VIRIDIS[below] * (1 - weight) + VIRIDIS[below + 1] * weight
    return Image.fromarray(colours.round().astype(np.uint8), mode="RGB")


def ranked_classes(classes: np.ndarray) -> list[int]:
    """The classes present in ``classes``, most frequent first (ties by class index)."""
    counts = np.bincount(classes.ravel())
    return [int(c) for c in np.argsort(-counts, kind="stable") if counts[c]]


def class_colours(classes: np.ndarray) -> Image.Image:
    """An h × w array of class indices in categorical colours: the most frequent classes in
    ``PALETTE`` order (as ``ranked_classes``), all rarer ones ``OTHER``."""
    lookup = np.tile(np.array(OTHER, dtype=np.uint8), (int(classes.max()) + 1, 1))
    for colour, index in zip(PALETTE, ranked_classes(classes)):
        lookup[index] = colour
    return Image.fromarray(lookup[classes], mode="RGB")


def overlay(picture: Image.Image, cells: Image.Image, corners_y, corners_x, size: int, alpha: float = 0.55):
    """Blend a map over the picture: each cell covers the square's stride around the square's centre."""
    step_y = int(corners_y[1] - corners_y[0]) if len(corners_y) > 1 else size
    step_x = int(corners_x[1] - corners_x[0]) if len(corners_x) > 1 else size
    layer = cells.resize((cells.width * step_x, cells.height * step_y), Image.NEAREST)
    canvas = picture.copy()
    canvas.paste(layer, (int(corners_x[0]) + (size - step_x) // 2, int(corners_y[0]) + (size - step_y) // 2))
    return Image.blend(picture, canvas, alpha)


def filter_tile(weight: torch.Tensor, side: int) -> Image.Image:
    """One ``(C, kh, kw)`` filter enlarged (nearest neighbour) to about ``side`` px, scaled on its own.

    One or three input channels: the weights, grey or RGB, symmetric around zero (``0.5 + 0.5·w/max|w|``,
    mid-grey = 0). Other counts: the L2 norm over the input channels at each tap, black = 0.
    """
    weight = weight.detach().cpu().float()
    if weight.shape[0] in (1, 3):
        pixels = 0.5 + 0.5 * weight / max(weight.abs().max().item(), 1e-12)
    else:
        norms = weight.norm(dim=0, keepdim=True)
        pixels = norms / max(norms.max().item(), 1e-12)
    image = to_rgb(pixels)
    scale = max(1, side // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
