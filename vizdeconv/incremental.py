"""Incremental occlusion through any graph (Krypton: Nakandala, Kumar & Papakonstantinou, SIGMOD 2019).

A square changes only a small region of the early feature maps: its projective field. The clean
image runs once while a ``TorchFunctionMode`` records every torch call on a tensor that depends
on the input (a tape: residual sums, in-place adds, concatenations, functional ReLUs) and keeps
every value. For a batch of square positions, ``regions`` then works out which rows and columns
of each value the square can change: a conv, pool or pad grows them, a pointwise op, sum or
concatenation takes the union of its inputs' regions, anything else (global pooling, flatten, the
head, a squeeze-excitation gate, an op with no rule) changes the whole value. The tape is replayed
on the batch: a conv, pool or pad computes only its changed region, reading context from the
cached clean map (pre-padded once with the op's pad value) with the changed patch spliced in, in
one gather and one call for the whole batch; pointwise ops run on patches grown to a common box;
the rest runs in full on assembled maps. A batch shares one region size, the largest, shifted
inward at the borders: recomputing a few unchanged cells stays exact.

Projective-field thresholding (Krypton's approximation, ``tau`` < 1) caps each region at a
fraction ``tau`` of its map's side, keeping the middle of the region (the square's effect is
strongest near its centre); outside it the clean values stand in.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vizdeconv import ops
from vizdeconv.graph import Point, tensors
from vizdeconv.switches import PointRecorder

FULL = "full"  # a region: the value changes everywhere (or has no rows and columns)
LOCAL = ("conv2d", "max_pool2d", "avg_pool2d", "pad")
SAME_VALUES = frozenset({"contiguous", "clone", "to", "float", "type_as"})  # shape ops that change nothing
AS_NUMBER = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__"})  # data-dependent Python


@dataclass(frozen=True)
class Ref:
    """A recorded tensor in a call's arguments: the tape's value ``node``."""

    node: int


@dataclass(frozen=True)
class Call:
    """One recorded torch call, replayable out of place.

    Attributes:
        function, args, kwargs: what to call, tensors of the tape replaced by ``Ref``.
        inputs, outputs: the tape's values it reads and makes.
        behaviour: ``local`` (conv, pool, pad: runs on regions), ``pointwise`` (runs on patches)
            or ``full`` (runs on whole maps).
        geometry: a local call's (kernel, stride, padding, dilation) per axis.
        window: a local call on a pre-padded window (padding 0), for ``local`` calls.
        pad_value: what a local call's padding holds.
        gates: inputs broadcast over rows and columns (a ``(1, C, 1, 1)`` scale): a changed gate
            changes the whole output.
    """

    function: Callable
    args: tuple
    kwargs: dict
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    behaviour: str
    geometry: tuple[ops.Geometry, ops.Geometry] | None = None
    window: Callable[[torch.Tensor], torch.Tensor] | None = None
    pad_value: float = 0.0
    gates: tuple[int, ...] = ()


@dataclass
class Tape:
    """The clean pass: its calls, every value, the layer's value and the output's.

    ``problem`` says why the tape cannot be replayed (then occlusion runs brute force)."""

    calls: list[Call]
    clean: list[torch.Tensor]
    layer: int | None
    output: int | None
    problem: str | None = None

    def __post_init__(self) -> None:
        self.last_use = {node: i for i, call in enumerate(self.calls) for node in call.inputs}


def record(module: nn.Module, image: torch.Tensor, point: Point) -> Tape:
    """Run ``module`` on the ``(C, H, W)`` ``image`` and record its tape; ``point`` is the layer."""
    recorder = _Recorder()
    layer_calls: list[int | None] = []

    def hook(_module, _inputs, output) -> None:
        layer_calls.append(recorder.node_of.get(id(output)))

    handle = module.get_submodule(point.module_name).register_forward_hook(hook)
    x = image[None].clone()
    recorder.add(x)
    try:
        with torch.no_grad(), recorder:
            output = module(x)
    except Exception as error:  # any failure means: run brute force, and say why
        return Tape([], recorder.clean, None, None, f"recording its calls raised {type(error).__name__}: "
                                                    f"{' '.join(str(error).split())[:120]}")
    finally:
        handle.remove()
    layer = layer_calls[point.call] if len(layer_calls) > point.call else None
    problem = recorder.problem
    if problem is None and layer is None:
        problem = f"the output of {point.name} was not recorded"
    output_node = recorder.node_of.get(id(output)) if isinstance(output, torch.Tensor) else None
    if problem is None and output_node is None:
        problem = "the model's output was not recorded"
    return Tape(recorder.calls, recorder.clean, layer, output_node, problem)


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.node_of: dict[int, int] = {}
        self.clean: list[torch.Tensor] = []
        self.calls: list[Call] = []
        self.problem: str | None = None
        self.storage: list[int] = []  # per value: where its memory is, to find what a write also changes
        self.stale: set[int] = set()  # values changed by a write into another view of their memory

    def add(self, tensor: torch.Tensor) -> int:
        self.node_of[id(tensor)] = len(self.clean)
        self.clean.append(tensor)  # also keeps the tensor alive, so ids stay unique
        self.storage.append(tensor.untyped_storage().data_ptr())
        return len(self.clean) - 1

    def __torch_function__(self, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        traced = [t for t in tensors((args, kwargs)) if id(t) in self.node_of]
        name = getattr(function, "__name__", "")
        if traced and name in AS_NUMBER and self.problem is None:
            self.problem = f"it reads a value that depends on the image as a Python number ({name})"
        if not traced or name in ops.IGNORED_NAMES:
            return function(*args, **kwargs)
        replay, replay_args, replay_kwargs, writes = _out_of_place(function, args, kwargs)
        refs = _map((replay_args, replay_kwargs), lambda t: Ref(self.node_of[id(t)]) if id(t) in self.node_of else t)
        call_name = torch.overrides.resolve_name(function) or name
        if self.problem is None and self.stale.intersection(self.node_of[id(t)] for t in traced):
            self.problem = f"{call_name} reads a tensor that an in-place write changed through another view"
        if writes:
            node = self.node_of.get(id(args[0]))
            if self.problem is None and (replay is None or "out" in kwargs or node is None):
                self.problem = f"{call_name} writes into a tensor in a way that cannot be replayed"
            if node is not None:  # keep the values from before the write, of every value sharing its memory
                where = self.storage[node]
                for other, other_where in enumerate(self.storage):
                    if other_where == where and self.clean[other].untyped_storage().data_ptr() == where:
                        self.clean[other] = self.clean[other].clone()
                self.stale.update(n for n, other_where in enumerate(self.storage) if other_where == where and n != node)
        output = function(*args, **kwargs)
        outputs = list(tensors(output))
        if not outputs:
            return output  # a shape, a number: nothing to replay
        inputs = tuple(dict.fromkeys(self.node_of[id(t)] for t in traced))
        nodes = tuple(self.add(t) for t in outputs)
        self.calls.append(_call(function, replay, *refs, inputs, nodes, traced, outputs))
        return output


def _out_of_place(function, args, kwargs) -> tuple[Callable | None, tuple, dict, bool]:
    """The call's out-of-place equivalent and whether the original writes into its first argument."""
    name = getattr(function, "__name__", "")
    if name.startswith("__i") and hasattr(torch.Tensor, "__" + name[3:]):  # x += y, x *= y
        return getattr(torch.Tensor, "__" + name[3:], None), args, kwargs, True
    if name.endswith("_") and not name.endswith("__") or name == "__setitem__":
        spaces = (torch.Tensor, torch, F)
        plain = next((getattr(s, name[:-1], None) for s in spaces if getattr(s, name, None) is function), None)
        return plain, args, kwargs, True
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return function, args, kwargs, "out" in kwargs
    if "inplace" not in signature.parameters:
        return function, args, kwargs, False
    bound = signature.bind(*args, **kwargs)
    writes = bool(bound.arguments.get("inplace", False))
    bound.arguments["inplace"] = False
    return function, bound.args, bound.kwargs, writes


