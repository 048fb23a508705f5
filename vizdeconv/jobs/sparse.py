"""``vizdeconv sparse train|infer|filters``: deconvolutional networks as jobs (``vizdeconv.sparse``).

Layout under ``OUT/sparse``: per image ``<stem>/sparse.png`` and ``<stem>/sparse.npz`` (keys in the
README), ``filters.png`` (the filter sheets), and ``index.json`` for the report. Training writes one
model file (``sparse_files``), after every epoch, so that a rerun goes on where it stopped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vizdeconv import figures, report
from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.jobs import Progress, find_inputs, find_outputs, no_progress, save_manifest
from vizdeconv.models import resolve_device
from vizdeconv.outputs import save_npz, save_png
from vizdeconv.resume import check_settings, file_listing
from vizdeconv.sparse import (
    METHODS,
    POOLINGS,
    BatchCost,
    Pool,
    SparseModel,
    TopDown,
    Unpooling,
    code_sizes,
    cost_terms,
    infer_layers,
    layer_inputs,
    patch_filters,
    train_epoch,
)
from vizdeconv.sparse_files import load_model, model_path, read_image, save_model

FOLDER = "sparse"
TITLE = "Deconvolutional network (Zeiler et al. 2010/2011): sparse codes"
STRONGEST = 6  # feature maps shown per layer
FILTER_TILE = 48  # a filter's side on the sheet


@dataclass(frozen=True)
class TrainProgress:
    """Where training is: ``layer`` and ``epoch`` (1-based) of ``epochs``, ``batch`` of ``batches``, and the last
    batch's mean cost per image with its two terms."""

    layer: int
    epoch: int
    epochs: int
    batch: int
    batches: int
    cost: BatchCost | None


@dataclass(frozen=True)
class TrainReport:
    """What a ``SparseTrainJob`` did: the model file, the images it learned from, where an earlier run in the file
    had stopped (layer, epochs done; None for a fresh start), how many epochs this run trained, and the last
    epoch's costs per layer."""

    model: Path
    images: int
    resumed_from: tuple[int, int] | None
    epochs_run: int
    costs: list[dict]
    failures: list[ImageError]


