"""Chain tracing, layer numbering and lookup, receptive-field geometry (by hand and against gradient support)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from oracles import SharedReLU, wrap
from torch import nn

from vizdeconv import ops
from vizdeconv.errors import LayerError
from vizdeconv.graph import Field
from vizdeconv.layers import trace_chain, trace_layers
from vizdeconv.models import LoadedModel


def test_alexnet_layers_by_hand(alexnet):
    every = trace_layers(alexnet).describe()
    # one row per (C, H, W) module output: the 13 modules of `features`, `features` itself, and the
    # adaptive pool, which at 224² maps 6×6 to 6×6 (the identity, so the same field)
    assert [r["module"] for r in every] == [f"features.{i}" for i in range(13)] + ["features", "avgpool"]
    assert [r["path"] for r in every] == ["walk"] * 13 + ["autograd", "walk"]
    assert every[-1]["rf_size"] == every[-2]["rf_size"] == [195, 195]
    assert all(r["unknown"] is None for r in every)
    rows = [r for r in every if r["layer"] is not None]
    assert [r["layer"] for r in rows] == [1, 2, 3, 4, 5] and {r["type"] for r in rows} == {"ReLU"}
    assert [r["module"] for r in rows] == ["features.1", "features.4", "features.7", "features.9", "features.11"]
    assert [r["output_shape"] for r in rows] == [[64, 55, 55], [192, 27, 27], [384, 13, 13], [256, 13, 13],
                                                 [256, 13, 13]]
    # conv1 11/4 → 11; pool 3/2 → 11 + 2·4 = 19; conv2 5 → 19 + 4·8 = 51; pool → 67; 3×3 convs add 32 each.
    assert [r["rf_size"][0] for r in rows] == [11, 51, 99, 131, 163]
    assert [r["rf_stride"][0] for r in rows] == [4, 8, 16, 16, 16]


def test_field_box_by_hand():
    field = Field(size=(11, 11), stride=(4, 4), offset=(-2, -2))
    assert field.box(0, 0, 224, 224) == (0, 0, 9, 9)
    assert field.box(10, 3, 224, 224) == (38, 10, 49, 21)
    assert field.box(54, 54, 224, 224) == (214, 214, 224, 224)
    assert Field((20, 20), (0, 0), (0, 0)).box(3, 4, 20, 20) == (0, 0, 20, 20)


def gradient_support(chain, layer, y, x):
    """Input pixels a unit depends on: gradient support of a linearised copy (positive weights,
    max-pools as average pools of the same geometry, no rectifiers), computed by autograd."""
    image = torch.ones(1, *chain.input_size, requires_grad=True, dtype=torch.float64)
    h = image
    for step in chain.steps[: layer.chain_index + 1]:
        m = step.module
        if isinstance(m, nn.Conv2d):
            h = F.conv2d(h, m.weight.double().abs() + 0.01, None, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, nn.MaxPool2d):
            h = F.avg_pool2d(h, m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
    (grad,) = torch.autograd.grad(h[0, :, y, x].sum(), image)
    rows = grad[0].abs().sum((0, 2)).nonzero()
    cols = grad[0].abs().sum((0, 1)).nonzero()
    return rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1


@pytest.mark.parametrize("fixture, extra", [("alexnet", ["features.12"]),
                                             ("embedded", [f"features.{i}" for i in (0, 2, 3, 5, 6, 8, 10, 12)])])
def test_field_equals_gradient_support(fixture, extra, request):
    """The numbered layers, and other module outputs of the chain (convs before their ReLU, pools)."""
    model = request.getfixturevalue(fixture)
    layers = trace_layers(model)
    height, width = model.input_size[1:]
    for layer in layers.numbered() + [layers.layer(name) for name in extra]:
        h, w = layer.output_shape[1:]
        for y, x in {(0, 0), (h // 2, w // 3), (h - 1, w - 1), (1, w - 2)}:
            assert layer.field.box(y, x, height, width) == gradient_support(layers.chain, layer, y, x), \
                (layer.label, y, x)


def test_dilated_strided_padded_geometry_against_gradient_support():
    module = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
                           nn.MaxPool2d(2, stride=2, padding=1), nn.Conv2d(2, 2, (3, 5), padding=(0, 2)), nn.ReLU())
    layers = trace_layers(wrap(module, (1, 37, 41)))
    assert len(layers.numbered()) == 2
    for layer in layers.numbered():
        h, w = layer.output_shape[1:]
        for y in range(h):
            for x in range(w):
                assert layer.field.box(y, x, 37, 41) == gradient_support(layers.chain, layer, y, x)


def test_layer_lookup_and_errors(alexnet):
    layers = trace_layers(alexnet)
    assert layers.layer(5).name == "features.11" == layers.layer("5").name
    fifth = layers.layer("features.11")
    assert fifth.number == 5 and fifth.conv == "features.10" and fifth.chain_index == 11
    assert fifth.label == "layer 5 (features.11)" and layers.last() == fifth
    pooled = layers.layer("features.12")
    assert pooled.number is None and pooled.output_shape == (256, 6, 6) and pooled.chain_index == 12
    assert pooled.label == "features.12"
    with pytest.raises(LayerError, match=r"no layer 'features.99'; nearest: features.9, features.8, .*"
                                         r"\(`vizdeconv layers` lists all 15\)"):
        layers.layer("features.99")
    with pytest.raises(LayerError, match=r"no layer '6'; conv layers: 1 = features.1, 2 = features.4, 3 = features.7, "
                                         r"4 = features.9, 5 = features.11 \(numbers stop where the plain chain ends"):
        layers.layer(6)


def test_a_module_called_more_than_once_is_picked_by_call():
    layers = trace_layers(wrap(SharedReLU(), (2, 21, 21)))
    assert [(layer.number, layer.name, layer.conv) for layer in layers.numbered()] == \
        [(1, "relu@1", "conv1"), (2, "relu@2", "conv2"), (3, "relu@3", "conv3")]
    second = layers.layer("relu@2")
    assert second == layers.layer(2) and second.point.call == 1 and second.point.module_name == "relu"
    with pytest.raises(LayerError, match=r"'relu' is called 3 times in one forward pass; pick a call: relu@1, "
                                         r"relu@2, relu@3"):
        layers.layer("relu")
    with pytest.raises(LayerError, match=r"no layer 'relu@4'; nearest: relu@3, relu@2, relu@1 "):
        layers.layer("relu@4")


def test_numbers_stop_at_a_conv_no_rectifier_follows():
    """Once a conv without a rectifier was a numbered layer itself; now numbering ends there."""
    module = nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 2, 3), relu1=nn.ReLU(), conv2=nn.Conv2d(2, 2, 3),
                                       conv3=nn.Conv2d(2, 2, 3), relu3=nn.ReLU()))
    layers = trace_layers(wrap(module, (1, 11, 11)))
    assert [layer.name for layer in layers.numbered()] == ["relu1"]
    assert layers.layer("relu3").number is None and layers.layer("relu3").chain_index == 4
    with pytest.raises(LayerError, match=r"no layer '2'; conv layers: 1 = relu1 "):
        layers.layer(2)


def test_chain_stops_at_a_residual_sum():
    model = LoadedModel("resnet18", "random", torchvision.models.resnet18().eval(), None, (3, 64, 64),
                        (0.0,) * 3, (1.0,) * 3, ())
    chain = trace_chain(model)
    names = [s.name for s in chain.steps]
    assert names[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1"]
    assert names[-1] == "layer1.0.bn2"  # then `out += identity` changes the tensor in place
    assert "'layer1.0.relu'" in chain.end
    # Numbers stop where the chain ends; every other module output is a layer by name.
    layers = trace_layers(model)
    assert [(layer.number, layer.name) for layer in layers.numbered()] == [(1, "relu"), (2, "layer1.0.relu@1")]
    with pytest.raises(LayerError, match=r"no layer '3'; conv layers: 1 = relu, 2 = layer1.0.relu@1 \(numbers stop "
                                         r"where the plain chain ends, at 'layer1.0.relu'"):
        layers.layer(3)
    block = layers.layer("layer1")
    assert block.number is None and block.chain_index is None and block.output_shape == (64, 16, 16)
    assert block.field == Field((43, 43), (4, 4), (-21, -21))  # 7/2 conv, 3/2 pool, four 3×3 convs
    rows = {row["module"]: row for row in layers.describe()}
    assert rows["layer1.0.relu@1"]["path"] == "walk" and rows["layer1"]["path"] == "autograd"
    residual_sum = ops.for_call(torch.Tensor.add_).name  # `out += identity` reaches torch as add_
    assert residual_sum in rows["layer1"]["below"] and residual_sum not in rows["layer1.0.relu@1"]["below"]
    assert rows["layer1.0.relu@1"]["layer"] == 2
    assert layers.last().name == "layer4"


class Doubling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3)

    def forward(self, x):
        return self.conv2(self.conv1(x) * 2)


def test_chain_stops_at_a_functional_op():
    chain = trace_chain(wrap(Doubling(), (1, 9, 9)))
    assert [s.name for s in chain.steps] == ["conv1"]
    assert chain.end.startswith("'conv2'")


def test_slugs_never_collide_with_numbered_layers_or_job_folders():
    model = LoadedModel.from_module(torchvision.models.resnet18(), 64, name="resnet18", device="cpu")
    layers = trace_layers(model)
    assert layers.layer(1).slug == "layer1"  # the stem's ReLU, numbered
    assert layers.layer("layer1").slug == "module-layer1" and layers.layer("layer1.0").slug == "layer1_0"
    assert layers.layer("layer1.0.relu@2").slug == "layer1_0_relu_call2"
