"""Invariance to translation, scaling and rotation (paper Fig. 5: ``invariance.py``, ``InvarianceJob``).

The expectations here never call ``vizdeconv.invariance``: shifts are an explicit loop over rows,
scaling and rotation an explicit bilinear sampler over output pixels (numpy, zero outside the
image), and feature vectors come from running the modules by hand.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import FASHION
from oracles import hook_count, wrap
from PIL import Image
from torch import nn

from vizdeconv.cli import main
from vizdeconv.errors import LayerError, VizDeconvError
from vizdeconv.features import feature_layers, features
from vizdeconv.invariance import default_amounts, measure, parse_amounts, transformed
from vizdeconv.jobs.invariance import InvarianceJob
from vizdeconv.layers import trace_layers

HEIGHT, WIDTH = 10, 12  # the tiny net's input: not square, so rows and columns cannot be swapped unnoticed
COLUMNS = ("image", "transform", "amount", "layer", "distance", "p_true")
CATEGORIES = ("cat", "dog", "fox")


# ---------------------------------------------------------------------------------------- the oracles


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def shifted(images: np.ndarray, rows: int) -> np.ndarray:
    """``(N, C, H, W)`` with output row y taken from input row y − rows; rows with no source are 0."""
    out = np.zeros_like(images)
    height = images.shape[2]
    for y in range(height):
        if 0 <= y - rows < height:
            out[:, :, y] = images[:, :, y - rows]
    return out


def bilinear(plane: np.ndarray, sy: float, sx: float) -> float:
    """``plane`` at the real position ``(sy, sx)`` from its four neighbouring pixels; outside pixels are 0."""
    y0, x0 = math.floor(sy), math.floor(sx)
    fy, fx = sy - y0, sx - x0
    total = 0.0
    for y, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for x, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= y < plane.shape[0] and 0 <= x < plane.shape[1]:
                total += wy * wx * float(plane[y, x])
    return total


def resampled(images: np.ndarray, source) -> np.ndarray:
    """``(N, C, H, W)`` where output pixel ``(y, x)`` is the input sampled at ``source(dy, dx)`` + centre,
    ``(dy, dx)`` being the output pixel's offset from the centre."""
    height, width = images.shape[2:]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    out = np.zeros(images.shape, dtype=np.float64)
    for y in range(height):
        for x in range(width):
            dy, dx = source(y - cy, x - cx)
            for n in range(images.shape[0]):
                for c in range(images.shape[1]):
                    out[n, c, y, x] = bilinear(images[n, c], cy + dy, cx + dx)
    return out


def scaled(images: np.ndarray, factor: float) -> np.ndarray:
    """Magnified ``factor`` times about the centre: the output at offset d shows the input at offset d / factor."""
    return resampled(images, lambda dy, dx: (dy / factor, dx / factor))


def rotated(images: np.ndarray, degrees: float) -> np.ndarray:
    """Turned anticlockwise on screen. In screen axes (X right, Y up: X = dx, Y = −dy) the output at
    (X, Y) shows the input at (X, Y) turned back by −θ."""
    angle = math.radians(degrees)

    def source(dy, dx):
        x, y = dx, -dy
        back_x = x * math.cos(angle) + y * math.sin(angle)
        back_y = -x * math.sin(angle) + y * math.cos(angle)
        return -back_y, back_x

    return resampled(images, source)


def moved(images: np.ndarray, transform: str, amount: float) -> np.ndarray:
    if transform == "translate":
        return shifted(images, int(amount))
    if transform == "scale":
        return scaled(images, amount)
    return rotated(images, amount)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------- the tiny net


