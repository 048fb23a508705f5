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
