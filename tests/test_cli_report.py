"""`vizdeconv report` through click's CliRunner: the page rebuilt from the result folders alone."""

from __future__ import annotations


from click.testing import CliRunner
from factories import FASHION

from vizdeconv.cli import main



def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_report_rebuilds_the_page_over_every_command_run_into_out(tmp_path):
    out = tmp_path / "out"
    image = FASHION / "test00008_sandal.png"
    assert run("project", "--layer", "2", "--channels", "0-1", "--out", out).exit_code == 0
    assert run("occlude", image, "--stride", "4", "--out", out).exit_code == 0
    assert run("deconv", image, "--layer", "3", "--out", out).exit_code == 0
    page = out / "index.html"
    written = page.read_text()
    page.unlink()
    result = run("report", out)
    assert result.exit_code == 0 and str(page) in result.stdout
    rebuilt = page.read_text()
    assert rebuilt == written  # the page depends on the folders, not on which command wrote it last
    for section in ('id="layer2" data-kind="project"', 'id="occlusion" data-kind="occlude"',
                    'id="deconv" data-kind="deconv"'):
        assert section in rebuilt
    assert rebuilt.index('id="layer2"') < rebuilt.index('id="occlusion"') < rebuilt.index('id="deconv"')


def test_report_of_a_missing_folder_is_a_usage_error(tmp_path):
    result = run("report", tmp_path / "nothing")
    assert result.exit_code == 2 and "does not exist" in result.stderr
