"""Chain tracing, layer numbering and receptive-field geometry (by hand and against gradient support)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vizdeconv.errors import LayerError
from vizdeconv.layers import Field, describe, trace_chain
from vizdeconv.models import LoadedModel


def wrap(module, input_size):
    return LoadedModel("m", "hand", module.eval(), None, input_size, (0.0,) * input_size[0], (1.0,) * input_size[0], ())


def test_alexnet_layers_by_hand(alexnet):
    rows = describe(trace_chain(alexnet))
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
    for step in chain.steps[: layer.step.index + 1]:
        m = step.module
        if isinstance(m, nn.Conv2d):
            h = F.conv2d(h, m.weight.double().abs() + 0.01, None, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, nn.MaxPool2d):
            h = F.avg_pool2d(h, m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
    (grad,) = torch.autograd.grad(h[0, :, y, x].sum(), image)
    rows = grad[0].abs().sum((0, 2)).nonzero()
    cols = grad[0].abs().sum((0, 1)).nonzero()
    return rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1


@pytest.mark.parametrize("fixture", ["alexnet", "embedded"])
def test_field_equals_gradient_support(fixture, request):
    model = request.getfixturevalue(fixture)
    chain = trace_chain(model)
    height, width = model.input_size[1:]
    for layer in chain.layers():
        h, w = layer.step.output_shape[1:]
        for y, x in {(0, 0), (h // 2, w // 3), (h - 1, w - 1), (1, w - 2)}:
            assert layer.field.box(y, x, height, width) == gradient_support(chain, layer, y, x), (layer.label, y, x)


def test_dilated_strided_padded_geometry_against_gradient_support():
    module = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
                           nn.MaxPool2d(2, stride=2, padding=1), nn.Conv2d(2, 2, (3, 5), padding=(0, 2)), nn.ReLU())
    chain = trace_chain(wrap(module, (1, 37, 41)))
    for layer in chain.layers():
        h, w = layer.step.output_shape[1:]
        for y in range(h):
            for x in range(w):
                assert layer.field.box(y, x, 37, 41) == gradient_support(chain, layer, y, x)


def test_layer_lookup_and_errors(alexnet):
    chain = trace_chain(alexnet)
    assert chain.layer(5).step.name == "features.11" == chain.layer("5").step.name
    assert chain.layer("features.11").number == 5
    pooled = chain.layer("features.12")
    assert pooled.number is None and pooled.step.output_shape == (256, 6, 6)
    with pytest.raises(LayerError, match=r"no layer 'features.99'; conv layers: 1 = features.1, 2 = features.4"):
        chain.layer("features.99")
    with pytest.raises(LayerError, match="no layer '6'"):
        chain.layer(6)


def test_chain_stops_at_a_residual_sum():
    chain = trace_chain(LoadedModel("resnet18", "random", torchvision.models.resnet18().eval(), None, (3, 64, 64),
                                    (0.0,) * 3, (1.0,) * 3, ()))
    names = [s.name for s in chain.steps]
    assert names[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1"]
    assert names[-1] == "layer1.0.bn2"  # then `out += identity` changes the tensor in place
    assert "'layer1.0.relu'" in chain.end


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
