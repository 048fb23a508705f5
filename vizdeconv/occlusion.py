"""Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7): slide a grey square over the image.

For every position of the square: p(target class), the most probable class, and the total
(spatially summed) activation of the feature map of ``layer`` that is strongest on the
unoccluded image. The square's top-left corners are 0, T, 2T, … up to H − S inclusive (columns
alike); it is filled after preprocessing, in the model's normalised input space.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vizdeconv.errors import VizDeconvError
from vizdeconv.incremental import IncrementalOcclusion, batch_order, occluded
from vizdeconv.layers import Layer, Layers
from vizdeconv.models import LoadedModel
from vizdeconv.rules import check_rule
from vizdeconv.switches import PointRecorder

REFERENCE_SIDE, REFERENCE_SIZE, REFERENCE_STRIDE = 224, 50, 8  # defaults for 224² inputs, scaled to others


def default_geometry(input_size: tuple[int, int, int]) -> tuple[int, int]:
    """Square size and stride: 50 and 8 for a 224² input, scaled to the model's input side."""
    side = min(input_size[1:])
    return max(1, round(REFERENCE_SIZE * side / REFERENCE_SIDE)), max(1, round(REFERENCE_STRIDE * side / REFERENCE_SIDE))


def corners(length: int, size: int, stride: int) -> list[int]:
    """Top-left corners along one axis: 0, stride, 2·stride, … up to ``length - size`` inclusive."""
    if size < 1 or stride < 1:
        raise VizDeconvError(f"square size and stride must be at least 1, got size {size}, stride {stride}")
    if size > length:
        raise VizDeconvError(f"the square ({size} px) is larger than the model's input ({length} px)")
    return list(range(0, length - size + 1, stride))


def fill_values(fill: str | float, model: LoadedModel) -> tuple[float, ...]:
    """The square's per-channel value in normalised input space (as float32): ``mean`` is 0; a
    number is a pixel intensity in 0..1 (0.5 = mid-grey), normalised like the image."""
    if fill == "mean":
        return (0.0,) * model.input_size[0]
    try:
        value = float(fill)
    except ValueError:
        raise VizDeconvError(f"--fill expects 'mean' or a pixel value in 0..1, got {fill!r}") from None
    return tuple(np.float32((value - m) / s).item() for m, s in zip(model.mean, model.std))


def parse_target(target: str | int, model: LoadedModel) -> str:
    """``auto`` (the top class of the unoccluded image), or a class index or name → its index, as text."""
    if str(target) == "auto":
        return "auto"
    classes = len(model.categories)
    if str(target).isdigit() and int(target) < classes:
        return str(int(target))
    lowered = [c.lower() for c in model.categories]
    if str(target).lower() in lowered:
        return str(lowered.index(str(target).lower()))
    raise VizDeconvError(f"unknown target class {target!r}; expected auto, an index 0..{classes - 1} or a class name "
                         f"such as {', '.join(model.categories[:3])}")


@dataclass(frozen=True)
class Approximation:
    """Krypton's two approximations, with the defaults chosen from measured error (README).

    Attributes:
        tau: projective-field threshold: each changed region is at most ``tau`` of its map's side
            (1: exact regions). Needs incremental inference.
        drill_factor: adaptive drill-down's coarse step, in positions (1: every position).
        drill_share: the share of coarse blocks, those where p(target) dropped most, evaluated in full.
    """

    tau: float = 0.75
    drill_factor: int = 4
    drill_share: float = 0.25

    KNOBS = {"tau": float, "factor": int, "share": float}

    @classmethod
    def parse(cls, text: str) -> Approximation:
        """``--approximate``'s value: empty or ``default``, or knobs such as ``tau=0.4,factor=2,share=0.5``."""
        values = {}
        for item in filter(None, text.replace("default", "").split(",")):
            key, _, value = item.partition("=")
            try:
                values[key.strip()] = cls.KNOBS[key.strip()](value)
            except (KeyError, ValueError):
                raise VizDeconvError(f"--approximate takes tau=0..1, factor=1.. and share=0..1 (e.g. tau=0.5,factor=4,"
                                     f"share=0.25), got {item!r}") from None
        approximation = cls(values.get("tau", cls.tau), values.get("factor", cls.drill_factor),
                            values.get("share", cls.drill_share))
        if not (0 < approximation.tau <= 1 and approximation.drill_factor >= 1 and 0 <= approximation.drill_share <= 1):
            raise VizDeconvError(f"--approximate needs 0 < tau <= 1, factor >= 1 and 0 <= share <= 1, got {text!r}")
        return approximation

    def describe(self, incremental: bool) -> str:
        """What ran, for ``method``, the figure and the report (the threshold needs incremental inference)."""
        parts = []
        if incremental and self.tau < 1:
            parts.append(f"projective-field threshold tau={self.tau:g}")
        if self.drill_factor > 1:
            parts.append(f"drill-down factor {self.drill_factor}, share {self.drill_share:.0%}")
        return ", ".join(parts) or "no approximation"


