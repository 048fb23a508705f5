"""The README's table of whole-layer reconstructions: mean similarity to the input, known vs fixed switches.

    .venv/bin/python scripts/reconstruct_similarity.py [--out DIR]

Runs ``ReconstructJob`` on the embedded model and its 20 samples (every numbered layer), on
efficientnet_lite0 with its ImageNet weights, and on ResNet-18 and VGG-16 with random weights
(seed 0: no pretrained weights here), each on the 5 sample photos, and prints one Markdown row
per model and layer: the mean Pearson r and SSIM of each kind of switches.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

from vizdeconv.embedded import sample_folder
from vizdeconv.jobs.reconstruct import ReconstructJob
from vizdeconv.models import LoadedModel, load_model
from vizdeconv.reconstruct import has_max_pool

PHOTOS = Path(__file__).resolve().parent.parent / "sample_images" / "photos"


def random_model(name: str) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel.from_module(torchvision.models.get_model(name, weights=None), 224, name=f"{name} (random)",
                                   device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="reconstruct-")))
    out = parser.parse_args().out
    runs = [
        (load_model("embedded", device="cpu"), "all", sample_folder()),
        (load_model("efficientnet_lite0", device="cpu"), "1,_blocks.2,_blocks.5,_blocks.10,_head_relu", PHOTOS),
        (random_model("resnet18"), "1,layer1,layer2,layer3,layer4", PHOTOS),
        (random_model("vgg16"), "2,4,7,10,13", PHOTOS),
    ]
    print("| model | layer | max-pools below | known r | known SSIM | fixed r | fixed SSIM |")
    print("|---|---|---|---|---|---|---|")
    for model, layers, images in runs:
        job = ReconstructJob(model, layers, out=out / model.name.split()[0])
        means = job.run([images]).means()
        pools = {layer.key: has_max_pool(layer) for layer in job.layers}
        for layer in dict.fromkeys(layer for layer, _ in means):
            cells = [f"{value:.3f}" for switches in job.switches for value in means[layer, switches]]
            print(f"| {model.name} | {layer} | {'yes' if pools[layer] else 'no'} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
