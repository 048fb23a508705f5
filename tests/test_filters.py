"""Filter diagnostics (``vizdeconv.filters``, ``FiltersJob``, ``vizdeconv filters``) against a brute force.

The expectations here never use ``torch.fft`` or the library's masks: each filter's spectrum is the
explicit DTFT ``W(f) = Σ w[c, y, x]·exp(-2πi(f_y·y + f_x·x))`` on the ``fftfreq(side)`` grid, and the
bands, the DC bin and the stride's Nyquist limit are decided per bin with integer arithmetic
(``f = k / side``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from oracles import wrap
from PIL import Image
from torch import nn

from vizdeconv.cli import main
from vizdeconv.errors import LayerError
from vizdeconv.filters import diagnose
from vizdeconv.jobs.filters import FiltersJob

KERNEL, STRIDE = 7, 2
REL = 1e-9
ZERO, CHECKER, BLOB, GABOR, LOUD, TINY, SILENT = range(7)  # the hand-set filters, in order
NAMES = ["zero", "checker", "blob", "gabor", "loud", "tiny", "silent"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------------------------- the model


def handset_weights() -> np.ndarray:
    """``(7, 1, 7, 7)`` first-layer filters, each made for one diagnosis."""
    y, x = np.mgrid[0:KERNEL, 0:KERNEL].astype(np.float64)
    centre = (KERNEL - 1) / 2
    squared = (y - centre) ** 2 + (x - centre) ** 2
    filters = np.zeros((7, KERNEL, KERNEL))
    filters[CHECKER] = 0.05 * (-1.0) ** (y + x)  # the Nyquist frequency (1/2, 1/2)
    filters[BLOB] = 0.05 * np.exp(-squared / (2 * 2.0**2))
    filters[GABOR] = 0.05 * np.cos(2 * np.pi * 0.18 * (x - centre)) * np.exp(-squared / (2 * 2.0**2))
    noise = np.random.default_rng(3).standard_normal((KERNEL, KERNEL))
    filters[LOUD] = 0.3 * noise / np.sqrt(np.mean(noise**2))  # RMS 0.3
    filters[TINY] = 1e-6 * filters[BLOB]
    filters[SILENT] = 0.01  # positive everywhere, with a bias that keeps it below zero on any image
    return filters[:, None]


BIASES = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -100.0])


def handset() -> nn.Module:
    """A classifier whose stride-2 first conv has the hand-set filters (also ``--model test_filters:handset``)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 7, KERNEL, stride=STRIDE), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(7, 3))
    with torch.no_grad():
        module[0].weight.copy_(torch.from_numpy(handset_weights()))
        module[0].bias.copy_(torch.from_numpy(BIASES))
    return module


def two_layers() -> nn.Module:
    """``--model test_filters:two_layers``: layer 2 has 4 input channels; its filters 0 and 1 are hand-set."""
    torch.manual_seed(1)
    module = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    y, x = np.mgrid[0:3, 0:3]
    k = np.random.default_rng(5).standard_normal((3, 3)) * 0.2
    with torch.no_grad():
        module[2].weight[:2] = 0
        module[2].weight[0, 0], module[2].weight[0, 1] = torch.from_numpy(k), torch.from_numpy(-k)
        module[2].weight[1, 0] = torch.from_numpy(0.2 * np.exp(-((y - 1) ** 2 + (x - 1) ** 2) / 2.0))
        module[2].weight[1, 1] = torch.from_numpy(0.2 * (-1.0) ** (y + x))
    return module


