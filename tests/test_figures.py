"""Direct tests of ``figures``: where every tile, panel and legend entry lands, from synthetic inputs.

Tiles and maps are solid or hand-made so each one can be found again in the figure by its colour;
positions follow from the layout constants by hand (text is anti-aliased grey, so saturated
colours never come from it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vizdeconv import figures, render
from vizdeconv.deconvnet import Projection
from vizdeconv.graph import Field, Point
from vizdeconv.layers import Hit, Layer
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import OcclusionMaps

MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.5, 0.5)
CATEGORIES = [f"class{i}" for i in range(12)]


def _model(input_size) -> LoadedModel:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 12))
    return LoadedModel.from_module(module, input_size, mean=MEAN, std=STD, categories=CATEGORIES, name="tiny",
                                   device="cpu")


def _colours(n: int, seed: int) -> list[tuple[int, int, int]]:
    """``n`` distinct saturated colours (never grey, so never anti-aliased text or a frame)."""
    rng = np.random.default_rng(seed)
    colours = set()
    while len(colours) < n:
        r, g, b = (int(v) for v in rng.integers(0, 256, 3))
        if max(r, g, b) - min(r, g, b) > 60:
            colours.add((r, g, b))
    return sorted(colours)


def _box(array: np.ndarray, colour) -> tuple[int, int, int, int, int]:
    """``(x0, y0, x1, y1, count)`` of the pixels of exactly ``colour`` (x1, y1 exclusive)."""
    ys, xs = np.nonzero(np.all(array == np.array(colour, dtype=np.uint8), axis=2))
    if not len(ys):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, len(ys)


@pytest.mark.parametrize("count", [9, 5])
def test_channel_figure_puts_every_tile_once_on_a_regular_grid(count, monkeypatch):
    side, columns = 24, 3
    colours = _colours(2 * count, seed=count)
    projections = [Image.new("RGB", (side, side), c) for c in colours[:count]]
    patches = [Image.new("RGB", (side, side), c) for c in colours[count:]]
    captions = []
    fit_text = render.fit_text
    monkeypatch.setattr(render, "fit_text",
                        lambda text, width, *a: captions.append((text, width)) or fit_text(text, width, *a))

    values = [9.0 - 0.5 * i for i in range(count)]
    names = [f"img{i}" for i in range(count)]
    figure = figures.channel_figure("channel 7", projections, patches, values, names, columns)

    # By hand: a cell is the tile, a 1-px frame on each side and (below) a caption, then a gap.
    cell_w, cell_h = side + 2 + figures.GAP, side + 2 + figures.CAPTION + figures.GAP
    rows = -(-count // columns)
    block_w, block_h = columns * cell_w - figures.GAP, rows * cell_h - figures.GAP
    top = figures.MARGIN + 40  # title line (22) and block heading (18)
    assert figure.size == (2 * figures.MARGIN + 2 * block_w + figures.BLOCK_GAP, top + block_h + figures.MARGIN)

    array = np.asarray(figure)
    for block, (left, tiles) in enumerate([(figures.MARGIN, colours[:count]),
                                           (figures.MARGIN + block_w + figures.BLOCK_GAP, colours[count:])]):
        for i, colour in enumerate(tiles):
            x0 = left + 1 + (i % columns) * cell_w
            y0 = top + 1 + (i // columns) * cell_h
            assert _box(array, colour) == (x0, y0, x0 + side, y0 + side, side * side), (block, i)
            assert tuple(array[y0 - 1, x0 - 1]) == figures.FRAME
            assert tuple(array[y0 + side, x0 + side]) == figures.FRAME
            caption = array[y0 + side + 1: y0 + side + 1 + figures.CAPTION, x0: x0 + side]
            assert (caption < 200).any(), f"no caption under tile {i} of block {block}"
        for i in range(count, rows * columns):  # cells with no tile stay white
            x0 = left + 1 + (i % columns) * cell_w
            y0 = top + 1 + (i // columns) * cell_h
            assert (array[y0 - 1: y0 + side + 1 + figures.CAPTION, x0 - 1: x0 + side + 1] == 255).all()
    # Captions: rank and activation left, image names right, in the tiles' order, each cut to a tile's width.
    assert captions == ([(f"#{i + 1}  {v:.3g}", side) for i, v in enumerate(values)]
                        + [(name, side) for name in names])
    assert captions[1][0] == "#2  8.5"


@pytest.mark.parametrize("count, columns, rows", [(8, 6, 2), (3, 3, 1), (13, 6, 3)])
def test_overview_size_and_places(count, columns, rows):
    assert figures.SHEET_COLUMNS == 6 and figures.THUMB_WIDTH == 360  # the numbers below assume these
    colours = _colours(count, seed=100 + count)
    sizes = [(200, 99)] * count
    sizes[1] = (400, 301)  # the tallest thumb (270.9 → 271 px) sets every cell's height
    sheets = [Image.new("RGB", size, colour) for size, colour in zip(sizes, colours)]
    page = figures.overview(sheets, [f"channel {i}" for i in range(count)], "layer 5")
    label = 20  # a label line above each thumb
    cell_w, cell_h = 360 + 2 * figures.GAP, label + 271 + 2 * figures.GAP
    assert page.size == (columns * cell_w + 2 * figures.MARGIN, rows * cell_h + 40)
    array = np.asarray(page)
    for i, (colour, (width, height)) in enumerate(zip(colours, sizes)):
        x0, y0 = figures.MARGIN + (i % columns) * cell_w, 36 + (i // columns) * cell_h
        thumb_h = {99: 178, 301: 271}[height]  # 99 · 360 / 200 = 178.2, 301 · 360 / 400 = 270.9
        assert _box(array, colour) == (x0, y0 + label, x0 + 360, y0 + label + thumb_h, 360 * thumb_h), i
        assert (array[y0: y0 + label, x0: x0 + 100] < 128).any(), f"no label above thumb {i}"


def _image(model: LoadedModel, grey: np.ndarray) -> torch.Tensor:
    """The normalised input whose picture is ``grey`` (``(C, H, W)`` integers 0..255)."""
    mean, std = torch.tensor(model.mean)[:, None, None], torch.tensor(model.std)[:, None, None]
    return ((torch.tensor(grey, dtype=torch.float32) / 255 - mean) / std).float()


def _layer(field: Field) -> Layer:
    return Layer(Point("fake", "fake", 0, (4, 5, 5), field, (), None))


def _expected_pixels(height: int, width: int) -> np.ndarray:
    """``(C, H, W)`` pixel values, each different from its neighbours."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(height), np.arange(width), indexing="ij")
    return (7 * x + 11 * y + 40 * c) % 256


