"""Charts and tables drawn with matplotlib (no pyplot state: one ``Figure`` per picture)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from vizdeconv.correspondence import RANDOM, Box

DPI = 100
UNITS = {"translate": "shift (pixels, down > 0)", "scale": "scale factor", "rotate": "rotation (degrees, anticlockwise)"}


def to_image(figure: Figure) -> Image.Image:
    """The figure as an RGB picture."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def invariance_curves(title: str, amounts: dict[str, list[float]], layers: Sequence[str], images: Sequence[str],
                      distances: dict[str, np.ndarray], p_true: dict[str, np.ndarray]) -> Image.Image:
    """Fig. 5's layout: a row per transformation; a column per layer's distance, then p(true class);
    a line per image.

    Args:
        amounts: transformation → its amounts (the x axis).
        layers, images: the column and line labels.
        distances: transformation → ``(layers, images, amounts)``; p_true: transformation → ``(images, amounts)``.
    """
    rows, columns = len(amounts), len(layers) + 1
    figure = Figure(figsize=(3.2 * columns, 2.6 * rows + 0.9), layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(rows, columns, squeeze=False)
    for row, (transform, values) in enumerate(amounts.items()):
        for column in range(columns):
            ax = axes[row, column]
            curves = distances[transform][column] if column < len(layers) else p_true[transform]
            for image, curve in zip(images, curves):
                ax.plot(values, curve, marker=".", markersize=3, linewidth=1, label=image)
            ax.set_title(f"{transform}: " + (f"distance, {layers[column]}" if column < len(layers) else "p(true class)"),
                         fontsize=9)
            ax.set_xlabel(UNITS[transform], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if column == len(layers):
                ax.set_ylim(-0.02, 1.02)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(images), 4), fontsize=8)
    return to_image(figure)


def correspondence_figure(title: str, pictures: Sequence[Image.Image], names: Sequence[str],
                          boxes: Sequence[dict[str, Box]], parts: Sequence[str], layers: Sequence[str],
                          table: dict[tuple[str, str], tuple[float, float]]) -> Image.Image:
    """The images with their part boxes outlined, above Table 1: Δ ± std per part and layer."""
    columns = max(len(pictures), 1)
    figure = Figure(figsize=(max(2.6 * columns, 2.2 * (len(layers) + 1)), 3.2 + 0.32 * (len(parts) + 2)),
                    layout="constrained")
    figure.suptitle(title)
    top, bottom = figure.subfigures(2, 1, height_ratios=[2.4, 0.35 * (len(parts) + 2)])
    colours = [f"C{i}" for i in range(len(parts))]
    for ax, picture, name, image_boxes in zip(top.subplots(1, columns, squeeze=False)[0], pictures, names, boxes):
        ax.imshow(np.asarray(picture), cmap="gray" if picture.mode == "L" else None, vmin=0, vmax=255)
        for colour, part in zip(colours, parts):
            y0, x0, y1, x1 = image_boxes[part]
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ax = bottom.subplots()
    ax.axis("off")
    rows = list(parts) + [RANDOM]
    cells = [[f"{table[row, layer][0]:.3f} ± {table[row, layer][1]:.3f}" for layer in layers] for row in rows]
    drawn = ax.table(cellText=cells, rowLabels=rows, colLabels=[f"layer {layer}" if layer.isdigit() else layer for layer in layers], loc="center",
                     rowColours=colours + ["white"], cellLoc="center")
    drawn.scale(1, 1.3)
    return to_image(figure)
