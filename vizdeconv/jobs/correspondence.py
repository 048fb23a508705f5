"""``vizdeconv correspondence``: do layers relate the same part of different images consistently?
(paper section 5.1, Table 1; ``correspondence.py``).

Layout under ``OUT/correspondence``: ``table.csv`` (columns ``part, layer, delta, delta_std``, a
row per part and layer, then ``random``), ``figure.png`` (the images with their parts outlined,
above the table) and ``index.json`` for the report.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vizdeconv import plots, report
from vizdeconv.correspondence import (
    RANDOM,
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
        self.source, self.parts = str(parts), read_parts(parts)
        self.random, self.seed = random, seed
        self.out, self.batch_size = Path(out), batch_size

    def run(self, paths: Iterable[str | os.PathLike], progress: Progress = no_progress) -> CorrespondenceReport:
        images, failures = find_inputs(paths)
        names = match_parts(self.parts, images, self.source)
        pictures = self._pictures(images, failures)
        if len(pictures) < 2:
            raise VizDeconvError("correspondence compares images in pairs: it needs at least 2 readable images, got "
                                 f"{len(pictures)}" + "".join(f"; {failure}" for failure in failures[:2]))
        used = list(pictures)
        boxes = [boxes_of(self.parts, path, self.source) for path in used]
        rng = np.random.default_rng(self.seed)
        controls = [[{part: random_box(rng, (b[part][2] - b[part][0], b[part][3] - b[part][1]), _size(pictures[p]))
                      for part in names} for p, b in zip(used, boxes)] for _ in range(self.random)]
        # every picture the network sees: the originals, each part masked, each control masked
        variants = [pictures[p] for p in used]
        variants += [masked(pictures[p], b[part], self.model.mean) for part in names for p, b in zip(used, boxes)]
        variants += [masked(pictures[p], control[i][part], self.model.mean)
                     for control in controls for part in names for i, p in enumerate(used)]
        vectors, classes = self._features(variants, progress)
        table = {}
        n = len(used)
        for layer, layer_vectors in zip(self.layers, vectors):
            clean = layer_vectors[:n]
            masked_sets = layer_vectors[n:].split(n)
            for part, masked_vectors in zip(names, masked_sets[:len(names)]):
                table[part, layer.name] = delta(sign_changes(clean - masked_vectors))
            table[RANDOM, layer.name] = delta(torch.cat([sign_changes(clean - m) for m in masked_sets[len(names):]]))
        top = classes[:n]
        notes = [] if len(set(top)) == 1 else [
            "the images' top classes differ (" + ", ".join(f"{p.name}: {self.model.category(c)}"
                                                           for p, c in zip(used, top)) + "); the paper's Table 1 compares images of one class"]
        folder = self.out / FOLDER
        csv = save_csv(folder / "table.csv", CSV_COLUMNS, [
            (part, layer.name, f"{table[part, layer.name][0]:.6f}", f"{table[part, layer.name][1]:.6f}")
            for part in names + [RANDOM] for layer in self.layers])
        figure = save_png(folder / "figure.png", plots.correspondence_figure(
            f"{self.model.name}: sign changes when a part is masked (random: {self.random} repeats, seed {self.seed})",
            [pictures[p] for p in used], [p.name for p in used], boxes, names, [layer.name for layer in self.layers],
            table))
        save_manifest(folder, "correspondence", "Correspondence of parts across images (paper Table 1)",
                      [{"png": figure.name, "caption": f"{n} images, parts {', '.join(names)}"}], failures)
        report.write_report(self.out)
        return CorrespondenceReport(self.layers, names + [RANDOM], used, table, top, notes, csv, figure, failures)

    def _pictures(self, images: list[Path], failures: list[ImageError]) -> dict[Path, Image.Image]:
        """The images that load and whose boxes fit them; the others go to ``failures``."""
        pictures = {}
        for path in images:
            try:
                picture = load_image(path, channels=self.model.input_size[0], background=self.model.mean)
                for part, box in boxes_of(self.parts, path, self.source).items():
                    check_box(box, _size(picture), part)
            except ImageError as error:
                failures.append(error)
                continue
            except VizDeconvError as error:
                failures.append(ImageError(path, str(error)))
                continue
            pictures[path] = picture
        return pictures

    def _features(self, pictures: list[Image.Image], progress: Progress) -> tuple[list[torch.Tensor], list[int]]:
        """Each layer's ``(len(pictures), D)`` feature vectors, and each picture's top-1 class.

        Every pass runs at one batch size (the last padded with copies of its first picture): a
        kernel chosen for another size may round differently, and an entry the mask cannot reach
        must come out bit for bit the same, or its rounding noise would count as a sign.
        """
        stage = "masking parts"
        progress(stage, 0, len(pictures))
        vectors, classes = [[] for _ in self.layers], []
        size = min(self.batch_size, len(pictures))
        for start in range(0, len(pictures), size):
            chunk = pictures[start:start + size]
            batch = torch.stack([self.model.preprocess(picture) for picture in chunk])
            batch = torch.cat([batch, batch[:1].expand(size - len(chunk), *batch.shape[1:])])
            outputs, logits = features(self.model, self.layers, batch.to(self.model.device))
            for kept, output in zip(vectors, outputs):
                kept.append(output[:len(chunk)].cpu())
            classes.extend(logits[:len(chunk)].argmax(1).tolist())
            progress(stage, start + len(chunk), len(pictures))
        return [torch.cat(kept) for kept in vectors], classes


def _size(picture: Image.Image) -> tuple[int, int]:
    return picture.height, picture.width
