"""Whole-layer reconstructions with known and fixed switches against independent down passes, and the
reconstruct job's files against numpy."""

from __future__ import annotations

import contextlib
import csv
import json
from collections import OrderedDict
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import FASHION, sample_copies
from numpy.lib.stride_tricks import sliding_window_view
from oracles import Residual, hook_count, patched_rectifiers, rectify, wrap
from PIL import Image
from torch import nn
from torch.nn.modules.utils import _pair

from vizdeconv.errors import LayerError, VizDeconvError
from vizdeconv.jobs.reconstruct import ReconstructJob
from vizdeconv.layers import trace_layers
from vizdeconv.reconstruct import display, has_max_pool, pearson, reconstruct, top_left

FEW = ["test00000_ankle-boot.png", "test00008_sandal.png", "test00013_dress.png"]
max_pool2d = F.max_pool2d  # the real one, kept before any test patches it


def top_left_unpool(signal: torch.Tensor, stride, padding, size) -> torch.Tensor:
    """Each pooled output's signal onto its window's top-left cell inside the map, one window at a time;
    overlapping windows that start on one cell add up."""
    (sy, sx), (py, px) = _pair(stride), _pair(padding)
    cells = signal.new_zeros(*signal.shape[:2], *size[-2:])
    for i in range(signal.shape[2]):
        for j in range(signal.shape[3]):
            cells[:, :, max(i * sy - py, 0), max(j * sx - px, 0)] += signal[:, :, i, j]
    return cells


class TopLeftPick(torch.autograd.Function):
    """A 2D max-pool going up; going down, ``top_left_unpool`` instead of the switches."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode):
        stride = kernel if stride in (None, (), []) else stride
        ctx.geometry = (stride, padding, x.shape)
        return max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)

    @staticmethod
    def backward(ctx, signal):
        return top_left_unpool(signal, *ctx.geometry), None, None, None, None


def pick(pool: nn.MaxPool2d, h: torch.Tensor) -> torch.Tensor:
    assert _pair(pool.dilation) == (1, 1)
    return TopLeftPick.apply(h, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode)


def chain_oracle(sequential: nn.Sequential, stop: int, images: torch.Tensor, *, fixed: bool = False) -> torch.Tensor:
    """Modules 0..``stop`` one at a time with plain autograd, each ReLU's backward relu(R) (and each
    max-pool's the top-left pick when ``fixed``), seeded with the whole output at ``stop``."""
    inputs = images.clone().requires_grad_(True)
    h = inputs
    for module in sequential[: stop + 1]:
        if isinstance(module, nn.ReLU):
            h = rectify(module, h, "deconvnet")
        elif fixed and isinstance(module, nn.MaxPool2d):
            h = pick(module, h)
        else:
            h = module(h)
    (pixels,) = torch.autograd.grad(h, inputs, h.detach())
    return pixels


@contextlib.contextmanager
def top_left_pools():
    """Every ``F.max_pool2d`` call (``nn.MaxPool2d`` modules too) is a ``TopLeftPick``."""
    def pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        assert _pair(dilation) == (1, 1) and not return_indices
        return TopLeftPick.apply(x, kernel_size, stride, padding, ceil_mode)

    with mock.patch.object(F, "max_pool2d", pool):
        yield


def graph_oracle(model, layer, images, *, fixed: bool = False) -> torch.Tensor:
    """The whole model with patched rectifiers (and pools), seeded with the whole output of the
    ``layer.point.call``-th call of its module, caught by a hook of our own."""
    outputs = []
    handle = model.module.get_submodule(layer.point.module_name).register_forward_hook(
        lambda module, inputs, output: outputs.append(output.clone()))
    inputs = images.clone().requires_grad_(True)
    try:
        with patched_rectifiers("deconvnet"), top_left_pools() if fixed else contextlib.nullcontext():
            model.module(inputs)
    finally:
        handle.remove()
    h = outputs[layer.point.call]
    (pixels,) = torch.autograd.grad(h, inputs, h.detach())
    return pixels


