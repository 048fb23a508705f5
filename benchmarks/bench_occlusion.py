"""Occlusion maps: vizdeconv's exact incremental inference against Captum's Occlusion and the
brute-force limit, and its approximate mode, side by side in one run; then the approximate
mode's error per setting on trained models.

Same model (random weights: no downloads here), image, window, stride and baseline (zero in
normalised space = the dataset mean) for all, at 224²: resnet18 and resnet50 (graphs: residual
sums), vgg16 (a chain), each with window 50 / stride 8 (484 positions) and window 16 / stride 4
(2809 positions).

- brute force: one batched forward pass per position, nothing else (the limit of exact maps
  without incremental inference); left out for vgg16, whose goals are against Captum (it would
  add about 15 minutes here);
- Captum ``Occlusion`` on the softmax probability of the target. Captum lets its last window
  run past the border (23 × 23 = 529 windows at 50/8) and spreads each window's score over its
  pixels; its map is compared with the same spreading of vizdeconv's p(target) map on the pixels
  that only windows inside the image cover;
- vizdeconv: ``occlusion.occlude`` (p(target), top class and the last layer's strongest feature
  map's total), exact incremental (the default), then on vgg16 approximate at every setting;
- the theoretical ratio: multiply-adds of a full pass over those computing only each value's
  exactly changed region (``incremental.multiply_adds``).

Random weights make p(target) nearly flat, so the approximate mode's error is measured where it
means something: efficientnet_lite0's ImageNet weights on the sample photos (window 50 / stride 8
and 16 / 4) and the embedded model on its 20 samples (window 6, stride 1), per setting: mean and max |Δp|
against the exact maps, top-class agreement, SSIM of the p(target) map, and speed over exact.

    make bench      # or: python benchmarks/bench_occlusion.py [--cases resnet18:50:8,vgg16:16:4] [--error-only]
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
from vizdeconv.incremental import IncrementalOcclusion, multiply_adds
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel, load_model
from vizdeconv.occlusion import Approximation, OcclusionSpec, corners, default_geometry, occlude
from vizdeconv.similarity import ssim

BATCH = 64
CASES = "resnet18:50:8,resnet18:16:4,resnet50:50:8,resnet50:16:4,vgg16:50:8,vgg16:16:4"
NO_BRUTE_FORCE = {"vgg16"}
APPROXIMATED = {"vgg16"}  # the approximate mode's speed, every setting
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
SETTINGS = [Approximation(tau, factor, share) for factor, share in ((1, 1.0), (4, 0.25))
            for tau in (1.0, 0.75, 0.5, 0.35) if (tau, factor) != (1.0, 1)]


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
    layer = layers.last()
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

    def ours(approximate=None):
        spec = OcclusionSpec(name, layer.name, size, stride, (0.0,) * 3, str(target), approximate=approximate)
        return occlude(model, layers, image, spec, batch_size=BATCH)

    occlusion = Occlusion(lambda x: module(x).softmax(1))

    def captum():
        with torch.no_grad():
            return occlusion.attribute(image[None], sliding_window_shapes=(3, size, size), strides=(3, stride, stride),
                                       baselines=0, target=target, perturbations_per_eval=BATCH)[0, 0].numpy()

    tape = IncrementalOcclusion(module, image, layer.point).tape
    full, incremental = multiply_adds(tape, size, stride)
    theory = full / incremental
    windows = -(-(224 - size) // stride) + 1
    print(f"{name}, 224², window {size}, stride {stride}: {len(ys) * len(xs)} positions, batch {BATCH}, "
          f"{torch.get_num_threads()} threads; theoretical multiply-add ratio (full / incremental) {theory:.2f}",
          flush=True)
    brute = best_of(repeats, brute_force) if name not in NO_BRUTE_FORCE else None
    captum_time, captum_map = best_of(repeats, captum)
    ours_time, maps = best_of(repeats, ours)
    inside = ys[-1] + stride  # pixels below/right of this are also covered by Captum's overhanging windows
    expected = spread(maps.prob_true, maps.prob_clean, ys, xs, size, 224, 224)
    if brute:
        print(f"  brute force (one batched forward per position): {brute[0]:7.2f} s")
    print(f"  Captum Occlusion ({windows}² windows):                 {captum_time:7.2f} s")
    versus_brute = (f", {brute[0] / ours_time:.2f}× brute force; max |Δp| vs brute force "
                    f"{np.abs(maps.prob_true - brute[1]).max():.1e}") if brute else ""
    print(f"  vizdeconv exact incremental ({maps.method}):    {ours_time:7.2f} s   "
          f"{captum_time / ours_time:.2f}× Captum ({captum_time / ours_time / theory:.0%} of the theoretical "
          f"ratio){versus_brute}, vs Captum (spread) {np.abs(expected - captum_map)[:inside, :inside].max():.1e}")
    for setting in SETTINGS if name in APPROXIMATED else []:
        rough_time, rough = best_of(repeats, lambda: ours(setting))
        print(f"  approximate, {setting.describe(True):58s} {rough_time:7.2f} s   {captum_time / rough_time:6.2f}× "
              f"Captum", flush=True)


def approximation_error(model: LoadedModel, folder: Path, size: int, stride: int) -> None:
    """Every setting of the approximate mode against the exact maps of a trained model on a folder."""
    layers = trace_layers(model)
    layer = layers.last()
    images = [batch.images[0] for batch in model.read(find_images([folder])[0], [], batch_size=1)]
    spec = OcclusionSpec.create(model, layer, size=size, stride=stride)
    start = time.perf_counter()
    exact = [occlude(model, layers, image, spec, batch_size=BATCH) for image in images]
    exact_time = time.perf_counter() - start
    print(f"{model.name} ({model.weights}), {len(images)} images of {folder.name}, window {size}, stride {stride}: "
          f"exact incremental {exact_time:.1f} s", flush=True)
    print(f"  {'setting':58s} mean |Δp|  max |Δp|  top class  SSIM p(target)  speed")
    for setting in SETTINGS:
        start = time.perf_counter()
        rough = [occlude(model, layers, image, replace(spec, approximate=setting), batch_size=BATCH)
                 for image in images]
        seconds = time.perf_counter() - start
        difference = np.concatenate([np.abs(r.prob_true - e.prob_true).ravel() for r, e in zip(rough, exact)])
        agree = np.mean([(r.top_class == e.top_class).mean() for r, e in zip(rough, exact)])
        similarity = np.mean([ssim(torch.from_numpy(r.prob_true), torch.from_numpy(e.prob_true))
                              for r, e in zip(rough, exact)])
        print(f"  {setting.describe(True):58s} {difference.mean():9.4f} {difference.max():9.3f} {agree:10.1%} "
              f"{similarity:15.3f} {exact_time / seconds:6.2f}×", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=CASES, help="model:window:stride, comma-separated")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--error-only", action="store_true", help="only the approximate mode's error")
    args = parser.parse_args()
    for case in [] if args.error_only else args.cases.split(","):
        name, size, stride = case.split(":")
        bench(name, int(size), int(stride), args.repeats)
    lite0 = load_model("efficientnet_lite0", device="cpu")
    approximation_error(lite0, SAMPLES / "photos", 50, 8)
    approximation_error(lite0, SAMPLES / "photos", 16, 4)
    embedded = load_model(device="cpu")
    approximation_error(embedded, SAMPLES / "fashion-mnist", *default_geometry(embedded.input_size))


if __name__ == "__main__":
    main()
