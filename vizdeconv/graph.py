"""Every place of a model a user can project from, found by watching one forward pass.

A point is a module's output (``layer3``, ``layer3.1``, ``features.denseblock2``, ``_blocks.7``);
a module called more than once (ResNet's shared ``relu``) gives one point per call, ``relu@1``,
``relu@2``, …. While the model runs on noise, every torch call is seen (``TorchFunctionMode``):
residual sums, in-place adds, concatenations, ``F.relu``, ``torch.flatten``, ``x.mean((2, 3))``.
Each tensor carries its receptive field, built from the ops table (``ops.py``): local ops grow it,
pointwise ops and sums keep the union of their inputs' fields (the largest over all paths), and
anything that mixes the whole map (global pooling, a squeeze-excitation gate) makes it the whole
image. It also carries the ops below it, so ``layers`` can say how the deconvnet treats them, and
the first call with no rule, so projecting through it fails with its name instead of a wrong picture.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
from torch.overrides import TorchFunctionMode

from vizdeconv import ops
from vizdeconv.errors import LayerError
from vizdeconv.models import LoadedModel


@dataclass(frozen=True)
class Field:
    """Receptive field: unit ``(y, x)`` sees input rows ``y*stride + offset`` … ``+ size - 1`` (columns alike).

    ``stride`` is the jump between neighbouring units in input pixels; ``offset`` can be negative
    (the field starts in the padding). A unit that sees the whole image (after global pooling or a
    squeeze-excitation gate) has stride 0, offset 0 and the image's size.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]

    def window(self, y: int, x: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``, end exclusive, unclipped: it may reach past the image."""
        y0 = y * self.stride[0] + self.offset[0]
        x0 = x * self.stride[1] + self.offset[1]
        return y0, x0, y0 + self.size[0], x0 + self.size[1]

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``window`` clipped to a ``height`` × ``width`` image."""
        y0, x0, y1, x1 = self.window(y, x)
        return max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)

    @property
    def whole_image(self) -> bool:
        return self.stride == (0, 0)


@dataclass(frozen=True)
class Value:
    """What the trace knows of one tensor: its field, where its rows and columns are, what made it."""

    field: Field
    spatial: tuple[int, int] | None  # dimensions holding rows and columns; None once positions are mixed
    below: frozenset[str]
    unknown: str | None = None  # the first call below with no rule


@dataclass(frozen=True)
class Point:
    """A module's output in one forward pass.

    Attributes:
        name: ``layer3``, or ``relu@2`` for the second call of a module called more than once.
        module_name: the module's name in ``named_modules``; ``call``: which call (0-based).
        output_shape: ``(C, H, W)`` (batch left out).
        field: the receptive field of its units.
        below: names of the ops between the input and this point (see ``ops.OPS``).
        unknown: the first call below it that vizdeconv has no rule for, if any.
    """

    name: str
    module_name: str
    call: int
    output_shape: tuple[int, ...]
    field: Field
    below: tuple[str, ...]
    unknown: str | None


@dataclass(frozen=True)
class Graph:
    """The points of a model in the order their modules returned, and its input size."""

    points: tuple[Point, ...]
    input_size: tuple[int, int, int]
    calls: dict[str, int] = field(default_factory=dict)  # module name → calls in one forward pass, in the
    # order the modules first returned
    types: dict[str, str] = field(default_factory=dict)  # module name → class name

    def point(self, name: str) -> Point:
        """Resolve a point name (``layer3``, ``layer1.0.relu@2``).

        Raises:
            LayerError: one line, with the calls of a module called more than once, or the nearest
                valid names.
        """
        for point in self.points:
            if point.name == name:
                return point
        module, _, call = name.partition("@")
        calls = [p.name for p in self.points if p.module_name == module]
        if self.calls.get(module, 0) > 1 and not call and calls:
            raise LayerError(f"{name!r} is called {self.calls[module]} times in one forward pass; pick a call: "
                             + ", ".join(calls))
        if module in self.types and not calls:
            why = "is never called in a forward pass" if module not in self.calls else \
                "has no (C, H, W) output to project from"
            raise LayerError(f"module {module!r} {why}; `vizdeconv layers` lists the layers")
        names = [p.name for p in self.points]
        near = difflib.get_close_matches(name, names, n=5, cutoff=0.5) or list(dict.fromkeys(names[:3] + names[-3:]))
        raise LayerError(f"no layer {name!r}; nearest: {', '.join(near)} (`vizdeconv layers` lists all "
                         f"{len(names)})")


def whole_image(input_size: tuple[int, int, int]) -> Field:
    return Field(tuple(input_size[1:]), (0, 0), (0, 0))


