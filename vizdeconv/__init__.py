"""vizdeconv: see what a convnet has learned, with the methods of Zeiler & Fergus (ECCV 2014).

Typical notebook use::

    import vizdeconv as vd
    model = vd.load_model("embedded")             # or "alexnet", "vgg16", "pkg.mod:factory"
    chain = vd.trace_chain(model)
    layer = chain.layer(5)                        # rectified output of conv5
    with vd.SwitchRecorder(chain, layer) as recorder:
        forward = recorder.forward(images)        # (N, C, H, W) preprocessed batch
    seeds = vd.strongest(forward.activations, top=3)
    pixels = vd.project(chain, layer, forward, seeds)   # (S, C, H, W)
"""

from vizdeconv.deconv import check_invertible, project, strongest
from vizdeconv.errors import (
    ImageError,
    LayerError,
    ModelError,
    UnsafeCheckpointError,
    VizDeconvError,
)
from vizdeconv.images import find_images, load_image, read_batches
from vizdeconv.layers import Chain, Field, Layer, describe, trace_chain
from vizdeconv.models import LoadedModel, load_model, read_state_dict
from vizdeconv.occlusion import OcclusionMaps, occlude
from vizdeconv.predict import predict_files
from vizdeconv.projections import project_files, save_image_projections
from vizdeconv.switches import Forward, SwitchRecorder
from vizdeconv.topk import Hit, TopK, hits, project_hits, scan

__all__ = [
    "Chain", "Field", "Forward", "Hit", "ImageError", "Layer", "LayerError", "LoadedModel", "ModelError",
    "OcclusionMaps", "SwitchRecorder", "TopK", "UnsafeCheckpointError", "VizDeconvError", "check_invertible",
    "describe", "find_images", "hits", "load_image", "load_model", "occlude", "predict_files", "project",
    "project_files", "project_hits", "read_batches", "read_state_dict", "save_image_projections", "scan",
    "strongest", "trace_chain",
]
