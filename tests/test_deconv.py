"""The deconvnet against independent expectations: Springenberg's autograd oracle and hand-computed nets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vizdeconv.deconv import check_invertible, project, strongest
from vizdeconv.errors import LayerError
from vizdeconv.layers import trace_chain
from vizdeconv.models import LoadedModel
from vizdeconv.switches import SwitchRecorder


class DeconvReLU(torch.autograd.Function):
    """ReLU forward, but backward passes relu(grad_out): Springenberg et al.'s deconvnet rule."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def oracle(chain, layer, image, seed):
    """Gradient of the seed activation w.r.t. the input, ReLU backward swapped, times the seed's value."""
    _, channel, y, x = seed
    inp = image[None].clone().requires_grad_(True)
    h = inp
    for step in chain.steps[: layer.step.index + 1]:
        if isinstance(step.module, nn.ReLU):
            h = DeconvReLU.apply(h)
        elif not isinstance(step.module, (nn.LocalResponseNorm, nn.Dropout)):
            h = step.module(h)
    value = h[0, channel, y, x]
    (grad,) = torch.autograd.grad(value, inp)
    return grad[0] * value.detach()


def project_strongest(model, chain, layer, images, top):
    with SwitchRecorder(chain, layer) as recorder:
        forward = recorder.forward(images)
    seeds = strongest(forward.activations, top=top)
    return seeds, project(chain, layer, forward, seeds)


def assert_matches_oracle(model: LoadedModel, layer_numbers, images, top=2):
    chain = trace_chain(model)
    for number in layer_numbers:
        layer = chain.layer(number)
        seeds, projections = project_strongest(model, chain, layer, images, top)
        assert len(seeds) == top * len(images)
        for seed, projection in zip(seeds.tolist(), projections):
            expected = oracle(chain, layer, images[seed[0]], seed)
            assert expected.abs().max() > 0
            torch.testing.assert_close(projection, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_alexnet_matches_oracle(alexnet):
    torch.manual_seed(1)
    assert_matches_oracle(alexnet, [1, 2, 3, 4, 5], torch.randn(2, 3, 224, 224))


def test_vgg11_bn_matches_oracle(vgg11_bn):
    torch.manual_seed(2)
    assert_matches_oracle(vgg11_bn, [2, 5, 8], torch.randn(2, 3, 224, 224), top=1)


def test_embedded_matches_oracle(embedded):
    torch.manual_seed(3)
    assert_matches_oracle(embedded, [1, 2, 3, 4, 5], torch.randn(3, 1, 28, 28), top=3)


class Tiny(nn.Module):
    """conv 2×2 (weights 1, 2, 3, 4; bias 5) → ReLU → overlapping max-pool 2/1 → conv 2×2 of ones → ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 2)
        self.conv1.weight.data = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        self.conv1.bias.data = torch.tensor([5.0])
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2, stride=1)
        self.conv2 = nn.Conv2d(1, 1, 2, bias=False)
        self.conv2.weight.data.fill_(1.0)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))


def test_hand_computed_projection_through_overlapping_pool():
    model = LoadedModel("tiny", "hand", Tiny().eval(), None, (1, 4, 4), (0.0,), (1.0,), ())
    chain = trace_chain(model)
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 1:3, 1:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # conv1 output (3×3) peaks at its centre: 1·1 + 4·1 + 5 = 10, so all four 2×2 pool windows pick it.
    pool = chain.layer("pool")
    with SwitchRecorder(chain, pool) as recorder:
        forward = recorder.forward(image)
    assert forward.activations[0, 0].tolist() == [[10.0, 10.0], [10.0, 10.0]]
    assert forward.switches[2][0, 0].tolist() == [[4, 4], [4, 4]]
    filter_at_centre = torch.zeros(1, 4, 4)
    filter_at_centre[0, 1:3, 1:3] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # One pooled unit (10) unpools onto conv1 unit (1, 1); conv1ᵀ spreads 10 × the filter, no bias.
    projection = project(chain, pool, forward, torch.tensor([[0, 0, 0, 1]]))
    torch.testing.assert_close(projection[0], 10 * filter_at_centre, rtol=0, atol=0)
    # Layer 2 = relu(conv2) = 40. conv2ᵀ puts 40 on all four pooled units; all four switches point
    # to conv1 unit (1, 1), where they add up to 160.
    layer2 = chain.layer(2)
    with SwitchRecorder(chain, layer2) as recorder:
        forward = recorder.forward(image)
    assert forward.activations.item() == 40.0
    projection = project(chain, layer2, forward, torch.tensor([[0, 0, 0, 0]]))
    torch.testing.assert_close(projection[0], 160 * filter_at_centre, rtol=0, atol=0)


def test_relu_rectifies_the_signal_not_the_forward_mask():
    conv1 = nn.Conv2d(1, 1, 1, bias=False)
    conv1.weight.data.fill_(-1.0)  # every forward activation below is negative → ReLU forward mask all zero
    conv2 = nn.Conv2d(1, 1, 1, bias=False)
    conv2.weight.data.fill_(2.0)
    module = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU()).eval()
    model = LoadedModel("m", "hand", module, None, (1, 2, 2), (0.0,), (1.0,), ())
    chain = trace_chain(model)
    layer = chain.layer("2")
    with SwitchRecorder(chain, layer) as recorder:
        forward = recorder.forward(torch.ones(1, 1, 2, 2))
    forward.activations = torch.full_like(forward.activations, 3.0)  # pretend a positive seed
    projection = project(chain, layer, forward, torch.tensor([[0, 0, 1, 0]]))
    # down: relu(3)=3 → conv2ᵀ: 6 → relu(6)=6 (signal positive, though the forward mask is 0) → conv1ᵀ: -6
    expected = torch.tensor([[[0.0, 0.0], [-6.0, 0.0]]])
    torch.testing.assert_close(projection[0], expected)


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


def test_unknown_module_is_named():
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.ReLU()).eval()
    model = LoadedModel("m", "hand", module, None, (1, 9, 9), (0.0,), (1.0,), ())
    chain = trace_chain(model)
    with pytest.raises(LayerError, match=r"'1' \(Tanh\)"):
        check_invertible(chain, chain.layer(2))


class SharedReLU(nn.Module):
    """One ReLU module called after every conv, as hand-written models often do."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 3, 3)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv3(self.pool(self.relu(self.conv2(self.relu(self.conv1(x)))))))


def test_a_module_called_twice_in_the_chain():
    torch.manual_seed(4)
    model = LoadedModel("shared", "random", SharedReLU().eval(), None, (2, 21, 21), (0.0,) * 2, (1.0,) * 2, ())
    chain = trace_chain(model)
    assert [s.name for s in chain.steps].count("relu") == 3 and chain.end == "the model's output"
    assert_matches_oracle(model, [1, 2, 3], torch.randn(2, 2, 21, 21), top=2)