def trace(model: LoadedModel) -> Graph:
    """Run the model once on noise and return every spatial module output with its receptive field."""
    tracer = _Tracer(model.input_size)
    names = {module: name for name, module in model.module.named_modules() if name}
    calls: dict[str, int] = defaultdict(int)
    found: list[Point] = []

    def record(module, inputs, output):
        name = names[module]
        call = calls[name]
        calls[name] += 1
        value = tracer.values.get(id(output)) if isinstance(output, torch.Tensor) else None
        if value is not None and value.spatial == (output.dim() - 2, output.dim() - 1) and output.dim() == 4:
            found.append(Point(name, name, call, tuple(output.shape[1:]), value.field, tuple(sorted(value.below)),
                               value.unknown))

    handles = [module.register_forward_hook(record) for module in names]
    x = torch.randn(1, *model.input_size, device=model.device)
    tracer.start(x)
    try:
        with torch.no_grad(), tracer:
            model.module(x)
    except Exception as error:
        raise LayerError(f"cannot trace {model.name}: its forward pass on a {tuple(x.shape)} input raised "
                         f"{type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
    finally:
        for handle in handles:
            handle.remove()
    points = tuple(_named(point, calls) for point in found)
    return Graph(points, model.input_size, dict(calls), {name: type(m).__name__ for m, name in names.items()})


def _named(point: Point, calls: dict[str, int]) -> Point:
    if calls[point.module_name] == 1:
        return point
    return replace(point, name=f"{point.module_name}@{point.call + 1}")


class _Tracer(TorchFunctionMode):
    """Follows every torch call, keeping a ``Value`` per tensor (by identity; in-place ops overwrite it)."""

    def __init__(self, input_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.whole = whole_image(input_size)
        self.values: dict[int, Value] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique while tracing

    def start(self, x: torch.Tensor) -> None:
        self._set(x, Value(Field((1, 1), (1, 1), (0, 0)), (2, 3), frozenset()))

    def _set(self, tensor: torch.Tensor, value: Value) -> None:
        self.values[id(tensor)] = value
        self._alive.append(tensor)

    def __torch_function__(self, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = function(*args, **kwargs)
        name = getattr(function, "__name__", "")
        inputs = [(t, self.values[id(t)]) for t in tensors((args, kwargs)) if id(t) in self.values]
        outputs = list(tensors(output)) or ([args[0]] if name == "__setitem__" else [])  # x[i] = y writes x
        if not inputs or not outputs or name in ops.IGNORED_NAMES:
            return output
        op = ops.for_call(function, args, kwargs)
        below = frozenset().union(*(v.below for _, v in inputs)) | {op.name if op else name}
        unknown = next((v.unknown for _, v in inputs if v.unknown), None)
        if op is None:
            unknown = unknown or torch.overrides.resolve_name(function) or getattr(function, "__qualname__", name)
        for out in outputs:
            fld, spatial = self._geometry(op, function, args, kwargs, inputs, out)
            self._set(out, Value(fld, spatial, below, unknown))
            base = out._base
            if base is not None and id(base) in self.values and (name.endswith("_") or name == "__setitem__"):
                # A write through a view: where it lands in the base is not followed, so the base's
                # units may now see anything.
                old = self.values[id(base)]
                self._set(base, Value(self.whole, old.spatial, old.below | below, old.unknown or unknown))
        return output

    def _geometry(self, op, function, args, kwargs, inputs, out) -> tuple[Field, tuple[int, int] | None]:
        # The input the output is shaped after: for a broadcast product, the map, not the gate.
        first, value = next(((t, v) for t, v in inputs if t.shape == out.shape and v.spatial is not None),
                            next(((t, v) for t, v in inputs if t.shape == out.shape), inputs[0]))
        if op is None:  # no rule: nothing below can be projected through it, but the points above it exist
            return self.whole, ((out.dim() - 2, out.dim() - 1) if out.dim() == 4 else None)
        if (op.kind == "global" or op.name == "batch_norm") and _mixes_positions(op, function, args, kwargs, first,
                                                                                   value, out):
            return self.whole, (value.spatial if out.shape == first.shape else None)
        if op.geometry is not None:
            last_two = (out.dim() - 2, out.dim() - 1)
            if value.spatial != (first.dim() - 2, first.dim() - 1):
                return self.whole, (last_two if out.dim() == 4 else None)
            if value.field.whole_image or _mixes_anyway(op, function, args, kwargs):
                return self.whole, last_two
            return _grow(value.field, [op.geometry(args, kwargs, axis) for axis in (0, 1)]), last_two
        spatial = _spatial_after(function, args, kwargs, first, value, out)
        if spatial is None:
            return self.whole, None
        sizes = (out.shape[spatial[0]], out.shape[spatial[1]])
        if len(inputs) > 1 and any(v.spatial != spatial or (t.shape[spatial[0]], t.shape[spatial[1]]) != sizes
                                   for t, v in inputs):
            return self.whole, spatial  # a broadcast gate, or maps laid out differently: positions mix
        return _union([v.field for _, v in inputs], self.whole), spatial


def _mixes_anyway(op, function, args, kwargs) -> bool:
    """Calls of a local op that reach past its window: reflect or circular padding."""
    return op.name == "pad" and kwargs.get("mode", args[2] if len(args) > 2 else "constant") not in ("constant",
                                                                                                    "replicate")


def tensors(tree):
    """Every tensor in nested lists, tuples (return types too) and dicts of call arguments or results."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from tensors(item)


def _grow(fld: Field, geometry: list[ops.Geometry]) -> Field:
    size, stride, offset = list(fld.size), list(fld.stride), list(fld.offset)
    for axis, (kernel, step, padding, dilation) in enumerate(geometry):
        size[axis] += dilation * (kernel - 1) * stride[axis]
        offset[axis] -= padding * stride[axis]
        stride[axis] *= step
    return Field(tuple(size), tuple(stride), tuple(offset))


def _union(fields: list[Field], whole: Field) -> Field:
    """The smallest field holding every path's field (all must move with the same stride)."""
    if any(f.whole_image for f in fields) or len({f.stride for f in fields}) > 1:
        return whole
    start = [min(f.offset[a] for f in fields) for a in (0, 1)]
    end = [max(f.offset[a] + f.size[a] for f in fields) for a in (0, 1)]
    return Field((end[0] - start[0], end[1] - start[1]), fields[0].stride, tuple(start))


def _reduced_dims(function, args, kwargs, ndim: int, operand: torch.Tensor) -> set[int]:
    name = getattr(function, "__name__", "")
    if name == "linear":
        return {ndim - 1}
    if name == "matmul":  # the left operand's rows mix along its last dim, the right one's along dim -2
        return {ndim - 1} if args[0] is operand else {ndim - 2}
    if name == "layer_norm":
        shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        return set(range(ndim - len(shape), ndim))
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if dims is None:
        return set(range(ndim))
    return {d % ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}


def _mixes_positions(op, function, args, kwargs, first, value, out) -> bool:
    """Whether a reduction-like op mixes rows or columns (else it acts on channels only)."""
    if value.spatial is None:
        return True
    if op.name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        return out.shape[-2:] != first.shape[-2:]  # to the same size it is the identity
    if op.name == "batch_norm":  # batch statistics mix every position; running statistics do not
        running = args[1] if len(args) > 1 else kwargs.get("running_mean")
        return running is None or bool(args[5] if len(args) > 5 else kwargs.get("training", False))
    return bool(_reduced_dims(function, args, kwargs, first.dim(), first) & set(value.spatial))


def _spatial_after(function, args, kwargs, first: torch.Tensor, value: Value, out: torch.Tensor
                   ) -> tuple[int, int] | None:
    """Where rows and columns are in ``out`` after a pointwise or shape op, or None if they were mixed."""
    if value.spatial is None:
        return None
    name = getattr(function, "__name__", "")
    rows, cols = value.spatial
    ndim = first.dim()
    if name == "permute":
        order = args[1:] if len(args) > 1 and not isinstance(args[1], (tuple, list)) else \
            (args[1] if len(args) > 1 else kwargs["dims"])
        order = [d % ndim for d in order]
        return order.index(rows), order.index(cols)
    if name == "transpose":
        a, b = (d % ndim for d in (list(args[1:3]) or [kwargs["dim0"], kwargs["dim1"]]))
        swap = {a: b, b: a}
        return swap.get(rows, rows), swap.get(cols, cols)
    if name == "__getitem__":
        return _spatial_after_index(args[1], value.spatial, first)
    if name in ("select", "narrow"):
        dim = (args[1] if len(args) > 1 else kwargs["dim"]) % ndim
        if dim in value.spatial:
            return None
        shift = 1 if name == "select" and dim < rows else 0
        return rows - shift, cols - shift
    sizes = (first.shape[rows], first.shape[cols])
    if out.dim() == ndim and (out.shape[rows], out.shape[cols]) == sizes:
        return value.spatial  # same rank, rows and columns in place: pointwise, channel ops
    if value.spatial == (ndim - 2, ndim - 1) and out.dim() >= 2 and tuple(out.shape[-2:]) == sizes:
        return out.dim() - 2, out.dim() - 1  # channels regrouped (view, unsqueeze), positions still last
    return None


def _spatial_after_index(index, spatial: tuple[int, int], first: torch.Tensor) -> tuple[int, int] | None:
    """Rows and columns after ``first[index]``: kept only where the index leaves them whole."""
    ndim = first.dim()
    index = index if isinstance(index, tuple) else (index,)
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in index):
        return None  # tensors, lists, masks: positions may be reordered
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - used) + index[at + 1:]
    else:
        index = index + (slice(None),) * (ndim - used)
    where, dim, kept = {}, 0, 0
    for i in index:
        if i is None:
            kept += 1
            continue
        if isinstance(i, slice):
            if dim in spatial and i.indices(first.shape[dim]) != (0, first.shape[dim], 1):
                return None  # part of the rows or columns: their offsets would change
            where[dim] = kept
            kept += 1
        elif dim in spatial:
            return None
        dim += 1
    return where[spatial[0]], where[spatial[1]]
