"""Scans at scale: several layers in one pass, resuming an interrupted scan, and torchrun ranks,
each checked against the plain single-process, single-layer, uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import FASHION

from vizdeconv.jobs.occlude import OcclusionJob
from vizdeconv.jobs.project import ProjectJob
from vizdeconv.resume import SettingsChanged
from vizdeconv.topk import TopK, project_hits

BIN = Path(sys.executable).parent


@pytest.fixture()
def folder(tmp_path):
    """37 files (not a multiple of 2 ranks × 16): the 20 samples, 15 exact copies (ties between
    files) and two bad files."""
    folder = tmp_path / "in"
    folder.mkdir()
    samples = sorted(FASHION.glob("*.png"))
    for sample in samples:
        shutil.copy(sample, folder / sample.name)
    for sample in samples[:15]:
        shutil.copy(sample, folder / f"copy_{sample.name}")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "m_truncated.png").write_bytes(samples[0].read_bytes()[:60])
    return folder


def written(out: Path) -> dict[str, bytes]:
    """Every result file under ``out`` (the report page aside, which lists the folder's other runs)."""
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(out.rglob("*"))
            if path.is_file() and path.name != "index.html"}


def test_several_layers_in_one_pass_equal_separate_runs(embedded, folder, tmp_path):
    together = ProjectJob(embedded, "5,2", k=3, channels="0-5", out=tmp_path / "together").run([folder])
    assert [report.layer.number for report in together] == [2, 5]  # graph order
    for layer in (2, 5):
        ProjectJob(embedded, layer, k=3, channels="0-5", out=tmp_path / "separate").run([folder])
    assert written(tmp_path / "together") == written(tmp_path / "separate")
    assert {path for path in written(tmp_path / "together") if path.endswith("index.json")} == {
        "layer2/index.json", "layer5/index.json"}


def test_projections_do_not_depend_on_batch_size_or_which_channels_are_drawn(embedded, folder, tmp_path):
    """What lets ranks draw different channels: each projection depends only on its image and its hits."""
    ProjectJob(embedded, "1,4", k=4, channels="0-7", out=tmp_path / "one", batch_size=1).run([folder])
    ProjectJob(embedded, "1,4", k=4, channels="0-7", out=tmp_path / "many", batch_size=48).run([folder])
    assert written(tmp_path / "one") == written(tmp_path / "many")
    found = [{c: hits for c, hits in report.hits.items()} for report in
             ProjectJob(embedded, "1,4", k=4, channels="0-7", out=tmp_path / "x").run([folder])]
    job = ProjectJob(embedded, "1,4", k=4, channels="0-7", out=tmp_path / "x")
    every = {(i, p.hit): p.pixels for i, r in project_hits(job.deconvnets, found, []) for p in r.projections}
    some = {(i, p.hit): p.pixels for i, r in project_hits(job.deconvnets, found, [], only={(0, 3), (1, 5)},
                                                             batch_size=5) for p in r.projections}
    assert some and {key[1].channel for key in some} == {3, 5}
    assert all(torch.equal(pixels, every[key]) for key, pixels in some.items())


class Killed(Exception):
    """The injected fault: the process dies in the middle of a chunk."""


def test_a_killed_scan_resumes_to_the_same_files(embedded, folder, tmp_path, monkeypatch):
    ProjectJob(embedded, "2,5", k=3, channels="0-7", out=tmp_path / "whole").run([folder])
    out = tmp_path / "resumed"
    update, calls = TopK.update, []

    def dies_in_the_third_chunk(self, activations, ranks):
        calls.append(len(ranks))
        if len(calls) == 5:  # two layers per chunk: chunks 1 and 2 are folded in, chunk 3 half-way
            raise Killed
        update(self, activations, ranks)

    monkeypatch.setattr(TopK, "update", dies_in_the_third_chunk)
    with pytest.raises(Killed):
        ProjectJob(embedded, "2,5", k=3, channels="0-7", out=out, checkpoint_every=16).run([folder])
    (state,) = (out / ".scan").rglob("*.safetensors")
    monkeypatch.setattr(TopK, "update", update)

    with pytest.raises(SettingsChanged, match=r"k: 3 then, 4 now.*--restart"):
        ProjectJob(embedded, "2,5", k=4, channels="0-7", out=out).run([folder])
    assert state.exists()  # nothing discarded without --restart

    resumed_from = []
    ProjectJob(embedded, "2,5", k=3, channels="0-7", out=out).run(
        [folder], progress=lambda stage, done, total: resumed_from.append(done) if stage.startswith("scan") else None)
    assert resumed_from[0] == 32  # two chunks were not scanned again
    assert not state.exists()
    assert written(out) == written(tmp_path / "whole")


