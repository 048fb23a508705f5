"""The top-k scan against a brute-force scan, its determinism, and the projections of its hits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from factories import FASHION
from oracles import graph_oracle, oracle, point_output
from PIL import Image

from vizdeconv.deconvnet import Deconvnet
from vizdeconv.errors import LayerError
from vizdeconv.images import find_images, load_image
from vizdeconv.layers import trace_layers
from vizdeconv.topk import TopK, chunk_count, hits, parse_channels, project_hits, scan



@pytest.fixture()
def folder(tmp_path):
    """The 20 samples, a flipped copy of each in a subfolder, and an exact duplicate (a tie)."""
    shutil.copytree(FASHION, tmp_path / "a")
    (tmp_path / "b").mkdir()
    for path in FASHION.glob("*.png"):
        Image.open(path).transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "b" / path.name)
    shutil.copy(FASHION / "test00007_shirt.png", tmp_path / "b" / "zz-duplicate.png")
    return tmp_path


def brute_force(model, layers, layer, paths, k):
    """Every activation materialised, one image at a time; per channel the k largest per-image maxima.
    (Down the chain where it reaches the layer, else the whole model with a hook of its own.)"""
    candidates = {}
    for path in paths:
        x = model.preprocess(load_image(path, channels=1, background=model.mean))[None]
        if layer.chain_index is None:
            x = point_output(model, layer, x)
        else:
            with torch.no_grad():
                for step in layers.chain.steps[: layer.chain_index + 1]:
                    x = step.module(x)
        for channel, plane in enumerate(x[0]):
            value = plane.max().item()
            flat = [i for i, v in enumerate(plane.flatten().tolist()) if v == value][0]
            candidates.setdefault(channel, []).append((-value, str(path), divmod(flat, plane.shape[1])))
    return {c: [(str(p), -v, pos) for v, p, pos in sorted(found)[:k] if -v > 0] for c, found in candidates.items()}


def run_scan(deconvnet, paths, k=9, batch_size=4, workers=0, channels=None):
    model, layer = deconvnet.model, deconvnet.layer
    channels = list(range(layer.output_shape[0])) if channels is None else channels
    top = TopK(channels, k, model.device)
    failures = []
    done = list(scan(model, [layer], [top], paths, failures, batch_size=batch_size,
                     workers=workers))
    return hits(top, layer, paths, model.input_size), done, failures


def deconvnet_for(model, spec):
    layers = trace_layers(model)
    return Deconvnet(model, layers, layers.layer(spec))


def as_tuples(found):
    return {c: [(str(h.image), h.value, h.position) for h in hs] for c, hs in found.items()}


@pytest.mark.parametrize("spec", [2, 5, "features"])  # `features` (the Sequential's output): no chain step
def test_scan_equals_brute_force(embedded, folder, spec):
    deconvnet = deconvnet_for(embedded, spec)
    layer = deconvnet.layer
    assert (layer.chain_index is None) == (spec == "features")
    paths, _ = find_images([folder])
    found, done, failures = run_scan(deconvnet, paths)
    assert done[-1] == chunk_count(len(paths)) == 3 and done == sorted(done) and not failures  # 41 files
    expected = brute_force(embedded, deconvnet.layers, layer, paths, 9)
    got = as_tuples(found)
    assert got.keys() == expected.keys()
    for channel in expected:
        assert [(p, pos) for p, _, pos in got[channel]] == [(p, pos) for p, _, pos in expected[channel]]
        assert [v for _, v, _ in got[channel]] == pytest.approx([v for _, v, _ in expected[channel]], rel=1e-5)
        assert len({p for p, _, _ in got[channel]}) == len(got[channel])  # k different images
    # The duplicate ties with its original: the earlier path wins wherever both would qualify.
    for channel_hits in got.values():
        names = [Path(p).name for p, _, _ in channel_hits]
        if "zz-duplicate.png" in names:
            assert "test00007_shirt.png" in names


def test_scan_is_the_same_for_any_batch_size_workers_and_order(embedded, folder):
    deconvnet = deconvnet_for(embedded, 3)
    paths, _ = find_images([folder])
    reference, _, _ = run_scan(deconvnet, paths, batch_size=1)
    shuffled, _ = find_images(list(reversed(sorted(folder.iterdir()))))
    assert shuffled == paths
    for batch_size, workers in [(5, 0), (41, 0), (7, 2)]:
        found, _, _ = run_scan(deconvnet, paths, batch_size=batch_size, workers=workers)
        assert {c: [(h.image, h.position) for h in hs] for c, hs in found.items()} == \
            {c: [(h.image, h.position) for h in hs] for c, hs in reference.items()}


def test_memory_is_bounded_by_channels_times_k(embedded, folder):
    deconvnet = deconvnet_for(embedded, 1)
    paths, _ = find_images([folder])
    top = TopK([0, 5], 3, embedded.device)
    for _ in scan(embedded, [deconvnet.layer], [top], paths, [], batch_size=8):
        assert top.values.shape[0] == 2 and top.values.shape[1] <= 3


def test_broken_files_are_reported_and_skipped(embedded, folder):
    (folder / "a" / "broken.png").write_bytes(b"nope")
    deconvnet = deconvnet_for(embedded, 1)
    paths, _ = find_images([folder])
    found, done, errors = run_scan(deconvnet, paths, channels=[0])
    assert len(errors) == 1 and errors[0].path.name == "broken.png" and done[-1] == chunk_count(len(paths))
    assert all(h.image.name != "broken.png" for h in found[0])


@pytest.mark.parametrize("spec, rule", [(4, "deconvnet"), ("features", "deconvnet"), (4, "guided")])
def test_projections_of_hits_match_the_oracle(embedded, spec, rule):
    layers = trace_layers(embedded)
    layer = layers.layer(spec)
    deconvnet = Deconvnet(embedded, layers, layer, rule=rule)
    assert deconvnet.walks == (spec == 4 and rule == "deconvnet")
    paths, _ = find_images([FASHION])
    found, _, _ = run_scan(deconvnet, paths, k=2, channels=[3, 10])
    projected = []
    for _, result in project_hits([deconvnet], [found], [], batch_size=3):
        for projection in result.projections:
            hit = projection.hit
            assert hit.image == result.path
            seed = (0, hit.channel, *hit.position)
            expected = oracle(layers.chain, layer, result.input, seed, rule) if layer.chain_index is not None else \
                graph_oracle(embedded, layer, result.input, seed, rule)
            torch.testing.assert_close(projection.pixels, expected, rtol=1e-4,
                                       atol=1e-4 * expected.abs().max().item())
            projected.append(hit)
    assert sorted(projected, key=str) == sorted((h for hs in found.values() for h in hs), key=str) != []


def test_parse_channels():
    assert parse_channels("all", 3) == [0, 1, 2]
    assert parse_channels("0-2, 7,5", 8) == [0, 1, 2, 5, 7]
    with pytest.raises(LayerError, match=r"channels \[9\] out of range; the layer has channels 0..7"):
        parse_channels("1,9", 8)
    with pytest.raises(LayerError, match="expects 'all'"):
        parse_channels("x", 8)