@dataclass(frozen=True)
class OcclusionSpec:
    """What an occlusion run asks. Maps made for an equal spec answer it, so resuming is ``maps.spec == spec``.

    Attributes:
        model, layer: the model's name and the layer's module name (``Layer.name``).
        size, stride: the square's side and step in input pixels.
        fill: the square's per-channel value in normalised input space (``fill_values``).
        target: ``auto`` or a class index (``parse_target``).
        rule: the rule of panel (c)'s projection.
        approximate: the approximations asked for, or None for exact maps (either exact method
            answers an exact spec).
    """

    model: str
    layer: str
    size: int
    stride: int
    fill: tuple[float, ...]
    target: str = "auto"
    rule: str = "deconvnet"
    approximate: Approximation | None = None

    @classmethod
    def create(cls, model: LoadedModel, layer: Layer, *, size: int | None = None, stride: int | None = None,
               fill: str | float = "mean", target: str | int = "auto", rule: str = "deconvnet",
               approximate: Approximation | None = None) -> OcclusionSpec:
        """A spec from what a user types: default size and stride (``default_geometry``), ``--fill``,
        ``--target`` as index or name."""
        default_size, default_stride = default_geometry(model.input_size)
        size, stride = size or default_size, stride or default_stride
        for length in model.input_size[1:]:
            corners(length, size, stride)  # refuses a square larger than the input now, not at the first image
        check_rule(rule)
        return cls(model.name, layer.name, size, stride, fill_values(fill, model), parse_target(target, model), rule,
                   approximate)


