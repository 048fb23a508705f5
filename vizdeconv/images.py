"""Finding and reading image files deliberately: odd modes, EXIF orientation, bombs, broken files."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vizdeconv.errors import ImageError

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
    of the whole read consumed so far, those that failed included (for progress)."""

    paths: list[Path]
    images: torch.Tensor
    done: int = 0


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Callable, channels: int, background: Sequence[float]):
        self.paths, self.preprocess, self.channels, self.background = paths, preprocess, channels, background

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Path, torch.Tensor | ImageError]:
        path = self.paths[index]
        try:
            return path, self.preprocess(load_image(path, channels=self.channels, background=self.background))
        except ImageError as error:
            return path, error


def read_batches(paths: Sequence[Path], *, preprocess: Callable[[Image.Image], torch.Tensor], channels: int,
                 background: Sequence[float], batch_size: int = 32, workers: int = 0) -> Iterator[Batch | ImageError]:
    """Load, preprocess and batch image files, in order; a file that fails comes out as its ``ImageError``.

    ``workers`` > 0 decodes in that many background processes (torch's DataLoader).
    """
    loader = torch.utils.data.DataLoader(_Files(list(paths), preprocess, channels, background), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list)
    for items in loader:
        errors = [item for _, item in items if isinstance(item, ImageError)]
        good = [(path, item) for path, item in items if not isinstance(item, ImageError)]
        yield from errors
        if good:
            yield Batch([path for path, _ in good], torch.stack([tensor for _, tensor in good]))
