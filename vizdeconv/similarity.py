"""Structural similarity (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004) of two pictures.

The paper's settings: an 11×11 Gaussian window with σ = 1.5, C1 = (0.01·L)², C2 = (0.03·L)²
with L = 1 (pictures in 0..1), the SSIM map over every position where the window fits inside the
picture, averaged over positions and then over channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW, SIGMA = 11, 1.5
C1, C2 = 0.01 ** 2, 0.03 ** 2


def gaussian_line(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """``(size,)`` Gaussian weights summing to 1: the window is its outer product with itself."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    return line / line.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two ``(C, H, W)`` (or ``(H, W)``) pictures in 0..1, both at least ``WINDOW`` pixels on a side.

    The window is separable, so each local mean is two 1-D passes (11 + 11 taps, not 121), and the five
    maps it averages go through them together.

    Raises:
        ValueError: different shapes, or a picture smaller than the window.
    """
    if a.shape != b.shape:
        raise ValueError(f"expected pictures of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < WINDOW:
        raise ValueError(f"expected pictures at least {WINDOW} pixels on a side, got {tuple(a.shape[-2:])}")
    x, y = (t.double().reshape(-1, 1, *t.shape[-2:]) for t in (a, b))  # channels as a batch
    line = gaussian_line()
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    local = F.conv2d(F.conv2d(maps, line.view(1, 1, -1, 1).expand(5, 1, -1, 1), groups=5),
                     line.view(1, 1, 1, -1).expand(5, 1, 1, -1), groups=5)
    mean_x, mean_y, square_x, square_y, product = local.unbind(1)
    var_x, var_y = square_x - mean_x ** 2, square_y - mean_y ** 2
    covariance = product - mean_x * mean_y
    index = ((2 * mean_x * mean_y + C1) * (2 * covariance + C2)) / ((mean_x ** 2 + mean_y ** 2 + C1) * (var_x + var_y + C2))
    return index.mean(dim=(1, 2)).mean().item()