def _call(function, replay, args, kwargs, inputs, outputs, traced, results) -> Call:
    """The recorded call with its behaviour on regions (see ``Call``)."""
    op = ops.for_call(function, args, kwargs)
    single = len(results) == 1 and results[0].dim() == 4
    if op is not None and single and op.name in LOCAL and len(traced) == 1 and args[0] == Ref(inputs[0]):
        local = _local_call(op, replay, args, kwargs, inputs, outputs)
        if local is not None:
            return local
    name = getattr(function, "__name__", "")
    pointwise = op is not None and op.occlusion == "pointwise" and op.kind != "shape" or name in SAME_VALUES
    if op is not None and op.name == "batch_norm":
        pointwise = not ops.argument(args, kwargs, 5, "training", False)
    if op is not None and op.name == "cat":
        pointwise = ops.argument(args, kwargs, 1, "dim", 0) in (1, -3)
    spatial = results[0].shape[2:] if single else None
    gates = tuple(n for n, t in zip(inputs, _unique(traced)) if t.dim() == 4 and t.shape[2:] == (1, 1) != spatial)
    constants = [t for t in tensors((args, kwargs)) if t.dim() >= 2 and t.shape[-2:] != (1, 1)]
    if constants or not (pointwise and single and all(t.dim() == 4 and t.shape[2:] in (spatial, (1, 1))
                                                      for t in traced)):
        return Call(replay, args, kwargs, inputs, outputs, FULL)
    return Call(replay, args, kwargs, inputs, outputs, "pointwise", gates=gates)


