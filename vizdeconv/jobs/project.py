"""``vizdeconv project``: each channel's top-k activations over image files, projected (paper Fig. 2).

Layout under ``OUT``: per layer, ``<layer>/ch{C:03d}.png`` per channel, ``<layer>/overview.png``
(``overview-2.png`` … past ``SHEET`` channels) and ``<layer>/index.json``; ``index.html`` over
everything in ``OUT``; while a scan is unfinished, its checkpoints in ``.scan/`` (``resume.py``).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vizdeconv import distributed, figures, render, report
from vizdeconv.deconvnet import Deconvnet
from vizdeconv.errors import ImageError
from vizdeconv.jobs import Progress, default_images, find_inputs, no_progress, unique_failures
from vizdeconv.layers import Hit, Layer, trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.outputs import save_json, save_png
from vizdeconv.resume import FOLDER as CHECKPOINTS
from vizdeconv.resume import ScanState, SettingsChanged, load_state, save_state, scan_settings
from vizdeconv.topk import SCAN_CHUNK, TopK, chunk_count, hits, parse_channels, project_hits, scan

SHEET = 64  # channel figures per overview sheet
CHECKPOINT_SECONDS = 180  # the default: a killed scan loses at most this much work


def figure_name(channel: int) -> str:
    return f"ch{channel:03d}.png"


@dataclass(frozen=True)
class TopKReport:
    """What a ``ProjectJob`` found and wrote.

    Attributes:
        folder: ``OUT/<layer slug>``. layer, rule, k: what was asked.
        hits: channel → its top hits, strongest first (fewer than k, or none, for channels that rarely fire).
        scanned: images scanned. failures: files that could not be read, with their reasons.
    """

    folder: Path
    layer: Layer
    rule: str
    k: int
    hits: dict[int, list[Hit]]
    scanned: int
    failures: list[ImageError]

    def figure(self, channel: int) -> Path:
        return self.folder / figure_name(channel)


class ProjectJob:
    """Top-k grids of one or more layers, from one scan; resumable, and shared across ``torchrun`` ranks.

    Args:
        model: the loaded model. layers: ``Layers.select``: a layer (paper number, module name,
            ``name@k``), a range such as ``1-5``, a comma list, or a list of those.
        k: activations per channel, each from a different image. channels: ``all`` or ``0-15,32``, for every layer.
        rule: ``deconvnet``, ``guided`` or ``gradient``. out: the output folder.
        batch_size, workers, decode: images per forward pass (rounded up to whole chunks of ``SCAN_CHUNK``
            in the scan), processes decoding images, ``cpu`` or ``gpu`` decoding of JPEGs in the scan.
        checkpoint_every: save the scan's state every this many images; default every
            ``CHECKPOINT_SECONDS`` of scanning. restart: discard a checkpoint made with other settings.
    """

    def __init__(self, model: LoadedModel, layers: int | str | Sequence[int | str], *, k: int = 9,
                 channels: str = "all", rule: str = "deconvnet", out: str | os.PathLike = "vizdeconv-out",
                 batch_size: int = 16, workers: int = 0, decode: str = "cpu", checkpoint_every: int | None = None,
                 restart: bool = False) -> None:
        found = trace_layers(model)
        self.model, self.layers = model, found.select(layers)
        self.deconvnets = [Deconvnet(model, found, layer, rule=rule) for layer in self.layers]
        self.channels = [parse_channels(channels, layer.output_shape[0]) for layer in self.layers]
        self.k, self.rule, self.out, self.batch_size, self.workers = k, rule, Path(out), batch_size, workers
        self.decode, self.checkpoint_every, self.restart = decode, checkpoint_every, restart

    def run(self, paths: Iterable[str | os.PathLike] = (), progress: Progress = no_progress) -> list[TopKReport]:
        """Scan ``paths`` (files or folders; default ``default_images``), project every hit, write the
        figures and refresh the report.

        Under ``torchrun`` every rank calls this with the same arguments: each scans its share of
        the chunks and draws its share of the channels, and rank 0 writes the shared files.
        Returns one report per layer, in graph order.
        """
        ranks = distributed.current()
        images, failures = find_inputs(list(paths) or default_images(self.model))
        tops, read_failures = self._merge(ranks.gather(self._scan(images, ranks, progress)))
        scanned = len(images) - len(read_failures)
        found = [hits(top, layer, images, self.model.input_size) for top, layer in zip(tops, self.layers)]
        mine = set(ranks.share([(i, channel) for i, layer_found in enumerate(found)
                                for channel, channel_hits in layer_found.items() if channel_hits]))
        unreadable: list[ImageError] = []
        drawn = self._draw(found, mine, scanned, unreadable, progress)
        kept, lost = {}, []
        for rank_drawn, rank_unreadable in ranks.gather((drawn, unreadable)):
            kept.update(rank_drawn)
            lost.extend(rank_unreadable)
        failures += read_failures + unique_failures(lost)
        found = [{channel: kept.get((i, channel), []) for channel in layer_found} for i, layer_found in enumerate(found)]
        if ranks.main:
            for layer, layer_found in zip(self.layers, found):
                self._write(layer, layer_found, scanned, failures)
            report.write_report(self.out)
            shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)  # the results are written
        ranks.barrier()  # no rank leaves (and exits) before rank 0 has written
        return [TopKReport(self.out / layer.slug, layer, self.rule, self.k, layer_found, scanned, failures)
                for layer, layer_found in zip(self.layers, found)]

    def _scan(self, images: list[Path], ranks: distributed.Ranks, progress: Progress
              ) -> tuple[list[dict[str, torch.Tensor]], list[ImageError]]:
        """This rank's share of the scan, from its checkpoint if it has one, saved as it goes and at the end.

        Returns each layer's ``TopK.columns()`` and the files that failed.
        """
        model = self.model
        settings = scan_settings(model=model.name, weights=model.weights, device=model.device.type,
                                 preprocessing=[model.input_size, model.mean, model.std],
                                 layers=[layer.name for layer in self.layers], channels=self.channels, k=self.k,
                                 decode=self.decode, paths=images, world=ranks.world)
        state = self.out / CHECKPOINTS / f"rank{ranks.rank}.safetensors"
        resumed = self._resume(state, settings, ranks)
        tops = self._folded([resumed.columns] if resumed else [])
        failures, done = (resumed.failures, resumed.chunks_done) if resumed else ([], 0)
        chunks = ranks.share(range(chunk_count(len(images))))
        files = sum(min(SCAN_CHUNK, len(images) - chunk * SCAN_CHUNK) for chunk in chunks)

        def files_done(chunks_done: int) -> int:
            return min(chunks_done * SCAN_CHUNK, files)

        def save(chunks_done: int) -> None:
            save_state(state, ScanState(settings, chunks_done, failures, [top.columns() for top in tops]))

        scanning = "scanning " + ", ".join(layer.label for layer in self.layers)
        progress(scanning, files_done(done), files)
        saved, saved_at = done, time.monotonic()
        for count in scan(model, self.layers, tops, images, failures, chunks=chunks[done:], batch_size=self.batch_size,
                          workers=self.workers, decode=self.decode):
            if (files_done(done + count) - files_done(saved) >= self.checkpoint_every if self.checkpoint_every
                    else time.monotonic() - saved_at >= CHECKPOINT_SECONDS):
                save(done + count)
                saved, saved_at = done + count, time.monotonic()
            progress(scanning, files_done(done + count), files)
        if saved < len(chunks):
            save(len(chunks))  # a run stopped while projecting goes on from here
        progress(scanning, files, files)
        return [top.columns() for top in tops], failures

    def _resume(self, state: Path, settings: dict, ranks: distributed.Ranks) -> ScanState | None:
        """This rank's checkpoint, if it has one (none after ``--restart``).

        Raises:
            SettingsChanged: on every rank, when any rank's checkpoint is from other settings or
                the ranks found different files.
        """
        if self.restart:
            ranks.barrier()  # every rank has started: none is still reading a checkpoint
            if ranks.main:
                shutil.rmtree(state.parent, ignore_errors=True)
            ranks.barrier()
        try:
            resumed, problem = load_state(state, settings), None
        except SettingsChanged as error:
            resumed, problem = None, str(error)
        answers = ranks.gather((problem, settings["files"]))
        if len({files for _, files in answers}) > 1:
            problem = f"the ranks found different files ({', '.join(files for _, files in answers)}); they need the same"
        problem = problem or next((p for p, _ in answers if p), None)  # every rank stops if any must
        if problem:
            raise SettingsChanged(problem)
        return resumed

    def _folded(self, column_sets: Iterable[list[dict[str, torch.Tensor]]]) -> list[TopK]:
        """Each layer's top-k with every set of saved ``TopK.columns()`` folded in (none: empty ones)."""
        tops = [TopK(channels, self.k, self.model.device) for channels in self.channels]
        for columns in column_sets:
            for top, layer_columns in zip(tops, columns):
                top.fold(**layer_columns)
        return tops

    def _merge(self, contributions: list[tuple[list[dict[str, torch.Tensor]], list[ImageError]]]
               ) -> tuple[list[TopK], list[ImageError]]:
        """Every rank's top-k folded into one per layer, and every rank's failed files in path order."""
        return (self._folded(columns for columns, _ in contributions),
                unique_failures(f for _, failures in contributions for f in failures))

    def _draw(self, found: list[dict[int, list[Hit]]], mine: set[tuple[int, int]], scanned: int,
              lost: list[ImageError], progress: Progress) -> dict[tuple[int, int], list[Hit]]:
        """Project the hits of the ``(layer index, channel)`` pairs in ``mine`` and save each one's figure.

        ``found[i]`` is layer i's channel → hits, every channel's (``project_hits`` needs them all).
        Returns ``(layer index, channel)`` → the hits drawn: those on a file that no longer loads
        (added to ``lost``) are left out.
        """
        wanted = {(i, hit.image) for i, channel in mine for hit in found[i][channel]}
        projecting = f"projecting {sum(len(found[i][channel]) for i, channel in mine)} activations"
        progress(projecting, 0, len(wanted))
        tiles = {}
        for done, (i, result) in enumerate(project_hits(self.deconvnets, found, lost, only=mine,
                                                        batch_size=self.batch_size, decode=self.decode), 1):
            pairs = figures.image_tiles(self.model, self.layers[i], result.input, result.projections)
            tiles.update(zip(((i, projection.hit) for projection in result.projections), pairs))
            progress(projecting, done, len(wanted))
        progress(projecting, len(wanted), len(wanted))
        drawn = {}
        columns = math.ceil(math.sqrt(self.k))
        for i, channel in sorted(mine):
            layer = self.layers[i]
            shown = drawn[i, channel] = [hit for hit in found[i][channel] if (i, hit) in tiles]
            if not shown:
                continue
            title = f"{layer.label}, channel {channel}: top {len(shown)} of {scanned} images"
            figure = figures.channel_figure(title, [tiles[i, h][0] for h in shown], [tiles[i, h][1] for h in shown],
                                            [h.value for h in shown], [h.image.stem for h in shown], columns)
            save_png(self.out / layer.slug / figure_name(channel), figure)
        return drawn

    def _write(self, layer: Layer, found: dict[int, list[Hit]], scanned: int, failures: list[ImageError]) -> None:
        """The layer's overview sheets (from the channel figures on disk) and ``index.json``; stale figures removed."""
        folder = self.out / layer.slug
        channels = [{"channel": channel, "png": figure_name(channel), "hits": [hit.to_json() for hit in channel_hits]}
                    for channel, channel_hits in found.items() if channel_hits]
        sheets = []
        for number, start in enumerate(range(0, len(channels), SHEET), start=1):
            name = "overview.png" if number == 1 else f"overview-{number}.png"
            sheet = channels[start:start + SHEET]
            title = (f"{self.model.name}, {layer.label}, {self.rule} rule: channels {sheet[0]['channel']}.."
                     f"{sheet[-1]['channel']}, top {self.k} over {scanned} images")
            labels = [f"channel {c['channel']}: max {c['hits'][0]['value']:.3g}" for c in sheet]
            drawn = [_read_png(folder / c["png"]) for c in sheet]
            save_png(folder / name, figures.overview(drawn, labels, title))
            sheets.append(name)
        field = layer.field
        save_json(folder / "index.json", {
            "kind": "project", "model": self.model.name, "weights": self.model.weights, "layer": layer.number,
            "module": layer.name, "label": layer.label, "rule": self.rule,
            "input_size": list(self.model.input_size), "k": self.k,
            "receptive_field": {"size": list(field.size), "stride": list(field.stride), "offset": list(field.offset)},
            "images_scanned": scanned, "failed": [failure.to_json() for failure in failures],
            "display": render.DISPLAY, "overview": sheets, "channels": channels,
        })
        written = {channel["png"] for channel in channels} | set(sheets)
        for stale in [*folder.glob("ch*.png"), *folder.glob("overview*.png"), *folder.glob(".*.tmp")]:
            if stale.name not in written:  # from an earlier run with other channels or k, or one killed mid-write
                stale.unlink()


def _read_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
