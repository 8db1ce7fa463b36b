"""Lightning callbacks: resumable checkpoints, W&B sample images, prediction writer."""

from defectseg.callbacks.checkpoint import ResumableCheckpoint
from defectseg.callbacks.images import LogValidationSamples
from defectseg.callbacks.writer import PredictionWriter

__all__ = ["LogValidationSamples", "PredictionWriter", "ResumableCheckpoint"]