class Tiny(nn.Module):
    """conv → ReLU (in place) → conv → ReLU → flatten → Linear → ReLU → Linear, on 1×10×12 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True)
        self.conv2, self.relu2 = nn.Conv2d(3, 4, 3), nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1, self.relu3, self.fc2 = nn.Linear(4 * 6 * 8, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


TINY_LAYERS = "1,conv1,2,fc"


def tiny_by_hand(net: Tiny, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``{layer name: (N, D)}`` for ``TINY_LAYERS`` and the logits, one module at a time (no hooks)."""
    with torch.no_grad():
        x = torch.from_numpy(images).float()
        conv1 = net.conv1(x)
        layer1 = torch.relu(conv1)
        layer2 = torch.relu(net.conv2(layer1))
        fc_input = torch.relu(net.fc1(layer2.flatten(1)))
        logits = net.fc2(fc_input)
    vectors = {"1": layer1, "conv1": conv1, "2": layer2, "fc": fc_input}
    return {k: v.flatten(1).double().numpy() for k, v in vectors.items()}, logits.double().numpy()


def embedded_by_hand(model, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Layers 1 and 5 (the ReLUs after conv1 and conv5) and the input of the last Linear of the embedded model."""
    features_, classifier = model.module.features, model.module.classifier
    with torch.no_grad():
        x = torch.from_numpy(images).float()
        layer1 = features_[1](features_[0](x)).clone()
        layer5 = features_[2:12](layer1.clone())
        fc_input = classifier[:4](features_[12](layer5).flatten(1))
        logits = classifier[4](fc_input)
    vectors = {"1": layer1, "5": layer5, "fc": fc_input}
    return {k: v.flatten(1).double().numpy() for k, v in vectors.items()}, logits.double().numpy()


def tiny_model():
    torch.manual_seed(0)
    return wrap(Tiny(), (1, HEIGHT, WIDTH), categories=CATEGORIES, name="tiny")


def grey_images(folder, names, seed: int = 0) -> dict[str, np.ndarray]:
    """Random 10×12 grey PNGs in ``folder``; their pixels in 0..1 as ``(1, H, W)``, by absolute path."""
    folder.mkdir(exist_ok=True)
    generator = np.random.default_rng(seed)
    pixels = {}
    for name in names:
        data = generator.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
        Image.fromarray(data).save(folder / name)
        pixels[os.path.abspath(folder / name)] = data[None].astype(np.float64) / 255
    return pixels


def read_csv(path) -> dict[tuple[str, str, float, str], tuple[float, float]]:
    """``(image, transform, amount, layer) → (distance, p_true)``, each key once."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    table = {(r["image"], r["transform"], float(r["amount"]), r["layer"]): (float(r["distance"]), float(r["p_true"]))
             for r in rows}
    assert len(table) == len(rows)
    return table


def expected_table(by_hand, pixels: dict[str, np.ndarray], amounts: dict[str, list[float]], layers: list[str],
                   classes: dict[str, int] | None = None) -> dict[tuple[str, str, float, str], tuple[float, float]]:
    """What ``invariance.csv`` should hold, from ``by_hand`` features of the images moved by the oracles."""
    paths = list(pixels)
    batch = np.stack([pixels[p] for p in paths])
    originals, logits = by_hand(batch)
    true = [int(np.argmax(row)) if classes is None or p not in classes else classes[p]
            for p, row in zip(paths, logits)]
    table = {}
    for transform, values in amounts.items():
        for amount in values:
            vectors, moved_logits = by_hand(moved(batch, transform, amount))
            probabilities = softmax(moved_logits)
            for i, path in enumerate(paths):
                for layer in layers:
                    distance = float(np.sqrt(np.sum((originals[layer][i] - vectors[layer][i]) ** 2)))
                    table[path, transform, float(amount), layer] = (distance, float(probabilities[i, true[i]]))
    return table


def assert_tables_match(found, expected):
    assert set(found) == set(expected)
    for key, (distance, p_true) in expected.items():
        assert found[key][0] == pytest.approx(distance, rel=1e-4, abs=1e-5), key
        assert found[key][1] == pytest.approx(p_true, rel=1e-4, abs=1e-6), key


# ---------------------------------------------------------------------------------------- transformations


