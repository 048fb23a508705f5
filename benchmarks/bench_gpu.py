"""Feeding a GPU: a scan of alexnet layers 1–5 at 224² with CPU decoding against ``--decode gpu``.

Needs CUDA. Over a folder of 500×375 JPEGs (ImageNet's typical size) made from the sample photos,
all measured in one run after a warm-up:

1. a plain DataLoader + model loop, CPU decoding on every core but one (the ceiling of CPU feeding);
2. the scan (top-9 of every channel of layers 1–5 in one pass), CPU decoding, same workers;
3. the same scan with ``--decode gpu`` (batched nvJPEG; the workers only read bytes);
4. the projection phase per channel (layer 5, 64 channels: 9 projections, tiles, figure);

then how far the two decoders' top-9 agree, and the time for ImageNet's 1.28 M training images
(scan at the faster rate, plus the projection phase for all 1152 channels).

    python benchmarks/bench_gpu.py [--images 4000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from bench_scan import PHOTO_FILES, plain_pass, random_alexnet, scan_timer

from vizdeconv.images import find_images
from vizdeconv.jobs.project import ProjectJob

IMAGENET_TRAIN = 1_281_167


def make_jpeg(job: tuple[Path, int]) -> None:
    path, seed = job
    from PIL import Image
    rng = random.Random(seed)
    with Image.open(rng.choice(PHOTO_FILES)) as photo:
        photo = photo.convert("RGB")
        side = rng.randint(min(photo.size) // 2, min(photo.size))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        photo.crop((left, top, left + side, top + side * 3 // 4)).resize((500, 375)).save(path, quality=90)


def timed_scan(model, folder: Path, workers: int, batch_size: int, decode: str, channels: str = "0-15",
               layers: str = "1-5") -> tuple[float, float, list]:
    """Seconds of the scan stage and of the whole job, and the reports."""
    times, progress = scan_timer()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        reports = ProjectJob(model, layers, channels=channels, out=out, batch_size=batch_size, workers=workers,
                             decode=decode).run([folder], progress=progress)
        synchronize(model)
        whole = time.perf_counter() - start
    return times["end"] - times["start"], whole, reports


def plain_rate(model, paths: list[Path], workers: int, batch_size: int) -> float:
    start = time.perf_counter()
    plain_pass(model, paths, batch_size, workers)
    synchronize(model)
    return len(paths) / (time.perf_counter() - start)


def synchronize(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def decoder_difference(model, paths: list[Path]) -> tuple[float, float]:
    """Max and mean |CPU-decoded − GPU-decoded| preprocessed input (normalised units)."""
    cpu = torch.cat([batch.images for batch in model.read(paths, [], batch_size=64)])
    gpu = torch.cat([batch.images.cpu() for batch in model.read(paths, [], batch_size=64, decode="gpu")])
    difference = (cpu - gpu).abs()
    return difference.max().item(), difference.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda", help="cpu only to try the script out")
    args = parser.parse_args()
    workers = max(1, os.cpu_count() - 1)
    model = random_alexnet(device=args.device)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        with multiprocessing.Pool(os.cpu_count()) as pool:
            pool.map(make_jpeg, [(folder / f"{i:06d}.jpg", i) for i in range(args.images)])
        paths = find_images([folder])[0]
        largest, mean = decoder_difference(model, paths[:256])
        timed_scan(model, folder, workers, args.batch_size, "gpu")  # warm-up: CUDA, cuDNN, page cache
        plain = plain_rate(model, paths, workers, args.batch_size)
        cpu_seconds, _, cpu_reports = timed_scan(model, folder, workers, args.batch_size, "cpu")
        gpu_seconds, _, gpu_reports = timed_scan(model, folder, workers, args.batch_size, "gpu")
        scan_64, whole_64, _ = timed_scan(model, folder, workers, args.batch_size, "gpu", channels="0-63", layers="5")
    cpu_rate, gpu_rate = args.images / cpu_seconds, args.images / gpu_seconds
    per_channel = (whole_64 - scan_64) / 64
    agree = [cpu.hits[c][0].image == gpu.hits[c][0].image for cpu, gpu in zip(cpu_reports, gpu_reports)
             for c in cpu.hits if cpu.hits[c] and gpu.hits[c]]
    best = max(cpu_rate, gpu_rate)
    hours = (IMAGENET_TRAIN / best + 1152 * per_channel) / 3600
    figures = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "cores": os.cpu_count(), "workers": workers,
               "images": args.images, "batch_size": args.batch_size, "plain_cpu_decode": round(plain, 1),
               "scan_cpu_decode": round(cpu_rate, 1), "scan_gpu_decode": round(gpu_rate, 1),
               "gpu_over_cpu": round(gpu_rate / cpu_rate, 2), "input_difference_max": largest,
               "input_difference_mean": mean, "projection_s_per_channel": round(per_channel, 3),
               "top1_same_image_cpu_vs_gpu_decode": f"{sum(agree)}/{len(agree)}",
               "imagenet_train_hours": round(hours, 2)}
    print(f"{figures['device']}, {figures['cores']} cores ({workers} decoding), {args.images} JPEGs 500×375, "
          f"alexnet layers 1-5 at 224², batch {args.batch_size}")
    print(f"  plain forward, CPU decoding: {plain:8.1f} images/s")
    print(f"  scan, CPU decoding:          {cpu_rate:8.1f} images/s")
    print(f"  scan, --decode gpu:          {gpu_rate:8.1f} images/s   ratio {gpu_rate / cpu_rate:.2f}× CPU decoding")
    print(f"  CPU vs GPU decoding, preprocessed inputs: max |Δ| {largest:.3f}, mean {mean:.4f} (normalised units); "
          f"top-1 image of channels 0-15 of layers 1-5: same in {sum(agree)}/{len(agree)}")
    print(f"  projection phase: {per_channel:.3f} s per channel (layer 5, 64 channels)")
    print(f"  ImageNet train (1.28 M) layers 1-5, all 1152 channels: {hours:.2f} h")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