class SparseTrainJob:
    """Learn a deconvolutional network on image files, layer by layer (Zeiler et al. 2010, 2011).

    Args:
        out: the model file (written after every epoch; a rerun with the same settings goes on from it).
        maps: feature maps per layer (as many layers as entries). kernel: filter side. lams: λ per layer.
        epochs: passes over the images per layer. steps: FISTA steps of each batch's inference.
        batch_size: images per filter update. pool: the 3D pooling between layers. nonnegative: codes ≥ 0.
        seed: filters' initial values and the order of images. restart: discard a different run in ``out``.
        device: auto, cpu or cuda.
    """

    def __init__(self, out: str | os.PathLike, *, maps: Sequence[int] = (16, 48), kernel: int = 7,
                 lams: Sequence[float] = (5.0, 5.0), epochs: int = 10, steps: int = 50, batch_size: int = 32,
                 pool: Pool = Pool(), nonnegative: bool = False, seed: int = 0, restart: bool = False,
                 device: str = "auto") -> None:
        if epochs < 1 or steps < 1 or batch_size < 1:
            raise VizDeconvError(f"epochs, steps and batch size must be at least 1, got {epochs}, {steps}, {batch_size}")
        if pool.maps < 1 or pool.size < 1:
            raise VizDeconvError(f"--pool takes two positive numbers MAPS,SIZE, got {pool.maps},{pool.size}")
        if any(m < 1 for m in maps) or kernel < 1 or not all(0 < v < math.inf for v in lams):
            raise VizDeconvError(f"--maps, --kernel and --lam must be positive and finite, got maps "
                                 f"{','.join(map(str, maps))}, kernel {kernel}, λ {','.join(map(str, lams))}")
        if len(lams) != len(maps):
            raise VizDeconvError(f"--lam needs one value per layer ({len(maps)}), got {len(lams)}")
        if any(m % pool.maps for m in maps[:-1]):
            raise VizDeconvError(f"--maps {','.join(map(str, maps))}: each layer below the top must have a "
                                 f"multiple of {pool.maps} maps (pooling over {pool.maps} neighbouring maps)")
        self.out, self.maps, self.kernel, self.lams = Path(out), list(maps), kernel, [float(v) for v in lams]
        self.epochs, self.steps, self.batch_size, self.pool = epochs, steps, batch_size, pool
        self.nonnegative, self.seed, self.restart = nonnegative, seed, restart
        self.device = resolve_device(device)

    def settings(self, images: Sequence[Path], size: Sequence[int]) -> dict:
        """What a rerun must match to go on from the file."""
        return {"maps": self.maps, "kernel": self.kernel, "lams": self.lams, "epochs": self.epochs,
                "steps": self.steps, "batch_size": self.batch_size, "pool": [self.pool.maps, self.pool.size],
                "nonnegative": self.nonnegative, "seed": self.seed, "image_size": list(size),
                "files": file_listing(images)}

    def run(self, paths: Iterable[str | os.PathLike],
            progress: Callable[[TrainProgress], None] = lambda step: None) -> TrainReport:
        """Train on the image files under ``paths``; images of another size or channel count than the first fail.

        Raises:
            VizDeconvError: no usable image. SettingsChanged: ``out`` holds another run (without ``restart``).
        """
        images, failures = _read_training_images(paths)
        settings = self.settings([path for path, _ in images], images[0][1].shape)
        data = torch.stack([image for _, image in images])
        model, trained, resumed = self._start(settings)
        costs, epochs_run = trained.get("costs", []), 0
        for layer in range(trained["layers_done"], len(self.maps)):
            if layer == len(model.filters):  # cut from what the layer codes, in a seeded draw of a batch of images
                generator = _generator(self.seed, layer)
                drawn = data[torch.randperm(len(data), generator=generator)[:self.batch_size]]
                inputs = layer_inputs(model, drawn, layer, steps=self.steps)
                model.filters.append(patch_filters(inputs, self.maps[layer], self.kernel, generator).to(self.device))
            start = trained["epochs_done"] if layer == trained["layers_done"] else 0
            for epoch in range(start, self.epochs):
                order = torch.randperm(len(data), generator=_generator(self.seed, layer, epoch))
                batches = data[order].split(self.batch_size)
                done = []
                progress(TrainProgress(layer + 1, epoch + 1, self.epochs, 0, len(batches), None))
                for i, cost in enumerate(train_epoch(model, layer, batches, steps=self.steps)):
                    done.append(cost)
                    progress(TrainProgress(layer + 1, epoch + 1, self.epochs, i + 1, len(batches), cost))
                costs, epochs_run = costs[:layer] + [_mean_cost(done)], epochs_run + 1
                finished = epoch + 1 == self.epochs
                trained = {"layers_done": layer + finished, "epochs_done": 0 if finished else epoch + 1}
                self._save(model, settings, trained, costs)
        return TrainReport(self.out, len(images), resumed, epochs_run, costs, failures)

    def _start(self, settings: dict) -> tuple[SparseModel, dict, tuple[int, int] | None]:
        """A fresh model, or the one in ``out`` with its training state when the settings match."""
        fresh = SparseModel([], list(self.lams), self.pool, self.nonnegative)
        if self.restart or not self.out.exists():
            return fresh, {"layers_done": 0, "epochs_done": 0}, None
        model, card = load_model(self.out, device=self.device)
        check_settings(self.out, "a training run", card.get("training", {}).get("settings", {}), settings,
                       "rerun with --restart to discard it, or give another --out")
        trained = card["training"]
        return model, trained, (trained["layers_done"] + 1, trained["epochs_done"])

    def _save(self, model: SparseModel, settings: dict, trained: dict, costs: list[dict]) -> None:
        card = {"image_size": settings["image_size"],
                "training": {"settings": settings, **trained, "costs": costs}}
        save_model(self.out, model, card)


