"""Direct tests of ``render``: tile geometry, field tiles, categorical and heat-map colours, captions.

Every expectation is worked out by hand or by a brute-force loop here, not read from the code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vizdeconv import render


def test_display_window_keeps_a_field_smaller_than_the_image():
    assert render.display_window((-2, 3, 9, 14), 28, 28) == (-2, 3, 9, 14)


def test_display_window_is_the_whole_image_where_the_field_covers_it():
    # 39 × 39 field on a 28 × 28 image: both axes become 0..28.
    assert render.display_window((-19, -19, 20, 20), 28, 28) == (0, 0, 28, 28)
    # A field exactly as long as the image side also counts as covering it.
    assert render.display_window((-3, -3, 7, 7), 10, 10) == (0, 0, 10, 10)


def test_display_window_treats_each_axis_on_its_own():
    # 30 rows on a 10-row image: rows become 0..10; 30 columns on a 40-column image stay as they are.
    assert render.display_window((-5, 10, 25, 40), 10, 40) == (0, 10, 10, 40)
    # And the other way round: columns cover a 12-wide image, rows do not cover a 50-tall one.
    assert render.display_window((4, -6, 20, 9), 50, 12) == (4, 0, 20, 12)


@pytest.mark.parametrize("window, size", [
    ((0, 0, 39, 39), (117, 117)),    # 96 / 39 → whole factor 3
    ((-2, -2, 3, 3), (100, 100)),    # 96 / 5 → whole factor 20
    ((0, 0, 10, 40), (120, 30)),     # longer side 40 → factor 3, (width, height)
    ((0, 0, 32, 1), (3, 96)),        # one pixel wide, 32 tall → factor 3
    ((0, 0, 96, 96), (96, 96)),      # exactly TILE_MIN: as it is
    ((5, 5, 155, 125), (120, 150)),  # mid-size: as it is
    ((0, 0, 192, 192), (192, 192)),  # exactly TILE_MAX: as it is
    ((0, 0, 384, 200), (100, 192)),  # large: halved so the longer side is 192
    ((0, 0, 400, 400), (192, 192)),
])
def test_tile_size(window, size):
    assert render.tile_size(window) == size


def _picture(width: int, height: int) -> tuple[Image.Image, np.ndarray]:
    """A picture whose every pixel differs: (10·x, 20·y, 5 + x + y)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for y in range(height):
        for x in range(width):
            pixels[y, x] = (10 * x, 20 * y, 5 + x + y)
    return Image.fromarray(pixels, mode="RGB"), pixels


def test_field_tile_pads_outside_grey_and_upscales_inside_by_nearest():
    picture, pixels = _picture(10, 5)
    window = (-2, -3, 6, 9)  # 8 rows × 12 columns, past the top, left and bottom borders
    tile = render.field_tile(picture, window)
    assert tile.size == (96, 64)  # 96 / 12 → factor 8
    got = np.asarray(tile)
    for ty in range(64):
        for tx in range(96):
            y, x = ty // 8 - 2, tx // 8 - 3  # picture pixel under the tile pixel
            want = tuple(pixels[y, x]) if 0 <= y < 5 and 0 <= x < 10 else render.OUTSIDE
            assert tuple(got[ty, tx]) == want, (tx, ty)
    # A few by hand: tile (24, 16) is canvas (3, 2), picture (0, 0); tile (95, 55) is picture (8, 4).
    assert tuple(got[16, 24]) == (0, 0, 5)
    assert tuple(got[55, 95]) == (80, 80, 17)
    assert tuple(got[0, 0]) == render.OUTSIDE
    assert tuple(got[63, 40]) == render.OUTSIDE  # canvas row 7 = picture row 5, below the image


def test_field_tile_reduces_a_large_window_to_tile_max():
    picture = Image.new("RGB", (200, 200), (200, 30, 40))
    tile = render.field_tile(picture, (-200, 0, 200, 200))  # 400 rows: the top half is outside
    assert tile.size == (96, 192)
    got = np.asarray(tile)
    assert tuple(got[40, 48]) == render.OUTSIDE
    assert tuple(got[150, 48]) == (200, 30, 40)