def assert_close_to(pixels, expected):
    assert expected.abs().max() > 0
    torch.testing.assert_close(pixels, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def sample_batch(model, names=FEW[:2], random=1, seed=0):
    """Shipped samples, preprocessed by hand (grey, /255, the model's normalisation), and random images."""
    pictures = [torch.from_numpy(np.asarray(Image.open(FASHION / name).convert("L"), dtype=np.float32) / 255)[None]
                for name in names]
    pictures = [(p - model.mean[0]) / model.std[0] for p in pictures]
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(pictures + [torch.randn(1, 28, 28, generator=generator) for _ in range(random)])


# Layer N of the embedded model is features[EMBEDDED_STOPS[N]] (conv N's ReLU).
EMBEDDED_STOPS = {1: 1, 2: 4, 5: 11}


@pytest.mark.parametrize("switches", ["known", "fixed"])
def test_embedded_layers_equal_the_chain_oracle(embedded, switches):
    images = sample_batch(embedded)
    layers = trace_layers(embedded)
    for number, stop in EMBEDDED_STOPS.items():
        layer = layers.layer(number)
        assert layer.point.module_name == f"features.{stop}"
        expected = chain_oracle(embedded.module.features, stop, images, fixed=switches == "fixed")
        assert_close_to(reconstruct(embedded, layer, images, switches=switches), expected)


def pool_net(pool: nn.MaxPool2d, seed: int = 0) -> nn.Sequential:
    """conv 3×3 (2→3, pad 1) → ReLU → ``pool`` → conv 3×3 (3→4, pad 1) → ReLU."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(2, 3, 3, padding=1), relu1=nn.ReLU(), pool=pool,
                                     conv2=nn.Conv2d(3, 4, 3, padding=1), relu2=nn.ReLU()))


POOLS = {
    "overlapping, padded": lambda: nn.MaxPool2d(3, stride=2, padding=1),
    "2×2": lambda: nn.MaxPool2d(2, stride=2),
    "ceil mode": lambda: nn.MaxPool2d(3, stride=2, ceil_mode=True),
    "ceil mode, padded": lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    "rectangular": lambda: nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0)),
}


@pytest.mark.parametrize("pool", POOLS.values(), ids=POOLS.keys())
def test_known_equals_the_chain_oracle_through_a_pool(pool):
    net = pool_net(pool())
    model = wrap(net, (2, 12, 12))
    images = torch.randn(3, 2, 12, 12, generator=torch.Generator().manual_seed(1))
    for spec, stop in [(1, 1), (2, 4), ("pool", 2)]:
        assert_close_to(reconstruct(model, trace_layers(model).layer(spec), images), chain_oracle(net, stop, images))


def fixed_by_hand(net: nn.Sequential, images: torch.Tensor) -> torch.Tensor:
    """Zeiler & Fergus's down pass of layer 2, written out: relu(R), conv2ᵀ, top-left unpooling,
    relu(R), conv1ᵀ; the seed is the layer's own forward activation."""
    conv1, _, pool, conv2, _ = net
    with torch.no_grad():
        first = torch.relu(conv1(images))
        seed = torch.relu(conv2(pool(first)))
        signal = F.conv_transpose2d(seed.clamp(min=0), conv2.weight, padding=conv2.padding)
        signal = top_left_unpool(signal, pool.stride, pool.padding, first.shape)
        return F.conv_transpose2d(signal.clamp(min=0), conv1.weight, padding=conv1.padding)


@pytest.mark.parametrize("pool", POOLS.values(), ids=POOLS.keys())
def test_fixed_equals_top_left_unpooling_written_out(pool):
    net = pool_net(pool(), seed=2)
    model = wrap(net, (2, 12, 12))
    images = torch.randn(3, 2, 12, 12, generator=torch.Generator().manual_seed(3))
    layer = trace_layers(model).layer(2)
    fixed = reconstruct(model, layer, images, switches="fixed")
    assert_close_to(fixed, fixed_by_hand(net, images))
    assert not torch.allclose(fixed, reconstruct(model, layer, images), rtol=1e-3, atol=1e-3)


def test_ceil_mode_sends_the_overhanging_window_to_its_first_cell():
    """Ceil mode adds a window that reaches past the map (rows and columns 6..8 of 0..7): its pooled
    value, the map's value at (7, 7), lands on its first cell (6, 6)."""
    conv = nn.Conv2d(1, 1, 1)  # the identity, with a parameter for the model's device
    conv.weight.data.fill_(1.0)
    conv.bias.data.zero_()
    model = wrap(nn.Sequential(conv, nn.MaxPool2d(3, stride=2, ceil_mode=True)), (1, 8, 8))
    layer = trace_layers(model).layer("1")
    assert layer.output_shape == (1, 4, 4)
    image = torch.arange(64.0).reshape(1, 1, 8, 8)
    fixed = reconstruct(model, layer, image, switches="fixed")
    expected = torch.zeros(8, 8)
    for y in (0, 2, 4, 6):
        for x in (0, 2, 4, 6):
            expected[y, x] = 8 * min(y + 2, 7) + min(x + 2, 7)  # each window's maximum: its bottom-right cell
    torch.testing.assert_close(fixed[0, 0], expected, rtol=0, atol=0)


def test_top_left_picks_the_first_cell_inside_the_map():
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    # rows: kernel 3, stride 2, padding 1 → windows start at -1, 1, 3 → cells 0, 1, 3
    # columns: kernel 2, stride 3, no padding → windows start at 0, 3 → cells 0, 3
    corners = top_left(x, (3, 2), (3, 2, 1, 1), (2, 3, 0, 1))
    assert corners[0, 0].tolist() == [[x[0, 0, y, c].item() for c in (0, 3)] for y in (0, 1, 3)]


def test_on_a_graph_the_point_of_a_shared_module_is_seeded_whole():
    torch.manual_seed(4)
    model = wrap(Residual(), (2, 12, 12))
    images = torch.randn(2, 2, 12, 12)
    layers = trace_layers(model)
    shared, top = layers.layer("relu@2"), layers.layer("relu3")
    assert (shared.point.module_name, shared.point.call) == ("relu", 1) and shared.chain_index is None
    assert not has_max_pool(shared) and has_max_pool(top)
    for layer in (shared, top, layers.layer("pool")):
        known, fixed = (reconstruct(model, layer, images, switches=switches) for switches in ("known", "fixed"))
        assert_close_to(known, graph_oracle(model, layer, images))
        assert_close_to(fixed, graph_oracle(model, layer, images, fixed=True))
        assert torch.equal(fixed, known) == (layer is shared)  # a max-pool below: the switches matter


def test_without_a_max_pool_below_fixed_switches_are_the_known_ones(embedded):
    layers = trace_layers(embedded)
    assert [has_max_pool(layers.layer(n)) for n in (1, 2, 5)] == [False, True, True]
    assert has_max_pool(layers.layer("features.2"))  # the pool's own output
    images = sample_batch(embedded)
    first = reconstruct(embedded, layers.layer(1), images)
    assert first.abs().max() > 0
    assert torch.equal(reconstruct(embedded, layers.layer(1), images, switches="fixed"), first)
    for number in (2, 5):
        known = reconstruct(embedded, layers.layer(number), images)
        fixed = reconstruct(embedded, layers.layer(number), images, switches="fixed")
        assert (known - fixed).abs().max() > 0.1 * known.abs().max()


def test_reconstruct_refuses_unknown_switches_and_leaves_nothing_behind_after_an_error(embedded):
    layer = trace_layers(embedded).layer(2)
    with pytest.raises(ValueError, match="'learned'"):
        reconstruct(embedded, layer, torch.zeros(1, 1, 28, 28), switches="learned")
    with pytest.raises(RuntimeError):
        reconstruct(embedded, layer, torch.zeros(1, 3, 28, 28), switches="fixed")  # conv1 takes 1 channel
    assert hook_count(embedded.module) == 0 and torch._C._len_torch_function_stack() == 0
    # autograd is plain again: a ReLU's backward masks by the forward (relu(R) would give 0 here),
    # a max-pool's goes to the maximum (not the top-left cell)
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    assert torch.autograd.grad(torch.relu(x), x, torch.tensor([-3.0, -3.0]))[0].tolist() == [0.0, -3.0]
    y = torch.tensor([[[[1.0, 5.0], [2.0, 3.0]]]], requires_grad=True)
    assert torch.autograd.grad(F.max_pool2d(y, 2).sum(), y)[0].flatten().tolist() == [0.0, 1.0, 0.0, 0.0]
    assert all(p.grad is None for p in embedded.module.parameters())


def test_pearson_equals_numpy_corrcoef():
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(2, 7, 9, generator=generator)
    b = 0.5 * a + torch.randn(2, 7, 9, generator=generator)
    expected = np.corrcoef(a.double().numpy().ravel(), b.double().numpy().ravel())[0, 1]
    assert 0.1 < expected < 0.9
    assert pearson(a, b) == pytest.approx(expected, rel=1e-9)
    assert pearson(a, b.reshape(9, 14)) == pytest.approx(expected, rel=1e-9)  # entries, whatever the shapes
    assert pearson(a, 3 * a - 2) == pytest.approx(1.0) and pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(a, torch.full_like(a, 4.0)) == 0.0 and pearson(torch.zeros(3), torch.zeros(3)) == 0.0


def numpy_display(x: np.ndarray) -> np.ndarray:
    low, high = np.percentile(x.astype(np.float64), [0.5, 99.5])
    return np.clip((x - low) / (high - low), 0, 1)


def test_display_maps_the_half_percentiles_to_0_and_1():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(3, 20, 15, generator=generator)
    x[1, 4, 4], x[2, 0, 7] = 40.0, -25.0  # outliers are clipped, not allowed to squash the rest
    shown = display(x)
    np.testing.assert_allclose(shown.numpy(), numpy_display(x.numpy()), rtol=1e-5, atol=1e-6)
    assert shown.dtype == torch.float32 and shown.shape == x.shape
    assert shown[1, 4, 4] == 1.0 and shown[2, 0, 7] == 0.0
    assert 0.4 < shown.median() < 0.6
    flat = display(torch.full((1, 5, 5), 2.0))
    assert torch.isfinite(flat).all()


def numpy_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 (11×11 Gaussian, σ 1.5, valid positions), with numpy's sliding windows."""
    line = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    window = np.outer(line, line) / np.outer(line, line).sum()

    def local(t):
        return np.einsum("chwij,ij->chw", sliding_window_view(t, (11, 11), axis=(1, 2)), window)

    a, b = a.astype(np.float64), b.astype(np.float64)
    ma, mb = local(a), local(b)
    va, vb, cov = local(a * a) - ma ** 2, local(b * b) - mb ** 2, local(a * b) - ma * mb
    index = (2 * ma * mb + 1e-4) * (2 * cov + 9e-4) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4))
    return float(index.mean(axis=(1, 2)).mean())