def _generator(*keys: int) -> torch.Generator:
    """A generator seeded from ``keys`` (seed, layer[, epoch]): distinct keys never share a stream."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def _mean_cost(costs: Sequence[BatchCost]) -> dict:
    count = sum(c.images for c in costs)
    fit = sum(c.fit * c.images for c in costs) / count
    penalty = sum(c.penalty * c.images for c in costs) / count
    return {"cost": fit + penalty, "fit": fit, "penalty": penalty}


def _read_training_images(paths: Iterable[str | os.PathLike]) -> tuple[list[tuple[Path, torch.Tensor]],
                                                                        list[ImageError]]:
    """Every readable image of the first one's channels and size; the others fail."""
    found, failures = find_inputs(paths)
    images: list[tuple[Path, torch.Tensor]] = []
    for path in found:
        try:
            image = read_image(path, images[0][1].shape[0] if images else None)
        except ImageError as error:
            failures.append(error)
            continue
        if images and image.shape != images[0][1].shape:
            failures.append(ImageError(path, f"is {image.shape[-2]}×{image.shape[-1]}, the first training image "
                                             f"{images[0][1].shape[-2]}×{images[0][1].shape[-1]}"))
            continue
        images.append((path, image))
    if not images:
        raise VizDeconvError("no usable training images" + (f" ({failures[0]})" if failures else ""))
    return images, failures


@dataclass(frozen=True)
class SparseResult:
    """One image's inference: per layer the cost, its two terms, the share of zero codes and the PSNR of the
    layer's reconstruction; the figure and the NPZ written."""

    image: Path
    cost: list[float]
    fit: list[float]
    penalty: list[float]
    sparsity: list[float]
    psnr: list[float]
    figure: Path
    data: Path


@dataclass(frozen=True)
class SparseReport:
    """What a ``SparseInferJob`` wrote (``results``) and the files that failed."""

    folder: Path
    results: list[SparseResult]
    failures: list[ImageError]


