"""One table of the operations vizdeconv knows: what the deconvnet does with each on the way down,
how it moves receptive fields and how occlusion treats it.

The deconvnet on any graph is backprop with each rectifier's backward replaced (Springenberg et al.
2014): max-pool's backward is unpooling through the switches, a sum's is a copy to each branch,
concatenation's a split, eval BatchNorm's its scale. ``rules`` applies the rectifier rules to a
forward pass; ``graph`` reads the geometry; ``layers``, the error messages and the chain walk read
the names and rule texts. Supporting a new operation is one entry in ``OPS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RULES = ("deconvnet", "guided", "gradient")
RULE_TEXT = {
    "deconvnet": "relu(R): the signal itself is rectified (Zeiler & Fergus)",
    "guided": "1[f>0]·relu(R): forward mask and rectified signal (Springenberg et al.)",
    "gradient": "1[f>0]·R: plain backprop",
}

Geometry = tuple[int, int, int, int]  # kernel, stride, padding before, dilation (one axis)


SPREAD = {"local": "local", "max-pool": "local", "global": "global"}  # op kind → Op.occlusion; others pointwise


@dataclass(frozen=True)
class Op:
    """One operation.

    Attributes:
        name: shown in ``layers`` and in messages.
        kind: ``rectifier``, ``max-pool``, ``local`` (linear and spatial: conv, average pool, pad),
            ``pointwise`` (spatially), ``skipped`` (identity on the way down), ``global`` (mixes the
            whole map), ``shape`` (moves values without mixing positions).
        down: what the deconvnet does with it on the way down.
        functions: the torch callables that perform it (as a ``TorchFunctionMode`` sees them).
        modules: module types (exact) whose forward is this op alone, for the chain walk.
        geometry: for local ops, ``(call args, kwargs, axis) -> Geometry``.
    """

    name: str
    kind: str
    down: str
    functions: tuple = ()
    modules: tuple = ()
    geometry: Callable[..., Geometry] | None = None

    @property
    def occlusion(self) -> str:
        """``pointwise``, ``local`` or ``global``: how far a change in the op's input spreads."""
        return SPREAD.get(self.kind, "pointwise")


def _pair(value, axis: int) -> int:
    return value[axis] if isinstance(value, (tuple, list)) else value


def window_geometry(kernel, stride, padding, dilation, axis: int) -> Geometry:
    """Normalise one axis of a conv's or pool's arguments (``'same'`` and ``'valid'`` padding too)."""
    kernel, dilation = _pair(kernel, axis), _pair(dilation, axis)
    stride = _pair(stride, axis) if stride not in (None, (), []) else kernel
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = dilation * (kernel - 1) // 2
    return kernel, stride, _pair(padding, axis), dilation


