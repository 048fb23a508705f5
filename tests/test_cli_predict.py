"""`vizdeconv predict` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from factories import FASHION

from vizdeconv.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_predict_classifies_the_shipped_samples():
    result = run("predict", FASHION, "--json", "--top", "2")
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 20
    truth = {"t-shirt-top": "T-shirt/top", "ankle-boot": "Ankle boot"}
    correct = 0
    for line in lines:
        label = Path(line["image"]).stem.split("_", 1)[1]
        correct += line["classes"][0]["name"] == truth.get(label, label.capitalize())
        assert line["classes"][0]["probability"] >= line["classes"][1]["probability"]
    assert correct >= 17


def test_unsafe_weights_are_refused_with_exit_code_2(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    result = run("predict", FASHION, "--weights", tmp_path / "model.pt")
    assert result.exit_code == 2
    assert "refused, it pickles torch.nn.modules.linear.Linear, which could run arbitrary code" in result.stderr
