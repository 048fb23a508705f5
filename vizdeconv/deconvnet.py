"""The deconvnet of Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks"
(ECCV 2014, arXiv 1311.2901), section 2.1, on any convnet.

Keep one activation, zero the rest of its layer, and go down: max-pool → unpool with the recorded
switches (values landing on one position add up, so overlapping pools are exact); ReLU → ReLU on
the signal itself; conv → transposed conv with the same weights, no bias; BatchNorm (eval) → its
per-channel scale; LRN, dropout → skipped; average pooling → its transpose; a sum → a copy to each
branch; concatenation → a split. ``ops.OPS`` lists every op and its rule.

Two paths give the same projection. Where the model is a plain chain of modules up to the layer
(AlexNet, VGG, the embedded model), the chain walk (``walk``) carries only each seed's receptive
field window down, many seeds at once. Anywhere else, autograd runs with every rectifier's
backward replaced by the rule (``rules.apply_rules``; Springenberg et al. 2014), one forward pass
per image and one backward pass per seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vizdeconv import ops
from vizdeconv.errors import LayerError
from vizdeconv.layers import Chain, Hit, Layer, Layers, Step
from vizdeconv.models import LoadedModel
from vizdeconv.rules import apply_rules, check_rule
from vizdeconv.switches import Forward, PointRecorder, SwitchRecorder

SEEDS_PER_PASS = 64  # seeds travelling down together: bounds the memory of one pass


class Deconvnet:
    """Project activations of one layer back to input space, with one of the rules.

    Args:
        model: the loaded model. layers: its layers (``trace_layers``). layer: where the seeds live.
        rule: ``deconvnet`` (default, ``relu(R)`` at every rectifier), ``guided``
            (``1[f>0]·relu(R)``) or ``gradient`` (plain backprop).

    Raises:
        LayerError: the layer has no (C, H, W) output, or an op below it has no rule.
    """

    def __init__(self, model: LoadedModel, layers: Layers, layer: Layer, *, rule: str = "deconvnet") -> None:
        check_rule(rule)
        check_projectable(layer)
        self.model, self.layers, self.layer, self.rule = model, layers, layer, rule
        self.walks = rule == "deconvnet" and layers.walks(layer)

    @property
    def path(self) -> str:
        return "chain walk" if self.walks else f"autograd with the {self.rule} rule"

    def forward(self, images: torch.Tensor) -> Forward:
        """Run a batch up to the layer, keeping what ``project`` needs (switches, or the autograd graph)."""
        if self.walks:
            with SwitchRecorder(self.layers.chain, self.layer.chain_index) as recorder:
                return recorder.forward(images)
        # One graph per image: a seed's backward pass then costs one image's, not the batch's.
        inputs, outputs = [], []
        with torch.enable_grad(), apply_rules(self.rule), PointRecorder(self.model.module, self.layer.point) as recorder:
            for image in images:
                inputs.append(image[None].detach().requires_grad_(True))
                outputs.append(recorder.run(inputs[-1].clone()))  # clone: a model may work on its input in place
        return Forward(activations=torch.cat(outputs).detach(), inputs=inputs, outputs=outputs)

    def project(self, forward: Forward, seeds: torch.Tensor) -> torch.Tensor:
        """Project seeds to input space, each seeded with its own activation value.

        Args:
            forward: what ``forward`` returned for a batch of N images.
            seeds: ``(S, 4)`` int64 rows ``[image, channel, y, x]``.

        Returns:
            ``(S, C, H, W)`` projections in the model's (normalised) input space.
        """
        seeds = seeds.to(forward.activations.device)
        if self.walks:
            return walk(self.layers.chain, self.layer.chain_index, forward, seeds)
        return _backward(forward, seeds)

    def project_hits(self, forward: Forward, hits: Sequence[Sequence[Hit]]) -> list[list[Projection]]:
        """Project ``hits[i]``, the hits on image ``i`` of the batch ``forward`` ran on, keeping their order."""
        seeds = torch.tensor([(i, hit.channel, *hit.position) for i, image_hits in enumerate(hits)
                              for hit in image_hits], dtype=torch.long).view(-1, 4)
        pixels = iter(self.project(forward, seeds).cpu())
        return [[Projection(hit, next(pixels)) for hit in image_hits] for image_hits in hits]

    def strongest_hits(self, forward: Forward, paths: Sequence[Path], **choice) -> list[list[Hit]]:
        """Each image's hits from ``strongest(forward.activations, **choice)``, strongest first."""
        seeds = strongest(forward.activations, **choice)
        values = forward.activations[tuple(seeds.T)].tolist()
        hits: list[list[Hit]] = [[] for _ in paths]
        for (image, channel, y, x), value in zip(seeds.tolist(), values):
            hits[image].append(self.layer.hit(paths[image], channel, (y, x), value, self.model.input_size))
        return hits


