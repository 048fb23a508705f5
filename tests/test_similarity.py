"""SSIM against Wang et al.'s formula evaluated position by position, and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vizdeconv.similarity import ssim


def paper_window() -> np.ndarray:
    """The paper's 11×11 circular-symmetric Gaussian, σ = 1.5, weights summing to 1, built term by term."""
    weights = np.array([[math.exp(-((y - 5) ** 2 + (x - 5) ** 2) / (2 * 1.5 ** 2)) for x in range(11)]
                        for y in range(11)])
    return weights / weights.sum()


def brute_force_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004, eqs. (13)–(17): the weighted local statistics at every position where the
    window fits, the index there, its mean over positions, then over channels."""
    window, c1, c2 = paper_window(), 0.01 ** 2, 0.03 ** 2
    channels = []
    for x, y in zip(a, b):
        values = []
        for top in range(x.shape[0] - 10):
            for left in range(x.shape[1] - 10):
                px, py = x[top:top + 11, left:left + 11], y[top:top + 11, left:left + 11]
                mx, my = (window * px).sum(), (window * py).sum()
                sx = (window * (px - mx) ** 2).sum()
                sy = (window * (py - my) ** 2).sum()
                sxy = (window * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sx + sy + c2)))
        channels.append(np.mean(values))
    return float(np.mean(channels))


def related_pair(shape, seed: int = 0):
    """Two pictures in 0..1 that are alike but not equal: one, and a noisy, dimmer copy of it."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=generator)
    b = (0.7 * a + 0.2 * torch.rand(shape, generator=generator)).clamp(0, 1)
    return a, b


@pytest.mark.parametrize("shape", [(2, 16, 13), (3, 11, 11), (1, 12, 20)])
def test_ssim_equals_the_formula_at_every_position(shape):
    a, b = related_pair(shape)
    expected = brute_force_ssim(a.double().numpy(), b.double().numpy())
    assert 0.05 < expected < 0.95  # a pair in between: neither equal nor unrelated
    assert ssim(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_ssim_averages_channels_and_takes_grey_pictures():
    a, b = related_pair((2, 14, 15), seed=1)
    per_channel = [brute_force_ssim(a[c:c + 1].double().numpy(), b[c:c + 1].double().numpy()) for c in range(2)]
    assert per_channel[0] != pytest.approx(per_channel[1])
    assert ssim(a, b) == pytest.approx(sum(per_channel) / 2, rel=1e-6)
    assert ssim(a[1], b[1]) == pytest.approx(per_channel[1], rel=1e-6)  # (H, W) is one channel


def test_ssim_of_two_flat_pictures_is_the_luminance_term():
    # No variance anywhere: the contrast-structure term is C2/C2 = 1, the luminance term (2μxμy+C1)/(μx²+μy²+C1).
    a, b = torch.full((1, 12, 12), 0.2), torch.full((1, 12, 12), 0.6)
    expected = (2 * 0.2 * 0.6 + 1e-4) / (0.2 ** 2 + 0.6 ** 2 + 1e-4)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-6)


def test_ssim_of_a_picture_with_itself_is_one_and_the_index_is_symmetric():
    a, b = related_pair((2, 16, 16), seed=2)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert ssim(a, b) < 0.99
    assert ssim(a, 1 - a) < 0  # inverted structure: negative correlation


def test_ssim_takes_the_valid_positions_only():
    """A difference only in the corner pixel reaches the one window that covers it, of 4×4 positions;
    with zero padding ("same") it would reach 36 of 16×16."""
    a = torch.full((1, 14, 14), 0.5)
    b = a.clone()
    b[0, 0, 0] = 1.0
    expected = brute_force_ssim(a.double().numpy(), b.double().numpy())
    assert expected < 1.0
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("a, b, match", [
    (torch.zeros(1, 12, 12), torch.zeros(1, 12, 13), r"\(1, 12, 12\) and \(1, 12, 13\)"),
    (torch.zeros(2, 12, 12), torch.zeros(3, 12, 12), "one shape"),
    (torch.zeros(1, 10, 12), torch.zeros(1, 10, 12), "at least 11"),
    (torch.zeros(12, 10), torch.zeros(12, 10), "at least 11"),
])
def test_ssim_refuses_different_shapes_and_pictures_smaller_than_the_window(a, b, match):
    with pytest.raises(ValueError, match=match):
        ssim(a, b)
