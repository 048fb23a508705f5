"""Occlusion maps against a brute-force loop, square geometry by hand, and `vizdeconv occlude` batch runs."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from factories import FASHION
from oracles import Residual, occlusion_spec, point_output, wrap
from PIL import Image
from torch import nn

from vizdeconv.errors import VizDeconvError
from vizdeconv.incremental import unsupported
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import (
    corners,
    default_geometry,
    fill_values,
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


def brute_force(model, layers, layer, image, size, stride, fill, target, channel):
    """One occluded forward pass per position, square pasted by explicit loops; the feature map down
    the chain where it reaches the layer, else from the whole model with a hook of its own."""
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
                if layer.chain_index is None:
                    h = point_output(model, layer, h)
                else:
                    for step in layers.chain.steps[: layer.chain_index + 1]:
                        h = step.module(h)
            prob.append(probabilities[target].item())
            top.append(probabilities.argmax().item())
            total.append(h[0, channel].sum().item())
    shape = (len(range(0, height - size + 1, stride)), len(range(0, width - size + 1, stride)))
    return np.reshape(prob, shape), np.reshape(top, shape), np.reshape(total, shape)


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
            expected[question] = brute_force(model, layers, layer, image, size, stride, fill, *question)
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


def test_model_the_chain_cannot_cover_falls_back_to_brute_force():
    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.fc = nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).flatten(1) * 2)

    torch.manual_seed(0)
    model = LoadedModel("m", "random", Doubled().eval(), None, (1, 10, 10), (0.0,), (1.0,), tuple("abcd"))
    layers = trace_layers(model)
    assert unsupported(layers, layers.layer(1)).startswith("the plain chain of modules ends at 'fc'")
    assert_matches_brute_force(model, torch.randn(1, 10, 10), 3, 2, method="brute force")


@pytest.mark.parametrize("name", ["relu@2", "pool", "stem_relu"])
def test_a_layer_of_a_residual_graph_falls_back_to_brute_force(name):
    torch.manual_seed(0)
    model = wrap(Residual(), (2, 12, 12), categories="abcd")
    layers = trace_layers(model)
    layer = layers.layer(name)
    assert unsupported(layers, layer).startswith("the plain chain of modules ends at ")
    image = torch.randn(2, 12, 12)
    fill = fill_values("0.5", model)
    maps = occlude(model, layers, image, occlusion_spec(model, layer, size=4, stride=3, fill=fill), batch_size=5)
    assert maps.method == "brute force" and maps.module == name and maps.layer == (layer.number or 0)
    prob, top, total = brute_force(model, layers, layer, image, 4, 3, fill, maps.target, maps.channel)
    np.testing.assert_allclose(maps.prob_true, prob, atol=1e-5)
    assert (maps.top_class == top).all()
    np.testing.assert_allclose(maps.feature_total, total, rtol=1e-5, atol=1e-5 * np.abs(total).max())
    clean = point_output(model, layer, image[None])[0]
    assert maps.channel == int(clean.flatten(1).max(1).values.argmax())
    assert maps.feature_clean == pytest.approx(clean[maps.channel].sum().item(), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_incremental_equals_brute_force_on_random_stacks(data):
    """Random conv/pool stacks: kernels, strides, padding, dilation, overlapping and ceil-mode pools,
    odd image sizes, squares at every border, strides smaller and larger than the square."""
    draw = data.draw
    torch.manual_seed(draw(st.integers(0, 1000)))
    channels = draw(st.integers(1, 3))
    height, width = draw(st.integers(9, 23)), draw(st.integers(9, 23))
    stack, c = OrderedDict(), channels  # named modules: any of them can be picked by name
    for i in range(draw(st.integers(1, 3))):
        kernel = draw(st.integers(1, 4))
        dilation = draw(st.integers(1, 2))
        out = draw(st.integers(1, 4))
        stack[f"conv{i}"] = nn.Conv2d(c, out, kernel, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 2)),
                                      dilation=dilation)
        if draw(st.booleans()):  # without a ReLU, a max-pool's padding must act as −inf
            stack[f"relu{i}"] = nn.ReLU(inplace=draw(st.booleans()))
        c = out
        if draw(st.booleans()):
            pool = draw(st.integers(2, 3))
            stack[f"pool{i}"] = nn.MaxPool2d(pool, stride=draw(st.integers(1, pool)),
                                             padding=draw(st.integers(0, pool // 2)), ceil_mode=draw(st.booleans()))
    stack.update(gap=nn.AdaptiveAvgPool2d(2), flat=nn.Flatten(), fc=nn.Linear(c * 4, 3))
    module = nn.Sequential(stack).eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, channels, height, width))
    except RuntimeError:
        return  # the drawn stack shrinks this image to nothing
    model = LoadedModel("m", "random", module, None, (channels, height, width), (0.0,) * channels,
                        (1.0,) * channels, tuple("abc"))
    size = draw(st.integers(1, min(height, width)))
    stride = draw(st.integers(1, 2 * size))
    image = torch.randn(channels, height, width)
    layers = trace_layers(model)
    # any module output of the stack: a conv with or without its ReLU (numbered or not), a pool
    names = [name for name in stack if name not in ("gap", "flat", "fc")]
    layer = layers.layer(draw(st.sampled_from(names)))
    fill = torch.full((channels,), draw(st.floats(-1, 1)))
    maps = occlude(model, layers, image, occlusion_spec(model, layer, size=size, stride=stride, fill=fill),
                   batch_size=draw(st.integers(1, 9)))
    assert maps.method == "incremental"
    prob, top, total = brute_force(model, layers, layer, image, size, stride, fill, maps.target, maps.channel)
    np.testing.assert_allclose(maps.prob_true, prob, atol=1e-5)
    np.testing.assert_allclose(maps.feature_total, total, rtol=1e-5, atol=1e-5 * max(np.abs(total).max(), 1e-6))


def test_approximate_mode_is_exact_where_it_looks_and_labelled(embedded):
    layers = trace_layers(embedded)
    layer = layers.layer(5)
    image = embedded.preprocess(Image.open(FASHION / "test00000_ankle-boot.png"))
    arguments = dict(size=6, stride=1, fill=torch.zeros(1))
    exact = occlude(embedded, layers, image, occlusion_spec(embedded, layer, **arguments), batch_size=16)
    approximate = occlude(embedded, layers, image, occlusion_spec(embedded, layer, approximate=True, **arguments),
                          batch_size=16)
    assert approximate.method.startswith("approximate") and exact.method == "incremental"
    f, rows, cols = 4, *exact.prob_true.shape
    corners_ = [(bi, bj) for bi in range(0, rows, f) for bj in range(0, cols, f)]
    drops = {c: approximate.prob_clean - exact.prob_true[c] for c in corners_}
    drilled = set(sorted(corners_, key=lambda c: -drops[c])[: -(-len(corners_) // 4)])
    for bi, bj in corners_:
        block = (slice(bi, bi + f), slice(bj, bj + f))
        expected = exact.prob_true[block] if (bi, bj) in drilled else np.full_like(exact.prob_true[block],
                                                                                   exact.prob_true[bi, bj])
        np.testing.assert_allclose(approximate.prob_true[block], expected, atol=1e-5)
    assert np.abs(approximate.prob_true - exact.prob_true).max() > 1e-3  # it is an approximation
