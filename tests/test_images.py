"""Messy real folders: modes, 16-bit, EXIF, bombs, broken files, hidden files, batching with failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vizdeconv import images
from vizdeconv.errors import ImageError
from vizdeconv.images import find_images, load_image, read_batches

GREY_BACKGROUND = (0.5, 0.5, 0.5)


def test_grey_and_rgb_conversions(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "grey.png")
    rgb = load_image(tmp_path / "grey.png", channels=3, background=GREY_BACKGROUND)
    assert rgb.mode == "RGB" and rgb.size == (4, 3) and rgb.getpixel((0, 0)) == (77, 77, 77)
    Image.new("RGB", (2, 2), (255, 0, 0)).save(tmp_path / "red.png")
    assert load_image(tmp_path / "red.png", channels=1, background=(0.0,)).getpixel((0, 0)) == 76  # ITU-R 601 luma


def test_transparency_is_composited_over_the_background(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 0))
    rgba.save(tmp_path / "alpha.png")
    out = load_image(tmp_path / "alpha.png", channels=3, background=(0.2, 0.4, 0.6))
    assert out.getpixel((0, 0)) == (0, 0, 255) and out.getpixel((1, 0)) == (51, 102, 153)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)
    out = load_image(tmp_path / "palette.png", channels=3, background=(1.0, 1.0, 1.0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (200, 100, 50)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = load_image(tmp_path / "deep.png", channels=1, background=(0.0,))
    assert np.asarray(out).ravel().tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 20, 20))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rotated.jpg", channels=3, background=GREY_BACKGROUND)
    assert out.size == (20, 40)
    assert sum(out.getpixel((10, 5))) < 60 and sum(out.getpixel((10, 35))) > 700  # black now on top


def test_bombs_broken_and_non_images_are_refused_by_name(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)
    with pytest.raises(ImageError, match=r"big.png: 100×100 pixels is over the limit"):
        load_image(tmp_path / "big.png", channels=3, background=GREY_BACKGROUND)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own check fires at open
    with pytest.raises(ImageError, match=r"big.png: refused as a possible decompression bomb"):
        load_image(tmp_path / "big.png", channels=3, background=GREY_BACKGROUND)
    monkeypatch.undo()
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"truncated.png: unreadable image"):
        load_image(tmp_path / "truncated.png", channels=3, background=GREY_BACKGROUND)
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(ImageError, match=r"notes.jpg: not an image file"):
        load_image(tmp_path / "notes.jpg", channels=3, background=GREY_BACKGROUND)


def test_find_images_walks_folders(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a/one.JPG", "a/b/two.png", "a/readme.txt", "a/._one.jpg", ".hidden/three.png", "four.Tiff"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "explicit.dat").write_bytes(b"")
    found, missing = find_images([tmp_path, tmp_path / "explicit.dat", tmp_path / "gone.png", tmp_path / "a"])
    assert found == sorted([tmp_path / "a/one.JPG", tmp_path / "a/b/two.png", tmp_path / "four.Tiff",
                            tmp_path / "explicit.dat"])
    assert missing == [(tmp_path / "gone.png", "no such file or folder")]


def test_read_batches_keeps_order_and_reports_failures(tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (3, 3), i * 10).save(paths[-1])
    paths[2].write_text("broken")
    items = list(read_batches(paths, preprocess=lambda im: torch.tensor(np.asarray(im), dtype=torch.float32)[None],
                              channels=1, background=(0.0,), batch_size=2))
    failures = [i for i in items if isinstance(i, ImageError)]
    batches = [i for i in items if not isinstance(i, ImageError)]
    assert len(failures) == 1 and "2.png" in str(failures[0])
    assert [p.name for b in batches for p in b.paths] == ["0.png", "1.png", "3.png", "4.png"]
    assert [b.images[:, 0, 0, 0].tolist() for b in batches] == [[0.0, 10.0], [30.0], [40.0]]
