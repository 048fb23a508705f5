"""Occlusion maps: vizdeconv's exact incremental inference against Captum's Occlusion and the
brute-force limit, and its approximate mode, side by side in one run.

Same model (random weights: no downloads here), image, window, stride and baseline (zero in
normalised space = the dataset mean) for all, at 224²: alexnet and vgg16 with window 50 /
stride 8 (484 positions), alexnet with window 16 / stride 4 (2809 positions).

- brute force: one batched forward pass per position, nothing else (the limit of exact maps
  without incremental inference);
- vizdeconv: ``occlusion.occlude`` (p(target), top class and a layer-5 feature map's total),
  exact incremental (the default), then approximate (adaptive drill-down);
- Captum ``Occlusion`` on the softmax probability of the target. Captum lets its last window
  run past the border (23 × 23 = 529 windows at 50/8) and spreads each window's score over its
  pixels; its map is compared with the same spreading of vizdeconv's p(target) map on the pixels
  that only windows inside the image cover.

Random weights make p(target) nearly flat, so the approximate mode's error is also measured
where it means something: the trained embedded model over its 20 sample images.

    make bench      # or: python benchmarks/bench_occlusion.py [--cases alexnet:50:8,vgg16:50:8]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from bench_deconv import best_of
from captum.attr import Occlusion

from vizdeconv.images import find_images
from vizdeconv.incremental import multiply_adds
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel, load_model
from vizdeconv.occlusion import OcclusionSpec, corners, default_geometry, occlude

BATCH = 64
CASES = "alexnet:50:8,vgg16:50:8,alexnet:16:4"
FASHION = Path(__file__).resolve().parent.parent / "sample_images" / "fashion-mnist"


def spread(prob_true: np.ndarray, prob_clean: float, ys, xs, size: int, height: int, width: int) -> np.ndarray:
    """Captum's convention applied to a p(target) map: each pixel averages p_clean − p over its windows."""
    total, count = np.zeros((height, width)), np.zeros((height, width))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            total[y:y + size, x:x + size] += prob_clean - prob_true[i, j]
            count[y:y + size, x:x + size] += 1
    return total / np.maximum(count, 1)


def bench(name: str, size: int, stride: int, repeats: int) -> None:
    torch.manual_seed(0)
    module = torchvision.models.get_model(name).eval()
    model = LoadedModel.from_module(module, 224, mean=(0.0,) * 3, std=(1.0,) * 3, name=name, device="cpu")
    layers = trace_layers(model)
    layer = layers.layer(5)
    image = torch.randn(3, 224, 224)
    ys = xs = corners(224, size, stride)
    with torch.no_grad():
        target = int(module(image[None]).argmax())

    def brute_force():
        places = [(y, x) for y in ys for x in xs]
        maps = []
        with torch.no_grad():
            for start in range(0, len(places), BATCH):
                batch = image.repeat(len(places[start:start + BATCH]), 1, 1, 1)
                for i, (y, x) in enumerate(places[start:start + BATCH]):
                    batch[i, :, y:y + size, x:x + size] = 0
                maps.append(module(batch).softmax(1)[:, target])
        return torch.cat(maps).view(len(ys), len(xs)).numpy()

    def ours(approximate=False):
        spec = OcclusionSpec(name, layer.name, size, stride, (0.0,) * 3, str(target), approximate=approximate)
        return occlude(model, layers, image, spec, batch_size=BATCH)

    occlusion = Occlusion(lambda x: module(x).softmax(1))

    def captum():
        with torch.no_grad():
            return occlusion.attribute(image[None], sliding_window_shapes=(3, size, size), strides=(3, stride, stride),
                                       baselines=0, target=target, perturbations_per_eval=BATCH)[0, 0].numpy()

    brute_time, brute_map = best_of(repeats, brute_force)
    captum_time, captum_map = best_of(repeats, captum)
    ours_time, maps = best_of(repeats, ours)
    rough_time, rough = best_of(repeats, lambda: ours(approximate=True))
    inside = ys[-1] + stride  # pixels below/right of this are also covered by Captum's overhanging windows
    expected = spread(maps.prob_true, maps.prob_clean, ys, xs, size, 224, 224)
    full, incremental = multiply_adds(layers.chain, size, stride)
    windows = -(-(224 - size) // stride) + 1
    print(f"{name}, 224², window {size}, stride {stride}: {len(ys) * len(xs)} positions, batch {BATCH}, "
          f"{torch.get_num_threads()} threads; theoretical multiply-add ratio (full / incremental) "
          f"{full / incremental:.2f}")
    print(f"  brute force (one batched forward per position): {brute_time:7.2f} s")
    print(f"  Captum Occlusion ({windows}² windows):                 {captum_time:7.2f} s")
    print(f"  vizdeconv exact incremental:                    {ours_time:7.2f} s   "
          f"{captum_time / ours_time:.2f}× Captum ({captum_time / ours_time / (full / incremental):.0%} of the "
          f"theoretical ratio), {brute_time / ours_time:.2f}× brute force; max |Δp| vs brute force "
          f"{np.abs(maps.prob_true - brute_map).max():.1e}, vs Captum (spread) "
          f"{np.abs(expected - captum_map)[:inside, :inside].max():.1e}")
    print(f"  vizdeconv approximate (drill-down):             {rough_time:7.2f} s   "
          f"{captum_time / rough_time:.2f}× Captum; max |Δp| vs exact {np.abs(rough.prob_true - maps.prob_true).max():.1e}")


def approximate_error() -> None:
    """The approximate mode against the exact maps on a trained model: the embedded one, its samples."""
    model = load_model(device="cpu")
    layers = trace_layers(model)
    layer = layers.layer(5)
    size, stride = default_geometry(model.input_size)
    worst, mean, agree, exact_time, rough_time = 0.0, [], [], 0.0, 0.0
    spec = OcclusionSpec.create(model, layer, size=size, stride=stride)
    for batch in model.read(find_images([FASHION])[0], [], batch_size=1):
        image = batch.images[0]
        start = time.perf_counter()
        exact = occlude(model, layers, image, spec, batch_size=BATCH)
        exact_time += time.perf_counter() - start
        start = time.perf_counter()
        rough = occlude(model, layers, image, replace(spec, approximate=True), batch_size=BATCH)
        rough_time += time.perf_counter() - start
        difference = np.abs(rough.prob_true - exact.prob_true)
        worst = max(worst, float(difference.max()))
        mean.append(float(difference.mean()))
        agree.append(float((rough.top_class == exact.top_class).mean()))
    print(f"embedded model, 20 samples, window {size}, stride {stride}: approximate vs exact p(target): "
          f"max |Δp| {worst:.3f}, mean |Δp| {np.mean(mean):.4f}, top class agrees at {np.mean(agree):.1%} of "
          f"positions; {exact_time / rough_time:.2f}× faster than exact incremental")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=CASES, help="model:window:stride, comma-separated")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for case in args.cases.split(","):
        name, size, stride = case.split(":")
        bench(name, int(size), int(stride), args.repeats)
    approximate_error()


if __name__ == "__main__":
    main()
