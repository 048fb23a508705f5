"""The plain chain of modules a deconvnet can walk back through, its layers and their geometry.

"Layer N" is the rectified output of the N-th convolution (paper numbering: layer 5 = conv5's
ReLU). The chain is found by watching one forward pass: it runs from the input through every
leaf module whose input is, unchanged, the previous module's output (a ``torch.flatten`` in
between counts as an implicit step), and ends where the model does something else (a residual
sum, another functional op).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from vizdeconv.errors import LayerError
from vizdeconv.models import LoadedModel

RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU)
POINTWISE = RECTIFIERS + (nn.BatchNorm2d, nn.LocalResponseNorm, nn.Dropout, nn.Identity)  # spatially, in eval
LOCAL_OPS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class Step:
    """One module call of the chain, with the shapes it saw (batch dimension left out)."""

    index: int
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class Field:
    """Receptive field: unit ``(y, x)`` sees input rows ``y*stride + offset`` … ``+ size - 1`` (columns alike).

    ``stride`` is the jump between neighbouring units in input pixels; ``offset`` can be negative
    (the field starts in the padding). A global op (adaptive pooling, flatten) sees everything:
    stride 0, the whole image.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]

    def window(self, y: int, x: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``, end exclusive, unclipped: it may reach past the image."""
        y0 = y * self.stride[0] + self.offset[0]
        x0 = x * self.stride[1] + self.offset[1]
        return y0, x0, y0 + self.size[0], x0 + self.size[1]

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``window`` clipped to a ``height`` × ``width`` image."""
        y0, x0, y1, x1 = self.window(y, x)
        return max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)


@dataclass(frozen=True)
class Layer:
    """A place to project from: a step of the chain, with its paper number if it is a conv layer."""

    number: int | None
    step: Step
    field: Field
    conv: Step | None = None

    @property
    def label(self) -> str:
        return f"layer {self.number} ({self.step.name})" if self.number else self.step.name


@dataclass(frozen=True)
class Chain:
    """The model's plain chain of module calls from the input, and why it ends where it does."""

    steps: tuple[Step, ...]
    end: str
    input_size: tuple[int, int, int]

    def layers(self) -> list[Layer]:
        """The numbered conv layers: each conv's first rectifier, or the conv itself if none follows."""
        convs = [s.index for s in self.steps if isinstance(s.module, nn.Conv2d)]
        layers = []
        for number, (start, stop) in enumerate(zip(convs, convs[1:] + [len(self.steps)]), start=1):
            rectifier = next((i for i in range(start + 1, stop) if isinstance(self.steps[i].module, RECTIFIERS)), start)
            layers.append(Layer(number, self.steps[rectifier], self.field(rectifier), self.steps[start]))
        return layers

    def layer(self, spec: int | str) -> Layer:
        """Resolve ``5``, ``"5"`` or a module name such as ``"features.8"``.

        Raises:
            LayerError: listing the valid numbers and module names.
        """
        layers = self.layers()
        if isinstance(spec, int) or str(spec).isdigit():
            if 1 <= int(spec) <= len(layers):
                return layers[int(spec) - 1]
        else:
            for layer in layers:
                if layer.step.name == spec:
                    return layer
            for step in self.steps:
                if step.name == spec:
                    return Layer(None, step, self.field(step.index))
        numbered = ", ".join(f"{layer.number} = {layer.step.name}" for layer in layers) or "none"
        names = f"{self.steps[0].name} … {self.steps[-1].name}" if self.steps else "none"
        raise LayerError(f"no layer {str(spec)!r}; conv layers: {numbered}; or a module of the plain chain: {names} "
                         f"(the chain ends at {self.end})")

    def field(self, index: int) -> Field:
        """Receptive field of the output of step ``index`` in input pixels."""
        size, stride, offset = [1, 1], [1, 1], [0, 0]
        for step in self.steps[: index + 1]:
            module = step.module
            if isinstance(module, LOCAL_OPS):
                for axis in (0, 1):
                    kernel, step_stride, padding, dilation = local_geometry(module, axis)
                    size[axis] += dilation * (kernel - 1) * stride[axis]
                    offset[axis] -= padding * stride[axis]
                    stride[axis] *= step_stride
            elif not isinstance(module, POINTWISE):
                return Field(self.input_size[1:], (0, 0), (0, 0))
        return Field(tuple(size), tuple(stride), tuple(offset))


