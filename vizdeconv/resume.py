"""Checkpoints of a top-k scan, so that an interrupted ``project`` goes on where it stopped.

One ``.safetensors`` file per rank under ``OUT/.scan/`` (tensors and JSON text, never a
pickle), replaced atomically: a run killed at any moment leaves the previous checkpoint or the new
one. It holds each layer's running top-k, how many of the rank's chunks are done, the files that
failed so far, and the settings that must match for a rerun to continue from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.outputs import save_safetensors
from vizdeconv.topk import SCAN_CHUNK

FOLDER = ".scan"


class SettingsChanged(VizDeconvError):
    """An interrupted scan's checkpoint, or a training run in a sparse model file, was made with other settings;
    ``--restart`` discards it."""


@dataclass
class ScanState:
    """What a checkpoint holds.

    Attributes:
        settings: what a rerun must match (``scan_settings``).
        chunks_done: how many of the rank's chunks are folded in.
        failures: files that failed in those chunks.
        columns: per layer, ``TopK.columns()``.
    """

    settings: dict
    chunks_done: int
    failures: list[ImageError]
    columns: list[dict[str, torch.Tensor]]


def scan_settings(*, model: str, weights: str, device: str, preprocessing: list, layers: Sequence[str],
                  channels: Sequence[Sequence[int]], k: int, decode: str, paths: Sequence[Path], world: int) -> dict:
    """The settings that fix a scan's chunks and their result (devices and decoders round differently),
    as JSON gives them back; the file list enters as a hash of the absolute paths."""
    return json.loads(json.dumps({
        "format": f"vizdeconv scan, chunks of {SCAN_CHUNK} files", "model": model, "weights": weights,
        "device": device, "preprocessing": preprocessing, "layers": layers, "channels": channels, "k": k,
        "decode": decode, "files": file_listing(paths), "ranks": world}))


def file_listing(paths: Sequence[Path]) -> str:
    """How a run's settings name its input files: their count and a hash of their absolute paths."""
    listing = hashlib.sha256("\n".join(os.path.abspath(path) for path in paths).encode()).hexdigest()
    return f"{len(paths)} files, sha256 {listing[:16]}"


def check_settings(path: Path, what: str, saved: dict, settings: dict, remedy: str) -> None:
    """Refuse to go on from ``what`` in ``path`` when its ``saved`` settings differ from ``settings``.

    Raises:
        SettingsChanged: naming the first setting that differs, its value then and now, and ``remedy``.
    """
    changed = [key for key in settings if saved.get(key) != settings[key]]
    if changed:
        key = changed[0]
        raise SettingsChanged(f"{path}: {what} with other settings ({key}: {_short(saved.get(key))} then, "
                              f"{_short(settings[key])} now); {remedy}")


def save_state(path: Path, state: ScanState) -> None:
    tensors = {f"{layer}.{key}": tensor for layer, columns in enumerate(state.columns) for key, tensor in columns.items()}
    metadata = {"settings": json.dumps(state.settings), "chunks_done": str(state.chunks_done),
                "failures": json.dumps([[str(f.path), f.reason] for f in state.failures])}
    save_safetensors(path, tensors, metadata)


def load_state(path: Path, settings: dict) -> ScanState | None:
    """The checkpoint at ``path`` if there is one, made with ``settings``.

    Raises:
        SettingsChanged: the checkpoint is from other settings, or unreadable; says which setting differs.
    """
    if not path.exists():
        return None
    restart = "; rerun with --restart to discard it and scan from the start"
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
        saved = json.loads(metadata["settings"])
        chunks_done = int(metadata["chunks_done"])
        failures = [ImageError(Path(image), reason) for image, reason in json.loads(metadata["failures"])]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise SettingsChanged(f"{path}: unreadable scan checkpoint ({error}){restart}") from None
    check_settings(path, "an interrupted scan", saved, settings, restart.removeprefix("; "))
    columns = [{key: tensors[f"{layer}.{key}"] for key in ("values", "ranks", "places")}
               for layer in range(len(settings["layers"]))]
    return ScanState(saved, chunks_done, failures, columns)


def _short(value, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