def no_conv() -> nn.Module:
    """``--model test_filters:no_conv``: a classifier without any convolution."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))


def pool_only() -> nn.Module:
    """``--model test_filters:pool_only``: no convolution, but a module with a (C, H, W) output to name."""
    return nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(14 * 14, 3))


# ------------------------------------------------------------------------------------------ the brute force


def dtft_energy(weight: np.ndarray, side: int) -> np.ndarray:
    """``(side, side)`` energy ``Σ_c |W_c(f)|²`` of one ``(C, kh, kw)`` filter: the DTFT summed over its taps,
    one row of the grid (one ``f_y``) at a time; bin ``[i, j]`` is ``(fftfreq(side)[i], fftfreq(side)[j])``."""
    f = np.fft.fftfreq(side)
    _, height, width = weight.shape
    ys, xs = np.arange(height), np.arange(width)
    energy = np.zeros((side, side))
    for i, f_y in enumerate(f):
        # phase[j, y, x] = exp(-2πi (f_y·y + f_x[j]·x))
        phase = np.exp(-2j * np.pi * (f_y * ys[None, :, None] + f[:, None, None] * xs[None, None, :]))
        response = np.einsum("cyx,jyx->cj", weight, phase)  # (C, side): W_c(f_y, f_x)
        energy[i] = (np.abs(response) ** 2).sum(0)
    return energy


def bins(side: int):
    """Every non-DC bin ``(i, j, k_y, k_x)`` of the grid, with ``f = k / side`` (integers: no rounding at the edges)."""
    ks = [round(v * side) for v in np.fft.fftfreq(side)]
    for i, k_y in enumerate(ks):
        for j, k_x in enumerate(ks):
            if (k_y, k_x) != (0, 0):
                yield i, j, k_y, k_x


def band(k_y: int, k_x: int, side: int) -> str:
    """``r = √(k_y² + k_x²)/side`` against 1/8 and 1/4, compared squared in integers."""
    squared = (k_y**2 + k_x**2) * 64
    if squared < side**2:
        return "energy_low"
    return "energy_mid" if squared < 4 * side**2 else "energy_high"


def aliases(k_y: int, k_x: int, side: int, stride: tuple[int, int]) -> bool:
    """``|f_y| > 1/(2·s_y)`` or ``|f_x| > 1/(2·s_x)``, i.e. ``2·s·|k| > side``."""
    return 2 * stride[0] * abs(k_y) > side or 2 * stride[1] * abs(k_x) > side


def expected_sums(weight: np.ndarray, stride: tuple[int, int]) -> dict:
    """One ``(C, kh, kw)`` filter's non-DC energy per band, beyond Nyquist and in all, and its peak radii."""
    side = max(64, 4 * max(weight.shape[1:]))
    energy = dtft_energy(weight, side)
    sums = {"energy_low": 0.0, "energy_mid": 0.0, "energy_high": 0.0, "aliasing": 0.0, "total": 0.0}
    for i, j, k_y, k_x in bins(side):
        value = float(energy[i, j])
        sums["total"] += value
        sums[band(k_y, k_x, side)] += value
        if aliases(k_y, k_x, side, stride):
            sums["aliasing"] += value
    strongest = max(energy[i, j] for i, j, _, _ in bins(side))
    # ties (a symmetric spectrum has them) all count: any of their radii is the peak frequency
    sums["peak_radii"] = {math.hypot(k_y, k_x) / side for i, j, k_y, k_x in bins(side)
                          if strongest > 0 and energy[i, j] >= strongest * (1 - 1e-9)}
    return sums


def expected_filter(weight: np.ndarray, stride: tuple[int, int]) -> dict:
    """One filter's rms, norm, fractions, peak frequency and flags (``dead`` left to the caller: it needs the layer)."""
    taps = weight.ravel()
    sums = expected_sums(weight, stride)
    total = sums["total"]
    fractions = {name: (sums[name] / total if total > 0 else None)
                 for name in ("energy_low", "energy_mid", "energy_high", "aliasing")}
    return {"rms": math.sqrt(sum(v * v for v in taps) / len(taps)), "norm": math.sqrt(sum(v * v for v in taps)),
            **fractions, "peak_radii": sums["peak_radii"], "sums": sums,
            "aliased": fractions["aliasing"] is not None and fractions["aliasing"] > 0.5,
            "renormalise": math.sqrt(sum(v * v for v in taps) / len(taps)) > 0.1}


