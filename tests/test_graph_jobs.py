"""Top-k scans and occlusion through a residual network, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from oracles import occlusion_spec, random_model, rule_oracle
from vizdeconv.deconvnet import Deconvnet
from vizdeconv.images import find_images, load_image
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.occlusion import occlude
from vizdeconv.topk import TopK, hits, project_hits, scan

SIDE = 64


@pytest.fixture(scope="module")
def resnet18():
    return LoadedModel.from_module(random_model("resnet18", SIDE).module, SIDE, mean=(0.5,) * 3, std=(0.25,) * 3,
                                   name="resnet18", device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    generator = np.random.default_rng(0)
    for i in range(11):
        pixels = generator.integers(0, 256, (40 + 7 * i, 70 - 3 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    Image.open(folder / "img03.png").save(folder / "img03-copy.png")  # a tie, broken by path
    return find_images([folder])[0]


def module_output(model, name, images):
    outputs = []
    handle = model.module.get_submodule(name).register_forward_hook(lambda m, i, o: outputs.append(o.clone()))
    try:
        with torch.no_grad():
            logits = model.module(images)
    finally:
        handle.remove()
    return logits, outputs[0]


def test_project_on_resnet18_layer3_equals_a_brute_force_scan(resnet18, photos):
    layers = trace_layers(resnet18)
    layer = layers.layer("layer3")
    deconvnet = Deconvnet(resnet18, layers, layer)
    assert not deconvnet.walks
    k = 4
    top = TopK(range(layer.output_shape[0]), k, resnet18.device)
    list(scan(resnet18, [layer], [top], photos, [], batch_size=5))
    found = hits(top, layer, photos, resnet18.input_size)

    candidates = {}
    for path in photos:  # every activation materialised, one image at a time
        x = resnet18.preprocess(load_image(path, channels=3, background=resnet18.mean))[None]
        _, activations = module_output(resnet18, "layer3", x)
        for channel, plane in enumerate(activations[0]):
            flat = int(plane.flatten().argmax())
            candidates.setdefault(channel, []).append((-plane.max().item(), str(path), divmod(flat, plane.shape[1])))
    for channel, entries in candidates.items():
        expected = [(p, -v, pos) for v, p, pos in sorted(entries)[:k] if -v > 0]
        got = [(str(h.image), h.value, h.position) for h in found[channel]]
        assert [(p, pos) for p, _, pos in got] == [(p, pos) for p, _, pos in expected], channel
        assert np.allclose([v for _, v, _ in got], [v for _, v, _ in expected], rtol=1e-5)

    chosen = {c: found[c] for c in (0, 17, 200)}
    for _, result in project_hits([deconvnet], [chosen], [], batch_size=2):
        seeds = [(0, p.hit.channel, *p.hit.position) for p in result.projections]
        expected = rule_oracle(resnet18.module, result.input[None], "layer3", 0, seeds, "deconvnet")
        for projection, want in zip((p.pixels for p in result.projections), expected):
            torch.testing.assert_close(projection, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_occlude_on_resnet18_equals_a_brute_force_loop(resnet18):
    layers = trace_layers(resnet18)
    layer = layers.layer("layer4.0")
    torch.manual_seed(5)
    image = torch.randn(3, SIDE, SIDE)
    fill = torch.full((3,), 0.3)
    maps = occlude(resnet18, layers, image, occlusion_spec(resnet18, layer, size=16, stride=8, fill=fill), batch_size=10)
    assert maps.method == "incremental" and maps.prob_true.shape == (7, 7)
    clean_logits, clean = module_output(resnet18, "layer4.0", image[None])
    channel = int(clean[0].flatten(1).max(1).values.argmax())
    target = int(clean_logits[0].argmax())
    assert (maps.channel, maps.target) == (channel, target)
    for i, y in enumerate(range(0, SIDE - 16 + 1, 8)):
        for j, x in enumerate(range(0, SIDE - 16 + 1, 8)):
            occluded = image.clone()
            occluded[:, y:y + 16, x:x + 16] = fill[:, None, None]
            logits, activations = module_output(resnet18, "layer4.0", occluded[None])
            probabilities = logits[0].softmax(0)
            assert maps.prob_true[i, j] == pytest.approx(probabilities[target].item(), abs=1e-5)
            assert maps.top_class[i, j] == int(probabilities.argmax())
            assert maps.feature_total[i, j] == pytest.approx(activations[0, channel].sum().item(), rel=1e-5)


def test_incremental_occlusion_leaves_out_convs_that_pad_with_reflections():
    from oracles import wrap
    from torch import nn

    torch.manual_seed(3)
    module = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 3))
    model = wrap(module, (2, 12, 12), categories=("a", "b", "c"))
    layers = trace_layers(model)
    layer = layers.layer("4")
    image = torch.randn(2, 12, 12)
    spec = occlusion_spec(model, layer, size=3, stride=1, fill=torch.zeros(2))
    exact = occlude(model, layers, image, spec, batch_size=16)
    brute = occlude(model, layers, image, spec, batch_size=16, brute_force=True)
    np.testing.assert_allclose(exact.feature_total, brute.feature_total, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exact.prob_true, brute.prob_true, atol=1e-6)
