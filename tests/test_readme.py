"""The README documents every command and every operation's rule."""

from __future__ import annotations

from pathlib import Path

from vizdeconv import ops
from vizdeconv.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_command():
    readme = (ROOT / "README.md").read_text()
    for name in main.commands:
        assert f"vizdeconv {name}" in readme, name


def test_readme_table_lists_every_operation_and_its_rule():
    readme = (ROOT / "README.md").read_text()
    for op in ops.OPS:
        assert f"| `{op.name}` |" in readme and op.down in readme, op.name


def test_the_notebook_example_runs(tmp_path, monkeypatch):
    """The README's first Python block, as a notebook user would paste it (outputs land in the working folder)."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "sample_images").symlink_to(ROOT / "sample_images")
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(code, names)
    top, maps = names["top"], names["maps"]
    assert sorted(top.hits) == list(range(8)) and top.figure(3).is_file()
    assert (tmp_path / "vizdeconv-out" / "_blocks_9" / "index.json").is_file()
    (result,) = maps.results
    side = len(range(0, 224 - 32 + 1, 16))  # the square's corners 0, 16, …, 192
    assert result.maps.prob_true.shape == (side, side) and not maps.failures
    assert (tmp_path / "vizdeconv-out" / "index.html").is_file()
