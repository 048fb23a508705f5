"""Deconvolutional networks: convolutional sparse coding (Zeiler, Krishnan, Taylor & Fergus, CVPR 2010;
Zeiler, Taylor & Fergus, ICCV 2011), the first meaning of "deconvolution".

A decoder-only model: an image ``y`` (C channels) is reconstructed as ``ŷ = Σ_k f_k ∗ z_k`` from K
sparse feature maps ``z``, inferred per image by minimising

    C(z) = λ/2 ‖ŷ − y‖² + Σ_k |z_k|₁

with ISTA (Beck & Teboulle 2009) or FISTA. The maps are the "full" size of the image plus the filter
less one (``code_size``), so every pixel, border ones included, is covered by the same number of code
positions; ``ŷ`` is the *valid* convolution of the maps with the filters. Layers stack through 3D
max pooling (over space and over neighbouring maps) whose switches are latent variables: layer ``l``
codes are inferred against the *image*, going down through the switches of the layers below, and
filters are learned, layer by layer, by least squares (conjugate gradients) and unit-norm renormalising.
``GaussianPooling`` replaces a switch by a 2D Gaussian per pooling region (Zeiler's later "what and
where" pooling), whose mean and precision follow the image's reconstruction error by gradient steps.

Shapes: images ``(N, C, H, W)``; one layer's filters ``(K, C, s, s)``; its codes ``(N, K, H+s−1, W+s−1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

METHODS = ("ista", "fista")
POOLINGS = ("max", "gaussian")


def code_size(height: int, width: int, kernel: int) -> tuple[int, int]:
    """The feature maps' size for an image of ``height × width``: ``(height + kernel − 1, width + kernel − 1)``."""
    return height + kernel - 1, width + kernel - 1


