"""The deconvnet through a residual graph (resnet50) against Captum, side by side in one run.

1. Projections per second on resnet50 (random weights, 224²): a layer3 unit and a layer4 unit,
   64 seeds from 1 image (the 64 strongest channels) and from 8 images (8 channels each), with
   vizdeconv's deconvnet and guided rules against Captum's ``NeuronDeconvolution`` and
   ``NeuronGuidedBackprop`` (one call per seed), and the largest difference between the two
   (Captum gives the gradient; vizdeconv seeds with the activation's value, divided out here).
2. The top-k scan on resnet50 (layer3) against a plain DataLoader + model loop over the same
   JPEGs. Goal: ≥ 0.9×.

    make bench      # or: python benchmarks/bench_graph.py [--repeats 2] [--images 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision
from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop

from bench_deconv import side_by_side
from bench_scan import PHOTOS, make_folder, scan_rates
from vizdeconv.deconvnet import Deconvnet
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel

CAPTUM = {"deconvnet": NeuronDeconvolution, "guided": NeuronGuidedBackprop}


def random_resnet50() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel.from_module(torchvision.models.resnet50(), 224, name="resnet50", device="cpu")


def compare(model: LoadedModel, layers, name: str, images: torch.Tensor, channels: int, rule: str,
            repeats: int) -> None:
    deconvnet = Deconvnet(model, layers, layers.layer(name), rule=rule)
    attribution = CAPTUM[rule](model.module, model.module.get_submodule(name))
    n, ours_time, captum_time, difference = side_by_side(deconvnet, attribution, images, channels, repeats)
    print(f"  {name:6} {rule:9} {len(images)} image(s) × {channels:2} channels: vizdeconv {n / ours_time:6.1f}/s, "
          f"Captum {n / captum_time:6.1f}/s, speed-up {captum_time / ours_time:4.1f}×, max |diff| / max {difference:.0e}")


def scan_throughput(model: LoadedModel, layers, count: int, batch_size: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        paths = make_folder(Path(folder), count, sorted(PHOTOS.glob("*.jpg")), 256)
        plain_rate, scan_rate = scan_rates(model, layers.layer("layer3"), paths, batch_size, workers)
    print(f"resnet50 scan, {count} JPEGs 256², batch {batch_size}, {workers} workers")
    print(f"  plain forward (DataLoader + model):        {plain_rate:6.1f} images/s")
    print(f"  scan (layer3, top-9 of 1024 channels):     {scan_rate:6.1f} images/s   ratio {scan_rate / plain_rate:.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=64, help="JPEGs for the scan comparison")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    model = random_resnet50()
    layers = trace_layers(model)
    torch.manual_seed(1)
    images = torch.randn(8, 3, 224, 224)
    print(f"resnet50 (random weights) at 224², projections per second, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    for name in ("layer3", "layer4"):
        for rule in ("deconvnet", "guided"):
            compare(model, layers, name, images[:1], 64, rule, args.repeats)
            compare(model, layers, name, images, 8, rule, args.repeats)
    scan_throughput(model, layers, args.images, args.batch_size, args.workers)


if __name__ == "__main__":
    main()
