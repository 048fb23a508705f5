"""Finding and reading image files deliberately: odd modes, EXIF orientation, bombs, broken files."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms._presets import ImageClassification

from vizdeconv.errors import ImageError, VizDeconvError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold; larger images are refused, not just warned about


def find_images(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders (recursively) into image files, sorted, without duplicates.

    Inside folders only files with an image extension (any case) count, and hidden names
    (``.*``, such as macOS ``._x.jpg`` forks) are skipped; a file named explicitly is always tried.

    Returns:
        The image paths, and ``(path, reason)`` for each argument that does not exist.
    """
    found: dict[Path, None] = {}
    missing = []
    for arg in map(Path, paths):
        if arg.is_dir():
            for root, dirs, files in os.walk(arg):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        found[Path(root, name)] = None
        elif arg.is_file():
            found[arg] = None
        else:
            missing.append((arg, "no such file or folder"))
    return sorted(found), missing


def load_image(path: str | os.PathLike, *, channels: int, background: Sequence[float]) -> Image.Image:
    """Read one image as 8-bit RGB (``channels=3``) or grey (``channels=1``).

    EXIF orientation is applied; transparency is composited over ``background`` (RGB in 0..1,
    normally the dataset mean, which normalises to zero); 16-bit images are scaled, not clipped;
    multi-frame files give their first frame; images over ``MAX_PIXELS`` are refused.

    Raises:
        ImageError: naming the file and the reason.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(path, f"{image.width}×{image.height} pixels is over the limit of {MAX_PIXELS} "
                                           "(possible decompression bomb)")
                image.load()
                image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(path, f"refused as a possible decompression bomb ({error})") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file, or a format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(path, f"unreadable image ({error})") from None
    return _to_8bit(image, channels=channels, background=background)


def _to_8bit(image: Image.Image, *, channels: int, background: Sequence[float]) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # Integer images are 16-bit data; float images are 0..1 if they fit, else 0..255.
        full_scale = 65535.0 if image.mode != "F" else 1.0 if values.max(initial=0) <= 1.0 else 255.0
        image = Image.fromarray(np.clip(values * (255 / full_scale) + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        fill = tuple(round(255 * v) for v in (list(background) * 3)[:3])
        canvas = Image.new("RGB", image.size, fill)
        canvas.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = canvas
    return image.convert("RGB" if channels == 3 else "L")


@dataclass
class Batch:
    """Preprocessed images that loaded, with their paths, in input order; ``done`` counts the files
    of the whole read consumed so far, those that failed included (for progress).

    ``images`` is on the CPU after CPU decoding (pinned when the target device is CUDA), on the
    device after device decoding (see ``read_batches``)."""

    paths: list[Path]
    images: torch.Tensor
    done: int


JPEG_START = b"\xff\xd8"  # every JPEG file begins with the start-of-image marker


@dataclass
class _Jpeg:
    """A JPEG file's bytes (1-D uint8 tensor), left for the device decoder in the main process."""

    data: torch.Tensor


def _jpeg_bytes(path: Path) -> torch.Tensor | None:
    """The file's bytes if the device decoder reads it as ``load_image`` would, else None.

    Only the header is parsed: a JPEG in RGB or grey (the decoder has no CMYK), with no EXIF
    orientation (the decoder ignores it), within ``MAX_PIXELS``. Its start-of-scan and end-of-image
    markers must be there too: nvjpeg decodes a file cut short, or one with no scan, into an image,
    where Pillow refuses it. Every other file takes the CPU path.
    """
    try:
        with open(path, "rb") as file:
            if file.read(2) != JPEG_START:
                return None  # not a JPEG: left unread for the CPU path
            data = bytearray(JPEG_START + file.read())  # read once: the header below, the bytes for the decoder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(io.BytesIO(data)) as image:
                if not (image.format == "JPEG" and image.mode in ("RGB", "L")
                        and image.width * image.height <= MAX_PIXELS
                        and image.getexif().get(ExifTags.Base.Orientation, 1) == 1):
                    return None
    except Exception:  # whatever it is, the CPU path meets it too and reports it as decode="cpu" does
        return None
    whole = b"\xff\xda" in data and data.endswith(b"\xff\xd9")
    return torch.frombuffer(data, dtype=torch.uint8) if whole else None


