"""Feature vectors of whole layers, for the analyses that compare images through them.

A feature layer is a layer of ``Layers.layer`` (paper number, module name, ``name@k``), whose
feature vector is its whole output flattened, or ``fc``: the input of the last ``nn.Linear`` to
run in a forward pass (by its first call, for one called more than once), the penultimate
fully-connected layer the classifier reads (Zeiler & Fergus's "layer 7" for AlexNet-like models;
ResNets' pooled features).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vizdeconv.errors import LayerError
from vizdeconv.graph import Point
from vizdeconv.hooks import Hooks
from vizdeconv.layers import Layers
from vizdeconv.models import LoadedModel
from vizdeconv.switches import PointRecorder

FC = "fc"


@dataclass(frozen=True)
class FeatureLayer:
    """Where a feature vector is read.

    Attributes:
        name: what tables call it: the paper number (``5``), the module name, or ``fc``.
        label: for figures: ``layer 5 (features.11)`` or ``fc (input of classifier.6)``.
        point: the module output read, or None for ``fc``.
        linear: for ``fc``, the module name of the last ``nn.Linear`` to run.
    """

    name: str
    label: str
    point: Point | None = None
    linear: str | None = None


def feature_layers(model: LoadedModel, layers: Layers, spec: str) -> list[FeatureLayer]:
    """Resolve ``1,5,fc`` (each part a ``Layers.layer`` spec or ``fc``: the input of the last ``nn.Linear``
    to run in a forward pass), in the order given, each once.

    Raises:
        LayerError: a part names no layer, or ``fc`` on a model without an ``nn.Linear``.
    """
    chosen: dict[str, FeatureLayer] = {}
    for part in (p.strip() for p in str(spec).split(",")):
        if part.lower() == FC:
            modules = dict(model.module.named_modules())
            linears = [name for name in layers.graph.calls if isinstance(modules.get(name), nn.Linear)]
            if not linears:
                raise LayerError(f"{model.name} runs no nn.Linear, so it has no fully-connected layer for 'fc'")
            chosen[FC] = FeatureLayer(FC, f"fc (input of {linears[-1]})", linear=linears[-1])
        elif part:
            layer = layers.layer(part)
            chosen[layer.key] = FeatureLayer(layer.key, layer.label, point=layer.point)
    if not chosen:
        raise LayerError("no layer given")
    return list(chosen.values())


class _LinearInput(Hooks):
    """The flattened input of one ``nn.Linear`` whenever the model runs inside ``with`` (its last call's)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.target = module.get_submodule(name)
        self.input: torch.Tensor | None = None

    def _register(self) -> Iterator[RemovableHandle]:
        yield self.target.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, inputs) -> None:
        self.input = inputs[0].detach().flatten(1).clone()


@torch.no_grad()
def features(model: LoadedModel, chosen: list[FeatureLayer], images: torch.Tensor
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One full forward pass: ``(N, D)`` feature vectors per chosen layer, and the ``(N, classes)`` logits."""
    with contextlib.ExitStack() as stack:
        recorders = [stack.enter_context(_LinearInput(model.module, layer.linear) if layer.point is None
                                         else PointRecorder(model.module, layer.point)) for layer in chosen]
        logits = model.module(images.clone())  # clone: a model may work on its input in place
    vectors = [(r.input if isinstance(r, _LinearInput) else r.output.flatten(1)).float() for r in recorders]
    return vectors, logits.float()
