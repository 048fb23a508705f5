"""Correspondence of parts across images (``vizdeconv.correspondence``, ``CorrespondenceJob``,
``vizdeconv correspondence``; paper section 5.1, Table 1) against the definition computed here.

The expectations never use the library's masking, sign or pairing code. The hand-set model's layers
have closed forms: ``seen`` is the normalised input itself and ``fc`` (the input of the classifier)
is a fixed 1×1 mixing of its channels, so a masked box changes exactly the entries under the box, by
``(pixel − fill) / (255·std)`` (mixed by the 1×1 weights for ``fc``). Boxes are painted into numpy
arrays, random control boxes are drawn again with ``numpy.random.default_rng`` in the library's
documented order, and Δ is a double loop over the ordered pairs ``i ≠ j``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import PHOTOS
from oracles import hook_count, wrap
from PIL import Image
from torch import nn

from vizdeconv.cli import main
from vizdeconv.errors import VizDeconvError
from vizdeconv.jobs.correspondence import CorrespondenceJob
from vizdeconv.models import LoadedModel

SIDE = 12
MEAN, STD = (0.2, 0.45, 0.8), (0.5, 0.25, 1.0)
FILL = (51, 115, 204)  # round(255·MEAN): 51, 114.75 → 115, 204
# the 1×1 mixing of ``fc``: irrational-looking weights, so that a mixed change is zero only where every
# channel it reads is unchanged (checked on the expectations below)
MIX = np.array([[1.0, -math.sqrt(2.0), 0.0], [0.5, math.e / 3, -1.0 / math.pi]], dtype=np.float32)
NAMES = ["a.png", "b.png", "c.png", "d.png"]
# boxes of different sizes per image, [y0, x0, y1, x1] end exclusive, parts in the same order everywhere
BOXES = {
    "a.png": {"eye": [1, 2, 4, 6], "nose": [5, 5, 10, 9]},
    "b.png": {"eye": [0, 0, 2, 2], "nose": [6, 1, 12, 12]},
    "c.png": {"eye": [7, 7, 12, 12], "nose": [2, 3, 5, 5]},
    "d.png": {"eye": [3, 4, 9, 11], "nose": [0, 0, 12, 1]},
}
PARTS = ["eye", "nose"]
LAYERS = ["seen", "fc"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------------------------- the models


class Handset(nn.Module):
    """``seen`` (the normalised input), a fixed 1×1 mixing to 2 channels, a random classifier on top."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.seen = nn.Identity()
        self.mix = nn.Conv2d(3, 2, 1)
        self.head = nn.Linear(2 * SIDE * SIDE, 3)
        with torch.no_grad():
            self.mix.weight.copy_(torch.from_numpy(MIX)[:, :, None, None])
            self.mix.bias.copy_(torch.tensor([0.3, -0.7]))

    def forward(self, x):
        return self.head(self.mix(self.seen(x)).flatten(1))


def handset() -> nn.Module:
    """``--model test_correspondence:handset --input-size 12 --mean 0.2,0.45,0.8 --std 0.5,0.25,1``."""
    return Handset()


HANDSET_OPTIONS = ("--model", "test_correspondence:handset", "--input-size", SIDE, "--mean", ",".join(map(str, MEAN)),
                   "--std", ",".join(map(str, STD)))


def handset_model() -> LoadedModel:
    return LoadedModel.from_module(Handset(), (3, SIDE, SIDE), mean=MEAN, std=STD, name="handset", weights="hand",
                                   device="cpu")


def colour() -> nn.Module:
    """``--model test_correspondence:colour``: class 0 is the sum of the red channel, class 1 of the blue one."""
    head = nn.Linear(3 * SIDE * SIDE, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0, : SIDE * SIDE] = 1.0
        head.weight[1, 2 * SIDE * SIDE:] = 1.0
    return nn.Sequential(nn.Flatten(), head)


def tiny() -> nn.Module:
    """``--model test_correspondence:tiny --input-size 64``: a random conv net with a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


# ------------------------------------------------------------------------------------------------ the inputs


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def write_images(folder: Path, names=NAMES) -> dict[str, np.ndarray]:
    """Random-pixel ``SIDE×SIDE`` RGB PNGs (lossless) and their pixels by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for index, name in enumerate(names):
        arrays[name] = pixels(100 + index)
        Image.fromarray(arrays[name]).save(folder / name)
    return arrays