@dataclass(frozen=True)
class OcclusionMaps:
    """One image's maps, h × w = number of square positions down × across.

    Attributes:
        method: ``incremental`` or ``brute force`` (both exact), or ``approximate (…)``.
        tau, drill_factor, drill_share: the approximation asked for (1, 1, 1 for exact maps).
        prob_true: p(target) per position. top_class: most probable class per position.
        feature_total: spatial sum of ``channel`` of ``layer`` per position.
        prob_clean, clean_class: p(target) and the top class without a square.
        model, module, size, stride, fill, target_asked, rule: the spec the maps answer (``spec``).
        positions_y, positions_x: top-left corners of the square in input pixels.
    """

    model: str
    module: str
    method: str
    prob_true: np.ndarray
    top_class: np.ndarray
    feature_total: np.ndarray
    channel: int
    target: int
    target_asked: str
    rule: str
    layer: int
    size: int
    stride: int
    fill: np.ndarray
    positions_y: np.ndarray
    positions_x: np.ndarray
    prob_clean: float
    clean_class: int
    feature_clean: float
    tau: float = 1.0
    drill_factor: int = 1
    drill_share: float = 1.0

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``maps.npz`` contents (keys documented in the README)."""
        return {name: np.asarray(value) for name, value in self.__dict__.items()}

    @classmethod
    def from_arrays(cls, arrays) -> OcclusionMaps:
        values = {name: arrays[name] for name in cls.__dataclass_fields__}
        for name in ("channel", "target", "layer", "size", "stride", "clean_class", "drill_factor"):
            values[name] = int(values[name])
        for name in ("prob_clean", "feature_clean", "tau", "drill_share"):
            values[name] = float(values[name])
        for name in ("module", "model", "method", "target_asked", "rule"):
            values[name] = str(values[name])
        return cls(**values)

    @property
    def spec(self) -> OcclusionSpec:
        return OcclusionSpec(self.model, self.module, self.size, self.stride, tuple(float(v) for v in self.fill),
                             self.target_asked, self.rule, Approximation(self.tau, self.drill_factor, self.drill_share)
                             if self.method.startswith("approximate") else None)


def occlude(model: LoadedModel, layers: Layers, image: torch.Tensor, spec: OcclusionSpec, *, batch_size: int = 64,
            brute_force: bool = False, progress: Callable[[int, int], None] | None = None) -> OcclusionMaps:
    """All occlusion maps of one preprocessed ``(C, H, W)`` image for ``spec``.

    Exact incremental inference (``incremental.py``) whenever the model allows it; brute force
    (one full forward pass per position, batched) when asked or when it does not.
    ``spec.approximate`` thresholds the projective fields and evaluates only part of the positions
    (``_drill_down``), and says so in ``method``.
    ``progress(done, total)`` is called after each batch of square positions.
    """
    if spec.model != model.name:
        raise VizDeconvError(f"the spec is for model {spec.model!r}, not {model.name!r}")
    layer, size, stride, approximation = layers.layer(spec.layer), spec.size, spec.stride, spec.approximate
    _, height, width = image.shape
    ys, xs = corners(height, size, stride), corners(width, size, stride)
    image = image.to(model.device)
    fill = torch.tensor(spec.fill, device=model.device, dtype=image.dtype)
    grid = torch.tensor([(y, x) for y in ys for x in xs]).view(len(ys), len(xs), 2)
    engine = None if brute_force else IncrementalOcclusion(model.module, image, layer.point)
    if engine is not None and engine.check(size, fill) is not None:
        engine = None  # brute force; ``maps.method`` says so
    if engine is not None:
        clean_logits, clean = engine.logits, engine.layer_output
    else:
        with PointRecorder(model.module, layer.point) as recorder, torch.no_grad():
            clean_logits = model.module(image[None])[0]
            clean = recorder.output[0]
    clean_probabilities = clean_logits.softmax(0)
    channel = int(clean.flatten(1).max(1).values.argmax())
    target_class = int(clean_probabilities.argmax()) if spec.target == "auto" else int(spec.target)
    tau = approximation.tau if approximation else 1.0

    def evaluate(places: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if engine is not None:
            return engine.evaluate(places, size, fill, channel, tau)
        with PointRecorder(model.module, layer.point) as recorder, torch.no_grad():
            logits = model.module(occluded(image, places, size, fill))
            return logits, recorder.output[:, channel].sum((1, 2))

    maps = torch.zeros(3, len(ys), len(xs), dtype=torch.float64)  # p(target), top class, feature total
    done = 0

    def run(cells: torch.Tensor) -> None:
        """Evaluate the grid cells ``(n, 2)`` (row, column indices) in batches, filling ``maps``."""
        nonlocal done
        if not len(cells):
            return
        total = done + len(cells)
        for chunk in cells.split(batch_size):
            logits, totals = evaluate(grid[chunk[:, 0], chunk[:, 1]])
            probabilities = logits.softmax(1)
            values = torch.stack([probabilities[:, target_class], probabilities.argmax(1), totals]).cpu()
            maps[:, chunk[:, 0], chunk[:, 1]] = values.double()
            done += len(chunk)
            if progress:
                progress(done, total)

    cells = torch.cartesian_prod(torch.arange(len(ys)), torch.arange(len(xs)))
    if engine is not None:
        cells = cells[batch_order(engine.tape, grid[cells[:, 0], cells[:, 1]], size, tau)]
    method = "brute force" if engine is None else "incremental"
    knobs = {}
    if approximation:
        _drill_down(run, cells, maps, float(clean_probabilities[target_class]), approximation)
        method = f"approximate ({method}; {approximation.describe(engine is not None)})"
        knobs = dict(tau=approximation.tau, drill_factor=approximation.drill_factor,
                     drill_share=approximation.drill_share)
    else:
        run(cells)
    return OcclusionMaps(
        model=model.name, module=layer.name, method=method, prob_true=maps[0].numpy().astype(np.float32),
        top_class=maps[1].numpy().astype(np.int64), feature_total=maps[2].numpy().astype(np.float32),
        channel=channel, target=target_class, target_asked=spec.target, rule=spec.rule, layer=layer.number or 0,
        size=size, stride=stride, fill=np.array(spec.fill, dtype=np.float32), positions_y=np.array(ys), positions_x=np.array(xs),
        prob_clean=float(clean_probabilities[target_class]), clean_class=int(clean_probabilities.argmax()),
        feature_clean=float(clean[channel].sum()), **knobs)


def not_incremental(model: LoadedModel, layer: Layer, size: int, fill: tuple[float, ...]) -> str | None:
    """Why exact incremental inference cannot run for this model and layer (tried on noise), or None."""
    image = torch.randn(model.input_size, device=model.device)
    return IncrementalOcclusion(model.module, image, layer.point).check(size, torch.tensor(fill, device=model.device))


def _drill_down(run: Callable[[torch.Tensor], None], cells: torch.Tensor, maps: torch.Tensor, prob_clean: float,
                approximation: Approximation) -> None:
    """Adaptive drill-down (Krypton): evaluate every ``drill_factor``-th position along each axis; fill
    the positions between them bilinearly (p(target), feature totals; past the last evaluated row or
    column, its values) and with their block's top class; then evaluate every position of the
    ``drill_share`` of blocks where p(target) dropped most."""
    factor = approximation.drill_factor
    coarse = cells[(cells[:, 0] % factor == 0) & (cells[:, 1] % factor == 0)]
    run(coarse)
    blocks = cells // factor * factor
    maps[1, cells[:, 0], cells[:, 1]] = maps[1, blocks[:, 0], blocks[:, 1]]
    rows, cols = maps.shape[1:]
    evaluated = maps[::2, ::factor, ::factor][None]  # p(target) and feature totals at the coarse positions
    spanned = ((evaluated.shape[2] - 1) * factor + 1, (evaluated.shape[3] - 1) * factor + 1)
    between = F.interpolate(evaluated, size=spanned, mode="bilinear", align_corners=True)
    maps[::2] = F.pad(between, (0, cols - spanned[1], 0, rows - spanned[0]), mode="replicate")[0]
    drop = prob_clean - maps[0, coarse[:, 0], coarse[:, 1]]
    chosen = coarse[drop.argsort(descending=True, stable=True)[: math.ceil(approximation.drill_share * len(coarse))]]
    chosen_blocks = {tuple(c) for c in chosen.tolist()}
    fine = torch.tensor([c for c, b in zip(cells.tolist(), blocks.tolist()) if tuple(b) in chosen_blocks and c != b],
                        dtype=torch.long).view(-1, 2)
    run(fine)
