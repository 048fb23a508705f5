"""The pictures each command writes, composed from ``render``'s pieces.

Top-k figures read like the paper's Fig. 2: equal tiles on a regular grid, the projections on
the left and the image patches that caused them on the right in the same order, each tile
captioned; occlusion figures follow Fig. 7; deconv figures show each projection beside its input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from vizdeconv import render
from vizdeconv.deconvnet import Projection
from vizdeconv.filters import RENORMALISE_RMS, FilterStats
from vizdeconv.layers import Layer
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import OcclusionMaps

GAP, BLOCK_GAP, MARGIN, CAPTION = 4, 20, 10, 16  # pixels between tiles, between the two blocks, around, per caption
FRAME = (140, 140, 140)  # the thin line around every tile
THUMB_WIDTH = 360  # a channel figure's width on an overview sheet
SHEET_COLUMNS = 6


def field_window(model: LoadedModel, layer: Layer, position: tuple[int, int]) -> tuple[int, int, int, int]:
    """What a tile shows of the unit at ``position``: its receptive field (``render.display_window``)."""
    return render.display_window(layer.field.window(*position), *model.input_size[1:])


def projection_tile(model: LoadedModel, layer: Layer, projection: Projection) -> Image.Image:
    """A projection as a tile of its unit's field."""
    return render.field_tile(render.projection_to_image(projection.pixels),
                             field_window(model, layer, projection.hit.position))


def image_tiles(model: LoadedModel, layer: Layer, image: torch.Tensor, projections: Sequence[Projection]
                ) -> list[tuple[Image.Image, Image.Image]]:
    """The projection and the image patch of each top-k hit on one ``(C, H, W)`` input, as tiles of the layer's field."""
    picture = render.input_to_image(image, model.mean, model.std)
    return [(projection_tile(model, layer, projection),
             render.field_tile(picture, field_window(model, layer, projection.hit.position)))
            for projection in projections]


