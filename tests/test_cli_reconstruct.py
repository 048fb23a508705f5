"""`vizdeconv reconstruct` through click's CliRunner: files, the printed means and one-line errors."""

from __future__ import annotations

import csv

import numpy as np
from click.testing import CliRunner
from factories import FASHION

from vizdeconv.cli import main

IMAGES = [FASHION / "test00000_ankle-boot.png", FASHION / "test00008_sandal.png"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_reconstruct_prints_the_mean_similarities_it_wrote(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    result = run("reconstruct", *IMAGES, broken, "--layer", "1,2", "--out", out)
    assert result.exit_code == 1
    assert "note: layer 1 (features.1): no max-pool below it" in result.stderr
    assert "failed:" in result.stderr and "broken.png" in result.stderr
    assert "2 images reconstructed" in result.stderr
    with open(out / "reconstruct" / "similarity.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 2 * 2  # images × layers × switches
    for layer in ("1", "2"):
        cells = []
        for switches in ("known", "fixed"):
            chosen = [r for r in rows if r["layer"] == layer and r["switches"] == switches]
            cells.append(f"{np.mean([float(r['pearson']) for r in chosen]):.3f} / "
                         f"{np.mean([float(r['ssim']) for r in chosen]):.3f}")
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"│ {layer} "))
        assert [cell.strip() for cell in line.split("│")[2:4]] == cells
    for image in IMAGES:
        with np.load(out / "reconstruct" / image.stem / "reconstruct_layer2.npz") as arrays:
            assert {"input", "known", "fixed", "known_pearson", "fixed_ssim"} <= set(arrays.files)


def test_known_switches_alone_give_no_note_and_no_fixed_arrays(tmp_path):
    result = run("reconstruct", IMAGES[0], "--layer", "1", "--switches", "known", "--out", tmp_path)
    assert result.exit_code == 0 and "note:" not in result.stderr
    with np.load(tmp_path / "reconstruct" / IMAGES[0].stem / "reconstruct_layer1.npz") as arrays:
        assert "known" in arrays.files and "fixed" not in arrays.files


def test_usage_errors_are_one_line(tmp_path):
    for args, words in ((("--switches", "random"), "unknown switches 'random'"),
                        (("--layer", "9"), "no layer '9'"),
                        (("--layer", "classifier.1"), "no (C, H, W) output")):
        result = run("reconstruct", IMAGES[0], *args, "--out", tmp_path)
        assert result.exit_code == 2, args
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "reconstruct").exists()

