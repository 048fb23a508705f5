"""vizdeconv: see what a convnet has learned, with the methods of Zeiler & Fergus (ECCV 2014).

Notebook use: the commands as jobs (each writes its figures under ``out`` and refreshes
``out/index.html``)::

    import vizdeconv as vd
    model = vd.load_model("efficientnet_lite0")   # or "embedded", "resnet50", "timm:NAME", vd.LoadedModel.from_module(…)
    (top,) = vd.ProjectJob(model, "_blocks.9", channels="0-7", k=4).run(["photos/"])  # one report per layer
    maps = vd.OcclusionJob(model, size=32, stride=16).run(["photos/cat.jpg"])
    sheet = vd.FiltersJob(model, 1).run(["photos/"])            # filter diagnostics (Fig. 6)
    curves = vd.InvarianceJob(model, "1,fc").run(["photos/"])   # invariance (Fig. 5)
    table = vd.CorrespondenceJob(model, "parts.json", "_head_relu,fc").run(["photos/"])  # Table 1
    similar = vd.ReconstructJob(model, "all").run(["photos/"])  # whole layers, known vs fixed switches
    coded = vd.SparseInferJob("embedded").run(["sample_images/fashion-mnist"])  # a deconvolutional network's codes

and the deconvnet itself on a preprocessed ``(N, C, H, W)`` batch::

    layers = vd.trace_layers(model)
    deconvnet = vd.Deconvnet(model, layers, layers.layer(5), rule="deconvnet")
    forward = deconvnet.forward(images)
    pixels = deconvnet.project(forward, vd.strongest(forward.activations, top=3))    # (S, C, H, W)
"""

from vizdeconv.correspondence import read_parts, sign_changes
from vizdeconv.deconvnet import Deconvnet, ImageProjections, Projection, strongest
from vizdeconv.errors import (
    ImageError,
    LayerError,
    ModelError,
    UnsafeCheckpointError,
    VizDeconvError,
)
from vizdeconv.filters import FilterStats
from vizdeconv.features import FeatureLayer, feature_layers
from vizdeconv.graph import Field, Graph, Point, trace
from vizdeconv.images import find_images, load_image, read_batches
from vizdeconv.invariance import transformed
from vizdeconv.jobs.correspondence import CorrespondenceJob, CorrespondenceReport
from vizdeconv.jobs.deconv import DeconvJob, DeconvReport, DeconvResult
from vizdeconv.jobs.evolution import EvolutionJob, EvolutionReport
from vizdeconv.jobs.filters import FiltersJob, FiltersReport
from vizdeconv.jobs.invariance import InvarianceJob, InvarianceReport
from vizdeconv.jobs.occlude import ImageOcclusion, OcclusionJob, OcclusionReport
from vizdeconv.jobs.predict import Prediction, PredictJob, PredictReport
from vizdeconv.jobs.project import ProjectJob, TopKReport
from vizdeconv.jobs.reconstruct import ReconstructJob, ReconstructReport, Similarity
from vizdeconv.jobs.sparse import (
    SparseFiltersJob,
    SparseFiltersReport,
    SparseInferJob,
    SparseReport,
    SparseResult,
    SparseTrainJob,
    TrainProgress,
    TrainReport,
)
from vizdeconv.layers import Hit, Layer, Layers, trace_layers
from vizdeconv.models import LoadedModel, load_model, read_state_dict
from vizdeconv.occlusion import OcclusionMaps, OcclusionSpec, occlude
from vizdeconv.ops import OPS, Op
from vizdeconv.report import write_report
from vizdeconv.rules import apply_rules
from vizdeconv.similarity import ssim
from vizdeconv.switches import Forward, PointRecorder, SwitchRecorder
from vizdeconv.topk import TopK, hits, project_hits, scan

__all__ = [
    "CorrespondenceJob", "CorrespondenceReport", "DeconvJob", "DeconvReport", "DeconvResult", "Deconvnet",
    "EvolutionJob", "EvolutionReport", "FeatureLayer", "Field", "FilterStats", "FiltersJob", "FiltersReport",
    "Forward", "Graph", "Hit", "ImageError", "ImageOcclusion", "ImageProjections", "InvarianceJob",
    "InvarianceReport", "Layer", "LayerError", "Layers", "LoadedModel", "ModelError", "OPS", "OcclusionJob",
    "OcclusionMaps", "OcclusionReport", "OcclusionSpec", "Op", "Point", "PointRecorder", "PredictJob",
    "PredictReport", "Prediction", "ProjectJob", "Projection", "ReconstructJob", "ReconstructReport", "Similarity",
    "SparseFiltersJob", "SparseFiltersReport", "SparseInferJob", "SparseReport", "SparseResult", "SparseTrainJob",
    "SwitchRecorder", "TopK", "TopKReport", "TrainProgress", "TrainReport", "UnsafeCheckpointError", "VizDeconvError", "apply_rules",
    "feature_layers", "find_images", "hits", "load_image", "load_model", "occlude", "project_hits",
    "read_batches", "read_parts", "read_state_dict", "scan", "sign_changes", "ssim", "strongest",
    "trace", "trace_layers", "transformed", "write_report",
]
