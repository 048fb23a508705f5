"""`vizdeconv evolution` (paper Fig. 4): each checkpoint's strongest activations against a brute-force
scan of that checkpoint, and their projections against the deconv oracle."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from oracles import hook_count, oracle, point_output, wrap
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from vizdeconv.cli import main
from vizdeconv.embedded import epoch_checkpoints
from vizdeconv.errors import ModelError
from vizdeconv.jobs.evolution import EvolutionJob, checkpoint_files
from vizdeconv.layers import trace_layers
from vizdeconv.models import read_state_dict

SIDE = 16


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 3))


def save_checkpoints(folder: Path, seeds: dict[str, int], silent: str | None = None) -> dict[str, dict]:
    """One random state_dict per name (``.pt`` for names ending in 2, else ``.safetensors``); in ``silent``'s,
    layer 2's channel 0 never fires."""
    folder.mkdir()
    states = {}
    for name, seed in seeds.items():
        torch.manual_seed(seed)
        state = {k: v.clone() for k, v in small_net().state_dict().items()}
        if name == silent:
            state["3.bias"][0] = -1e6
        states[name] = state
        if name.endswith("2"):
            torch.save(state, folder / f"{name}.pt")
        else:
            save_file(state, str(folder / f"{name}.safetensors"))
    return states


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(generator.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_each_checkpoint_matches_a_brute_force_scan_and_the_deconv_oracle(tmp_path, images):
    states = save_checkpoints(tmp_path / "ckpt", {"epoch10": 3, "epoch2": 2, "epoch1": 1}, silent="epoch2")
    model = wrap(small_net(), (1, SIDE, SIDE))
    job = EvolutionJob(model, [tmp_path / "ckpt"], "1,2", channels="0-3", out=tmp_path / "out", batch_size=4)
    reports = job.run([images])
    paths = sorted(images.iterdir())
    pictures = torch.stack([model.preprocess(Image.open(p)) for p in paths])
    for report in reports:
        assert report.checkpoints == ["epoch1", "epoch2", "epoch10"]  # natural order, not epoch1, epoch10, epoch2
        saved = json.loads(report.data.read_text())
        assert saved["checkpoints"] == report.checkpoints and saved["layer"] == report.layer.number
        for c, name in enumerate(report.checkpoints):
            module = small_net().eval()
            module.load_state_dict(states[name])
            reference = wrap(module, (1, SIDE, SIDE))
            layers = trace_layers(reference)
            layer = layers.layer(report.layer.number)
            activations = point_output(reference, layer, pictures)
            for channel, entries in report.projections.items():
                written = next(e for e in saved["channels"] if e["channel"] == channel)["per_checkpoint"][c]
                values = activations[:, channel].flatten(1)
                best = values.max(1).values.argmax().item()
                if values.max() <= 0:  # never fired: nothing to project
                    assert entries[c] is None and written["image"] is None and written["value"] is None
                    continue
                hit = entries[c].hit
                assert hit.image == paths[best]
                assert hit.value == pytest.approx(values.max().item(), rel=1e-5)
                assert hit.position == divmod(values[best].argmax().item(), activations.shape[3])
                assert written == {"checkpoint": name, "image": os.path.abspath(paths[best]), "value": hit.value,
                                   "position": list(hit.position), "box": list(hit.box)}
                expected = oracle(layers.chain, layer, pictures[best], (0, channel, *hit.position))
                torch.testing.assert_close(entries[c].pixels, expected, rtol=1e-4, atol=1e-5)
        assert report.figure.is_file()
    # the silenced channel really was silent at epoch2, and only there
    assert reports[1].projections[0][1] is None and reports[1].projections[0][0] is not None


def test_checkpoints_that_do_not_fit_or_are_missing_stop_before_any_work_keeping_earlier_files(tmp_path, images):
    save_checkpoints(tmp_path / "ckpt", {"epoch1": 1})
    model = wrap(small_net(), (1, SIDE, SIDE))
    out = tmp_path / "out"
    EvolutionJob(model, [tmp_path / "ckpt"], 2, out=out).run([images])
    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    other = copy.deepcopy(small_net())
    other[3] = nn.Conv2d(4, 7, 3, padding=1)  # another architecture
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelError, match="other.pt: the weights do not fit"):
        EvolutionJob(model, [tmp_path / "ckpt", tmp_path / "other.pt"], 2, out=out)
    with pytest.raises(ModelError, match="gone.pt: no such checkpoint"):
        EvolutionJob(model, [tmp_path / "ckpt" / "epoch1.safetensors", tmp_path / "gone.pt"], 2, out=out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty: no weights files"):
        checkpoint_files([tmp_path / "empty"])
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == written


def test_the_cli_names_a_checkpoint_of_another_architecture_in_one_line(tmp_path):
    torch.save(small_net().state_dict(), tmp_path / "small.pt")
    result = CliRunner().invoke(main, ["evolution", str(tmp_path / "small.pt"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "small.pt: the weights do not fit the model" in line
    assert not (tmp_path / "out").exists()


def test_evolution_runs_with_no_arguments_on_the_embedded_model(tmp_path, embedded, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "vizdeconv-out"
    result = CliRunner().invoke(main, ["evolution"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shipped = sorted(path.stem for path in epoch_checkpoints().iterdir() if path.suffix == ".safetensors")
    expected = ["epoch1", "epoch2", "epoch5", "epoch10", "epoch25"]
    assert sorted(shipped) == sorted(expected)
    for slug in ("layer1", "layer2", "layer3", "layer4", "layer5"):
        saved = json.loads((out / "evolution" / f"{slug}.json").read_text())
        assert saved["checkpoints"] == expected and [c["channel"] for c in saved["channels"]] == list(range(8))
        assert Image.open(out / "evolution" / f"{slug}.png").width > 5 * 96
    index = json.loads((out / "evolution" / "index.json").read_text())
    assert index["kind"] == "evolution" and [f["png"] for f in index["figures"]] == [f"layer{n}.png" for n in range(1, 6)]
    assert "evolution/layer5.png" in (out / "index.html").read_text()


def test_the_last_shipped_checkpoint_is_the_embedded_model_in_half_precision(embedded):
    final = read_state_dict(epoch_checkpoints() / "epoch25.safetensors")
    shipped = embedded.module.state_dict()
    assert final.keys() == shipped.keys()
    for name, weights in shipped.items():
        assert final[name].dtype == torch.float16
        torch.testing.assert_close(final[name], weights.cpu().half(), rtol=0, atol=0, msg=name)


def test_layers_named_by_digits_are_the_layers_asked_for_and_the_users_model_is_untouched(tmp_path, images):
    """In a Sequential without pooling, numbered layer 2 is the module named "3" and layer 3 the one
    named "5": each must still be scanned as itself. The user's model keeps its weights and no hooks."""
    def net():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Conv2d(5, 6, 3),
                             nn.ReLU(), nn.Flatten(), nn.Linear(6 * 10 * 10, 2))

    torch.manual_seed(7)
    (tmp_path / "ckpt").mkdir()
    torch.save(net().state_dict(), tmp_path / "ckpt" / "e1.pt")
    model = wrap(net(), (1, SIDE, SIDE))
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    reports = EvolutionJob(model, [tmp_path / "ckpt"], channels="0-3", out=tmp_path / "out").run([images])
    assert [(r.layer.number, r.layer.name) for r in reports] == [(1, "1"), (2, "3"), (3, "5")]
    checkpoint = net().eval()
    checkpoint.load_state_dict(torch.load(tmp_path / "ckpt" / "e1.pt"))
    pictures = torch.stack([model.preprocess(Image.open(p)) for p in sorted(images.iterdir())])
    reference = wrap(checkpoint, (1, SIDE, SIDE))
    for report in reports:
        best = point_output(reference, report.layer, pictures).amax((0, 2, 3))
        for channel, (projection,) in report.projections.items():
            assert (projection is None) == (best[channel] <= 0)
            if projection is not None:
                assert projection.hit.value == pytest.approx(best[channel].item(), rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    assert hook_count(model.module) == 0


def test_a_corrupt_checkpoint_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"hello world")
    result = CliRunner().invoke(main, ["evolution", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "bad.pt: not a readable checkpoint" in line
