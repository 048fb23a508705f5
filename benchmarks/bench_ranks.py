"""torchrun ranks and scan checkpoints of `vizdeconv project`, side by side in one run.

1. Scan throughput of alexnet (random weights, layer 5, all channels) over 256×256 JPEGs made
   from the sample photos: 2 ranks × 1 thread against 1 rank × 1 thread, both under torchrun
   (Gloo) on this machine, timing the scan phase only; and whether both runs write the same files.
   Goal: ≥ 1.8×, identical output.
2. The cost of checkpointing a scan of alexnet layers 1–5 (every channel, k = 9): the scan loop
   with a checkpoint after every chunk against none, and the share of scan time that a checkpoint
   every ``CHECKPOINT_SECONDS`` (the default) costs. Goal: ≤ 2 %.

    make bench      # or: python benchmarks/bench_ranks.py [--images 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_scan import PHOTO_FILES, alternate, make_folder, random_alexnet, scan_timer

from vizdeconv import distributed
from vizdeconv.jobs.project import CHECKPOINT_SECONDS, ProjectJob
from vizdeconv.resume import ScanState, save_state
from vizdeconv.images import find_images
from vizdeconv.topk import TopK, chunk_count, scan

BIN = Path(sys.executable).parent


def rank_child(folder: str, out: str) -> None:
    """Under torchrun: the project job on this rank's share; rank 0 prints the scan's wall time."""
    torch.set_num_threads(1)
    with distributed.from_environment() as ranks:
        times, progress = scan_timer()
        ProjectJob(random_alexnet(), 5, channels="0-15", out=out, batch_size=16).run([folder], progress=progress)
        spans = ranks.gather((times["start"], times["end"]))  # same clock: one machine
        if ranks.main:
            print(json.dumps({"seconds": max(end for _, end in spans) - min(start for start, _ in spans)}))


def ranks_throughput(folder: Path, images: int) -> None:
    results, outputs = {}, {}
    for world in (1, 2):
        out = folder.parent / f"out-{world}"
        child = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(world), __file__,
                                "--rank-child", str(folder), str(out)], capture_output=True, text=True, check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        results[world] = images / json.loads(child.stdout.strip().splitlines()[-1])["seconds"]
        outputs[world] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    print(f"alexnet layer 5 scan, {images} images 256², 1 thread per rank, torchrun/Gloo")
    print(f"  1 rank:  {results[1]:6.1f} images/s")
    print(f"  2 ranks: {results[2]:6.1f} images/s   ratio {results[2] / results[1]:.2f}×   identical output: "
          f"{outputs[1] == outputs[2]} ({len(outputs[1])} files)")


def checkpoint_cost(folder: Path, images: int) -> None:
    """The scan loop of ``ProjectJob`` with a full checkpoint after every chunk, against none."""
    model = random_alexnet()
    job = ProjectJob(model, "1-5", k=9)  # every channel of layers 1-5
    paths = find_images([folder])[0]
    with tempfile.TemporaryDirectory() as out:
        state = Path(out) / "rank0.safetensors"

        def scan_once(checkpoints: bool) -> tuple[float, float]:
            tops = [TopK(channels, job.k, model.device) for channels in job.channels]
            saving, start = 0.0, time.perf_counter()
            for done in scan(model, job.layers, tops, paths, [], batch_size=16):
                if checkpoints:
                    begin = time.perf_counter()
                    save_state(state, ScanState({"model": model.name}, done, [], [top.columns() for top in tops]))
                    saving += time.perf_counter() - begin
            return time.perf_counter() - start, saving

        timings = alternate({False: lambda: scan_once(False), True: lambda: scan_once(True)})
    (plain, _), (with_checkpoints, saving) = min(timings[False]), min(timings[True])
    save = saving / chunk_count(len(paths))
    channels = sum(len(c) for c in job.channels)
    print(f"alexnet layers 1-5 scan, {images} images, top-9 of all {channels} channels, {torch.get_num_threads()} threads")
    print(f"  checkpoint after every 16 images: {with_checkpoints:.2f} s; none: {plain:.2f} s   "
          f"cost {100 * (with_checkpoints / plain - 1):+.1f} %")
    print(f"  one checkpoint: {1000 * save:.1f} ms; every {CHECKPOINT_SECONDS} s (the default): "
          f"{100 * save / CHECKPOINT_SECONDS:.4f} % of scan time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rank-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_child:
        rank_child(*args.rank_child)
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "images"
        folder.mkdir()
        make_folder(folder, args.images, PHOTO_FILES, 256)
        ranks_throughput(folder, args.images)
        checkpoint_cost(folder, args.images)


if __name__ == "__main__":
    main()
