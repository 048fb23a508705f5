"""The deconvolutional network jobs (``vizdeconv.jobs.sparse``) against independent expectations: each
``sparse.npz`` recomputed with numpy and by-hand top-down paths, resumed training against an uninterrupted
run, the training state in the model file, and training that lowers the cost on held-out images.

Tiny models on crops of the shipped Fashion-MNIST samples keep each test around a second (one torch
thread: on a busy two-core machine tiny convolutions are many times slower with two)."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import FASHION
from PIL import Image
from safetensors import safe_open

import vizdeconv.jobs.sparse as sparse_jobs
import vizdeconv.outputs
import vizdeconv.sparse as sparse
from vizdeconv.jobs.sparse import SparseInferJob, SparseTrainJob, TrainProgress
from vizdeconv.resume import SettingsChanged
from vizdeconv.sparse import Pool, SparseModel, cost_terms, infer_layers, reconstruct
from vizdeconv.sparse_files import METADATA_KEY, load_model

SAMPLES = sorted(FASHION.glob("*.png"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny convolutions: see conftest


def crops(folder: Path, sources, box) -> Path:
    """``folder`` holding grey PNG crops (``box`` = left, top, right, bottom) of the given samples."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        with Image.open(source) as image:
            image.convert("L").crop(box).save(folder / f"{source.stem}.png")
    return folder


def read_file(path: Path) -> tuple[list[torch.Tensor], dict]:
    """The filters and the metadata card of a model file, read with safetensors alone."""
    with safe_open(str(path), framework="pt") as file:
        card = json.loads(file.metadata()[METADATA_KEY])
        names = sorted(file.keys())
        return [file.get_tensor(name) for name in names], {"names": names, **card}


