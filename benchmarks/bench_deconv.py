"""vizdeconv's batched deconvnet against Captum's NeuronDeconvolution, side by side in one run.

alexnet (random weights: no downloads here) at 224², layer 5 (conv5's ReLU), 64 seeds, twice:
the 64 strongest channels of one image (as `vizdeconv deconv --top 64`), and the 8 strongest
channels of each of 8 images (more forward passes per seed, as in a top-k run). Prints
milliseconds per projection for both, the ratio, and the largest difference between the two
(Captum's attribution is the gradient; vizdeconv's projection is seeded with the activation's
value, so it is divided by that value to compare).

    make bench        # or: python benchmarks/bench_deconv.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from captum.attr import NeuronDeconvolution

from vizdeconv.deconvnet import Deconvnet, strongest
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel


def best_of(repeats: int, run) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def side_by_side(deconvnet: Deconvnet, attribution, images: torch.Tensor, channels: int, repeats: int
                 ) -> tuple[int, float, float, float]:
    """The strongest ``channels`` of each image projected by vizdeconv, then by a Captum neuron
    attribution (one call per seed): ``(projections, our seconds, Captum's seconds, max relative
    difference)``. Captum gives the gradient; vizdeconv seeds with the value, divided out here."""
    def ours():
        forward = deconvnet.forward(images)
        seeds = strongest(forward.activations, top=channels)
        return seeds, forward.activations[tuple(seeds.T)], deconvnet.project(forward, seeds)

    ours_time, (seeds, values, projections) = best_of(repeats, ours)

    def captum():
        return torch.cat([attribution.attribute(images[i:i + 1], neuron_selector=(c, y, x))
                          for i, c, y, x in seeds.tolist()])

    captum_time, attributions = best_of(repeats, captum)
    scaled = projections / values[:, None, None, None]
    difference = ((scaled - attributions).abs().max() / attributions.abs().max()).item()
    return len(seeds), ours_time, captum_time, difference


def compare(deconvnet: Deconvnet, module, images: torch.Tensor, channels: int, repeats: int) -> None:
    n, ours_time, captum_time, difference = side_by_side(
        deconvnet, NeuronDeconvolution(module, module.features[11]), images, channels, repeats)
    print(f"alexnet layer 5, {n} projections ({len(images)} images × {channels} channels), best of {repeats}, "
          f"{torch.get_num_threads()} threads")
    for label, seconds in ((f"vizdeconv ({deconvnet.path}: one forward + batched down passes)", ours_time),
                           ("Captum NeuronDeconvolution (one call per seed)", captum_time)):
        print(f"  {label + ':':<64}{1000 * seconds / n:8.2f} ms per projection")
    print(f"  speed-up: {captum_time / ours_time:.1f}×   max |difference| / max |Captum|: {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = torchvision.models.alexnet().eval()
    model = LoadedModel.from_module(module, 224, name="alexnet", device="cpu")
    layers = trace_layers(model)
    deconvnet = Deconvnet(model, layers, layers.layer(5), rule="deconvnet")
    images = torch.randn(8, 3, 224, 224)
    compare(deconvnet, module, images[:1], 64, args.repeats)
    compare(deconvnet, module, images, 8, args.repeats)


if __name__ == "__main__":
    main()
