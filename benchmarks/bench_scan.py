"""The scan phase of `vizdeconv project` against a plain forward pass, side by side in one run.

1. Throughput on alexnet (random weights) over a folder of 256×256 JPEGs made from the sample
   photos: a plain DataLoader + model loop that keeps nothing, then the scan (top-9 of every
   channel of layer 5), same batch size and workers. Goal: scan ≥ 0.9× plain.
2. Peak memory (max RSS of a fresh process) of the scan on the embedded model over N and 10 N
   images. Goal: flat.
3. The whole `project` job (``ProjectJob``) on alexnet for 16 channels: seconds per channel beyond the scan
   (9 projections, tiles, figure).

    make bench      # or: python benchmarks/bench_scan.py [--images 256] [--batch-size 32] [--memory-images 500]
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image

from vizdeconv.images import find_images
from vizdeconv.jobs.project import ProjectJob
from vizdeconv.layers import Layer, trace_layers
from vizdeconv.models import LoadedModel, load_model
from vizdeconv.topk import TopK, scan

PHOTOS = Path(__file__).resolve().parent.parent / "sample_images" / "photos"
PHOTO_FILES = find_images([PHOTOS])[0]  # the image files only: the folder also holds the correspondence example's parts.json
FASHION = Path(__file__).resolve().parent.parent / "sample_images" / "fashion-mnist"


def make_folder(folder: Path, count: int, sources: list[Path], size: int | None) -> list[Path]:
    """``count`` distinct images: random crops and flips of the sources."""
    rng = random.Random(0)
    pictures = [Image.open(p).convert("RGB" if size else "L") for p in sources]
    for i in range(count):
        picture = rng.choice(pictures)
        side = rng.randint(picture.width // 2, min(picture.size))
        left, top = rng.randint(0, picture.width - side), rng.randint(0, picture.height - side)
        tile = picture.crop((left, top, left + side, top + side)).resize((size or 28,) * 2)
        if rng.random() < 0.5:
            tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
        tile.save(folder / f"{i:05d}.{'jpg' if size else 'png'}")
    return find_images([folder])[0]


def random_alexnet(device: str = "cpu") -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel.from_module(torchvision.models.alexnet(), 224, name="alexnet", device=device)


def scan_timer() -> tuple[dict, callable]:
    """A progress callback that notes when the scan stage starts and ends."""
    times = {}

    def progress(stage: str, done: int, total: int | None) -> None:
        if stage.startswith("scanning"):
            times.setdefault("start", time.perf_counter())
            times["end"] = time.perf_counter()

    return times, progress


def alternate(runs: dict, rounds: int = 2) -> dict[object, list]:
    """Each run's results over ``rounds`` rounds, the runs taking turns, so that a drift in the
    machine's speed reaches all of them alike."""
    results = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return results


def elapsed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def plain_pass(model: LoadedModel, paths: list[Path], batch_size: int, workers: int) -> None:
    """A plain DataLoader + model loop over ``paths`` that keeps nothing: what the scan is measured against."""
    with torch.no_grad():
        for batch in model.read(paths, [], batch_size=batch_size, workers=workers):
            model.module(batch.images.to(model.device, non_blocking=True))


def scan_rates(model: LoadedModel, layer: Layer, paths: list[Path], batch_size: int, workers: int
               ) -> tuple[float, float]:
    """Images per second of a plain DataLoader + model loop and of the scan to ``layer`` (top-9 of
    every channel), alternating twice and keeping the best of each."""
    def plain():
        plain_pass(model, paths, batch_size, workers)

    def scanned():
        top = TopK(range(layer.output_shape[0]), 9, model.device)
        for _ in scan(model, [layer], [top], paths, [], batch_size=batch_size, workers=workers):
            pass

    timings = alternate({"plain": lambda: elapsed(plain), "scan": lambda: elapsed(scanned)})
    return len(paths) / min(timings["plain"]), len(paths) / min(timings["scan"])


def throughput(model: LoadedModel, paths: list[Path], batch_size: int, workers: int) -> None:
    plain_rate, scan_rate = scan_rates(model, trace_layers(model).layer(5), paths, batch_size, workers)
    print(f"alexnet, {len(paths)} images 256², batch {batch_size}, {workers} workers, {torch.get_num_threads()} threads")
    print(f"  plain forward (DataLoader + model):    {plain_rate:7.1f} images/s")
    print(f"  scan (layer 5, top-9 of 256 channels): {scan_rate:7.1f} images/s   ratio {scan_rate / plain_rate:.2f}×")

    with tempfile.TemporaryDirectory() as out:
        job = ProjectJob(model, 5, channels="0-15", out=out, batch_size=batch_size, workers=workers)
        scanning, progress = scan_timer()  # the job's own scan stage, timed
        start = time.perf_counter()
        (done,) = job.run(paths, progress=progress)
        seconds = time.perf_counter() - start
    channels = sum(1 for found in done.hits.values() if found)
    beyond_scan = seconds - (scanning["end"] - scanning["start"])
    print(f"  project job, 16 channels: {seconds:.1f} s, of which {beyond_scan / channels:.2f} s per channel beyond "
          f"the scan ({channels} channels × 9: projections + tiles + figures)")


def peak_memory_child(folder: str) -> None:
    model = load_model(device="cpu")
    layer = trace_layers(model).layer(5)
    paths = find_images([folder])[0]
    top = TopK(range(layer.output_shape[0]), 9, model.device)
    for _ in scan(model, [layer], [top], paths, [], batch_size=64):
        pass
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory(count: int) -> None:
    peaks = []
    for n in (count, 10 * count):
        with tempfile.TemporaryDirectory() as folder:
            make_folder(Path(folder), n, sorted(FASHION.glob("*.png")), None)
            child = subprocess.run([sys.executable, __file__, "--child", folder], capture_output=True, text=True,
                                   check=True)
            peaks.append(int(child.stdout.split()[-1]) / 1024)
    print(f"embedded model, layer 5 scan, peak RSS: {count} images {peaks[0]:.0f} MiB, {10 * count} images "
          f"{peaks[1]:.0f} MiB   ratio {peaks[1] / peaks[0]:.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--memory-images", type=int, default=500, help="N for the peak-memory part (N and 10 N)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child)
        return
    with tempfile.TemporaryDirectory() as folder:
        paths = make_folder(Path(folder), args.images, PHOTO_FILES, 256)
        throughput(random_alexnet(), paths, args.batch_size, args.workers)
    memory(args.memory_images)


if __name__ == "__main__":
    main()
