"""Segmentation losses, all built from :func:`build_loss` by name.

Each module registers its losses on import; import new loss families here.
"""

from defectseg.losses import basic  # noqa: F401  (registers ce, dice, focal)
from defectseg.losses.basic import CrossEntropyLoss, DiceLoss, FocalLoss
from defectseg.losses.registry import CombinedLoss, available_losses, build_loss, register_loss

__all__ = [
    "CombinedLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "available_losses",
    "build_loss",
    "register_loss",
]
