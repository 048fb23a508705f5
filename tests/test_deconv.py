"""The deconvnet against independent expectations: Springenberg's autograd oracle and hand-computed nets."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from oracles import Residual, SharedReLU, graph_oracle, oracle, wrap
from torch import nn

from vizdeconv.deconvnet import Deconvnet, strongest, walk
from vizdeconv.errors import LayerError
from vizdeconv.layers import Layer, trace_chain, trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.switches import SwitchRecorder


def project_strongest(deconvnet, images, top):
    forward = deconvnet.forward(images)
    seeds = strongest(forward.activations, top=top)
    return seeds, deconvnet.project(forward, seeds)


def assert_close_to(projection, expected):
    assert expected.abs().max() > 0
    torch.testing.assert_close(projection, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def assert_matches_oracle(model: LoadedModel, layer_specs, images, top=2, rule="deconvnet"):
    """Projections of each layer's strongest activations equal the chain oracle's; with the
    deconvnet rule on a plain chain they come from the chain walk."""
    layers = trace_layers(model)
    for spec in layer_specs:
        layer = layers.layer(spec)
        deconvnet = Deconvnet(model, layers, layer, rule=rule)
        assert deconvnet.walks == (rule == "deconvnet")
        seeds, projections = project_strongest(deconvnet, images, top)
        assert len(seeds) == top * len(images)
        for seed, projection in zip(seeds.tolist(), projections):
            assert_close_to(projection, oracle(layers.chain, layer, images[seed[0]], seed, rule))


def test_alexnet_matches_oracle(alexnet):
    torch.manual_seed(1)
    assert_matches_oracle(alexnet, [1, 2, 3, 4, 5], torch.randn(2, 3, 224, 224))


def test_vgg11_bn_matches_oracle(vgg11_bn):
    torch.manual_seed(2)
    assert_matches_oracle(vgg11_bn, [2, 5, 8], torch.randn(2, 3, 224, 224), top=1)


def test_embedded_matches_oracle(embedded):
    torch.manual_seed(3)
    assert_matches_oracle(embedded, [1, 2, 3, 4, 5], torch.randn(3, 1, 28, 28), top=3)


@pytest.mark.parametrize("rule", ["guided", "gradient"])
def test_other_rules_go_through_autograd_and_match_the_oracle(embedded, rule):
    torch.manual_seed(3)
    assert_matches_oracle(embedded, [2, 5], torch.randn(2, 1, 28, 28), top=2, rule=rule)


def test_the_walk_and_the_autograd_path_agree_on_a_chain(embedded):
    """``walk`` on its own, and the general path (``features``, the Sequential's output, is no chain
    step), give the same projections as the oracle."""
    torch.manual_seed(5)
    images = torch.randn(2, 1, 28, 28)
    layers = trace_layers(embedded)
    pooled = layers.layer("features.12")
    whole = Deconvnet(embedded, layers, layers.layer("features"))
    assert not whole.walks and whole.layer.chain_index is None
    forward = whole.forward(images)
    seeds = strongest(forward.activations, top=3)
    with SwitchRecorder(layers.chain, pooled.chain_index) as recorder:
        walked = walk(layers.chain, pooled.chain_index, recorder.forward(images), seeds)
    torch.testing.assert_close(whole.project(forward, seeds), walked, rtol=1e-4, atol=1e-5)
    for seed, projection in zip(seeds.tolist(), walked):
        assert_close_to(projection, oracle(layers.chain, pooled, images[seed[0]], seed))


class Tiny(nn.Module):
    """conv 2×2 (weights 1, 2, 3, 4; bias 5) → ReLU → overlapping max-pool 2/1 → conv 2×2 of ones → ReLU.

    With ``functional_pool`` the pool is ``F.max_pool2d`` in ``forward``: the plain chain ends
    there and layer 2 goes through autograd with the rule."""

    def __init__(self, functional_pool=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 2)
        self.conv1.weight.data = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        self.conv1.bias.data = torch.tensor([5.0])
        self.relu1 = nn.ReLU()
        self.pool = None if functional_pool else nn.MaxPool2d(2, stride=1)
        self.conv2 = nn.Conv2d(1, 1, 2, bias=False)
        self.conv2.weight.data.fill_(1.0)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.pool(x) if self.pool is not None else F.max_pool2d(x, 2, stride=1)
        return self.relu2(self.conv2(x))


def tiny_image():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 1:3, 1:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return image


def filter_at_centre():
    expected = torch.zeros(1, 4, 4)
    expected[0, 1:3, 1:3] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    return expected


def test_hand_computed_projection_through_overlapping_pool():
    model = LoadedModel("tiny", "hand", Tiny().eval(), None, (1, 4, 4), (0.0,), (1.0,), ())
    layers = trace_layers(model)
    image = tiny_image()
    # conv1 output (3×3) peaks at its centre: 1·1 + 4·1 + 5 = 10, so all four 2×2 pool windows pick it.
    pool = Deconvnet(model, layers, layers.layer("pool"))
    assert pool.walks and pool.layer.chain_index == 2
    forward = pool.forward(image)
    assert forward.activations[0, 0].tolist() == [[10.0, 10.0], [10.0, 10.0]]
    assert forward.switches[2][0, 0].tolist() == [[4, 4], [4, 4]]
    # One pooled unit (10) unpools onto conv1 unit (1, 1); conv1ᵀ spreads 10 × the filter, no bias.
    projection = pool.project(forward, torch.tensor([[0, 0, 0, 1]]))
    torch.testing.assert_close(projection[0], 10 * filter_at_centre(), rtol=0, atol=0)
    # Layer 2 = relu(conv2) = 40. conv2ᵀ puts 40 on all four pooled units; all four switches point
    # to conv1 unit (1, 1), where they add up to 160.
    layer2 = Deconvnet(model, layers, layers.layer(2))
    assert layer2.walks
    forward = layer2.forward(image)
    assert forward.activations.item() == 40.0
    projection = layer2.project(forward, torch.tensor([[0, 0, 0, 0]]))
    torch.testing.assert_close(projection[0], 160 * filter_at_centre(), rtol=0, atol=0)


def test_hand_computed_projection_through_a_functional_overlapping_pool():
    """The same numbers on the general path: autograd's max-pool backward is the unpooling, and
    overlapping windows add up there too."""
    model = LoadedModel("tiny", "hand", Tiny(functional_pool=True).eval(), None, (1, 4, 4), (0.0,), (1.0,), ())
    layers = trace_layers(model)
    assert [layer.name for layer in layers.numbered()] == ["relu1"]  # the chain ends at the functional pool
    deconvnet = Deconvnet(model, layers, layers.layer("relu2"))
    assert not deconvnet.walks and deconvnet.layer.chain_index is None
    forward = deconvnet.forward(tiny_image())
    assert forward.activations.item() == 40.0
    projection = deconvnet.project(forward, torch.tensor([[0, 0, 0, 0]]))
    torch.testing.assert_close(projection[0], 160 * filter_at_centre(), rtol=0, atol=0)


def sign_model():
    conv1 = nn.Conv2d(1, 1, 1, bias=False)
    conv1.weight.data.fill_(-1.0)  # every forward activation below is negative → ReLU forward mask all zero
    conv2 = nn.Conv2d(1, 1, 1, bias=False)
    conv2.weight.data.fill_(2.0)
    module = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU()).eval()
    return LoadedModel("m", "hand", module, None, (1, 2, 2), (0.0,), (1.0,), ())


@pytest.mark.parametrize("rule, expected", [
    # down: relu(3)=3 → conv2ᵀ: 6 → relu(6)=6 (signal positive, though the forward mask is 0) → conv1ᵀ: -6
    ("deconvnet", [[0.0, 0.0], [-6.0, 0.0]]),
    # guided backprop and the gradient both multiply by the forward mask, which is all zero here
    ("guided", [[0.0, 0.0], [0.0, 0.0]]),
    ("gradient", [[0.0, 0.0], [0.0, 0.0]]),
])
def test_relu_rectifies_the_signal_not_the_forward_mask(rule, expected):
    model = sign_model()
    layers = trace_layers(model)
    deconvnet = Deconvnet(model, layers, layers.layer("2"), rule=rule)
    forward = deconvnet.forward(torch.ones(1, 1, 2, 2))
    forward.activations = torch.full_like(forward.activations, 3.0)  # pretend a positive seed
    projection = deconvnet.project(forward, torch.tensor([[0, 0, 1, 0]]))
    torch.testing.assert_close(projection[0], torch.tensor([expected]))


def test_strongest_picks_channels_and_positions():
    activations = torch.zeros(2, 3, 4, 5)
    activations[0, 2, 1, 3] = 9.0
    activations[0, 0, 3, 4] = 5.0
    activations[1, 1, 0, 0] = 7.0
    seeds = strongest(activations, top=2)
    assert seeds[:2].tolist() == [[0, 2, 1, 3], [0, 0, 3, 4]]
    assert seeds[2].tolist() == [1, 1, 0, 0]
    assert strongest(activations, channel=0).tolist() == [[0, 0, 3, 4], [1, 0, 0, 0]]
    assert strongest(activations, top=1, position=(1, 3)).tolist() == [[0, 2, 1, 3], [1, 0, 1, 3]]
    with pytest.raises(LayerError, match="channels 0..2"):
        strongest(activations, channel=3)
    with pytest.raises(LayerError, match="4×5"):
        strongest(activations, position=(4, 0))


@pytest.mark.parametrize("nonlinearity", [nn.Tanh, nn.LeakyReLU, nn.GELU, nn.ELU, nn.SiLU])
def test_a_non_rectifier_passes_its_local_gradient(nonlinearity):
    """Once the chain walk refused such a layer (and LeakyReLU, ELU, GELU, SiLU were walked as if they
    were ReLUs); now only ReLU and ReLU6 are rectifiers: the others pass their ordinary gradient,
    through autograd, and numbering stops at a conv that no rectifier follows."""
    torch.manual_seed(6)
    module = nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 2, 3), act=nonlinearity(), conv2=nn.Conv2d(2, 2, 3),
                                       relu=nn.ReLU()))
    model = wrap(module, (1, 9, 9))
    layers = trace_layers(model)
    assert layers.numbered() == [] and layers.chain.end == "the model's output"
    layer = layers.layer("relu")
    deconvnet = Deconvnet(model, layers, layer)
    assert not deconvnet.walks and layer.chain_index == 3
    images = torch.randn(2, 1, 9, 9)
    forward = deconvnet.forward(images)
    seeds = strongest(forward.activations, top=1)
    assert (forward.activations[tuple(seeds.T)] > 0).all()
    for seed, projection in zip(seeds.tolist(), deconvnet.project(forward, seeds)):
        assert_close_to(projection, oracle(layers.chain, layer, images[seed[0]], seed))
        assert_close_to(projection, graph_oracle(model, layer, images[seed[0]], seed))


class Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 2, 3), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(2, 2, 3), nn.ReLU()

    def forward(self, x):
        return self.relu2(self.conv2(F.interpolate(self.relu1(self.conv1(x)), scale_factor=2)))


def test_an_op_with_no_rule_is_named():
    model = wrap(Upsampling(), (1, 9, 9))
    layers = trace_layers(model)
    assert layers.layer("relu2").point.unknown == "torch.nn.functional.interpolate"
    with pytest.raises(LayerError, match=r"no rule for torch.nn.functional.interpolate, which runs below relu2; pick a layer below it"):
        Deconvnet(model, layers, layers.layer("relu2"))
    below = Deconvnet(model, layers, layers.layer(1))  # below the op: fine
    assert below.walks


def test_a_non_spatial_layer_is_refused():
    model = wrap(nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3), relu=nn.ReLU(), flat=nn.Flatten(),
                                           fc=nn.Linear(2 * 7 * 7, 3))), (1, 9, 9))
    layers = trace_layers(model)
    # The graph only lists (C, H, W) outputs; a layer built by hand on the linear's output:
    fc = Layer(replace(layers.layer("relu").point, name="fc", module_name="fc", output_shape=(3,)))
    with pytest.raises(LayerError, match=r"fc has output shape \(3,\); projection needs a spatial \(C, H, W\) layer"):
        Deconvnet(model, layers, fc)


def test_a_module_called_twice_in_the_chain():
    torch.manual_seed(4)
    model = LoadedModel("shared", "random", SharedReLU().eval(), None, (2, 21, 21), (0.0,) * 2, (1.0,) * 2, ())
    chain = trace_chain(model)
    assert [s.name for s in chain.steps].count("relu") == 3 and chain.end == "the model's output"
    assert [layer.name for layer in trace_layers(model).numbered()] == ["relu@1", "relu@2", "relu@3"]
    assert_matches_oracle(model, [1, 2, 3], torch.randn(2, 2, 21, 21), top=2)


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
def test_a_residual_graph_matches_the_graph_oracle(rule):
    torch.manual_seed(7)
    model = wrap(Residual(), (2, 12, 12))
    layers = trace_layers(model)
    images = torch.randn(3, 2, 12, 12)
    for spec in ("relu@2", "pool", "relu3", "stem_relu"):
        layer = layers.layer(spec)
        deconvnet = Deconvnet(model, layers, layer, rule=rule)
        assert deconvnet.walks == (spec == "stem_relu" and rule == "deconvnet")
        seeds, projections = project_strongest(deconvnet, images, top=3)
        for seed, projection in zip(seeds.tolist(), projections):
            assert_close_to(projection, graph_oracle(model, layer, images[seed[0]], seed, rule))


def test_resnet18_matches_the_graph_oracle():
    torch.manual_seed(8)
    model = wrap(torchvision.models.resnet18(), (3, 64, 64))
    layers = trace_layers(model)
    images = torch.randn(2, 3, 64, 64)
    for spec, walks in (("layer1.0.relu@1", True), ("layer1", False), ("layer2.0.relu@2", False)):
        layer = layers.layer(spec)
        deconvnet = Deconvnet(model, layers, layer)
        assert deconvnet.walks == walks, spec
        seeds, projections = project_strongest(deconvnet, images, top=2)
        for seed, projection in zip(seeds.tolist(), projections):
            assert_close_to(projection, graph_oracle(model, layer, images[seed[0]], seed))
