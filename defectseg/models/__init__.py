"""Networks (plain ``nn.Module``) and the LightningModules that train them."""

from defectseg.models.networks import (
    PadToMultiple,
    PretrainedWeightsError,
    available_architectures,
    build_network,
    load_weights,
)
from defectseg.models.segmentation import SegmentationModule
from defectseg.models.uaps import UAPSModule
from defectseg.models.uaps_net import UAPSNet

__all__ = [
    "PadToMultiple",
    "PretrainedWeightsError",
    "SegmentationModule",
    "UAPSModule",
    "UAPSNet",
    "available_architectures",
    "build_network",
    "load_weights",
]
