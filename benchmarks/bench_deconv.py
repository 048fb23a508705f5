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

from vizdeconv.deconv import project, strongest
from vizdeconv.layers import trace_chain
from vizdeconv.models import LoadedModel
from vizdeconv.switches import SwitchRecorder


def best_of(repeats: int, run) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def compare(chain, layer, module, images: torch.Tensor, channels: int, repeats: int) -> None:
    def ours():
        with SwitchRecorder(chain, layer) as recorder:
            forward = recorder.forward(images)
        seeds = strongest(forward.activations, top=channels)
        return seeds, forward.activations[tuple(seeds.T)], project(chain, layer, forward, seeds)

    ours_time, (seeds, values, projections) = best_of(repeats, ours)
    deconvolution = NeuronDeconvolution(module, module.features[11])

    def captum():
        return torch.cat([deconvolution.attribute(images[i:i + 1], neuron_selector=(c, y, x))
                          for i, c, y, x in seeds.tolist()])

    captum_time, attributions = best_of(repeats, captum)
    scaled = projections / values[:, None, None, None]
    difference = ((scaled - attributions).abs().max() / attributions.abs().max()).item()
    n = len(seeds)
    print(f"alexnet layer 5, {n} projections ({len(images)} images × {channels} channels), best of {repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"  vizdeconv (one forward + one batched down pass): {1000 * ours_time / n:8.2f} ms per projection")
    print(f"  Captum NeuronDeconvolution (one call per seed):  {1000 * captum_time / n:8.2f} ms per projection")
    print(f"  speed-up: {captum_time / ours_time:.1f}×   max |difference| / max |Captum|: {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = torchvision.models.alexnet().eval()
    model = LoadedModel("alexnet", "random", module, None, (3, 224, 224), (0.0,) * 3, (1.0,) * 3, ())
    chain = trace_chain(model)
    layer = chain.layer(5)
    images = torch.randn(8, 3, 224, 224)
    compare(chain, layer, module, images[:1], 64, args.repeats)
    compare(chain, layer, module, images, 8, args.repeats)


if __name__ == "__main__":
    main()
