"""``vizdeconv correspondence``: do layers relate the same part of different images consistently?
(paper section 5.1, Table 1; ``correspondence.py``).

Layout under ``OUT/correspondence``: ``table.csv`` (columns ``part, layer, delta, delta_std``, a
row per part and layer, then ``random``), ``figure.png`` (the images with their parts outlined,
above the table) and ``index.json`` for the report.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vizdeconv import plots, report
from vizdeconv.correspondence import (
    RANDOM,
    Box,
    boxes_of,
    check_box,
    delta,
    masked,
    match_parts,
    random_box,
    read_parts,
    sign_changes,
)
from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.features import FeatureLayer, feature_layers, features
from vizdeconv.images import load_image
from vizdeconv.jobs import Progress, find_inputs, no_progress, save_manifest
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.outputs import save_csv, save_png

FOLDER = "correspondence"
MAX_DRAWS = 100  # random places tried for a control box before giving up
CSV_COLUMNS = ("part", "layer", "delta", "delta_std")


@dataclass(frozen=True)
class CorrespondenceReport:
    """What a ``CorrespondenceJob`` measured and wrote.

    Attributes:
        layers: the feature layers. parts: the part names, then ``random``. images: the files used.
        table: ``(part, layer name) → (Δ, std)``. classes: each image's top-1 class unmasked.
        notes: remarks on the input (images of different classes). csv, figure: the files written.
        failures: files that could not be read or whose boxes do not fit them.
    """

    layers: list[FeatureLayer]
    parts: list[str]
    images: list[Path]
    table: dict[tuple[str, str], tuple[float, float]]
    classes: list[int]
    notes: list[str]
    csv: Path
    figure: Path
    failures: list[ImageError]


class CorrespondenceJob:
    """Mask each part in every image and compare the feature changes' signs across images.

    Args:
        model: the loaded model. parts: the ``PARTS.json`` file (``correspondence.read_parts``).
        layers: ``5,fc``: paper numbers, module names, ``fc`` (``features.py``).
        random: repeats of the random control (each part's box size, at random places); seed: its seed.
        out: the output folder (results go to ``out/correspondence``). batch_size: images per forward pass.
    """

    def __init__(self, model: LoadedModel, parts: str | os.PathLike, layers: str = "5,fc", *, random: int = 10,
                 seed: int = 0, out: str | os.PathLike = "vizdeconv-out", batch_size: int = 16) -> None:
        if random < 1:
            raise VizDeconvError(f"--random must be at least 1, got {random}")
        self.model, self.layers = model, feature_layers(model, trace_layers(model), layers)
        self.channels = model.image_channels
        self.source, self.parts = str(parts), read_parts(parts)
        self.random, self.seed = random, seed
        self.out, self.batch_size = Path(out), batch_size

    def run(self, paths: Iterable[str | os.PathLike], progress: Progress = no_progress) -> CorrespondenceReport:
        images, failures = find_inputs(paths)
        names = match_parts(self.parts, images, self.source)
        seen = self._seen(images, names, failures)
        if len(seen) < 2:
            raise VizDeconvError("correspondence compares images in pairs: it needs at least 2 readable images, got "
                                 f"{len(seen)}" + "".join(f"; {failure}" for failure in failures[:2]))
        used = list(seen)
        rng = np.random.default_rng(self.seed)
        controls = [[{part: self._random_control(rng, path, seen[path], part) for part in names} for path in used]
                    for _ in range(self.random)]  # drawn per repeat, per image, per part
        # every input the network sees: the originals, each part masked, each control masked
        inputs = [seen[p].clean for p in used]
        inputs += [seen[p].masked[part] for part in names for p in used]
        inputs += [control[i][part] for control in controls for part in names for i in range(len(used))]
        vectors, classes = self._features(inputs, progress)
        table, n = {}, len(used)
        for layer, layer_vectors in zip(self.layers, vectors):
            clean, masked_sets = layer_vectors[:n], layer_vectors[n:].split(n)
            for part, masked_vectors in zip(names, masked_sets):
                table[part, layer.name] = delta(sign_changes(clean - masked_vectors))
            per_repeat = [torch.cat([sign_changes(clean - m) for m in repeat]).mean().item()
                          for repeat in _chunks(masked_sets[len(names):], len(names))]
            table[RANDOM, layer.name] = float(np.mean(per_repeat)), float(np.std(per_repeat))
        top = classes[:n]
        notes = [] if len(set(top)) == 1 else [
            "the images' top classes differ (" + ", ".join(f"{p.name}: {self.model.category(c)}" for p, c in zip(used, top))
            + "); the paper's Table 1 compares images of one class"]
        folder = self.out / FOLDER
        csv = save_csv(folder / "table.csv", CSV_COLUMNS, [
            (part, layer.name, f"{table[part, layer.name][0]:.6f}", f"{table[part, layer.name][1]:.6f}")
            for part in names + [RANDOM] for layer in self.layers])
        figure = save_png(folder / "figure.png", plots.correspondence_figure(
            f"{self.model.name}: sign changes when a part is masked (random: {self.random} repeats, seed {self.seed})",
            [seen[p].picture for p in used], [p.name for p in used], [seen[p].boxes for p in used], names,
            [layer.name for layer in self.layers], table))
        save_manifest(folder, "correspondence", "Correspondence of parts across images (paper Table 1)",
                      [{"png": figure.name, "caption": f"{n} images, parts {', '.join(names)}"}], failures)
        report.write_report(self.out)
        return CorrespondenceReport(self.layers, names + [RANDOM], used, table, top, notes, csv, figure, failures)

    def _seen(self, images: list[Path], names: list[str], failures: list[ImageError]) -> dict[Path, _Seen]:
        """Each image that loads and whose boxes fit it and reach the model's input; the others go to
        ``failures``."""
        seen = {}
        for path in images:
            boxes = boxes_of(self.parts, path, self.source)
            try:
                picture = load_image(path, channels=self.channels, background=self.model.mean)
                clean, masks = self.model.preprocess(picture), {}
                for part in names:
                    check_box(boxes[part], _size(picture), part)
                    masks[part] = self._masked_input(picture, boxes[part], clean)
                    if masks[part] is None:
                        raise VizDeconvError(f"part {part!r} box {list(boxes[part])} lies where preprocessing crops "
                                             "the image: masking it changes nothing the model sees")
            except ImageError as error:
                failures.append(error)
            except VizDeconvError as error:
                failures.append(ImageError(path, str(error)))
            else:
                seen[path] = _Seen(picture, boxes, clean, masks)
        return seen

    def _masked_input(self, picture: Image.Image, box: Box, clean: torch.Tensor) -> torch.Tensor | None:
        """The model's input with ``box`` masked, or None where that changes nothing (cropped away)."""
        masked_input = self.model.preprocess(masked(picture, box, self.model.mean))
        return None if torch.equal(masked_input, clean) else masked_input

    def _random_control(self, rng: np.random.Generator, path: Path, image: _Seen, part: str) -> torch.Tensor:
        """The input with a box of ``part``'s size at a random place, drawn again where preprocessing
        crops it away entirely."""
        y0, x0, y1, x1 = image.boxes[part]
        for _ in range(MAX_DRAWS):
            masked_input = self._masked_input(image.picture, random_box(rng, (y1 - y0, x1 - x0), _size(image.picture)),
                                              image.clean)
            if masked_input is not None:
                return masked_input
        raise VizDeconvError(f"{path.name}: no random place for a box of {part!r}'s size that the model sees, "
                             f"in {MAX_DRAWS} draws")

    def _features(self, inputs: list[torch.Tensor], progress: Progress) -> tuple[list[torch.Tensor], list[int]]:
        """Each layer's ``(len(inputs), D)`` feature vectors, and each input's top-1 class.

        Every pass runs at one batch size (the last padded with copies of its first input): a kernel
        chosen for another size may round differently, and an entry the mask cannot reach must come
        out bit for bit the same, or its rounding noise would count as a sign.
        """
        stage = "masking parts"
        progress(stage, 0, len(inputs))
        vectors, classes = [[] for _ in self.layers], []
        size = min(self.batch_size, len(inputs))
        for start in range(0, len(inputs), size):
            chunk = inputs[start:start + size]
            batch = torch.stack(chunk + chunk[:1] * (size - len(chunk)))
            outputs, logits = features(self.model, self.layers, batch.to(self.model.device))
            for kept, output in zip(vectors, outputs):
                kept.append(output[:len(chunk)].cpu())
            classes.extend(logits[:len(chunk)].argmax(1).tolist())
            progress(stage, start + len(chunk), len(inputs))
        return [torch.cat(kept) for kept in vectors], classes


@dataclass(frozen=True)
class _Seen:
    """An image as read (``picture``), its part boxes, its model input, and the input with each part masked."""

    picture: Image.Image
    boxes: dict[str, Box]
    clean: torch.Tensor
    masked: dict[str, torch.Tensor]


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _size(picture: Image.Image) -> tuple[int, int]:
    return picture.height, picture.width
