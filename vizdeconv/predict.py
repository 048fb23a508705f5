"""Top classes of images: the job behind ``vizdeconv predict``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vizdeconv.errors import ImageError
from vizdeconv.images import read_batches
from vizdeconv.models import LoadedModel


@dataclass(frozen=True)
class Prediction:
    path: Path
    classes: list[tuple[int, str, float]]  # (index, name, probability), most probable first


@torch.no_grad()
def predict_files(model: LoadedModel, paths: Sequence[Path], *, top: int = 5,
                  batch_size: int = 32) -> Iterator[Prediction | ImageError]:
    """The ``top`` most probable classes of each image (softmax of the logits), in input order."""
    for batch in read_batches(paths, preprocess=model.preprocess, channels=model.input_size[0],
                              background=model.mean, batch_size=batch_size):
        if isinstance(batch, ImageError):
            yield batch
            continue
        probabilities = model.module(batch.images.to(model.device)).softmax(1).cpu()
        best = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
        for path, values, indices in zip(batch.paths, best.values.tolist(), best.indices.tolist()):
            yield Prediction(path, [(i, model.categories[i] if i < len(model.categories) else str(i), v)
                                    for i, v in zip(indices, values)])