def _unique(values: list[torch.Tensor]) -> list[torch.Tensor]:
    return list({id(t): t for t in values}.values())


def _local_call(op, replay, args, kwargs, inputs, outputs) -> Call | None:
    """A conv, pool or pad as a call on a pre-padded window, or None where that would not be exact."""
    argument = ops.argument
    if op.name == "pad":
        pads = argument(args, kwargs, 1, "pad", ())
        mode = argument(args, kwargs, 2, "mode", "constant")
        if mode != "constant" or len(pads) != 4 or min(pads) < 0:
            return None
        value = argument(args, kwargs, 3, "value", None)
        geometry = tuple(op.geometry(args, kwargs, axis) for axis in (0, 1))
        return Call(replay, args, kwargs, inputs, outputs, "local", geometry, lambda window: window,
                    float(value or 0.0))
    if op.name == "conv2d" and any(isinstance(a, Ref) for a in (*args[1:], *kwargs.values())):
        return None  # weights computed from the input
    geometry = tuple(op.geometry(args, kwargs, axis) for axis in (0, 1))
    if op.name == "conv2d":
        weight, bias = argument(args, kwargs, 1, "weight", None), argument(args, kwargs, 2, "bias", None)
        stride, dilation = argument(args, kwargs, 3, "stride", 1), argument(args, kwargs, 5, "dilation", 1)
        groups = argument(args, kwargs, 6, "groups", 1)
        return Call(replay, args, kwargs, inputs, outputs, "local", geometry,
                    lambda window: F.conv2d(window, weight, bias, stride, 0, dilation, groups))
    kernel, stride = argument(args, kwargs, 1, "kernel_size", None), argument(args, kwargs, 2, "stride", None)
    if op.name == "max_pool2d":
        if argument(args, kwargs, 6, "return_indices", False):
            return None
        dilation = argument(args, kwargs, 4, "dilation", 1)
        return Call(replay, args, kwargs, inputs, outputs, "local", geometry,
                    lambda window: F.max_pool2d(window, kernel, stride, 0, dilation), float("-inf"))
    padding = argument(args, kwargs, 3, "padding", 0)
    exact = (not argument(args, kwargs, 4, "ceil_mode", False) and argument(args, kwargs, 6, "divisor_override", None)
             is None and (argument(args, kwargs, 5, "count_include_pad", True) or padding in (0, (0, 0))))
    if not exact:
        return None
    return Call(replay, args, kwargs, inputs, outputs, "local", geometry,
                lambda window: F.avg_pool2d(window, kernel, stride, 0))


