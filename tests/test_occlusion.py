"""Occlusion maps against a brute-force loop, square geometry by hand, and `vizdeconv occlude` batch runs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from vizdeconv.cli import main
from vizdeconv.errors import VizDeconvError
from vizdeconv.layers import trace_chain
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import corners, default_geometry, fill_values, occlude, resolve_target

FASHION = Path(__file__).resolve().parent.parent / "sample_images" / "fashion-mnist"


def test_corners_by_hand():
    assert corners(28, 6, 1) == list(range(23))
    assert len(corners(224, 50, 8)) == 22 and corners(224, 50, 8)[-1] == 168
    assert corners(10, 3, 4) == [0, 4]  # stride larger than the square: 8 would end past 10
    assert corners(7, 7, 3) == [0]
    with pytest.raises(VizDeconvError, match=r"square \(30 px\) is larger than the model's input \(28 px\)"):
        corners(28, 30, 2)
    assert default_geometry((3, 224, 224)) == (50, 8) and default_geometry((1, 28, 28)) == (6, 1)


def test_fill_and_target(embedded):
    assert fill_values("mean", embedded).tolist() == [0.0]
    mean, std = embedded.mean[0], embedded.std[0]
    assert fill_values("0.5", embedded).item() == pytest.approx((0.5 - mean) / std)
    with pytest.raises(VizDeconvError, match="--fill expects"):
        fill_values("grey", embedded)
    probabilities = torch.tensor([0.1] * 9 + [0.1])
    probabilities[3] = 0.5
    assert resolve_target("auto", embedded, probabilities) == 3
    assert resolve_target("7", embedded, probabilities) == 7
    assert resolve_target("ankle boot", embedded, probabilities) == 9
    with pytest.raises(VizDeconvError, match="unknown target class 'hat'"):
        resolve_target("hat", embedded, probabilities)


def brute_force(model, chain, layer, image, size, stride, fill, target, channel):
    """One occluded forward pass per position, square pasted by explicit loops."""
    _, height, width = image.shape
    prob, top, total = [], [], []
    for y in range(0, height - size + 1, stride):
        for x in range(0, width - size + 1, stride):
            occluded = image.clone()
            for c in range(image.shape[0]):
                for row in range(y, y + size):
                    occluded[c, row, x:x + size] = fill[c]
            with torch.no_grad():
                probabilities = model.module(occluded[None]).softmax(1)[0]
                h = occluded[None]
                for step in chain.steps[: layer.step.index + 1]:
                    h = step.module(h)
            prob.append(probabilities[target].item())
            top.append(probabilities.argmax().item())
            total.append(h[0, channel].sum().item())
    shape = (len(range(0, height - size + 1, stride)), len(range(0, width - size + 1, stride)))
    return np.reshape(prob, shape), np.reshape(top, shape), np.reshape(total, shape)


def assert_matches_brute_force(model, image, size, stride, fill="mean", target="auto", layer_number=None):
    chain = trace_chain(model)
    layer = chain.layer(layer_number or len(chain.layers()))
    fill = fill_values(fill, model)
    maps = occlude(model, chain, layer, image, size=size, stride=stride, fill=fill, target=target, batch_size=7)
    prob, top, total = brute_force(model, chain, layer, image, size, stride, fill, maps.target, maps.channel)
    np.testing.assert_allclose(maps.prob_true, prob, atol=1e-5)
    assert (maps.top_class == top).all()
    np.testing.assert_allclose(maps.feature_total, total, rtol=1e-5, atol=1e-5 * np.abs(total).max())
    assert maps.positions_y.tolist() == list(range(0, image.shape[1] - size + 1, stride))
    return maps


def test_embedded_maps_equal_brute_force(embedded):
    image = embedded.preprocess(Image.open(FASHION / "test00000_ankle-boot.png"))
    maps = assert_matches_brute_force(embedded, image, 6, 2)
    assert maps.prob_true.shape == (12, 12) and maps.target == 9  # auto: the true class, an ankle boot
    assert maps.prob_true.min() < maps.prob_clean
    assert_matches_brute_force(embedded, image, 5, 7, fill="0.5", target="Sneaker", layer_number=3)


def test_alexnet_maps_equal_brute_force(alexnet):
    torch.manual_seed(0)
    assert_matches_brute_force(alexnet, torch.randn(3, 224, 224), 50, 29)


def test_non_square_input():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    model = LoadedModel("m", "random", module, None, (3, 20, 33), (0.0,) * 3, (1.0,) * 3, tuple("abcde"))
    maps = assert_matches_brute_force(model, torch.randn(3, 20, 33), 6, 4)
    assert maps.prob_true.shape == (4, 7)


def test_occlude_command_batch_run_resumes(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for name in ("test00000_ankle-boot.png", "test00001_pullover.png", "test00008_sandal.png"):
        shutil.copy(FASHION / name, images / name)
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["occlude", str(images), "--stride", "3", "--out", str(out)]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1 and "broken.png" in result.stderr
    with open(out / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [Path(r["image"]).name for r in rows] == ["test00000_ankle-boot.png", "test00001_pullover.png",
                                                     "test00008_sandal.png"]
    data = np.load(out / "test00000_ankle-boot" / "maps.npz")
    assert {"prob_true", "top_class", "feature_total", "channel", "target", "layer", "size", "stride",
            "positions_y", "positions_x"} <= set(data.files)
    assert int(data["size"]) == 6 and int(data["stride"]) == 3 and int(data["layer"]) == 5
    assert float(rows[0]["prob_min"]) == pytest.approx(float(data["prob_true"].min()), abs=1e-6)
    # An interrupted run: one image lost its maps. The rerun redoes only that one.
    (out / "test00001_pullover" / "maps.npz").unlink()
    before = (out / "test00000_ankle-boot" / "maps.npz").stat().st_mtime_ns
    (images / "broken.png").unlink()
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0 and "2 images already done" in result.stderr
    assert "test00001_pullover.png:" in result.stdout and "test00000" not in result.stdout
    assert (out / "test00000_ankle-boot" / "maps.npz").stat().st_mtime_ns == before
    with open(out / "summary.csv") as file:
        assert len(list(csv.DictReader(file))) == 3
    assert not list(out.rglob(".*.tmp"))
    # Other parameters are a different question: nothing is skipped.
    result = runner.invoke(main, ["occlude", str(images), "--stride", "4", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and "already done" not in result.stderr


def test_square_larger_than_the_image_is_a_usage_error():
    result = CliRunner().invoke(main, ["occlude", str(FASHION / "test00000_ankle-boot.png"), "--size", "40"])
    assert result.exit_code == 2 and "larger than the model's input (28 px)" in result.stderr