def check_projectable(layer: Layer) -> None:
    """Raise ``LayerError`` unless the deconvnet can go down from ``layer``: a spatial output, and a
    rule for every op below it."""
    if len(layer.output_shape) != 3:
        raise LayerError(f"{layer.label} has output shape {layer.output_shape}; "
                         "projection needs a spatial (C, H, W) layer")
    if layer.point.unknown:
        raise LayerError(f"vizdeconv has no rule for {layer.point.unknown}, which runs below {layer.label}; "
                         "pick a layer below it (the README lists the ops it knows)")


@dataclass(frozen=True)
class Projection:
    """A hit projected to input space: ``pixels`` is ``(C, H, W)`` float32 in the model's normalised
    input space, raw (seeded with the hit's value)."""

    hit: Hit
    pixels: torch.Tensor


@dataclass(frozen=True)
class ImageProjections:
    """The projections of one image's hits, with the preprocessed ``(C, H, W)`` input they came from."""

    path: Path
    input: torch.Tensor
    projections: list[Projection]


def _backward(forward: Forward, seeds: torch.Tensor) -> torch.Tensor:
    """One backward pass per seed, through its own image's graph, seeded with the activation's value."""
    projections = []
    for image, channel, y, x in seeds.tolist():
        output = forward.outputs[image]
        signal = torch.zeros_like(output)
        signal[0, channel, y, x] = output[0, channel, y, x].detach()
        (gradient,) = torch.autograd.grad(output, forward.inputs[image], signal, retain_graph=True)
        projections.append(gradient)
    if not projections:
        return forward.activations.new_zeros(0, *forward.inputs[0].shape[1:])
    return torch.cat(projections)


@torch.no_grad()
def walk(chain: Chain, index: int, forward: Forward, seeds: torch.Tensor) -> torch.Tensor:
    """The chain walk: project many activations of chain step ``index`` in one batched pass.

    A seed's signal only ever lives inside its receptive field, so the pass carries one window per
    seed (the same size for all, each at its own origin, possibly overhanging the map) instead of
    whole maps; window positions outside a map are zeroed after every step.

    Args:
        chain: the model's chain (``trace_chain``); ``index``: the step the seeds live in.
        forward: what ``SwitchRecorder`` recorded for a batch of N images at that step.
        seeds: ``(S, 4)`` int64 rows ``[image, channel, y, x]``; each is seeded with its own value.
            They go down ``SEEDS_PER_PASS`` at a time.

    Returns:
        ``(S, C, H, W)`` projections in the model's (normalised) input space.
    """
    if len(seeds) > SEEDS_PER_PASS:
        return torch.cat([walk(chain, index, forward, chunk) for chunk in seeds.split(SEEDS_PER_PASS)])
    activations = forward.activations
    image, channel, y, x = seeds.unbind(1)
    signal = activations.new_zeros(len(seeds), chain.steps[index].output_shape[0], 1, 1)
    signal[torch.arange(len(seeds)), channel, 0, 0] = activations[image, channel, y, x]
    origin = torch.stack([y, x], dim=1)
    for step in reversed(chain.steps[: index + 1]):
        signal, origin = _invert(step, signal, origin, forward.switches.get(step.index), image)
        _zero_outside(signal, origin, step.input_shape[1:])
    return _place(signal, origin, chain.input_size[1:])