def test_ranked_classes_orders_by_count_then_index():
    assert render.ranked_classes(np.array([[1, 1], [0, 2]])) == [1, 0, 2]
    assert render.ranked_classes(np.array([[5, 3, 3, 5], [9, 9, 9, 0]])) == [9, 3, 5, 0]


COUNTS = {5: 9, 2: 8, 9: 7, 0: 6, 1: 6, 4: 5, 8: 4, 3: 2, 7: 1}  # class 6 absent; 48 positions
RANKED = [5, 2, 9, 0, 1, 4, 8, 3, 7]  # by hand: count down, ties (0 and 1) by index


def _class_map() -> np.ndarray:
    flat = np.array([c for c, n in COUNTS.items() for _ in range(n)])
    return flat[np.random.default_rng(1).permutation(flat.size)].reshape(6, 8)


def test_class_colours_give_the_palette_in_rank_order_and_other_beyond_it():
    classes = _class_map()
    assert render.ranked_classes(classes) == RANKED
    colour = {c: render.PALETTE[i] for i, c in enumerate(RANKED[:7])} | {3: render.OTHER, 7: render.OTHER}
    got = np.asarray(render.class_colours(classes))
    assert got.shape == (6, 8, 3)
    for y in range(6):
        for x in range(8):
            assert tuple(got[y, x]) == colour[int(classes[y, x])], (y, x)


def test_class_colours_with_few_classes_use_no_other():
    classes = np.array([[4, 4, 4], [2, 2, 0]])
    got = np.asarray(render.class_colours(classes))
    assert tuple(got[0, 0]) == render.PALETTE[0]  # class 4, three times
    assert tuple(got[1, 0]) == render.PALETTE[1]  # class 2, twice
    assert tuple(got[1, 2]) == render.PALETTE[2]  # class 0, once


def test_heatmap_endpoints_and_interpolation():
    values = np.array([[1.0, 2.0, 2.25, 4.0, 6.0, 9.0]])
    got = np.asarray(render.heatmap(values, 2.0, 6.0))
    assert got.shape == (1, 6, 3)
    first, middle, last = (tuple(int(v) for v in render.VIRIDIS[i]) for i in (0, 2, -1))
    assert tuple(got[0, 0]) == first   # below low: clipped
    assert tuple(got[0, 1]) == first   # low
    # 2.25 is a quarter of the way from the first colour (68, 1, 84) to the second (59, 82, 139).
    assert tuple(got[0, 2]) == (66, 21, 98)
    assert tuple(got[0, 3]) == middle  # half way: the middle colour exactly
    assert tuple(got[0, 4]) == last    # high
    assert tuple(got[0, 5]) == last    # above high: clipped


def test_fit_text_keeps_short_text():
    assert render.fit_text("cat", 200) == "cat"


@pytest.mark.parametrize("width", [40, 80, 120])
def test_fit_text_cuts_the_longest_prefix_that_fits_with_an_ellipsis(width):
    text = "a rather long image file name, far wider than the tile.png"
    face = render.font(12)
    assert face.getlength(text) > width
    fitting = [n for n in range(len(text) + 1) if face.getlength(text[:n] + "…") <= width]
    assert render.fit_text(text, width) == text[:max(fitting)] + "…"
    assert face.getlength(render.fit_text(text, width)) <= width


def test_filter_tiles_show_weights_around_grey_and_norms_from_black():
    """One input channel: 0.5 + 0.5·w/max|w| per pixel, enlarged by a whole factor; four channels: the
    norm over channels per tap, divided by its largest."""
    weight = torch.tensor([[[1.0, -1.0], [0.0, 0.5]]])
    tile = render.filter_tile(weight, 64)
    assert tile.size == (64, 64)
    expected = np.round(255 * (0.5 + 0.5 * weight[0].numpy()) + 1e-9).astype(int)  # 255, 0, 128, 191
    assert np.array(tile)[::32, ::32, 0].tolist() == expected.tolist()
    channels = torch.tensor([3.0, 4.0, 0.0, 0.0])[:, None, None] * torch.tensor([[1.0, 0.5]])
    grey = np.array(render.filter_tile(channels, 10))[::5, ::5, 0]
    assert grey.tolist() == [[255, 128]]  # norms 5 and 2.5
