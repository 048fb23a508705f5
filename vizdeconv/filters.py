"""Diagnostics of a conv layer's filters, as Zeiler & Fergus used them to fix a network (arXiv 1311.2901,
§3 and Fig. 6): dead filters, the balance of low, mid and high frequencies, aliasing from the stride,
and filters whose RMS exceeds the fixed radius they renormalise to.

Spectra: each filter's frequency response ``W(f) = Σ w[y, x]·exp(-2πi(f_y·y + f_x·x))`` sampled on a
``side × side`` grid (the kernel zero-padded, ``spectrum_side``), its energy ``|W(f)|²`` summed over
the input channels. Band and aliasing fractions are of the energy with the zero-frequency (DC) bin,
the response to a flat image, left out. Radial
frequency ``r = √(f_y² + f_x²)`` in cycles per pixel: low ``r < 1/8`` (periods over 8 px), mid
``1/8 ≤ r < 1/4``, high ``r ≥ 1/4`` (periods under 4 px). Aliasing is the fraction beyond the
Nyquist frequency of the conv's stride, ``|f_y| > 1/(2·stride_y)`` or ``|f_x| > 1/(2·stride_x)``:
what sampling the output at that stride folds back onto lower frequencies.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vizdeconv.errors import LayerError
from vizdeconv.layers import Layer, Layers
from vizdeconv.models import LoadedModel

LOW_EDGE, HIGH_EDGE = 1 / 8, 1 / 4  # band edges, cycles per pixel
RENORMALISE_RMS = 0.1  # ZF §3: filters whose RMS exceeds 10⁻¹ are renormalised to it
DEAD_NORM = 0.01  # a filter is dead when its norm is below this fraction of the layer's median norm
ALIASING_FLAG = 0.5  # flagged when more than this fraction of a filter's energy aliases
MIN_SPECTRUM_SIDE = 64


@dataclass(frozen=True)
class FilterStats:
    """One filter's diagnostics (the JSON keys of ``OUT/filters/layer{N}.json``).

    Attributes:
        filter: the output channel. rms, norm: over all its weights. dead: negligible norm, or
            (with images) never fires. energy_low, energy_mid, energy_high: fractions of its
            non-DC spectral energy per band; None for a filter with no such energy (all zero or
            only an all-zero filter). peak_frequency: radial frequency of its strongest non-DC bin (None likewise).
        aliasing: fraction of its non-DC energy beyond the stride's Nyquist frequency (None likewise);
            aliased: over ``ALIASING_FLAG``, for a filter that is not dead (a dead one's spectrum is noise). renormalise: RMS over ``RENORMALISE_RMS``.
        fires, mean_activation: with images only: the fraction of images on which its rectified
            response is positive somewhere, and the response's mean over images and positions.
    """

    filter: int
    rms: float
    norm: float
    dead: bool
    energy_low: float | None
    energy_mid: float | None
    energy_high: float | None
    peak_frequency: float | None
    aliasing: float | None
    aliased: bool
    renormalise: bool
    fires: float | None = None
    mean_activation: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Responses:
    """What a layer's filters did over a set of images: per filter, on how many images it fired,
    and the sum over images of its mean rectified response."""

    images: int
    fired: torch.Tensor
    activation_sum: torch.Tensor

    def update(self, rectified: torch.Tensor) -> Responses:
        """Fold in an ``(N, K, h, w)`` batch of rectified responses."""
        rectified = rectified.detach().float()
        return Responses(self.images + len(rectified),
                         self.fired + (rectified.flatten(2).amax(2) > 0).sum(0).cpu(),
                         self.activation_sum + rectified.mean((2, 3)).sum(0).cpu().double())

    @classmethod
    def empty(cls, filters: int) -> Responses:
        return cls(0, torch.zeros(filters, dtype=torch.long), torch.zeros(filters, dtype=torch.float64))


def check_convolutional(model: LoadedModel) -> None:
    """Raises ``LayerError`` when the model has no ``nn.Conv2d``: it has no filters to show."""
    if not any(isinstance(m, nn.Conv2d) for m in model.module.modules()):
        raise LayerError(f"{model.name} has no Conv2d layer: there are no filters to show")


def conv_of(model: nn.Module, layers: Layers, layer: Layer) -> tuple[str, nn.Conv2d]:
    """The convolution whose filters ``layer`` shows: a numbered layer's conv (also when named by its
    rectifier), or a conv named itself.

    Raises:
        LayerError: the layer is another kind of module.
    """
    name = layer.conv or layer.point.module_name
    module = model.get_submodule(name)
    if not isinstance(module, nn.Conv2d):
        numbered = ", ".join(f"{n.number} = {n.conv}" for n in layers.numbered()) or "none"
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        raise LayerError(f"{layer.label} is a {type(module).__name__}, not a convolution; numbered layers: {numbered}; "
                         f"conv modules: {', '.join(convs[:6])}{', …' if len(convs) > 6 else ''}")
    return name, module


def spectrum_side(kernel: tuple[int, int]) -> int:
    """The frequency grid's side: at least ``MIN_SPECTRUM_SIDE``, and four samples per kernel tap."""
    return max(MIN_SPECTRUM_SIDE, 4 * max(kernel))