def test_top_tiles_show_the_whole_image_when_the_field_is_larger():
    model = _model((3, 20, 30))
    pixels = _expected_pixels(20, 30)
    layer = _layer(Field((39, 39), (4, 4), (-19, -19)))  # 39 px: more than both sides
    signs = np.sign(np.sin(np.arange(20 * 30)).reshape(20, 30))  # -1, 0 or 1: 0, 128 or 255 on screen
    projection = Projection(Hit(Path("a.png"), 0, (2, 3), 1.0, (0, 0, 20, 30), True),
                            torch.tensor(np.stack([signs, -signs, 0 * signs]), dtype=torch.float32))
    [(projected, patch)] = figures.image_tiles(model, layer, _image(model, pixels), [projection])
    assert patch.size == projected.size == (120, 80)  # longer side 30 → factor 4
    got_patch, got_projection = np.asarray(patch), np.asarray(projected)
    grey = {-1.0: 0, 0.0: 128, 1.0: 255}
    for ty in range(80):
        for tx in range(120):
            y, x = ty // 4, tx // 4
            assert tuple(got_patch[ty, tx]) == tuple(pixels[:, y, x]), (tx, ty)
            s = signs[y, x]
            assert tuple(got_projection[ty, tx]) == (grey[s], grey[-s], 128), (tx, ty)


def test_top_tiles_keep_the_field_along_an_axis_it_does_not_cover():
    model = _model((3, 20, 30))
    pixels = _expected_pixels(20, 30)
    layer = _layer(Field((25, 25), (4, 4), (-12, -12)))
    # Unit (1, 0): rows -8..17 cover all 20 rows → 0..20; columns -12..13 stay, 12 of them outside.
    projection = Projection(Hit(Path("a.png"), 0, (1, 0), 1.0, (0, 0, 17, 13), True), torch.zeros(3, 20, 30))
    [(_, patch)] = figures.image_tiles(model, layer, _image(model, pixels), [projection])
    assert patch.size == (100, 80)  # 25 × 20 window, factor 4
    got = np.asarray(patch)
    for ty in range(80):
        for tx in range(100):
            y, x = ty // 4, tx // 4 - 12
            want = tuple(pixels[:, y, x]) if x >= 0 else render.OUTSIDE
            assert tuple(got[ty, tx]) == want, (tx, ty)


