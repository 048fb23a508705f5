"""Writing results so that an interrupted run never leaves a torn file: temp name, then rename."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save

# OUT/<folder> of the jobs other than project
JOB_FOLDERS = ("occlusion", "deconv", "filters", "evolution", "invariance", "correspondence", "reconstruct")


def write_atomic(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def save_png(path: str | os.PathLike, image: Image.Image) -> Path:
    return write_atomic(path, lambda file: image.save(file, format="PNG"))


def save_npz(path: str | os.PathLike, **arrays) -> Path:
    return write_atomic(path, lambda file: np.savez_compressed(file, **arrays))


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
    data = save({name: tensor.detach().contiguous() for name, tensor in tensors.items()}, metadata)
    return write_atomic(path, lambda file: file.write(data))


def save_json(path: str | os.PathLike, data) -> Path:
    return write_atomic(path, lambda file: file.write((json.dumps(data, indent=2) + "\n").encode()))


def save_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A CSV file with a header line (``csv`` quoting, so names with commas stay one field)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_atomic(path, lambda file: file.write(text.getvalue().encode()))


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """A folder name per input image: its stem, or, where stems collide, its path made into one name."""
    stems: dict[str, int] = {}
    for path in paths:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    return {path: path.stem if stems[path.stem] == 1 else re.sub(r"[^\w.-]+", "_", str(path).strip("/"))
            for path in paths}