def test_translation_is_a_shift_of_whole_rows_with_zeros_uncovered():
    images = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 2, 9, 11))).float()
    for rows in (2, -3, 1, 0, 8, -8, 9, -9, 14, -14):
        out = transformed(images, "translate", rows)
        assert out.shape == images.shape
        assert np.array_equal(out.numpy(), shifted(images.numpy(), rows)), rows
    # a hand-written case: a bright row 2 goes to row 5 when moved down 3, to row 0 when moved up 2
    image = torch.zeros(1, 1, 6, 4)
    image[0, 0, 2] = 1.0
    assert transformed(image, "translate", 3)[0, 0].sum(1).tolist() == [0, 0, 0, 0, 0, 4]
    assert transformed(image, "translate", -2)[0, 0].sum(1).tolist() == [4, 0, 0, 0, 0, 0]
    assert transformed(image, "translate", 6).abs().sum() == 0 and transformed(image, "translate", -7).abs().sum() == 0


def test_scale_and_rotation_match_an_explicit_bilinear_sampler():
    images = np.random.default_rng(2).uniform(-1, 1, (2, 2, 9, 11))
    tensor = torch.from_numpy(images).float()
    for transform, amount, oracle in [("scale", 1.3, scaled), ("scale", 0.7, scaled), ("scale", 2.0, scaled),
                                      ("rotate", 30, rotated), ("rotate", 90, rotated), ("rotate", -45, rotated),
                                      ("rotate", 450, rotated), ("rotate", 180, rotated)]:
        out = transformed(tensor, transform, amount).double().numpy()
        assert out.shape == images.shape
        np.testing.assert_allclose(out, oracle(images, amount), atol=2e-6, err_msg=f"{transform} {amount}")
    even = np.random.default_rng(3).uniform(0, 1, (1, 1, 8, 10))  # a centre between pixels
    for transform, amount, oracle in [("scale", 1.3, scaled), ("rotate", 30, rotated)]:
        out = transformed(torch.from_numpy(even).float(), transform, amount).double().numpy()
        np.testing.assert_allclose(out, oracle(even, amount), atol=2e-6, err_msg=f"{transform} {amount}")


def test_rotation_is_anticlockwise_on_screen_and_scale_magnifies_about_the_centre():
    image = torch.zeros(1, 1, 9, 11)  # centre (4, 5)
    image[0, 0, 4, 8] = 1.0  # 3 pixels right of the centre
    turned = transformed(image, "rotate", 90)[0, 0]
    assert turned[1, 5] == pytest.approx(1.0, abs=1e-5)  # now 3 pixels above it
    assert turned.sum() == pytest.approx(1.0, abs=1e-5)
    assert transformed(image, "rotate", -90)[0, 0, 7, 5] == pytest.approx(1.0, abs=1e-5)  # clockwise: below
    assert transformed(image, "rotate", 180)[0, 0, 4, 2] == pytest.approx(1.0, abs=1e-5)  # opposite: left
    image = torch.zeros(1, 1, 9, 11)
    image[0, 0, 5, 7] = 1.0  # offset (1, 2) from the centre
    grown = transformed(image, "scale", 2)[0, 0]
    assert grown[6, 9] == pytest.approx(1.0, abs=1e-6)  # offset (2, 4)
    assert (grown < 1 - 1e-6).sum() == grown.numel() - 1
    shrunk = transformed(grown[None, None].clone(), "scale", 0.5)[0, 0]
    assert shrunk[5, 7] == pytest.approx(1.0, abs=1e-6)


def test_identity_amounts_leave_the_input_alone():
    images = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 1, 5, 7))).float()
    for transform, amount in [("translate", 0), ("scale", 1), ("rotate", 0), ("rotate", 360), ("rotate", -720)]:
        assert torch.equal(transformed(images, transform, amount), images), (transform, amount)


def test_unknown_transform_and_non_positive_scale_are_refused():
    images = torch.zeros(1, 1, 4, 4)
    with pytest.raises(VizDeconvError, match="shear"):
        transformed(images, "shear", 1)
    for factor in (0, -1.5):
        with pytest.raises(VizDeconvError, match="scale"):
            transformed(images, "scale", factor)


