"""`vizdeconv occlude` through click's CliRunner: batch runs, resuming by spec, methods, usage errors."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from factories import FASHION

from vizdeconv.cli import main



def test_occlude_command_batch_run_resumes(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for name in ("test00000_ankle-boot.png", "test00001_pullover.png", "test00008_sandal.png"):
        shutil.copy(FASHION / name, images / name)
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["occlude", str(images), "--stride", "3", "--out", str(out)]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1 and "broken.png" in result.stderr
    with open(out / "occlusion" / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [Path(r["image"]).name for r in rows] == ["test00000_ankle-boot.png", "test00001_pullover.png",
                                                     "test00008_sandal.png"]
    data = np.load(out / "occlusion" / "test00000_ankle-boot" / "maps.npz")
    assert {"prob_true", "top_class", "feature_total", "channel", "target", "layer", "size", "stride",
            "positions_y", "positions_x"} <= set(data.files)
    assert int(data["size"]) == 6 and int(data["stride"]) == 3 and int(data["layer"]) == 5
    assert float(rows[0]["prob_min"]) == pytest.approx(float(data["prob_true"].min()), abs=1e-6)
    # An interrupted run: one image lost its maps. The rerun redoes only that one.
    (out / "occlusion" / "test00001_pullover" / "maps.npz").unlink()
    before = (out / "occlusion" / "test00000_ankle-boot" / "maps.npz").stat().st_mtime_ns
    (images / "broken.png").unlink()
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0 and "2 images already done" in result.stderr
    assert "test00001_pullover.png:" in result.stdout and "test00000" not in result.stdout
    assert (out / "occlusion" / "test00000_ankle-boot" / "maps.npz").stat().st_mtime_ns == before
    with open(out / "occlusion" / "summary.csv") as file:
        assert len(list(csv.DictReader(file))) == 3
    assert not list(out.rglob(".*.tmp"))
    # Other parameters are a different question: nothing is skipped.
    result = runner.invoke(main, ["occlude", str(images), "--stride", "4", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and "already done" not in result.stderr
    # So is panel (c)'s rule; the same spec again resumes every image.
    guided = ["occlude", str(images), "--stride", "4", "--rule", "guided", "--out", str(out)]
    result = runner.invoke(main, guided, catch_exceptions=False)
    assert result.exit_code == 0 and "already done" not in result.stderr
    result = runner.invoke(main, guided, catch_exceptions=False)
    assert result.exit_code == 0 and "3 images already done" in result.stderr and not result.stdout
    page = (out / "index.html").read_text()
    assert 'data-kind="occlude"' in page and 'href="occlusion/test00008_sandal/occlusion.png"' in page


def test_square_larger_than_the_image_is_a_usage_error():
    result = CliRunner().invoke(main, ["occlude", str(FASHION / "test00000_ankle-boot.png"), "--size", "40"])
    assert result.exit_code == 2 and "larger than the model's input (28 px)" in result.stderr


def test_occlude_command_methods(tmp_path):
    image = str(FASHION / "test00001_pullover.png")
    runner = CliRunner()
    runs = (([], "exact"), (["--brute-force"], "brute"), (["--approximate"], "rough"),
            (["--approximate", "tau=0.3,factor=1"], "threshold"), (["--approximate=tau=1,factor=2,share=1"], "drill"))
    for flags, folder in runs:
        result = runner.invoke(main, ["occlude", image, "--out", str(tmp_path / folder), *flags], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    maps = {f: np.load(tmp_path / f / "occlusion" / "test00001_pullover" / "maps.npz") for _, f in runs}
    assert str(maps["exact"]["method"]) == "incremental" and str(maps["brute"]["method"]) == "brute force"
    assert str(maps["rough"]["method"]) == ("approximate (incremental; projective-field threshold tau=0.75, "
                                            "drill-down factor 4, share 25%)")
    assert [float(maps["rough"][k]) for k in ("tau", "drill_factor", "drill_share")] == [0.75, 4, 0.25]
    assert [float(maps["exact"][k]) for k in ("tau", "drill_factor", "drill_share")] == [1, 1, 1]
    assert str(maps["threshold"]["method"]) == "approximate (incremental; projective-field threshold tau=0.3)"
    assert str(maps["drill"]["method"]) == "approximate (incremental; drill-down factor 2, share 100%)"
    np.testing.assert_allclose(maps["exact"]["prob_true"], maps["brute"]["prob_true"], atol=1e-5)
    # drill-down into every block evaluates every position: exact maps under an approximate label
    np.testing.assert_allclose(maps["drill"]["prob_true"], maps["exact"]["prob_true"], atol=1e-6)
    assert np.abs(maps["threshold"]["prob_true"] - maps["exact"]["prob_true"]).max() > 1e-4
    # Exact maps do not answer an approximate request, nor the other way round, nor other knobs.
    for flags in (["--approximate"], ["--approximate", "tau=0.4"]):
        result = runner.invoke(main, ["occlude", image, "--out", str(tmp_path / "rough"), *flags])
        assert result.exit_code == 0 and ("already done" in result.stderr) == (flags == ["--approximate"])
    result = runner.invoke(main, ["occlude", image, "--out", str(tmp_path / "exact"), "--approximate"])
    assert result.exit_code == 0 and "already done" not in result.stderr
    result = runner.invoke(main, ["occlude", image, "--approximate", "tau=2"])
    assert result.exit_code != 0 and "--approximate needs 0 < tau <= 1" in result.stderr


def test_occlude_command_at_a_module_off_the_chain_with_a_rule(tmp_path):
    image = str(FASHION / "test00001_pullover.png")
    out = tmp_path / "graph"
    result = CliRunner().invoke(main, ["occlude", image, "--layer", "features", "--rule", "guided", "--stride", "3",
                                       "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "note:" not in result.stderr
    maps = np.load(out / "occlusion" / "test00001_pullover" / "maps.npz")
    assert str(maps["method"]) == "incremental" and str(maps["module"]) == "features" and int(maps["layer"]) == 0
    assert (out / "occlusion" / "test00001_pullover" / "occlusion.png").exists()


@pytest.mark.parametrize("factory, method", [("functional", "incremental"), ("sized_view", "brute force")])
def test_occlude_command_on_graphs_and_a_model_it_cannot_replay(tmp_path, factory, method):
    """Residual sums, in-place ReLUs, concatenation run incremental; a batch size read as a number
    cannot be replayed: brute force, with a note, and the same maps."""
    image = str(FASHION / "test00001_pullover.png")
    maps, notes = {}, {}
    for flags, folder in (([], "auto"), (["--brute-force"], "brute")):
        result = CliRunner().invoke(main, ["occlude", image, "--model", f"factories:{factory}", "--input-size", "20",
                                           "--size", "5", "--stride", "3", "--out", str(tmp_path / folder), *flags],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        maps[folder] = np.load(tmp_path / folder / "occlusion" / "test00001_pullover" / "maps.npz")
        notes[folder] = " ".join(result.stderr.split())
    assert str(maps["auto"]["method"]) == method
    noted = "note: exact incremental inference is not possible (replaying its calls on regions"
    assert (noted in notes["auto"]) == (method == "brute force") and "note:" not in notes["brute"]
    np.testing.assert_allclose(maps["auto"]["prob_true"], maps["brute"]["prob_true"], atol=1e-6)
    np.testing.assert_allclose(maps["auto"]["feature_total"], maps["brute"]["feature_total"], rtol=1e-5, atol=1e-6)