def argument(args, kwargs, index: int, name: str, default):
    """A call's argument by position or by name."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def _conv_geometry(args, kwargs, axis):
    weight = argument(args, kwargs, 1, "weight", None)
    return window_geometry(tuple(weight.shape[2:]), argument(args, kwargs, 3, "stride", 1),
                           argument(args, kwargs, 4, "padding", 0), argument(args, kwargs, 5, "dilation", 1), axis)


def _pool_geometry(args, kwargs, axis, dilation=1):
    return window_geometry(argument(args, kwargs, 1, "kernel_size", None), argument(args, kwargs, 2, "stride", None),
                           argument(args, kwargs, 3, "padding", 0), dilation, axis)


def _max_pool_geometry(args, kwargs, axis):
    return _pool_geometry(args, kwargs, axis, argument(args, kwargs, 4, "dilation", 1))


def _pad_geometry(args, kwargs, axis):
    pads = argument(args, kwargs, 1, "pad", ())
    # F.pad lists (left, right, top, bottom, …) from the last dimension backwards.
    before = pads[2 * (1 - axis)] if len(pads) > 2 * (1 - axis) else 0
    return 1, 1, before, 1


def _functions(*names: str, namespaces=(torch, F, torch.Tensor)) -> tuple:
    found = []
    for name in names:
        for space in namespaces:
            if callable(getattr(space, name, None)):  # not torch.float, a dtype
                found.append(getattr(space, name))
    return tuple(dict.fromkeys(found))


# Python's operators reach a TorchFunctionMode by these names (x + y as add, 1 - x as __rsub__, x @ y as matmul).
ELEMENTWISE_ARITHMETIC = ("add", "add_", "sub", "sub_", "__rsub__", "neg", "neg_")
PRODUCTS = ("mul", "mul_", "div", "div_", "__rdiv__")
REDUCTIONS = ("mean", "sum")
NONLINEAR = ("gelu", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "sigmoid", "sigmoid_",
             "tanh", "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "softplus", "mish", "prelu",
             "pow")
SHAPE = ("view", "reshape", "flatten", "permute", "transpose", "contiguous", "clone", "chunk", "split", "__getitem__",
         "unsqueeze", "squeeze", "expand", "expand_as", "narrow", "select", "to", "float", "type_as")

OPS: tuple[Op, ...] = (
    Op("relu", "rectifier", "rectifier rule (--rule)",
       _functions("relu", "relu_"), (nn.ReLU,)),
    Op("relu6", "rectifier", "rectifier rule (--rule); clipped at 6 (or hardtanh's max) going up",
       (F.relu6, F.hardtanh, F.hardtanh_, torch._C._nn.relu6, torch._C._nn.hardtanh, torch._C._nn.hardtanh_),
       (nn.ReLU6,)),
    Op("hardtanh", "pointwise", "its ordinary local gradient (a hardtanh whose minimum is not 0)"),
    Op("conv2d", "local", "transposed conv with the same weights, no bias", (torch.conv2d,), (nn.Conv2d,),
       _conv_geometry),
    Op("max_pool2d", "max-pool", "unpooled through the switches (overlapping windows add up)",
       (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d), (nn.MaxPool2d,), _max_pool_geometry),
    Op("avg_pool2d", "local", "its transpose (spread evenly over the window)",
       (F.avg_pool2d,), (nn.AvgPool2d,), _pool_geometry),
    Op("pad", "local", "cropped (the transpose of padding)", (F.pad, torch._C._nn.pad), (nn.ZeroPad2d,),
       _pad_geometry),
    Op("batch_norm", "pointwise", "scaled by γ/√(σ²+ε) (eval statistics)", (F.batch_norm,), (nn.BatchNorm2d,)),
    Op("local_response_norm", "skipped", "skipped, as in the paper (plain gradient with --rule gradient)",
       (F.local_response_norm,), (nn.LocalResponseNorm,)),
    Op("dropout", "skipped", "identity (eval; nn.Identity too)",
       (F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout), (nn.Dropout, nn.Identity)),
    Op("add", "pointwise", "copied to each branch (residual sums)", _functions(*ELEMENTWISE_ARITHMETIC)),
    Op("product", "pointwise", "local gradient: each factor's signal scaled by the other factor", _functions(*PRODUCTS)),
    Op("nonlinearity", "pointwise", "its ordinary local gradient (not rectified)",
       _functions(*NONLINEAR, namespaces=(torch, F, torch.Tensor, torch._C._nn)),
       (nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh)),
    Op("cat", "pointwise", "split between the inputs", (torch.cat, torch.concat)),
    Op("reshape", "shape", "reshaped back", _functions(*SHAPE)),
    Op("adaptive_avg_pool2d", "global", "its transpose (spread over the map)",
       (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d), (nn.AdaptiveAvgPool2d,)),
    Op("adaptive_max_pool2d", "global", "unpooled through the switches",
       (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices), (nn.AdaptiveMaxPool2d,)),
    Op("reduce", "global", "spread evenly over the reduced positions", _functions(*REDUCTIONS)),
    Op("layer_norm", "global", "its local gradient (pointwise when it normalises channels only)", (F.layer_norm,)),
    Op("linear", "global", "transposed weights", (F.linear, torch.matmul, torch.Tensor.matmul), (nn.Linear,)),
    Op("softmax", "global", "its local gradient", _functions("softmax", "log_softmax")),
)

BY_FUNCTION: dict = {function: op for op in OPS for function in op.functions}
BY_MODULE: dict = {module: op for op in OPS for module in op.modules}
HARDTANH = next(op for op in OPS if op.name == "hardtanh")
# Calls that make constants from a tensor (its shape, dtype): not operations on its values.
IGNORED_NAMES = frozenset({"zeros_like", "ones_like", "empty_like", "new_zeros", "new_ones", "new_empty", "new_full",
                           "new_tensor", "size", "dim", "numel", "stride", "item", "tolist"})


def for_call(function, args=(), kwargs=None) -> Op | None:
    """The op a call performs, or None if vizdeconv has no rule for it (a hardtanh is a clipped
    rectifier only when its minimum is 0)."""
    op = BY_FUNCTION.get(function)
    if op is not None and op.name == "relu6" and _hardtanh_limits(function, args, kwargs or {})[0] != 0:
        return HARDTANH
    return op


def for_module(module: nn.Module) -> Op | None:
    """The op a module performs by itself, exactly as the table describes it, or None: exact types
    only (a subclass may do more), convs that pad with zeros, BatchNorm with running statistics."""
    op = BY_MODULE.get(type(module))
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return None
    if isinstance(module, nn.BatchNorm2d) and (module.running_var is None or module.training):
        return None
    return op


def _hardtanh_limits(function, args, kwargs) -> tuple[float, float]:
    if getattr(function, "__name__", "") in ("relu6", "relu6_"):
        return 0.0, 6.0
    return argument(args, kwargs, 1, "min_val", -1.0), argument(args, kwargs, 2, "max_val", 1.0)


def rectifier_limit(op: Op, function, args, kwargs) -> float | None:
    """A rectifier call's upper limit: None for ReLU, 6 for ReLU6, the max of a ``hardtanh(0, max)``."""
    return None if op.name == "relu" else float(_hardtanh_limits(function, args, kwargs)[1])


def is_inplace(function, kwargs) -> bool:
    """Whether a rectifier call overwrites its input (``relu_``, ``inplace=True``)."""
    return getattr(function, "__name__", "").endswith("_") or bool(kwargs.get("inplace", False))


def module_geometry(module: nn.Module, axis: int) -> Geometry:
    """Kernel, stride, padding and dilation of a conv or pooling module along one axis."""
    return window_geometry(module.kernel_size, module.stride, module.padding, getattr(module, "dilation", 1), axis)


def table() -> list[dict]:
    """Every op and its rule, as ``layers --json`` lists them."""
    return [{"op": op.name, "kind": op.kind, "deconvnet": op.down, "occlusion": op.occlusion} for op in OPS]
