"""The layers a user can pick, and the plain chain of modules the fast deconvnet walks down.

Any module output is a layer (``graph.py`` finds them all, on any architecture). "Layer N" is the
rectified output of the N-th convolution (paper numbering: layer 5 = conv5's ReLU), defined
while the model is a plain chain up to it. The chain is found by watching one forward pass: it
runs from the input through every leaf module whose input is, unchanged, the previous module's
output (a ``torch.flatten`` in between counts as an implicit step), and ends where the model does
something else (a residual sum, a functional op).
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vizdeconv import ops
from vizdeconv.errors import LayerError
from vizdeconv.graph import Graph, Point, trace
from vizdeconv.hooks import Hooks
from vizdeconv.models import LoadedModel
from vizdeconv.outputs import JOB_FOLDERS

RESERVED_SLUGS = re.compile("|".join([r"layer\d+", *JOB_FOLDERS]))  # numbered layers' slugs and the jobs' own folders
# Ops the chain walk (deconvnet.walk) inverts on windows; anything else goes through autograd with rules.
WALKED = frozenset({"relu", "relu6", "conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "batch_norm",
                    "local_response_norm", "dropout"})


@dataclass(frozen=True)
class Step:
    """One module call of the chain, with the shapes it saw (batch dimension left out)."""

    index: int
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class Chain:
    """The model's plain chain of module calls from the input, and why it ends where it does."""

    steps: tuple[Step, ...]
    end: str
    input_size: tuple[int, int, int]

    def numbered(self) -> list[tuple[int, Step, Step]]:
        """Paper numbering: ``(N, rectifier step, conv step)`` for every conv of the chain that a
        rectifier follows before the next conv (layer N = the rectified output of conv N)."""
        convs = [s.index for s in self.steps if isinstance(s.module, nn.Conv2d)]
        numbered = []
        for number, (start, stop) in enumerate(zip(convs, convs[1:] + [len(self.steps)]), start=1):
            rectifier = next((i for i in range(start + 1, stop) if _is_rectifier(self.steps[i].module)), None)
            if rectifier is None:
                break
            numbered.append((number, self.steps[rectifier], self.steps[start]))
        return numbered

    def walkable(self, index: int) -> bool:
        """Whether the chain walk (``deconvnet.walk``) can go down from step ``index`` to the input."""
        return all(_walkable(step.module) for step in self.steps[: index + 1])


def _is_rectifier(module: nn.Module) -> bool:
    op = ops.for_module(module)
    return op is not None and op.kind == "rectifier"


def _walkable(module: nn.Module) -> bool:
    op = ops.for_module(module)
    return op is not None and op.name in WALKED


def trace_chain(model: LoadedModel) -> Chain:
    """Run one forward pass on noise and record the plain chain of leaf-module calls (``LeafCalls``)."""
    with torch.no_grad(), LeafCalls(model.module) as calls:
        model.module(torch.randn(1, *model.input_size, device=model.device))
    return calls.chain(model.input_size)


