"""`vizdeconv deconv` through click's CliRunner, checked against the deconvnet oracles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import FASHION
from oracles import graph_oracle, oracle

from vizdeconv.cli import main
from vizdeconv.layers import trace_layers
from vizdeconv.models import load_model
from vizdeconv.switches import record_points

ROOT = Path(__file__).resolve().parent.parent
FACTORY = ("--model", "factories:functional", "--input-size", "20")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_deconv_writes_figures_and_npz_matching_the_oracle(tmp_path, embedded):
    images = tmp_path / "in"
    shutil.copytree(FASHION, images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    result = run("deconv", images, tmp_path / "missing.png", "--layer", "5", "--top", "2", "--out", out)
    assert result.exit_code == 1
    assert "broken.png" in result.stderr and "missing.png: no such file" in result.stderr
    assert "20 images projected, 2 failed" in result.stderr
    folder = out / "deconv" / "test00000_ankle-boot"
    saved = sorted(folder.glob("layer5_ch*.npz"))
    assert (folder / "layer5.png").exists() and len(saved) == 2
    layers = trace_layers(embedded)
    layer = layers.layer(5)
    image = torch.from_numpy(np.load(saved[0])["input"])
    (activations,) = record_points(embedded.module, [layer.point], image[None])[0]
    for path in saved:
        data = np.load(path)
        assert set(data.files) == {"projection", "input", "layer", "module", "channel", "position", "value", "box",
                                   "rule"}
        channel, (y, x) = int(data["channel"]), data["position"].tolist()
        assert path.name == f"layer5_ch{channel:03d}.npz" and int(data["layer"]) == 5
        assert str(data["module"]) == "features.11" and str(data["rule"]) == "deconvnet"
        # (recomputed here at batch size 1: conv kernels may differ in the last bits across batch sizes)
        assert float(data["value"]) == pytest.approx(activations[channel].max().item(), rel=1e-5)
        assert float(data["value"]) == pytest.approx(activations[channel, y, x].item(), rel=1e-5)
        assert tuple(data["box"]) == layer.field.box(y, x, 28, 28)
        expected = oracle(layers.chain, layer, image, (0, channel, y, x))
        np.testing.assert_allclose(data["projection"], expected.numpy(), rtol=1e-4,
                                   atol=1e-4 * expected.abs().max().item())
    assert not list(out.rglob("*.tmp"))


def test_deconv_with_a_rule_at_a_module_off_the_chain(tmp_path, embedded):
    """``features`` (the Sequential's output) is no step of the chain: autograd with the guided rule."""
    out = tmp_path / "out"
    result = run("deconv", FASHION / "test00008_sandal.png", "--layer", "features", "--rule", "guided", "--top", "2",
                 "--out", out)
    assert result.exit_code == 0, result.output
    folder = out / "deconv" / "test00008_sandal"
    saved = sorted(folder.glob("features_ch*.npz"))
    assert (folder / "features.png").exists() and len(saved) == 2
    layer = trace_layers(embedded).layer("features")
    for path in saved:
        data = np.load(path)
        assert str(data["rule"]) == "guided" and str(data["module"]) == "features" and int(data["layer"]) == 0
        image = torch.from_numpy(data["input"])
        expected = graph_oracle(embedded, layer, image, (0, int(data["channel"]), *data["position"].tolist()), "guided")
        np.testing.assert_allclose(data["projection"], expected.numpy(), rtol=1e-4,
                                   atol=1e-4 * expected.abs().max().item())


def test_deconv_channel_and_position(tmp_path):
    out = tmp_path / "out"
    result = run("deconv", FASHION / "test00001_pullover.png", "--layer", "3", "--channel", "7",
                 "--position", "2,3", "--out", out)
    assert result.exit_code == 0
    data = np.load(out / "deconv" / "test00001_pullover" / "layer3_ch007.npz")
    assert data["position"].tolist() == [2, 3] and int(data["channel"]) == 7


def test_usage_errors_are_one_line_with_exit_code_2(tmp_path):
    result = run("deconv", FASHION, "--layer", "9")
    assert result.exit_code == 2 and "no layer '9'; conv layers: 1 = features.1" in result.stderr
    assert "Traceback" not in result.output
    result = run("deconv", FASHION, "--layer", "features.99")
    assert result.exit_code == 2 and "no layer 'features.99'; nearest: features.9" in result.stderr
    result = run("deconv", FASHION, "--layer", "1", "--rule", "backprop")
    assert result.exit_code == 2 and "'backprop' is not one of 'deconvnet', 'guided', 'gradient'" in result.stderr
    result = run("deconv", FASHION, "--layer", "1", "--position", "x")
    assert result.exit_code == 2 and "--position expects Y,X" in result.stderr


def test_deconv_through_a_graph_with_each_rule_matches_the_oracle(tmp_path):
    image = FASHION / "test00008_sandal.png"
    result = run("deconv", image, *FACTORY, "--layer", "act", "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: 'act' is called 2 times in one forward pass; pick a call: act@1, act@2"
    model = load_model("factories:functional", input_size=20, device="cpu")
    layer = trace_layers(model).layer("joined")
    for rule in ("deconvnet", "guided", "gradient"):
        result = run("deconv", image, *FACTORY, "--layer", "joined", "--rule", rule, "--out", tmp_path / rule)
        assert result.exit_code == 0, result.output
        (saved,) = (tmp_path / rule / "deconv" / "test00008_sandal").glob("joined_ch*.npz")
        data = np.load(saved)
        assert str(data["rule"]) == rule and str(data["module"]) == "joined"
        expected = graph_oracle(model, layer, torch.from_numpy(data["input"]), (0, int(data["channel"]),
                                                                               *data["position"].tolist()), rule)
        np.testing.assert_allclose(data["projection"], expected.numpy(), rtol=1e-4,
                                   atol=1e-4 * expected.abs().max().item())
