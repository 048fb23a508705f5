"""Occlusion maps against a brute-force loop, square geometry by hand, and `vizdeconv occlude` batch runs."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from factories import FASHION
from oracles import Residual, occlusion_loop, occlusion_spec, point_output, wrap
from PIL import Image
from torch import nn

from vizdeconv.errors import VizDeconvError
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import (
    Approximation,
    corners,
    default_geometry,
    fill_values,
    not_incremental,
    occlude,
    parse_target,
)



def test_corners_by_hand():
    assert corners(28, 6, 1) == list(range(23))
    assert len(corners(224, 50, 8)) == 22 and corners(224, 50, 8)[-1] == 168
    assert corners(10, 3, 4) == [0, 4]  # stride larger than the square: 8 would end past 10
    assert corners(7, 7, 3) == [0]
    with pytest.raises(VizDeconvError, match=r"square \(30 px\) is larger than the model's input \(28 px\)"):
        corners(28, 30, 2)
    assert default_geometry((3, 224, 224)) == (50, 8) and default_geometry((1, 28, 28)) == (6, 1)


def test_fill_and_target(embedded):
    assert fill_values("mean", embedded) == (0.0,)
    mean, std = embedded.mean[0], embedded.std[0]
    assert fill_values("0.5", embedded)[0] == pytest.approx((0.5 - mean) / std)
    with pytest.raises(VizDeconvError, match="--fill expects"):
        fill_values("grey", embedded)
    assert parse_target("auto", embedded) == "auto"
    assert parse_target("7", embedded) == "7"
    assert parse_target("ankle boot", embedded) == "9"
    with pytest.raises(VizDeconvError, match="unknown target class 'hat'"):
        parse_target("hat", embedded)


def assert_matches_brute_force(model, image, size, stride, fill="mean", target="auto", layer_number=None,
                               method="incremental"):
    """Both the default (incremental) path and the forced brute-force path equal the loop."""
    layers = trace_layers(model)
    layer = layers.layer(layer_number or len(layers.numbered()))
    fill = fill_values(fill, model)
    expected = {}
    for brute in (False, True):
        maps = occlude(model, layers, image, occlusion_spec(model, layer, size=size, stride=stride, fill=fill,
                                                            target=target), batch_size=7, brute_force=brute)
        assert maps.method == ("brute force" if brute else method)
        assert maps.layer == (layer.number or 0) and maps.module == layer.name
        question = (maps.target, maps.channel)  # the loop runs once per question (both methods ask the same)
        if question not in expected:
            expected[question] = occlusion_loop(model, layer, image, size, stride, fill, *question)
        prob, top, total = expected[question]
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


def test_vgg11_bn_maps_equal_brute_force(vgg11_bn):
    torch.manual_seed(1)
    assert_matches_brute_force(vgg11_bn, torch.randn(3, 224, 224), 64, 80, layer_number=4)


def test_a_model_off_the_plain_chain_runs_incremental():
    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.fc = nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).flatten(1) * 2)

    torch.manual_seed(0)
    model = LoadedModel("m", "random", Doubled().eval(), None, (1, 10, 10), (0.0,), (1.0,), tuple("abcd"))
    layers = trace_layers(model)
    assert not_incremental(model, layers.layer(1), 3, (0.0,)) is None
    assert_matches_brute_force(model, torch.randn(1, 10, 10), 3, 2)


class ViewedBatch(nn.Module):
    """``x.view(x.size(0), -1)``: the tape keeps the clean pass's batch size, 1, as a number."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        x = self.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


