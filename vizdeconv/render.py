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


def field_tile(picture: Image.Image, window: tuple[int, int, int, int], side: int) -> Image.Image:
    """The receptive-field ``window`` of ``picture`` as a ``side``-pixel square tile.

    Where the window reaches past the image (it is clipped), the missing part stays white, so
    every tile of a layer shows the same field at the same scale and alignment.
    """
    y0, x0, y1, x1 = window
    canvas = Image.new("RGB", (x1 - x0, y1 - y0), "white")
    inside = picture.crop((max(x0, 0), max(y0, 0), min(x1, picture.width), min(y1, picture.height)))
    canvas.paste(inside, (max(x0, 0) - x0, max(y0, 0) - y0))
    return canvas.resize((side, side), Image.NEAREST if side >= canvas.width else Image.LANCZOS)


def tile_side(field_size: int) -> int:
    """Display size of a receptive-field tile: small fields enlarged to ≥ 64 px, large ones capped at 112."""
    if field_size >= 64:
        return min(field_size, 112)
    return field_size * -(-64 // field_size)


def grid(tiles: Sequence[Image.Image], columns: int, gap: int = 2) -> Image.Image:
    """Equal-sized tiles in rows of ``columns``."""
    side = tiles[0].width if tiles else 1
    rows = -(-max(len(tiles), 1) // columns)
    sheet = Image.new("RGB", (columns * (side + gap) - gap, rows * (side + gap) - gap), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * (side + gap), (i // columns) * (side + gap)))
    return sheet


def channel_figure(projections: Sequence[Image.Image], patches: Sequence[Image.Image], columns: int,
                   title: str) -> Image.Image:
    """The paper's Fig. 2 layout: projections on the left, the matching image patches on the right."""
    left, right = grid(projections, columns), grid(patches, columns)
    top = 20
    figure = Image.new("RGB", (left.width + right.width + 24, left.height + top + 8), "white")
    ImageDraw.Draw(figure).text((8, 2), title, fill="black", font=font(12))
    figure.paste(left, (8, top))
    figure.paste(right, (16 + left.width, top))
    return figure


def sheet(figures: Sequence[Image.Image], columns: int, title: str) -> Image.Image:
    """Figures (of any sizes) tiled in rows under a title."""
    cell_w = max(f.width for f in figures) + 8
    cell_h = max(f.height for f in figures) + 8
    rows = -(-len(figures) // columns)
    page = Image.new("RGB", (columns * cell_w + 8, rows * cell_h + 32), "white")
    ImageDraw.Draw(page).text((8, 6), title, fill="black", font=font(15))
    for i, figure in enumerate(figures):
        page.paste(figure, (8 + (i % columns) * cell_w, 32 + (i // columns) * cell_h))
    return page


VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229)]


def heatmap(values: np.ndarray, low: float, high: float) -> Image.Image:
    """An h × w array in a viridis-like colour map, ``low`` dark purple to ``high`` yellow."""
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1) * (len(VIRIDIS) - 1)
    below = np.floor(scaled).astype(int).clip(0, len(VIRIDIS) - 2)
    weight = (scaled - below)[..., None]
    colours = VIRIDIS[below] * (1 - weight) + VIRIDIS[below + 1] * weight
    return Image.fromarray(colours.round().astype(np.uint8), mode="RGB")


def class_colours(classes: np.ndarray) -> Image.Image:
    """An h × w array of class indices in categorical colours (``PALETTE``, cycled)."""
    palette = np.array(PALETTE, dtype=np.uint8)
    return Image.fromarray(palette[classes % len(palette)], mode="RGB")


def overlay(picture: Image.Image, cells: Image.Image, corners_y, corners_x, size: int, alpha: float = 0.55):
    """Blend a map over the picture: each cell covers the square's stride around the square's centre."""
    step_y = int(corners_y[1] - corners_y[0]) if len(corners_y) > 1 else size
    step_x = int(corners_x[1] - corners_x[0]) if len(corners_x) > 1 else size
    layer = cells.resize((cells.width * step_x, cells.height * step_y), Image.NEAREST)
    canvas = picture.copy()
    canvas.paste(layer, (int(corners_x[0]) + (size - step_x) // 2, int(corners_y[0]) + (size - step_y) // 2))
    return Image.blend(picture, canvas, alpha)