def _invert(step: Step, signal: torch.Tensor, origin: torch.Tensor, switches: torch.Tensor | None,
            image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step down: the window of the step's input that the output window reaches, and its origin."""
    module = step.module
    op = ops.for_module(module)
    if op.kind == "rectifier":
        return F.relu(signal), origin
    if op.kind == "skipped":
        return signal, origin
    if op.name == "batch_norm":
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        return signal * scale[:, None, None], origin
    if op.name in ("conv2d", "max_pool2d"):
        kernel, stride, padding, dilation = zip(*(ops.module_geometry(module, axis) for axis in (0, 1)))
        below = origin * torch.tensor(stride, device=origin.device) - torch.tensor(padding, device=origin.device)
        if op.name == "conv2d":
            return _transposed_conv(module, signal), below
        size = tuple((signal.shape[2 + a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1 for a in (0, 1))
        return _unpool(signal, origin, switches, image, step, below, size), below
    if op.name in ("avg_pool2d", "adaptive_avg_pool2d"):
        whole = _place(signal, origin, step.output_shape[1:])
        return _linear_transpose(module, whole, step.input_shape), torch.zeros_like(origin)
    raise LayerError(f"the chain walk cannot pass through {step.name!r} ({type(module).__name__})")


def _transposed_conv(conv: nn.Conv2d, signal: torch.Tensor) -> torch.Tensor:
    """The conv's transpose on a window, without padding: exactly the input window the signal reaches.

    It runs as an ordinary conv with the flipped filters (to stride² sub-pixel channels, then a
    pixel shuffle, when strided): the same sums, several times faster than ``conv_transpose2d``
    on the CPU.
    """
    (sy, sx), weight = conv.stride, conv.weight
    if conv.dilation != (1, 1) or conv.groups != 1:
        return F.conv_transpose2d(signal, weight, stride=conv.stride, dilation=conv.dilation, groups=conv.groups)
    outputs, inputs, kh, kw = weight.shape  # forward: inputs → outputs channels
    th, tw = -(-kh // sy), -(-kw // sx)
    # kernel[(i, r, c), o, th-1-ty, tw-1-tx] = weight[o, i, ty*sy + r, tx*sx + c]
    kernel = F.pad(weight, (0, tw * sx - kw, 0, th * sy - kh)).view(outputs, inputs, th, sy, tw, sx)
    kernel = kernel.permute(1, 3, 5, 0, 2, 4).flip(4, 5).reshape(inputs * sy * sx, outputs, th, tw)
    sub = F.conv2d(signal, kernel, padding=(th - 1, tw - 1))
    n, _, a, b = sub.shape
    full = sub.view(n, inputs, sy, sx, a, b).permute(0, 1, 4, 2, 5, 3).reshape(n, inputs, a * sy, b * sx)
    return full[:, :, : (signal.shape[2] - 1) * sy + kh, : (signal.shape[3] - 1) * sx + kw]


def _unpool(signal: torch.Tensor, origin: torch.Tensor, switches: torch.Tensor, image: torch.Tensor, step: Step,
            below: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Put each value back where its maximum came from; several values on one spot add up.

    ``switches`` are the batch's argmax indices (flat in each input plane), ``image`` each seed's
    image; ``below`` and ``size`` are the origin and size of the input window.
    """
    n, channels, height, width = signal.shape
    in_width = step.input_shape[2]
    windows = _crop(switches, image, origin, (height, width))
    rows = torch.div(windows, in_width, rounding_mode="floor")
    local = (rows - below[:, :1, None, None]) * size[1] + (windows - rows * in_width) - below[:, 1:, None, None]
    # Window positions outside the map carry zeros; point them anywhere valid.
    if _overhangs(origin, (height, width), step.output_shape[1:]):
        local = torch.where(_inside(origin, (height, width), step.output_shape[1:]).bool(), local, 0)
    out = signal.new_zeros(n, channels, size[0] * size[1])
    out.scatter_add_(2, local.flatten(2), signal.flatten(2))
    return out.view(n, channels, *size)


def _crop(maps: torch.Tensor, image: torch.Tensor, origin: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``maps[image[s]]`` cut to each seed's window, positions off the map replaced by the nearest edge."""
    out = maps.new_empty(len(origin), maps.shape[1], *window)
    height, width = maps.shape[2:]
    for s, ((y, x), i) in enumerate(zip(origin.tolist(), image.tolist())):
        if 0 <= y <= height - window[0] and 0 <= x <= width - window[1]:
            out[s] = maps[i, :, y:y + window[0], x:x + window[1]]
        else:
            rows = (torch.arange(window[0], device=maps.device) + y).clamp(0, height - 1)
            cols = (torch.arange(window[1], device=maps.device) + x).clamp(0, width - 1)
            out[s] = maps[i][:, rows[:, None], cols[None, :]]
    return out


def _zero_outside(signal: torch.Tensor, origin: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Zero, in place, the parts of windows that lie off a ``shape`` map (they are no units)."""
    height, width = signal.shape[2:]
    overhanging = (origin.min(1).values < 0) | (origin[:, 0] + height > shape[0]) | (origin[:, 1] + width > shape[1])
    for s in overhanging.nonzero()[:, 0].tolist():
        y, x = origin[s].tolist()
        signal[s, :, : max(0, -y)] = 0
        signal[s, :, max(0, shape[0] - y):] = 0
        signal[s, :, :, : max(0, -x)] = 0
        signal[s, :, :, max(0, shape[1] - x):] = 0


def _overhangs(origin: torch.Tensor, window: tuple[int, int], shape: tuple[int, ...]) -> bool:
    return bool((origin.min() < 0) | (origin[:, 0].max() + window[0] > shape[0]) |
                (origin[:, 1].max() + window[1] > shape[1]))


def _inside(origin: torch.Tensor, window: tuple[int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """``(S, 1, h, w)`` float mask: 1 where each seed's window lies inside a ``shape`` map."""
    rows = origin[:, :1] + torch.arange(window[0], device=origin.device)
    cols = origin[:, 1:] + torch.arange(window[1], device=origin.device)
    valid_rows = (rows >= 0) & (rows < shape[0])
    valid_cols = (cols >= 0) & (cols < shape[1])
    return (valid_rows[:, None, :, None] & valid_cols[:, None, None, :]).float()


def _place(signal: torch.Tensor, origin: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Whole ``(S, C, H, W)`` maps from the windows at their origins (zeros elsewhere)."""
    n, channels, height, width = signal.shape
    out = signal.new_zeros(n, channels, *shape)
    for s, (y, x) in enumerate(origin.tolist()):
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + height, shape[0]), min(x + width, shape[1])
        if y0 < y1 and x0 < x1:
            out[s, :, y0:y1, x0:x1] = signal[s, :, y0 - y:y1 - y, x0 - x:x1 - x]
    return out


def _linear_transpose(module: nn.Module, signal: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Transpose of a linear op (average pooling), exactly, as its vector-Jacobian product."""
    with torch.enable_grad():
        probe = signal.new_zeros(len(signal), *input_shape, requires_grad=True)
        (transposed,) = torch.autograd.grad(module(probe), probe, signal)
    return transposed


def strongest(activations: torch.Tensor, *, top: int = 1, channel: int | None = None,
              position: tuple[int, int] | None = None) -> torch.Tensor:
    """Seeds for each image: the strongest activation of its ``top`` strongest channels.

    With ``channel``, only that channel; with ``position``, only that ``(y, x)``. Channels are
    ranked by their strongest activation (at ``position`` if given).

    Returns:
        ``(S, 4)`` int64 rows ``[image, channel, y, x]``, images in order, strongest first.
    """
    n, k, h, w = activations.shape
    if channel is not None and not 0 <= channel < k:
        raise LayerError(f"channel {channel} out of range; the layer has channels 0..{k - 1}")
    if position is not None and not (0 <= position[0] < h and 0 <= position[1] < w):
        raise LayerError(f"position {position} out of range; the layer's map is {h}×{w}")
    flat = activations.flatten(2)
    if position is not None:
        where = torch.full((n, k), position[0] * w + position[1], device=activations.device)
    else:
        where = flat.argmax(2)
    peak = flat.gather(2, where[:, :, None])[:, :, 0]
    channels = torch.full((n, 1), channel, device=activations.device) if channel is not None else \
        peak.topk(min(top, k), dim=1).indices
    places = where.gather(1, channels)
    images = torch.arange(n, device=activations.device)[:, None].expand_as(channels)
    return torch.stack([images, channels, places // w, places % w], dim=2).reshape(-1, 4)
