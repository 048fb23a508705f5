"""Independent expectations shared by the test files (import them with ``from oracles import …``).

The deconvnet is backprop with each rectifier's backward replaced (Springenberg et al. 2014); the
oracles here build that with plain autograd, without vizdeconv's hooks, switches or rules:

- ``oracle``: down the model's plain chain of modules, one module call at a time;
- ``rule_oracle``: on any model, with torch's rectifier functions monkeypatched (not a
  ``TorchFunctionMode``), seeded at one call of one module;
- ``support_box``: receptive fields as the gradient support of a ``linearised`` copy (positive
  weights, max-pools as average pools, rectifiers as identities).
"""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import Approximation, OcclusionSpec, parse_target


class Rectify(torch.autograd.Function):
    """``clamp(x, 0, upper)`` going up; going down, by rule: ``deconvnet`` relu(R) (Zeiler & Fergus),
    ``guided`` 1[0<f<upper]·relu(R), ``gradient`` 1[0<f<upper]·R."""

    @staticmethod
    def forward(ctx, x, upper, rule):
        ctx.save_for_backward((x > 0) if upper is None else (x > 0) & (x < upper))
        ctx.rule = rule
        return x.clamp(min=0) if upper is None else x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        if ctx.rule == "deconvnet":
            return grad.clamp(min=0), None, None
        if ctx.rule == "guided":
            return grad.clamp(min=0) * mask, None, None
        return grad * mask, None, None


def rectify(module: nn.Module, h: torch.Tensor, rule: str) -> torch.Tensor:
    return Rectify.apply(h, 6.0 if isinstance(module, nn.ReLU6) else None, rule)


def oracle(chain, layer, image, seed, rule: str = "deconvnet"):
    """Gradient of the seed activation w.r.t. the input, rectifiers' backward swapped by ``rule``,
    times the seed's value, down the chain (``layer.chain_index`` must be set).

    ``seed`` is ``(image, channel, y, x)``; ``image`` is the ``(C, H, W)`` image it belongs to.
    Local response normalisation passes the signal unchanged (as in the paper) except with the
    gradient rule; every other module runs with its own autograd backward.
    """
    assert layer.chain_index is not None, f"{layer.label} is not on the chain"
    _, channel, y, x = seed
    inp = image[None].clone().requires_grad_(True)
    h = inp
    for step in chain.steps[: layer.chain_index + 1]:
        if isinstance(step.module, (nn.ReLU, nn.ReLU6)):
            h = rectify(step.module, h, rule)
        elif isinstance(step.module, nn.LocalResponseNorm) and rule != "gradient":
            h = h + (step.module(h) - h).detach()
        else:
            h = step.module(h)
    value = h[0, channel, y, x]
    (grad,) = torch.autograd.grad(value, inp)
    return grad[0] * value.detach()


@contextlib.contextmanager
def patched_rectifiers(rule: str):
    """Every ReLU and ReLU6 (modules, functional, tensor methods, in-place forms) uses ``rule`` going down.

    In-place forms return a new tensor: the models under test use the returned value.
    """
    if rule == "gradient":
        yield
        return

    def relu(x, *args, **kwargs):
        return Rectify.apply(x, None, rule)

    def hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False):
        assert (min_val, max_val) == (0.0, 6.0), "only ReLU6 is expected in these models"
        return Rectify.apply(x, 6.0, rule)

    def relu6(x, inplace=False):
        return Rectify.apply(x, 6.0, rule)

    def lrn(x, *args, **kwargs):
        return x + (original_lrn(x, *args, **kwargs) - x).detach()

    original_lrn = F.local_response_norm
    with contextlib.ExitStack() as stack:
        for target, name, replacement in [(F, "relu", relu), (F, "relu_", relu), (torch, "relu", relu),
                                          (torch, "relu_", relu), (torch.Tensor, "relu", relu),
                                          (torch.Tensor, "relu_", relu), (F, "hardtanh", hardtanh),
                                          (F, "relu6", relu6), (F, "local_response_norm", lrn)]:
            stack.enter_context(mock.patch.object(target, name, replacement))
        yield


def rule_oracle(module: nn.Module, images: torch.Tensor, module_name: str, call: int, seeds, rule: str) -> torch.Tensor:
    """Projections of ``seeds`` (rows ``image, channel, y, x``) of the ``call``-th output of ``module_name``:
    autograd through the real model with patched rectifiers, one backward pass per seed, times the
    seed's value. Each image runs forward alone, as in vizdeconv, so that both see the same float
    values (kernels for other batch sizes round differently, which can flip a switch or a mask)."""
    outputs = []
    target = module.get_submodule(module_name)
    handle = target.register_forward_hook(lambda m, i, o: outputs.append(o.clone()))
    inputs = [image[None].clone().requires_grad_(True) for image in images]
    try:
        with patched_rectifiers(rule):
            for image in inputs:
                module(image)
    finally:
        handle.remove()
    calls = len(outputs) // len(inputs)
    projections = []
    for image, channel, y, x in seeds:
        value = outputs[image * calls + call][0, channel, y, x]
        (grad,) = torch.autograd.grad(value, inputs[image], retain_graph=True)
        projections.append(grad[0] * value.detach())
    return torch.stack(projections)


def linearised(module: nn.Module) -> nn.Module:
    """A copy with every weight positive, BatchNorm as a positive scale, for support measurements."""
    copied = copy.deepcopy(module).double()
    with torch.no_grad():
        for m in copied.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_().add_(0.01)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                if m.weight is not None:
                    m.weight.fill_(1.0)
    return copied