class _Files(torch.utils.data.Dataset):
    """The files of a read, decoded and preprocessed on the CPU; with ``raw_jpegs``, the JPEGs that
    the device decoder can take come out as ``_Jpeg`` instead."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable, channels: int, background: Sequence[float],
                 raw_jpegs: bool = False):
        self.paths, self.preprocess, self.channels, self.background = paths, preprocess, channels, background
        self.raw_jpegs = raw_jpegs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Path, torch.Tensor | ImageError | _Jpeg]:
        path = self.paths[index]
        data = _jpeg_bytes(path) if self.raw_jpegs else None
        return path, self.read(path) if data is None else _Jpeg(data)

    def read(self, path: Path) -> torch.Tensor | ImageError:
        """The CPU path: the preprocessed image, or why the file failed."""
        try:
            return self.preprocess(load_image(path, channels=self.channels, background=self.background))
        except ImageError as error:
            return error


def _stack(items: Sequence[tuple[Path, torch.Tensor | ImageError]],
           ) -> tuple[list[ImageError], list[Path], torch.Tensor | None]:
    """The failures, then the paths and images that loaded, in order, the images in one tensor.

    As the DataLoader's ``collate_fn`` this runs in the worker, so that ``pin_memory`` pins each
    batch as a whole, ready for one non-blocking copy to the GPU (pinning each image is wasted on
    the ``torch.stack`` that copies them after).
    """
    errors = [item for _, item in items if isinstance(item, ImageError)]
    good = [(path, item) for path, item in items if not isinstance(item, ImageError)]
    return errors, [path for path, _ in good], torch.stack([image for _, image in good]) if good else None


def tensor_preprocess(preprocess: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's preprocessing for a decoded uint8 ``(C, H, W)`` tensor, on whatever device it is.

    A ``transforms.Compose`` of Grayscale, Resize, CenterCrop, ToTensor and Normalize runs the same
    steps on tensors, ``ToTensor`` (PIL only) becoming ``ConvertImageDtype``; torchvision's
    ``ImageClassification`` presets (its models' ``weights.transforms()``) take tensors as they are.

    Raises:
        VizDeconvError: any other preprocessing (timm's, a user's own), which may need PIL images.
    """
    if isinstance(preprocess, ImageClassification):
        return preprocess
    steps = preprocess.transforms if isinstance(preprocess, transforms.Compose) else [preprocess]
    known = (transforms.Grayscale, transforms.Resize, transforms.CenterCrop, transforms.ToTensor, transforms.Normalize)
    unknown = [type(step).__name__ for step in steps if not isinstance(step, known)]
    if unknown:
        raise VizDeconvError(f"the model's preprocessing ({', '.join(unknown)}) cannot run on tensors, so --decode "
                             "gpu is unavailable for it; use --decode cpu")
    return transforms.Compose([transforms.ConvertImageDtype(torch.float32) if isinstance(step, transforms.ToTensor)
                               else step for step in steps])


class _DeviceDecoder:
    """Turns the DataLoader's items, raw JPEGs among them, into ``_stack``'s batch on ``device``."""

    def __init__(self, files: _Files, device: torch.device):
        self.files, self.device = files, device
        self.preprocess = tensor_preprocess(files.preprocess)
        self.mode = ImageReadMode.RGB if files.channels == 3 else ImageReadMode.GRAY

    def __call__(self, items: Sequence[tuple[Path, torch.Tensor | ImageError | _Jpeg]],
                 ) -> tuple[list[ImageError], list[Path], torch.Tensor | None]:
        items = list(items)
        jpegs = [i for i, (_, item) in enumerate(items) if isinstance(item, _Jpeg)]
        for i, image in zip(jpegs, self.decode([items[i][1].data for i in jpegs])):
            path = items[i][0]
            # A file the device decoder refuses gets the CPU path's result: the image, or the same ImageError.
            items[i] = path, self.files.read(path) if image is None else self.preprocess(image)
        return _stack([(path, item.to(self.device, non_blocking=True) if isinstance(item, torch.Tensor) else item)
                       for path, item in items])

    def decode(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The decoded uint8 images on the device, None for each file the decoder refuses.

        One batched call first (nvjpeg decodes a batch at once); it fails as a whole when one
        file is bad, so then one call a file finds which.
        """
        if not jpegs:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 defers to TorchCodec
            batch = self._decoded(jpegs)
            return batch if batch is not None else [self._decoded(data) for data in jpegs]

    def _decoded(self, data: torch.Tensor | list[torch.Tensor]):
        """``decode_jpeg``'s result, or None where the decoder refuses (running out of memory is no refusal)."""
        try:
            return decode_jpeg(data, mode=self.mode, device=self.device)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            return None


def read_batches(paths: Sequence[Path], *, preprocess: Callable[[Image.Image], torch.Tensor], channels: int,
                 background: Sequence[float], batch_size: int = 32, workers: int = 0, decode: str = "cpu",
                 device: torch.device | None = None) -> Iterator[Batch | ImageError]:
    """Load, preprocess and batch image files, in order; a file that fails comes out as its ``ImageError``.

    ``workers`` > 0 reads in that many background processes (torch's DataLoader).

    ``decode="cpu"`` decodes and preprocesses with Pillow; batches stay on the CPU, pinned when
    ``device`` is CUDA so that the caller's ``.to(device, non_blocking=True)`` overlaps. ``decode="gpu"``
    keeps the CPU workers to reading: the JPEGs that the device decoder reads as Pillow would are
    decoded together by one ``decode_jpeg`` call per batch on ``device`` and preprocessed there; the
    other files take the CPU path, with the same failures. Batches are then on ``device`` (on a CPU
    device, torchvision's CPU decoder runs, through the same code).

    Raises:
        VizDeconvError: an unknown ``decode``; ``decode="gpu"`` with preprocessing that cannot run on tensors.
    """
    if decode not in ("cpu", "gpu"):
        raise VizDeconvError(f"unknown decode {decode!r}; expected cpu or gpu")
    device = torch.device(device or "cpu")
    files = _Files(list(paths), preprocess, channels, background, raw_jpegs=decode == "gpu")
    decoder = _DeviceDecoder(files, device) if decode == "gpu" else None
    loader = torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=workers,
                                         collate_fn=list if decoder else _stack, pin_memory=device.type == "cuda")
    done = 0
    for items in loader:
        errors, found, images = decoder(items) if decoder else items
        done += len(errors) + len(found)
        yield from errors
        if found:
            yield Batch(found, images, done)
