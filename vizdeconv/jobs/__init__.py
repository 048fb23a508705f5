"""The commands as library jobs: build one with its options, then ``run(paths, progress=…)``.

Each job finds the image files, owns resuming and its summary files, writes its results under
``OUT`` (refreshing ``OUT/index.html``) and returns a typed report; a file that fails is
reported, never fatal. The CLI parses options, runs one job, prints its report; notebooks and
benchmarks use the same jobs::

    import vizdeconv as vd
    model = vd.load_model("efficientnet_lite0")
    (report,) = vd.ProjectJob(model, "_blocks.9", channels="0-7", k=4).run(["photos/"])  # one per layer
    report.hits[3]        # channel 3's top activations, strongest first
    report.folder         # OUT/_blocks_9 with ch003.png, overview.png, index.json
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.images import Batch, find_images
from vizdeconv.embedded import sample_folder
from vizdeconv.models import EMBEDDED, LoadedModel
from vizdeconv.outputs import output_names, save_json

Progress = Callable[[str, int, "int | None"], None]
"""``progress(stage, done, total)``: called as work advances; ``total`` None while unknown."""


def no_progress(stage: str, done: int, total: int | None) -> None:
    """The default: report nothing."""


def default_images(model: LoadedModel) -> list[Path]:
    """What a job scans when no images are given: the embedded model's shipped samples."""
    if model.name != EMBEDDED:
        raise VizDeconvError("--images is needed for models other than the embedded one")
    return [sample_folder()]


def reading(model: LoadedModel, paths: Sequence[Path], failures: list[ImageError], progress: Progress, stage: str,
            **options) -> Iterator[Batch]:
    """``model.read(paths, failures, **options)``, calling ``progress(stage, files done, len(paths))`` as
    each batch is done and at the end."""
    progress(stage, 0, len(paths))
    for batch in model.read(paths, failures, **options):
        yield batch
        progress(stage, batch.done, len(paths))
    progress(stage, len(paths), len(paths))


def find_outputs(paths: Iterable[str | os.PathLike], folder: Path
                 ) -> tuple[list[Path], list[ImageError], dict[Path, Path]]:
    """``find_inputs``, and each image's own output folder under ``folder`` (``outputs.output_names``)."""
    images, failures = find_inputs(paths)
    return images, failures, {path: folder / name for path, name in output_names(images).items()}


def unique_failures(failures: Iterable[ImageError]) -> list[ImageError]:
    """One failure per file, in path order: what ranks report together (each may have failed on the same file)."""
    return sorted({str(f.path): f for f in failures}.values(), key=lambda f: Path(f.path))


def read_list(path: Path) -> list[Path]:
    """The image paths in a text file, one per line; relative ones are taken from the file's folder.

    Blank lines and lines starting with ``#`` are skipped.

    Raises:
        VizDeconvError: the file cannot be read, or names no files.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise VizDeconvError(f"{path}: cannot read the image list ({error})") from None
    listed = [Path(path).parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not listed:
        raise VizDeconvError(f"{path}: the image list names no files")
    return listed


def find_inputs(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[ImageError]]:
    """Image files under ``paths`` (sorted) and an ``ImageError`` for each path that does not exist.

    Raises:
        VizDeconvError: nothing at all was found.
    """
    paths = [str(p) for p in paths]
    images, missing = find_images(paths)
    failures = [ImageError(path, reason) for path, reason in missing]
    if not images and not failures:
        raise VizDeconvError("no image files found in " + ", ".join(paths))
    return images, failures


def save_manifest(folder: Path, kind: str, title: str, figures: list[dict], failures: list[ImageError]) -> Path:
    """``folder/index.json`` for the report: ``figures`` (each with its ``png`` relative to ``folder``)
    merged with an earlier run's figures whose PNG is still there, and this run's failed files."""
    index = folder / "index.json"
    made = {figure["png"] for figure in figures}
    try:
        earlier = json.loads(index.read_text())["figures"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = []  # none yet, or not ours: this run's figures start a new list
    kept = [f for f in (earlier if isinstance(earlier, list) else []) if isinstance(f, dict)
            and isinstance(f.get("png"), str) and f["png"] not in made and (folder / f["png"]).is_file()]
    return save_json(index, {"kind": kind, "title": title, "figures": sorted(kept + figures, key=lambda f: f["png"]),
                             "failed": [failure.to_json() for failure in failures]})
