"""Networks (plain ``nn.Module``) and the LightningModules that train them."""

from defectseg.models.networks import PadToMultiple, available_architectures, build_network, load_weights
from defectseg.models.segmentation import SegmentationModule

__all__ = [
    "PadToMultiple",
    "SegmentationModule",
    "available_architectures",
    "build_network",
    "load_weights",
]