def grey(path: Path) -> np.ndarray:
    """A grey file's pixels in 0..1, ``(H, W)``, float64."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64) / 255


# --- the npz files against numpy and a top-down path built by hand -----------------------------------------

KERNEL = 4  # codes of a 14×14 crop are 17×17: the 2×2 pooling regions run over the far edges


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    images = crops(root / "train", SAMPLES[:6], (7, 7, 21, 21))
    path = root / "tiny.safetensors"
    SparseTrainJob(path, maps=(4, 6), kernel=KERNEL, lams=(5.0, 3.0), epochs=1, steps=10, batch_size=4,
                   device="cpu").run([images])
    return path


def switches_by_loop(codes: np.ndarray, maps: int, size: int) -> np.ndarray:
    """Per 3D pooling region (``maps`` neighbouring maps × ``size`` × ``size``) of ``(K, H, W)`` codes, the
    (map, y, x) of its largest |z|: the first in the order map, row, column when several tie (all-zero regions:
    the region's first cell). Regions at the far edges hold what is left of the maps."""
    count, height, width = codes.shape
    rows, columns = -(-height // size), -(-width // size)
    places = np.zeros((count // maps, rows, columns, 3), dtype=int)
    for group in range(count // maps):
        for i in range(rows):
            for j in range(columns):
                best = None
                for m in range(group * maps, group * maps + maps):
                    for y in range(i * size, min(i * size + size, height)):
                        for x in range(j * size, min(j * size + size, width)):
                            if best is None or abs(codes[m, y, x]) > best[0]:
                                best = (abs(codes[m, y, x]), m, y, x)
                places[group, i, j] = best[1:]
    return places


def unpool_by_loop(pooled: np.ndarray, places: np.ndarray, shape) -> np.ndarray:
    """Each pooled value at its region's switch, zero elsewhere."""
    maps = np.zeros(shape)
    for group in range(places.shape[0]):
        for i in range(places.shape[1]):
            for j in range(places.shape[2]):
                maps[tuple(places[group, i, j])] = pooled[group, i, j]
    return maps


def conv_transpose(codes: np.ndarray, filters: torch.Tensor) -> np.ndarray:
    """``(K, h, w)`` codes through ``(K, C, s, s)`` filters: the valid part of the full transposed convolution."""
    s = filters.shape[-1]
    return F.conv_transpose2d(torch.from_numpy(codes).double()[None], filters.double(), padding=s - 1)[0].numpy()


def top_down_2(codes_2: np.ndarray, codes_1: np.ndarray, filters: list[torch.Tensor], pool: Pool) -> np.ndarray:
    """Layer 2's codes down to the image: its filters, unpooling through the switches of layer 1's codes, layer 1's
    filters."""
    pooled = conv_transpose(codes_2, filters[1])
    places = switches_by_loop(codes_1, pool.maps, pool.size)
    assert pooled.shape == places.shape[:3]
    return conv_transpose(unpool_by_loop(pooled, places, codes_1.shape), filters[0])


def test_npz_holds_codes_reconstructions_and_costs_that_agree_with_numpy(tiny_model, tmp_path):
    # a square crop and an odd, non-square one (another batch): pooling regions cut at both far edges
    square = crops(tmp_path / "in", SAMPLES[10:12], (7, 7, 21, 21))
    odd = crops(tmp_path / "odd", SAMPLES[12:13], (6, 5, 19, 21))  # 16 × 13
    done = SparseInferJob(tiny_model, steps=10, out=tmp_path / "out", device="cpu").run([square, odd])
    assert not done.failures and len(done.results) == 3
    filters, card = read_file(tiny_model)
    assert card["names"] == ["filters.1", "filters.2"]
    lams, pool = card["lams"], Pool(card["pool"]["maps"], card["pool"]["size"])
    for result in done.results:
        y = grey(result.image)
        folder = tmp_path / "out" / "sparse" / result.image.stem
        assert result.data == folder / "sparse.npz" and result.figure == folder / "sparse.png"
        with Image.open(result.figure) as figure:
            figure.verify()
        with np.load(result.data) as npz:
            arrays = {key: npz[key] for key in npz.files}
        assert {"codes_1", "codes_2", "reconstruction_1", "reconstruction_2", "cost", "fit", "penalty", "sparsity",
                "psnr", "lam", "image", "projection_1", "projected_1", "projection_2", "projected_2"} <= set(arrays)
        np.testing.assert_array_equal(arrays["image"], y[None].astype(np.float32))
        np.testing.assert_array_equal(arrays["lam"], lams)
        z1, z2 = arrays["codes_1"].astype(np.float64), arrays["codes_2"].astype(np.float64)
        h, w = y.shape
        assert z1.shape == (4, h + KERNEL - 1, w + KERNEL - 1)
        assert z2.shape == (6, -(-(h + KERNEL - 1) // 2) + KERNEL - 1, -(-(w + KERNEL - 1) // 2) + KERNEL - 1)

        expected = [reconstruct(filters[0], torch.from_numpy(arrays["codes_1"])[None])[0].numpy(),
                    top_down_2(z2, z1, filters, pool)]
        for layer, (z, r) in enumerate(((z1, expected[0]), (z2, expected[1]))):
            got = arrays[f"reconstruction_{layer + 1}"]
            assert got.shape == (1, h, w)
            np.testing.assert_allclose(got, r, rtol=1e-4, atol=1e-5)  # float32 convolutions
            r = got.astype(np.float64)[0]  # the terms of the file's own reconstruction
            fit, penalty = lams[layer] / 2 * np.square(r - y).sum(), np.abs(z).sum()
            assert arrays["fit"][layer] == pytest.approx(fit, rel=1e-5, abs=1e-6)
            assert arrays["penalty"][layer] == pytest.approx(penalty, rel=1e-5)
            assert arrays["cost"][layer] == pytest.approx(fit + penalty, rel=1e-5)
            assert arrays["sparsity"][layer] == pytest.approx(np.mean(z == 0), abs=1e-7)  # a float32 mean
            assert arrays["psnr"][layer] == pytest.approx(10 * math.log10(1 / np.square(r - y).mean()), abs=1e-4)
        assert 0 < arrays["sparsity"][0] < 1  # the check above means something
        assert result.cost == pytest.approx(list(arrays["cost"])) and result.psnr == pytest.approx(list(arrays["psnr"]))
        assert result.sparsity == list(arrays["sparsity"])

        # the projections: each shown map's strongest activation alone down to pixels
        for layer, z in enumerate((z1, z2)):
            places, projections = arrays[f"projected_{layer + 1}"], arrays[f"projection_{layer + 1}"]
            shown = list(places[:, 0])
            assert 1 <= len(shown) == len(set(shown)) <= len(z) and projections.shape == (len(shown), 1, h, w)
            strength = np.abs(z).sum((1, 2))
            assert list(strength[shown]) == sorted(strength[shown], reverse=True)
            assert strength[shown].min() >= max(np.delete(strength, shown), default=0)
            for (k, row, column), projection in zip(places, projections):
                assert abs(z[k, row, column]) == np.abs(z[k]).max() > 0
                spike = np.zeros_like(z)
                spike[k, row, column] = z[k, row, column]
                down = (conv_transpose(spike, filters[0]) if layer == 0 else
                        conv_transpose(unpool_by_loop(conv_transpose(spike, filters[1]),
                                                      switches_by_loop(z1, pool.maps, pool.size), z1.shape),
                                       filters[0]))
                np.testing.assert_allclose(projection, down, rtol=1e-4, atol=1e-5)


def test_the_switch_loop_agrees_with_a_handmade_case():
    """The oracle itself: a 2-map group of 3×3 codes in 2×2 regions, edges included."""
    codes = np.zeros((2, 3, 3))
    codes[1, 0, 1] = -5.0  # beats the 4 of map 0 in the first region, sign kept apart
    codes[0, 1, 0] = 4.0
    codes[0, 2, 2] = 1.0   # the far corner region holds one cell per map
    codes[1, 2, 2] = -1.0  # a tie: the first map wins
    places = switches_by_loop(codes, 2, 2)
    assert places.shape == (1, 2, 2, 3)
    assert places[0, 0, 0].tolist() == [1, 0, 1]
    assert places[0, 0, 1].tolist() == [0, 0, 2]  # all zero: the region's first cell
    assert places[0, 1, 1].tolist() == [0, 2, 2]
    maps = unpool_by_loop(np.array([[[1.0, 2.0], [3.0, 4.0]]]), places, codes.shape)
    assert maps[1, 0, 1] == 1 and maps[0, 0, 2] == 2 and maps[0, 2, 0] == 3 and maps[0, 2, 2] == 4
    assert np.count_nonzero(maps) == 4


# --- resuming a training run ------------------------------------------------------------------------------

SETTINGS = dict(maps=(2, 4), kernel=3, lams=(5.0, 5.0), epochs=2, steps=5, batch_size=4, device="cpu")


class Interrupted(KeyboardInterrupt):
    """What Ctrl-C raises, from a progress callback."""


def stop_at(layer: int, epoch: int, events: list, snapshots: dict | None = None, path: Path | None = None):
    """A progress callback that records every step and raises at the start of ``epoch`` of ``layer`` (the
    previous epoch's file is on disk by then; its bytes go into ``snapshots``)."""

    def progress(step: TrainProgress) -> None:
        events.append(step)
        if snapshots is not None and step.batch == 0 and path.exists():
            snapshots[(step.layer, step.epoch)] = path.read_bytes()
        if (step.layer, step.epoch, step.batch) == (layer, epoch, 0):
            raise Interrupted

    return progress


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """Six 12×12 crops (two batches per epoch) and an uninterrupted run on them, with its progress."""
    root = tmp_path_factory.mktemp("training")
    images = crops(root / "images", SAMPLES[:6], (8, 8, 20, 20))
    events: list[TrainProgress] = []
    done = SparseTrainJob(root / "whole.safetensors", **SETTINGS).run([images], progress=events.append)
    return images, done, events


@pytest.mark.parametrize("layer, epoch, state, names", [
    (1, 2, {"layers_done": 0, "epochs_done": 1}, ["filters.1"]),
    (2, 1, {"layers_done": 1, "epochs_done": 0}, ["filters.1"]),
    (2, 2, {"layers_done": 1, "epochs_done": 1}, ["filters.1", "filters.2"]),
])
def test_an_interrupted_run_goes_on_to_the_same_model(training, tmp_path, layer, epoch, state, names):
    images, whole, _ = training
    path = tmp_path / "model.safetensors"
    events: list[TrainProgress] = []
    with pytest.raises(Interrupted):
        SparseTrainJob(path, **SETTINGS).run([images], progress=stop_at(layer, epoch, events))
    _, card = read_file(path)
    assert card["names"] == names
    assert {key: card["training"][key] for key in state} == state
    assert len(card["training"]["costs"]) == len(names)  # one per layer with an epoch done
    model, _ = load_model(path)  # what is there is a usable model
    assert len(model.filters) == len(names)

    rest: list[TrainProgress] = []
    done = SparseTrainJob(path, **SETTINGS).run([images], progress=rest.append)
    assert done.resumed_from == (state["layers_done"] + 1, state["epochs_done"])
    assert (rest[0].layer, rest[0].epoch, rest[0].batch) == (layer, epoch, 0)
    assert [(s.layer, s.epoch, s.batch) for s in events[:-1] + rest] == [
        (s.layer, s.epoch, s.batch) for s in training[2]]  # no epoch skipped or done twice
    filters, card = read_file(path)
    expected, expected_card = read_file(whole.model)
    assert card["names"] == expected_card["names"] == ["filters.1", "filters.2"]
    for got, want in zip(filters, expected):
        assert torch.equal(got, want)
    assert card == expected_card
    assert done.costs == whole.costs


def test_the_training_state_in_the_file(training):
    images, whole, _ = training
    _, card = read_file(whole.model)
    state = card["training"]
    assert (state["layers_done"], state["epochs_done"]) == (2, 0)
    settings = state["settings"]
    assert settings["maps"] == [2, 4] and settings["kernel"] == 3 and settings["lams"] == [5.0, 5.0]
    assert settings["epochs"] == 2 and settings["steps"] == 5 and settings["batch_size"] == 4
    assert settings["pool"] == [2, 2] and settings["seed"] == 0 and settings["image_size"] == [1, 12, 12]
    assert settings["files"].startswith("6 files")
    assert card["lams"] == [5.0, 5.0] and card["pool"] == {"maps": 2, "size": 2} and card["image_size"] == [1, 12, 12]
    assert [set(c) for c in state["costs"]] == [{"cost", "fit", "penalty"}] * 2
    assert whole.costs == state["costs"] and whole.images == 6 and whole.resumed_from is None
    model, _ = load_model(whole.model)
    assert [tuple(f.shape) for f in model.filters] == [(2, 1, 3, 3), (4, 1, 3, 3)]
    for filters in model.filters:  # renormalised after every update
        np.testing.assert_allclose(filters.flatten(1).norm(dim=1), 1, rtol=1e-5)


def test_a_finished_run_is_not_trained_again(training, tmp_path):
    images, whole, _ = training
    path = shutil.copy(whole.model, tmp_path / "model.safetensors")
    before = Path(path).read_bytes()
    events: list[TrainProgress] = []
    done = SparseTrainJob(path, **SETTINGS).run([images], progress=events.append)
    assert events == [] and Path(path).read_bytes() == before and done.costs == whole.costs


@pytest.mark.parametrize("change", [
    {"lams": (5.0, 4.0)}, {"epochs": 3}, {"seed": 1}, {"steps": 6}, {"batch_size": 3}, {"maps": (2, 6)},
    {"pool": Pool(2, 3)}, {"nonnegative": True}, {"kernel": 5}, {"images": 5},
], ids=lambda change: "-".join(change))
def test_other_settings_are_refused_and_restart_discards_the_run(training, tmp_path, change):
    images, whole, _ = training
    path = Path(shutil.copy(whole.model, tmp_path / "model.safetensors"))
    before = path.read_bytes()
    change = dict(change)
    if "images" in change:  # one image fewer: another list of files
        images = crops(tmp_path / "fewer", SAMPLES[:change.pop("images")], (8, 8, 20, 20))
    settings = {**SETTINGS, **change}
    with pytest.raises(SettingsChanged) as error:
        SparseTrainJob(path, **settings).run([images])
    assert "--restart" in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
    assert path.read_bytes() == before

    done = SparseTrainJob(path, **settings, restart=True).run([images])
    fresh = SparseTrainJob(tmp_path / "fresh.safetensors", **settings).run([images])
    assert done.resumed_from is None
    filters, card = read_file(path)
    expected, expected_card = read_file(fresh.model)
    assert all(torch.equal(a, b) for a, b in zip(filters, expected)) and len(filters) == len(expected) == 2
    assert card == expected_card


def test_the_file_is_never_torn(training, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing the second epoch's file leaves the first epoch's, whole; the rerun goes on."""
    images, whole, _ = training
    path = tmp_path / "model.safetensors"
    write_atomic, saves, snapshots = vizdeconv.outputs.write_atomic, [], {}

    def torn_second_write(target, write):
        saves.append(target)
        if len(saves) < 2:
            return write_atomic(target, write)

        def half(file):
            buffer = io.BytesIO()
            write(buffer)
            file.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            raise Interrupted

        return write_atomic(target, half)

    monkeypatch.setattr(vizdeconv.outputs, "write_atomic", torn_second_write)
    events: list[TrainProgress] = []
    with pytest.raises(Interrupted):
        SparseTrainJob(path, **SETTINGS).run([images], progress=stop_at(9, 9, events, snapshots, path))
    assert saves == [path, path] and list(snapshots) == [(1, 2)]
    assert path.read_bytes() == snapshots[(1, 2)]  # the first epoch's file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left
    _, card = read_file(path)
    assert (card["training"]["layers_done"], card["training"]["epochs_done"]) == (0, 1)
    load_model(path)
    monkeypatch.undo()
    SparseTrainJob(path, **SETTINGS).run([images])
    filters, _ = read_file(path)
    assert all(torch.equal(a, b) for a, b in zip(filters, read_file(whole.model)[0]))


def test_every_epochs_file_is_loadable(training, tmp_path):
    """The file as it is at the start of each epoch (what an interruption would leave) loads, with its state."""
    images, _, _ = training
    path, snapshots, events = tmp_path / "model.safetensors", {}, []
    SparseTrainJob(path, **SETTINGS).run([images], progress=stop_at(9, 9, events, snapshots, path))
    assert list(snapshots) == [(1, 2), (2, 1), (2, 2)]
    for (layer, epoch), data in snapshots.items():
        copy = tmp_path / f"at-{layer}-{epoch}.safetensors"
        copy.write_bytes(data)
        model, card = load_model(copy)
        assert card["training"]["layers_done"] == layer - 1 and card["training"]["epochs_done"] == epoch - 1
        assert len(model.filters) == (1 if (layer, epoch) != (2, 2) else 2)


# --- progress ------------------------------------------------------------------------------------------------


def test_progress_reports_every_batch_of_every_epoch_and_layer_in_order(training):
    images, whole, events = training
    n, batches = 6, 2  # six images in batches of four
    assert [(s.layer, s.epoch, s.batch) for s in events] == [
        (layer, epoch, batch) for layer in (1, 2) for epoch in (1, 2) for batch in range(batches + 1)]
    assert all(s.epochs == 2 and s.batches == batches for s in events)
    for step in events:
        if step.batch == 0:
            assert step.cost is None
            continue
        assert step.cost.fit > 0 and step.cost.penalty > 0
        assert step.cost.cost == pytest.approx(step.cost.fit + step.cost.penalty, rel=1e-12)
    for layer in (1, 2):
        for epoch in (1, 2):
            costs = [s.cost for s in events if (s.layer, s.epoch) == (layer, epoch) and s.cost]
            assert [c.images for c in costs] == [4, 2] and sum(c.images for c in costs) == n
        last = [s.cost for s in events if (s.layer, s.epoch) == (layer, 2) and s.cost]
        mean = {key: sum(getattr(c, key) * c.images for c in last) / n for key in ("cost", "fit", "penalty")}
        assert whole.costs[layer - 1] == pytest.approx(mean, rel=1e-9)


def test_the_first_batch_cost_is_the_cost_of_the_initial_filters(tmp_path, monkeypatch):
    """One image per batch: the first batch's reported cost and terms are those of one training image, recomputed
    from codes inferred with the initial filters (which the test catches as the job makes them)."""
    images = crops(tmp_path / "images", SAMPLES[:3], (8, 8, 20, 20))
    made = []
    patch_filters = sparse_jobs.patch_filters

    def catch(*args, **kwargs):
        made.append(patch_filters(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sparse_jobs, "patch_filters", catch)
    events: list[TrainProgress] = []
    SparseTrainJob(tmp_path / "model.safetensors", maps=(3,), kernel=3, lams=(4.0,), epochs=1, steps=7, batch_size=1,
                   device="cpu").run([images], progress=events.append)
    first = events[1].cost
    assert (events[1].layer, events[1].epoch, events[1].batch, first.images) == (1, 1, 1, 1)
    model = SparseModel([made[0].clone()], [4.0], Pool())
    candidates = []
    for path in sorted(images.iterdir()):
        y = grey(path)
        codes = infer_layers(model, torch.from_numpy(y).float()[None, None], steps=7).codes[0]
        r = reconstruct(made[0], codes)[0, 0].double().numpy()
        candidates.append((4.0 / 2 * np.square(r - y).sum(), codes.abs().sum().item()))
    assert any(first.fit == pytest.approx(fit, rel=1e-5) and first.penalty == pytest.approx(penalty, rel=1e-5)
               for fit, penalty in candidates), (first, candidates)


# --- learning lowers the cost ----------------------------------------------------------------------------------


def test_training_lowers_the_cost_of_held_out_images(tmp_path, monkeypatch):
    """Twelve samples to learn from, eight held out: at the same λ and steps, the held-out images cost less with the
    trained filters than with the patch-initialised ones they started from, at layer 1 and (with layer 1 trained)
    at layer 2. Measured over seeds 0–19 with these settings: at least 2.8 % less at layer 1, 1.3 % at layer 2."""
    learn = tmp_path / "learn"
    learn.mkdir()
    for source in SAMPLES[:12]:
        shutil.copy(source, learn / source.name)
    held = torch.stack([torch.from_numpy(grey(p)).float()[None] for p in SAMPLES[12:]])
    made = []
    patch_filters = sparse_jobs.patch_filters

    def catch(*args, **kwargs):
        made.append(patch_filters(*args, **kwargs).clone())
        return made[-1].clone()

    monkeypatch.setattr(sparse_jobs, "patch_filters", catch)
    lam, steps = 20.0, 20
    done = SparseTrainJob(tmp_path / "model.safetensors", maps=(4, 8), kernel=5, lams=(lam, lam), epochs=1,
                          steps=steps, batch_size=4, device="cpu").run([learn])
    trained, _ = load_model(done.model)
    assert len(made) == 2

    def held_cost(filters) -> float:
        model = SparseModel([f.clone() for f in filters], [lam] * len(filters), Pool())
        inference = infer_layers(model, held, steps=steps)
        codes = inference.codes[-1]
        fit, penalty = cost_terms(inference.operators[-1](codes), held, codes, lam)
        return (fit + penalty).mean().item()

    before_1, after_1 = held_cost([made[0]]), held_cost(trained.filters[:1])
    before_2, after_2 = held_cost([trained.filters[0], made[1]]), held_cost(trained.filters)
    assert after_1 < 0.99 * before_1, (before_1, after_1)
    assert after_2 < 0.995 * before_2, (before_2, after_2)


@pytest.mark.parametrize("pooling", ["max", "gaussian"])
def test_an_images_codes_do_not_depend_on_its_batch(pooling):
    """Each image alone and in a batch of four: the same codes (up to float rounding of batched convolutions),
    so ``--batch-size`` never changes results."""
    model, _ = load_model(sparse_jobs.model_path("embedded"))
    images = torch.stack([torch.from_numpy(grey(path)).float()[None] for path in SAMPLES[:4]])
    together = infer_layers(model, images, steps=30, pooling=pooling).codes
    for index in range(len(images)):
        alone = infer_layers(model, images[index:index + 1], steps=30, pooling=pooling).codes
        for layer, codes in enumerate(alone):
            assert torch.allclose(codes[0], together[layer][index], rtol=1e-4, atol=1e-4), (index, layer)


@pytest.mark.parametrize("steps", [3, 7, 12])
def test_gaussian_pooling_takes_exactly_the_steps_asked_for(monkeypatch, steps):
    """One shrinkage per ISTA/FISTA step: ``steps`` at layer 1 and ``steps`` at layer 2, whatever the block size."""
    model, _ = load_model(sparse_jobs.model_path("embedded"))
    calls = []
    original = sparse.shrink
    monkeypatch.setattr(sparse, "shrink", lambda *a, **k: calls.append(1) or original(*a, **k))
    infer_layers(model, torch.rand(1, 1, 12, 12), steps=steps, pooling="gaussian")
    assert len(calls) == 2 * steps


def test_infer_builds_no_graph_through_trainable_filters():
    filters = torch.nn.Parameter(torch.randn(3, 1, 3, 3))
    codes = sparse.infer(torch.rand(2, 1, 8, 8), filters, lam=5.0, steps=3)
    assert not codes.requires_grad and codes.shape == (2, 3, 10, 10)
