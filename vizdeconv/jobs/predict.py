"""``vizdeconv predict``: the top classes of image files."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from vizdeconv.errors import ImageError
from vizdeconv.jobs import Progress, find_inputs, no_progress, reading
from vizdeconv.models import LoadedModel


@dataclass(frozen=True)
class Prediction:
    """One image's most probable classes: ``(index, name, probability)``, most probable first."""

    image: Path
    classes: list[tuple[int, str, float]]

    def to_json(self) -> dict:
        return {"image": str(self.image), "classes": [{"index": i, "name": name, "probability": p}
                                                      for i, name, p in self.classes]}


@dataclass(frozen=True)
class PredictReport:
    predictions: list[Prediction]
    failures: list[ImageError]


class PredictJob:
    """The ``top`` most probable classes (softmax of the logits) of each image."""

    def __init__(self, model: LoadedModel, *, top: int = 5, batch_size: int = 32) -> None:
        self.model, self.top, self.batch_size = model, top, batch_size

    @torch.no_grad()
    def run(self, paths: Iterable[str | os.PathLike], progress: Progress = no_progress) -> PredictReport:
        images, failures = find_inputs(paths)
        predictions = []
        for batch in reading(self.model, images, failures, progress, "predicting", batch_size=self.batch_size):
            probabilities = self.model.module(batch.images.to(self.model.device)).softmax(1).cpu()
            best = probabilities.topk(min(self.top, probabilities.shape[1]), dim=1)
            for path, values, indices in zip(batch.paths, best.values.tolist(), best.indices.tolist()):
                predictions.append(Prediction(path, [(i, self.model.category(i), v)
                                                     for i, v in zip(indices, values)]))
        return PredictReport(predictions, failures)