class SparseInferJob:
    """Infer every layer's sparse codes for image files, and picture them (``OUT/sparse/<stem>/``).

    Args:
        model: a model file, or ``embedded`` (the shipped Fashion-MNIST model). steps: ISTA/FISTA steps per layer.
        method: ista or fista. pooling: max (switches) or gaussian (Gaussian "where" variables above layer 1).
        out: the output folder. batch_size: images inferred together (of one size). device: auto, cpu or cuda.
    """

    def __init__(self, model: str | os.PathLike = "embedded", *, steps: int = 200, method: str = "fista",
                 pooling: str = "max", out: str | os.PathLike = "vizdeconv-out", batch_size: int = 16,
                 device: str = "auto") -> None:
        if method not in METHODS or pooling not in POOLINGS or steps < 1 or batch_size < 1:
            raise VizDeconvError(f"method must be one of {', '.join(METHODS)}, pooling one of {', '.join(POOLINGS)}, "
                                 f"steps and batch size at least 1; got {method}, {pooling}, {steps}, {batch_size}")
        self.path = model_path(model)
        self.model, self.card = load_model(self.path, device=resolve_device(device))
        self.steps, self.method, self.pooling, self.batch_size = steps, method, pooling, batch_size
        self.folder = Path(out) / FOLDER

    def run(self, paths: Iterable[str | os.PathLike], progress: Progress = no_progress) -> SparseReport:
        images, failures, folders = find_outputs(paths, self.folder)
        read = []
        for path in images:
            try:
                read.append((path, read_image(path, self.model.channels)))
            except ImageError as error:
                failures.append(error)
        results = []
        progress("inferring codes", 0, len(read))
        for batch in _same_size_batches(read, self.batch_size):
            tensor = torch.stack([image for _, image in batch]).to(self.model.device)
            inference = infer_layers(self.model, tensor, steps=self.steps, method=self.method, pooling=self.pooling)
            reconstructions = inference.reconstructions()
            shown = [_strongest(codes, operator) for codes, operator in zip(inference.codes, inference.operators)]
            for i, (path, _) in enumerate(batch):
                results.append(self._write(path, folders[path], tensor[i], [r[i] for r in reconstructions],
                                           [c[i] for c in inference.codes], [s.of(i) for s in shown]))
            progress("inferring codes", len(results), len(read))
        figures_json = [{"png": os.path.relpath(r.figure, self.folder), "caption": _caption(r)} for r in results]
        save_manifest(self.folder, "sparse", TITLE,
                      figures_json, failures)
        report.write_report(self.folder.parent)
        return SparseReport(self.folder, results, failures)

    def _write(self, path: Path, folder: Path, image: torch.Tensor, reconstructions: list[torch.Tensor],
               codes: list[torch.Tensor], shown: list[Strongest]) -> SparseResult:
        """One image's ``sparse.npz`` and ``sparse.png``: ``(C, H, W)`` image, per layer its reconstruction,
        ``(K, h, w)`` codes and strongest maps."""
        fit, penalty = zip(*(cost_terms(r[None], image[None], z[None], lam)
                             for r, z, lam in zip(reconstructions, codes, self.model.lams)))
        fit, penalty = [f.item() for f in fit], [p.item() for p in penalty]
        sparsity = [(z == 0).float().mean().item() for z in codes]
        psnr = [_psnr(r, image) for r in reconstructions]
        arrays = {"image": image.cpu().numpy(), "cost": np.add(fit, penalty), "fit": np.array(fit),
                  "penalty": np.array(penalty), "sparsity": np.array(sparsity), "psnr": np.array(psnr),
                  "lam": np.array(self.model.lams), "pooling": np.array(self.pooling)}
        rows = [("input and each layer's reconstruction", [image, *reconstructions],
                 ["input", *(f"layer {l + 1}: {p:.1f} dB" for l, p in enumerate(psnr))], False)]
        for layer, (z, strongest) in enumerate(zip(codes, shown)):
            arrays[f"codes_{layer + 1}"] = z.cpu().numpy()
            arrays[f"reconstruction_{layer + 1}"] = reconstructions[layer].cpu().numpy()
            arrays[f"projection_{layer + 1}"] = strongest.projections.cpu().numpy()
            arrays[f"projected_{layer + 1}"] = strongest.places.cpu().numpy()
            maps = strongest.places[:, 0].tolist()
            rows.append((f"layer {layer + 1}: strongest feature maps (sum of |z|)", [z[k:k + 1] for k in maps],
                         [f"map {k}" for k in maps], True))
            rows.append((f"layer {layer + 1}: each map's strongest activation projected to pixels",
                         list(strongest.projections), [f"map {k} @{y},{x}" for k, y, x in strongest.places.tolist()],
                         True))
        title = (f"{path.name}: {len(codes)}-layer deconvolutional network, {self.method} {self.steps} steps, "
                 f"{self.pooling} pooling; zero codes " + ", ".join(f"{s:.1%}" for s in sparsity))
        figure = save_png(folder / "sparse.png", figures.sparse_figure(title, rows))
        data = save_npz(folder / "sparse.npz", **arrays)
        return SparseResult(path, list(np.add(fit, penalty)), fit, penalty, sparsity, psnr, figure, data)


@dataclass(frozen=True)
class Strongest:
    """A batch's strongest feature maps at one layer (by sum of |z|): ``places`` ``(N, m, 3)`` rows (map, y, x) of
    each map's strongest activation, ``projections`` ``(N, m, C, H, W)`` that activation alone down to pixels."""

    places: torch.Tensor
    projections: torch.Tensor

    def of(self, index: int) -> Strongest:
        return Strongest(self.places[index], self.projections[index])


def _strongest(codes: torch.Tensor, operator: TopDown) -> Strongest:
    """Each image's ``STRONGEST`` maps, and their strongest activation projected through the image's own switches."""
    maps = codes.abs().flatten(2).sum(2).argsort(1, descending=True)[:, :STRONGEST]     # (N, m)
    batch = torch.arange(len(codes), device=codes.device)
    places, projections = [], []
    for rank in range(maps.shape[1]):
        flat = codes[batch, maps[:, rank]].abs().flatten(1).argmax(1)
        y, x = flat // codes.shape[-1], flat % codes.shape[-1]
        spikes = torch.zeros_like(codes)
        spikes[batch, maps[:, rank], y, x] = codes[batch, maps[:, rank], y, x]
        with torch.no_grad():
            projections.append(operator(spikes))
        places.append(torch.stack([maps[:, rank], y, x], 1))
    return Strongest(torch.stack(places, 1), torch.stack(projections, 1))