def dilated(weight: torch.Tensor, dilation: tuple[int, int]) -> torch.Tensor:
    """The kernel a dilated conv applies: ``(O, C, kh, kw)`` taps spread ``dilation`` apart, zeros between."""
    out, channels, height, width = weight.shape
    spread = weight.new_zeros(out, channels, (height - 1) * dilation[0] + 1, (width - 1) * dilation[1] + 1)
    spread[:, :, :: dilation[0], :: dilation[1]] = weight
    return spread


def energy_spectra(weight: torch.Tensor, dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """``(O, side, side)`` spectral energy ``Σ_c |W_c(f)|²`` of ``(O, C, kh, kw)`` filters as a conv
    with ``dilation`` applies them, unshifted (bin ``[i, j]`` at frequency ``(fftfreq(side)[i],
    fftfreq(side)[j])``), ``side = spectrum_side`` of the dilated kernel."""
    kernel = dilated(weight.detach().double().cpu(), dilation)
    side = spectrum_side(tuple(kernel.shape[2:]))
    return torch.fft.fft2(kernel, s=(side, side)).abs().square().sum(1)


def regions(side: int, stride: tuple[int, int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Boolean ``side × side`` masks of the spectrum's bins, DC left out of each: the three bands
    (``energy_low``, ``energy_mid``, ``energy_high``), ``aliasing`` (beyond the stride's Nyquist
    frequency) and ``ac`` (every bin but DC); and each bin's radial frequency.

    Bin ``k`` is at ``k / side`` cycles per pixel; the edges are compared in integers, so that a bin
    on an edge always falls on the same side of it.
    """
    k = (torch.fft.fftfreq(side, dtype=torch.float64) * side).round().long()
    k_y, k_x = k[:, None].expand(side, side), k[None, :].expand(side, side)
    squared = (k_y.square() + k_x.square()) * 64  # r < 1/8  ⇔  64·(k_y² + k_x²) < side²
    ac = squared > 0
    return {"ac": ac, "energy_low": ac & (squared < side**2),
            "energy_mid": (squared >= side**2) & (squared < 4 * side**2), "energy_high": squared >= 4 * side**2,
            "aliasing": ac & ((2 * stride[0] * k_y.abs() > side) | (2 * stride[1] * k_x.abs() > side))
            }, (squared.double() / 64).sqrt() / side


def _shares(energy: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Each region's fraction of a ``side × side`` spectrum's non-DC energy (None when there is none)."""
    total = energy[masks["ac"]].sum().item()
    return {name: (energy[masks[name]].sum().item() / total if total > 0 else None)
            for name in ("energy_low", "energy_mid", "energy_high", "aliasing")}


@dataclass(frozen=True)
class Diagnosis:
    """A layer's filters diagnosed: ``filters``, one ``FilterStats`` each; ``summary``, the layer at a
    glance (the JSON's ``summary``); ``spectra``, the ``energy_spectra`` they came from."""

    filters: list[FilterStats]
    summary: dict
    spectra: torch.Tensor


def diagnose(weight: torch.Tensor, stride: tuple[int, int], responses: Responses | None = None, *,
             dilation: tuple[int, int] = (1, 1)) -> Diagnosis:
    """Every filter's ``FilterStats`` from the layer's ``(O, C, kh, kw)`` weights and its conv's stride
    and dilation, and the layer's summary: how many filters are flagged, and its energy per band
    over all its filters (each weighted by its non-DC energy), with the definitions used."""
    weight = weight.detach().double().cpu()
    flat = weight.flatten(1)
    norms, rms = flat.norm(dim=1), flat.square().mean(1).sqrt()
    median = norms.quantile(0.5).item()  # the mean of the middle two for an even count
    energy = energy_spectra(weight, dilation)
    masks, radius = regions(energy.shape[-1], stride)
    seen = responses is not None and responses.images > 0
    ac_radius = radius[masks["ac"]]
    stats = []
    for i in range(len(weight)):
        shares = _shares(energy[i], masks)
        has_energy = shares["aliasing"] is not None
        dead = norms[i].item() <= DEAD_NORM * median or (seen and responses.fired[i].item() == 0)
        stats.append(FilterStats(
            filter=i, rms=rms[i].item(), norm=norms[i].item(), dead=dead, **shares,
            peak_frequency=ac_radius[energy[i][masks["ac"]].argmax()].item() if has_energy else None,
            aliased=has_energy and not dead and shares["aliasing"] > ALIASING_FLAG,
            renormalise=rms[i].item() > RENORMALISE_RMS,
            fires=responses.fired[i].item() / responses.images if seen else None,
            mean_activation=responses.activation_sum[i].item() / responses.images if seen else None))
    summary = {
        "filters": len(stats), "dead": sum(s.dead for s in stats), "aliased": sum(s.aliased for s in stats),
        "renormalise": sum(s.renormalise for s in stats), **_shares(energy.sum(0), masks),
        "median_norm": median, "images": responses.images if responses is not None else 0,
        "definitions": {
            "bands_cycles_per_pixel": {"low": [0, LOW_EDGE], "mid": [LOW_EDGE, HIGH_EDGE],
                                       "high": [HIGH_EDGE, math.sqrt(0.5)]},
            "nyquist_cycles_per_pixel": [1 / (2 * stride[0]), 1 / (2 * stride[1])],
            "spectrum_side": energy.shape[-1], "aliased_above": ALIASING_FLAG, "renormalise_rms": RENORMALISE_RMS,
            "dead": f"norm <= {DEAD_NORM} x the layer's median norm" + ("; or never fires on the images" if seen else ""),
        },
    }
    return Diagnosis(stats, summary, energy)
