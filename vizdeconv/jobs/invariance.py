"""``vizdeconv invariance``: how features and the class probability change as images are moved,
scaled and rotated (paper Fig. 5; ``invariance.py``).

Layout under ``OUT/invariance``: ``curves.png`` (a row per transformation: each layer's distance,
then p(true class), a line per image), ``invariance.csv`` (columns ``image, transform, amount,
layer, distance, p_true``), and ``index.json`` for the report.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vizdeconv import plots, report
from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.features import FeatureLayer, feature_layers
from vizdeconv.invariance import TRANSFORMS, Measurement, check_amount, check_transform, default_amounts, measure
from vizdeconv.jobs import Progress, find_inputs, no_progress, save_manifest
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import parse_target
from vizdeconv.outputs import save_csv, save_png

FOLDER = "invariance"
CSV_COLUMNS = ("image", "transform", "amount", "layer", "distance", "p_true")


@dataclass(frozen=True)
class InvarianceReport:
    """What an ``InvarianceJob`` measured and wrote.

    Attributes:
        layers: the feature layers, in column order. images: the files measured, in order.
        amounts: transformation → its amounts. classes: each image's true class.
        distances: transformation → ``(layers, images, amounts)``. p_true: transformation → ``(images, amounts)``.
        figure, table: ``curves.png`` and ``invariance.csv`` (None when no image could be read).
        failures: files that failed.
    """

    layers: list[FeatureLayer]
    images: list[Path]
    amounts: dict[str, list[float]]
    classes: list[int]
    distances: dict[str, np.ndarray]
    p_true: dict[str, np.ndarray]
    figure: Path | None
    table: Path | None
    failures: list[ImageError]


class InvarianceJob:
    """Distances between original and transformed feature vectors, and p(true class).

    Args:
        model: the loaded model. layers: ``1,5,fc``: paper numbers, module names, ``fc`` (``features.py``).
        transforms: which of ``translate``, ``scale``, ``rotate``, in row order.
        amounts: transformation → amounts, for any that should not use ``default_amounts``.
        targets: each ``CLASS`` (index or name) for every image, or ``IMAGE=CLASS`` for the file named
            IMAGE; an image without one has the top-1 class of its untransformed self.
        out: the output folder (results go to ``out/invariance``). batch_size: images per forward pass.
    """

    def __init__(self, model: LoadedModel, layers: str = "1,fc", *, transforms: Sequence[str] = TRANSFORMS,
                 amounts: dict[str, Sequence[float]] | None = None, targets: Sequence[str] = (),
                 out: str | os.PathLike = "vizdeconv-out", batch_size: int = 16) -> None:
        for transform in transforms:
            check_transform(transform)
        if not transforms:
            raise VizDeconvError(f"no transform given; expected some of {', '.join(TRANSFORMS)}")
        unused = [t for t in (amounts or {}) if t not in transforms]
        if unused:
            raise VizDeconvError(f"amounts given for {unused[0]}, which is not among the transforms "
                                 f"({', '.join(transforms)})")
        self.model, self.layers = model, feature_layers(model, trace_layers(model), layers)
        side = model.input_size[1]
        self.amounts = {t: [float(a) for a in (amounts or {}).get(t, default_amounts(t, side))]
                        for t in dict.fromkeys(transforms)}
        for transform, values in self.amounts.items():
            if not values:
                raise VizDeconvError(f"no amounts given for {transform}")
            for amount in values:
                check_amount(transform, amount)
        self.targets = self._parse_targets(targets)
        self.out, self.batch_size = Path(out), batch_size

    def _parse_targets(self, targets: Sequence[str]) -> dict[str | None, int]:
        """``{None: class}`` for every image, ``{file name: class}`` for one."""
        parsed = {}
        for target in targets:
            image, equals, name = str(target).rpartition("=")
            index = parse_target(name, self.model)
            if index == "auto":
                continue
            parsed[image if equals else None] = int(index)
        return parsed

    def run(self, paths: Iterable[str | os.PathLike], progress: Progress = no_progress) -> InvarianceReport:
        images, failures = find_inputs(paths)
        unknown = [name for name in self.targets if name is not None and name not in {p.name for p in images}]
        if unknown:
            raise VizDeconvError(f"--target names {unknown[0]!r}, which is not among the images")
        done: list[Path] = []
        classes: list[int] = []
        steps = {t: {"distances": [], "p_true": []} for t in self.amounts}
        stage, per_image = "transforming", sum(map(len, self.amounts.values()))
        progress(stage, 0, len(images) * per_image)  # image-amount pairs: a batch of few images is long
        for batch in self.model.read(images, failures, batch_size=self.batch_size):
            targets = [self.targets.get(path.name, self.targets.get(None)) for path in batch.paths]
            measured: list[Measurement] = []
            for step in measure(self.model, self.layers, batch.images.to(self.model.device), self.amounts, targets):
                measured.append(step)
                progress(stage, (batch.done - len(batch.paths)) * per_image + len(measured) * len(batch.paths),
                         len(images) * per_image)
            for transform in self.amounts:
                rows = [m for m in measured if m.transform == transform]
                steps[transform]["distances"].append(np.stack([m.distances.numpy() for m in rows], axis=-1))
                steps[transform]["p_true"].append(np.stack([m.p_true.numpy() for m in rows], axis=-1))
            done.extend(batch.paths)
            classes.extend(measured[0].classes.tolist())
        progress(stage, len(images) * per_image, len(images) * per_image)
        if not done:  # nothing to draw, and an earlier run's curves stay as they were
            return InvarianceReport(self.layers, [], self.amounts, [], {}, {}, None, None, failures)
        folder = self.out / FOLDER
        distances = {t: np.concatenate(s["distances"], axis=1) for t, s in steps.items()}
        p_true = {t: np.concatenate(s["p_true"], axis=0) for t, s in steps.items()}
        table = save_csv(folder / "invariance.csv", CSV_COLUMNS, self._rows(done, distances, p_true))
        figure = save_png(folder / "curves.png", plots.invariance_curves(
            f"{self.model.name}: distance between original and transformed feature vectors, and p(true class)",
            self.amounts, [layer.label for layer in self.layers],
            [f"{path.name} ({self.model.category(c)})" for path, c in zip(done, classes)], distances, p_true))
        save_manifest(folder, "invariance", "Invariance to translation, scale and rotation (paper Fig. 5)",
                      [{"png": figure.name, "caption": f"{len(done)} images, layers "
                                                      + ", ".join(layer.name for layer in self.layers)}], failures)
        report.write_report(self.out)
        return InvarianceReport(self.layers, done, self.amounts, classes, distances, p_true, figure, table, failures)

    def _rows(self, images: list[Path], distances: dict[str, np.ndarray], p_true: dict[str, np.ndarray]):
        for i, path in enumerate(images):
            for transform, amounts in self.amounts.items():
                for a, amount in enumerate(amounts):
                    for l, layer in enumerate(self.layers):
                        yield (os.path.abspath(path), transform, f"{amount:g}", layer.name,
                               f"{distances[transform][l, i, a]:.6g}", f"{p_true[transform][i, a]:.6g}")