# Occlusion: a 32-px input, square 8, stride 4 → 7 × 7 positions at 0, 4, …, 24.
COUNTS = {4: 10, 1: 8, 7: 7, 0: 6, 9: 5, 2: 4, 11: 4, 3: 3, 5: 2}  # 49 positions, 9 classes
RANKED = [4, 1, 7, 0, 9, 2, 11, 3, 5]  # by hand: count down, ties (2 and 11) by index
LEGEND = ["class4 20%", "class1 16%", "class7 14%", "class0 12%", "class9 10%", "class2 8%", "class11 8%",
          "2 other classes 10%"]  # 10/49, 8/49, …; the last two classes together 5/49


def _maps(top_class: np.ndarray) -> OcclusionMaps:
    prob = np.ones((7, 7), dtype=np.float32)
    prob[2, 5] = 0.25  # the lowest p(target): the square at y = 8, x = 20
    prob[4, 1] = 0.5
    positions = np.arange(0, 25, 4)
    return OcclusionMaps(
        model="tiny", module="0", method="incremental", prob_true=prob, top_class=top_class,
        feature_total=np.arange(49, dtype=np.float32).reshape(7, 7), channel=2, target=4, target_asked="auto",
        rule="deconvnet", layer=1, size=8, stride=4, fill=np.zeros(3, dtype=np.float32), positions_y=positions,
        positions_x=positions, prob_clean=0.9, clean_class=4, feature_clean=3.0)


def _top_class() -> np.ndarray:
    flat = np.array([c for c, n in COUNTS.items() for _ in range(n)])
    return flat[np.random.default_rng(2).permutation(49)].reshape(7, 7)


def _cell_centre(i: int) -> int:
    """Pixel at the centre of map cell ``i`` in a 7-cell map fitted to a panel."""
    return int((i + 0.5) * render.PANEL / 7)


def test_occlusion_figure_layout_and_panels(monkeypatch):
    texts = []
    fit_text = render.fit_text
    monkeypatch.setattr(render, "fit_text", lambda text, width, *a: texts.append(text) or fit_text(text, width, *a))
    model = _model(32)
    top_class = _top_class()
    projection = torch.zeros(3, 32, 32)
    projection[:, :16] = 1.0  # top half white, bottom half mid-grey
    figure = figures.occlusion_figure(model, torch.zeros(3, 32, 32), projection, _maps(top_class))

    side = render.PANEL
    row_h = side + 18 + 8  # caption above, margin below (labelled_row)
    assert figure.mode == "RGB"
    assert figure.size == (5 * (side + 8) + 8, 24 + 2 * row_h)  # two rows of 5 and 4 panels under a title
    array = np.asarray(figure)

    def panel(row: int, i: int) -> np.ndarray:
        y0, x0 = 24 + row * row_h + 18, 8 + i * (side + 8)
        return array[y0: y0 + side, x0: x0 + side]

    picture = (51, 102, 153)  # the normalised input 0 is the mean: 0.2, 0.4, 0.6 of 255
    scale = side // 32
    a = panel(0, 0)  # (a): the picture with the square of the lowest p(target) at x 20..28, y 8..16
    assert tuple(a[3, 3]) == picture
    assert tuple(a[70, 140]) == picture  # inside the square
    for y, x in [(8 * scale, 140), (16 * scale - 1, 140), (70, 20 * scale), (70, 28 * scale - 1)]:
        assert tuple(a[y, x]) == render.BOX_COLOUR, (y, x)
    b = panel(0, 1)  # (b): feature total 0..48, lowest at (0, 0), highest at (6, 6)
    assert tuple(b[_cell_centre(0), _cell_centre(0)]) == tuple(int(v) for v in render.VIRIDIS[0])
    assert tuple(b[_cell_centre(6), _cell_centre(6)]) == tuple(int(v) for v in render.VIRIDIS[-1])
    c = panel(0, 2)  # (c): the projection
    assert tuple(c[10, 10]) == (255, 255, 255) and tuple(c[150, 10]) == (128, 128, 128)
    d = panel(0, 3)  # (d): p(target) on a fixed 0..1 scale: 0.25 at (2, 5), 0.5 at (4, 1), 1 elsewhere
    for i in range(7):
        for j in range(7):
            want = {(2, 5): render.VIRIDIS[1], (4, 1): render.VIRIDIS[2]}.get((i, j), render.VIRIDIS[-1])
            assert tuple(d[_cell_centre(i), _cell_centre(j)]) == tuple(int(v) for v in want), (i, j)
    e = panel(0, 4)  # (e): the most probable class in categorical colours
    colour = {c: render.PALETTE[k] for k, c in enumerate(RANKED[:7])} | {3: render.OTHER, 5: render.OTHER}
    for i in range(7):
        for j in range(7):
            assert tuple(e[_cell_centre(i), _cell_centre(j)]) == colour[int(top_class[i, j])], (i, j)
    # (d) over the input: each cell covers the stride (4 px) around the square's centre, from 2 to 30;
    # the picture's border is left as it is, cell (2, 5) (picture rows 10..14, columns 22..26) is blended.
    over = panel(1, 1).astype(int)
    assert tuple(over[3, 3]) == picture
    blended = 0.45 * np.array(picture) + 0.55 * render.VIRIDIS[1]
    assert np.abs(over[12 * scale + 3, 24 * scale + 3] - blended).max() <= 1
    # The legend, last in the bottom row: every class in rank order, then the rest as "other classes".
    legend = panel(1, 3)
    for row, want in enumerate([render.PALETTE[k] for k in range(7)] + [render.OTHER]):
        assert (legend[5 + row * 20: 18 + row * 20, 5:18] == np.array(want, dtype=np.uint8)).all(), row
    assert texts == LEGEND


