"""The deconvnet on any graph: autograd with each rectifier's backward replaced by the rule.

Springenberg et al. 2014 ("Striving for Simplicity") show that Zeiler & Fergus's deconvnet is
backprop in which every ReLU's backward is ``relu(R)``; max-pool's backward already routes through
the switches, a sum's copies to each branch, concatenation's splits. ``apply_rules`` intercepts
every call of a rectifier while a model runs (``nn.ReLU`` and ``nn.ReLU6`` modules, ``F.relu``,
``torch.relu``, ``Tensor.relu``, in-place forms, ``F.relu6``, ``hardtanh(0, 6)``), so functional
rectifiers are not missed, and swaps in the rule's backward; ops the table marks ``skipped``
(local response normalisation, as in the paper) pass the signal unchanged. The model itself is
never changed.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from vizdeconv import ops
from vizdeconv.errors import VizDeconvError


class _Rectifier(torch.autograd.Function):
    """``clamp(x, 0, upper)`` going up; going down ``relu(R)``, times the forward mask for ``guided``."""

    @staticmethod
    def forward(ctx, x, upper, rule):
        if rule == "guided":
            ctx.save_for_backward((x > 0) if upper is None else (x > 0) & (x < upper))
        ctx.rule = rule
        return x.clamp(min=0) if upper is None else x.clamp(0, upper)

    @staticmethod
    def backward(ctx, signal):
        rectified = signal.clamp(min=0)
        if ctx.rule == "guided":
            rectified = rectified * ctx.saved_tensors[0]
        return rectified, None, None


class apply_rules(TorchFunctionMode):
    """Inside ``with apply_rules(rule):`` every rectifier's backward follows ``rule``.

    Args:
        rule: ``deconvnet`` (``relu(R)``), ``guided`` (``1[f>0]·relu(R)``) or ``gradient``
            (``1[f>0]·R``, plain backprop).
    """

    def __init__(self, rule: str = "deconvnet") -> None:
        super().__init__()
        check_rule(rule)
        self.rule = rule

    def __torch_function__(self, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rule == "gradient":
            return function(*args, **kwargs)
        op = ops.for_call(function, args, kwargs)
        if op is None or op.kind not in ("rectifier", "skipped"):
            return function(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        if op.kind == "skipped":  # LRN (and dropout, the identity in eval)
            return x + (function(*args, **kwargs) - x).detach()  # the op's value, the identity's backward
        y = _Rectifier.apply(x, ops.rectifier_limit(op, function, args, kwargs), self.rule)
        return x.copy_(y) if ops.is_inplace(function, kwargs) else y


def check_rule(rule: str) -> None:
    if rule not in ops.RULES:
        raise VizDeconvError(f"unknown rule {rule!r}; expected one of {', '.join(ops.RULES)}")
