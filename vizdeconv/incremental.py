"""Exact incremental occlusion (Krypton: Nakandala, Kumar & Papakonstantinou, SIGMOD 2019).

A square changes only a small region of the early feature maps: its projective field. The clean
image runs once and every step's input is kept; then, for a batch of square positions, each
conv or max-pool computes only the output region the square can change, reading its input
context from the cached clean map (pre-padded once with the op's pad value) with the previous
step's changed patch spliced in, for the whole batch in one gather and one op call. Element-wise
steps (ReLU, eval BatchNorm, LRN, dropout) run on the patch. At the first other op (adaptive
pooling, flatten, linear, anything unknown), or when the region covers the whole map, the full
tensors are assembled and the rest of the chain runs normally. Regions keep one size per batch
and are shifted inward at the borders: recomputing a few unchanged cells stays exact.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vizdeconv import ops
from vizdeconv.layers import Chain, Layer, Layers, Step


def _behaviour(module: nn.Module) -> str | None:
    """``pointwise``, ``local`` (a conv or max-pool, run on regions) or None (run in full from here)."""
    op = ops.for_module(module)
    if op is not None and (op.occlusion == "pointwise" or op.name in ("conv2d", "max_pool2d")):
        return op.occlusion
    return None


def unsupported(layers: Layers, layer: Layer) -> str | None:
    """Why incremental inference cannot run on this model (then occlusion runs brute force), or None."""
    if layers.chain.end != "the model's output":
        return f"the plain chain of modules ends at {layers.chain.end}"
    if layer.chain_index is None:
        return f"{layer.name} is not a module of the plain chain"
    return None


def changed_range(module: nn.Module, axis: int, first: torch.Tensor, end: torch.Tensor, size_out: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows ``[first, end)`` that a change in input rows ``[first, end)`` can reach (per position)."""
    kernel, stride, padding, dilation = ops.module_geometry(module, axis)
    reach = dilation * (kernel - 1)
    low = (-((-(first + padding - reach)) // stride)).clamp(min=0)  # ceil division
    high = ((end - 1 + padding) // stride + 1).clamp(max=size_out)
    return low, torch.maximum(high, low)


def changed_regions(chain: Chain, corners: torch.Tensor, size: int):
    """For each conv or max-pool that incremental inference runs on regions: the step and the exactly
    changed output rows and columns ``[first, end)`` (two ``(N, 2)`` tensors) for squares at ``corners``."""
    first, end = corners, corners + size
    for step in chain.steps:
        behaviour = _behaviour(step.module)
        if behaviour is None:
            return
        if behaviour == "local":
            ranges = [changed_range(step.module, axis, first[:, axis], end[:, axis], step.output_shape[1 + axis])
                      for axis in (0, 1)]
            first, end = torch.stack([r[0] for r in ranges], 1), torch.stack([r[1] for r in ranges], 1)
            yield step, first, end


def batch_order(chain: Chain, corners: torch.Tensor, size: int) -> torch.Tensor:
    """A permutation of the ``(N, 2)`` corners that puts positions with the same changed-region sizes
    next to each other, so that batches cut in this order need little more than their exact regions."""
    keys = [end - first for _, first, end in changed_regions(chain, corners.cpu(), size)]
    if not keys:
        return torch.arange(len(corners))
    signature = torch.cat([k[:, :1] for k in keys] + [k[:, 1:] for k in keys], dim=1).numpy()
    return torch.from_numpy(np.lexsort(signature.T[::-1]).copy())


class IncrementalOcclusion:
    """One image's clean pass, cached, and batched evaluation of occluded copies of it.

    Args:
        chain: a chain that reaches the model's output (see ``unsupported``).
        image: ``(C, H, W)`` preprocessed image, on the model's device.
        layer_index: chain step whose output's per-channel totals are wanted.
    """

    def __init__(self, chain: Chain, image: torch.Tensor, layer_index: int) -> None:
        self.chain = chain
        self.behaviours = [_behaviour(step.module) for step in chain.steps]  # looked up once, used per batch
        self.layer_index = layer_index
        self.inputs = []
        x = image[None]
        with torch.no_grad():
            for step in chain.steps:
                self.inputs.append(x)
                x = step.module(x.clone())  # clone: in-place ReLUs would overwrite the cached input
                if step.index == layer_index:
                    self.layer_output = x[0].clone()
        self.logits = x[0]
        self._padded: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def evaluate(self, corners: torch.Tensor, size: int, fill: torch.Tensor, channel: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, classes)`` and totals ``(B,)`` of ``channel`` at the layer, for the image with a
        ``size`` square of ``fill`` (per channel) at each of the ``(B, 2)`` top-left ``corners``."""
        batch = len(corners)
        patch = fill.view(1, -1, 1, 1).expand(batch, -1, size, size).contiguous()
        origin = corners.to(patch.device)
        changed = (origin, origin + size)  # exactly changed rows/columns [first, end) of the current map
        full = None
        totals = None
        for step in self.chain.steps:
            if full is None and patch.shape[2:] == self.inputs[step.index].shape[2:]:
                full = patch  # the region covers the whole map
            behaviour = self.behaviours[step.index]
            if full is None and behaviour is None:
                full = self._assemble(step.index, patch, origin)
            if full is not None:
                full = step.module(full)
            elif behaviour == "pointwise":
                patch = step.module(patch)
            else:
                patch, origin, changed = self._local(step, patch, origin, changed)
            if step.index == self.layer_index:
                totals = full[:, channel].sum((1, 2)) if full is not None else self._total(patch, origin, channel)
        if full is None:
            full = self._assemble(len(self.chain.steps), patch, origin)
        return full, totals

    def _local(self, step: Step, patch: torch.Tensor, origin: torch.Tensor,
               changed: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """The step's changed output region for every position: gather context, splice, run once.

        The batch shares one region size, the largest exact one; each region starts at its own
        first changed row, shifted inward at the border."""
        module = step.module
        firsts, ends, starts, reads = [], [], [], []
        for axis in (0, 1):
            out = step.output_shape[1 + axis]
            first, end = changed_range(module, axis, changed[0][:, axis], changed[1][:, axis], out)
            size = max(1, int((end - first).max()))
            start = first.clamp(max=out - size)
            kernel, stride, padding, dilation = ops.module_geometry(module, axis)
            firsts.append(first)
            ends.append(end)
            starts.append(start)
            reads.append((start * stride - padding, (size - 1) * stride + dilation * (kernel - 1) + 1, padding))
        padded = self._padded_input(step)
        (top, height, pad_top), (left, width, pad_left) = reads
        rows = top[:, None] + torch.arange(height, device=patch.device)  # input rows, unpadded coordinates
        cols = left[:, None] + torch.arange(width, device=patch.device)
        window = padded[:, rows[:, :, None] + pad_top, cols[:, None, :] + pad_left].transpose(0, 1)
        # Splice the previous step's changed patch over the cached clean values.
        in_rows, in_cols = rows - origin[:, :1], cols - origin[:, 1:]
        inside = ((in_rows >= 0) & (in_rows < patch.shape[2]))[:, :, None] & \
            ((in_cols >= 0) & (in_cols < patch.shape[3]))[:, None, :]
        spliced = patch[torch.arange(len(patch), device=patch.device)[:, None, None], :,
                        in_rows.clamp(0, patch.shape[2] - 1)[:, :, None],
                        in_cols.clamp(0, patch.shape[3] - 1)[:, None, :]].permute(0, 3, 1, 2)
        window = torch.where(inside[:, None], spliced, window)
        if isinstance(module, nn.Conv2d):
            out = F.conv2d(window, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
        else:
            out = F.max_pool2d(window, module.kernel_size, module.stride, 0, module.dilation)
        return out, torch.stack(starts, dim=1), (torch.stack(firsts, dim=1), torch.stack(ends, dim=1))

    def _padded_input(self, step: Step) -> torch.Tensor:
        """The step's clean input, padded once: 0 for conv, −inf for max-pool; the bottom and right
        padding also cover ceil-mode windows."""
        if step.index not in self._padded:
            clean = self.inputs[step.index][0]
            pads = []
            for axis in (1, 0):  # F.pad wants (left, right, top, bottom)
                kernel, stride, padding, dilation = ops.module_geometry(step.module, axis)
                last = (step.output_shape[1 + axis] - 1) * stride - padding + dilation * (kernel - 1)
                pads += [padding, max(padding, last - (step.input_shape[1 + axis] - 1))]
            value = 0.0 if isinstance(step.module, nn.Conv2d) else float("-inf")
            self._padded[step.index] = F.pad(clean, pads, value=value)
        return self._padded[step.index]

    def _assemble(self, index: int, patch: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        """Full maps: the clean input of step ``index`` (or the chain's output) with each patch pasted in."""
        clean = self.inputs[index] if index < len(self.inputs) else self.logits[None]
        full = clean.expand(len(patch), *clean.shape[1:]).clone()
        rows = origin[:, :1] + torch.arange(patch.shape[2], device=patch.device)
        cols = origin[:, 1:] + torch.arange(patch.shape[3], device=patch.device)
        full[torch.arange(len(patch), device=patch.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]] = \
            patch.permute(0, 2, 3, 1)
        return full

    def _total(self, patch: torch.Tensor, origin: torch.Tensor, channel: int) -> torch.Tensor:
        """Channel total from the clean total, with each position's changed region swapped in."""
        clean = self.layer_output[channel]
        rows = origin[:, :1] + torch.arange(patch.shape[2], device=patch.device)
        cols = origin[:, 1:] + torch.arange(patch.shape[3], device=patch.device)
        replaced = clean[rows[:, :, None], cols[:, None, :]].sum((1, 2))
        return clean.sum() - replaced + patch[:, channel].sum((1, 2))


def multiply_adds(chain: Chain, size: int, stride: int) -> tuple[float, float]:
    """Multiply-adds per occluded forward pass, averaged over the square's positions: in full, and
    computing only each conv's exactly changed output region (the theoretical limit of incremental
    inference; the implementation recomputes a little more to keep one region size per batch)."""
    height, width = chain.input_size[1:]
    corners = torch.cartesian_prod(torch.arange(0, height - size + 1, stride), torch.arange(0, width - size + 1, stride))
    changed = {step.index: (end - first).prod(1).double().mean().item()
               for step, first, end in changed_regions(chain, corners, size)}
    full_total = incremental_total = 0.0
    for step in chain.steps:
        full = ops.multiply_adds(step.module, step.output_shape)
        full_total += full
        if step.index in changed:
            full *= changed[step.index] / (step.output_shape[1] * step.output_shape[2])
        incremental_total += full
    return full_total, incremental_total