def test_default_amounts():
    assert default_amounts("translate", 224) == [float(d) for d in range(-60, 61, 5)]
    # at 28 px the paper's steps of 5 px become 5/8 px: rounded, every whole pixel from -8 to 8, once
    assert default_amounts("translate", 28) == [float(d) for d in range(-8, 9)]
    assert default_amounts("translate", 448) == [float(d) for d in range(-120, 121, 10)]
    scales = default_amounts("scale", 28)
    assert len(scales) == 17 and scales[0] == pytest.approx(0.6) and scales[-1] == pytest.approx(1.4)
    assert np.allclose(np.diff(scales), 0.05) and any(s == 1 for s in scales)
    assert default_amounts("rotate", 28) == [float(a) for a in range(0, 361, 10)]


# ---------------------------------------------------------------------------------------- features and measure


def test_distance_is_zero_at_the_identity_at_every_layer():
    model = tiny_model()
    chosen = feature_layers(model, trace_layers(model), TINY_LAYERS)
    assert [layer.name for layer in chosen] == ["1", "conv1", "2", "fc"]
    images = torch.from_numpy(np.random.default_rng(5).uniform(0, 1, (3, 1, HEIGHT, WIDTH))).float()
    amounts = {"translate": [0], "scale": [1], "rotate": [0, 360]}
    found = list(measure(model, chosen, images, amounts, [None, None, None]))
    assert [(m.transform, m.amount) for m in found] == [("translate", 0), ("scale", 1), ("rotate", 0), ("rotate", 360)]
    _, logits = tiny_by_hand(model.module, images.double().numpy())
    top = logits.argmax(1)
    for m in found:
        assert m.distances.shape == (4, 3)
        assert torch.count_nonzero(m.distances) == 0, (m.transform, m.amount)
        assert m.classes.tolist() == top.tolist()
        np.testing.assert_allclose(m.p_true.numpy(), softmax(logits)[np.arange(3), top], rtol=1e-5)
    assert hook_count(model.module) == 0


def test_feature_vectors_are_whole_layer_outputs_and_the_last_linear_input():
    model = tiny_model()
    chosen = feature_layers(model, trace_layers(model), TINY_LAYERS)
    assert chosen[-1].linear == "fc2"
    batch = np.random.default_rng(6).uniform(0, 1, (2, 1, HEIGHT, WIDTH))
    vectors, logits = features(model, chosen, torch.from_numpy(batch).float())
    expected, expected_logits = tiny_by_hand(model.module, batch)
    for layer, vector in zip(chosen, vectors):
        np.testing.assert_allclose(vector.numpy(), expected[layer.name], rtol=1e-5, atol=1e-6, err_msg=layer.name)
    np.testing.assert_allclose(logits.numpy(), expected_logits, rtol=1e-5, atol=1e-6)
    assert hook_count(model.module) == 0


def test_feature_layers_refuse_fc_without_a_linear_and_unknown_layers():
    torch.manual_seed(0)
    convs = wrap(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), (1, 8, 8))
    with pytest.raises(LayerError, match="nn.Linear"):
        feature_layers(convs, trace_layers(convs), "1,fc")
    model = tiny_model()
    layers = trace_layers(model)
    for spec in ("7", "conv9", "1,nonsense"):
        with pytest.raises(LayerError):
            feature_layers(model, layers, spec)
    assert [layer.name for layer in feature_layers(model, layers, "FC, 2, 2,fc")] == ["fc", "2"]


# ---------------------------------------------------------------------------------------- the job


