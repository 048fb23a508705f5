"""``decode="gpu"``: JPEGs decoded by torchvision's ``decode_jpeg`` and preprocessed as tensors.

There is no GPU here, so a CPU device runs torchvision's CPU JPEG decoder through the same code; the
CUDA tests run only where there is one.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from vizdeconv import images, load_model
from vizdeconv.errors import VizDeconvError
from vizdeconv.images import _jpeg_bytes, find_images, tensor_preprocess
from vizdeconv.models import LoadedModel

FALLBACK = ("rotated.jpg", "cmyk.jpg", "alpha.png")  # files the device decoder must leave to the CPU path
FAILING = ("rgb1_cut.jpg", "rgb1_noscan.jpg", "text.jpg")

# The device path resizes a uint8 tensor where the CPU path resizes a PIL image, and a grey model's
# JPEGs are decoded straight to luma where Pillow converts decoded RGB: both round a little
# differently. torchvision's CPU decoder, measured here (normalised units): max abs diff one grey
# level (0.011 to 0.018), mean 0.0013 to 0.0038. nvjpeg also upsamples chroma otherwise, which tells
# on these steep colour patterns: measured on an H200, max 0.31, mean 0.045 for RGB models (grey
# models as on the CPU). The tolerances are a few times above that.
MAX_DIFF, MEAN_DIFF = 0.1, 0.02
CUDA_MAX_DIFF, CUDA_MEAN_DIFF = 1.0, 0.15


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colours with grain in brightness: photo-like, as JPEG's chroma subsampling expects."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([128 + 100 * np.sin(x / (4 + seed) + c) * np.cos(y / 6 - c) for c in range(3)], axis=-1)
    rgb += np.random.default_rng(seed).normal(0, 6, (height, width, 1))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    for i, size in enumerate([(40, 30), (64, 80), (20, 25), (33, 57)]):
        _picture(*size, seed=i).save(root / f"rgb{i}.jpg", quality=90)
    _picture(36, 48, seed=5).convert("L").save(root / "grey.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    _picture(50, 30, seed=6).save(root / "rotated.jpg", exif=exif)
    _picture(30, 40, seed=7).convert("CMYK").save(root / "cmyk.jpg")
    _picture(30, 30, seed=8).convert("RGBA").save(root / "alpha.png")
    whole = io.BytesIO()
    _picture(60, 40, seed=9).save(whole, "JPEG")
    data = whole.getvalue()
    # nvjpeg turns both into pictures, where Pillow refuses them, so they are left to the CPU path.
    (root / "rgb1_cut.jpg").write_bytes(data[: len(data) * 3 // 4])  # no end-of-image marker
    (root / "rgb1_noscan.jpg").write_bytes(data[: data.index(b"\xff\xda")] + b"\xff\xd9")  # no scan
    (root / "text.jpg").write_text("not a picture")
    return find_images([root])[0]


def _rgb_model() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel.from_module(torch.nn.Conv2d(3, 4, 3), 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                   device="cpu")


def _preset_model() -> LoadedModel:
    """An RGB model with a torchvision model's own preprocessing (an ``ImageClassification`` preset)."""
    preset = torchvision.models.AlexNet_Weights.DEFAULT.transforms()
    return dataclasses.replace(_rgb_model(), preprocess=preset, input_size=(3, 224, 224))


MODELS = {"grey": lambda: load_model("embedded", device="cpu"), "rgb": _rgb_model, "preset": _preset_model}


def _read(model: LoadedModel, paths, **options):
    """Every image that loaded, by file name, and the failures as (file name, reason)."""
    failures = []
    images = {path.name: image for batch in model.read(paths, failures, batch_size=3, **options)
              for path, image in zip(batch.paths, batch.images, strict=True)}
    return images, [(error.path.name, error.reason) for error in failures]


def test_only_plain_jpegs_go_to_the_device_decoder(folder):
    raw = {path.name for path in folder if _jpeg_bytes(path) is not None}
    assert raw == {"rgb0.jpg", "rgb1.jpg", "rgb2.jpg", "rgb3.jpg", "grey.jpg"}


