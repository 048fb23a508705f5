"""Hooks come and go cleanly, the model is left exactly as it was, switches are max-pool's own."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vizdeconv.layers import trace_chain
from vizdeconv.switches import SwitchRecorder


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_switches_are_max_pool_indices_and_activations_survive_inplace_relu(alexnet):
    chain = trace_chain(alexnet)
    layer = chain.layer(5)
    images = torch.randn(2, 3, 224, 224)
    with SwitchRecorder(chain, layer) as recorder:
        forward = recorder.forward(images)
    x = images
    expected_switches = {}
    for step in chain.steps[: layer.step.index + 1]:
        if isinstance(step.module, torch.nn.MaxPool2d):
            _, expected_switches[step.index] = F.max_pool2d(x, 3, 2, return_indices=True)
        x = step.module(x)
    assert forward.switches.keys() == expected_switches.keys() == {2, 5}
    for index, switches in expected_switches.items():
        assert torch.equal(forward.switches[index], switches)
    assert torch.equal(forward.activations, x)
    # features.11 is an in-place ReLU followed by max-pool; the pre-ReLU conv output is kept intact too.
    with SwitchRecorder(chain, chain.layer("features.10")) as recorder:
        conv = recorder.forward(images).activations
    assert conv.min() < 0


def test_full_forward_records_too(alexnet):
    chain = trace_chain(alexnet)
    layer = chain.layer(3)
    images = torch.randn(1, 3, 224, 224)
    with SwitchRecorder(chain, layer) as recorder:
        with torch.no_grad():
            alexnet.module(images)
        first = recorder.recorded.activations
        forward = recorder.forward(images)
    assert torch.equal(first, forward.activations)


def test_hooks_removed_and_model_unchanged_after_success_and_error(alexnet):
    chain = trace_chain(alexnet)
    before = copy.deepcopy(alexnet.module.state_dict())
    inplace = [m.inplace for m in alexnet.module.modules() if isinstance(m, torch.nn.ReLU)]
    assert hook_count(alexnet.module) == 0
    with SwitchRecorder(chain, chain.layer(5)) as recorder:
        assert hook_count(alexnet.module) > 0
        recorder.forward(torch.randn(1, 3, 224, 224))
    assert hook_count(alexnet.module) == 0
    with pytest.raises(RuntimeError):
        with SwitchRecorder(chain, chain.layer(5)) as recorder:
            recorder.forward(torch.randn(1, 5, 224, 224))  # wrong channel count: conv1 raises
    assert hook_count(alexnet.module) == 0
    after = alexnet.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert inplace == [m.inplace for m in alexnet.module.modules() if isinstance(m, torch.nn.ReLU)]
    assert not alexnet.module.training


def test_a_shared_module_is_matched_to_the_right_call_with_or_without_switches():
    from test_deconv import SharedReLU
    from vizdeconv.models import LoadedModel

    torch.manual_seed(4)
    model = LoadedModel("shared", "random", SharedReLU().eval(), None, (2, 21, 21), (0.0,) * 2, (1.0,) * 2, ())
    chain = trace_chain(model)
    layer = chain.layer(2)  # the second call of the shared ReLU
    images = torch.randn(2, 2, 21, 21)
    expected = images
    for step in chain.steps[: layer.step.index + 1]:
        expected = step.module(expected)
    for switches in (True, False):
        with SwitchRecorder(chain, layer, switches=switches) as recorder:
            assert torch.equal(recorder.forward(images).activations, expected)
