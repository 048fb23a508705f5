"""Projections through any graph equal an independent oracle: autograd on the real model with every
rectifier monkeypatched to the rule (Springenberg et al. 2014), times the seed's value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from factories import functional
from oracles import random_model, rule_oracle, wrap
from vizdeconv.deconvnet import Deconvnet, strongest
from vizdeconv.errors import VizDeconvError
from vizdeconv.layers import trace_layers
from vizdeconv.rules import apply_rules


def assert_matches_oracle(model, point_names, images, *, rules=("deconvnet", "guided", "gradient"), top=2):
    layers = trace_layers(model)
    for name in point_names:
        layer = layers.layer(name)
        for rule in rules:
            deconvnet = Deconvnet(model, layers, layer, rule=rule)
            forward = deconvnet.forward(images)
            seeds = strongest(forward.activations, top=top)
            projections = deconvnet.project(forward, seeds)
            oracle = rule_oracle(model.module, images, layer.point.module_name, layer.point.call, seeds.tolist(), rule)
            for projection, expected in zip(projections, oracle):
                assert expected.abs().max() > 0, (name, rule)
                torch.testing.assert_close(projection, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(),
                                           msg=f"{model.name} {name} {rule}")


GRAPHS = [
    ("resnet18", ["layer1.0.relu@2", "layer3"]),
    ("resnet50", ["layer2.1.relu@3", "layer4"]),
    ("densenet121", ["features.denseblock2", "features.transition3.conv"]),
    ("googlenet", ["inception3b", "inception4c.branch3"]),
    ("mobilenet_v3_small", ["features.2", "features.9"]),
    ("efficientnet_b0", ["features.3", "features.6.0"]),
    ("convnext_tiny", ["features.1", "features.5.3"]),
]


@pytest.mark.parametrize("name, points", GRAPHS, ids=[g[0] for g in GRAPHS])
def test_torchvision_graphs_match_the_oracle(name, points):
    model = random_model(name, 64)
    torch.manual_seed(1)
    assert_matches_oracle(model, points, torch.randn(2, 3, 64, 64))


def test_functional_rectifiers_residuals_and_shared_modules_match_the_oracle():
    model = wrap(functional(), (3, 16, 16))
    torch.manual_seed(0)
    images = torch.randn(3, 3, 16, 16)
    assert_matches_oracle(model, ["summed", "act@1", "act@2", "six", "top"], images, top=3)


def test_efficientnet_lite0_real_weights_match_the_oracle():
    from vizdeconv.models import load_model

    model = load_model("efficientnet_lite0", device="cpu")
    torch.manual_seed(2)
    assert_matches_oracle(model, ["_blocks.2", "_blocks.9"], torch.randn(1, 3, 224, 224), top=1)


@pytest.mark.parametrize("fixture, numbers", [("alexnet", [1, 3, 5]), ("embedded", [2, 5]), ("vgg11_bn", [2, 6])])
def test_the_general_path_equals_the_chain_walk(fixture, numbers, request):
    model = request.getfixturevalue(fixture)
    layers = trace_layers(model)
    torch.manual_seed(3)
    images = torch.randn(2, *model.input_size)
    for number in numbers:
        walking = Deconvnet(model, layers, layers.layer(number))
        assert walking.walks
        general = Deconvnet(model, layers, layers.layer(number))
        general.walks = False
        forward = walking.forward(images)
        seeds = strongest(forward.activations, top=4)
        expected = walking.project(forward, seeds)
        torch.testing.assert_close(general.project(general.forward(images), seeds), expected, rtol=1e-4,
                                   atol=1e-5 * expected.abs().max().item())


def test_rules_leave_the_model_and_torch_as_they_were():
    model = random_model("resnet18", 32)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    with apply_rules("deconvnet"):
        model.module(x)
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    y = torch.randn(5, requires_grad=True)
    (grad,) = torch.autograd.grad(F.relu(y).sum() + torch.relu(-y).sum(), y)
    assert torch.equal(grad, (y > 0).float() - (y < 0).float())  # plain ReLU backward again outside the block


def test_an_unknown_rule_is_one_line():
    with pytest.raises(VizDeconvError, match=r"^unknown rule 'lrp'; expected one of deconvnet, guided, gradient$"):
        apply_rules("lrp")


def test_hardtanh_is_a_rectifier_only_from_zero():
    y = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    signal = torch.tensor([1.0, -1.0, 1.0])
    with apply_rules("deconvnet"):
        clipped = F.hardtanh(y, 0.0, 1.0)  # a clipped ReLU: relu(R)
        plain = F.hardtanh(y)  # -1..1: its own gradient, 1 inside, 0 outside
        keyword = torch.relu(input=y)
    assert torch.equal(clipped, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(torch.autograd.grad(clipped, y, signal)[0], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(torch.autograd.grad(plain, y, signal)[0], torch.tensor([0.0, -1.0, 0.0]))
    assert torch.equal(torch.autograd.grad(keyword, y, signal)[0], torch.tensor([1.0, 0.0, 1.0]))