def write_parts(path: Path, boxes=BOXES) -> Path:
    path.write_text(json.dumps(boxes))
    return path


@pytest.fixture
def inputs(tmp_path):
    """``(image paths, pixels by name, PARTS.json)`` for the four hand-made images."""
    arrays = write_images(tmp_path / "in")
    return [tmp_path / "in" / name for name in NAMES], arrays, write_parts(tmp_path / "parts.json")


# --------------------------------------------------------------------------------------------- the definition


def change(array: np.ndarray, box, layer: str) -> np.ndarray:
    """ε = f(x) − f(x with ``box`` painted ``FILL``), in closed form, float64."""
    y0, x0, y1, x1 = box
    painted = array.astype(np.float64)
    painted[y0:y1, x0:x1] = FILL
    diff = (array.astype(np.float64) - painted) / (255.0 * np.array(STD))  # (H, W, 3) normalised change
    if layer == "seen":
        return diff.ravel()
    return np.einsum("kc,hwc->khw", MIX.astype(np.float64), diff).ravel()  # the 1×1 conv; its bias cancels


def ordered_fractions(changes: list[np.ndarray]) -> dict[tuple[int, int], float]:
    """Per ordered pair i ≠ j, the fraction of entries whose signs (−1, 0, 1) differ, entry by entry."""
    fractions = {}
    for i, j in itertools.permutations(range(len(changes)), 2):
        differ = sum(1 for a, b in zip(changes[i], changes[j]) if np.sign(a) != np.sign(b))
        fractions[i, j] = differ / len(changes[i])
    return fractions


def unordered(fractions: dict[tuple[int, int], float]) -> list[float]:
    return [value for (i, j), value in fractions.items() if i < j]


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def expected_part(arrays: dict[str, np.ndarray], names: list[str], part: str, layer: str) -> tuple[float, float]:
    """Δ and its population std over the ordered pairs, after checking they equal the unordered ones."""
    changes = [change(arrays[name], BOXES[name][part], layer) for name in names]
    nonzero = np.abs(np.concatenate(changes))
    assert nonzero[nonzero > 0].min() > 1e-4  # no near-ties: float32 rounding cannot flip an expected sign
    fractions = ordered_fractions(changes)
    ordered, pairs = mean_std(list(fractions.values())), mean_std(unordered(fractions))
    assert ordered == pytest.approx(pairs, rel=1e-12, abs=1e-15)
    return ordered


def random_boxes(seed: int, repeats: int, names: list[str]) -> list[dict[str, dict[str, list[int]]]]:
    """The control's boxes, drawn as the library documents: per repeat, per image (sorted), per part
    (PARTS.json's order), the top then the left edge, each uniform over the places that fit."""
    rng = np.random.default_rng(seed)
    drawn = []
    for _ in range(repeats):
        per_image = {}
        for name in names:
            per_image[name] = {}
            for part in PARTS:
                y0, x0, y1, x1 = BOXES[name][part]
                top = int(rng.integers(0, SIDE - (y1 - y0) + 1))
                left = int(rng.integers(0, SIDE - (x1 - x0) + 1))
                per_image[name][part] = [top, left, top + y1 - y0, left + x1 - x0]
        drawn.append(per_image)
    return drawn


def expected_random(arrays, names, seed: int, repeats: int, layer: str) -> tuple[float, float]:
    """Each repeat's mean of the unordered pair fractions of all its parts; their mean and population std."""
    means = []
    for boxes in random_boxes(seed, repeats, names):
        fractions = []
        for part in PARTS:
            for name in names:
                y0, x0, y1, x1 = boxes[name][part]
                assert 0 <= y0 < y1 <= SIDE and 0 <= x0 < x1 <= SIDE
            fractions += unordered(ordered_fractions([change(arrays[name], boxes[name][part], layer) for name in names]))
        means.append(sum(fractions) / len(fractions))
    return mean_std(means)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- tests


