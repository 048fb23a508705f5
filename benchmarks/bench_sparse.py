"""Deconvolutional networks (``vizdeconv.sparse``): inference speed, direct against FFT, and training.

1. ISTA steps per second on a batch of 64 random images of 28² and 128², one layer of 16 and of 64
   random unit-norm 7×7 filters, with the direct convolutions (conv2d / conv_transpose2d) and the
   FFT formulation side by side, and how far the two formulations' codes differ after the steps.
2. One training epoch of a fresh 2-layer model (16, 48 maps) on the embedded Fashion-MNIST samples,
   and the shipped model's cost and reconstruction PSNR per layer on those samples (FISTA, max and
   Gaussian pooling).

    make bench      # or: python benchmarks/bench_sparse.py [--steps 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from vizdeconv.embedded import sample_folder
from vizdeconv.jobs.sparse import SparseInferJob, SparseTrainJob
from vizdeconv.models import resolve_device
from vizdeconv.sparse import Convolution, code_size, initial_filters, iterates, operator_norms


def steps_per_second(images: torch.Tensor, filters: torch.Tensor, steps: int, fft: bool) -> tuple[float, torch.Tensor]:
    operator = Convolution(filters, *images.shape[-2:], fft=fft)
    shape = (len(images), len(filters), *code_size(*images.shape[-2:], filters.shape[-1]))
    norms = operator_norms(operator, (1, *shape[1:]), device=images.device).expand(len(images))
    with torch.no_grad():
        next(iterates(images, operator, shape, lam=5.0, norms=norms))  # warm-up
        synchronise(images.device)
        started = time.perf_counter()
        *_, codes = islice(iterates(images, operator, shape, lam=5.0, norms=norms), steps)
        synchronise(images.device)
    return steps / (time.perf_counter() - started), codes


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def inference_table(steps: int, device: torch.device) -> None:
    print(f"ISTA steps/s, batch 64, 7×7 filters, {device.type}:")
    print(f"{'image':>6} {'maps':>5} {'direct':>9} {'FFT':>9} {'FFT/direct':>11} {'max |Δz|':>9}")
    generator = torch.Generator().manual_seed(0)
    for side in (28, 128):
        images = torch.rand(64, 1, side, side, generator=generator).to(device)
        for maps in (16, 64):
            filters = initial_filters(maps, 1, 7, generator).to(device)
            direct, codes = steps_per_second(images, filters, steps, fft=False)
            fourier, fourier_codes = steps_per_second(images, filters, steps, fft=True)
            print(f"{side:>5}² {maps:>5} {direct:>9.2f} {fourier:>9.2f} {fourier / direct:>10.2f}× "
                  f"{(codes - fourier_codes).abs().max().item():>9.1e}")


def training_and_quality(device: torch.device) -> None:
    with tempfile.TemporaryDirectory() as folder:
        job = SparseTrainJob(Path(folder) / "model.safetensors", epochs=1, device=str(device))
        started = time.perf_counter()
        report = job.run([sample_folder()])
        elapsed = time.perf_counter() - started
    costs = ", ".join(f"layer {l + 1} {c['cost']:.2f}" for l, c in enumerate(report.costs))
    print(f"\none training epoch per layer, fresh 2-layer model (16, 48 maps), {report.images} samples: "
          f"{elapsed:.1f} s; mean cost per image {costs}")
    print("\nshipped model on the embedded samples, FISTA 200 steps: mean per layer")
    for pooling in ("max", "gaussian"):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            done = SparseInferJob("embedded", pooling=pooling, out=out, device=str(device)).run([sample_folder()])
            elapsed = time.perf_counter() - started
        layers = len(done.results[0].psnr)
        mean = lambda values: sum(values) / len(done.results)  # noqa: E731
        for layer in range(layers):
            print(f"  {pooling:>8} pooling, layer {layer + 1}: cost {mean(r.cost[layer] for r in done.results):.2f} "
                  f"(fit {mean(r.fit[layer] for r in done.results):.2f} + |z| "
                  f"{mean(r.penalty[layer] for r in done.results):.2f}), PSNR "
                  f"{mean(r.psnr[layer] for r in done.results):.2f} dB, zero codes "
                  f"{mean(r.sparsity[layer] for r in done.results):.1%}")
        print(f"  ({len(done.results)} images in {elapsed:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="ISTA steps timed per case")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    inference_table(args.steps, device)
    training_and_quality(device)


if __name__ == "__main__":
    main()
