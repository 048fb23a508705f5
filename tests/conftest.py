"""Shared fixtures: models with random weights saved as real weights files, and the embedded model."""

from __future__ import annotations

import pytest
import torch
import torchvision

from vizdeconv.models import load_model


def random_weights_file(name: str, path, seed: int = 0):
    """A state_dict of torchvision's ``name`` with random weights (and random BatchNorm statistics)."""
    torch.manual_seed(seed)
    module = torchvision.models.get_model(name, weights=None)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.2, 0.2)
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def alexnet(tmp_path_factory):
    path = random_weights_file("alexnet", tmp_path_factory.mktemp("weights") / "alexnet.pt")
    return load_model("alexnet", weights=path, device="cpu")


@pytest.fixture(scope="session")
def vgg11_bn(tmp_path_factory):
    path = random_weights_file("vgg11_bn", tmp_path_factory.mktemp("weights") / "vgg11_bn.pt")
    return load_model("vgg11_bn", weights=path, device="cpu")


@pytest.fixture(scope="session")
def embedded():
    return load_model(device="cpu")