def test_preconditions_the_layers_have_the_closed_forms_used_here(inputs):
    """The input of a 12×12 file is its pixels normalised, and ``fc`` is their 1×1 mixing plus the bias."""
    paths, arrays, _ = inputs
    model = handset_model()
    picture = Image.open(paths[0]).convert("RGB")
    x = model.preprocess(picture)
    expected = (arrays["a.png"].astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    mixed = model.module.mix(x[None])[0].detach().numpy()
    np.testing.assert_allclose(mixed, np.einsum("kc,hwc->khw", MIX, expected) + np.array([0.3, -0.7])[:, None, None],
                               atol=1e-5)


def test_delta_and_std_are_the_mean_sign_change_over_pairs(inputs, tmp_path):
    paths, arrays, parts = inputs
    model = handset_model()
    done = CorrespondenceJob(model, parts, "seen,fc", random=1, out=tmp_path / "out", batch_size=5).run(paths)
    assert [layer.name for layer in done.layers] == LAYERS
    assert done.parts == PARTS + ["random"]
    assert [p.name for p in done.images] == NAMES and done.failures == []
    assert set(done.table) == {(part, layer) for part in PARTS + ["random"] for layer in LAYERS}
    for part in PARTS:
        for layer in LAYERS:
            delta, std = expected_part(arrays, NAMES, part, layer)
            assert done.table[part, layer] == pytest.approx((delta, std), rel=1e-9, abs=1e-12), (part, layer)
    # the boxes differ in size, so no part's changes are alike: Δ is neither 0 nor the same for both parts
    assert 0 < done.table["eye", "seen"][0] != done.table["nose", "seen"][0]


def test_the_random_control_matches_the_drawn_boxes_and_is_reproducible(inputs, tmp_path):
    paths, arrays, parts = inputs
    model = handset_model()

    def job(seed):
        return CorrespondenceJob(model, parts, "seen,fc", random=3, seed=seed, out=tmp_path / f"out{seed}").run(paths)

    first, again, other = job(7), job(7), job(8)
    assert first.table == again.table
    for layer in LAYERS:
        for seed, done in ((7, first), (8, other)):
            expected = expected_random(arrays, NAMES, seed, 3, layer)
            assert done.table["random", layer] == pytest.approx(expected, rel=1e-9, abs=1e-12), (seed, layer)
        assert other.table["random", layer] != first.table["random", layer]
        for part in PARTS:
            assert other.table[part, layer] == first.table[part, layer]


def test_table_csv_matches_the_report_and_the_figure_is_a_png(inputs, tmp_path):
    paths, _, parts = inputs
    out = tmp_path / "out"
    done = CorrespondenceJob(handset_model(), parts, "seen,fc", random=2, out=out).run(paths)
    folder = out / "correspondence"
    assert done.csv == folder / "table.csv" and done.figure == folder / "figure.png"
    with open(done.csv, newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == ["part", "layer", "delta", "delta_std"]
    assert [(r["part"], r["layer"]) for r in rows] == [(p, layer) for p in PARTS + ["random"] for layer in LAYERS]
    for row in rows:
        delta, std = done.table[row["part"], row["layer"]]
        assert float(row["delta"]) == pytest.approx(delta, abs=1e-6)
        assert float(row["delta_std"]) == pytest.approx(std, abs=1e-6)
    assert done.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(done.figure) as figure:
        assert figure.format == "PNG" and figure.width > 100 and figure.height > 100
    index = json.loads((folder / "index.json").read_text())
    assert index["kind"] == "correspondence" and [f["png"] for f in index["figures"]] == ["figure.png"]


def test_a_box_outside_its_image_fails_that_image_only(tmp_path):
    arrays = write_images(tmp_path / "in")
    boxes = {name: dict(parts) for name, parts in BOXES.items()}
    boxes["c.png"] = {"eye": [7, 7, 12, 13], "nose": [2, 3, 5, 5]}  # x1 = 13 > 12
    parts = write_parts(tmp_path / "parts.json", boxes)
    paths = [tmp_path / "in" / name for name in NAMES]
    done = CorrespondenceJob(handset_model(), parts, "seen", random=1, out=tmp_path / "out").run(paths)
    assert [p.name for p in done.images] == ["a.png", "b.png", "d.png"]
    (failure,) = done.failures
    assert Path(failure.path).name == "c.png" and "[7, 7, 12, 13]" in str(failure) and "outside" in str(failure)
    for part in PARTS:
        assert done.table[part, "seen"] == pytest.approx(expected_part(arrays, ["a.png", "b.png", "d.png"], part,
                                                                       "seen"), rel=1e-9, abs=1e-12)
    result = run("correspondence", *paths, "--parts", parts, "--layers", "seen", "--random", 1,
                 "--out", tmp_path / "cli", *HANDSET_OPTIONS)
    assert result.exit_code == 1, result.output
    assert "failed:" in result.stderr and "c.png" in result.stderr and "Traceback" not in result.output
    with open(tmp_path / "cli" / "correspondence" / "table.csv", newline="") as file:
        assert [r["part"] for r in csv.DictReader(file)] == PARTS + ["random"]


def bad_inputs(tmp_path: Path, case: str) -> tuple[list[Path], Path, str]:
    """``(images, PARTS.json, a piece of the one-line message)`` for one kind of bad input."""
    write_images(tmp_path / "in")
    paths = [tmp_path / "in" / name for name in NAMES[:3]]
    boxes = {name: dict(parts) for name, parts in BOXES.items() if name in NAMES[:3]}
    parts = tmp_path / "parts.json"
    if case == "unknown part":
        boxes["b.png"] = {"eye": [0, 0, 2, 2], "ear": [6, 1, 12, 12]}
        expected = "unknown part 'ear'"
    elif case == "missing part":
        boxes["c.png"] = {"eye": [7, 7, 12, 12]}
        expected = "missing 'nose'"
    elif case == "no entry":
        del boxes["b.png"]
        expected = "no entry for b.png"
    elif case == "malformed json":
        parts.write_text('{"a.png": {"eye": [1, 2, 4, 6]')
        return paths, parts, "cannot read the parts file"
    elif case == "not a box":
        boxes["a.png"] = {"eye": [1, 2, 4], "nose": [5, 5, 10, 9]}
        expected = "should be [y0, x0, y1, x1]"
    elif case == "part named random":
        boxes = {name: {"random": box["eye"]} for name, box in boxes.items()}
        expected = "'random' names the control"
    elif case == "empty box, one image left":
        paths = paths[:2]
        boxes["b.png"] = {"eye": [4, 0, 4, 2], "nose": [6, 1, 12, 12]}  # y0 == y1
        expected = "at least 2 readable images, got 1"
    elif case == "unreadable image, one left":
        (tmp_path / "in" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        paths = paths[:2]
        expected = "at least 2 readable images, got 1"
    elif case == "one image":
        paths = paths[:1]
        expected = "at least 2 readable images, got 1"
    write_parts(parts, boxes)
    return paths, parts, expected


BAD = ["unknown part", "missing part", "no entry", "malformed json", "not a box", "part named random",
       "empty box, one image left", "unreadable image, one left", "one image"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_keeps_what_out_holds(tmp_path, case):
    paths, parts, expected = bad_inputs(tmp_path, case)
    out = tmp_path / "out"
    (out / "correspondence").mkdir(parents=True)
    (out / "correspondence" / "table.csv").write_text("part,layer,delta,delta_std\nearlier,run,0.5,0.1\n")
    (out / "correspondence" / "figure.png").write_bytes(b"an earlier figure")
    (out / "index.html").write_text("<p>earlier</p>")
    before = snapshot(out)
    with pytest.raises(VizDeconvError) as raised:
        CorrespondenceJob(handset_model(), parts, "seen", random=1, out=out).run(paths)
    message = str(raised.value)
    assert expected in message and "\n" not in message
    if case == "empty box, one image left":
        assert "b.png" in message and "[4, 0, 4, 2]" in message
    if case == "unreadable image, one left":
        assert "b.png" in message
    result = run("correspondence", *paths, "--parts", parts, "--layers", "seen", "--random", 1, "--out", out,
                 *HANDSET_OPTIONS)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0]
    assert "Traceback" not in result.output
    assert snapshot(out) == before


def test_images_of_different_top_classes_get_a_note_not_an_error(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    colours = {"r1.png": (200, 30, 20), "b.png": (20, 30, 200), "r2.png": (220, 10, 40)}
    for name, rgb in colours.items():
        Image.new("RGB", (SIDE, SIDE), rgb).save(folder / name)
    boxes = {name: {"corner": [0, 0, 3, 3]} for name in colours}
    parts = write_parts(tmp_path / "parts.json", boxes)
    model = wrap(colour(), (3, SIDE, SIDE), categories=("red", "blue"), name="colour")
    paths = [folder / name for name in sorted(colours)]  # b, r1, r2
    done = CorrespondenceJob(model, parts, "fc", random=1, out=tmp_path / "out").run(paths)
    assert done.classes == [1, 0, 0]
    (note,) = done.notes
    assert "b.png: blue" in note and "r1.png: red" in note and "r2.png: red" in note
    same = CorrespondenceJob(model, parts, "fc", random=1, out=tmp_path / "out2").run(paths[1:])
    assert same.classes == [0, 0] and same.notes == []
    result = run("correspondence", *paths, "--parts", parts, "--layers", "fc", "--random", 1, "--out",
                 tmp_path / "cli", "--model", "test_correspondence:colour", "--input-size", SIDE, "--mean", "0,0,0",
                 "--std", "1,1,1")
    assert result.exit_code == 0, result.output
    assert "note:" in result.stderr and "top classes differ" in result.stderr


def test_the_shipped_example_through_the_cli(tmp_path):
    parts_file = PHOTOS / "parts.json"
    shipped = json.loads(parts_file.read_text())
    paths = [PHOTOS / name for name in shipped]
    out = tmp_path / "out"
    result = run("correspondence", *paths, "--parts", parts_file, "--layers", "1,fc", "--random", 2, "--out", out,
                 "--model", "test_correspondence:tiny", "--input-size", 64)
    assert result.exit_code == 0, result.output
    names = list(dict.fromkeys(part for boxes in shipped.values() for part in boxes))
    with open(out / "correspondence" / "table.csv", newline="") as file:
        rows = {(r["part"], r["layer"]): (float(r["delta"]), float(r["delta_std"])) for r in csv.DictReader(file)}
    assert set(rows) == {(part, layer) for part in names + ["random"] for layer in ("1", "fc")}
    # the parts' rows again, from the definition: each box painted with ImageNet's mean colour in the
    # original file, then resized to 64×64; features read by hooks of our own on the same random net
    model = LoadedModel.from_module(tiny(), 64, name="tiny", weights="hand", device="cpu")
    fill = tuple(round(255 * m) for m in (0.485, 0.456, 0.406))
    assert fill == (124, 116, 104)
    kept = {}
    handles = [model.module[1].register_forward_hook(lambda m, i, o: kept.__setitem__("1", o.flatten(1).clone())),
               model.module[7].register_forward_pre_hook(lambda m, i: kept.__setitem__("fc", i[0].clone()))]

    def features(array):
        with torch.no_grad():
            model.module(model.preprocess(Image.fromarray(array))[None])
        return {layer: kept[layer][0].double().numpy() for layer in ("1", "fc")}

    try:
        originals = {name: np.asarray(Image.open(PHOTOS / name).convert("RGB")) for name in shipped}
        clean = {name: features(array) for name, array in originals.items()}
        for part in names:
            changes = {"1": [], "fc": []}
            for name, array in originals.items():
                y0, x0, y1, x1 = shipped[name][part]
                painted = array.copy()
                painted[y0:y1, x0:x1] = fill
                masked = features(painted)
                for layer in changes:
                    changes[layer].append(clean[name][layer] - masked[layer])
            for layer, layer_changes in changes.items():
                expected = mean_std(list(ordered_fractions(layer_changes).values()))
                assert rows[part, layer] == pytest.approx(expected, abs=2e-6), (part, layer)
    finally:
        for handle in handles:
            handle.remove()
    assert all(0 <= delta <= 1 for delta, _ in rows.values())


def test_no_hooks_are_left_after_a_run_or_an_error(inputs, tmp_path):
    paths, _, parts = inputs
    model = handset_model()
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    CorrespondenceJob(model, parts, "seen,fc", random=1, out=tmp_path / "out").run(paths)
    assert hook_count(model.module) == 0

    calls = []

    def fail_on_the_second_batch(module, inputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("forced")

    handle = model.module.head.register_forward_pre_hook(fail_on_the_second_batch)
    try:
        with pytest.raises(RuntimeError, match="forced"):
            CorrespondenceJob(model, parts, "seen,fc", random=1, out=tmp_path / "out2", batch_size=3).run(paths)
    finally:
        handle.remove()
    assert len(calls) == 2 and hook_count(model.module) == 0
    assert all(torch.equal(state[k], v) for k, v in model.module.state_dict().items())
    assert not model.module.training


# ------------------------------------------------------------------------------- images wider than the input

WIDE = 36
SEEN = range(12, 24)  # CenterCrop(12) of a 12 × 36 picture keeps columns 12..23


def wide_change(array: np.ndarray, box) -> np.ndarray:
    """ε of ``seen`` for a 12 × 36 picture: the box painted in the whole picture, then the crop."""
    y0, x0, y1, x1 = box
    painted = array.astype(np.float64)
    painted[y0:y1, x0:x1] = FILL
    diff = (array.astype(np.float64) - painted) / (255.0 * np.array(STD))
    return diff[:, SEEN.start:SEEN.stop].ravel()


def test_boxes_the_crop_removes_are_refused_and_random_ones_redrawn(tmp_path):
    (tmp_path / "in").mkdir()
    arrays = {}
    for index, name in enumerate(NAMES[:3]):
        arrays[name] = np.random.default_rng(200 + index).integers(0, 256, (SIDE, WIDE, 3), dtype=np.uint8)
        Image.fromarray(arrays[name]).save(tmp_path / "in" / name)
    boxes = {"a.png": {"eye": [1, 13, 4, 16]}, "b.png": {"eye": [5, 20, 8, 25]}, "c.png": {"eye": [2, 14, 4, 17]}}
    paths = [tmp_path / "in" / name for name in NAMES[:3]]
    done = CorrespondenceJob(handset_model(), write_parts(tmp_path / "parts.json", boxes), "seen", random=4,
                             seed=3, out=tmp_path / "out").run(paths)
    assert not done.failures
    rng, means = np.random.default_rng(3), []
    for _ in range(4):  # the documented draws, a box the crop removes entirely drawn again
        changes = []
        for name in NAMES[:3]:
            y0, x0, y1, x1 = boxes[name]["eye"]
            while True:
                top, left = int(rng.integers(0, SIDE - (y1 - y0) + 1)), int(rng.integers(0, WIDE - (x1 - x0) + 1))
                if left < SEEN.stop and left + x1 - x0 > SEEN.start:
                    break
            changes.append(wide_change(arrays[name], [top, left, top + y1 - y0, left + x1 - x0]))
        means.append(np.mean(unordered(ordered_fractions(changes))))
    assert done.table["random", "seen"] == pytest.approx(mean_std(means), rel=1e-9, abs=1e-12)
    expected = mean_std(unordered(ordered_fractions([wide_change(arrays[n], boxes[n]["eye"]) for n in NAMES[:3]])))
    assert done.table["eye", "seen"] == pytest.approx(expected, rel=1e-9, abs=1e-12)

    boxes["c.png"] = {"eye": [2, 1, 4, 10]}  # wholly left of the crop
    done = CorrespondenceJob(handset_model(), write_parts(tmp_path / "parts.json", boxes), "seen", random=1,
                             out=tmp_path / "again").run(paths)
    (failure,) = done.failures
    assert Path(failure.path).name == "c.png" and "crops" in str(failure)


def test_a_model_that_reads_no_image_files_is_refused_before_any_image(inputs, tmp_path):
    paths, _, parts = inputs
    module = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2 * SIDE * SIDE, 3))
    model = LoadedModel.from_module(module, (4, SIDE, SIDE), name="four", device="cpu")
    with pytest.raises(VizDeconvError, match="takes 4 input channels"):
        CorrespondenceJob(model, parts, "fc", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
