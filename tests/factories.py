"""Small models the tests (and `--model factories:NAME` in CLI tests) share, and the sample folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vizdeconv.embedded import sample_folder

FASHION = sample_folder()  # the embedded model's shipped samples (sample_images/fashion-mnist links there)
PHOTOS = Path(__file__).resolve().parent.parent / "sample_images" / "photos"


def sample_copies(folder: Path, names: list[str]) -> Path:
    """``folder`` holding copies of the named ``FASHION`` samples, for tests that add broken files beside them."""
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(FASHION / name, folder / name)
    return folder


class Functional(nn.Module):
    """Every form a tracer and the rules must follow: F.relu, an in-place residual add, torch.relu_,
    a module called twice, a functional LRN, an overlapping max-pool, concatenation, F.relu6,
    hardtanh(0, 6), an nn.ReLU6 module, Tensor.relu and x.mean((2, 3))."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(16, 8, (1, 3), padding=(0, 1))
        self.conv5 = nn.Conv2d(8, 8, 3, dilation=2, padding=2)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.six = nn.ReLU6()
        self.summed, self.joined, self.top = nn.Identity(), nn.Identity(), nn.Identity()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        y = self.conv2(x)
        y += x
        y = self.summed(torch.relu_(y))
        z = self.act(self.conv3(y))
        w = self.act(self.pool(F.local_response_norm(y, 3)))
        c = self.joined(torch.cat([z, w], 1))
        c = self.six(F.hardtanh(F.relu6(self.conv4(c)), 0.0, 6.0) - 0.1)
        c = self.top(self.conv5(c).relu())
        return self.fc(c.mean((2, 3)))


def functional() -> nn.Module:
    torch.manual_seed(0)
    return Functional()


class SizedView(nn.Module):
    """Flattens with ``x.view(x.size(0), -1)``, as older models do: the batch size is read as a number."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 9 * 9, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def sized_view() -> nn.Module:
    torch.manual_seed(0)
    return SizedView()
