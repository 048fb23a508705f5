"""The deconvnet of Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks"
(ECCV 2014, arXiv 1311.2901), section 2.1.

Keep one activation, zero the rest of its layer, and go down the chain: max-pool → unpool with
the recorded switches (values landing on one position add up, so overlapping pools are exact);
ReLU → ReLU on the signal itself; conv → transposed conv with the same weights, no bias;
BatchNorm (eval) → its per-channel scale; LRN, dropout → skipped; average pooling → its
transpose. Springenberg et al. 2014 show this is backprop with each ReLU's backward replaced by
``relu(grad_out)``; the tests use that as the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vizdeconv.errors import LayerError
from vizdeconv.layers import RECTIFIERS, Chain, Layer, Step, local_geometry
from vizdeconv.switches import Forward

SKIPPED = (nn.LocalResponseNorm, nn.Dropout, nn.Identity)
SEEDS_PER_PASS = 64  # seeds travelling down together: bounds the memory of one pass


@torch.no_grad()
def project(chain: Chain, layer: Layer, forward: Forward, seeds: torch.Tensor) -> torch.Tensor:
    """Project many activations back to input space in one batched pass.

    A seed's signal only ever lives inside its receptive field, so the pass carries one window per
    seed (the same size for all, each at its own origin, possibly overhanging the map) instead of
    whole maps; window positions outside a map are zeroed after every step.

    Args:
        chain: the model's chain (``trace_chain``).
        layer: the layer the seeds live in.
        forward: what ``SwitchRecorder`` recorded for a batch of N images at ``layer``.
        seeds: ``(S, 4)`` int64 rows ``[image, channel, y, x]``; each is seeded with its own value.
            They go down ``SEEDS_PER_PASS`` at a time.

    Returns:
        ``(S, C, H, W)`` projections in the model's (normalised) input space.
    """
    seeds = seeds.to(forward.activations.device)
    if len(seeds) > SEEDS_PER_PASS:
        return torch.cat([project(chain, layer, forward, chunk) for chunk in seeds.split(SEEDS_PER_PASS)])
    activations = forward.activations
    image, channel, y, x = seeds.unbind(1)
    signal = activations.new_zeros(len(seeds), layer.step.output_shape[0], 1, 1)
    signal[torch.arange(len(seeds)), channel, 0, 0] = activations[image, channel, y, x]
    origin = torch.stack([y, x], dim=1)
    for step in reversed(chain.steps[: layer.step.index + 1]):
        signal, origin = _invert(step, signal, origin, forward.switches.get(step.index), image)
        _zero_outside(signal, origin, step.input_shape[1:])
    return _place(signal, origin, chain.input_size[1:])


def check_invertible(chain: Chain, layer: Layer) -> None:
    """Fail early, naming the module, if the deconvnet cannot pass below ``layer``."""
    for step in chain.steps[: layer.step.index + 1]:
        if not isinstance(step.module, (nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.AvgPool2d,
                                        nn.AdaptiveAvgPool2d) + RECTIFIERS + SKIPPED):
            raise LayerError(f"the deconvnet cannot pass through {step.name!r} ({type(step.module).__name__}); "
                             "it knows Conv2d, ReLU, MaxPool2d, BatchNorm2d, AvgPool2d, LocalResponseNorm, Dropout")
        if isinstance(step.module, nn.Conv2d) and step.module.padding_mode != "zeros":
            raise LayerError(f"the deconvnet cannot pass through {step.name!r}: padding_mode "
                             f"{step.module.padding_mode!r} (only 'zeros')")
        if isinstance(step.module, nn.BatchNorm2d) and step.module.running_var is None:
            raise LayerError(f"the deconvnet cannot pass through {step.name!r}: BatchNorm2d without running stats")


def _invert(step: Step, signal: torch.Tensor, origin: torch.Tensor, switches: torch.Tensor | None,
            image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step down: the window of the step's input that the output window reaches, and its origin."""
    module = step.module
    if isinstance(module, RECTIFIERS):
        return F.relu(signal), origin
    if isinstance(module, SKIPPED):
        return signal, origin
    if isinstance(module, nn.BatchNorm2d):
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        return signal * scale[:, None, None], origin
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        kernel, stride, padding, dilation = zip(*(local_geometry(module, axis) for axis in (0, 1)))
        below = origin * torch.tensor(stride, device=origin.device) - torch.tensor(padding, device=origin.device)
        if isinstance(module, nn.Conv2d):
            return _transposed_conv(module, signal), below
        size = tuple((signal.shape[2 + a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1 for a in (0, 1))
        return _unpool(signal, origin, switches, image, step, below, size), below
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        whole = _place(signal, origin, step.output_shape[1:])
        return _linear_transpose(module, whole, step.input_shape), torch.zeros_like(origin)
    raise LayerError(f"the deconvnet cannot pass through {step.name!r} ({type(module).__name__})")


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