def _map(tree, function: Callable, leaf: type = torch.Tensor):
    """``tree`` (nested lists, tuples, dicts) with every ``leaf`` replaced by ``function(leaf)``."""
    if isinstance(tree, leaf):
        return function(tree)
    if type(tree) in (list, tuple):
        return type(tree)(_map(item, function, leaf) for item in tree)
    if isinstance(tree, dict):
        return {key: _map(item, function, leaf) for key, item in tree.items()}
    return tree


def changed_range(geometry: ops.Geometry, first: torch.Tensor, end: torch.Tensor, size_out: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The output rows a change in input rows ``first`` … ``end - 1`` can reach, as ``(first, end)`` too."""
    kernel, stride, padding, dilation = geometry
    reach = dilation * (kernel - 1)
    low = (-((-(first + padding - reach)) // stride)).clamp(min=0)  # ceil division
    high = ((end - 1 + padding) // stride + 1).clamp(max=size_out)
    return low, torch.where(end > first, torch.maximum(high, low), low)  # nothing changed stays nothing


def _capped(first: torch.Tensor, end: torch.Tensor, sizes: tuple[int, int], tau: float
            ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Projective-field thresholding: each region (as clipped to the map) at most ``ceil(tau · side)``
    long, keeping its middle; and whether any region was cut."""
    if tau >= 1:
        return first, end, False
    cap = torch.tensor([max(1, math.ceil(tau * side)) for side in sizes], device=first.device)
    over = (end - first - cap).clamp(min=0)
    first = first + over // 2
    return first, torch.minimum(end, first + cap), bool(over.any())


def regions(tape: Tape, first: torch.Tensor, end: torch.Tensor, tau: float = 1.0) -> list:
    """Per value of the tape: None (unchanged), ``FULL``, or the rows and columns ``[first, end)``
    (two ``(N, 2)`` tensors) that squares covering input ``[first, end)`` change, and whether
    thresholding cut any of them there."""
    plan: list = [None] * len(tape.clean)
    plan[0] = (first, end, False)
    for call in tape.calls:
        changed = [plan[node] for node in call.inputs if plan[node] is not None]
        if not changed:
            continue
        region = FULL
        sizes = tuple(tape.clean[call.outputs[0]].shape[2:])
        if any(r is FULL for r in changed) or call.behaviour == FULL or any(plan[n] is not None for n in call.gates):
            pass
        elif call.behaviour == "local":
            ranges = [changed_range(call.geometry[axis], changed[0][0][:, axis], changed[0][1][:, axis], sizes[axis])
                      for axis in (0, 1)]
            region = _capped(torch.stack([r[0] for r in ranges], 1), torch.stack([r[1] for r in ranges], 1), sizes,
                             tau)
        else:
            region = _capped(torch.stack([r[0] for r in changed]).amin(0), torch.stack([r[1] for r in changed]).amax(0),
                             sizes, tau)
        for node in call.outputs:
            plan[node] = region
    return plan


class IncrementalOcclusion:
    """One image's tape, and batched evaluation of occluded copies of it.

    Args:
        module: the model. image: ``(C, H, W)`` preprocessed, on the model's device.
        point: the layer whose per-channel totals are wanted.
    """

    def __init__(self, module: nn.Module, image: torch.Tensor, point: Point) -> None:
        self.module, self.image, self.point = module, image, point
        self.tape = record(module, image, point)
        self.problem = self.tape.problem
        """Why this model cannot run incrementally, or None."""
        if self.problem is None:
            self.logits = self.tape.clean[self.tape.output][0]
            self.layer_output = self.tape.clean[self.tape.layer][0]
        self._padded: dict[tuple, torch.Tensor] = {}

    def check(self, size: int, fill: torch.Tensor) -> str | None:
        """Why this engine cannot be trusted, or None: replay the tape for squares in the top-left and
        bottom-right corners (two, so a batch size read as a number shows) and compare logits and the
        layer's strongest channel's totals with full forward passes."""
        if self.problem is not None:
            return self.problem
        _, height, width = self.image.shape
        corners = torch.tensor([[0, 0], [height - size, width - size]])
        channel = int(self.layer_output.flatten(1).max(1).values.argmax())
        with PointRecorder(self.module, self.point) as recorder, torch.no_grad():
            expected = self.module(occluded(self.image, corners, size, fill))
            expected_totals = recorder.output[:, channel].sum((1, 2))
        try:
            logits, totals = self.evaluate(corners, size, fill, channel)
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            return f"replaying its calls on regions raised {type(error).__name__}: {' '.join(str(error).split())[:120]}"
        for got, wanted in ((logits, expected), (totals, expected_totals)):
            scale = float(wanted.abs().max()) + 1
            if got.shape != wanted.shape or not torch.allclose(got, wanted, rtol=1e-3, atol=1e-3 * scale):
                return "replaying its calls on regions does not give the model's values (they depend on the data)"
        return None

    @torch.no_grad()
    def evaluate(self, corners: torch.Tensor, size: int, fill: torch.Tensor, channel: int, tau: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, classes)`` and totals ``(B,)`` of ``channel`` at the layer, for the image with a
        ``size`` square of ``fill`` (per channel) at each of the ``(B, 2)`` top-left ``corners``."""
        tape = self.tape
        corners = corners.to(self.image.device)
        plan = regions(tape, corners, corners + size, tau)
        batch = len(corners)
        states = {0: (fill.view(1, -1, 1, 1).expand(batch, -1, size, size).contiguous(), corners)}
        keep = {tape.layer, tape.output}
        for i, call in enumerate(tape.calls):
            region = plan[call.outputs[0]]
            if region is not None:
                states.update(zip(call.outputs, self._run(call, region, states, batch)))
            for node in call.inputs:
                if tape.last_use[node] == i and node not in keep:
                    states.pop(node, None)
        return self._full(tape.output, states, batch), self._total(states.get(tape.layer), channel, batch)

    def _run(self, call: Call, region, states: dict, batch: int) -> list[tuple]:
        """The states (values, top-left corners or None for whole values) of the call's outputs."""
        node = call.outputs[0]
        sizes = self.tape.clean[node].shape[2:]
        if region is FULL:
            start, box = None, None
        else:
            box = [max(1, int((region[1][:, axis] - region[0][:, axis]).max())) for axis in (0, 1)]
            start = torch.stack([region[0][:, axis].clamp(max=sizes[axis] - box[axis]) for axis in (0, 1)], 1)
        if box is None or box == list(sizes):
            args, kwargs = _map((call.args, call.kwargs), lambda ref: self._full(ref.node, states, batch), Ref)
            whole = list(tensors(call.function(*args, **kwargs)))
            origin = torch.zeros(batch, 2, dtype=torch.long, device=self.image.device)
            made = [(t, origin if t.dim() == 4 and t.shape[2:] == self.tape.clean[n].shape[2:] else None)
                    for n, t in zip(call.outputs, whole)]
        elif call.behaviour == "local":
            made = [(self._local(call, states, start, box), start)]
        else:
            def window(source: int) -> torch.Tensor:
                if self.tape.clean[source].shape[2:] != sizes:
                    return self.tape.clean[source]  # an unchanged gate, broadcast
                return self._gather(source, states.get(source), start, box, (0, 0), (0, 0), 0.0)

            args, kwargs = _map((call.args, call.kwargs), lambda ref: window(ref.node), Ref)
            made = [(call.function(*args, **kwargs), start)]
        if region is not FULL and region[2]:  # a cut region: clean values outside each position's own
            # (where nothing was cut, cells outside a region are computed from clean inputs: clean already)
            values, origin = made[0]
            made = [(self._outside_clean(node, values, origin, region), origin)]
        return made

    def _outside_clean(self, node: int, values: torch.Tensor, origin: torch.Tensor, region) -> torch.Tensor:
        """``values`` (a box at ``origin``) with the clean values wherever ``region`` does not reach, so that
        an approximate position's result does not depend on the other positions of its batch."""
        if all(bool((region[1][:, a] - region[0][:, a] == values.shape[2 + a]).all()) for a in (0, 1)):
            return values  # every region fills the box
        return self._gather(node, (values, origin), origin, values.shape[2:], (0, 0), (0, 0), 0.0, limit=region)

    def _local(self, call: Call, states: dict, start: torch.Tensor, box: list[int]) -> torch.Tensor:
        """A conv, pool or pad on its changed output region ``box`` at ``start``, for every position."""
        node = call.inputs[0]
        tops, lengths, pads = [], [], []
        for axis in (0, 1):
            kernel, stride, padding, dilation = call.geometry[axis]
            tops.append(start[:, axis] * stride - padding)
            lengths.append((box[axis] - 1) * stride + dilation * (kernel - 1) + 1)
            last = (self.tape.clean[call.outputs[0]].shape[2 + axis] - 1) * stride - padding + dilation * (kernel - 1)
            pads.append((padding, max(padding, last - (self.tape.clean[node].shape[2 + axis] - 1))))
        window = self._gather(node, states.get(node), torch.stack(tops, 1), lengths, *zip(*pads), call.pad_value)
        return call.window(window)

    def _gather(self, node: int, state, top: torch.Tensor, lengths, before, after, pad_value: float,
                limit=None) -> torch.Tensor:
        """Rows ``top[:, 0] …`` and columns ``top[:, 1] …`` (``lengths`` long) of value ``node`` for every
        position: the clean map, padded with ``pad_value`` (``before``/``after`` cells per axis), with
        the position's changed patch (``state``), cut to its ``limit`` region if given, pasted in.

        Whole batches in a few indexing calls, channels last: each copied cell is one contiguous
        run of channels (and convs take channels-last input as it is)."""
        if state is not None and limit is None and tuple(state[0].shape[2:]) == tuple(lengths) \
                and state[1] is not None and torch.equal(state[1], top):
            return state[0]  # already this box
        key = (node, before, after, pad_value)
        if key not in self._padded:
            padded = F.pad(self.tape.clean[node][0], (before[1], after[1], before[0], after[0]), value=pad_value)
            self._padded[key] = padded.permute(1, 2, 0).contiguous()
        device = top.device
        rows = top[:, :1] + torch.arange(lengths[0], device=device)  # map coordinates, (B, height)
        cols = top[:, 1:] + torch.arange(lengths[1], device=device)
        window = self._padded[key][rows[:, :, None] + before[0], cols[:, None, :] + before[1]]  # (B, h, w, C)
        if state is not None:
            patch, origin = state
            patch_rows = origin[:, :1] + torch.arange(patch.shape[2], device=device)
            patch_cols = origin[:, 1:] + torch.arange(patch.shape[3], device=device)
            keep_rows = (patch_rows >= rows[:, :1]) & (patch_rows <= rows[:, -1:])
            keep_cols = (patch_cols >= cols[:, :1]) & (patch_cols <= cols[:, -1:])
            if limit is not None:
                keep_rows &= (patch_rows >= limit[0][:, :1]) & (patch_rows < limit[1][:, :1])
                keep_cols &= (patch_cols >= limit[0][:, 1:]) & (patch_cols < limit[1][:, 1:])
            b, i, j = torch.nonzero(keep_rows[:, :, None] & keep_cols[:, None, :], as_tuple=True)
            window[b, patch_rows[b, i] - rows[b, 0], patch_cols[b, j] - cols[b, 0]] = \
                patch.permute(0, 2, 3, 1)[b, i, j]
        return window.permute(0, 3, 1, 2)

    def _full(self, node: int, states: dict, batch: int) -> torch.Tensor:
        """Value ``node`` for every position as a whole tensor: the clean one with each patch pasted in."""
        clean = self.tape.clean[node]
        state = states.get(node)
        if state is None:
            return clean.expand(batch, *clean.shape[1:]) if clean.dim() and clean.shape[0] == 1 else clean
        patch, origin = state
        if origin is None or patch.shape[2:] == clean.shape[2:]:
            return patch
        return self._gather(node, state, torch.zeros_like(origin), clean.shape[2:], (0, 0), (0, 0), 0.0)

    def _total(self, state, channel: int, batch: int) -> torch.Tensor:
        """The layer's channel total per position, from the clean total with each patch swapped in."""
        clean = self.layer_output[channel]
        if state is None:
            return clean.sum().expand(batch)
        patch, origin = state
        if origin is None or patch.shape[2:] == clean.shape:
            return patch[:, channel].sum((1, 2))
        rows = origin[:, :1] + torch.arange(patch.shape[2], device=patch.device)
        cols = origin[:, 1:] + torch.arange(patch.shape[3], device=patch.device)
        replaced = clean[rows[:, :, None], cols[:, None, :]].sum((1, 2))
        return clean.sum() - replaced + patch[:, channel].sum((1, 2))


def occluded(image: torch.Tensor, corners: torch.Tensor, size: int, fill: torch.Tensor) -> torch.Tensor:
    """Copies of the ``(C, H, W)`` image, one per ``(B, 2)`` corner, with a ``size`` square of ``fill`` there."""
    batch = image.repeat(len(corners), 1, 1, 1)
    for i, (y, x) in enumerate(corners.tolist()):
        batch[i, :, y:y + size, x:x + size] = fill[:, None, None]
    return batch


def all_corners(input_size: tuple[int, ...], size: int, stride: int) -> torch.Tensor:
    height, width = input_size[-2:]
    return torch.cartesian_prod(torch.arange(0, height - size + 1, stride), torch.arange(0, width - size + 1, stride))


def batch_order(tape: Tape, corners: torch.Tensor, size: int, tau: float = 1.0) -> torch.Tensor:
    """A permutation of the ``(N, 2)`` corners that puts positions with the same region sizes next to
    each other, so that batches cut in this order need little more than their exact regions."""
    corners = corners.to(tape.clean[0].device)
    plan = regions(tape, corners, corners + size, tau)
    keys = [region[1] - region[0] for region in plan if region is not None and region is not FULL]
    signature = torch.cat([k[:, :1] for k in keys] + [k[:, 1:] for k in keys], dim=1).cpu().numpy()
    return torch.from_numpy(np.lexsort(signature.T[::-1]).copy())


def multiply_adds(tape: Tape, size: int, stride: int) -> tuple[float, float]:
    """Multiply-adds of convs and linear maps per occluded forward pass, averaged over the square's
    positions: in full, and computing only each value's exactly changed region (the theoretical limit
    of incremental inference; the replay recomputes a little more to keep one region size per batch)."""
    corners = all_corners(tape.clean[0].shape, size, stride).to(tape.clean[0].device)
    plan = regions(tape, corners, corners + size)
    full_total = incremental_total = 0.0
    for call in tape.calls:
        output = tape.clean[call.outputs[0]]
        weight = ops.argument(call.args, call.kwargs, 1, "weight", None)
        if getattr(call.function, "__name__", "") not in ("conv2d", "linear") or not isinstance(weight, torch.Tensor):
            continue
        cost = output.numel() * weight[0].numel()  # per output value: one row of the weights
        full_total += cost
        region = plan[call.outputs[0]]
        if region is FULL:
            incremental_total += cost
        elif region is not None:
            incremental_total += cost * float((region[1] - region[0]).prod(1).double().mean()) / output[0, 0].numel()
    return full_total, incremental_total