def _check_against_cpu_path(model: LoadedModel, folder, max_diff: float, mean_diff: float):
    cpu_images, cpu_failures = _read(model, folder)
    gpu_images, gpu_failures = _read(model, folder, decode="gpu")
    assert list(gpu_images) == list(cpu_images)  # same files, same order
    assert sorted(cpu_images) == sorted(path.name for path in folder if path.name not in FAILING)
    assert gpu_failures == cpu_failures and [name for name, _ in cpu_failures] == sorted(FAILING)
    for file, image in gpu_images.items():
        assert image.device == model.device
        image = image.cpu()
        difference = (image - cpu_images[file]).abs()
        if file in FALLBACK:
            assert torch.equal(image, cpu_images[file]), file
        else:
            assert difference.max() < max_diff and difference.mean() < mean_diff, (file, difference.max())


@pytest.mark.parametrize("name", MODELS)
def test_gpu_decoding_on_the_cpu_matches_the_cpu_path(folder, name):
    _check_against_cpu_path(MODELS[name](), folder, MAX_DIFF, MEAN_DIFF)


def test_a_file_the_device_decoder_refuses_takes_the_cpu_path(folder, monkeypatch):
    model = _rgb_model()
    cpu_images, cpu_failures = _read(model, folder)
    refused = _jpeg_bytes(next(path for path in folder if path.name == "rgb1.jpg"))
    decode_jpeg = images.decode_jpeg

    def picky(data, **options):  # fails like the real one: the whole batch for one file
        if any(torch.equal(one, refused) for one in (data if isinstance(data, list) else [data])):
            raise RuntimeError("refused")
        return decode_jpeg(data, **options)

    monkeypatch.setattr(images, "decode_jpeg", picky)
    gpu_images, gpu_failures = _read(model, folder, decode="gpu")
    assert list(gpu_images) == list(cpu_images) and gpu_failures == cpu_failures
    assert torch.equal(gpu_images["rgb1.jpg"], cpu_images["rgb1.jpg"])
    # Its batch-mate was still decoded by decode_jpeg: the tensor resize rounds a little differently.
    assert not torch.equal(gpu_images["rgb0.jpg"], cpu_images["rgb0.jpg"])


def test_workers_give_the_same_batches(folder):
    model = _rgb_model()
    failures_0, failures_2 = [], []
    alone = list(model.read(folder, failures_0, batch_size=3, decode="gpu"))
    helped = list(model.read(folder, failures_2, batch_size=3, workers=2, decode="gpu"))
    assert [b.paths for b in helped] == [b.paths for b in alone]
    assert all(torch.equal(h.images, a.images) for h, a in zip(helped, alone, strict=True))
    assert [str(e) for e in failures_2] == [str(e) for e in failures_0]


def test_tensor_preprocess_refuses_what_may_need_pil():
    preprocess = torchvision.transforms.Compose([torchvision.transforms.Resize(8),
                                                 torchvision.transforms.Lambda(lambda im: im),
                                                 torchvision.transforms.ToTensor()])
    with pytest.raises(VizDeconvError, match=r"preprocessing \(Lambda\) cannot run on tensors.*--decode gpu"):
        tensor_preprocess(preprocess)
    model = dataclasses.replace(_rgb_model(), preprocess=lambda image: image)
    with pytest.raises(VizDeconvError, match="--decode gpu is unavailable"):
        next(model.read([], [], decode="gpu"))


def test_tensor_preprocess_keeps_presets_and_swaps_to_tensor():
    preset = torchvision.models.AlexNet_Weights.DEFAULT.transforms()
    assert tensor_preprocess(preset) is preset
    steps = tensor_preprocess(load_model("embedded", device="cpu").preprocess).transforms
    assert [type(step).__name__ for step in steps] == ["Grayscale", "Resize", "ConvertImageDtype", "Normalize"]


def test_unknown_decode_is_refused():
    with pytest.raises(VizDeconvError, match="unknown decode 'nvjpeg'"):
        next(_rgb_model().read([], [], decode="nvjpeg"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", MODELS)
def test_cuda_decoding_matches_the_cpu_path(folder, name):
    model = MODELS[name]()
    model.module.cuda()
    _check_against_cpu_path(model, folder, CUDA_MAX_DIFF, CUDA_MEAN_DIFF)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_decoding_pins_batches_for_cuda(folder):
    model = _rgb_model()
    model.module.cuda()
    assert all(batch.images.is_pinned() and batch.images.device.type == "cpu"
               for batch in model.read(folder, [], batch_size=3, workers=1))