@pytest.fixture()
def images(tmp_path):
    return sample_copies(tmp_path / "in", FEW)


def test_job_writes_figures_arrays_and_a_csv_that_agree(embedded, images, tmp_path):
    broken = images / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    done = ReconstructJob(embedded, "1,2", out=tmp_path / "out").run([images])
    folder = tmp_path / "out" / "reconstruct"
    assert done.folder == folder
    assert [failure.path for failure in done.failures] == [broken]
    assert json.loads((folder / "index.json").read_text())["failed"][0]["image"] == str(broken)
    assert done.notes == ["layer 1 (features.1): no max-pool below it, so fixed switches give the known reconstruction"]
    stems = sorted(name.removesuffix(".png") for name in FEW)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == stems
    assert sorted(done.figures) == sorted(folder / stem / f"reconstruct_layer{n}.png" for stem in stems for n in (1, 2))
    with open(folder / "similarity.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["image", "layer", "switches", "pearson", "ssim"]
    assert len(rows) == len(done.similarities) == 3 * 2 * 2
    by_key = {}
    for row, similarity in zip(rows, done.similarities):
        assert (row["image"], row["layer"], row["switches"]) == (str(similarity.image), similarity.layer,
                                                                 similarity.switches)
        assert float(row["pearson"]) == pytest.approx(similarity.pearson, abs=1e-6)
        assert float(row["ssim"]) == pytest.approx(similarity.ssim, abs=1e-6)
        by_key[similarity.image.stem, similarity.layer, similarity.switches] = similarity
    for stem in stems:
        picture = np.asarray(Image.open(images / f"{stem}.png").convert("L"), dtype=np.float32) / 255
        expected_input = torch.from_numpy((picture - embedded.mean[0]) / embedded.std[0])[None, None]
        for number in (1, 2):
            png = folder / stem / f"reconstruct_layer{number}.png"
            assert Image.open(png).size[0] > 28
            with np.load(png.with_suffix(".npz")) as arrays:
                assert sorted(arrays.files) == ["fixed", "fixed_pearson", "fixed_ssim", "input", "known",
                                                "known_pearson", "known_ssim", "layer", "module"]
                assert int(arrays["layer"]) == number and str(arrays["module"]) == f"features.{3 * number - 2}"
                np.testing.assert_allclose(arrays["input"], expected_input[0].numpy(), atol=1e-6)
                np.testing.assert_allclose(arrays["known"], chain_oracle(
                    embedded.module.features, EMBEDDED_STOPS[number], expected_input)[0].numpy(),
                    rtol=1e-4, atol=1e-5 * np.abs(arrays["known"]).max())
                for switches in ("known", "fixed"):
                    r = np.corrcoef(arrays["input"].ravel().astype(np.float64),
                                    arrays[switches].ravel().astype(np.float64))[0, 1]
                    s = numpy_ssim(numpy_display(arrays["input"]), numpy_display(arrays[switches]))
                    assert float(arrays[f"{switches}_pearson"]) == pytest.approx(r, abs=1e-5)
                    assert float(arrays[f"{switches}_ssim"]) == pytest.approx(s, abs=1e-4)
                    similarity = by_key[stem, str(number), switches]
                    assert (similarity.pearson, similarity.ssim) == pytest.approx((r, s), abs=1e-4)
                if number == 1:
                    np.testing.assert_array_equal(arrays["fixed"], arrays["known"])
                else:
                    assert not np.allclose(arrays["fixed"], arrays["known"], atol=1e-3)


def test_job_similarities_are_in_input_layer_and_switches_order(embedded, images, tmp_path):
    """As ``ReconstructReport`` documents, and whatever the batch size."""
    reports = [ReconstructJob(embedded, "1,2", out=tmp_path / f"out{size}", batch_size=size).run([images])
               for size in (1, 16)]
    for done in reports:
        keys = [(s.image.name, s.layer, s.switches) for s in done.similarities]
        assert keys == [(name, layer, switches) for name in sorted(FEW) for layer in ("1", "2")
                        for switches in ("known", "fixed")]


def test_job_with_known_switches_only_has_no_notes_and_no_fixed_arrays(embedded, images, tmp_path):
    done = ReconstructJob(embedded, [2], switches=["known"], out=tmp_path / "out").run([images / FEW[0]])
    assert done.notes == [] and [s.switches for s in done.similarities] == ["known"]
    with np.load(done.folder / "test00000_ankle-boot" / "reconstruct_layer2.npz") as arrays:
        assert sorted(arrays.files) == ["input", "known", "known_pearson", "known_ssim", "layer", "module"]
    assert ReconstructJob(embedded, "all", switches=["fixed"]).notes == [
        "layer 1 (features.1): no max-pool below it, so fixed switches give the known reconstruction"]


def state(module: nn.Module) -> dict:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def test_job_leaves_the_model_as_it_was_after_a_run_and_after_a_forced_error(embedded, images, tmp_path):
    module = embedded.module
    images_in = sample_batch(embedded)
    with torch.no_grad():
        before, logits = state(module), module(images_in)
    ReconstructJob(embedded, "all", out=tmp_path / "out").run([images])
    assert hook_count(module) == 0 and torch._C._len_torch_function_stack() == 0

    def trip(mod, inputs):
        if torch.is_grad_enabled():  # the trace runs without grad; reconstruct runs with it
            raise RuntimeError("tripped inside the deconvnet")

    handle = module.features[3].register_forward_pre_hook(trip)
    try:
        with pytest.raises(RuntimeError, match="tripped"):
            ReconstructJob(embedded, "2,5", out=tmp_path / "error").run([images])
    finally:
        handle.remove()
    assert hook_count(module) == 0 and torch._C._len_torch_function_stack() == 0
    assert not module.training and all(p.grad is None and p.requires_grad for p in module.parameters())
    after = state(module)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(module(images_in), logits, rtol=0, atol=0)


@pytest.mark.parametrize("layers, match", [
    ("9", r"no layer '9'; conv layers: 1 = features\.1, .* 5 = features\.11"),
    ("1,features.99", r"no layer 'features\.99'"),
    ("classifier.1", r"classifier\.1.*no \(C, H, W\) output"),
])
def test_job_refuses_layers_it_cannot_reconstruct(embedded, layers, match):
    with pytest.raises(LayerError, match=match):
        ReconstructJob(embedded, layers)


def test_job_refuses_unknown_switches(embedded):
    with pytest.raises(VizDeconvError, match="'learned'"):
        ReconstructJob(embedded, "1", switches=["known", "learned"])


def test_top_left_of_a_dilated_window_starts_on_one_of_its_cells():
    """Kernel 3, stride 2, padding 1, dilation 2 along x: window j covers 2j − 1, 2j + 1, 2j + 3; the
    first window's corner −1 is padding, so its top-left cell in the map is 1, its own next cell."""
    x = torch.arange(9.0).view(1, 1, 1, 9)
    picked = top_left(x, (1, 4), (1, 1, 0, 1), (3, 2, 1, 2))
    assert picked.flatten().tolist() == [1.0, 1.0, 3.0, 5.0]