def expected_layer(weights: np.ndarray, stride: tuple[int, int]) -> tuple[list[dict], dict]:
    """Every filter's expectation, ``dead`` by norm against the median (odd filter counts only: one middle value),
    and the layer's energy-weighted band fractions."""
    assert len(weights) % 2 == 1
    per_filter = [expected_filter(w, stride) for w in weights]
    median = sorted(e["norm"] for e in per_filter)[len(per_filter) // 2]
    for e in per_filter:
        e["dead"] = e["norm"] <= 0.01 * median
        e["aliased"] = e["aliased"] and not e["dead"]  # a dead filter's spectrum is noise: never flagged
    total = sum(e["sums"]["total"] for e in per_filter)
    layer = {name: sum(e["sums"][name] for e in per_filter) / total
             for name in ("energy_low", "energy_mid", "energy_high", "aliasing")}
    layer["median_norm"] = median
    return per_filter, layer


def approx_or_none(expected):
    return None if expected is None else pytest.approx(expected, rel=REL, abs=1e-12)


def assert_matches(stats: dict, expected: dict) -> None:
    """One filter's JSON (``FilterStats.to_json``) against its brute-force expectation."""
    assert stats["rms"] == pytest.approx(expected["rms"], rel=1e-6)  # float32 weights
    assert stats["norm"] == pytest.approx(expected["norm"], rel=1e-6)
    for name in ("energy_low", "energy_mid", "energy_high", "aliasing"):
        assert stats[name] == approx_or_none(expected[name]), name
    if expected["peak_radii"]:
        assert any(stats["peak_frequency"] == pytest.approx(r, rel=REL) for r in expected["peak_radii"])
    else:
        assert stats["peak_frequency"] is None
    assert stats["aliased"] is expected["aliased"] and stats["renormalise"] is expected["renormalise"]


def conv_weights(model, name: str) -> np.ndarray:
    """A conv's weights as float64 (the float32 values the model holds)."""
    return model.module.get_submodule(name).weight.detach().double().numpy()


# ------------------------------------------------------------------------------------------------- tests


@pytest.fixture()
def model():
    return wrap(handset(), (1, 28, 28))


@pytest.fixture()
def images(tmp_path):
    """Three 28 x 28 grey PNGs: black, white and noise; each pixel value as ToTensor reads it."""
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = {"black": np.zeros((28, 28), np.uint8), "white": np.full((28, 28), 255, np.uint8),
              "noise": np.random.default_rng(7).integers(0, 256, (28, 28)).astype(np.uint8)}
    for name, array in pixels.items():
        Image.fromarray(array, mode="L").save(folder / f"{name}.png")
    return folder, np.stack([pixels[name] for name in sorted(pixels)]).astype(np.float32) / 255


def test_handset_filters_get_the_flags_and_bands_the_definitions_give(model, tmp_path):
    done = FiltersJob(model, 1, out=tmp_path / "out").run()
    weights = conv_weights(model, "0")
    expected, layer = expected_layer(weights, (STRIDE, STRIDE))
    assert done.module == "0" and done.stride == (STRIDE, STRIDE) and done.layer.number == 1
    assert [s.filter for s in done.filters] == list(range(7))
    for stats, wanted, name in zip(done.filters, expected, NAMES):
        stats = stats.to_json()
        assert stats["fires"] is None and stats["mean_activation"] is None, name
        assert stats["dead"] is wanted["dead"], name
        assert_matches(stats, wanted)
    # what the definitions imply for these filters
    stats = done.filters
    assert stats[ZERO].dead and stats[TINY].dead and not stats[SILENT].dead
    assert stats[ZERO].rms == stats[ZERO].norm == 0 and not stats[ZERO].aliased and not stats[ZERO].renormalise
    assert (stats[ZERO].energy_low, stats[ZERO].energy_mid, stats[ZERO].energy_high, stats[ZERO].aliasing,
            stats[ZERO].peak_frequency) == (None,) * 5
    assert stats[CHECKER].energy_high > 0.9 and stats[CHECKER].aliasing > 0.9 and stats[CHECKER].aliased
    assert stats[CHECKER].peak_frequency == pytest.approx(math.sqrt(0.5))  # the bin (1/2, 1/2)
    assert stats[BLOB].energy_low > max(stats[BLOB].energy_mid, stats[BLOB].energy_high)
    assert stats[BLOB].aliasing < 0.05 and not stats[BLOB].aliased
    assert stats[BLOB].peak_frequency == pytest.approx(1 / 64)  # the nearest bins to DC
    assert stats[GABOR].energy_mid > max(stats[GABOR].energy_low, stats[GABOR].energy_high)
    assert 1 / 8 <= stats[GABOR].peak_frequency < 1 / 4 and not stats[GABOR].aliased
    assert stats[LOUD].rms == pytest.approx(0.3, rel=1e-6) and stats[LOUD].renormalise
    assert [s.renormalise for s in stats] == [i == LOUD for i in range(7)]
    for s in stats:
        if s.energy_low is not None:
            assert s.energy_low + s.energy_mid + s.energy_high == pytest.approx(1, rel=REL)
    # the summary: counts, and the layer's energy fractions weighted by each filter's non-DC energy
    summary = done.summary
    assert summary["filters"] == 7 and summary["images"] == 0
    assert summary["dead"] == sum(e["dead"] for e in expected) == 2
    assert summary["aliased"] == sum(e["aliased"] for e in expected)
    assert summary["renormalise"] == 1
    for name in ("energy_low", "energy_mid", "energy_high", "aliasing"):
        assert summary[name] == pytest.approx(layer[name], rel=REL), name
    assert summary["median_norm"] == pytest.approx(layer["median_norm"], rel=1e-6)
    assert summary["definitions"]["nyquist_cycles_per_pixel"] == [0.25, 0.25]
    assert summary["definitions"]["spectrum_side"] == 64
    # what it wrote
    assert done.figure == tmp_path / "out" / "filters" / "layer1.png" and done.figure.is_file()
    assert Image.open(done.figure).size[0] > 0
    data = json.loads(done.data.read_text())
    assert data["filters"] == [s.to_json() for s in done.filters] and data["kernel"] == [KERNEL, KERNEL]
    assert data["stride"] == [STRIDE, STRIDE] and data["module"] == "0" and data["layer"] == 1


def test_images_make_a_never_firing_filter_dead_and_fires_matches_the_conv_run_by_hand(model, images, tmp_path):
    folder, pixels = images
    done = FiltersJob(model, 1, out=tmp_path / "out", batch_size=2).run([folder])
    assert done.summary["images"] == 3 and not done.failures
    # the rectified response, by hand: the preprocessed image is the picture in 0..1 (mean 0, std 1)
    conv = model.module[0]
    with torch.no_grad():
        rectified = F.relu(F.conv2d(torch.from_numpy(pixels)[:, None], conv.weight, conv.bias, stride=STRIDE))
    fires = (rectified.flatten(2).amax(2) > 0).double().mean(0)
    mean_activation = rectified.double().mean((0, 2, 3))
    expected, _ = expected_layer(conv_weights(model, "0"), (STRIDE, STRIDE))
    for i, stats in enumerate(done.filters):
        assert stats.fires == pytest.approx(fires[i].item(), abs=1e-12), NAMES[i]
        assert stats.mean_activation == pytest.approx(mean_activation[i].item(), rel=1e-5, abs=1e-9), NAMES[i]
        assert stats.dead is (expected[i]["dead"] or fires[i].item() == 0), NAMES[i]
        assert_matches(stats.to_json(), expected[i])  # images change nothing of the spectra
    silent = done.filters[SILENT]
    assert silent.dead and silent.fires == 0 and silent.mean_activation == 0
    assert silent.norm > 0.01 * done.summary["median_norm"]  # dead by firing, not by its norm
    assert 0 < done.filters[BLOB].fires < 1  # the blob (all positive, no bias) never fires on the black image
    assert done.summary["dead"] == 3 and "never fires" in done.summary["definitions"]["dead"]
    # the conv named itself: its raw output, rectified by the job, gives the same counts
    named = FiltersJob(model, "0", out=tmp_path / "out").run([folder])
    assert named.layer.number is None and named.figure.name == "0.png" and named.data.is_file()
    assert [s.fires for s in named.filters] == pytest.approx(fires.tolist(), abs=1e-12)
    assert [s.mean_activation for s in named.filters] == pytest.approx(mean_activation.tolist(), rel=1e-5, abs=1e-9)
    assert [s.dead for s in named.filters] == [s.dead for s in done.filters]
    # without images, the silent filter is alive: its norm is ordinary
    assert not FiltersJob(model, 1, out=tmp_path / "weights").run().filters[SILENT].dead


def test_fractions_at_other_strides_and_stride_one_never_aliases(model):
    weights = conv_weights(model, "0")
    for stride in [(1, 1), (1, 2), (3, 1)]:
        diagnosis = diagnose(torch.from_numpy(weights), stride)
        stats, summary = diagnosis.filters, diagnosis.summary
        expected, layer = expected_layer(weights, stride)
        for s, wanted in zip(stats, expected):
            assert_matches(s.to_json(), wanted)
        assert summary["aliasing"] == pytest.approx(layer["aliasing"], rel=REL, abs=1e-12)
        assert summary["definitions"]["nyquist_cycles_per_pixel"] == [1 / (2 * stride[0]), 1 / (2 * stride[1])]
        if stride == (1, 1):
            assert all(s.aliasing in (None, 0.0) and not s.aliased for s in stats) and summary["aliasing"] == 0


def test_a_larger_kernel_gets_four_bins_per_tap(tmp_path):
    """side = max(64, 4·max(kh, kw)): a 9 x 20 kernel is sampled on an 80 x 80 grid."""
    weights = np.random.default_rng(1).standard_normal((3, 2, 9, 20)) * 0.05
    diagnosis = diagnose(torch.from_numpy(weights), (2, 3))
    stats, summary = diagnosis.filters, diagnosis.summary
    assert summary["definitions"]["spectrum_side"] == 80
    expected, layer = expected_layer(weights, (2, 3))
    for s, wanted in zip(stats, expected):
        assert s.rms == pytest.approx(wanted["rms"], rel=REL) and s.norm == pytest.approx(wanted["norm"], rel=REL)
        assert_matches(s.to_json(), wanted)
    for name in ("energy_low", "energy_mid", "energy_high", "aliasing"):
        assert summary[name] == pytest.approx(layer[name], rel=REL)


def test_a_dilated_conv_is_measured_by_the_kernel_it_applies(tmp_path):
    """Dilation (2, 3) puts a tap at every second row and third column: the brute force sums the DTFT over
    those places; rms and norm stay the weights' own."""
    weights = np.random.default_rng(2).standard_normal((3, 2, 3, 3)) * 0.05
    spread = np.zeros((3, 2, 5, 7))
    for y in range(3):
        for x in range(3):
            spread[:, :, 2 * y, 3 * x] = weights[:, :, y, x]
    module = nn.Sequential(nn.Conv2d(2, 3, 3, dilation=(2, 3)), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    module[0].weight.data = torch.from_numpy(weights).float()
    model = wrap(module, (2, 12, 12))
    data = json.loads(FiltersJob(model, 1, out=tmp_path).run().data.read_text())
    assert data["dilation"] == [2, 3]
    expected, _ = expected_layer(spread.astype(np.float32).astype(np.float64), (1, 1))
    for stats, wanted, own in zip(data["filters"], expected, weights):
        wanted["rms"] = math.sqrt(np.mean(own**2))
        assert_matches(stats, wanted)


def test_dead_compares_with_the_median_of_an_even_count_of_filters():
    """Norms 0.4, 0.4, 100, 100: the median is 50.2, so the first two are at most 1 % of it."""
    weights = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    weights[:2], weights[2:] = 0.4, 100.0
    diagnosis = diagnose(weights, (1, 1))
    stats, summary = diagnosis.filters, diagnosis.summary
    assert [s.dead for s in stats] == [True, True, False, False]
    assert summary["median_norm"] == pytest.approx(50.2) and summary["dead"] == 2


def test_a_dead_filter_is_never_flagged_aliased():
    """A checkerboard a millionth as strong as its neighbours is dead: its spectrum has the same shape
    (most of it beyond Nyquist) but is noise-level, so it is not counted among the aliased filters."""
    checker = handset_weights()[CHECKER]
    weights = torch.from_numpy(np.stack([checker, checker, 1e-6 * checker]))
    stats = diagnose(weights, (STRIDE, STRIDE)).filters
    assert stats[2].dead and not stats[0].dead
    assert stats[2].aliasing == pytest.approx(stats[0].aliasing, rel=1e-6) and stats[0].aliasing > 0.5
    assert stats[0].aliased and not stats[2].aliased


def test_cli_default_writes_the_embedded_models_first_layer(tmp_path, embedded):
    out = tmp_path / "out"
    result = run("filters", "--out", out)
    assert result.exit_code == 0, result.output
    folder = out / "filters"
    assert (folder / "layer1.png").is_file() and Image.open(folder / "layer1.png").size[0] > 0
    data = json.loads((folder / "layer1.json").read_text())
    assert {"model", "layer", "module", "stride", "filters", "summary"} <= set(data)
    assert (data["model"], data["layer"], data["module"], data["stride"]) == ("embedded", 1, "features.0", [1, 1])
    weights = conv_weights(embedded, "features.0")
    assert len(data["filters"]) == len(weights) == 32
    keys = {"filter", "rms", "norm", "dead", "energy_low", "energy_mid", "energy_high", "peak_frequency", "aliasing",
            "aliased", "renormalise"}
    wanted = [expected_filter(w, (1, 1)) for w in weights]
    # (no filter's norm lies near the dead threshold here)
    median = float(np.median([e["norm"] for e in wanted]))
    for i, stats in enumerate(data["filters"]):
        assert keys <= set(stats) and stats["filter"] == i
        assert_matches(stats, wanted[i])
        assert stats["dead"] is (wanted[i]["norm"] <= 0.01 * median)
        assert stats["aliasing"] == 0 and not stats["aliased"]  # stride 1 folds nothing back
    summary = data["summary"]
    assert summary["filters"] == 32 and summary["aliased"] == 0 and summary["aliasing"] == 0
    assert summary["renormalise"] == sum(e["renormalise"] for e in wanted)
    assert summary["dead"] == sum(e["norm"] <= 0.01 * median for e in wanted)
    total = sum(e["sums"]["total"] for e in wanted)
    for name in ("energy_low", "energy_mid", "energy_high"):
        assert summary[name] == pytest.approx(sum(e["sums"][name] for e in wanted) / total, rel=REL)
    assert "layer 1 (features.1)" in result.output and "32 filters" in result.output


def test_cli_layer_two_sums_energy_over_its_input_channels(tmp_path):
    out = tmp_path / "out"
    result = run("filters", "--model", "test_filters:two_layers", "--input-size", "28", "--mean", "0", "--std", "1",
                 "--layer", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "filters" / "layer2.png").is_file() and Image.open(out / "filters" / "layer2.png").size[0] > 0
    data = json.loads((out / "filters" / "layer2.json").read_text())
    assert (data["layer"], data["module"], data["kernel"], data["stride"]) == (2, "2", [3, 3], [1, 1])
    weights = conv_weights(wrap(two_layers(), (1, 28, 28)), "2")
    assert weights.shape == (5, 4, 3, 3) and len(data["filters"]) == 5
    expected, layer = expected_layer(weights, (1, 1))
    for stats, wanted in zip(data["filters"], expected):
        assert_matches(stats, wanted)
        assert stats["dead"] is False and wanted["dead"] is False
    for name in ("energy_low", "energy_mid", "energy_high"):
        assert data["summary"][name] == pytest.approx(layer[name], rel=REL)
    # filter 0 is (k, -k, 0, 0): the energies of its channels add up, their responses do not cancel
    alone = expected_filter(weights[0][:1], (1, 1))
    for name in ("energy_low", "energy_mid", "energy_high"):
        assert data["filters"][0][name] == pytest.approx(alone[name], rel=1e-6)
    # filter 1 is (blob, checkerboard, 0, 0): between the two channels' own fractions
    blob, checker = expected_filter(weights[1][:1], (1, 1)), expected_filter(weights[1][1:2], (1, 1))
    assert blob["energy_low"] > data["filters"][1]["energy_low"] > checker["energy_low"]
    assert blob["energy_high"] < data["filters"][1]["energy_high"] < checker["energy_high"]


def test_cli_factory_model_with_images(tmp_path, images):
    folder, _ = images
    out = tmp_path / "out"
    result = run("filters", "--model", "test_filters:handset", "--input-size", "28", "--mean", "0", "--std", "1",
                 "--images", folder, "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "filters" / "layer1.json").read_text())
    assert data["stride"] == [STRIDE, STRIDE] and data["summary"]["images"] == 3
    assert [s["dead"] for s in data["filters"]] == [i in (ZERO, TINY, SILENT) for i in range(7)]
    assert data["filters"][SILENT]["fires"] == 0
    assert "3 dead" in result.output and "1 over RMS 0.1" in result.output


@pytest.mark.parametrize(("arguments", "names"), [
    (("--layer", "features.2"), ["features.2 is a MaxPool2d, not a convolution", "features.0"]),
    (("--model", "factories:functional", "--input-size", "20", "--layer", "six"),
     ["six is a ReLU6, not a convolution", "conv1"]),
    (("--model", "test_filters:handset", "--input-size", "28", "--mean", "0", "--std", "1", "--layer", "2"),
     ["no layer '2'", "1 = 1"]),
    (("--model", "test_filters:pool_only", "--input-size", "28", "--mean", "0", "--std", "1", "--layer", "0"),
     ["test_filters:pool_only has no Conv2d layer"]),
    (("--model", "test_filters:no_conv", "--input-size", "28", "--mean", "0", "--std", "1"),
     ["test_filters:no_conv has no Conv2d layer"]),
], ids=["pool", "relu6", "past-the-numbers", "no-conv-named-layer", "no-conv-default-layer"])
def test_cli_a_layer_without_filters_is_a_one_line_usage_error(tmp_path, arguments, names):
    out = tmp_path / "out"
    result = run("filters", *arguments, "--out", out)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    for name in names:
        assert name in result.stderr
    assert not (out / "filters").exists()


def test_job_raises_layer_error_before_writing(tmp_path):
    with pytest.raises(LayerError, match="pooling has no Conv2d layer"):
        FiltersJob(wrap(pool_only(), (1, 28, 28), name="pooling"), "0", out=tmp_path)
    second_relu = wrap(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(18, 2)), (1, 8, 8))
    with pytest.raises(LayerError, match="^3 is a ReLU, not a convolution; numbered layers: 1 = 0"):
        FiltersJob(second_relu, "3", out=tmp_path)
    assert FiltersJob(second_relu, "1", out=tmp_path).module == "0"
    assert not any(tmp_path.iterdir())
