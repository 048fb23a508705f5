"""Loading a convnet with what it needs around it: preprocessing, class names, normalisation.

Three sources: the embedded Fashion-MNIST model (default, offline), a torchvision model by name
with its DEFAULT weights through torchvision's weights API and cache, or the user's own factory
``package.module:callable``. ``weights=`` replaces the weights with a local state_dict file.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms

from vizdeconv.embedded import load_card, load_embedded
from vizdeconv.errors import ModelError, UnsafeCheckpointError

EMBEDDED = "embedded"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on its device, with everything needed to feed and read it.

    Attributes:
        name: what the user asked for (``embedded``, ``alexnet``, ``pkg.mod:factory``).
        weights: where the weights came from, for reports.
        module: the ``nn.Module`` itself, unchanged by vizdeconv.
        preprocess: PIL image → normalised ``(C, H, W)`` float tensor.
        input_size: ``(C, H, W)`` of the preprocessed input.
        mean, std: per-channel normalisation, so inputs can be shown as pixels again.
        categories: class names, one per output.
    """

    name: str
    weights: str
    module: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: tuple[str, ...]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; expected auto, cpu or cuda") from None


def torchvision_names() -> list[str]:
    """torchvision's classification models (vizdeconv projects through those with a plain conv stack)."""
    return torchvision.models.list_models(module=torchvision.models)


def load_model(
    name: str = EMBEDDED,
    *,
    weights: str | os.PathLike | None = None,
    device: str = "auto",
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LoadedModel:
    """Load a model by name, ready for vizdeconv.

    Args:
        name: ``embedded`` (default), a torchvision model name such as ``alexnet`` or ``vgg16``,
            or ``package.module:factory`` for a callable that returns an ``nn.Module``.
        weights: a local state_dict (``.pt``/``.pth`` loaded with ``weights_only=True``, or
            ``.safetensors``) to use instead of the default weights.
        device: ``auto``, ``cpu`` or ``cuda``.
        input_size: for a factory model: side (or ``(H, W)``) of its input; default 224.
        mean, std: for a factory model: per-channel normalisation; default ImageNet's. The
            number of values sets the number of input channels.

    Raises:
        ModelError: unknown name, weights that are missing, unsafe or do not fit.
    """
    if name == EMBEDDED:
        loaded = _embedded(weights)
    elif ":" in name:
        loaded = _factory(name, weights, input_size, mean, std)
    elif name in torchvision_names():
        loaded = _torchvision(name, weights)
    else:
        raise ModelError(f"unknown model {name!r}; expected 'embedded', a torchvision model "
                         f"(alexnet, vgg11, vgg16_bn, …) or package.module:factory")
    loaded.module.eval().to(resolve_device(device))
    return loaded


def _embedded(weights: str | os.PathLike | None) -> LoadedModel:
    card = load_card()
    module = load_embedded()
    if weights is not None:
        _load_state_dict(module, weights)
    channels, height, width = card["input_size"]
    preprocess = transforms.Compose([
        transforms.Grayscale(num_output_channels=channels),
        transforms.Resize((height, width), antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(card["mean"], card["std"]),
    ])
    return LoadedModel(EMBEDDED, str(weights or "shipped zfmnist weights"), module, preprocess,
                       (channels, height, width), tuple(card["mean"]), tuple(card["std"]), tuple(card["categories"]))


def _torchvision(name: str, weights: str | os.PathLike | None) -> LoadedModel:
    default = torchvision.models.get_model_weights(name).DEFAULT
    module = torchvision.models.get_model(name, weights=None)
    if weights is None:
        module.load_state_dict(_default_state_dict(name, default))
        source = f"torchvision {default}"
    else:
        _load_state_dict(module, weights)
        source = str(weights)
    preprocess = default.transforms()
    size = preprocess.crop_size[0]
    categories = default.meta["categories"]
    outputs = _num_outputs(module)
    if outputs is not None and outputs != len(categories):
        categories = [str(i) for i in range(outputs)]
    return LoadedModel(name, source, module, preprocess, (3, size, size), tuple(preprocess.mean),
                       tuple(preprocess.std), tuple(categories))


def _default_state_dict(name: str, default) -> dict[str, torch.Tensor]:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(default.url).path)
    try:
        return default.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ModelError(f"cannot load {name}'s weights ({type(error).__name__}: {error}); expected them in the "
                         f"cache at {cached} (or downloadable from {default.url}); or pass --weights FILE") from None


def _factory(name: str, weights, input_size, mean, std) -> LoadedModel:
    module_name, _, attribute = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelError(f"cannot import {name!r}: {error}") from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise ModelError(f"{name} returned {type(module).__name__}, expected a torch.nn.Module")
    if weights is not None:
        _load_state_dict(module, weights)
    mean = tuple(mean or IMAGENET_MEAN)
    std = tuple(std or IMAGENET_STD)
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise ModelError(f"mean and std need 1 or 3 values each, got {len(mean)} and {len(std)}")
    height, width = _pair(input_size or 224)
    steps = [transforms.Grayscale(num_output_channels=1)] if len(mean) == 1 else []
    preprocess = transforms.Compose(steps + [
        transforms.Resize(min(height, width), antialias=True),
        transforms.CenterCrop((height, width)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    outputs = _num_outputs(module) or 0
    return LoadedModel(name, str(weights or "factory's own"), module, preprocess, (len(mean), height, width),
                       mean, std, tuple(str(i) for i in range(outputs)))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) == 1:
        return size[0], size[0]
    return int(size[0]), int(size[1])


def _num_outputs(module: nn.Module) -> int | None:
    """Out features of the last Linear layer: the number of classes, for most classifiers."""
    last = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a ``.pt``/``.pth`` file, never running pickled code.

    Common wrappers are unwrapped: ``{"state_dict": …}``, ``{"model": …}`` and the ``module.``
    prefix that ``DataParallel`` adds.

    Raises:
        UnsafeCheckpointError: the file needs arbitrary code to unpickle (a whole pickled model, say).
        ModelError: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"it pickles {found.group(1)}" if found else "it pickles objects other than tensors"
        raise UnsafeCheckpointError(f"{path}: refused, {what}, which could run arbitrary code; "
                                    "save a state_dict (torch.save(model.state_dict(), …)) or .safetensors") from None
    except (OSError, RuntimeError, SafetensorError, EOFError, ValueError) as error:
        raise ModelError(f"{path}: not a readable checkpoint ({error})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a state_dict (names → tensors), got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_state_dict(module: nn.Module, path: str | os.PathLike) -> None:
    try:
        module.load_state_dict(read_state_dict(path))
    except RuntimeError as error:
        summary = " ".join(str(error).split())[:300]
        raise ModelError(f"{path}: the weights do not fit the model ({summary})") from None
