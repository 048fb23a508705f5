"""Shared fixtures: models with random weights saved as real weights files, and the embedded model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from oracles import randomise_batchnorm

from vizdeconv.models import load_model


def random_weights_file(name: str, path, seed: int = 0):
    """A state_dict of torchvision's ``name`` with random weights (and random BatchNorm statistics)."""
    torch.manual_seed(seed)
    module = randomise_batchnorm(torchvision.models.get_model(name, weights=None))
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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny convolutions: on a busy two-core machine two threads made them
    30–100× slower (OpenMP threads waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
