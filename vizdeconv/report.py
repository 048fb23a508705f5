"""The top-k report of one layer: per-channel figures, overview sheets, index.json, and the HTML page.

Layout under ``OUT``: ``<layer>/ch{C:03d}.png``, ``<layer>/overview.png`` (``overview-2.png`` … when
there are more than ``SHEET`` channels), ``<layer>/index.json``, and ``index.html`` for every
layer run into ``OUT``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from vizdeconv import render
from vizdeconv.errors import ImageError
from vizdeconv.layers import Layer
from vizdeconv.models import LoadedModel
from vizdeconv.outputs import save_json, save_png, write_atomic
from vizdeconv.projections import layer_slug
from vizdeconv.topk import Hit

SHEET = 64  # channel figures per overview sheet
DISPLAY = ("projections scaled symmetrically around zero, each on its own: 0.5 + 0.5·p/max|p| (zero is mid-grey); "
           "patches and projections cropped to the unit's receptive field, white where it reaches past the image")

Tiles = dict[int, dict[int, tuple]]  # channel → slot → (projection tile, patch tile)


def make_tiles(model: LoadedModel, layer: Layer, found: dict[int, list[Hit]],
               projected: Iterable[tuple[Path, torch.Tensor, list[tuple[int, int, torch.Tensor]]]]) -> Tiles:
    """Turn ``topk.project_hits`` output into display tiles (channel → slot → (projection, patch))."""
    side = render.tile_side(max(layer.field.size))
    tiles: Tiles = {channel: {} for channel in found}
    for _, image, entries in projected:
        picture = render.input_to_image(image, model.mean, model.std)
        for channel, slot, pixels in entries:
            window = layer.field.window(*found[channel][slot].position)
            tiles[channel][slot] = (render.field_tile(render.projection_to_image(pixels), window, side),
                                    render.field_tile(picture, window, side))
    return tiles


def write_layer(out: Path, model: LoadedModel, layer: Layer, rule: str, k: int, found: dict[int, list[Hit]],
                tiles: Tiles, scanned: int, failures: list[ImageError]) -> Path:
    """Write the layer's folder and refresh ``OUT/index.html``; returns the layer folder."""
    folder = out / layer_slug(layer)
    columns = math.ceil(math.sqrt(k))
    figures = []
    channels = []
    for channel, channel_hits in found.items():
        if not channel_hits:
            continue
        pairs = [tiles[channel][slot] for slot in range(len(channel_hits))]
        figure = render.channel_figure([p for p, _ in pairs], [q for _, q in pairs], columns,
                                       f"{layer.label} ch {channel}: top {len(channel_hits)}, "
                                       f"max {channel_hits[0].value:.3g}")
        save_png(folder / f"ch{channel:03d}.png", figure)
        figures.append(figure)
        channels.append({"channel": channel, "png": f"ch{channel:03d}.png", "hits": [
            {"image": str(h.image), "value": h.value, "position": list(h.position), "box": list(h.box),
             "clipped": h.clipped} for h in channel_hits]})
    sheets = []
    for number, start in enumerate(range(0, len(figures), SHEET), start=1):
        name = "overview.png" if number == 1 else f"overview-{number}.png"
        last = min(start + SHEET, len(channels))
        title = (f"{model.name}, {layer.label}, {rule} rule: channels {channels[start]['channel']}..{channels[last - 1]['channel']}, "
                 f"top {k} over {scanned} images (left: projections, right: patches)")
        save_png(folder / name, render.sheet(figures[start:last], 8, title))
        sheets.append(name)
    save_json(folder / "index.json", {
        "model": model.name, "weights": model.weights, "layer": layer.number, "module": layer.name, "rule": rule,
        "input_size": list(model.input_size), "k": k,
        "receptive_field": {"size": list(layer.field.size), "stride": list(layer.field.stride),
                            "offset": list(layer.field.offset)},
        "images_scanned": scanned, "failed": [{"image": str(f.path), "reason": f.reason} for f in failures],
        "display": DISPLAY, "overview": sheets, "channels": channels,
    })
    write_index_html(out)
    return folder


def write_index_html(out: Path) -> Path:
    """A static page over every layer folder in ``out`` (thumbnails link to the full figures)."""
    sections = []
    for index in sorted(out.glob("*/index.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        data = json.loads(index.read_text())
        folder = html.escape(index.parent.name)
        title = f"layer {data['layer']} ({data['module']})" if data["layer"] else data["module"]
        cards = "".join(
            f'<figure><a href="{folder}/{c["png"]}"><img src="{folder}/{c["png"]}" loading="lazy"></a>'
            f'<figcaption>ch {c["channel"]}: {c["hits"][0]["value"]:.3g}</figcaption></figure>'
            for c in data["channels"])
        overviews = " ".join(f'<a href="{folder}/{name}">{html.escape(name)}</a>' for name in data["overview"])
        failed = "".join(f"<li>{html.escape(f['image'])}: {html.escape(f['reason'])}</li>" for f in data["failed"])
        sections.append(
            f'<section id="{folder}"><h2>{html.escape(title)}</h2>'
            f"<p>{html.escape(data['model'])} ({html.escape(data['weights'])}), {html.escape(data['rule'])} rule, "
            f"top {data['k']} over "
            f"{data['images_scanned']} images; receptive field {data['receptive_field']['size'][0]} px. "
            f"Overview: {overviews}. <a href=\"{folder}/index.json\">index.json</a></p>"
            + (f"<details><summary>{len(data['failed'])} failed files</summary><ul>{failed}</ul></details>"
               if failed else "")
            + f'<div class="grid">{cards}</div></section>')
    nav = " · ".join(f'<a href="#{html.escape(p.parent.name)}">{html.escape(p.parent.name)}</a>'
                     for p in sorted(out.glob("*/index.json")))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vizdeconv: top activations</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; }} figure img {{ width: 240px; border: 1px solid #ccc; }}
figcaption {{ font-size: 12px; color: #333; }}
</style></head><body>
<h1>vizdeconv: top activations per feature map</h1>
<p>{html.escape(DISPLAY)}. Click a figure to see it full size. Layers: {nav}</p>
{"".join(sections)}
</body></html>
"""
    return write_atomic(out / "index.html", lambda file: file.write(page.encode()))
