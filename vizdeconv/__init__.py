"""vizdeconv: see what a convnet has learned, with the methods of Zeiler & Fergus (ECCV 2014).

Typical notebook use::

    import vizdeconv as vd
    model = vd.load_model("embedded")             # or "resnet50", "efficientnet_lite0", "timm:NAME"
    layers = vd.trace_layers(model)
    layer = layers.layer(5)                       # rectified output of conv5; or "layer3", "relu@2"
    deconvnet = vd.Deconvnet(model, layers, layer, rule="deconvnet")
    forward = deconvnet.forward(images)           # (N, C, H, W) preprocessed batch
    seeds = vd.strongest(forward.activations, top=3)
    pixels = deconvnet.project(forward, seeds)    # (S, C, H, W)
"""

from vizdeconv.deconv import Deconvnet, strongest
from vizdeconv.errors import (
    ImageError,
    LayerError,
    ModelError,
    UnsafeCheckpointError,
    VizDeconvError,
)
from vizdeconv.graph import Field, Graph, Point, trace
from vizdeconv.images import find_images, load_image, read_batches
from vizdeconv.layers import Layer, Layers, trace_layers
from vizdeconv.models import LoadedModel, load_model, read_state_dict
from vizdeconv.occlusion import OcclusionMaps, occlude
from vizdeconv.ops import OPS, Op
from vizdeconv.predict import predict_files
from vizdeconv.projections import project_files, save_image_projections
from vizdeconv.rules import apply_rules
from vizdeconv.switches import Forward, PointRecorder, SwitchRecorder
from vizdeconv.topk import Hit, TopK, hits, project_hits, scan

__all__ = [
    "OPS", "Deconvnet", "Field", "Forward", "Graph", "Hit", "ImageError", "Layer", "LayerError", "Layers",
    "LoadedModel", "ModelError", "OcclusionMaps", "Op", "Point", "PointRecorder", "SwitchRecorder", "TopK",
    "UnsafeCheckpointError", "VizDeconvError", "apply_rules", "find_images", "hits", "load_image", "load_model",
    "occlude", "predict_files", "project_files", "project_hits", "read_batches", "read_state_dict",
    "save_image_projections", "scan", "strongest", "trace", "trace_layers",
]
