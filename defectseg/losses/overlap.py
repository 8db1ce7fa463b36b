"""Overlap losses (Lovász-softmax, Tversky) and the one-vs-rest losses of the DLI paper.

* ``lovasz`` -- Lovász-softmax (Berman et al., CVPR 2018), the convex surrogate of the
  per-class Jaccard loss.
* ``tversky`` -- Tversky loss (Salehi et al., 2017), optionally focal (Abraham and Khan, 2019).
* ``bce`` -- one-vs-rest binary cross-entropy on every channel (sigmoid, not softmax).
* ``sigmoid_dice`` -- Dice on the sigmoid probabilities of the defect channels.
* ``bce_dice`` (also spelt ``bce+dice``) -- the loss of Dynamic Label Injection (Caruso et al.,
  2024): ``0.5 * bce + 0.5 * sigmoid_dice``.

The soft Dice (softmax) lives in :mod:`defectseg.losses.basic` as ``dice``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from defectseg.losses.basic import check_inputs, one_hot_valid, soft_counts, split_target
from defectseg.losses.registry import CombinedLoss, register_loss


# ---------------------------------------------------------------------------- Lovász
def lovasz_softmax(
    probs: torch.Tensor,
    target: torch.Tensor,
    classes: Literal["present", "all"] = "present",
    per_image: bool = False,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Lovász-softmax loss of probabilities ``(B, C, H, W)`` against ``target`` ``(B, H, W)``.

    For each class ``c`` the errors ``e_i = |[y_i = c] - p_ic|`` are sorted in decreasing order
    and weighted by the increments of the Jaccard loss ``|S| / |F_c ∪ S|`` of the growing set
    ``S`` of the first pixels (``F_c``: the pixels of class ``c``); the class losses are
    averaged. Vectorised over classes and images (one sort); ignored pixels get error 0, which
    puts them last, where they add nothing.

    Args:
        probs: softmax probabilities.
        target: class indices.
        classes: ``"present"`` averages the classes present in the target (of the batch, or of
            each image with ``per_image``), as in the paper; ``"all"`` averages every class.
        per_image: one loss per image, then the mean over images with at least one labelled
            pixel; otherwise the whole batch is one set.
        ignore_index: label of pixels that contribute nothing.
    """
    if classes not in ("present", "all"):
        raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
    batch, num_classes = probs.shape[:2]
    one_hot, valid = one_hot_valid(target, num_classes, ignore_index)
    fg = one_hot.flatten(2)  # (B, C, N)
    errors = (fg - probs.flatten(2)).abs() * valid.flatten(2)
    if not per_image:
        fg = fg.transpose(0, 1).reshape(1, num_classes, -1)
        errors = errors.transpose(0, 1).reshape(1, num_classes, -1)
    errors_sorted, order = errors.sort(dim=-1, descending=True)
    fg_sorted = fg.gather(-1, order)
    gts = fg_sorted.sum(dim=-1, keepdim=True)
    intersection = gts - fg_sorted.cumsum(-1)
    union = gts + (1.0 - fg_sorted).cumsum(-1)
    jaccard = 1.0 - intersection / union
    increments = torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)
    per_class = (errors_sorted * increments).sum(dim=-1)  # (G, C)
    if classes == "present":
        mask = (gts.squeeze(-1) > 0).to(per_class.dtype)
    else:
        mask = torch.ones_like(per_class)
    if per_image:
        labelled = valid.flatten(1).any(dim=1).to(per_class.dtype)
        mask = mask * labelled.unsqueeze(1)
    group_loss = (per_class * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    groups = (mask.sum(dim=1) > 0).to(per_class.dtype)
    return (group_loss * groups).sum() / groups.sum().clamp(min=1.0)


@register_loss("lovasz")
class LovaszSoftmaxLoss(nn.Module):
    """Lovász-softmax loss (Berman et al., CVPR 2018); see :func:`lovasz_softmax`.

    On an all-background batch (``classes="present"``) only the background term remains, and it
    grows with the probability given to defect classes, so false positives are penalised.

    Args:
        classes: ``"present"`` (default) or ``"all"``.
        per_image: average per-image losses instead of one loss over the batch.
        ignore_index: label of pixels that contribute nothing.
    """

    def __init__(
        self, classes: Literal["present", "all"] = "present", per_image: bool = False, ignore_index: int = 255
    ) -> None:
        super().__init__()
        if classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
        self.classes = classes
        self.per_image = per_image
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        split_target(target, logits.shape[1], self.ignore_index)  # clear error on bad labels
        probs = logits.float().softmax(dim=1)
        return lovasz_softmax(probs, target, self.classes, self.per_image, self.ignore_index)


# ---------------------------------------------------------------------------- Tversky
@register_loss("tversky")
class TverskyLoss(nn.Module):
    """Tversky loss ``mean_k (1 - TI_k)^gamma``, ``TI_k = (TP + s) / (TP + alpha FP + beta FN + s)``.

    ``TP``, ``FP``, ``FN`` are soft counts of class ``k`` over the batch (softmax probabilities,
    pixels not ignored). ``alpha = beta = 0.5`` is the Dice loss (with ``smooth`` doubled);
    ``beta > alpha`` favours recall, which suits small defects (Salehi et al., 2017);
    ``gamma > 1`` is the focal Tversky loss (Abraham and Khan, 2019). As for ``dice``, classes
    absent from the batch stay in the mean with ``TI = s / (alpha FP + s)``, so predicted
    defects on a defect-free batch are penalised.

    Args:
        alpha: weight of false positives.
        beta: weight of false negatives.
        gamma: focal exponent (1: plain Tversky).
        smooth: ``s`` (> 0).
        include_background: average class 0 too.
        ignore_index: label of pixels that contribute nothing.
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 1.0,
        smooth: float = 1.0,
        include_background: bool = True,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if alpha < 0 or beta < 0 or alpha + beta <= 0:
            raise ValueError(f"alpha and beta must be >= 0 with a positive sum, got {alpha}, {beta}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.alpha, self.beta, self.gamma, self.smooth = float(alpha), float(beta), float(gamma), float(smooth)
        self.include_background = include_background
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        split_target(target, logits.shape[1], self.ignore_index)
        tp, fp, fn = soft_counts(logits.float().softmax(dim=1), target, self.ignore_index)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        if not self.include_background:
            index = index[1:]
        return ((1.0 - index).clamp(min=0.0) ** self.gamma).mean()


# ---------------------------------------------------------------------------- one-vs-rest
def _channels(num_classes: int, include_background: bool) -> slice:
    if not include_background and num_classes < 2:
        raise ValueError("include_background=False needs at least 2 classes")
    return slice(0 if include_background else 1, None)


@register_loss("bce")
class BinaryCrossEntropyLoss(nn.Module):
    """One-vs-rest binary cross-entropy: every channel is a sigmoid classifier of its class.

    ``mean`` over the pixels not ignored and the channels of
    ``BCEWithLogits(z_k, [y = k])``. Predictions then use the argmax of the logits (the
    largest sigmoid). Train the background channel too (``include_background=True``, the
    default) whenever predictions take the argmax over all channels.

    Args:
        include_background: include channel 0.
        pos_weight: optional weight of the positive term per class (length ``C``).
        ignore_index: label of pixels that contribute nothing.
    """

    def __init__(
        self, include_background: bool = True, pos_weight: Sequence[float] | None = None, ignore_index: int = 255
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.ignore_index = ignore_index
        self.register_buffer(
            "pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32) if pos_weight is not None else None
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        num_classes = logits.shape[1]
        split_target(target, num_classes, self.ignore_index)
        one_hot, valid = one_hot_valid(target, num_classes, self.ignore_index)
        pos_weight = None
        if self.pos_weight is not None:
            if self.pos_weight.numel() != num_classes:
                raise ValueError(f"pos_weight has {self.pos_weight.numel()} values but the logits have {num_classes} classes")
            pos_weight = self.pos_weight.to(logits.device).view(1, -1, 1, 1)
        loss = F.binary_cross_entropy_with_logits(logits.float(), one_hot, pos_weight=pos_weight, reduction="none")
        channels = _channels(num_classes, self.include_background)
        loss = (loss * valid)[:, channels]
        count = valid.sum() * loss.shape[1]
        return loss.sum() / count.clamp(min=1.0)


@register_loss("sigmoid_dice")
class SigmoidDiceLoss(nn.Module):
    """Dice loss on sigmoid probabilities (one-vs-rest), as in the DLI paper's code.

    ``1 - (2 sum p y + s) / (sum p + sum y + s)`` with sums over the pixels not ignored and the
    chosen channels pooled together (``pooled=True``, the DLI form) or one Dice per channel
    averaged (``pooled=False``). On an all-background batch (no defect channel has a positive
    pixel) the loss is ``1 - s / (sum p + s)``: 0 for a perfect prediction, growing with the
    predicted defect mass.

    Args:
        smooth: ``s`` (> 0); the DLI code used ``1e-8``, which makes the loss almost constant
            (about 1) on defect-free batches.
        include_background: include channel 0 (default: defect channels only).
        pooled: one Dice over all included channels, or the mean of per-channel Dice.
        ignore_index: label of pixels that contribute nothing.
    """

    def __init__(
        self, smooth: float = 1.0, include_background: bool = False, pooled: bool = True, ignore_index: int = 255
    ) -> None:
        super().__init__()
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.smooth = float(smooth)
        self.include_background = include_background
        self.pooled = pooled
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        num_classes = logits.shape[1]
        split_target(target, num_classes, self.ignore_index)
        channels = _channels(num_classes, self.include_background)
        dims = (0, 1, 2, 3) if self.pooled else (0, 2, 3)
        tp, fp, fn = soft_counts(torch.sigmoid(logits.float()), target, self.ignore_index, channels, dims)
        dice = (2.0 * tp + self.smooth) / (2.0 * tp + fp + fn + self.smooth)
        return 1.0 - dice.mean()


@register_loss("bce_dice", aliases=("bce+dice",))
class BCEDiceLoss(CombinedLoss):
    """The loss of Dynamic Label Injection (Caruso et al., 2024): ``0.5 * bce + 0.5 * sigmoid_dice``.

    One-vs-rest binary cross-entropy on every channel (background included, so the argmax over
    channels stays meaningful; the DLI network had no background channel) plus the Dice of the
    sigmoid probabilities of the defect channels pooled together, as in the DLI code. Registered
    as ``bce_dice`` and, as a whole, as ``bce+dice``: ``build_loss("bce+dice")`` gives this loss,
    not the unweighted sum of ``bce`` and ``dice`` (write ``1*bce + 1*dice`` for that). The two
    terms are logged separately (``loss_bce``, ``loss_sigmoid_dice``).

    Args:
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        smooth: Dice smoothing ``s`` (> 0; DLI used ``1e-8``).
        ignore_index: label of pixels that contribute nothing.
    """

    def __init__(
        self, bce_weight: float = 0.5, dice_weight: float = 0.5, smooth: float = 1.0, ignore_index: int = 255
    ) -> None:
        super().__init__(
            [
                BinaryCrossEntropyLoss(include_background=True, ignore_index=ignore_index),
                SigmoidDiceLoss(smooth=smooth, include_background=False, pooled=True, ignore_index=ignore_index),
            ],
            [bce_weight, dice_weight],
            ["bce", "sigmoid_dice"],
        )