class WriteThroughView(nn.Module):
    """An in-place ReLU on a slice of the conv's output, then the whole output read: the write
    changed the base through another view."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4, 4))

    def forward(self, x):
        x = self.conv(x)
        y = x[:, :2]
        y.relu_()
        return self.head(x)


@pytest.mark.parametrize("module, reason", [
    (ViewedBatch, "replaying its calls on regions raised RuntimeError"),
    (WriteThroughView, "reads a tensor that an in-place write changed through another view"),
])
def test_a_model_the_tape_cannot_replay_falls_back_to_brute_force(module, reason):
    torch.manual_seed(0)
    model = LoadedModel("m", "random", module().eval(), None, (1, 10, 10), (0.0,), (1.0,), tuple("abcd"))
    layers = trace_layers(model)
    layer = layers.layer("conv")
    assert reason in not_incremental(model, layer, 3, (0.0,))
    image = torch.randn(1, 10, 10)
    maps = occlude(model, layers, image, occlusion_spec(model, layer, size=3, stride=2, fill=(0.5,)), batch_size=4)
    assert maps.method == "brute force"
    prob, top, total = occlusion_loop(model, layer, image, 3, 2, (0.5,), maps.target, maps.channel)
    np.testing.assert_allclose(maps.prob_true, prob, atol=1e-5)
    assert (maps.top_class == top).all()
    np.testing.assert_allclose(maps.feature_total, total, rtol=1e-5, atol=1e-5 * np.abs(total).max())
    # the projective-field threshold needs the tape: brute force ignores it, and says so
    spec = occlusion_spec(model, layer, size=3, stride=2, fill=(0.5,), approximate=Approximation(0.3, 1, 1.0))
    approximate = occlude(model, layers, image, spec, batch_size=4)
    assert approximate.method == "approximate (brute force; no approximation)" and approximate.tau == 0.3
    np.testing.assert_allclose(approximate.prob_true, prob, atol=1e-5)


@pytest.mark.parametrize("name", ["relu@2", "pool", "stem_relu"])
def test_a_layer_of_a_residual_graph_runs_incremental(name):
    torch.manual_seed(0)
    model = wrap(Residual(), (2, 12, 12), categories="abcd")
    layers = trace_layers(model)
    layer = layers.layer(name)
    image = torch.randn(2, 12, 12)
    fill = fill_values("0.5", model)
    assert not_incremental(model, layer, 4, fill) is None
    maps = occlude(model, layers, image, occlusion_spec(model, layer, size=4, stride=3, fill=fill), batch_size=5)
    assert maps.method == "incremental" and maps.module == name and maps.layer == (layer.number or 0)
    prob, top, total = occlusion_loop(model, layer, image, 4, 3, fill, maps.target, maps.channel)
    np.testing.assert_allclose(maps.prob_true, prob, atol=1e-5)
    assert (maps.top_class == top).all()
    np.testing.assert_allclose(maps.feature_total, total, rtol=1e-5, atol=1e-5 * np.abs(total).max())
    clean = point_output(model, layer, image[None])[0]
    assert maps.channel == int(clean.flatten(1).max(1).values.argmax())
    assert maps.feature_clean == pytest.approx(clean[maps.channel].sum().item(), rel=1e-5)


class Pad(nn.Module):
    """``F.pad`` with a constant (negative pads crop)."""

    def __init__(self, pads, value):
        super().__init__()
        self.pads, self.value = pads, value

    def forward(self, x):
        return F.pad(x, self.pads, value=self.value)


class FunctionalReLU(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "relu_":
            return x.relu_()
        return F.relu(x, inplace=self.how == "inplace")


class ResidualSum(nn.Module):
    """Two same-size convs and the skip: ``out = conv2(relu(conv1(x))) + x``, or ``out += x``."""

    def __init__(self, channels, kernels, dilations, in_place):
        super().__init__()
        self.conv1, self.conv2 = (nn.Conv2d(channels, channels, k, padding=d * (k // 2), dilation=d)
                                  for k, d in zip(kernels, dilations))
        self.relu = nn.ReLU()
        self.in_place = in_place

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        if self.in_place:
            out += x
            return out
        return out + x


class Concatenation(nn.Module):
    """Two branches of the same size, concatenated on channels: a 1×1 conv and a 3×3 conv or max-pool."""

    def __init__(self, channels, out, stride, pooled):
        super().__init__()
        self.left = nn.Conv2d(channels, out, 1, stride=stride)
        self.right = (nn.MaxPool2d(3, stride=stride, padding=1) if pooled
                      else nn.Conv2d(channels, out, 3, stride=stride, padding=1))

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], 1)


class RandomGraph(nn.Module):
    def __init__(self, blocks, channels, classes=3):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(channels * 4, classes))

    def forward(self, x):
        return self.head(self.blocks(x))


def draw_block(draw, channels):
    """One random block for ``channels`` input channels."""
    kind = draw(st.sampled_from(["conv", "conv", "max", "avg", "pad", "residual", "concat", "relu", "batchnorm"]))
    if kind == "conv":
        kernel, dilation = draw(st.integers(1, 4)), draw(st.integers(1, 2))
        groups = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
        out = groups * draw(st.integers(1, 4 // groups if groups < 4 else 1))
        return nn.Conv2d(channels, out, kernel, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 2)),
                         dilation=dilation, groups=groups)
    if kind == "max":
        pool = draw(st.integers(2, 3))
        return nn.MaxPool2d(pool, stride=draw(st.integers(1, pool)), padding=draw(st.integers(0, pool // 2)),
                            ceil_mode=draw(st.booleans()))
    if kind == "avg":
        pool = draw(st.integers(2, 3))
        return nn.AvgPool2d(pool, stride=draw(st.integers(1, pool)), padding=draw(st.integers(0, pool // 2)),
                            ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans()))
    if kind == "pad":
        return Pad(tuple(draw(st.integers(-1, 2)) for _ in range(4)), draw(st.floats(-1, 1)))
    if kind == "residual":
        return ResidualSum(channels, [draw(st.sampled_from([1, 3])) for _ in range(2)],
                           [draw(st.integers(1, 2)) for _ in range(2)], draw(st.booleans()))
    if kind == "concat":
        pooled = draw(st.booleans())
        return Concatenation(channels, channels if pooled else draw(st.integers(1, 2)), draw(st.integers(1, 2)),
                             pooled)
    if kind == "relu":
        how = draw(st.sampled_from(["module", "module inplace", "functional", "inplace", "relu_"]))
        return nn.ReLU(inplace=how == "module inplace") if how.startswith("module") else FunctionalReLU(how)
    norm = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_incremental_equals_brute_force_on_random_graphs(data):
    """Random graphs: convs (kernels, strides, padding, dilation, groups), overlapping and ceil-mode
    pools, constant pads, residual sums (also in place), concatenations, functional and in-place
    ReLUs, eval BatchNorm; odd image sizes, squares at every border, strides smaller and larger than
    the square, any module output as the layer, any batch size."""
    draw = data.draw
    torch.manual_seed(draw(st.integers(0, 1000)))
    channels = draw(st.integers(1, 3))
    height, width = draw(st.integers(9, 23)), draw(st.integers(9, 23))
    blocks, probe = [], torch.zeros(1, channels, height, width)  # the blocks' output so far
    for _ in range(draw(st.integers(1, 4))):
        block = draw_block(draw, probe.shape[1])
        try:
            with torch.no_grad():
                output = block(probe.clone())
        except RuntimeError:
            continue  # the map is too small for it
        if min(output.shape[2:]) >= 1:
            blocks.append(block)
            probe = output
    model = wrap(RandomGraph(blocks, probe.shape[1]).eval(), (channels, height, width), categories="abc")
    size = draw(st.integers(1, min(height, width)))
    fewest = max(1, -(-(max(height, width) - size) // 6))  # at most 7 positions along an axis
    stride = draw(st.integers(fewest, max(fewest, 2 * size)))
    image = torch.randn(channels, height, width)
    layers = trace_layers(model)
    layer = layers.layer(draw(st.sampled_from([point.name for point in layers.graph.points])))
    fill = torch.full((channels,), draw(st.floats(-1, 1)))
    maps = occlude(model, layers, image, occlusion_spec(model, layer, size=size, stride=stride, fill=fill),
                   batch_size=draw(st.integers(1, 9)))
    assert maps.method == "incremental", not_incremental(model, layer, size, tuple(fill.tolist()))
    prob, top, total = occlusion_loop(model, layer, image, size, stride, fill, maps.target, maps.channel)
    np.testing.assert_allclose(maps.prob_true, prob, atol=1e-5)
    np.testing.assert_allclose(maps.feature_total, total, rtol=1e-5, atol=1e-5 * max(np.abs(total).max(), 1e-6))


def between_coarse(exact: np.ndarray, factor: int) -> np.ndarray:
    """``exact`` known only at every ``factor``-th row and column: bilinear in between, the last known
    row (column) past it."""
    def weights(length):  # (length, coarse count): each position's share of each coarse row
        coarse = len(range(0, length, factor))
        share = np.zeros((length, coarse))
        for i in range(length):
            below, t = min(i // factor, coarse - 1), min(i / factor, coarse - 1) - min(i // factor, coarse - 1)
            share[i, below] += 1 - t
            if t:
                share[i, below + 1] += t
        return share

    known = exact[::factor, ::factor].astype(np.float64)
    return weights(exact.shape[0]) @ known @ weights(exact.shape[1]).T


def test_approximate_mode_is_exact_where_it_looks_and_labelled(embedded):
    layers = trace_layers(embedded)
    layer = layers.layer(5)
    image = embedded.preprocess(Image.open(FASHION / "test00000_ankle-boot.png"))
    arguments = dict(size=6, stride=1, fill=torch.zeros(1))
    exact = occlude(embedded, layers, image, occlusion_spec(embedded, layer, **arguments), batch_size=16)
    spec = occlusion_spec(embedded, layer, approximate=Approximation(1.0, 4, 0.25), **arguments)
    approximate = occlude(embedded, layers, image, spec, batch_size=16)
    assert approximate.method == "approximate (incremental; drill-down factor 4, share 25%)"
    assert exact.method == "incremental"
    f, rows, cols = 4, *exact.prob_true.shape
    corners_ = [(bi, bj) for bi in range(0, rows, f) for bj in range(0, cols, f)]
    drops = {c: approximate.prob_clean - exact.prob_true[c] for c in corners_}
    drilled = set(sorted(corners_, key=lambda c: -drops[c])[: -(-len(corners_) // 4)])
    prob, total = between_coarse(exact.prob_true, f), between_coarse(exact.feature_total, f)
    for bi, bj in corners_:
        block = (slice(bi, bi + f), slice(bj, bj + f))
        if (bi, bj) in drilled:  # every position evaluated
            expected = exact.prob_true[block], exact.top_class[block], exact.feature_total[block]
        else:  # bilinear between the coarse positions, the corner's top class
            expected = prob[block], np.full_like(exact.top_class[block], exact.top_class[bi, bj]), total[block]
        np.testing.assert_allclose(approximate.prob_true[block], expected[0], atol=1e-5)
        assert (approximate.top_class[block] == expected[1]).all()
        np.testing.assert_allclose(approximate.feature_total[block], expected[2], rtol=1e-5,
                                   atol=1e-5 * np.abs(exact.feature_total).max())
    assert np.abs(approximate.prob_true - exact.prob_true).max() > 1e-3  # it is an approximation


def thresholded_loop(chain: nn.Sequential, layer_name: str, image, size, stride, fill, tau, target, channel):
    """Krypton's projective-field threshold by hand, one position at a time, down a chain of convs,
    max-pools and ReLUs: after each module, the cells the square changed (its 0/1 mask through the
    module's geometry: a conv of the mask with a ones kernel, a max-pool of it) are boxed, the box
    is cut to ``ceil(tau · side)`` rows and columns around its middle, and the clean values stand in
    outside the cut box, which is the mask for the next module. The head runs in full."""
    _, height, width = image.shape
    clean, h = [], image[None]
    with torch.no_grad():
        for module in chain:
            h = module(h)
            clean.append(h)
    prob, total = [], []
    for y in range(0, height - size + 1, stride):
        for x in range(0, width - size + 1, stride):
            h = image[None].clone()
            h[0, :, y:y + size, x:x + size] = torch.as_tensor(fill)[:, None, None]
            mask = torch.zeros(1, 1, height, width)
            mask[..., y:y + size, x:x + size] = 1
            for (name, module), clean_h in zip(chain.named_children(), clean):
                with torch.no_grad():
                    h = module(h)
                if isinstance(module, nn.Conv2d):
                    mask = F.conv2d(mask, torch.ones(1, 1, *module.kernel_size), stride=module.stride,
                                    padding=module.padding, dilation=module.dilation) > 0
                elif isinstance(module, nn.MaxPool2d):
                    mask = F.max_pool2d(mask, module.kernel_size, module.stride, module.padding,
                                        ceil_mode=module.ceil_mode) > 0
                elif not isinstance(module, nn.ReLU):
                    mask = None  # the head: the whole map changes, nothing is cut
                if mask is not None:
                    box = []
                    for axis in (2, 3):
                        changed = mask.float().amax(dim=5 - axis)[0, 0].nonzero()[:, 0]
                        side = h.shape[axis]
                        first, end = (int(changed.min()), int(changed.max()) + 1) if len(changed) else (0, 0)
                        cap = max(1, math.ceil(tau * side))
                        if end - first > cap:
                            first += (end - first - cap) // 2
                        box.append((first, min(end, first + cap)))
                    mask = torch.zeros(1, 1, *h.shape[2:])
                    mask[..., box[0][0]:box[0][1], box[1][0]:box[1][1]] = 1
                    h = torch.where(mask > 0, h, clean_h)
                if name == layer_name:
                    total.append(h[0, channel].sum().item())
            prob.append(h.softmax(1)[0, target].item())
    shape = (len(range(0, height - size + 1, stride)), len(range(0, width - size + 1, stride)))
    return np.reshape(prob, shape), np.reshape(total, shape)


@pytest.fixture(scope="module")
def thresholded_chain():
    torch.manual_seed(3)
    chain = nn.Sequential(OrderedDict(
        conv0=nn.Conv2d(2, 3, 3, padding=1), relu0=nn.ReLU(), pool0=nn.MaxPool2d(3, stride=2, padding=1),
        conv1=nn.Conv2d(3, 4, 3, stride=2, padding=1), relu1=nn.ReLU(), conv2=nn.Conv2d(4, 4, 2), relu2=nn.ReLU(),
        gap=nn.AdaptiveAvgPool2d(2), flat=nn.Flatten(), fc=nn.Linear(16, 5))).eval()
    return wrap(chain, (2, 23, 23), categories="abcde")


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.75])
def test_projective_field_threshold_equals_a_loop_that_cuts_each_map(thresholded_chain, tau):
    model = thresholded_chain
    layers = trace_layers(model)
    layer = layers.layer("relu1")
    image, fill = torch.randn(2, 23, 23), (0.5, -0.5)
    spec = occlusion_spec(model, layer, size=8, stride=5, fill=fill, approximate=Approximation(tau, 1, 1.0))
    maps = occlude(model, layers, image, spec, batch_size=6)
    assert maps.method == f"approximate (incremental; projective-field threshold tau={tau:g})"
    assert (maps.tau, maps.drill_factor, maps.drill_share) == (tau, 1, 1.0) and maps.spec == spec
    prob, total = thresholded_loop(model.module, "relu1", image, 8, 5, fill, tau, maps.target, maps.channel)
    np.testing.assert_allclose(maps.prob_true, prob, atol=1e-5)
    np.testing.assert_allclose(maps.feature_total, total, rtol=1e-5, atol=1e-5 * np.abs(total).max())
    exact = occlude(model, layers, image, occlusion_spec(model, layer, size=8, stride=5, fill=fill), batch_size=6)
    assert np.abs(maps.prob_true - exact.prob_true).max() > 1e-4  # the threshold cut something
    for batch_size in (1, 4, 64):  # each position's result does not depend on the others in its batch
        again = occlude(model, layers, image, spec, batch_size=batch_size)
        np.testing.assert_allclose(again.prob_true, maps.prob_true, atol=1e-6)
        np.testing.assert_allclose(again.feature_total, maps.feature_total, rtol=1e-5, atol=1e-6)


def test_a_threshold_of_one_is_exact(thresholded_chain):
    model = thresholded_chain
    layers = trace_layers(model)
    layer = layers.layer("conv1")
    image, fill = torch.randn(2, 23, 23), (0.0, 0.0)
    exact = occlude(model, layers, image, occlusion_spec(model, layer, size=4, stride=3, fill=fill), batch_size=5)
    spec = occlusion_spec(model, layer, size=4, stride=3, fill=fill, approximate=Approximation(1.0, 1, 1.0))
    maps = occlude(model, layers, image, spec, batch_size=5)
    assert maps.method == "approximate (incremental; no approximation)" and exact.method == "incremental"
    np.testing.assert_allclose(maps.prob_true, exact.prob_true, atol=1e-6)
    np.testing.assert_allclose(maps.feature_total, exact.feature_total, rtol=1e-5, atol=1e-6)
    assert (maps.top_class == exact.top_class).all()
    prob, total = thresholded_loop(model.module, "conv1", image, 4, 3, fill, 1.0, maps.target, maps.channel)
    np.testing.assert_allclose(maps.prob_true, prob, atol=1e-5)
    np.testing.assert_allclose(maps.feature_total, total, rtol=1e-5, atol=1e-5 * np.abs(total).max())
