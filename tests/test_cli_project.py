"""`vizdeconv project` through click's CliRunner: the layer folder, its index.json, the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import FASHION

from vizdeconv.cli import main



@pytest.fixture()
def folder(tmp_path):
    shutil.copytree(FASHION, tmp_path / "a")
    return tmp_path


def test_project_command_end_to_end(folder):
    (folder / "a" / "broken.jpg").write_text("not an image")
    out = folder / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["project", "--layer", "2", "--images", str(folder / "a"), "--channels", "0-3",
                                  "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 1 and "broken.jpg: not an image file" in result.stderr
    index = json.loads((out / "layer2" / "index.json").read_text())
    assert index["layer"] == 2 and index["module"] == "features.4" and index["images_scanned"] == 20
    assert index["rule"] == "deconvnet"
    assert index["failed"][0]["image"].endswith("broken.jpg")
    assert [c["channel"] for c in index["channels"]] == [0, 1, 2, 3]
    for channel in index["channels"]:
        assert (out / "layer2" / channel["png"]).exists()
        values = [h["value"] for h in channel["hits"]]
        assert values == sorted(values, reverse=True) and len(values) <= 9
        assert len({h["image"] for h in channel["hits"]}) == len(values)
    assert (out / "layer2" / "overview.png").exists()
    result = runner.invoke(main, ["project", "--layer", "1", "--out", str(out), "--channels", "0", "--rule",
                                  "guided"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "layer1" / "index.json").read_text())["rule"] == "guided"
    page = (out / "index.html").read_text()
    assert 'href="#layer1/0"' in page and 'src="layer2/ch003.png"' in page
    assert "guided rule" in page and "deconvnet rule" in page


def test_several_layers_and_an_image_list(folder):
    """--layer 1-2 scans both layers in one pass; --images-from reads a list relative to its own folder."""
    listed = sorted(p.name for p in (folder / "a").iterdir())[:6]
    (folder / "a" / "list.txt").write_text("# six samples and a missing file\n\n" + "\n".join(listed) + "\nnot-there.png\n")
    out = folder / "out"
    result = CliRunner().invoke(main, ["project", "--layer", "1-2", "--images-from", str(folder / "a" / "list.txt"),
                                       "--channels", "0-1", "--top", "2", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 1 and "not-there.png: no such file or folder" in result.stderr
    assert result.stdout.count("channels fired, top 2 over 6 images") == 2
    for layer in ("layer1", "layer2"):
        hits = [hit for c in json.loads((out / layer / "index.json").read_text())["channels"] for hit in c["hits"]]
        assert hits and {Path(hit["image"]).name for hit in hits} <= set(listed)


@pytest.mark.parametrize("arguments, message", [
    (["--layer", "5-1"], "layer range '5-1' runs backwards"),
    (["--layer", "2", "--images-from", "{list}"], "the image list names no files"),
])
def test_bad_layer_ranges_and_empty_lists_are_one_line_usage_errors(folder, arguments, message):
    (folder / "empty.txt").write_text("# nothing yet\n")
    arguments = [a.replace("{list}", str(folder / "empty.txt")) for a in arguments]
    result = CliRunner().invoke(main, ["project", *arguments, "--out", str(folder / "out")])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_changed_rerun_of_an_interrupted_scan_is_a_one_line_usage_error(folder):
    state = folder / "out" / ".scan" / "rank0.safetensors"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"torn")
    arguments = ["project", "--layer", "2", "--images", str(folder / "a"), "--channels", "0", "--out", str(folder / "out")]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and "unreadable scan checkpoint" in result.stderr and "--restart" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert CliRunner().invoke(main, [*arguments, "--restart"]).exit_code == 0 and not state.exists()