@contextlib.contextmanager
def linear_ops():
    """Rectifiers as identities, max-pools as average pools of the same windows: positive paths only."""
    def identity(x, *args, **kwargs):
        return x

    def average(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        assert dilation in (1, (1, 1))
        return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)

    with contextlib.ExitStack() as stack:
        for target, name, replacement in [(F, "relu", identity), (torch, "relu", identity),
                                          (torch, "relu_", identity), (torch.Tensor, "relu", identity),
                                          (torch.Tensor, "relu_", identity), (F, "hardtanh", identity),
                                          (F, "relu6", identity), (F, "max_pool2d", average)]:
            stack.enter_context(mock.patch.object(target, name, replacement))
        yield


def support_box(copied: nn.Module, input_size, module_name: str, call: int, y: int, x: int):
    """``(y0, x0, y1, x1)``: the input pixels that the units at ``(y, x)`` of a module output depend on,
    in a ``linearised`` copy of the model (end exclusive)."""
    outputs = []
    target = copied.get_submodule(module_name)
    handle = target.register_forward_hook(lambda m, i, o: outputs.append(o))
    inputs = torch.ones(1, *input_size, dtype=torch.float64, requires_grad=True)
    try:
        with linear_ops():
            copied(inputs)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(outputs[call][0, :, y, x].sum(), inputs)
    rows = grad[0].abs().sum((0, 2)).nonzero()
    cols = grad[0].abs().sum((0, 1)).nonzero()
    return rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1


def random_model(name: str, side: int, seed: int = 0):
    """torchvision's ``name`` with random weights and random BatchNorm statistics, as a LoadedModel."""
    import torchvision

    torch.manual_seed(seed)
    module = torchvision.models.get_model(name, weights=None).eval()
    return wrap(randomise_batchnorm(module), (3, side, side), name=name)


def randomise_batchnorm(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.2, 0.2)
    return module


def graph_oracle(model: LoadedModel, layer, image: torch.Tensor, seed, rule: str = "deconvnet") -> torch.Tensor:
    """``rule_oracle`` for one seed ``(image, channel, y, x)`` of ``layer`` on its ``(C, H, W)`` image."""
    return rule_oracle(model.module, image[None], layer.point.module_name, layer.point.call, [(0, *seed[1:])], rule)[0]


def point_output(model: LoadedModel, layer, images: torch.Tensor) -> torch.Tensor:
    """The output of one call of one module (``layer.point``) for ``images``: the whole model runs,
    a forward hook of its own keeps a copy."""
    outputs = []
    handle = model.module.get_submodule(layer.point.module_name).register_forward_hook(
        lambda _, inputs, output: outputs.append(output.clone()))
    try:
        with torch.no_grad():
            model.module(images)
    finally:
        handle.remove()
    return outputs[layer.point.call]


def wrap(module: nn.Module, input_size, categories=(), name: str = "m") -> LoadedModel:
    """A hand-made module as a loaded model: eval mode, identity normalisation."""
    channels = input_size[0]
    return LoadedModel.from_module(module, input_size, mean=(0.0,) * channels, std=(1.0,) * channels,
                                   categories=categories, name=name, weights="hand", device="cpu")


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


class SharedReLU(nn.Module):
    """One ReLU module called after every conv, as hand-written models often do."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 3, 3)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv3(self.pool(self.relu(self.conv2(self.relu(self.conv1(x)))))))


class Residual(nn.Module):
    """A small graph the plain chain cannot cover: stem, a residual block with a shared ReLU module
    (``relu@1``, ``relu@2``), an overlapping max-pool, a head."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.stem_relu = nn.ReLU()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.conv3 = nn.Conv2d(4, 5, 3)
        self.relu3 = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, classes))

    def forward(self, x):
        x = self.stem_relu(self.stem(x))
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += x
        out = self.relu(out)
        return self.head(self.relu3(self.conv3(self.pool(out))))


def occlusion_spec(model: LoadedModel, layer, *, size: int, stride: int, fill, target="auto",
                   approximate: Approximation | None = None) -> OcclusionSpec:
    """The spec ``occlude`` takes, with an explicit per-channel fill (a tensor or a sequence);
    ``approximate``: Krypton's approximations (None: exact maps)."""
    values = tuple(float(v) for v in torch.as_tensor(fill, dtype=torch.float32))
    return OcclusionSpec(model.name, layer.name, size, stride, values, parse_target(target, model),
                         approximate=approximate)


def occlusion_loop(model, layer, image, size, stride, fill, target, channel):
    """Occlusion maps (p(target), top class, ``channel``'s total at ``layer``) by full forward passes of
    occluded copies, squares pasted by explicit loops, the layer read by a forward hook of its own
    (``point_output``), for any layer of any graph."""
    _, height, width = image.shape
    ys, xs = range(0, height - size + 1, stride), range(0, width - size + 1, stride)
    occluded = image.repeat(len(ys) * len(xs), 1, 1, 1)
    for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
        for c in range(image.shape[0]):
            for row in range(y, y + size):
                occluded[i, c, row, x:x + size] = fill[c]
    prob, top, total = [], [], []
    for batch in occluded.split(32):
        with torch.no_grad():  # a fresh copy per pass: a model may write into its input
            probabilities = model.module(batch.clone()).softmax(1)
        prob.append(probabilities[:, target])
        top.append(probabilities.argmax(1))
        total.append(point_output(model, layer, batch.clone())[:, channel].sum((1, 2)))
    return tuple(torch.cat(values).view(len(ys), len(xs)).numpy() for values in (prob, top, total))
