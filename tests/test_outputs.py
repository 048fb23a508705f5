"""Atomic writes and output folder names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vizdeconv.outputs import output_names, save_npz, write_atomic


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.npz"
    save_npz(target, a=np.arange(3))

    def explode(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, explode)
    assert np.load(target)["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["result.npz"]


def test_output_names_disambiguate_clashing_stems():
    names = output_names([Path("a/cat.jpg"), Path("b/cat.png"), Path("dog.jpg")])
    assert names[Path("dog.jpg")] == "dog"
    assert names[Path("a/cat.jpg")] == "a_cat.jpg" and names[Path("b/cat.png")] == "b_cat.png"
