"""Lightning callbacks: resumable checkpoints, W&B sample images and extras, prediction writer."""

from defectseg.callbacks.checkpoint import ResumableCheckpoint
from defectseg.callbacks.images import LogValidationSamples
from defectseg.callbacks.wandb_extras import WandbExtras
from defectseg.callbacks.writer import PredictionWriter

__all__ = ["LogValidationSamples", "PredictionWriter", "ResumableCheckpoint", "WandbExtras"]
