"""Model loading: torchvision's weights API and cache, local state_dicts, unsafe pickles, factories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from vizdeconv.errors import ModelError, UnsafeCheckpointError
from vizdeconv.models import load_model, read_state_dict, resolve_device


def test_torchvision_default_weights_come_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("alexnet").DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, cached)
    model = load_model("alexnet", device="cpu")
    assert all(torch.equal(model.module.state_dict()[k], v) for k, v in state.items())
    assert model.input_size == (3, 224, 224) and len(model.categories) == 1000
    assert model.categories[0] == "tench" and model.mean == (0.485, 0.456, 0.406)
    assert "IMAGENET1K_V1" in model.weights and not model.module.training


def test_missing_default_weights_name_the_cache_file_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError) as error:
        load_model("vgg11", device="cpu")
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg11-8a719046.pth") in message
    assert "--weights FILE" in message and "\n" not in message


class Payload:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickles_are_refused_and_never_run(tmp_path):
    Payload.marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"weight": Payload()}, evil)
    with pytest.raises(UnsafeCheckpointError, match=r"evil.pth: refused, it pickles posix.system, which could run arbitrary code"):
        read_state_dict(evil)
    assert not Payload.marker.exists()
    whole = tmp_path / "whole-model.pt"
    torch.save(nn.Linear(2, 2), whole)
    with pytest.raises(UnsafeCheckpointError):
        load_model("embedded", weights=whole, device="cpu")


def test_state_dict_formats(tmp_path, embedded):
    state = {k: v.clone() + 1 for k, v in embedded.module.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    for name in ("w.safetensors", "wrapped.pth"):
        loaded = load_model("embedded", weights=tmp_path / name, device="cpu").module.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_bad_weights_files(tmp_path):
    with pytest.raises(ModelError, match="no such weights file"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ModelError, match="do not fit the model"):
        load_model("embedded", weights=tmp_path / "wrong.pt", device="cpu")


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 3))


def not_a_module():
    return "hello"


def test_factory_models(tmp_path):
    model = load_model("test_models:small_net", device="cpu", input_size=32, mean=[0.5], std=[0.25])
    assert model.input_size == (1, 32, 32) and model.categories == ("0", "1", "2")
    torch.save({k: torch.ones_like(v) for k, v in small_net().state_dict().items()}, tmp_path / "ones.pt")
    weighted = load_model("test_models:small_net", weights=tmp_path / "ones.pt", device="cpu", input_size=32,
                          mean=[0.5], std=[0.25])
    assert torch.equal(weighted.module[0].weight, torch.ones(4, 1, 3, 3))
    with pytest.raises(ModelError, match="returned str"):
        load_model("test_models:not_a_module")
    with pytest.raises(ModelError, match="cannot import"):
        load_model("no_such_package.x:y")


def test_unknown_names():
    with pytest.raises(ModelError, match="unknown model 'zfnet9000'"):
        load_model("zfnet9000")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
