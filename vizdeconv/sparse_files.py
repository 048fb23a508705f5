"""Deconvolutional network files and images: what ``vizdeconv sparse`` reads and writes.

A model is one ``.safetensors`` file: tensors ``filters.1``, ``filters.2``, … (``(K_l, C_l, s, s)``) and the
metadata key ``vizdeconv.sparse``, JSON with ``lams``, ``pool`` (``maps``, ``size``), ``nonnegative``,
``image_size`` (of the training images) and ``training`` (its settings, ``layers_done`` and
``epochs_done`` of the layer under way, and per layer the last epoch's mean ``cost``, ``fit``,
``penalty``): an interrupted training run goes on from the file. Never a pickle.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torchvision.transforms.functional import pil_to_tensor

from vizdeconv.errors import ImageError, ModelError
from vizdeconv.images import load_image
from vizdeconv.outputs import save_safetensors
from vizdeconv.sparse import Pool, SparseModel

EMBEDDED = "embedded"
EMBEDDED_FILE = "sparse-fashion.safetensors"
METADATA_KEY = "vizdeconv.sparse"


def embedded_path() -> Path:
    """The shipped model, trained on Fashion-MNIST by ``scripts/train_sparse.py``."""
    return Path(str(resources.files("vizdeconv.data").joinpath(EMBEDDED_FILE)))


def model_path(name: str | os.PathLike) -> Path:
    """``embedded`` → the shipped file; anything else is a path."""
    return embedded_path() if str(name) == EMBEDDED else Path(name)


def save_model(path: str | os.PathLike, model: SparseModel, card: dict) -> Path:
    """Write ``model`` and its ``card`` (everything but the filters) atomically."""
    card = {**card, "lams": model.lams, "pool": {"maps": model.pool.maps, "size": model.pool.size},
            "nonnegative": model.nonnegative}
    tensors = {f"filters.{layer + 1}": f.detach().cpu().float() for layer, f in enumerate(model.filters)}
    return save_safetensors(path, tensors, {METADATA_KEY: json.dumps(card)})


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[SparseModel, dict]:
    """The model in ``path`` and its card.

    Raises:
        ModelError: missing, not a safetensors file, not a vizdeconv sparse model, or inconsistent shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such sparse model file")
    try:
        with safe_open(str(path), framework="pt") as file:
            card = json.loads((file.metadata() or {})[METADATA_KEY])
            layers = sum(1 for layer in range(len(card["lams"])) if f"filters.{layer + 1}" in file.keys())
            filters = [file.get_tensor(f"filters.{layer + 1}").float() for layer in range(layers)]  # fewer mid-training
        model = SparseModel(filters, [float(v) for v in card["lams"]], Pool(int(card["pool"]["maps"]),
                                                                             int(card["pool"]["size"])),
                            bool(card["nonnegative"]))
    except KeyError as error:
        raise ModelError(f"{path}: not a vizdeconv sparse model (no {error} in it)") from None
    except (OSError, ValueError, TypeError, SafetensorError) as error:
        raise ModelError(f"{path}: not a readable sparse model ({_one_line(error)})") from None
    if not filters:
        raise ModelError(f"{path}: a sparse model file with no filters (a training run that did not finish an epoch)")
    _check_shapes(path, model)
    return model.to(device), card


def _check_shapes(path: Path, model: SparseModel) -> None:
    if model.pool.maps < 1 or model.pool.size < 1 or not all(0 < lam < math.inf for lam in model.lams):
        raise ModelError(f"{path}: pooling {model.pool.maps} maps × {model.pool.size} and λ "
                         f"{', '.join(map(str, model.lams))} must be positive and finite")
    for layer, filters in enumerate(model.filters):
        if filters.ndim != 4 or filters.shape[-1] != filters.shape[-2]:
            raise ModelError(f"{path}: filters.{layer + 1} should be (K, C, s, s), got {tuple(filters.shape)}")
        if layer and filters.shape[1] * model.pool.maps != model.filters[layer - 1].shape[0]:
            raise ModelError(f"{path}: filters.{layer + 1} take {filters.shape[1]} maps, but layer {layer} pools "
                             f"{model.filters[layer - 1].shape[0]} maps by {model.pool.maps}")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def image_channels(path: Path) -> int:
    """1 for a grey file (with or without alpha), 3 for colour."""
    try:
        with Image.open(path) as image:
            mode = image.mode
    except Exception:  # unreadable: load_image says why
        return 0
    return 1 if mode in ("1", "L", "LA", "La", "F") or mode.startswith("I") else 3


def read_image(path: Path, channels: int | None = None) -> torch.Tensor:
    """One file as a ``(channels, H, W)`` tensor in 0..1 (``None``: the file's own, 1 or 3).

    Raises:
        ImageError: unreadable, or a grey file for a colour model or the other way round.
    """
    found = image_channels(path)
    channels = channels or found or 1
    if found and found != channels:  # checked before decoding; an unreadable file (0) gets load_image's reason
        raise ImageError(path, f"has {found} channel{'s' * (found != 1)}, the sparse model {channels}")
    picture = load_image(path, channels=channels, background=(0.0, 0.0, 0.0))
    return pil_to_tensor(picture).float() / 255