def _tile_block(tiles: Sequence[Image.Image], captions: Sequence[str], columns: int) -> Image.Image:
    """Framed tiles in rows of ``columns``, each with its caption underneath."""
    width, height = tiles[0].size
    cell_w, cell_h = width + 2 + GAP, height + 2 + CAPTION + GAP
    rows = -(-len(tiles) // columns)
    block = Image.new("RGB", (columns * cell_w - GAP, rows * cell_h - GAP), "white")
    draw = ImageDraw.Draw(block)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        left, top = (i % columns) * cell_w, (i // columns) * cell_h
        draw.rectangle([left, top, left + width + 1, top + height + 1], outline=FRAME)
        block.paste(tile, (left + 1, top + 1))
        draw.text((left + 1, top + height + 3), render.fit_text(caption, width), fill="black", font=render.font(12))
    return block


def channel_figure(title: str, projections: Sequence[Image.Image], patches: Sequence[Image.Image],
                   values: Sequence[float], names: Sequence[str], columns: int) -> Image.Image:
    """Paper Fig. 2 for one channel: projections (captioned rank and activation) left, patches
    (captioned with their image's name) right, strongest first, row by row."""
    left = _tile_block(projections, [f"#{i + 1}  {v:.3g}" for i, v in enumerate(values)], columns)
    right = _tile_block(patches, names, columns)
    top = MARGIN + 22 + 18
    width = max(left.width + BLOCK_GAP + right.width, math.ceil(render.font(15).getlength(title)))
    figure = Image.new("RGB", (2 * MARGIN + width, top + left.height + MARGIN), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((MARGIN, MARGIN), title, fill="black", font=render.font(15))
    draw.text((MARGIN, MARGIN + 22), "projections", fill=(80, 80, 80), font=render.font(12))
    draw.text((MARGIN + left.width + BLOCK_GAP, MARGIN + 22), "image patches", fill=(80, 80, 80), font=render.font(12))
    figure.paste(left, (MARGIN, top))
    figure.paste(right, (MARGIN + left.width + BLOCK_GAP, top))
    return figure


def overview(figures: Sequence[Image.Image], labels: Sequence[str], title: str) -> Image.Image:
    """Channel figures shrunk to ``THUMB_WIDTH``, each under a legible label, ``SHEET_COLUMNS`` a row."""
    thumbs = [f.resize((THUMB_WIDTH, max(1, round(f.height * THUMB_WIDTH / f.width))), Image.LANCZOS)
              for f in figures]
    label_height = 20
    cell_w, cell_h = THUMB_WIDTH + GAP * 2, max(t.height for t in thumbs) + label_height + GAP * 2
    columns = min(SHEET_COLUMNS, len(thumbs))
    rows = -(-len(thumbs) // columns)
    width = max(columns * cell_w, math.ceil(render.font(16).getlength(title)))
    page = Image.new("RGB", (width + 2 * MARGIN, rows * cell_h + 40), "white")
    draw = ImageDraw.Draw(page)
    draw.text((MARGIN, 10), title, fill="black", font=render.font(16))
    for i, (thumb, label) in enumerate(zip(thumbs, labels)):
        left, top = MARGIN + (i % columns) * cell_w, 36 + (i // columns) * cell_h
        draw.text((left, top), label, fill="black", font=render.font(15))
        page.paste(thumb, (left, top + label_height))
    return page


def deconv_figure(model: LoadedModel, title: str, image: torch.Tensor, projections: Sequence[Projection]
                  ) -> Image.Image:
    """One row per projection: the input with the unit's receptive field boxed, the projection,
    and both cropped to the field."""
    picture = render.input_to_image(image, model.mean, model.std)
    scale = render.PANEL / max(picture.size)
    fitted = render.fit(picture)
    rows = []
    for projection in projections:
        hit = projection.hit
        pixels = render.projection_to_image(projection.pixels)
        rows.append(render.labelled_row(
            [render.draw_box(fitted, hit.box, scale), render.draw_box(render.fit(pixels), hit.box, scale),
             render.fit(render.crop(picture, hit.box)), render.fit(render.crop(pixels, hit.box))],
            [f"input, ch {hit.channel} at {hit.position}", f"projection (activation {hit.value:.3g})", "input patch",
             "projection patch"]))
    return render.stack(rows, title)


def occlusion_figure(model: LoadedModel, image: torch.Tensor, projection: torch.Tensor, maps: OcclusionMaps
                     ) -> Image.Image:
    """Paper Fig. 7: (a) input and square, (b) feature map total, (c) its projection, (d) p(target),
    (e) most probable class, then (b), (d), (e) overlaid on the input, and the class legend."""
    picture = render.input_to_image(image, model.mean, model.std)
    scale = render.PANEL / max(picture.size)
    corner = np.unravel_index(int(maps.prob_true.argmin()), maps.prob_true.shape)
    y, x = int(maps.positions_y[corner[0]]), int(maps.positions_x[corner[1]])
    square = render.draw_box(render.fit(picture), (y, x, y + maps.size, x + maps.size), scale)
    name = model.category(maps.target)
    features = render.heatmap(maps.feature_total, float(maps.feature_total.min()), float(maps.feature_total.max()))
    probability = render.heatmap(maps.prob_true, 0.0, 1.0)
    classes = render.class_colours(maps.top_class)
    top = render.labelled_row(
        [square, render.fit(features), render.fit(render.projection_to_image(projection)), render.fit(probability),
         render.fit(classes)],
        [f"(a) square {maps.size}px, stride {maps.stride}", f"(b) ch {maps.channel} total "
         f"{maps.feature_total.min():.3g}..{maps.feature_total.max():.3g}", f"(c) ch {maps.channel} projection ({maps.rule})",
         f"(d) p({name[:16]}) 0..1", "(e) most probable class"])
    overlays = [render.overlay(picture, cells, maps.positions_y, maps.positions_x, maps.size)
                for cells in (features, probability, classes)]
    bottom = render.labelled_row([render.fit(o) for o in overlays] + [legend(model, maps.top_class)],
                                 ["(b) over the input", "(d) over the input", "(e) over the input", "classes (e)"])
    title = (f"{model.name}, {'layer ' + str(maps.layer) if maps.layer else maps.module}: target {name} "
             f"(p = {maps.prob_clean:.3f} unoccluded; lowest {maps.prob_true.min():.3f}, square marked in (a))"
             + (f"; APPROXIMATE maps ({approximation.describe('brute force' not in maps.method)})"
                if (approximation := maps.spec.approximate) else ""))
    return render.stack([top, bottom], title)


def legend(model: LoadedModel, top_class: np.ndarray) -> Image.Image:
    """The colours of ``render.class_colours`` with each class's name and share of the positions,
    and the colour scale of (b) and (d)."""
    counts = np.bincount(top_class.ravel())
    ranked = render.ranked_classes(top_class)
    entries = [(render.PALETTE[i], model.category(c), counts[c]) for i, c in enumerate(ranked[:len(render.PALETTE)])]
    if len(ranked) > len(render.PALETTE):
        rest = ranked[len(render.PALETTE):]
        entries.append((render.OTHER, f"{len(rest)} other classes", sum(counts[c] for c in rest)))
    panel = Image.new("RGB", (render.PANEL, render.PANEL), "white")
    draw = ImageDraw.Draw(panel)
    for row, (colour, name, count) in enumerate(entries):
        draw.rectangle([4, 4 + row * 20, 18, 18 + row * 20], fill=colour, outline=(60, 60, 60))
        draw.text((24, 4 + row * 20), render.fit_text(f"{name} {count / top_class.size:.0%}", render.PANEL - 28),
                  fill="black", font=render.font(12))
    scale = render.heatmap(np.tile(np.linspace(0, 1, render.PANEL - 8), (12, 1)), 0.0, 1.0)
    panel.paste(scale, (4, render.PANEL - 18))
    draw.text((4, render.PANEL - 34), "(b), (d): low", fill="black", font=render.font(12))
    draw.text((render.PANEL - 4, render.PANEL - 34), "high", fill="black", font=render.font(12), anchor="ra")
    return panel


FILTER_TILE = 64  # display side of a filter and of its spectrum
FLAG_COLOUR = (200, 30, 30)  # dead or aliased: the defects ZF fixed
NOTE_COLOUR = (213, 94, 0)  # over the renormalisation radius: a training setting, not a defect


def filter_sheet(title: str, notes: Sequence[str], weight: torch.Tensor, spectra: torch.Tensor,
                 stats: Sequence[FilterStats], stride: tuple[int, int]) -> Image.Image:
    """Paper Fig. 6 with spectra: each filter (``render.filter_tile``) beside its magnitude spectrum
    (DC at the centre, ±0.5 cycles per pixel at the edges, a white box at the stride's Nyquist
    frequency), captioned with its RMS; dead and aliased filters framed in red, and their flags named."""
    count = len(stats)
    columns = min(16, max(8, math.ceil(math.sqrt(count))))
    cell_w, cell_h = 2 * FILTER_TILE + 3 * GAP, FILTER_TILE + 2 * CAPTION + 2 * GAP
    top = MARGIN + 22 + 17 * len(notes) + GAP
    rows = -(-count // columns)
    width = max(columns * cell_w, *(math.ceil(render.font(13).getlength(n)) for n in notes),
                math.ceil(render.font(15).getlength(title)))
    sheet = Image.new("RGB", (2 * MARGIN + width, top + rows * cell_h + MARGIN), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, MARGIN), title, fill="black", font=render.font(15))
    for i, note in enumerate(notes):
        draw.text((MARGIN, MARGIN + 22 + 17 * i), note, fill=(60, 60, 60), font=render.font(13))
    side = spectra.shape[-1]
    box = [(side / 2 - side / (2 * s), side / 2 + side / (2 * s)) for s in stride]  # |f| <= Nyquist, shifted
    for stat in stats:
        left, upper = MARGIN + (stat.filter % columns) * cell_w, top + (stat.filter // columns) * cell_h
        tile = render.filter_tile(weight[stat.filter], FILTER_TILE)
        magnitude = torch.fft.fftshift(spectra[stat.filter].sqrt()).numpy()
        spectrum = render.heatmap(magnitude, 0.0, float(magnitude.max()))
        if stride != (1, 1):
            ImageDraw.Draw(spectrum).rectangle([box[1][0], box[0][0], box[1][1], box[0][1]], outline="white")
        spectrum = spectrum.resize((FILTER_TILE, FILTER_TILE), Image.NEAREST)
        flags = [name for name, on in (("dead", stat.dead), (f"alias {stat.aliasing or 0:.0%}", stat.aliased)) if on]
        draw.rectangle([left, upper, left + cell_w - GAP, upper + FILTER_TILE + 1], outline=FLAG_COLOUR if flags else FRAME,
                       width=2 if flags else 1)
        sheet.paste(tile, (left + 2 + (FILTER_TILE - tile.width) // 2, upper + 2 + (FILTER_TILE - tile.height) // 2))
        sheet.paste(spectrum, (left + FILTER_TILE + 2 * GAP, upper + 1))
        draw.text((left, upper + FILTER_TILE + 3), f"#{stat.filter} rms {stat.rms:.3f}", fill="black",
                  font=render.font(12))
        flagged = render.fit_text(" ".join(flags), cell_w - GAP)
        line = upper + FILTER_TILE + 3 + CAPTION
        draw.text((left, line), flagged, fill=FLAG_COLOUR, font=render.font(12))
        if stat.renormalise:
            after = render.font(12).getlength(flagged + " ") if flagged else 0
            draw.text((left + after, line), f"rms>{RENORMALISE_RMS:g}", fill=NOTE_COLOUR, font=render.font(12))
    return sheet


def evolution_figure(model: LoadedModel, layer: Layer, title: str, checkpoints: Sequence[str],
                     projections: dict[int, Sequence[Projection | None]]) -> Image.Image:
    """Paper Fig. 4: one row per channel (labelled on the left), one column per checkpoint (named on
    top); each cell the projection as a tile of the unit's field, captioned with its activation and
    image, or an empty frame where the channel never fired."""
    size = render.tile_size(field_window(model, layer, (0, 0)))
    tiles, captions = [], []
    for entries in projections.values():
        for projection in entries:
            if projection is None:
                tiles.append(Image.new("RGB", size, "white"))
                captions.append("never fires")
            else:
                tiles.append(projection_tile(model, layer, projection))
                captions.append(f"{projection.hit.value:.3g} {projection.hit.image.stem}")
    block = _tile_block(tiles, captions, len(checkpoints))
    labels = [f"ch {channel}" for channel in projections]
    label_w = max(math.ceil(render.font(13).getlength(label)) for label in labels) + 2 * GAP
    cell_w, cell_h = size[0] + 2 + GAP, size[1] + 2 + CAPTION + GAP  # as _tile_block lays them out
    top = MARGIN + 22 + 18
    figure = Image.new("RGB", (2 * MARGIN + max(label_w + block.width, math.ceil(render.font(15).getlength(title))),
                               top + block.height + GAP + MARGIN), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((MARGIN, MARGIN), title, fill="black", font=render.font(15))
    for column, name in enumerate(checkpoints):
        draw.text((MARGIN + label_w + column * cell_w, MARGIN + 22), render.fit_text(name, cell_w - GAP),
                  fill=(60, 60, 60), font=render.font(13))
    for row, label in enumerate(labels):
        draw.text((MARGIN, top + row * cell_h + size[1] // 2 - 6), label, fill="black", font=render.font(13))
    figure.paste(block, (MARGIN + label_w, top))
    return figure


SPARSE_TILE = 112  # a sparse figure's tile side


def sparse_figure(title: str, rows: Sequence[tuple[str, Sequence[torch.Tensor], Sequence[str], bool]], *,
                  tile: int = SPARSE_TILE, columns: int | None = None) -> Image.Image:
    """Deconvolutional network results for one image: under a title, one labelled row of tiles per entry of
    ``rows`` (label, ``(C, H, W)`` pictures, captions, signed). Unsigned pictures (inputs, reconstructions)
    are shown in 0..1, clipped; signed ones (feature maps, projections, filters) symmetric around zero, mid-grey
    = 0, each scaled on its own. Rows wrap after ``columns`` tiles (default: never)."""
    blocks = []
    for label, pictures, captions, signed in rows:
        shown = [render.projection_to_image(p) if signed else render.to_rgb(p.detach().cpu().float()) for p in pictures]
        tiles = [_pad_to(render.fit(t, tile), tile) for t in shown]
        blocks.append((label, _tile_block(tiles, captions, columns or len(tiles))))
    width = max(max(b.width for _, b in blocks), math.ceil(render.font(15).getlength(title)))
    height = MARGIN + 24 + sum(18 + b.height + BLOCK_GAP for _, b in blocks)
    figure = Image.new("RGB", (2 * MARGIN + width, height), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((MARGIN, MARGIN), title, fill="black", font=render.font(15))
    top = MARGIN + 24
    for label, block in blocks:
        draw.text((MARGIN, top), label, fill=(80, 80, 80), font=render.font(12))
        figure.paste(block, (MARGIN, top + 18))
        top += 18 + block.height + BLOCK_GAP
    return figure


def _pad_to(tile: Image.Image, side: int) -> Image.Image:
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(tile, ((side - tile.width) // 2, (side - tile.height) // 2))
    return canvas
