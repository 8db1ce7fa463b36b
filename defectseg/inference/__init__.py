"""Inference on raw images: the :class:`Predictor`, tiling, defect reports and export.

* :class:`Predictor` -- predict raw images of any size from a checkpoint, an ONNX or a
  TorchScript file (sliding-window tiling, flip TTA, batching, per-image reports).
* :func:`predict_folder` / :func:`list_images` -- the ``defectseg infer`` command's engine.
* :func:`export_onnx` / :func:`export_torchscript` -- graphs that take raw ``uint8`` images.
* :func:`load_module` -- rebuild a LightningModule from a checkpoint safely.
"""

from defectseg.inference.checkpoint import CheckpointError, load_module, read_checkpoint
from defectseg.inference.export import ExportResult, export_model, export_onnx, export_torchscript
from defectseg.inference.folder import FolderSummary, list_images, predict_folder
from defectseg.inference.predictor import Prediction, Predictor
from defectseg.inference.report import ClassReport, Component, ImageReport, ReportWriter, analyze
from defectseg.inference.runtime import InferenceModel, ModelInfo, load_backend
from defectseg.inference.tiling import BlendAccumulator, TilePlan

__all__ = [
    "BlendAccumulator",
    "CheckpointError",
    "ClassReport",
    "Component",
    "ExportResult",
    "FolderSummary",
    "ImageReport",
    "InferenceModel",
    "ModelInfo",
    "Prediction",
    "Predictor",
    "ReportWriter",
    "TilePlan",
    "analyze",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "list_images",
    "load_backend",
    "load_module",
    "predict_folder",
    "read_checkpoint",
]
