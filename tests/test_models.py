"""Model loading: torchvision's weights API and cache, local state_dicts, unsafe pickles, factories, timm."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from PIL import Image

from vizdeconv.errors import ImageError, ModelError, UnsafeCheckpointError
from vizdeconv.models import LoadedModel, load_model, read_state_dict, resolve_device


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
    with pytest.raises(ModelError, match="unknown model 'zfnet9000'") as error:
        load_model("zfnet9000")
    assert "timm:NAME" in str(error.value) and "efficientnet_lite0" in str(error.value)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_torch_warnings_stay_off_stderr_when_a_pickle_is_refused(tmp_path, recwarn, capfd):
    Payload.marker = tmp_path / "code-ran"
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"weight": Payload()}, protocol=4))  # torch warns about protocol 4
    with pytest.raises(UnsafeCheckpointError, match="raw.pkl: refused"):
        read_state_dict(raw)
    assert not Payload.marker.exists()
    assert len(recwarn) == 0 and capfd.readouterr().err == ""


def raising_factory():
    raise ValueError("no such config:\n  depth=99")


def test_factory_failures_are_one_line(tmp_path, capfd):
    with pytest.raises(ModelError) as error:
        load_model("test_models:raising_factory")
    assert str(error.value) == "test_models:raising_factory raised ValueError: no such config: depth=99"
    with pytest.raises(ModelError, match=r"os:system is 'builtin_function_or_method', not a Python function"):
        load_model("os:system")
    with pytest.raises(ModelError, match="os:sep is 'str'"):
        load_model("os:sep")
    (tmp_path / "broken_factory_module.py").write_text("raise KeyError('boom')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ModelError, match=r"cannot import 'broken_factory_module:f': KeyError: 'boom'"):
            load_model("broken_factory_module:f")
    finally:
        sys.path.remove(str(tmp_path))
    assert capfd.readouterr().err == ""


def test_googlenet_and_inception_load_like_torchvision_pretrained_builders(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name, side in (("googlenet", 224), ("inception_v3", 299)):
        torch.manual_seed(0)
        state = torchvision.models.get_model(name, weights=None, init_weights=False).state_dict()
        torch.save(state, tmp_path / f"{name}.pt")
        model = load_model(name, weights=tmp_path / f"{name}.pt", device="cpu")
        module = model.module
        assert module.transform_input and not module.aux_logits
        assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items() if "aux" not in k.lower())
        assert not any("aux" in k.lower() for k in module.state_dict())
        assert model.input_size == (3, side, side)
        assert model.preprocess(Image.new("RGB", (400, 300))).shape == (3, side, side)
        # A state_dict without the auxiliary heads (saved after a pretrained load) fits too.
        torch.save(module.state_dict(), tmp_path / f"{name}-no-aux.pt")
        load_model(name, weights=tmp_path / f"{name}-no-aux.pt", device="cpu")
    url = torchvision.models.get_model_weights("googlenet").DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    os.replace(tmp_path / "googlenet.pt", cached)
    model = load_model("googlenet", device="cpu")
    assert "IMAGENET1K_V1" in model.weights and model.module.aux1 is None
    assert model.module(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_timm_models_with_a_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    state = timm.create_model("resnet18").state_dict()
    torch.save(state, tmp_path / "resnet18.pt")
    model = load_model("timm:resnet18", weights=tmp_path / "resnet18.pt", device="cpu")
    assert all(torch.equal(model.module.state_dict()[k], v) for k, v in state.items())
    assert model.name == "timm:resnet18" and model.weights == str(tmp_path / "resnet18.pt")
    assert model.input_size == (3, 224, 224) and model.mean == (0.485, 0.456, 0.406)
    assert model.categories[0] == "tench" and len(model.categories) == 1000
    assert model.preprocess(Image.new("RGB", (300, 200))).shape == (3, 224, 224)
    in21k = timm.create_model("mobilenetv3_large_100.miil_in21k")
    torch.save(in21k.state_dict(), tmp_path / "in21k.pt")
    model = load_model("timm:mobilenetv3_large_100.miil_in21k", weights=tmp_path / "in21k.pt", device="cpu")
    assert model.categories[:2] == ("0", "1") and len(model.categories) == in21k.num_classes != 1000
    with pytest.raises(ModelError, match="do not fit the model"):
        load_model("timm:resnet34", weights=tmp_path / "resnet18.pt", device="cpu")
    with pytest.raises(ModelError, match=r"cannot load timm's model resnet18.bogus \(RuntimeError: Invalid pretrained"):
        load_model("timm:resnet18.bogus", weights=tmp_path / "resnet18.pt", device="cpu")


def test_timm_hub_failures_are_one_line(tmp_path, monkeypatch, capfd):
    pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read when huggingface_hub was imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as error:
        load_model("timm:resnet18", device="cpu")
    message = str(error.value)
    assert message.startswith("cannot load timm's pretrained weights for resnet18 (")
    assert message.endswith("; pass --weights FILE") and "\n" not in message
    assert capfd.readouterr().err == ""


def test_timm_names_and_a_missing_timm(monkeypatch):
    pytest.importorskip("timm")
    with pytest.raises(ModelError, match=r"unknown timm model 'resnt18'; close names: resnet18"):
        load_model("timm:resnt18")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModelError, match=r"pip install vizdeconv\[timm\]"):
        load_model("timm:resnet18")


def test_options_for_factories_only_are_refused_elsewhere():
    with pytest.raises(ModelError, match="--input-size, --mean and --std are for factory models"):
        load_model("embedded", mean=[0.5], device="cpu")


def test_a_module_as_a_model(tmp_path):
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4)).train()
    model = LoadedModel.from_module(module, (20, 30), mean=(0.5,), std=(0.25,), device="cpu")
    assert not module.training and model.input_size == (1, 20, 30) and model.categories == ("0", "1", "2", "3")
    picture = tmp_path / "wide.png"
    Image.new("RGB", (90, 40), (255, 255, 255)).save(picture)
    (batch,) = model.read([picture], [])
    # white, grey-converted, resized on the short side and centre-cropped, then (1 - 0.5) / 0.25
    torch.testing.assert_close(batch.images, torch.full((1, 1, 20, 30), 2.0))
    with pytest.raises(ModelError, match="give both mean and std"):
        LoadedModel.from_module(module, 20, mean=(0.5,))
    two = LoadedModel.from_module(nn.Conv2d(2, 2, 1), (2, 8, 8), device="cpu")
    assert (two.mean, two.std) == ((0.0, 0.0), (1.0, 1.0))
    failures: list[ImageError] = []
    with pytest.raises(ModelError, match="takes 2 input channels; image files are read as grey"):
        list(two.read([picture], failures))