def test_legend_lists_classes_and_has_no_other_entry_within_the_palette(monkeypatch):
    texts = []
    fit_text = render.fit_text
    monkeypatch.setattr(render, "fit_text", lambda text, width, *a: texts.append(text) or fit_text(text, width, *a))
    top_class = np.array([[6, 6, 6, 6], [2, 2, 2, 10], [10, 10, 0, 6]])  # 6 × 5, 2 × 3, 10 × 3, 0 × 1
    legend = np.asarray(figures.legend(_model(32), top_class))
    assert legend.shape == (render.PANEL, render.PANEL, 3)
    assert texts == ["class6 42%", "class2 25%", "class10 25%", "class0 8%"]
    for row in range(4):
        assert (legend[5 + row * 20: 18 + row * 20, 5:18] == np.array(render.PALETTE[row], dtype=np.uint8)).all()
    assert (legend[4 + 4 * 20: 19 + 4 * 20, 4:19] == 255).all()  # no fifth swatch, no "other" entry
    # The colour scale along the bottom: low end first, high end last.
    assert tuple(legend[render.PANEL - 12, 4]) == tuple(int(v) for v in render.VIRIDIS[0])
    assert tuple(legend[render.PANEL - 12, render.PANEL - 5]) == tuple(int(v) for v in render.VIRIDIS[-1])


def test_legend_shows_other_classes_beyond_the_palette(monkeypatch):
    texts = []
    fit_text = render.fit_text
    monkeypatch.setattr(render, "fit_text", lambda text, width, *a: texts.append(text) or fit_text(text, width, *a))
    legend = np.asarray(figures.legend(_model(32), _top_class()))
    assert texts == LEGEND
    assert (legend[5 + 7 * 20: 18 + 7 * 20, 5:18] == np.array(render.OTHER, dtype=np.uint8)).all()


def test_legend_with_one_class_beyond_the_palette(monkeypatch):
    texts = []
    fit_text = render.fit_text
    monkeypatch.setattr(render, "fit_text", lambda text, width, *a: texts.append(text) or fit_text(text, width, *a))
    top_class = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 8, 8, 8]])  # 8 classes, 18 places
    legend = np.asarray(figures.legend(_model(32), top_class))
    # By hand: 0 (9×), 8 (3×), then 1..5 once each fill the palette; class 6 alone is "other".
    assert texts == ["class0 50%", "class8 17%", "class1 6%", "class2 6%", "class3 6%", "class4 6%", "class5 6%",
                     "1 other classes 6%"]
    assert (legend[5 + 7 * 20: 18 + 7 * 20, 5:18] == np.array(render.OTHER, dtype=np.uint8)).all()
