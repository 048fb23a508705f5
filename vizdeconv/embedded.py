"""The embedded model: a small ZFNet-shaped convnet trained on Fashion-MNIST.

It ships inside the package (``vizdeconv/data/``) so that every command works offline.
``scripts/train_embedded.py`` trains it from Debian's ``dataset-fashion-mnist`` with a fixed seed.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

WEIGHTS_FILE = "zfmnist.safetensors"
CARD_FILE = "zfmnist.json"
EPOCHS_FOLDER = "zfmnist-epochs"


class ZFMnist(nn.Module):
    """ZFNet's shape scaled to 28×28 grey images: five convolutions, ReLUs, overlapping 3/2 max-pools.

    conv1 32×5×5 → pool → conv2 64×3×3 → pool → conv3 96, conv4 96, conv5 64 (3×3) → pool →
    two fully connected layers, as in the paper, with dropout.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            nn.Conv2d(64, 96, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(96, 96, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(96, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(64 * 4 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


def load_card() -> dict:
    """The model card: class names, normalisation, input size, test accuracy, how it was trained."""
    return json.loads(resources.files("vizdeconv.data").joinpath(CARD_FILE).read_text())


def load_embedded() -> ZFMnist:
    """The trained embedded model in eval mode, on the CPU."""
    model = ZFMnist(num_classes=len(load_card()["categories"]))
    with resources.as_file(resources.files("vizdeconv.data").joinpath(WEIGHTS_FILE)) as path:
        model.load_state_dict(load_file(str(path)))
    return model.eval()


def sample_folder() -> Path:
    """The shipped Fashion-MNIST test images (two per class): default input of ``vizdeconv project``."""
    return Path(str(resources.files("vizdeconv.data").joinpath("fashion-mnist")))


def epoch_checkpoints() -> Path:
    """The embedded model's weights after epochs 1, 2, 5, 10 and 25 of its training (fp16): default
    checkpoints of ``vizdeconv evolution``."""
    return Path(str(resources.files("vizdeconv.data").joinpath(EPOCHS_FOLDER)))
