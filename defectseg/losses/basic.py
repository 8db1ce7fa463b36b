"""Standard segmentation losses: cross-entropy, Dice and focal loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from defectseg.losses.registry import register_loss


def check_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming the shapes if ``logits``/``target`` break the loss contract."""
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    if target.ndim != 3 or target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(
            f"target must be (B, H, W) matching logits {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


def split_target(target: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(safe, valid)``: ``target`` as int64 with ignored pixels set to 0, and the bool mask
    of the pixels not ignored.

    Raises:
        ValueError: a label outside ``[0, num_classes)`` that is not ``ignore_index`` (the
            message names the offending value and the number of classes).
    """
    target = target.long()
    valid = target != ignore_index
    safe = target.masked_fill(~valid, 0)
    if safe.numel():
        low, high = (int(v) for v in torch.aminmax(safe))
        if low < 0 or high >= num_classes:
            bad = high if high >= num_classes else low
            raise ValueError(
                f"target holds label {bad} but the logits have {num_classes} classes (labels must be "
                f"0..{num_classes - 1}, or {ignore_index} to ignore a pixel)"
            )
    return safe, valid


class Labels(NamedTuple):
    """A validated target: ``safe`` (ignored pixels -> 0), ``label`` (ignored -> C), ``valid``
    (``None`` when no pixel is ignored) and the number of pixels not ignored."""

    safe: torch.Tensor
    label: torch.Tensor
    valid: torch.Tensor | None
    num_valid: torch.Tensor | int


def validated_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> Labels:
    """``target`` checked against ``num_classes`` (a clear error naming a bad label), as :class:`Labels`."""
    target = target.long()
    if target.numel() == 0:
        return Labels(target, target, None, 0)
    low, high = (int(v) for v in torch.aminmax(target))
    if low >= 0 and high < num_classes and not low <= ignore_index <= high:
        return Labels(target, target, None, target.numel())  # nothing ignored: no masks needed
    ignored = target == ignore_index
    safe = target.masked_fill(ignored, 0)
    low, high = (int(v) for v in torch.aminmax(safe))
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"target holds label {high if high >= num_classes else low} but the logits have "
            f"{num_classes} classes (labels must be 0..{num_classes - 1}, or {ignore_index} to ignore a pixel)"
        )
    valid = ~ignored
    return Labels(safe, target.masked_fill(ignored, num_classes), valid, valid.sum())


def one_hot_valid(target: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(one_hot (B, C, H, W) float, valid (B, 1, H, W) float)`` with ignored pixels zeroed."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    one_hot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).float()
    valid_f = valid.unsqueeze(1).float()
    return one_hot * valid_f, valid_f


def soft_counts(
    probs: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    channels: slice = slice(None),
    dims: tuple[int, ...] = (0, 2, 3),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft ``(TP, FP, FN)`` of probabilities ``(B, C, H, W)`` against ``target`` ``(B, H, W)``.

    ``TP = sum p y``, ``FP = sum p (1 - y)``, ``FN = sum (1 - p) y`` over the pixels not ignored,
    for the ``channels`` kept, summed over ``dims`` (default: per class over the batch; include
    1 to pool the classes). Shared by the Dice and Tversky losses (softmax or sigmoid ``p``).
    """
    one_hot, valid = one_hot_valid(target, probs.shape[1], ignore_index)
    probs = (probs * valid)[:, channels]
    one_hot = one_hot[:, channels]
    tp = (probs * one_hot).sum(dims)
    return tp, probs.sum(dims) - tp, one_hot.sum(dims) - tp


@register_loss("ce")
class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy, averaged over the pixels that are not ignored.

    Args:
        weight: optional per-class weights (length C).
        ignore_index: mask value to ignore.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(
        self,
        weight: Sequence[float] | None = None,
        ignore_index: int = 255,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer(
            "weight", torch.as_tensor(weight, dtype=torch.float32) if weight is not None else None
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits.float(),
            target.long(),
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )


@register_loss("dice")
class DiceLoss(nn.Module):
    """Soft multi-class Dice loss, ``1 - mean_k (2 I_k + s) / (P_k + T_k + s)``.

    Sums run over the whole batch and all non-ignored pixels; ``P_k`` is the sum of the softmax
    probabilities of class k, ``T_k`` its pixel count in the target and ``I_k`` their overlap.

    With ``absent="include"`` (default) every class is averaged, including classes absent from
    the batch: for an absent class the term is ``1 - s / (P_k + s)``, which is 0 when nothing is
    predicted and grows with the predicted probability mass. So this loss penalises false
    positives on defect-free images, and on an all-background batch with a perfect prediction it
    is 0. With ``absent="drop"`` only the classes present in the batch's target are averaged
    (as segmentation-models-pytorch's Dice does): rare classes are then never pushed down in the
    many batches that lack them, which lets them start learning early when training from scratch
    on a dataset like Magnetic Tile (the cross-entropy term still handles false positives).

    Args:
        smooth: ``s`` above (avoids 0/0; a larger value softens small classes).
        include_background: average class 0 too.
        ignore_index: mask value to ignore.
        absent: ``include`` or ``drop`` the classes absent from the batch (see above). A batch
            without any class kept gives a loss of 0.
    """

    def __init__(
        self,
        smooth: float = 1.0,
        include_background: bool = True,
        ignore_index: int = 255,
        absent: Literal["include", "drop"] = "include",
    ) -> None:
        super().__init__()
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        if absent not in ("include", "drop"):
            raise ValueError(f"absent must be 'include' or 'drop', got {absent!r}")
        self.smooth = smooth
        self.include_background = include_background
        self.ignore_index = ignore_index
        self.absent = absent

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        tp, fp, fn = soft_counts(logits.float().softmax(dim=1), target, self.ignore_index)
        dice = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth)
        present = (tp + fn) > 0
        if not self.include_background:
            dice, present = dice[1:], present[1:]
        if self.absent == "drop":
            if not present.any():
                return logits.sum() * 0.0
            dice = dice[present]
        return 1.0 - dice.mean()


@register_loss("focal")
class FocalLoss(nn.Module):
    """Multi-class focal loss ``-alpha_k (1 - p_k)^gamma log p_k``, averaged over valid pixels.

    Args:
        gamma: focusing parameter (0 gives alpha-weighted cross-entropy).
        alpha: per-class weights (length C) or ``None`` for 1 everywhere.
        ignore_index: mask value to ignore.
    """

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | None = None, ignore_index: int = 255) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32) if alpha is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        valid = target != self.ignore_index
        if not valid.any():
            return logits.sum() * 0.0
        safe = torch.where(valid, target, torch.zeros_like(target)).long()
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        p = log_p.exp()
        loss = -((1.0 - p).clamp(min=0) ** self.gamma) * log_p
        if self.alpha is not None:
            if self.alpha.numel() != logits.shape[1]:
                raise ValueError(f"alpha has {self.alpha.numel()} values but logits have {logits.shape[1]} classes")
            loss = loss * self.alpha.to(loss.device)[safe]
        return loss[valid].mean()
