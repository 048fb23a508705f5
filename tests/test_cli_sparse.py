"""`vizdeconv sparse train|infer|filters` through click's CliRunner: the files, the printed lines, the report page,
one-line errors with their exit codes, and OUT left as it was after a usage error."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from factories import FASHION, PHOTOS
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import vizdeconv.cli as cli
from vizdeconv.cli import main
from vizdeconv.sparse_files import METADATA_KEY, load_model

SAMPLES = sorted(FASHION.glob("*.png"))
SHIPPED = Path(__file__).resolve().parent.parent / "sample_images" / "fashion-mnist"  # the link the README uses
TWO = [SHIPPED / "test00000_ankle-boot.png", SHIPPED / "test00008_sandal.png"]
TINY = ("--maps", "4,6", "--kernel", "3", "--epochs", "1", "--steps", "5", "--batch-size", "4")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny convolutions: see conftest


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def crops(folder: Path, sources, box=(8, 8, 20, 20), mode="L") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        with Image.open(source) as image:
            image.convert(mode).crop(box).save(folder / f"{Path(source).stem}.png")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def card_of(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as file:
        return json.loads(file.metadata()[METADATA_KEY])


def one_line_error(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return crops(tmp_path_factory.mktemp("images") / "grey", SAMPLES[:6])


@pytest.fixture(scope="module")
def model(tmp_path_factory, images) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    assert run("sparse", "train", "--images", images, *TINY, "--out", path).exit_code == 0
    return path


# --- train ------------------------------------------------------------------------------------------------------


def test_train_prints_each_layers_cost_and_goes_on_from_its_file(images, tmp_path):
    path = tmp_path / "m.safetensors"
    result = run("sparse", "train", "--images", images, *TINY, "--out", path)
    assert result.exit_code == 0, result.stderr
    costs = card_of(path)["training"]["costs"]
    assert len(costs) == 2
    lines = result.stdout.splitlines()
    for layer, cost in enumerate(costs):
        assert (f"layer {layer + 1}: cost {cost['cost']:.3f} per image = fit {cost['fit']:.3f} + |z| "
                f"{cost['penalty']:.3f} (last epoch's mean)") in lines
    assert f"→ {path}" in lines
    assert result.stderr.strip().splitlines()[-1] == "6 images learned from, 0 failed"

    before = path.read_bytes()
    again = run("sparse", "train", "--images", images, *TINY, "--out", path)
    assert again.exit_code == 0 and "already trained with these settings: nothing to do" in again.stderr
    assert str(path) in again.stderr and "went on from" not in again.stderr
    assert path.read_bytes() == before  # nothing left to train

    changed = run("sparse", "train", "--images", images, *TINY, "--lam", "3", "--out", path)
    one_line_error(changed, str(path), "--restart")
    assert path.read_bytes() == before

    restarted = run("sparse", "train", "--images", images, *TINY, "--lam", "3", "--restart", "--out", path)
    assert restarted.exit_code == 0 and "went on from" not in restarted.stderr
    card = card_of(path)
    assert card["lams"] == [3.0, 3.0] and card["training"]["settings"]["lams"] == [3.0, 3.0]


def test_train_with_one_lam_per_layer_and_one_layer(images, tmp_path):
    result = run("sparse", "train", "--images", images, *TINY, "--lam", "2,7", "--out", tmp_path / "a.safetensors")
    assert result.exit_code == 0 and card_of(tmp_path / "a.safetensors")["lams"] == [2.0, 7.0]
    result = run("sparse", "train", "--images", images, *TINY, "--layers", "1", "--maps", "3",
                 "--out", tmp_path / "b.safetensors")
    assert result.exit_code == 0
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as file:
        assert list(file.keys()) == ["filters.1"] and list(file.get_slice("filters.1").get_shape()) == [3, 1, 3, 3]


def test_train_skips_images_it_cannot_use_and_says_so(tmp_path):
    folder = crops(tmp_path / "images", SAMPLES[:3])
    crops(folder, [PHOTOS / "coffee.jpg"], box=(100, 100, 112, 112), mode="RGB")
    (folder / "coffee.png").rename(folder / "zz-coffee.png")  # colour, after the grey ones (the first sets the kind)
    crops(folder, [SAMPLES[3]], box=(0, 0, 14, 14))  # another size
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    path = tmp_path / "m.safetensors"
    result = run("sparse", "train", "--images", folder, *TINY, "--out", path)
    assert result.exit_code == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 3
    for name in ("zz-coffee.png", f"{SAMPLES[3].stem}.png", "zz-broken.png"):
        assert sum(name in line for line in failed) == 1, (name, failed)
    assert "channel" in next(line for line in failed if "zz-coffee.png" in line)
    assert "3 images learned from, 3 failed" in result.stderr
    assert card_of(path)["training"]["settings"]["files"].startswith("3 files")


BAD_OPTIONS = [
    (("--maps", "4,x"), ["--maps"]),
    (("--maps", "4"), ["--maps", "--layers"]),               # one count for two layers
    (("--maps", "4,6,8"), ["--maps", "--layers"]),
    (("--layers", "1"), ["--maps", "--layers"]),
    (("--maps", "3,6"), ["--maps 3,6"]),                     # layer 1's maps pooled two by two
    (("--maps", "4,0"), ["positive"]),
    (("--lam", "abc"), ["--lam"]),
    (("--lam", "0"), ["positive"]),
    (("--lam", "-1"), ["positive"]),
    (("--lam", "1,2,3"), ["--lam"]),
    # λ must be a positive number, and pooling regions at least one map × 1×1: not a crash half-way in
    (("--lam", "nan"), []),
    (("--lam", "inf"), []),
    (("--pool", "a,b"), ["--pool"]),
    (("--pool", "2,2,2"), ["--pool"]),
    (("--pool", "0,2"), []),
    (("--pool", "2,0"), []),
    (("--pool", "-2,2"), []),
]


@pytest.mark.parametrize("args, words", BAD_OPTIONS, ids=[" ".join(args) for args, _ in BAD_OPTIONS])
def test_train_usage_errors_are_one_line_and_write_nothing(images, tmp_path, args, words):
    path = tmp_path / "m.safetensors"
    result = run("sparse", "train", "--images", images, *TINY, *args, "--out", path)
    one_line_error(result, *words)
    assert sorted(tmp_path.iterdir()) == []


def test_train_shows_the_cost_and_its_two_terms_in_its_progress_bar(images, tmp_path, monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=True, width=200, color_system=None))
    result = run("sparse", "train", "--images", images, *TINY, "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 0
    frames = screen.getvalue().split("\r")
    shown = [re.search(r"layer (\d) epoch (\d)/1 .* (\d)/2 cost ([\d.]+) = fit ([\d.]+) \+ \|z\| ([\d.]+)", frame)
             for frame in frames]
    shown = [match.groups() for match in shown if match]
    assert shown and shown[-1][:3] == ("2", "1", "2")  # the last frame: layer 2's last batch
    for *_, cost, fit, penalty in shown:
        assert float(cost) == pytest.approx(float(fit) + float(penalty), abs=0.011)


def test_train_refuses_to_overwrite_a_file_that_is_not_a_model(images, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"my thesis, not a model")
    one_line_error(run("sparse", "train", "--images", images, *TINY, "--out", path), str(path))
    assert path.read_bytes() == b"my thesis, not a model"
    assert run("sparse", "train", "--images", images, *TINY, "--restart", "--out", path).exit_code == 0
    assert card_of(path)["training"]["layers_done"] == 2


# --- infer and filters ---------------------------------------------------------------------------------------------


def test_infer_writes_each_images_files_and_prints_their_psnr(model, tmp_path):
    inputs = crops(tmp_path / "in", SAMPLES[10:12])
    out = tmp_path / "out"
    result = run("sparse", "infer", inputs, "--model", model, "--steps", "5", "--out", out)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for source in SAMPLES[10:12]:
        folder = out / "sparse" / source.stem
        with np.load(folder / "sparse.npz") as npz:
            psnr, sparsity = npz["psnr"], npz["sparsity"]
            assert npz["codes_1"].shape == (4, 14, 14) and npz["codes_2"].shape == (6, 9, 9)
        layers = ", ".join(f"layer {l + 1} {p:.1f} dB, {z:.0%} zero" for l, (p, z) in enumerate(zip(psnr, sparsity)))
        assert f"{inputs / (source.stem + '.png')}: {layers} → {folder / 'sparse.png'}" in lines
        with Image.open(folder / "sparse.png") as figure:
            figure.verify()
    assert result.stderr.strip().splitlines()[-1] == f"2 images coded, 0 failed; browse {out / 'index.html'}"
    index = json.loads((out / "sparse" / "index.json").read_text())
    assert index["kind"] == "sparse" and index["failed"] == []
    assert [f["png"] for f in index["figures"]] == [f"{s.stem}/sparse.png" for s in SAMPLES[10:12]]


def test_infer_with_gaussian_pooling_and_ista(model, tmp_path):
    result = run("sparse", "infer", TWO[0], "--model", model, "--steps", "5", "--pooling", "gaussian",
                 "--method", "ista", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    with np.load(tmp_path / "sparse" / TWO[0].stem / "sparse.npz") as npz:
        assert str(npz["pooling"]) == "gaussian" and np.isfinite(npz["cost"]).all()


def test_infer_on_the_embedded_model_works_on_the_shipped_samples(tmp_path):
    result = run("sparse", "infer", *TWO, "--steps", "5", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    for image in TWO:
        with np.load(tmp_path / "sparse" / image.stem / "sparse.npz") as npz:
            # 28×28 images, 16 and 48 maps of 7×7 filters, 3D pooling over 2 maps × 2×2
            assert npz["codes_1"].shape == (16, 34, 34) and npz["codes_2"].shape == (48, 23, 23)
            assert npz["reconstruction_1"].shape == npz["reconstruction_2"].shape == npz["image"].shape == (1, 28, 28)
            assert np.isfinite(npz["cost"]).all() and np.isfinite(npz["psnr"]).all() and len(npz["psnr"]) == 2
            assert (npz["fit"] > 0).all() and (npz["penalty"] > 0).all()
            for layer in (1, 2):  # the 6 strongest maps of each layer
                assert npz[f"projection_{layer}"].shape == (6, 1, 28, 28) and npz[f"projected_{layer}"].shape == (6, 3)


def test_infer_on_the_whole_shipped_folder(tmp_path):
    result = run("sparse", "infer", SHIPPED, "--steps", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.parent.name for p in (tmp_path / "sparse").glob("*/sparse.npz")) == [p.stem for p in SAMPLES]


def test_a_colour_photo_fails_on_the_grey_model_and_the_others_are_coded(tmp_path):
    photo = PHOTOS / "astronaut.jpg"
    result = run("sparse", "infer", TWO[0], photo, "--steps", "5", "--out", tmp_path)
    assert result.exit_code == 1
    failed = [line for line in result.stderr.splitlines() if "failed:" in line]
    assert len(failed) == 1 and str(photo) in failed[0] and "channel" in failed[0], result.stderr
    assert "1 images coded, 1 failed" in result.stderr
    assert (tmp_path / "sparse" / TWO[0].stem / "sparse.npz").is_file()
    assert not (tmp_path / "sparse" / photo.stem).exists()
    index = json.loads((tmp_path / "sparse" / "index.json").read_text())
    assert [f["image"] for f in index["failed"]] == [str(photo)]


def test_a_grey_file_fails_on_a_colour_model(tmp_path):
    colour = crops(tmp_path / "colour", [PHOTOS / "coffee.jpg", PHOTOS / "chelsea-cat.jpg"],
                   box=(150, 100, 162, 112), mode="RGB")
    path = tmp_path / "colour.safetensors"
    trained = run("sparse", "train", "--images", colour, "--layers", "1", "--maps", "3", "--kernel", "3",
                  "--epochs", "1", "--steps", "3", "--out", path)
    assert trained.exit_code == 0, trained.stderr
    grey = crops(tmp_path / "grey", SAMPLES[:1])
    out = tmp_path / "out"
    result = run("sparse", "infer", colour, grey, "--model", path, "--steps", "3", "--out", out)
    assert result.exit_code == 1
    failed = [line for line in result.stderr.splitlines() if "failed:" in line]
    assert len(failed) == 1 and f"{SAMPLES[0].stem}.png" in failed[0] and "channel" in failed[0], result.stderr
    with np.load(out / "sparse" / "coffee" / "sparse.npz") as npz:
        assert npz["image"].shape == (3, 12, 12) and npz["reconstruction_1"].shape == (3, 12, 12)


def test_filters_writes_the_sheet(model, tmp_path):
    result = run("sparse", "filters", "--model", model, "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    sheet = tmp_path / "sparse" / "filters.png"
    assert result.stdout.strip() == f"layer 1: 4 filters, layer 2: 6 filters → {sheet}"
    with Image.open(sheet) as figure:
        figure.verify()
    embedded = run("sparse", "filters", "--out", tmp_path / "embedded")
    assert embedded.exit_code == 0 and embedded.stdout.startswith("layer 1: 16 filters, layer 2: 48 filters → ")


def test_the_report_shows_the_codes_and_the_filters(model, tmp_path):
    out = tmp_path / "out"
    assert run("sparse", "infer", TWO[0], "--model", model, "--steps", "3", "--out", out).exit_code == 0
    assert run("sparse", "filters", "--model", model, "--out", out).exit_code == 0
    assert run("sparse", "infer", TWO[1], "--model", model, "--steps", "3", "--out", out).exit_code == 0
    page = (out / "index.html").read_text()
    assert 'data-kind="sparse"' in page
    for png in (f"sparse/{TWO[0].stem}/sparse.png", f"sparse/{TWO[1].stem}/sparse.png", "sparse/filters.png"):
        assert f'src="{png}"' in page, png
        assert (out / png).is_file()
    index = json.loads((out / "sparse" / "index.json").read_text())
    assert index["kind"] == "sparse"
    assert sorted(f["png"] for f in index["figures"]) == sorted(
        ["filters.png", f"{TWO[0].stem}/sparse.png", f"{TWO[1].stem}/sparse.png"])
    assert run("report", out).exit_code == 0 and (out / "index.html").read_text().count('src="sparse/') == 3


# --- broken model files ----------------------------------------------------------------------------------------------


def broken_model(kind: str, model: Path, folder: Path) -> Path:
    path = folder / f"{kind}.safetensors"
    data = model.read_bytes()
    if kind == "garbage":
        path.write_bytes(b"\x00\x17 this is not a safetensors file at all" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated-header":
        path.write_bytes(data[:40])
    elif kind == "truncated-data":
        path.write_bytes(data[:-16])
    elif kind == "no-metadata":
        save_file({"filters.1": torch.randn(4, 1, 3, 3)}, str(path))
    elif kind == "other-metadata":
        save_file({"filters.1": torch.randn(4, 1, 3, 3)}, str(path), metadata={"format": "pt"})
    elif kind == "bad-json":
        save_file({"filters.1": torch.randn(4, 1, 3, 3)}, str(path), metadata={METADATA_KEY: "{not json"})
    elif kind == "no-filters":
        save_file({"weights": torch.randn(4, 1, 3, 3)}, str(path), metadata={METADATA_KEY: json.dumps(
            {"lams": [5.0], "pool": {"maps": 2, "size": 2}, "nonnegative": False})})
    elif kind == "mismatched-layers":  # layer 2 takes 3 pooled maps, layer 1 has 4 maps pooled by 2
        save_file({"filters.1": torch.randn(4, 1, 3, 3), "filters.2": torch.randn(6, 3, 3, 3)}, str(path),
                  metadata={METADATA_KEY: json.dumps({"lams": [5.0, 5.0], "pool": {"maps": 2, "size": 2},
                                                      "nonnegative": False})})
    elif kind == "directory":
        path.mkdir()
    else:
        assert kind == "missing"
    return path


KINDS = ["garbage", "empty", "truncated-header", "truncated-data", "no-metadata", "other-metadata", "bad-json",
         "no-filters", "mismatched-layers", "directory", "missing"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["infer", "filters"])
def test_a_broken_model_file_is_a_one_line_error_and_nothing_is_written(model, tmp_path, kind, command):
    path = broken_model(kind, model, tmp_path)
    out = tmp_path / "out"
    (out / "sparse" / "earlier").mkdir(parents=True)
    (out / "sparse" / "earlier" / "sparse.png").write_bytes(b"an earlier figure")
    (out / "index.html").write_text("an earlier page")
    before = snapshot(out)
    args = [TWO[0], "--steps", "3"] if command == "infer" else []
    result = run("sparse", command, *args, "--model", path, "--out", out)
    one_line_error(result, str(path))
    assert result.stdout == ""
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["infer", "filters"])
def test_a_broken_model_file_does_not_create_out(tmp_path, command):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"garbage")
    args = [TWO[0]] if command == "infer" else []
    one_line_error(run("sparse", command, *args, "--model", path, "--out", tmp_path / "out"), str(path))
    assert not (tmp_path / "out").exists()


def test_infer_usage_errors(model, tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(run("sparse", "infer", tmp_path / "empty", "--model", model, "--out", tmp_path / "out"),
                   "no image files")
    result = run("sparse", "infer", TWO[0], "--model", model, "--method", "newton", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--method" in result.stderr
    assert not (tmp_path / "out").exists()


def test_train_one_layer_takes_the_first_default_map_count(images, tmp_path):
    path = tmp_path / "one.safetensors"
    result = run("sparse", "train", "--images", images, "--layers", "1", "--kernel", "3", "--epochs", "1",
                 "--steps", "5", "--out", path)
    assert result.exit_code == 0, result.stderr
    filters, _ = load_model(path)
    assert [tuple(f.shape) for f in filters.filters] == [(16, 1, 3, 3)]


def test_filters_keep_the_failures_that_infer_listed(model, tmp_path):
    """``sparse filters`` after ``sparse infer`` in the same OUT: the report still lists infer's failed file."""
    colour = crops(tmp_path / "colour", SAMPLES[:1], mode="RGB")
    out = tmp_path / "out"
    assert run("sparse", "infer", colour, SAMPLES[1], "--model", model, "--steps", "3", "--out", out).exit_code == 1
    assert run("sparse", "filters", "--model", model, "--out", out).exit_code == 0
    index = json.loads((out / "sparse" / "index.json").read_text())
    assert [Path(f["image"]).name for f in index["failed"]] == [f"{SAMPLES[0].stem}.png"]
    assert "filters.png" in {f["png"] for f in index["figures"]}


def test_a_float64_model_file_is_read_as_float32(model, tmp_path):
    """Filters saved in float64 (a user's own file) infer like the float32 original."""
    with safe_open(str(model), framework="pt") as file:
        tensors = {name: file.get_tensor(name).double() for name in file.keys()}
        metadata = file.metadata()
    double = tmp_path / "double.safetensors"
    save_file(tensors, str(double), metadata)
    for path, out in ((model, tmp_path / "a"), (double, tmp_path / "b")):
        assert run("sparse", "infer", SAMPLES[1], "--model", path, "--steps", "3", "--out", out).exit_code == 0
    stem = SAMPLES[1].stem
    first, second = (np.load(tmp_path / o / "sparse" / stem / "sparse.npz") for o in "ab")
    assert np.allclose(first["codes_1"], second["codes_1"], atol=1e-5)