def test_csv_matches_features_computed_by_hand_on_a_tiny_net(tmp_path):
    model = tiny_model()
    pixels = grey_images(tmp_path / "in", ["a.png", "b.png", "c.png"])
    amounts = {"translate": [-3, 0, 2, 11], "scale": [0.8, 1.25], "rotate": [90, 45]}
    report = InvarianceJob(model, TINY_LAYERS, amounts=amounts, out=tmp_path / "out", batch_size=2).run(
        [tmp_path / "in"])
    folder = tmp_path / "out" / "invariance"
    assert report.table == folder / "invariance.csv" and report.figure == folder / "curves.png"
    assert report.figure.is_file() and report.failures == []
    assert [os.path.abspath(p) for p in report.images] == list(pixels)
    assert json.loads((folder / "index.json").read_text())["failed"] == []
    expected = expected_table(lambda b: tiny_by_hand(model.module, b), pixels, amounts, ["1", "conv1", "2", "fc"])
    assert_tables_match(read_csv(report.table), expected)
    # the report's arrays hold the same numbers: (layers, images, amounts) and (images, amounts)
    assert report.distances["rotate"].shape == (4, 3, 2) and report.p_true["scale"].shape == (3, 2)
    a, = [p for p in pixels if p.endswith("a.png")]
    assert report.distances["scale"][3, 0, 1] == pytest.approx(expected[a, "scale", 1.25, "fc"][0], rel=1e-4)
    assert hook_count(model.module) == 0


def test_csv_matches_features_computed_by_hand_on_the_embedded_model(tmp_path, embedded):
    folder = tmp_path / "in"
    folder.mkdir()
    names = sorted(p.name for p in FASHION.glob("*.png"))[:2]
    for name in names:
        shutil.copy(FASHION / name, folder / name)
    pixels = {os.path.abspath(folder / name): embedded.preprocess(Image.open(folder / name)).double().numpy()
              for name in names}
    amounts = {"translate": [-4, 3], "scale": [1.25]}
    report = InvarianceJob(embedded, "1,5,fc", transforms=("translate", "scale"), amounts=amounts,
                           out=tmp_path / "out").run([folder])
    assert [layer.name for layer in report.layers] == ["1", "5", "fc"]
    expected = expected_table(lambda b: embedded_by_hand(embedded, b), pixels, amounts, ["1", "5", "fc"])
    assert_tables_match(read_csv(report.table), expected)
    assert all(distance > 0 for distance, _ in expected.values())  # every amount really moves the features
    assert hook_count(embedded.module) == 0


def test_targets_choose_the_class_whose_probability_is_reported(tmp_path):
    model = tiny_model()
    pixels = grey_images(tmp_path / "in", ["a.png", "b.png", "c.png"], seed=7)
    paths = list(pixels)
    _, logits = tiny_by_hand(model.module, np.stack(list(pixels.values())))
    top = logits.argmax(1).tolist()
    amounts = {"translate": [0, 2]}

    def by_hand(batch):
        return tiny_by_hand(model.module, batch)

    # a class for all that is not the top class of at least one image, and one for b that is not b's own
    everyone = next(c for c in range(3) if any(t != c for t in top))
    other = (top[1] + 1) % 3
    other = other if other != everyone else (other + 1) % 3
    cases = [
        ((CATEGORIES[everyone].upper(),), {p: everyone for p in paths}),
        ((str(everyone),), {p: everyone for p in paths}),
        ((f"b.png={CATEGORIES[other]}",), {paths[1]: other}),
        ((CATEGORIES[everyone], f"b.png={other}"), {paths[0]: everyone, paths[1]: other, paths[2]: everyone}),
    ]
    for i, (targets, classes) in enumerate(cases):
        report = InvarianceJob(model, "2,fc", transforms=("translate",), amounts=amounts, targets=targets,
                               out=tmp_path / f"out{i}").run([tmp_path / "in"])
        assert report.classes == [classes.get(p, t) for p, t in zip(paths, top)], targets
        assert_tables_match(read_csv(report.table), expected_table(by_hand, pixels, amounts, ["2", "fc"], classes))
    for targets, message in [(("zebra",), "zebra"), (("3",), "'3'"), (("a.png=zebra",), "zebra"),
                             (("missing.png=dog",), "missing.png")]:
        with pytest.raises(VizDeconvError, match=message) as caught:
            InvarianceJob(model, "fc", transforms=("translate",), amounts=amounts, targets=targets,
                          out=tmp_path / "refused").run([tmp_path / "in"])
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "refused" / "invariance" / "invariance.csv").exists()


