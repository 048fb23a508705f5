"""`vizdeconv layers` through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vizdeconv.cli import main

FACTORY = ("--model", "factories:functional", "--input-size", "20")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_layers_json_and_table():
    result = run("layers", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    # every (C, H, W) module output is a row; the numbered ones are the rectified convs
    assert [row["module"] for row in data["layers"]] == [f"features.{i}" for i in range(13)] + ["features"]
    numbered = [row for row in data["layers"] if row["layer"] is not None]
    assert [row["layer"] for row in numbered] == [1, 2, 3, 4, 5]
    assert numbered[4]["output_shape"] == [64, 7, 7] and data["input_size"] == [1, 28, 28]
    assert numbered[4]["module"] == "features.11" and numbered[4]["path"] == "walk"
    assert data["chain_end"] == "the model's output"
    assert [op["op"] for op in data["ops"]] == ["relu", "conv2d", "max_pool2d"]
    table = run("layers")
    assert table.exit_code == 0 and "features.13" not in table.stdout and "classifier" not in table.stdout
    assert "walk" in table.stdout and "autograd" in table.stdout  # (cells wrap at 80 columns)
    assert "max_pool2d: unpooled through the switches" in table.stdout


def test_layers_table_shows_module_names_and_rule_texts_in_80_columns():
    table = run("layers")
    assert "features.11" in table.stdout
    assert "guided = 1[f>0]·relu(R)" in table.stdout and "gradient = 1[f>0]·R" in table.stdout


def test_layers_of_a_graph_factory_name_every_call_and_rule():
    result = run("layers", *FACTORY, "--json")
    assert result.exit_code == 0, result.output
    rows = {row["module"]: row for row in json.loads(result.stdout)["layers"]}
    assert {"act@1", "act@2", "summed", "joined", "top"} <= rows.keys() and "act" not in rows
    assert rows["top"]["path"] == "autograd" and rows["top"]["unknown"] is None
    assert {"add", "cat", "relu6", "local_response_norm"} <= set(rows["top"]["below"])
    assert rows["joined"]["rf_size"] == [7, 7] and rows["joined"]["rf_stride"] == [2, 2]
