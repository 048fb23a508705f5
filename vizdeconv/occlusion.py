"""Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7): slide a grey square over the image.

For every position of the square: p(target class), the most probable class, and the total
(spatially summed) activation of the feature map of ``layer`` that is strongest on the
unoccluded image. The square's top-left corners are 0, T, 2T, … up to H − S inclusive (columns
alike); it is filled after preprocessing, in the model's normalised input space.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vizdeconv.deconv import project, strongest
from vizdeconv.errors import VizDeconvError
from vizdeconv.layers import Chain, Layer
from vizdeconv.models import LoadedModel
from vizdeconv.switches import SwitchRecorder

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


def fill_values(fill: str | float, model: LoadedModel) -> torch.Tensor:
    """The square's per-channel value in normalised input space: ``mean`` is 0; a number is a pixel
    intensity in 0..1 (0.5 = mid-grey), normalised like the image."""
    if fill == "mean":
        return torch.zeros(model.input_size[0])
    try:
        value = float(fill)
    except ValueError:
        raise VizDeconvError(f"--fill expects 'mean' or a pixel value in 0..1, got {fill!r}") from None
    return (value - torch.tensor(model.mean)) / torch.tensor(model.std)


def resolve_target(target: str | int, model: LoadedModel, clean_probabilities: torch.Tensor) -> int:
    """``auto`` (the top class of the unoccluded image), a class index, or a class name."""
    classes = len(clean_probabilities)
    if target == "auto":
        return int(clean_probabilities.argmax())
    if str(target).isdigit() and int(target) < classes:
        return int(target)
    lowered = [c.lower() for c in model.categories]
    if str(target).lower() in lowered:
        return lowered.index(str(target).lower())
    raise VizDeconvError(f"unknown target class {target!r}; expected auto, an index 0..{classes - 1} or a class name "
                         f"such as {', '.join(model.categories[:3])}")


@dataclass(frozen=True)
class OcclusionMaps:
    """One image's maps, h × w = number of square positions down × across.

    Attributes:
        prob_true: p(target) per position. top_class: most probable class per position.
        feature_total: spatial sum of ``channel`` of ``layer`` per position.
        prob_clean, clean_class: p(target) and the top class without a square.
        positions_y, positions_x: top-left corners of the square in input pixels.
    """

    model: str
    prob_true: np.ndarray
    top_class: np.ndarray
    feature_total: np.ndarray
    channel: int
    target: int
    layer: int
    module: str
    size: int
    stride: int
    fill: np.ndarray
    positions_y: np.ndarray
    positions_x: np.ndarray
    prob_clean: float
    clean_class: int
    feature_clean: float

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``maps.npz`` contents (keys documented in the README)."""
        return {name: np.asarray(value) for name, value in self.__dict__.items()}

    @classmethod
    def from_arrays(cls, arrays) -> OcclusionMaps:
        values = {name: arrays[name] for name in cls.__dataclass_fields__}
        for name in ("channel", "target", "layer", "size", "stride", "clean_class"):
            values[name] = int(values[name])
        for name in ("prob_clean", "feature_clean"):
            values[name] = float(values[name])
        values["module"], values["model"] = str(values["module"]), str(values["model"])
        return cls(**values)


def occlude(model: LoadedModel, chain: Chain, layer: Layer, image: torch.Tensor, *, size: int, stride: int,
            fill: torch.Tensor, target: str | int = "auto", batch_size: int = 64,
            progress: Callable[[int, int], None] | None = None) -> OcclusionMaps:
    """All occlusion maps of one preprocessed ``(C, H, W)`` image.

    ``progress(done, total)`` is called after each batch of square positions.
    """
    _, height, width = image.shape
    ys, xs = corners(height, size, stride), corners(width, size, stride)
    image = image.to(model.device)
    fill = fill.to(model.device, image.dtype)[:, None, None]
    with SwitchRecorder(chain, layer, switches=False) as recorder, torch.no_grad():
        clean_probabilities = model.module(image[None]).softmax(1)[0]
        clean = recorder.recorded.activations[0]
        channel = int(clean.flatten(1).max(1).values.argmax())
        target_class = resolve_target(target, model, clean_probabilities)
        places = torch.tensor([(y, x) for y in ys for x in xs])
        prob_true, top_class, feature_total = [], [], []
        for start in range(0, len(places), batch_size):
            chunk = places[start:start + batch_size]
            batch = image.repeat(len(chunk), 1, 1, 1)
            for i, (y, x) in enumerate(chunk.tolist()):
                batch[i, :, y:y + size, x:x + size] = fill
            probabilities = model.module(batch).softmax(1)
            prob_true.append(probabilities[:, target_class].cpu())
            top_class.append(probabilities.argmax(1).cpu())
            feature_total.append(recorder.recorded.activations[:, channel].sum((1, 2)).cpu())
            if progress:
                progress(min(start + batch_size, len(places)), len(places))
    shape = (len(ys), len(xs))
    return OcclusionMaps(
        model=model.name, prob_true=torch.cat(prob_true).view(shape).numpy().astype(np.float32),
        top_class=torch.cat(top_class).view(shape).numpy().astype(np.int64),
        feature_total=torch.cat(feature_total).view(shape).numpy().astype(np.float32),
        channel=channel, target=target_class, layer=layer.number or 0, module=layer.step.name, size=size,
        stride=stride, fill=fill[:, 0, 0].cpu().numpy(), positions_y=np.array(ys), positions_x=np.array(xs),
        prob_clean=float(clean_probabilities[target_class]), clean_class=int(clean_probabilities.argmax()),
        feature_clean=float(clean[channel].sum()))


def strongest_projection(chain: Chain, layer: Layer, image: torch.Tensor, channel: int) -> torch.Tensor:
    """Deconvnet projection of ``channel``'s strongest activation on the unoccluded image (panel c)."""
    with SwitchRecorder(chain, layer) as recorder:
        forward = recorder.forward(image[None])
    return project(chain, layer, forward, strongest(forward.activations, channel=channel))[0].cpu()


def is_same_run(maps: OcclusionMaps, model: str, module: str, size: int, stride: int, fill: torch.Tensor,
                target: str) -> bool:
    """Whether maps written earlier answer this run's question (for resuming)."""
    return (maps.model, maps.module, maps.size, maps.stride) == (model, module, size, stride) and \
        np.allclose(maps.fill, fill.numpy()) and (target == "auto" or str(maps.target) == str(target))


SUMMARY_COLUMNS = ["image", "target", "target_name", "prob_clean", "prob_min", "prob_min_y", "prob_min_x",
                   "other_class", "other_name", "other_fraction"]


def summary_row(image: Path, maps: OcclusionMaps, categories: tuple[str, ...]) -> dict:
    """One ``summary.csv`` row: the lowest p(target) and where, and the most frequent other class."""
    where = np.unravel_index(int(maps.prob_true.argmin()), maps.prob_true.shape)
    others = maps.top_class[maps.top_class != maps.target]
    other = int(np.bincount(others).argmax()) if others.size else -1
    return {"image": str(image), "target": maps.target, "target_name": categories[maps.target],
            "prob_clean": f"{maps.prob_clean:.6f}", "prob_min": f"{maps.prob_true[where]:.6f}",
            "prob_min_y": int(maps.positions_y[where[0]]), "prob_min_x": int(maps.positions_x[where[1]]),
            "other_class": other, "other_name": categories[other] if other >= 0 else "",
            "other_fraction": f"{others.size / maps.top_class.size:.4f}"}


def summary_csv(rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()