def test_a_corrupt_image_is_reported_and_the_others_are_measured(tmp_path):
    model = tiny_model()
    before = copy.deepcopy(model.module.state_dict())
    pixels = grey_images(tmp_path / "in", ["a.png", "c.png"])
    (tmp_path / "in" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    amounts = {"translate": [1], "rotate": [30]}
    report = InvarianceJob(model, "1,fc", transforms=("translate", "rotate"), amounts=amounts,
                           out=tmp_path / "out").run([tmp_path / "in", tmp_path / "missing.png"])
    assert sorted(os.path.basename(f.path) for f in report.failures) == ["b.png", "missing.png"]
    assert [os.path.abspath(p) for p in report.images] == list(pixels)
    expected = expected_table(lambda b: tiny_by_hand(model.module, b), pixels, amounts, ["1", "fc"])
    assert_tables_match(read_csv(report.table), expected)
    failed = json.loads((tmp_path / "out" / "invariance" / "index.json").read_text())["failed"]
    assert sorted(os.path.basename(f["image"]) for f in failed) == ["b.png", "missing.png"]
    assert hook_count(model.module) == 0
    after = model.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class Exploding(Tiny):
    """Raises on the second forward pass once armed: the first transformed batch."""

    armed, calls = False, 0

    def forward(self, x):
        if self.armed:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
        return super().forward(x)


def test_no_hook_is_left_after_a_forced_error(tmp_path):
    torch.manual_seed(0)
    model = wrap(Exploding(), (1, HEIGHT, WIDTH), categories=CATEGORIES)
    grey_images(tmp_path / "in", ["a.png"])
    job = InvarianceJob(model, "1,conv1,fc", transforms=("scale",), amounts={"scale": [1.5]}, out=tmp_path / "out")
    model.module.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        job.run([tmp_path / "in"])
    assert model.module.calls == 2 and hook_count(model.module) == 0


# ---------------------------------------------------------------------------------------- the command


def test_cli_measures_the_default_translations_and_reports_failures(tmp_path, embedded):
    folder = tmp_path / "in"
    folder.mkdir()
    names = sorted(p.name for p in FASHION.glob("*.png"))[:2]  # an ankle boot and a pullover
    for name in names:
        shutil.copy(FASHION / name, folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = run("invariance", folder, "--transform", "translate", "--layers", "5,fc", "--target", "trouser",
                 "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "broken.png" in result.stderr and "2 images measured, 1 failed" in result.stderr
    assert "translate: 17 amounts, -8 to 8" in result.stdout
    pixels = {os.path.abspath(folder / name): embedded.preprocess(Image.open(folder / name)).double().numpy()
              for name in names}
    trouser = list(embedded.categories).index("Trouser")
    _, logits = embedded_by_hand(embedded, np.stack(list(pixels.values())))
    assert trouser not in logits.argmax(1)  # so --target really changes the class read
    expected = expected_table(lambda b: embedded_by_hand(embedded, b), pixels,
                              {"translate": [float(d) for d in range(-8, 9)]}, ["5", "fc"],
                              {p: trouser for p in pixels})
    assert_tables_match(read_csv(tmp_path / "out" / "invariance" / "invariance.csv"), expected)
    assert (tmp_path / "out" / "invariance" / "curves.png").is_file()


def test_cli_usage_errors_are_one_line_with_exit_code_2(tmp_path):
    for args, message in [(("--target", "zebra"), "zebra"), (("--transform", "shear"), "shear"),
                          (("--layers", "5,features.99"), "features.99"),
                          (("--target", "missing.png=coat"), "missing.png")]:
        result = run("invariance", FASHION / "test00000_ankle-boot.png", *args, "--out", tmp_path)
        assert result.exit_code == 2, args
        assert message in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_amounts_from_the_command_line():
    assert parse_amounts("rotate=0:90:15") == ("rotate", [0.0, 15.0, 30.0, 45.0, 60.0, 75.0, 90.0])
    assert parse_amounts("scale=0.6:1:0.1") == ("scale", [0.6, 0.7, 0.8, 0.9, 1.0])  # the stop despite rounding
    assert parse_amounts("translate=-3:4:2") == ("translate", [-3.0, -1.0, 1.0, 3.0])  # 4 is not reached
    assert parse_amounts(" scale = 0.5,1,2") == ("scale", [0.5, 1.0, 2.0])
    for bad in ("rotate", "rotate=", "rotate=0:90", "rotate=0:90:0", "rotate=90:0:10", "rotate=a,b"):
        with pytest.raises(VizDeconvError, match="--amounts"):
            parse_amounts(bad)
    with pytest.raises(VizDeconvError, match="unknown transform 'shear'"):
        parse_amounts("shear=0:1:1")


def test_cli_amounts_and_a_run_where_every_file_fails(tmp_path):
    image = FASHION / "test00000_ankle-boot.png"
    result = CliRunner().invoke(main, ["invariance", str(image), "--transform", "rotate", "--amounts",
                                       "rotate=0:90:45", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with open(tmp_path / "invariance" / "invariance.csv", newline="") as file:
        assert sorted({float(row["amount"]) for row in csv.DictReader(file)}) == [0.0, 45.0, 90.0]
    result = CliRunner().invoke(main, ["invariance", str(image), "--transform", "scale", "--amounts",
                                       "rotate=0:90:45", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 2 and "not among the transforms" in result.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    result = CliRunner().invoke(main, ["invariance", str(broken), "--out", str(tmp_path / "none")],
                                catch_exceptions=False)
    assert result.exit_code == 1 and "failed:" in result.stderr and "broken.png" in result.stderr
    assert not (tmp_path / "none" / "invariance").exists()
    for bad in ("rotate=0:90", "translate=inf", "translate=0:3:0.5", "scale=0:2:1"):
        result = CliRunner().invoke(main, ["invariance", str(image), "--amounts", bad, "--out", str(tmp_path / "x")],
                                    catch_exceptions=False)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, (bad, result.stderr)
    assert not (tmp_path / "x").exists()  # refused before any work


class Head(nn.Module):
    """The classifier defined first, an auxiliary head defined last that eval never runs, and a
    first op that works on its input in place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(4 * 4 * 4, 3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.aux = nn.Linear(4 * 4 * 4, 7)

    def forward(self, x):
        x.mul_(2)
        features = torch.relu(self.conv(x)).flatten(1)
        return self.aux(features) if self.training else self.head(features)


def test_fc_is_the_linear_that_runs_last_and_inputs_are_left_alone():
    model = wrap(Head(), (1, 4, 4), categories=("a", "b", "c"))
    (fc,) = feature_layers(model, trace_layers(model), "fc")
    assert fc.linear == "head"
    torch.manual_seed(1)
    images = torch.randn(2, 1, 4, 4)
    kept = images.clone()
    (vector,), logits = features(model, [fc], images)
    torch.testing.assert_close(images, kept, rtol=0, atol=0)  # the model doubled its own copy
    expected = torch.relu(model.module.conv(kept * 2)).flatten(1)
    torch.testing.assert_close(vector, expected)
    torch.testing.assert_close(logits, model.module.head(expected))
    (step,) = measure(model, [fc], images, {"translate": [1]}, [None])
    hand = torch.zeros_like(kept)
    hand[:, :, 1:] = kept[:, :, :-1]
    moved = torch.relu(model.module.conv(hand * 2)).flatten(1)
    torch.testing.assert_close(step.distances[0], (expected - moved).norm(dim=1))