def _psnr(reconstruction: torch.Tensor, image: torch.Tensor) -> float:
    """Peak signal to noise ratio in dB for pictures in 0..1."""
    error = (reconstruction - image).square().mean().item()
    return math.inf if error == 0 else 10 * math.log10(1 / error)


def _caption(result: SparseResult) -> str:
    return f"{result.image.name}: PSNR " + ", ".join(f"layer {l + 1} {p:.1f} dB" for l, p in enumerate(result.psnr))


def _same_size_batches(read: Sequence[tuple[Path, torch.Tensor]], size: int):
    groups: dict[tuple, list] = {}
    for item in read:
        groups.setdefault(tuple(item[1].shape), []).append(item)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start:start + size]


@dataclass(frozen=True)
class SparseFiltersReport:
    """The filter sheet written, and per layer its filter count."""

    figure: Path
    counts: list[int] = field(default_factory=list)


class SparseFiltersJob:
    """The filter sheets of a model: layer 1's filters as they are, higher layers' projected to pixels.

    A higher layer's filter is projected as a single code at the middle of its map, down through
    every layer below with each pooled value spread evenly over its region: the mean over switch settings.
    """

    def __init__(self, model: str | os.PathLike = "embedded", *, out: str | os.PathLike = "vizdeconv-out") -> None:
        self.path = model_path(model)
        self.model, self.card = load_model(self.path)
        self.folder = Path(out) / FOLDER

    def run(self) -> SparseFiltersReport:
        rows = []
        for layer, filters in enumerate(self.model.filters):
            pictures = filters if layer == 0 else _projected_filters(self.model, layer)
            rows.append((f"layer {layer + 1}: {len(filters)} filters {filters.shape[-1]}x{filters.shape[-1]}"
                         + (" projected to pixels" if layer else ""), list(pictures),
                         [f"#{k}" for k in range(len(filters))], True))
        title = f"{self.path.name}: filters (unit L2 norm each; mid-grey = 0)"
        figure = save_png(self.folder / "filters.png", figures.sparse_figure(title, rows, tile=FILTER_TILE, columns=16))
        save_manifest(self.folder, "sparse", TITLE,
                      [{"png": "filters.png", "caption": f"{self.path.name}: the filters of each layer"}],
                      _earlier_failures(self.folder))
        report.write_report(self.folder.parent)
        return SparseFiltersReport(figure, [len(f) for f in self.model.filters])


def _earlier_failures(folder: Path) -> list[ImageError]:
    """The failed files an earlier ``sparse infer`` listed in ``folder/index.json``: kept beside the filter sheet."""
    try:
        failed = json.loads((folder / "index.json").read_text())["failed"]
        return [ImageError(Path(f["image"]), f["reason"]) for f in failed]
    except (OSError, ValueError, KeyError, TypeError):
        return []


class _EvenUnpooling(Unpooling):
    """Each pooled value spread evenly over its region."""

    def weights(self) -> torch.Tensor:
        rows, columns = self.pooled_size
        cells = self.pool.maps * self.pool.size ** 2
        return torch.full((1, 1, rows, columns, cells), 1 / cells)


def _projected_filters(model: SparseModel, layer: int) -> torch.Tensor:
    """Layer ``layer``'s filters (0-based, above the first) as pixels: ``(K, C, h, w)``, cropped to what they reach."""
    side = 2 * model.filters[layer].shape[-1] * model.pool.size ** layer  # room for one code's whole reach
    sizes = code_sizes(model, side, side)
    unpoolings = [_EvenUnpooling(model.pool, *sizes[below]) for below in range(layer)]
    operator = TopDown(model.filters[:layer + 1], unpoolings, side, side)
    count, (rows, columns) = model.filters[layer].shape[0], sizes[layer]
    spikes = torch.zeros(count, count, rows, columns)
    spikes[torch.arange(count), torch.arange(count), rows // 2, columns // 2] = 1
    with torch.no_grad():
        pictures = operator(spikes)
    reached = pictures.abs().amax((0, 1)) > 1e-6 * pictures.abs().max()
    rows, columns = reached.any(1).nonzero(), reached.any(0).nonzero()
    return pictures[..., rows.min():rows.max() + 1, columns.min():columns.max() + 1]
