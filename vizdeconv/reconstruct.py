"""The whole layer sent down the deconvnet at once, with known or fixed switches (Zhang, Lee &
Lee, "Augmenting Supervised Neural Networks with Unsupervised Objectives", ICML 2016).

``known``: every activation of the layer seeds the deconvnet (Zeiler & Fergus's rules: relu(R)
at each rectifier, transposed convs) and max-pools unpool through the switches recorded on this
image. ``fixed``: each pooled value goes to the top-left cell of its pooling window instead
(the first cell inside the map where padding puts the corner outside it), whatever the image;
overlapping windows add up. Comparing the two shows what the switches carry: the "where" that
pooling throws away. Below a layer with no max-pool the two are the same.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from vizdeconv import ops
from vizdeconv.layers import Layer
from vizdeconv.models import LoadedModel
from vizdeconv.rules import apply_rules
from vizdeconv.switches import PointRecorder

SWITCHES = ("known", "fixed")
DISPLAY_PERCENTILES = (0.5, 99.5)


def has_max_pool(layer: Layer) -> bool:
    """Whether a max-pool runs below ``layer`` (else fixed switches give the known reconstruction)."""
    return "max_pool2d" in layer.point.below


def reconstruct(model: LoadedModel, layer: Layer, images: torch.Tensor, *, switches: str = "known") -> torch.Tensor:
    """``(N, C, H, W)`` reconstructions, in the normalised input space, of the whole of ``layer``.

    Autograd through the model with the deconvnet rule at every rectifier, seeded with the
    layer's own activations; with ``switches="fixed"`` every max-pool's backward is top-left
    unpooling. One backward pass serves the batch: each image's seed reaches only its own input.
    """
    if switches not in SWITCHES:
        raise ValueError(f"switches must be one of {', '.join(SWITCHES)}, got {switches!r}")
    inputs = images.detach().clone().requires_grad_(True)
    with torch.enable_grad(), apply_rules("deconvnet"), _FixedUnpooling(switches == "fixed"), \
            PointRecorder(model.module, layer.point) as recorder:
        output = recorder.run(inputs.clone())  # clone: a model may work on its input in place
        (pixels,) = torch.autograd.grad(output, inputs, output.detach())
    return pixels


class _FixedUnpooling(TorchFunctionMode):
    """While active (and ``on``), every 2D max-pool keeps its forward value but, going down, sends
    each output's signal to the top-left cell of its window (a strided pick's transpose)."""

    def __init__(self, on: bool) -> None:
        super().__init__()
        self.on = on

    def __torch_function__(self, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = function(*args, **kwargs)
        op = ops.for_call(function, args, kwargs)
        if not self.on or op is None or op.name != "max_pool2d":
            return result
        pooled = result[0] if isinstance(result, tuple) else result
        corners = top_left(args[0] if args else kwargs["input"], pooled.shape[-2:],
                           *(op.geometry(args, kwargs, axis) for axis in (0, 1)))
        fixed = corners + (pooled - corners).detach()  # the pool's value, the pick's backward
        return (fixed, *result[1:]) if isinstance(result, tuple) else fixed


def top_left(x: torch.Tensor, size: tuple[int, int], *geometry: tuple[int, int, int, int]) -> torch.Tensor:
    """Each window's top-left cell inside the map (its first cell, or where padding puts that outside the
    map, its first cell inside it), for an ``(h, w)`` output of a pool with per-axis ``(kernel, stride,
    padding, dilation)`` geometry."""
    for axis, ((_, stride, padding, dilation), length) in enumerate(zip(geometry, size)):
        corners = torch.arange(length, device=x.device) * stride - padding
        # a corner in the padding: the window's first cell in the map, a whole number of dilations on
        cells = torch.where(corners < 0, corners + (-corners + dilation - 1) // dilation * dilation, corners)
        x = x.index_select(x.dim() - 2 + axis, cells)
    return x


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' entries (0 where either is constant)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    norm = (a.norm() * b.norm()).item()
    return (a @ b).item() / norm if norm > 0 else 0.0


def display(x: torch.Tensor) -> torch.Tensor:
    """How reconstructions and inputs are shown and compared: each ``(C, H, W)`` on its own, its
    ``DISPLAY_PERCENTILES`` (all channels together) mapped to 0 and 1, clipped."""
    low, high = torch.quantile(x.double().flatten(), torch.tensor(DISPLAY_PERCENTILES, dtype=torch.float64) / 100)
    return ((x.double() - low) / max((high - low).item(), 1e-12)).clamp(0, 1).float()
