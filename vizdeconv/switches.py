"""Forward hooks that record one layer's activations, and max-pooling switches for the chain walk.

Hooks live only inside a recorder's ``with`` block and are removed in ``finally``, also when the
forward pass raises; the model itself is never modified.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from vizdeconv.graph import Point
from vizdeconv.hooks import Hooks
from vizdeconv.layers import Chain


@dataclass
class Forward:
    """What one forward pass left behind.

    Attributes:
        activations: ``(N, K, h, w)`` output of the recorded layer (a copy: later in-place ops
            such as ``ReLU(inplace=True)`` cannot change it).
        switches: chain step index → ``(N, C, h, w)`` int64 argmax positions of that max-pool,
            as flat indices into each ``H × W`` input plane (chain walk).
        inputs, outputs: per image, its ``(1, C, H, W)`` input and the layer's output with the
            autograd graph between them, built under the rules (general path).
    """

    activations: torch.Tensor | None = None
    switches: dict[int, torch.Tensor] = field(default_factory=dict)
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


class SwitchRecorder(Hooks):
    """Record switches below chain step ``index`` and its output whenever the model runs inside ``with``.

    Use ``forward()`` to run just the chain up to the layer, or call the model yourself (the
    whole forward pass, logits included) and read ``recorded``.
    """

    def __init__(self, chain: Chain, index: int) -> None:
        self.chain = chain
        self.index = index
        self.recorded = Forward()
        self._steps_of: dict[nn.Module, list[int]] = defaultdict(list)
        self._calls: dict[nn.Module, int] = defaultdict(int)
        # Every call up to the layer is counted, so that a module the chain calls more than once
        # (one shared ReLU, say) is matched to the right step.
        for step in chain.steps[: index + 1]:
            self._steps_of[step.module].append(step.index)

    def _register(self) -> Iterator[RemovableHandle]:
        yield self.chain.steps[0].module.register_forward_pre_hook(self._start)
        for module in self._steps_of:
            yield module.register_forward_hook(self._record)

    def _start(self, module: nn.Module, inputs) -> None:
        if self._calls[module] == 0:
            self.recorded = Forward()
            self._calls.clear()

    def _record(self, module: nn.Module, inputs, output) -> None:
        calls = self._calls[module]
        self._calls[module] += 1
        if calls >= len(self._steps_of[module]):
            return
        index = self._steps_of[module][calls]
        if isinstance(module, nn.MaxPool2d):
            _, switches = F.max_pool2d(inputs[0], module.kernel_size, module.stride, module.padding,
                                       module.dilation, ceil_mode=module.ceil_mode, return_indices=True)
            self.recorded.switches[index] = switches
        if index == self.index:
            self.recorded.activations = output.detach().clone()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Forward:
        """Run the chain up to the recorded layer (nothing above it) and return what was recorded."""
        self._calls.clear()
        x = images
        for step in self.chain.steps[: self.index + 1]:
            x = step.module(x)
        return self.recorded


class _Reached(BaseException):  # not an Exception: a model's own ``except Exception`` must not swallow it
    """Raised by a hook to end a forward pass once the recorded layer has run."""


class PointRecorder(Hooks):
    """Record the output of one module call (a graph point) whenever the model runs inside ``with``.

    ``run(images)`` runs the model only as far as the point (a hook ends the pass there); call the
    model yourself to run all of it (the logits too) and read ``output``. The output is cloned in
    the hook, so later in-place ops cannot change it, and under grad mode the clone keeps the
    autograd graph.
    """

    def __init__(self, module: nn.Module, point: Point) -> None:
        self.module = module
        self.point = point
        self.output: torch.Tensor | None = None
        self._calls = 0
        self._stop = False

    def _register(self) -> Iterator[RemovableHandle]:
        target = self.module.get_submodule(self.point.module_name)
        yield self.module.register_forward_pre_hook(self._start)
        yield target.register_forward_hook(self._record)

    def _start(self, module: nn.Module, inputs) -> None:
        self._calls = 0
        self.output = None

    def _record(self, module: nn.Module, inputs, output) -> None:
        if self._calls == self.point.call:
            self.output = output.clone()
            if self._stop:
                raise _Reached
        self._calls += 1

    def run(self, images: torch.Tensor) -> torch.Tensor:
        """The point's output for ``images``, running the model no further than needed."""
        self._stop = True
        try:
            self.module(images)
        except _Reached:
            pass
        finally:
            self._stop = False
        return self.output


def record_points(module: nn.Module, points: Sequence[Point], images: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of several points (in graph order) for one batch, in one pass that stops after the last."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        recorders = [stack.enter_context(PointRecorder(module, point)) for point in points]
        recorders[-1].run(images)
        return [recorder.output for recorder in recorders]
