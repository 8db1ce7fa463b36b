"""Segmentation losses, all built from :func:`build_loss` by name.

Each module registers its losses on import; import new loss families here.

=================  =======================================================================
name               loss
=================  =======================================================================
``ce``             cross-entropy (:class:`CrossEntropyLoss`)
``wce``            class-weighted cross-entropy, weights given or from the data (:class:`WeightedCrossEntropyLoss`)
``class_balanced`` Cui et al.'s effective-number weighting (:class:`ClassBalancedLoss`)
``focal``          focal loss with per-class alpha (:class:`FocalLoss`)
``dice``           soft Dice on softmax probabilities (:class:`DiceLoss`)
``tversky``        (focal) Tversky loss (:class:`TverskyLoss`)
``lovasz``         Lovász-softmax (:class:`LovaszSoftmaxLoss`)
``bce``            one-vs-rest binary cross-entropy (:class:`BinaryCrossEntropyLoss`)
``sigmoid_dice``   Dice on sigmoid probabilities (:class:`SigmoidDiceLoss`)
``bce_dice``       the DLI paper's 0.5 BCE + 0.5 Dice, also ``bce+dice`` (:class:`BCEDiceLoss`)
``truncated_ce``   the balanced loss's truncated cross-entropy (:class:`TruncatedCrossEntropyLoss`)
``balanced``       the balanced loss of Xie et al. (:class:`BalancedLoss`)
=================  =======================================================================
"""

from defectseg.losses import balanced, basic, overlap, weighted  # noqa: F401  (importing registers the losses)
from defectseg.losses.balanced import (
    BalancedLoss,
    TruncatedCrossEntropyLoss,
    class_pixel_counts,
    class_weight_map,
    effective_number_weights,
    truncated_ce_from_error,
    truncated_cross_entropy,
)
from defectseg.losses.basic import CrossEntropyLoss, DiceLoss, FocalLoss
from defectseg.losses.confusion import confusion_suppression_map
from defectseg.losses.overlap import (
    BCEDiceLoss,
    BinaryCrossEntropyLoss,
    LovaszSoftmaxLoss,
    SigmoidDiceLoss,
    TverskyLoss,
    lovasz_softmax,
)
from defectseg.losses.registry import CombinedLoss, available_losses, build_loss, register_loss
from defectseg.losses.statistics import (
    class_statistics,
    modules_wanting_class_statistics,
    provide_class_statistics,
)
from defectseg.losses.weighted import (
    ClassBalancedLoss,
    WeightedCrossEntropyLoss,
    class_balanced_weights,
    frequency_weights,
)

__all__ = [
    "BCEDiceLoss",
    "BalancedLoss",
    "BinaryCrossEntropyLoss",
    "ClassBalancedLoss",
    "CombinedLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "LovaszSoftmaxLoss",
    "SigmoidDiceLoss",
    "TruncatedCrossEntropyLoss",
    "TverskyLoss",
    "WeightedCrossEntropyLoss",
    "available_losses",
    "build_loss",
    "class_balanced_weights",
    "class_pixel_counts",
    "class_statistics",
    "class_weight_map",
    "confusion_suppression_map",
    "effective_number_weights",
    "frequency_weights",
    "lovasz_softmax",
    "modules_wanting_class_statistics",
    "provide_class_statistics",
    "register_loss",
    "truncated_ce_from_error",
    "truncated_cross_entropy",
]