class LeafCalls(Hooks):
    """While the model runs inside ``with``, record its input and output and every leaf module's call.

    ``chain()`` then gives the plain chain: a call joins it when its only input is the very tensor
    the previous call returned, at the same version (an in-place ``out += identity`` in between
    would change the version).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.names = {m: name for name, m in module.named_modules()}
        self.calls: list[list] = []
        self.input = self.output = None

    def _register(self) -> Iterator[RemovableHandle]:
        leaves = [m for m in self.module.modules() if not any(True for _ in m.children())]
        yield self.module.register_forward_pre_hook(self._start)
        yield self.module.register_forward_hook(self._end)
        yield from (m.register_forward_pre_hook(self._before) for m in leaves)
        yield from (m.register_forward_hook(self._after) for m in leaves)

    def _start(self, module, inputs) -> None:
        self.input, self.calls = inputs[0], []

    def _end(self, module, inputs, output) -> None:
        self.output = output

    def _before(self, module, inputs) -> None:
        tensor = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor) else None
        self.calls.append([module, tensor, tensor._version if tensor is not None else None, None, None])

    def _after(self, module, inputs, output) -> None:
        record = next(c for c in reversed(self.calls) if c[0] is module and c[3] is None)
        record[3:] = [output, output._version] if isinstance(output, torch.Tensor) else [False, None]

    def chain(self, input_size: tuple[int, int, int]) -> Chain:
        steps = []
        previous, version, previous_name = self.input, self.input._version, "the input"
        end = "the model's output"
        for module, tensor, tensor_version, out, out_version in self.calls:
            name = self.names.get(module, type(module).__name__)
            if _is_flattened(tensor, tensor_version, previous, version):
                # torch.flatten(x, 1) in the model's forward (torchvision's AlexNet and VGG): an implicit step.
                steps.append(Step(len(steps), "(flatten)", nn.Flatten(), tuple(previous.shape[1:]),
                                  tuple(tensor.shape[1:])))
                previous = tensor
            if tensor is not previous or tensor_version != version or not isinstance(out, torch.Tensor):
                end = f"{name!r}, whose input is not the plain output of {previous_name}"
                break
            steps.append(Step(len(steps), name, module, tuple(tensor.shape[1:]), tuple(out.shape[1:])))
            previous, version, previous_name = out, out_version, repr(name)
        else:
            if previous is not self.output:
                end = f"{previous_name}, after which the model does more"
        return Chain(tuple(steps), end, input_size)


def _is_flattened(tensor, tensor_version, previous, version) -> bool:
    return (tensor is not None and tensor is not previous and tensor_version == version and tensor.dim() == 2
            and previous.dim() > 2 and torch.equal(tensor, previous.flatten(1)))


@dataclass(frozen=True)
class Layer:
    """A place to project from: a module's output, with its paper number where it has one.

    Attributes:
        point: the module output in the model's graph (name, shape, receptive field, ops below).
        number: N for "layer N" (the rectified output of conv N), else None.
        chain_index: its step in the plain chain, when the chain reaches it (the fast path).
        conv: for numbered layers, the conv's module name.
    """

    point: Point
    number: int | None = None
    chain_index: int | None = None
    conv: str | None = None

    # what the layer's point knows: its name (``layer3``, ``relu@2``), (C, H, W) and ``graph.Field``
    name = property(lambda self: self.point.name)
    output_shape = property(lambda self: self.point.output_shape)
    field = property(lambda self: self.point.field)

    @property
    def label(self) -> str:
        return f"layer {self.number} ({self.name})" if self.number else self.name

    @property
    def key(self) -> str:
        """What tables call it: the paper number (``5``), or the module name (``layer3``, ``relu@2``)."""
        return str(self.number) if self.number else self.name

    @property
    def slug(self) -> str:
        """File-name stem: ``layer5``, or the module name for an unnumbered layer (``layer3_1``, ``relu_call2``);
        ``module-`` before a name that would pass for a numbered layer or a job's folder (ResNet's ``layer1``)."""
        if self.number:
            return f"layer{self.number}"
        name = self.name.replace(".", "_").replace("@", "_call")
        return f"module-{name}" if RESERVED_SLUGS.fullmatch(name) else name

    def hit(self, image: Path, channel: int, position: tuple[int, int], value: float,
            input_size: Sequence[int]) -> Hit:
        """The activation at ``position`` of ``channel`` on ``image``, with its receptive field in pixels."""
        height, width = input_size[-2:]
        box = self.field.box(*position, height, width)
        return Hit(image, channel, tuple(position), value, box, box != self.field.window(*position))


@dataclass(frozen=True)
class Hit:
    """One unit's activation on one image: what a projection starts from.

    Attributes:
        image: the image file.
        channel, position: the unit: its channel and ``(y, x)`` in the layer's map.
        value: the activation.
        box: ``(y0, x0, y1, x1)`` receptive field in input pixels, end exclusive, clipped to the image.
        clipped: whether the receptive field reaches past the image border.
    """

    image: Path
    channel: int
    position: tuple[int, int]
    value: float
    box: tuple[int, int, int, int]
    clipped: bool

    def to_json(self) -> dict:
        return {"image": os.path.abspath(self.image), "channel": self.channel, "value": self.value,
                "position": list(self.position), "box": list(self.box), "clipped": self.clipped}


@dataclass(frozen=True)
class Layers:
    """Every layer of a model: its graph's points, and the plain chain from the input."""

    graph: Graph
    chain: Chain

    def numbered(self) -> list[Layer]:
        return list(self._numbered)

    @functools.cached_property
    def _numbered(self) -> tuple[Layer, ...]:
        numbered = []
        for number, step, conv in self.chain.numbered():
            point = self._point_of(step)
            if point is None:  # no (C, H, W) output (after global pooling): numbers stop here
                break
            numbered.append(self._layer(point, number, conv.name))
        return tuple(numbered)

    def layer(self, spec: int | str) -> Layer:
        """Resolve ``5``, ``"5"``, a module name (``layer3``, ``features.8``) or one call (``relu@2``).

        A number is a paper number first; past the numbered layers it may name a module of a bare
        ``nn.Sequential``.

        Raises:
            LayerError: one line, with the valid numbers or the nearest names.
        """
        spec, numbered = str(spec), self.numbered()
        if spec.isdigit():
            if 1 <= int(spec) <= len(numbered):
                return numbered[int(spec) - 1]
            if not any(p.name == spec for p in self.graph.points):  # nn.Sequential names modules "0", "1", …
                listed = ", ".join(f"{layer.number} = {layer.name}" for layer in numbered) or "none"
                raise LayerError(f"no layer {spec!r}; conv layers: {listed} (numbers stop where the plain chain "
                                 f"ends, at {self.chain.end}); or a module name, see `vizdeconv layers`")
        point = self.graph.point(spec)
        return next((layer for layer in numbered if layer.point == point), None) or self._layer(point)

    def select(self, spec: int | str | Sequence[int | str]) -> list[Layer]:
        """Several layers, each once, in graph order: ``1-5``, ``1,3,layer4.1``, or a list of ``layer`` specs."""
        parts = [str(part) for part in spec] if isinstance(spec, (list, tuple)) else str(spec).split(",")
        chosen: list[Layer] = []
        for part in map(str.strip, parts):
            first, dash, last = part.partition("-")
            if dash and first.isdigit() and last.isdigit():
                if int(first) > int(last):
                    raise LayerError(f"layer range {part!r} runs backwards; write {last}-{first}")
                chosen.extend(self.layer(number) for number in range(int(first), int(last) + 1))
            else:
                chosen.append(self.layer(part))
        if not chosen:
            raise LayerError("no layer given")
        unique = {layer.point: layer for layer in chosen}
        return sorted(unique.values(), key=lambda layer: self.graph.points.index(layer.point))

    def walks(self, layer: Layer) -> bool:
        """Whether the chain walk reaches ``layer`` (else projections go through autograd with rules)."""
        return layer.chain_index is not None and self.chain.walkable(layer.chain_index)

    def last(self) -> Layer:
        """The last numbered layer, or the last spatial module output of a graph."""
        numbered = self.numbered()
        if numbered and self.chain.end == "the model's output":
            return numbered[-1]
        if not self.graph.points:
            raise LayerError("the model has no module with a (C, H, W) output to project from")
        return self._layer(self.graph.points[-1])

    @functools.cached_property
    def _steps(self) -> dict[tuple[str, int], int]:
        """``(module name, call) → chain step index``: a module's k-th call in the chain is its k-th call."""
        seen: Counter = Counter()
        steps = {}
        for step in self.chain.steps:
            steps[step.name, seen[step.name]] = step.index
            seen[step.name] += 1
        return steps

    def _point_of(self, step: Step) -> Point | None:
        return next((p for p in self.graph.points if self._steps.get((p.module_name, p.call)) == step.index), None)

    def _layer(self, point: Point, number: int | None = None, conv: str | None = None) -> Layer:
        return Layer(point, number, self._steps.get((point.module_name, point.call)), conv)

    def describe(self) -> list[dict]:
        """One row per layer, for ``vizdeconv layers`` (JSON-ready)."""
        numbers = {layer.point.name: layer.number for layer in self.numbered()}
        rows = []
        for point in self.graph.points:
            rows.append({
                "layer": numbers.get(point.name),
                "module": point.name,
                "type": self.graph.types[point.module_name],
                "output_shape": list(point.output_shape),
                "rf_size": list(point.field.size),
                "rf_stride": list(point.field.stride),
                "path": "walk" if self.walks(self._layer(point)) else "autograd",
                "below": list(point.below),
                "unknown": point.unknown,
            })
        return rows


def trace_layers(model: LoadedModel) -> Layers:
    """Trace the model's graph and its plain chain, in one forward pass on noise."""
    with LeafCalls(model.module) as calls:
        graph = trace(model)
    return Layers(graph, calls.chain(model.input_size))
