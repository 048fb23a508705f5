"""Any graph: tracing, points and receptive fields (against the gradient support of a linearised copy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from factories import functional
from oracles import linearised, random_model, support_box, wrap
from vizdeconv.errors import LayerError
from vizdeconv.layers import trace_layers


def functional_model(side=20):
    return wrap(functional(), (3, side, side))


def test_points_of_a_functional_graph_by_hand():
    layers = trace_layers(functional_model())
    names = [p.name for p in layers.graph.points]
    assert names == ["conv1", "conv2", "summed", "conv3", "act@1", "pool", "act@2", "joined", "conv4", "six",
                     "conv5", "top"]
    graph = layers.graph
    # conv1 3/1 pad 1: 3 px; conv2 adds 2 and the residual keeps the union: 5 px, offset -2.
    assert graph.point("summed").field.size == (5, 5) and graph.point("summed").field.offset == (-2, -2)
    # conv3 3/2 pad 1 above it: 5 + 2 = 7, stride 2, offset -2 - 1 = -3; the pool 3/2 pad 1 gives the same.
    joined = graph.point("joined").field
    assert (joined.size, joined.stride, joined.offset) == ((7, 7), (2, 2), (-3, -3))
    # conv4 (1, 3) pad (0, 1): columns grow by 2·2; conv5 3 dilated 2, pad 2: both grow by 4·2.
    top = graph.point("top").field
    assert (top.size, top.stride, top.offset) == ((15, 19), (2, 2), (-7, -9))
    assert set(graph.point("top").below) == {"relu", "relu6", "add", "cat", "max_pool2d", "conv2d",
                                              "local_response_norm"}


def test_a_module_called_twice_is_addressed_per_call():
    layers = trace_layers(functional_model())
    assert layers.layer("act@2").point.call == 1 and layers.layer("act@2").output_shape == (8, 10, 10)
    with pytest.raises(LayerError, match=r"^'act' is called 2 times in one forward pass; pick a call: act@1, act@2$"):
        layers.layer("act")


def test_unknown_names_get_the_nearest_valid_ones(request):
    layers = trace_layers(random_model("resnet18", 64))
    with pytest.raises(LayerError) as error:
        layers.layer("layer3.2")
    message = str(error.value)
    assert message.startswith("no layer 'layer3.2'; nearest: ") and "layer3.1" in message and "\n" not in message
    with pytest.raises(LayerError, match=r"no layer '7'; conv layers: 1 = relu, 2 = layer1.0.relu@1"):
        layers.layer(7)
    assert layers.layer("layer1.0.relu@2").name == "layer1.0.relu@2"


FIELD_CASES = [
    ("resnet18", 96, ["maxpool", "layer1.0.relu@2", "layer2.0.downsample.1", "layer2", "layer3.0.conv1"]),
    ("densenet121", 64, ["features.pool0", "features.denseblock1.denselayer2", "features.transition1"]),
    ("mobilenet_v2", 64, ["features.1", "features.3", "features.5.conv.1"]),
    ("googlenet", 64, ["maxpool2", "inception3a"]),
]


@pytest.mark.parametrize("name, side, points", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_receptive_fields_are_the_exact_support_of_a_linearised_copy(name, side, points):
    model = random_model(name, side)
    layers = trace_layers(model)
    copied = linearised(model.module)
    for point_name in points:
        point = layers.graph.point(point_name)
        h, w = point.output_shape[1:]
        for y, x in {(0, 0), (h // 2, w // 3), (h - 1, w - 1)}:
            expected = support_box(copied, model.input_size, point.module_name, point.call, y, x)
            assert point.field.box(y, x, side, side) == expected, (point_name, y, x)


def test_receptive_fields_of_the_functional_graph_every_unit():
    model = functional_model(side=13)
    layers = trace_layers(model)
    copied = linearised(model.module)
    for point in layers.graph.points:
        h, w = point.output_shape[1:]
        for y in range(h):
            for x in range(w):
                expected = support_box(copied, model.input_size, point.module_name, point.call, y, x)
                assert point.field.box(y, x, 13, 13) == expected, (point.name, y, x)


def test_a_squeeze_excitation_gate_makes_the_field_the_whole_image():
    layers = trace_layers(random_model("efficientnet_b0", 64))
    assert not layers.graph.point("features.1.0.block.0").field.whole_image
    assert layers.graph.point("features.1.0.block.2").field.whole_image  # after the gate multiplies


class Fussy(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if x.shape[-1] != 17:
            raise ValueError("expected 17 columns")
        return x


def test_a_model_that_cannot_be_traced_gives_one_line():
    with pytest.raises(LayerError, match=r"^cannot trace m: its forward pass on a \(1, 1, 8, 8\) input raised "
                                         r"ValueError: expected 17 columns$"):
        trace_layers(wrap(Fussy(), (1, 8, 8)))


class Around(nn.Module):
    """conv → ``mix`` → 1×1 conv → ReLU, on 8 channels of an 8 × 8 map (as many channels as rows)."""

    def __init__(self, mix):
        super().__init__()
        self.c1, self.c2, self.r = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 3, 1), nn.ReLU()
        self.register_buffer("w", torch.rand(8, 8, 1, 8) + 0.1)
        self.register_buffer("m", torch.rand(8, 8) + 0.1)
        self.register_buffer("order", torch.randperm(8))
        self.mix = mix

    def forward(self, x):
        return self.r(self.c2(self.mix(self, self.c1(x))))


def _write_through_view(module, h):
    out = h.clone()
    out[:, :, 3:] += h[:, :, :-3]
    return out


MIXES = {
    "a gate from a strip conv": lambda m, h: h * torch.sigmoid(F.conv2d(h, m.w)),
    "a map plus its transpose": lambda m, h: h + h.transpose(2, 3),
    "layer norm over (C, H, W)": lambda m, h: F.layer_norm(h, h.shape[1:]),
    "reflect padding": lambda m, h: F.avg_pool2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), 3, 1),
    "matmul with the map on the right": lambda m, h: torch.matmul(m.m, h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
    "a write through a view": _write_through_view,
    "rows reordered by an index": lambda m, h: h[:, :, m.order],
    "one row broadcast (channels = rows)": lambda m, h: h + h[:, :, 0].unsqueeze(2),
}


@pytest.mark.parametrize("mix", MIXES.values(), ids=MIXES.keys())
def test_fields_contain_the_support_where_positions_mix(mix):
    torch.manual_seed(0)
    model = wrap(Around(mix), (2, 8, 8))
    point = trace_layers(model).graph.point("r")
    copied = linearised(model.module)
    for y, x in [(0, 0), (0, 7), (4, 4), (7, 7)]:
        y0, x0, y1, x1 = support_box(copied, model.input_size, "r", 0, y, x)
        b0, c0, b1, c1 = point.field.box(y, x, 8, 8)
        assert b0 <= y0 and c0 <= x0 and b1 >= y1 and c1 >= x1, (y, x)


def test_a_module_without_a_map_is_explained():
    layers = trace_layers(functional_model())
    with pytest.raises(LayerError, match=r"^module 'fc' has no \(C, H, W\) output to project from; "):
        layers.layer("fc")