def test_restart_discards_a_checkpoint_from_other_settings(embedded, folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    update, calls = TopK.update, []

    def dies_in_the_second_chunk(self, activations, ranks):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        update(self, activations, ranks)

    monkeypatch.setattr(TopK, "update", dies_in_the_second_chunk)
    with pytest.raises(Killed):
        ProjectJob(embedded, 2, k=3, channels="0-3", out=out, checkpoint_every=16).run([folder])
    monkeypatch.undo()
    shutil.copy(FASHION / "test00000_ankle-boot.png", folder / "z_new.png")  # the file list changed
    with pytest.raises(SettingsChanged, match="files: 37 files"):
        ProjectJob(embedded, 2, k=3, channels="0-3", out=out).run([folder])
    (report,) = ProjectJob(embedded, 2, k=3, channels="0-3", out=out, restart=True).run([folder])
    assert report.scanned == 36 and not list((out / ".scan").rglob("*.safetensors"))


def torchrun(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 --no-python vizdeconv …`` on Gloo (CPU)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                           str(BIN / "vizdeconv"), *arguments, "--device", "cpu"],
                          cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def test_two_torchrun_ranks_write_what_one_process_writes(embedded, folder, tmp_path):
    single = ProjectJob(embedded, "2,5", k=4, channels="0-7", out=tmp_path / "single").run([folder])
    ran = torchrun("project", "--layer", "2,5", "--top", "4", "--channels", "0-7", "--images", str(folder),
                   "--out", str(tmp_path / "ranks"), cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr  # 1: the two bad files failed, the rest was scanned
    assert written(tmp_path / "ranks") == written(tmp_path / "single")
    failed = json.loads((tmp_path / "ranks" / "layer2" / "index.json").read_text())["failed"]
    assert [Path(f["image"]).name for f in failed] == ["broken.png", "m_truncated.png"]
    assert [f.path.name for f in single[0].failures] == ["broken.png", "m_truncated.png"]
    assert ran.stdout.count("channels fired") == 2  # rank 0 speaks for the job
    ties = [hit for hits in single[0].hits.values() for hit in hits if hit.image.name.startswith("copy_")]
    assert ties, "the copies should tie with their originals somewhere"


def test_two_torchrun_ranks_share_occlusion(embedded, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for sample in sorted(FASHION.glob("*.png"))[:3]:
        shutil.copy(sample, images / sample.name)
    (images / "broken.png").write_bytes(b"not a png")
    OcclusionJob(embedded, size=8, stride=4, out=tmp_path / "single", batch_size=16).run([images])
    ran = torchrun("occlude", "--size", "8", "--stride", "4", "--batch-size", "16", str(images),
                   "--out", str(tmp_path / "ranks"), cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr
    single, ranks = written(tmp_path / "single"), written(tmp_path / "ranks")
    assert single.keys() == ranks.keys()
    for name in single:  # zip archives hold their time of writing: compare what the .npz files hold
        if name.endswith(".npz"):
            with np.load(tmp_path / "single" / name) as one, np.load(tmp_path / "ranks" / name) as other:
                assert one.files == other.files and all(np.array_equal(one[k], other[k]) for k in one.files)
        else:
            assert single[name] == ranks[name], name
    assert (tmp_path / "ranks" / "occlusion" / "summary.csv").read_text().count("\n") == 4  # header + 3 images