def local_geometry(module: nn.Module, axis: int) -> tuple[int, int, int, int]:
    """Kernel, stride, padding and dilation of a conv or pooling layer along one axis."""
    def pick(value):
        return value[axis] if isinstance(value, tuple) else value

    kernel, stride = pick(module.kernel_size), pick(module.stride)
    dilation = pick(getattr(module, "dilation", 1))
    padding = module.padding
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = dilation * (kernel - 1) // 2
    return kernel, stride, pick(padding), dilation


def trace_chain(model: LoadedModel) -> Chain:
    """Run one forward pass on noise and record the plain chain of leaf-module calls.

    A call joins the chain when its only input is the very tensor the previous call returned, at
    the same version (an in-place ``out += identity`` in between would change the version).
    """
    names = {module: name for name, module in model.module.named_modules()}
    leaves = [module for module in model.module.modules() if not any(True for _ in module.children())]
    calls = []

    def before(module, inputs):
        tensor = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor) else None
        calls.append([module, tensor, tensor._version if tensor is not None else None, None, None])

    def after(module, inputs, output):
        record = next(c for c in reversed(calls) if c[0] is module and c[3] is None)
        record[3:] = [output, output._version] if isinstance(output, torch.Tensor) else [False, None]

    handles = [m.register_forward_pre_hook(before) for m in leaves] + [m.register_forward_hook(after) for m in leaves]
    x = torch.randn(1, *model.input_size, device=model.device)
    try:
        with torch.no_grad():
            output = model.module(x)
    finally:
        for handle in handles:
            handle.remove()

    steps = []
    previous, version, previous_name = x, x._version, "the input"
    end = "the model's output"
    for module, tensor, tensor_version, out, out_version in calls:
        name = names.get(module, type(module).__name__)
        if _is_flattened(tensor, tensor_version, previous, version):
            # torch.flatten(x, 1) in the model's forward (torchvision's AlexNet and VGG): an implicit step.
            steps.append(Step(len(steps), "(flatten)", nn.Flatten(), tuple(previous.shape[1:]), tuple(tensor.shape[1:])))
            previous = tensor
        if tensor is not previous or tensor_version != version or not isinstance(out, torch.Tensor):
            end = f"{name!r}, whose input is not the plain output of {previous_name}"
            break
        steps.append(Step(len(steps), name, module, tuple(tensor.shape[1:]), tuple(out.shape[1:])))
        previous, version, previous_name = out, out_version, repr(name)
    else:
        if previous is not output:
            end = f"{previous_name}, after which the model does more"
    return Chain(tuple(steps), end, model.input_size)


def _is_flattened(tensor, tensor_version, previous, version) -> bool:
    return (tensor is not None and tensor is not previous and tensor_version == version and tensor.dim() == 2
            and previous.dim() > 2 and torch.equal(tensor, previous.flatten(1)))


def describe(chain: Chain) -> list[dict]:
    """One row per numbered layer, for ``vizdeconv layers`` (JSON-ready)."""
    rows = []
    for layer in chain.layers():
        conv = layer.conv.module
        rows.append({
            "layer": layer.number,
            "module": layer.step.name,
            "conv": layer.conv.name,
            "type": f"{type(layer.step.module).__name__} of Conv2d {conv.in_channels}→{conv.out_channels} "
                    f"{'×'.join(map(str, conv.kernel_size))}/{conv.stride[0]}",
            "output_shape": list(layer.step.output_shape),
            "units": prod(layer.step.output_shape),
            "rf_size": list(layer.field.size),
            "rf_stride": list(layer.field.stride),
        })
    return rows
