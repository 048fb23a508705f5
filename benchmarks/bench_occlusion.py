"""Occlusion maps: vizdeconv against Captum's Occlusion and the brute-force limit, side by side.

Same model (random weights: no downloads here), image, window, stride and baseline (zero in
normalised space = the dataset mean) for all three, at 224², window 50, stride 8 (484 positions).

- brute force: one batched forward pass per position, nothing else (the limit for exact maps);
- vizdeconv: ``occlusion.occlude`` (p(target), top class and a layer-5 feature map's total);
- Captum ``Occlusion`` on the softmax probability of the target. Captum lets its last window
  run past the border (23 × 23 = 529 windows here) and spreads each window's score over its
  pixels; its map is compared with the same spreading of vizdeconv's p(target) map on the pixels
  that only windows inside the image cover.

    make bench      # or: python benchmarks/bench_occlusion.py [--models alexnet,vgg16] [--repeats 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torchvision
from captum.attr import Occlusion

from vizdeconv.layers import trace_chain
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import corners, occlude

SIZE, STRIDE, BATCH = 50, 8, 64


def timed(repeats: int, run):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def spread(prob_true: np.ndarray, prob_clean: float, ys, xs, height: int, width: int) -> np.ndarray:
    """Captum's convention applied to a p(target) map: each pixel averages p_clean − p over its windows."""
    total, count = np.zeros((height, width)), np.zeros((height, width))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            total[y:y + SIZE, x:x + SIZE] += prob_clean - prob_true[i, j]
            count[y:y + SIZE, x:x + SIZE] += 1
    return total / np.maximum(count, 1)


def bench(name: str, repeats: int) -> None:
    torch.manual_seed(0)
    module = torchvision.models.get_model(name).eval()
    model = LoadedModel(name, "random", module, None, (3, 224, 224), (0.0,) * 3, (1.0,) * 3, ())
    chain = trace_chain(model)
    layer = chain.layer(5)
    image = torch.randn(3, 224, 224)
    fill = torch.zeros(3)
    ys = xs = corners(224, SIZE, STRIDE)
    with torch.no_grad():
        target = int(module(image[None]).argmax())

    def brute_force():
        places = [(y, x) for y in ys for x in xs]
        maps = []
        with torch.no_grad():
            for start in range(0, len(places), BATCH):
                batch = image.repeat(len(places[start:start + BATCH]), 1, 1, 1)
                for i, (y, x) in enumerate(places[start:start + BATCH]):
                    batch[i, :, y:y + SIZE, x:x + SIZE] = 0
                maps.append(module(batch).softmax(1)[:, target])
        return torch.cat(maps).view(len(ys), len(xs)).numpy()

    def ours():
        return occlude(model, chain, layer, image, size=SIZE, stride=STRIDE, fill=fill, target=target,
                       batch_size=BATCH)

    occlusion = Occlusion(lambda x: module(x).softmax(1))

    def captum():
        with torch.no_grad():
            return occlusion.attribute(image[None], sliding_window_shapes=(3, SIZE, SIZE), strides=(3, STRIDE, STRIDE),
                                       baselines=0, target=target, perturbations_per_eval=BATCH)[0, 0].numpy()

    brute_time, brute_map = timed(repeats, brute_force)
    ours_time, maps = timed(repeats, ours)
    captum_time, captum_map = timed(repeats, captum)
    inside = ys[-1] + STRIDE  # pixels below/right of this are also covered by Captum's overhanging windows
    expected = spread(maps.prob_true, maps.prob_clean, ys, xs, 224, 224)
    captum_difference = np.abs(expected - captum_map)[:inside, :inside].max()
    brute_difference = np.abs(maps.prob_true - brute_map).max()
    print(f"{name}, 224², window {SIZE}, stride {STRIDE}: {len(ys) * len(xs)} positions, batch {BATCH}, "
          f"{torch.get_num_threads()} threads")
    print(f"  brute force (one batched forward per position): {brute_time:7.2f} s")
    print(f"  vizdeconv occlude:                              {ours_time:7.2f} s   "
          f"{brute_time / ours_time:.2f}× brute force, max |Δp| {brute_difference:.1e}")
    print(f"  Captum Occlusion ({-(-(224 - SIZE) // STRIDE) + 1}² windows):                   {captum_time:7.2f} s   "
          f"vizdeconv is {captum_time / ours_time:.2f}× faster, max |Δ| of spread maps {captum_difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="alexnet,vgg16")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for name in args.models.split(","):
        bench(name, args.repeats)


if __name__ == "__main__":
    main()
