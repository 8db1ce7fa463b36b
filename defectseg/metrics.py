"""Segmentation metrics that follow defect-segmentation conventions.

:class:`SegmentationIoU` accumulates a confusion matrix (summed across devices) and reports the
intersection over union of each class. A class absent from both the predictions and the targets
of the whole evaluated set has no IoU (``nan``): it is left out of the means, not counted as 0.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ClassMapMetric(Metric):
    """Base of the metrics over predicted and target class maps ``(B, H, W)``.

    Args:
        num_classes: classes, background (0) included (at least 2).
        ignore_index: target value to skip.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and a defect class), got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index


class SegmentationIoU(ClassMapMetric):
    """Dataset-level IoU per class from an accumulated confusion matrix.

    Args:
        num_classes: classes, background (0) included.
        ignore_index: target value to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``preds`` and ``target`` are ``(B, H, W)`` class indices."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        t = target[valid].long()
        p = preds[valid].long()
        if t.numel() and (int(t.max()) >= self.num_classes or int(p.max()) >= self.num_classes):
            raise ValueError(
                f"class index {max(int(t.max()), int(p.max()))} out of range for num_classes={self.num_classes}"
            )
        self.confmat += torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def compute(self) -> torch.Tensor:
        """IoU of each class, ``nan`` for classes absent from predictions and targets."""
        confmat = self.confmat.double()
        tp = confmat.diag()
        union = confmat.sum(0) + confmat.sum(1) - tp
        iou = tp / union
        return torch.where(union > 0, iou, torch.full_like(iou, float("nan"))).float()


def summarize_iou(iou: torch.Tensor) -> dict[str, float]:
    """``miou`` (all classes) and ``miou_defect`` (classes 1..K) from per-class IoU.

    Classes with ``nan`` IoU are left out of the means. When no defect class appears in either
    the targets or the predictions of the evaluated set, ``miou_defect`` is 1.0: nothing to
    find and nothing falsely found.
    """
    def nanmean(values: torch.Tensor) -> float:
        finite = values[~torch.isnan(values)]
        return float(finite.mean()) if finite.numel() else 1.0

    return {"miou": nanmean(iou), "miou_defect": nanmean(iou[1:])}