def reconstruct(filters: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``Σ_k f_k ∗ z_k``: the ``(N, C, H, W)`` images that ``(N, K, H+s−1, W+s−1)`` codes make with ``(K, C, s, s)`` filters."""
    return F.conv_transpose2d(codes, filters, padding=filters.shape[-1] - 1)


def correlate(filters: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``reconstruct``: ``(N, C, H, W)`` images to ``(N, K, H+s−1, W+s−1)`` maps."""
    return F.conv2d(images, filters, padding=filters.shape[-1] - 1)


class FourierConvolution:
    """``reconstruct`` and ``correlate`` as products in the Fourier domain: one FFT per map instead of
    s² taps per pixel. A circular convolution at least the code size has no wrap-around where the valid
    convolution is read, so both are exact (up to rounding); the size is rounded up to a product of 2, 3
    and 5, where FFTs are fast (134, for 128² images and 7×7 filters, is 2·67)."""

    def __init__(self, filters: torch.Tensor, height: int, width: int) -> None:
        self.kernel, self.height, self.width = filters.shape[-1], height, width
        self.codes = code_size(height, width, self.kernel)
        self.size = tuple(_fast_length(n) for n in self.codes)
        self.spectrum = torch.fft.rfft2(filters, s=self.size)  # (K, C, P, Q//2+1)

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        product = torch.einsum("nkhw,kchw->nchw", torch.fft.rfft2(codes, s=self.size), self.spectrum)
        start = self.kernel - 1
        return torch.fft.irfft2(product, s=self.size)[..., start:start + self.height, start:start + self.width]

    def correlate(self, images: torch.Tensor) -> torch.Tensor:
        padded = F.pad(images, (self.kernel - 1, 0, self.kernel - 1, 0))
        product = torch.einsum("nchw,kchw->nkhw", torch.fft.rfft2(padded, s=self.size), self.spectrum.conj())
        return torch.fft.irfft2(product, s=self.size)[..., :self.codes[0], :self.codes[1]]


def _fast_length(length: int) -> int:
    """The smallest number at least ``length`` with no prime factor above 5."""
    while True:
        rest = length
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return length
        length += 1


def cost(images: torch.Tensor, filters: torch.Tensor, codes: torch.Tensor, lam: float) -> torch.Tensor:
    """Per image ``λ/2 ‖reconstruct(filters, codes) − images‖² + ‖codes‖₁``, shape ``(N,)``."""
    fit, penalty = cost_terms(reconstruct(filters, codes), images, codes, lam)
    return fit + penalty


def cost_terms(reconstruction: torch.Tensor, images: torch.Tensor, codes: torch.Tensor, lam: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cost's two terms per image: ``λ/2 ‖reconstruction − images‖²`` and ``‖codes‖₁``."""
    fit = 0.5 * lam * (reconstruction - images).square().flatten(1).sum(1)
    return fit, codes.abs().flatten(1).sum(1)


class Linear:
    """A linear map from codes to images and its exact adjoint: what ISTA needs."""

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Convolution(Linear):
    """One layer's ``reconstruct`` (``fft``: as Fourier products)."""

    def __init__(self, filters: torch.Tensor, height: int, width: int, *, fft: bool = False) -> None:
        self.filters, self.height, self.width = filters, height, width
        self.fourier = FourierConvolution(filters, height, width) if fft else None

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        return self.fourier.reconstruct(codes) if self.fourier else reconstruct(self.filters, codes)

    def adjoint(self, images: torch.Tensor) -> torch.Tensor:
        return self.fourier.correlate(images) if self.fourier else correlate(self.filters, images)


MARGIN = 1.05  # power iteration approaches ‖A‖² from below: the step is taken for a norm this much larger
POWER_ITERATIONS, POWER_TOLERANCE = 50, 1e-3


def operator_norms(operator: Linear, shape: Sequence[int], *, device=None, iterations: int = POWER_ITERATIONS,
                   tolerance: float = POWER_TOLERANCE) -> torch.Tensor:
    """Per sample ``‖A‖²`` (the largest eigenvalue of AᵀA), by power iteration (``power_iteration``), times ``MARGIN``.

    ISTA's cost falls at every step for any estimate over half the true value (its step may go up to 2/‖A‖²);
    FISTA wants the estimate at or above it, hence the margin.
    """
    estimate, _ = power_iteration(operator, start_vector(shape, device), iterations=iterations, tolerance=tolerance)
    return MARGIN * estimate


def start_vector(shape: Sequence[int], device=None) -> torch.Tensor:
    """The power iteration's start: one seeded random vector, the same for every sample, so that an image's
    estimate does not depend on the others in its batch."""
    one = torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(0))
    return one.expand(tuple(shape)).to(device)


def power_iteration(operator: Linear, vector: torch.Tensor, *, iterations: int, tolerance: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``iterations`` of ``v ← AᵀA v / ‖v‖`` per sample: the estimates of ‖A‖² and the last vectors
    (to go on from when A changes a little). A sample's estimate is kept from the first iteration that
    moves it by under ``tolerance`` (relative); the loop ends when every sample's is kept."""
    estimate = torch.zeros(vector.shape[0], device=vector.device)
    kept = torch.zeros_like(estimate, dtype=torch.bool)
    for _ in range(iterations):
        vector = vector / vector.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (vector.ndim - 1))
        image = operator(vector)
        previous = estimate
        estimate = torch.where(kept, estimate, image.flatten(1).square().sum(1))
        vector = operator.adjoint(image)
        kept |= (estimate - previous).abs() <= tolerance * estimate
        if kept.all():
            break
    return estimate.clamp_min(1e-12), vector


def shrink(codes: torch.Tensor, threshold: torch.Tensor, *, nonnegative: bool) -> torch.Tensor:
    """The L1 proximal step: ``sign(z)·max(|z| − t, 0)``, or ``max(z − t, 0)`` with ``nonnegative``."""
    if nonnegative:
        return (codes - threshold).clamp_min(0)
    return codes.sign() * (codes.abs() - threshold).clamp_min(0)


def iterates(images: torch.Tensor, operator: Linear, code_shape: Sequence[int], *, lam: float,
             method: str = "ista", nonnegative: bool = False, codes: torch.Tensor | None = None,
             norms: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """The codes after each ISTA or FISTA step on ``λ/2 ‖A z − y‖² + ‖z‖₁``, without end.

    Step β = 1/(λ‖A‖²) per image (``operator_norms`` unless given): gradient step ``z − βλAᵀ(Az − y)``,
    then ``shrink`` by β. FISTA adds Nesterov's momentum (Beck & Teboulle 2009). Each step reads ``norms``
    afresh, so a caller whose operator changes a little may update them in place without a restart.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if norms is None:
        norms = operator_norms(operator, code_shape, device=images.device)
    codes = torch.zeros(tuple(code_shape), device=images.device) if codes is None else codes
    momentum, point = 1.0, codes
    while True:
        step = (1.0 / (lam * norms)).view(-1, *[1] * (len(code_shape) - 1))
        gradient = lam * operator.adjoint(operator(point) - images)
        previous, codes = codes, shrink(point - step * gradient, step, nonnegative=nonnegative)
        if method == "fista":
            momentum, last = (1 + math.sqrt(1 + 4 * momentum ** 2)) / 2, momentum
            point = codes + ((last - 1) / momentum) * (codes - previous)
        else:
            point = codes
        yield codes


def infer(images: torch.Tensor, filters: torch.Tensor, *, lam: float, steps: int, method: str = "ista",
          nonnegative: bool = False, fft: bool = False) -> torch.Tensor:
    """One layer's sparse codes for ``(N, C, H, W)`` images: ``steps`` of ISTA or FISTA from zero.

    Args:
        filters: ``(K, C, s, s)``. lam: λ, the weight of the reconstruction term. method: "ista" or "fista".
        nonnegative: project the codes onto z ≥ 0. fft: convolve in the Fourier domain.

    Returns:
        ``(N, K, H+s−1, W+s−1)`` codes, on the filters' device (the images are moved there).
    """
    images = images.to(filters.device)
    operator = Convolution(filters, images.shape[-2], images.shape[-1], fft=fft)
    shape = (images.shape[0], filters.shape[0], *code_size(images.shape[-2], images.shape[-1], filters.shape[-1]))
    with torch.no_grad():  # one norm for every image: the operator is the same
        norms = operator_norms(operator, (1, *shape[1:]), device=images.device).expand(shape[0])
        codes = torch.zeros(shape, device=images.device)
        return _run(iterates(images, operator, shape, lam=lam, method=method, nonnegative=nonnegative, norms=norms,
                             codes=codes), steps, codes)


# --- pooling between layers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """3D pooling regions: ``maps`` neighbouring maps × ``size`` × ``size`` positions, not overlapping."""

    maps: int = 2
    size: int = 2

    def pooled_shape(self, shape: Sequence[int]) -> tuple[int, int, int, int]:
        n, k, h, w = shape
        return n, k // self.maps, -(-h // self.size), -(-w // self.size)

    def regions(self, maps: torch.Tensor) -> torch.Tensor:
        """``(N, K, H, W)`` maps as ``(N, K/maps, H', W', maps·size·size)`` regions (zero-padded at the far edges)."""
        n, k, h, w = maps.shape
        if k % self.maps:
            raise ValueError(f"pooling over {self.maps} neighbouring maps needs a multiple of {self.maps} maps, got {k}")
        _, groups, rows, columns = self.pooled_shape(maps.shape)
        padded = F.pad(maps, (0, columns * self.size - w, 0, rows * self.size - h))
        blocks = padded.view(n, groups, self.maps, rows, self.size, columns, self.size)
        return blocks.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, groups, rows, columns, -1)

    def maps_of(self, regions: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The inverse of ``regions``: back to ``(N, K, height, width)``."""
        n, groups, rows, columns, _ = regions.shape
        blocks = regions.view(n, groups, rows, columns, self.maps, self.size, self.size)
        maps = blocks.permute(0, 1, 4, 2, 5, 3, 6).reshape(n, groups * self.maps, rows * self.size,
                                                           columns * self.size)
        return maps[..., :height, :width]

    def max(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each region's value of largest magnitude (sign kept) and its switch (index in the region)."""
        regions = self.regions(maps)
        switches = regions.abs().argmax(-1)
        return regions.gather(-1, switches.unsqueeze(-1)).squeeze(-1), switches


class Unpooling(Linear):
    """Pooled maps back to a layer's maps, each region's value put where its latent variables say."""

    def __init__(self, pool: Pool, height: int, width: int) -> None:
        self.pool, self.height, self.width = pool, height, width

    @property
    def pooled_size(self) -> tuple[int, int]:
        """The pooled maps' (H', W')."""
        return self.pool.pooled_shape((1, self.pool.maps, self.height, self.width))[2:]

    def weights(self) -> torch.Tensor:
        """``(N, G, H', W', maps·size·size)``: how each region spreads its pooled value."""
        raise NotImplementedError

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.pool.maps_of(pooled.unsqueeze(-1) * self.weights(), self.height, self.width)

    def adjoint(self, maps: torch.Tensor) -> torch.Tensor:
        return (self.pool.regions(maps) * self.weights()).sum(-1)


class MaxUnpooling(Unpooling):
    """Each pooled value back at its switch (ICCV 2011's 3D max pooling)."""

    def __init__(self, pool: Pool, switches: torch.Tensor, height: int, width: int) -> None:
        super().__init__(pool, height, width)
        self._weights = F.one_hot(switches, pool.maps * pool.size ** 2).float()

    def weights(self) -> torch.Tensor:
        return self._weights


class GaussianPooling(Unpooling):
    """Each pooled value spread over its region's map (the switch's) by a 2D Gaussian, ``exp(−ρ/2 ‖x − μ‖²)``.

    The "where" variables, mean μ (row, column inside the region) and log precision log ρ, are tensors
    with ``requires_grad`` that the image's reconstruction error moves by the chain rule. They start at
    the max switch with ρ = ``precision``; the peak weight is 1, so as ρ grows this becomes max unpooling.
    """

    def __init__(self, pool: Pool, switches: torch.Tensor, height: int, width: int, *, precision: float = 2.0) -> None:
        super().__init__(pool, height, width)
        cells = pool.size ** 2
        self.map_choice = F.one_hot(switches // cells, pool.maps).float()  # (N, G, H', W', maps)
        place = switches % cells
        self.mean = torch.stack([place // pool.size, place % pool.size], -1).float().requires_grad_()
        self.log_precision = torch.full(switches.shape, math.log(precision), device=switches.device,
                                        requires_grad=True)
        offsets = torch.arange(pool.size, dtype=torch.float32, device=switches.device)
        self.grid = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1).view(-1, 2)  # (size², 2)

    def weights(self) -> torch.Tensor:
        distance = (self.grid - self.mean.unsqueeze(-2)).square().sum(-1)          # (N, G, H', W', size²)
        spatial = torch.exp(-0.5 * self.log_precision.exp().unsqueeze(-1) * distance)
        return (self.map_choice.unsqueeze(-1) * spatial.unsqueeze(-2)).flatten(-2)  # maps × size² per region

    def parameters(self) -> list[torch.Tensor]:
        return [self.mean, self.log_precision]


class TopDown(Linear):
    """The codes of a layer down to the image: its filters, then unpooling and filters of each layer below."""

    def __init__(self, filters: Sequence[torch.Tensor], unpoolings: Sequence[Unpooling], height: int, width: int
                 ) -> None:
        sizes = [(height, width), *(unpooling.pooled_size for unpooling in unpoolings)]  # what each layer makes
        self.convolutions = [Convolution(f, *size) for f, size in zip(filters, sizes)]
        self.unpoolings = list(unpoolings)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        maps = self.convolutions[-1](codes)
        for convolution, unpooling in zip(self.convolutions[-2::-1], self.unpoolings[::-1]):
            maps = convolution(unpooling(maps))
        return maps

    def adjoint(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.convolutions[0].adjoint(images)
        for convolution, unpooling in zip(self.convolutions[1:], self.unpoolings):
            maps = convolution.adjoint(unpooling.adjoint(maps))
        return maps


# --- the stacked model -----------------------------------------------------------------------------------


@dataclass
class SparseModel:
    """A deconvolutional network: per layer its filters and λ, the pooling between layers.

    Attributes:
        filters: per layer ``(K_l, C_l, s, s)``, with ``C_1`` the image channels and ``C_{l+1} = K_l / pool.maps``.
        lams: per layer λ. pool: the 3D pooling between layers. nonnegative: codes kept ≥ 0.
    """

    filters: list[torch.Tensor]
    lams: list[float]
    pool: Pool = field(default_factory=Pool)
    nonnegative: bool = False

    @property
    def channels(self) -> int:
        return self.filters[0].shape[1]

    @property
    def device(self) -> torch.device:
        return self.filters[0].device

    def to(self, device) -> SparseModel:
        return SparseModel([f.to(device) for f in self.filters], self.lams, self.pool, self.nonnegative)


@dataclass
class Inference:
    """One batch's inferred latent variables, layer by layer.

    Attributes:
        codes: per layer ``(N, K_l, …)``. unpoolings: per layer below the top one, how its pooled maps go back.
        operators: per layer, its codes down to the image (``TopDown``).
    """

    codes: list[torch.Tensor]
    unpoolings: list[Unpooling]
    operators: list[TopDown]

    def reconstructions(self) -> list[torch.Tensor]:
        """Per layer, the image its codes make on their own."""
        with torch.no_grad():
            return [operator(codes) for operator, codes in zip(self.operators, self.codes)]


def code_sizes(model: SparseModel, height: int, width: int) -> list[tuple[int, int]]:
    """Per layer, its code maps' size for images of ``height × width``: each layer's codes are its input's
    ``code_size``, and the input above the first is the pooled codes below."""
    sizes = []
    for filters in model.filters:
        height, width = code_size(height, width, filters.shape[-1])
        sizes.append((height, width))
        _, _, height, width = model.pool.pooled_shape((1, model.pool.maps, height, width))
    return sizes


def infer_layers(model: SparseModel, images: torch.Tensor, *, steps: int, layers: int | None = None,
                 method: str = "fista", pooling: str = "max", where_steps: int = 5, where_rate: float = 0.05
                 ) -> Inference:
    """Codes for every layer up to ``layers`` (default all), each against the image (ICCV 2011).

    Layer 1 runs ``steps`` of ISTA/FISTA; its 3D max pooling sets the switches (latent variables) through
    which layer 2's codes reach the image, and so on. With ``pooling="gaussian"`` each layer above the first
    runs its ``steps`` ISTA/FISTA steps in blocks of ``where_steps``, with one Adam step of ``where_rate`` on the
    Gaussians of the pooling below it (mean, log precision) between blocks; FISTA's momentum carries across. Gaussians
    beat max switches on the cost from about 100 steps (measured); with fewer the codes have not caught up.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    images = images.to(model.device)
    layers = len(model.filters) if layers is None else layers
    height, width = images.shape[-2:]
    sizes = code_sizes(model, height, width)
    codes, unpoolings, operators = [], [], []
    for layer in range(layers):
        operator = TopDown(model.filters[:layer + 1], unpoolings, height, width)
        shape = (images.shape[0], model.filters[layer].shape[0], *sizes[layer])
        below = unpoolings[-1] if unpoolings and isinstance(unpoolings[-1], GaussianPooling) else None
        found = _infer(images, operator, shape, lam=model.lams[layer], steps=steps, method=method,
                       nonnegative=model.nonnegative, gaussians=below, where_steps=where_steps, where_rate=where_rate)
        codes.append(found)
        operators.append(operator)
        if layer + 1 < layers:
            _, switches = model.pool.max(found)
            kind = GaussianPooling if pooling == "gaussian" else MaxUnpooling
            unpoolings.append(kind(model.pool, switches, *found.shape[-2:]))
    return Inference(codes, unpoolings, operators)


def _infer(images, operator: TopDown, shape, *, lam, steps, method, nonnegative, gaussians: GaussianPooling | None,
           where_steps, where_rate):
    codes = torch.zeros(shape, device=images.device)
    with torch.no_grad():
        estimate, vector = power_iteration(operator, start_vector(shape, images.device), iterations=POWER_ITERATIONS,
                                           tolerance=POWER_TOLERANCE)
        if gaussians is None:
            return _run(iterates(images, operator, shape, lam=lam, method=method, nonnegative=nonnegative,
                                 norms=MARGIN * estimate), steps, codes)
    optimiser = torch.optim.Adam(gaussians.parameters(), lr=where_rate)
    norms = MARGIN * estimate
    solver = iterates(images, operator, shape, lam=lam, method=method, nonnegative=nonnegative, codes=codes,
                      norms=norms)  # one solver throughout: FISTA's momentum carries across the Gaussians' moves
    done = 0
    while done < steps:
        if done:  # the Gaussians move, then the codes follow: the codes returned fit the Gaussians kept
            optimiser.zero_grad()
            (0.5 * lam * (operator(codes) - images).square().sum()).backward()
            optimiser.step()
            with torch.no_grad():  # A changed a little: a few more power iterations from the last vector
                estimate, vector = power_iteration(operator, vector, iterations=3)
                norms.copy_(MARGIN * estimate)
        count = min(where_steps, steps - done)
        with torch.no_grad():
            codes = _run(solver, count, codes)
        done += count
    return codes


def _run(steps: Iterator[torch.Tensor], count: int, codes: torch.Tensor) -> torch.Tensor:
    """The codes after ``count`` steps (``codes`` after none)."""
    for _, codes in zip(range(count), steps):  # range first: no step computed past the last
        pass
    return codes


# --- learning the filters ----------------------------------------------------------------------------------


def initial_filters(count: int, channels: int, kernel: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, channels, kernel, kernel)`` Gaussian random filters of unit L2 norm."""
    return unit_norm(torch.randn(count, channels, kernel, kernel, generator=generator))


def patch_filters(inputs: torch.Tensor, count: int, kernel: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` filters cut from ``(N, C, H, W)`` inputs (a layer's images or pooled maps) around places drawn
    in proportion to ``|input|``, plus 1 % noise, unit norm: learning from random filters leaves most of them
    noise for many epochs on sparse data, and drifts less from these."""
    weights = inputs.abs().sum(1).flatten().cpu() + 1e-12
    places = torch.multinomial(weights, count, replacement=bool((weights > 1e-12).sum() < count), generator=generator)
    padded = F.pad(inputs.cpu(), (kernel // 2, kernel - 1 - kernel // 2) * 2)
    patches = []
    for place in places.tolist():
        image, pixel = divmod(place, inputs.shape[-2] * inputs.shape[-1])
        row, column = divmod(pixel, inputs.shape[-1])
        patches.append(padded[image, :, row:row + kernel, column:column + kernel])
    patches = torch.stack(patches)
    noise = torch.randn(patches.shape, generator=generator)
    return unit_norm(unit_norm(patches) + 0.01 * noise)


def unit_norm(filters: torch.Tensor) -> torch.Tensor:
    """Each filter divided by its L2 norm (a zero filter stays zero)."""
    return filters / filters.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def least_squares(render: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor, start: torch.Tensor, *,
                  iterations: int) -> torch.Tensor:
    """``iterations`` of conjugate gradients on ``min_x ½‖render(x) − target‖²`` from ``start``, for a linear
    ``render`` (its adjoint comes from autograd)."""

    def adjoint(x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(render(x), x, grad_outputs=images)
        return gradient

    x = start.detach().clone()
    with torch.enable_grad():
        residual = adjoint(x, target - render(x).detach())
        direction, size = residual, residual.square().sum()
        for _ in range(iterations):
            if size <= 1e-20:
                break
            product = adjoint(direction, render(direction).detach())
            alpha = size / (direction * product).sum().clamp_min(1e-30)
            x = x + alpha * direction
            residual = residual - alpha * product
            size, previous = residual.square().sum(), size
            direction = residual + (size / previous) * direction
    return x.detach()


@dataclass(frozen=True)
class BatchCost:
    """One training batch's mean cost per image at the layer being learned, and its two terms."""

    images: int
    fit: float
    penalty: float

    @property
    def cost(self) -> float:
        return self.fit + self.penalty


def layer_inputs(model: SparseModel, images: torch.Tensor, layer: int, *, steps: int) -> torch.Tensor:
    """What layer ``layer`` (0-based) codes: the images, or the pooled codes of the layer below."""
    if layer == 0:
        return images
    codes = infer_layers(model, images.to(model.device), steps=steps, layers=layer).codes[-1]
    return model.pool.max(codes)[0]


def train_epoch(model: SparseModel, layer: int, batches: Iterable[torch.Tensor], *, steps: int,
                cg_iterations: int = 1) -> Iterator[BatchCost]:
    """One pass of learning layer ``layer``'s filters (0-based) over ``batches``, updating ``model`` in place.

    Per batch: infer the codes of every layer up to this one against the images (``infer_layers``, FISTA,
    max switches), then ``cg_iterations`` of conjugate gradients on the image's reconstruction error over
    this layer's filters, with the codes and switches fixed, then renormalise each filter to unit norm.
    One iteration (steepest descent with exact line search) is the default: more overshoot the unit norm
    and the cost climbs from epoch to epoch (measured on Fashion-MNIST). Yields the batch's cost before
    the update.
    """
    for images in batches:
        images = images.to(model.device)
        inference = infer_layers(model, images, steps=steps, layers=layer + 1)
        codes = inference.codes[-1]
        fit, penalty = cost_terms(inference.operators[-1](codes), images, codes, model.lams[layer])
        height, width = images.shape[-2:]

        def render(filters: torch.Tensor) -> torch.Tensor:
            return TopDown([*model.filters[:layer], filters], inference.unpoolings, height, width)(codes)

        solved = least_squares(render, images, model.filters[layer], iterations=cg_iterations)
        model.filters[layer] = unit_norm(solved)
        yield BatchCost(len(images), fit.mean().item(), penalty.mean().item())
