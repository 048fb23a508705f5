"""Hooks come and go cleanly, the model is left exactly as it was, switches are max-pool's own."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from oracles import Residual, SharedReLU, hook_count, point_output, wrap

from vizdeconv.deconvnet import Deconvnet
from vizdeconv.layers import trace_layers
from vizdeconv.models import LoadedModel
from vizdeconv.switches import PointRecorder, SwitchRecorder, record_points


def test_switches_are_max_pool_indices_and_activations_survive_inplace_relu(alexnet):
    layers = trace_layers(alexnet)
    chain, layer = layers.chain, layers.layer(5)
    images = torch.randn(2, 3, 224, 224)
    with SwitchRecorder(chain, layer.chain_index) as recorder:
        forward = recorder.forward(images)
    x = images
    expected_switches = {}
    for step in chain.steps[: layer.chain_index + 1]:
        if isinstance(step.module, torch.nn.MaxPool2d):
            _, expected_switches[step.index] = F.max_pool2d(x, 3, 2, return_indices=True)
        x = step.module(x)
    assert forward.switches.keys() == expected_switches.keys() == {2, 5}
    for index, switches in expected_switches.items():
        assert torch.equal(forward.switches[index], switches)
    assert torch.equal(forward.activations, x)
    # features.11 is an in-place ReLU followed by max-pool; the pre-ReLU conv output is kept intact too.
    with SwitchRecorder(chain, layers.layer("features.10").chain_index) as recorder:
        conv = recorder.forward(images).activations
    assert conv.min() < 0


def test_full_forward_records_too(alexnet):
    layers = trace_layers(alexnet)
    layer = layers.layer(3)
    images = torch.randn(1, 3, 224, 224)
    with SwitchRecorder(layers.chain, layer.chain_index) as recorder:
        with torch.no_grad():
            alexnet.module(images)
        first = recorder.recorded.activations
        forward = recorder.forward(images)
    assert torch.equal(first, forward.activations)


def test_hooks_removed_and_model_unchanged_after_success_and_error(alexnet):
    layers = trace_layers(alexnet)
    chain, index = layers.chain, layers.layer(5).chain_index
    before = copy.deepcopy(alexnet.module.state_dict())
    inplace = [m.inplace for m in alexnet.module.modules() if isinstance(m, torch.nn.ReLU)]
    assert hook_count(alexnet.module) == 0
    with SwitchRecorder(chain, index) as recorder:
        assert hook_count(alexnet.module) > 0
        recorder.forward(torch.randn(1, 3, 224, 224))
    assert hook_count(alexnet.module) == 0
    with pytest.raises(RuntimeError):
        with SwitchRecorder(chain, index) as recorder:
            recorder.forward(torch.randn(1, 5, 224, 224))  # wrong channel count: conv1 raises
    assert hook_count(alexnet.module) == 0
    after = alexnet.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert inplace == [m.inplace for m in alexnet.module.modules() if isinstance(m, torch.nn.ReLU)]
    assert not alexnet.module.training


def test_point_recorder_and_the_general_path_leave_no_hook_and_the_model_unchanged():
    torch.manual_seed(9)
    model = wrap(Residual(), (2, 12, 12))
    layers = trace_layers(model)
    layer = layers.layer("relu@2")
    before = copy.deepcopy(model.module.state_dict())
    images = torch.randn(2, 2, 12, 12)
    with PointRecorder(model.module, layer.point) as recorder:
        assert hook_count(model.module) > 0
        assert torch.equal(recorder.run(images), point_output(model, layer, images))
    assert hook_count(model.module) == 0
    for rule in ("deconvnet", "guided"):
        deconvnet = Deconvnet(model, layers, layer, rule=rule)
        assert not deconvnet.walks
        deconvnet.project(deconvnet.forward(images), torch.tensor([[0, 1, 2, 3]]))
        with pytest.raises(RuntimeError):
            deconvnet.forward(torch.randn(1, 3, 12, 12))  # wrong channel count: the stem raises
        assert hook_count(model.module) == 0
    with pytest.raises(RuntimeError):
        with PointRecorder(model.module, layer.point) as recorder:
            recorder.run(torch.randn(1, 3, 12, 12))
    assert hook_count(model.module) == 0
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.module.relu.inplace and not model.module.training
    # the rules are gone too: a ReLU's backward after the errors is the ordinary gradient again
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    (grad,) = torch.autograd.grad(model.module.relu(x.clone()).sum(), x)
    assert grad.tolist() == [0.0, 1.0]


def test_point_recorder_records_one_call_of_a_shared_module():
    torch.manual_seed(4)
    model = wrap(SharedReLU(), (2, 21, 21))
    layers = trace_layers(model)
    images = torch.randn(2, 2, 21, 21)
    for name in ("relu@1", "relu@2", "relu@3"):
        layer = layers.layer(name)
        with PointRecorder(model.module, layer.point) as recorder:
            assert torch.equal(recorder.run(images), point_output(model, layer, images))
            with torch.no_grad():
                model.module(images)  # the whole model: the output stays the recorded call's
            assert torch.equal(recorder.output, point_output(model, layer, images))


def test_a_shared_module_is_matched_to_the_right_call_with_or_without_switches():
    torch.manual_seed(4)
    model = LoadedModel("shared", "random", SharedReLU().eval(), None, (2, 21, 21), (0.0,) * 2, (1.0,) * 2, ())
    layers = trace_layers(model)
    chain, layer = layers.chain, layers.layer(2)  # the second call of the shared ReLU
    assert layer.name == "relu@2"
    images = torch.randn(2, 2, 21, 21)
    expected = images
    for step in chain.steps[: layer.chain_index + 1]:
        expected = step.module(expected)
    with SwitchRecorder(chain, layer.chain_index) as recorder:
        assert torch.equal(recorder.forward(images).activations, expected)
    assert torch.equal(record_points(model.module, [layer.point], images)[0], expected)  # no switches: the scan's path
