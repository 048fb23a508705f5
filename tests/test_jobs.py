"""The library jobs directly: typed reports, what they write, resuming by spec, files that fail midway."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from factories import sample_copies
from oracles import wrap
from torch import nn

from vizdeconv.errors import ImageError, VizDeconvError
from vizdeconv.jobs import deconv, evolution, filters, occlude, save_manifest
from vizdeconv.jobs.deconv import DeconvJob
from vizdeconv.jobs.occlude import OcclusionJob
from vizdeconv.jobs.predict import PredictJob
from vizdeconv.jobs.project import ProjectJob
from vizdeconv.layers import trace_layers
from vizdeconv.occlusion import Approximation, OcclusionMaps

FEW = ["test00000_ankle-boot.png", "test00001_pullover.png", "test00008_sandal.png", "test00023_ankle-boot.png"]


@pytest.fixture()
def images(tmp_path):
    return sample_copies(tmp_path / "in", FEW)


def test_project_job_reports_what_it_wrote(embedded, images, tmp_path):
    (done,) = ProjectJob(embedded, 2, k=3, channels="0-5", out=tmp_path / "out").run([images])
    assert done.folder == tmp_path / "out" / "layer2" and done.scanned == 4 and not done.failures
    assert sorted(done.hits) == list(range(6))
    index = json.loads((done.folder / "index.json").read_text())
    written = {c["channel"]: c["hits"] for c in index["channels"]}
    for channel, hits in done.hits.items():
        assert [hit.value for hit in hits] == sorted((hit.value for hit in hits), reverse=True)
        assert len({hit.image for hit in hits}) == len(hits) <= 3 and all(hit.channel == channel for hit in hits)
        if hits:
            assert done.figure(channel).is_file() and written[channel] == [hit.to_json() for hit in hits]
        else:
            assert not done.figure(channel).exists() and channel not in written


def test_a_file_that_breaks_between_scan_and_projection_is_a_failure_not_a_crash(embedded, images, tmp_path):
    job = ProjectJob(embedded, 5, k=4, channels="0-9", out=tmp_path / "out")
    victim = images / FEW[0]

    def progress(stage, done, total):
        if stage.startswith("projecting") and done == 0:
            victim.write_bytes(b"no longer a png")

    (done,) = job.run([images], progress=progress)
    assert [failure.path for failure in done.failures] == [victim] and done.scanned == 4
    assert all(hit.image != victim for hits in done.hits.values() for hit in hits)
    assert any(done.hits.values())
    assert json.loads((done.folder / "index.json").read_text())["failed"][0]["image"] == str(victim)


def test_occlusion_job_resumes_only_an_equal_spec(embedded, images, tmp_path):
    out = tmp_path / "out"
    first = OcclusionJob(embedded, stride=4, out=out).run([images])
    assert [r.image.name for r in first.results] == sorted(FEW) and not any(r.resumed for r in first.results)
    for result in first.results:
        with np.load(result.folder / "maps.npz") as arrays:
            assert OcclusionMaps.from_arrays(arrays).spec == first.spec
    again = OcclusionJob(embedded, stride=4, out=out).run([images])
    assert all(r.resumed for r in again.results)
    for before, after in zip(first.results, again.results):
        np.testing.assert_array_equal(before.maps.prob_true, after.maps.prob_true)
    for change in ({"fill": 0.5}, {"target": "Sandal"}, {"rule": "guided"}, {"approximate": Approximation()}, {"layer": 3},
                   {"size": 5}):
        other = OcclusionJob(embedded, stride=4, out=tmp_path / "other", **change)
        shutil.copytree(out, tmp_path / "other", dirs_exist_ok=True)  # the first run's maps, under another spec
        (result,) = other.run([images / FEW[0]]).results
        assert not result.resumed, change
    asked = OcclusionJob(embedded, stride=4, target="ankle boot", out=out).run([images])
    assert asked.spec.target == "9" and not any(r.resumed for r in asked.results)
    assert all(r.maps.target == 9 for r in asked.results)


def test_a_square_larger_than_the_input_is_refused_before_any_image(embedded):
    with pytest.raises(VizDeconvError, match=r"square \(29 px\) is larger than the model's input \(28 px\)"):
        OcclusionJob(embedded, size=29)


def test_deconv_job_index_keeps_earlier_layers(embedded, images, tmp_path):
    out = tmp_path / "out"
    fifth = DeconvJob(embedded, 5, top=2, out=out).run([images / FEW[0]])
    second = DeconvJob(embedded, 2, rule="guided", out=out).run([images / FEW[0]])
    assert [len(r.hits) for r in fifth.results] == [2] and [len(r.hits) for r in second.results] == [1]
    index = json.loads((out / "deconv" / "index.json").read_text())
    assert [(f["png"], f["rule"]) for f in index["figures"]] == [("test00000_ankle-boot/layer2.png", "guided"),
                                                                ("test00000_ankle-boot/layer5.png", "deconvnet")]
    assert all((out / "deconv" / f["png"]).is_file() for f in index["figures"])


def test_predict_job_keeps_input_order_and_lists_failures(embedded, images):
    (images / "broken.png").write_bytes(b"nope")
    done = PredictJob(embedded, top=2).run([images])
    assert [p.image.name for p in done.predictions] == sorted(FEW)
    assert [f.path.name for f in done.failures] == ["broken.png"]
    assert all(p.classes[0][2] >= p.classes[1][2] for p in done.predictions)


def test_maps_from_before_the_spec_keys_are_redone_not_fatal(embedded, images, tmp_path):
    out = tmp_path / "out"
    (first,) = OcclusionJob(embedded, stride=4, out=out).run([images / FEW[0]]).results
    with np.load(first.folder / "maps.npz") as arrays:
        older = {name: arrays[name] for name in arrays.files if name not in ("target_asked", "rule")}
    np.savez(first.folder / "maps.npz", **older)
    (again,) = OcclusionJob(embedded, stride=4, out=out).run([images / FEW[0]]).results
    assert not again.resumed
    with np.load(again.folder / "maps.npz") as arrays:
        assert str(arrays["target_asked"]) == "auto" and str(arrays["rule"]) == "deconvnet"


def test_a_run_where_every_file_fails_still_writes_an_empty_summary(embedded, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    done = OcclusionJob(embedded, stride=4, out=tmp_path / "out").run([broken])
    assert not done.results and [f.path for f in done.failures] == [broken]
    assert (done.folder / "summary.csv").read_text().splitlines() == [
        "image,target,target_name,prob_clean,prob_min,prob_min_y,prob_min_x,other_class,other_name,other_fraction"]


def test_a_rerun_leaves_no_figures_of_the_channels_it_no_longer_covers(embedded, images, tmp_path):
    out = tmp_path / "out"
    (wide,) = ProjectJob(embedded, 2, k=2, channels="0-5", out=out).run([images])
    assert len(list(wide.folder.glob("ch*.png"))) > 2
    (narrow,) = ProjectJob(embedded, 2, k=2, channels="4-5", out=out).run([images])
    assert sorted(p.name for p in narrow.folder.glob("ch*.png")) == [
        f"ch{c:03d}.png" for c, hits in sorted(narrow.hits.items()) if hits]
    DeconvJob(embedded, 5, top=3, out=out).run([images / FEW[0]])
    (one,) = DeconvJob(embedded, 5, top=1, out=out).run([images / FEW[0]]).results
    assert sorted(one.figure.parent.glob("layer5_ch*.npz")) == one.arrays


def test_deconv_job_refuses_a_top_that_would_do_nothing(embedded):
    with pytest.raises(VizDeconvError, match="with a channel given there is only that one"):
        DeconvJob(embedded, 5, top=3, channel=2)


def test_a_manifest_keeps_earlier_figures_that_are_still_there(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"png")
    save_manifest(tmp_path, "filters", "t", [{"png": "a.png", "caption": "old a"}, {"png": "b.png"},
                                             {"png": "gone.png"}], [])
    (tmp_path / "c.png").write_bytes(b"png")
    save_manifest(tmp_path, "filters", "t", [{"png": "c.png"}, {"png": "a.png", "caption": "new a"}],
                  [ImageError(tmp_path / "x.png", "broken")])
    index = json.loads((tmp_path / "index.json").read_text())
    # a replaced, b kept, gone.png dropped (its file is not there), c added; in file order
    assert index["figures"] == [{"png": "a.png", "caption": "new a"}, {"png": "b.png"}, {"png": "c.png"}]
    assert index["kind"] == "filters" and [f["reason"] for f in index["failed"]] == ["broken"]


def test_no_layer_slug_can_take_a_job_folder():
    """Project writes OUT/<layer slug>: a module named like another job's folder must not land in it."""
    folders = {job.FOLDER for job in (deconv, evolution, filters, occlude)}
    module = nn.Sequential()
    for name in sorted(folders):
        module.add_module(name, nn.Conv2d(1, 1, 1))
    layers = trace_layers(wrap(module, (1, 4, 4)))
    assert {layers.layer(name).slug for name in folders} == {f"module-{name}" for name in folders}
