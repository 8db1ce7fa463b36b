"""Segmentation metrics of defect segmentation: one module, one confusion matrix.

Every metric takes predicted and target class maps ``(B, H, W)`` (0 background, ``1..K``
defect classes); target pixels equal to ``ignore_index`` (padding, unlabelled areas) count
nowhere, neither in the target nor in the prediction. All are :class:`torchmetrics.Metric`
objects (summed across devices).

* :class:`SegmentationIoU` -- the dataset-level IoU of each class from an accumulated confusion
  matrix. A class absent from both the predictions and the targets of the whole evaluated set
  has no IoU (``nan``): it is left out of the means, not counted as 0 (:func:`summarize_iou`).
* :class:`GlobalDefectIoU` -- the DLI paper's global defect IoU: true positives, false positives
  and false negatives summed over the whole set and over all defect classes, then
  ``TP / (TP + FP + FN)``, read off the same confusion matrix (a defect pixel given the wrong
  defect class is a false positive of the predicted class and a false negative of the true one).
* :class:`ImageWiseIoU` -- the balanced-loss paper's image-wise class IoU: the IoU of each class
  in each image, averaged over the images; an image where the class is absent from both the
  annotation and the prediction is skipped for that class (it has no IoU), not counted as 1 or 0.
* :class:`DefectFreeFalsePositiveRate` -- the share of defect-free images on which the model
  predicts a defect: at least ``min_area`` pixels of any defect class.

:func:`segmentation_metrics` builds the :class:`~torchmetrics.MetricCollection` of a stage
(validation: the IoU; test: all four, the IoU and the global defect IoU sharing one confusion
matrix through a compute group), and :func:`metric_logs` turns it into the logged values
(``miou``, ``miou_defect``, ``iou/<class>``, ``global_defect_iou``...), each metric naming its
own (``log_values``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric, MetricCollection


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

    def log_values(self, class_names: Sequence[str]) -> dict[str, float]:
        """``iou/<class>`` (classes seen), ``miou`` and ``miou_defect`` (:func:`summarize_iou`)."""
        iou = self.compute()
        values = {f"iou/{name}": value for name, value in zip(class_names, iou.tolist()) if value == value}
        return {**values, **summarize_iou(iou)}


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


def _check_pair(preds: torch.Tensor, target: torch.Tensor, num_classes: int | None, ignore_index: int) -> None:
    if preds.shape != target.shape or preds.dim() != 3:
        raise ValueError(
            f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must both be (B, H, W) class maps"
        )
    if num_classes is None:
        return
    valid = target != ignore_index
    if valid.any():
        high = max(int(target[valid].max()), int(preds[valid].max()))
        if high >= num_classes:
            raise ValueError(f"class index {high} out of range for num_classes={num_classes}")


def per_image_confusion(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Confusion matrix of every image: ``(B, C, C)`` counts, rows targets, columns predictions.

    Args:
        preds: predicted classes ``(B, H, W)``.
        target: target classes ``(B, H, W)``; ``ignore_index`` pixels are left out.
        num_classes: C, background included.
        ignore_index: target value to skip.

    Raises:
        ValueError: shapes differ or are not ``(B, H, W)``, or a class index is ``>= num_classes``.
    """
    _check_pair(preds, target, num_classes, ignore_index)
    batch = preds.shape[0]
    valid = target != ignore_index
    image = torch.arange(batch, device=preds.device).view(batch, 1, 1).expand_as(target)
    index = (image[valid] * num_classes + target[valid].long()) * num_classes + preds[valid].long()
    counts = torch.bincount(index, minlength=batch * num_classes * num_classes)
    return counts.view(batch, num_classes, num_classes)


def global_defect_counts(confmat: torch.Tensor) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` summed over the defect classes ``1..K`` of a ``(C, C)`` confusion matrix."""
    confmat = confmat.long()
    tp = confmat.diagonal()[1:]
    fp = confmat.sum(0)[1:] - tp  # predicted as class k, annotated otherwise
    fn = confmat.sum(1)[1:] - tp  # annotated as class k, predicted otherwise
    return int(tp.sum()), int(fp.sum()), int(fn.sum())


def global_defect_iou(confmat: torch.Tensor) -> float:
    """The DLI paper's global defect IoU ``TP / (TP + FP + FN)`` of a ``(C, C)`` confusion matrix.

    Returns 1.0 when no defect pixel is annotated or predicted (nothing to find, nothing falsely
    found), as :func:`defectseg.metrics.summarize_iou` does for ``miou_defect``.
    """
    tp, fp, fn = global_defect_counts(confmat)
    total = tp + fp + fn
    return tp / total if total else 1.0


class ImageWiseIoU(ClassMapMetric):
    """Image-wise class IoU (the balanced-loss paper's definition).

    For each class ``c`` and image ``i`` where ``c`` is annotated or predicted,
    ``IoU_ic = |P_ic & T_ic| / |P_ic | T_ic|``; the class's score is the mean of ``IoU_ic`` over
    those images. Images where ``c`` appears in neither the annotation nor the prediction are
    skipped for ``c``. A class never annotated nor predicted in the whole set has no score
    (``nan``).

    Args:
        num_classes: classes, background (0) included.
        ignore_index: target value to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        self.add_state("iou_sum", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of ``(B, H, W)`` predicted and target class maps."""
        confusion = per_image_confusion(preds, target, self.num_classes, self.ignore_index).double()
        tp = confusion.diagonal(dim1=1, dim2=2)
        union = confusion.sum(1) + confusion.sum(2) - tp  # (B, C)
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
        self.iou_sum += iou.sum(0)
        self.images += present.sum(0)

    def compute(self) -> torch.Tensor:
        """Image-wise IoU of each class ``(C,)``; ``nan`` for classes with no image counted."""
        iou = self.iou_sum / self.images.clamp(min=1)
        return torch.where(self.images > 0, iou, torch.full_like(iou, float("nan"))).float()

    def log_values(self, class_names: Sequence[str]) -> dict[str, float]:
        """``iou_imagewise/<class>`` (classes seen) and ``iou_imagewise`` (mean over defect classes)."""
        iou = self.compute()
        values = {f"iou_imagewise/{name}": v for name, v in zip(class_names, iou.tolist()) if v == v}
        return {**values, "iou_imagewise": summarize_iou(iou)["miou_defect"]}


class GlobalDefectIoU(SegmentationIoU):
    """Global defect IoU (the DLI paper's): TP, FP, FN over the whole set and all defect classes,
    read off the confusion matrix of :class:`SegmentationIoU` (in a collection built by
    :func:`segmentation_metrics` the two share one matrix).

    Args:
        num_classes: classes, background (0) included.
        ignore_index: target value to skip.
    """

    def compute(self) -> torch.Tensor:
        """``TP / (TP + FP + FN)``; 1.0 when no defect pixel was annotated or predicted."""
        return torch.tensor(global_defect_iou(self.confmat), dtype=torch.float32)

    def log_values(self, class_names: Sequence[str]) -> dict[str, float]:
        """``global_defect_iou``."""
        return {"global_defect_iou": float(self.compute())}


class DefectFreeFalsePositiveRate(Metric):
    """Share of defect-free images with a predicted defect of at least ``min_area`` pixels.

    An image is defect-free when its ``defect_free`` flag (the batch contract's) is set, or,
    without flags, when no valid target pixel is a defect. On such an image the predicted defect
    area is the number of pixels (outside ``ignore_index`` pixels, so padding never counts)
    predicted as any defect class; the image is a false positive when that area is at least
    ``min_area``. ``min_area=1`` counts any predicted defect pixel.

    Args:
        min_area: smallest predicted defect area (pixels, at the evaluated resolution) that
            makes a defect-free image a false positive.
        ignore_index: target value to skip.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, min_area: int = 1, ignore_index: int = 255) -> None:
        super().__init__()
        if int(min_area) < 1:
            raise ValueError(f"min_area must be >= 1 pixel, got {min_area}")
        self.min_area = int(min_area)
        self.ignore_index = ignore_index
        self.add_state("false_positives", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, defect_free: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            preds: predicted classes ``(B, H, W)``.
            target: target classes ``(B, H, W)``.
            defect_free: ``(B,)`` flags; ``None`` derives them from ``target``.
        """
        _check_pair(preds, target, None, self.ignore_index)
        valid = target != self.ignore_index
        if defect_free is None:
            defect_free = ~((target > 0) & valid).flatten(1).any(1)
        else:
            defect_free = torch.as_tensor(defect_free, device=preds.device).bool().flatten()
            if defect_free.numel() != preds.shape[0]:
                raise ValueError(
                    f"defect_free has {defect_free.numel()} flags for a batch of {preds.shape[0]} images"
                )
        area = ((preds > 0) & valid).flatten(1).sum(1)
        self.false_positives += int((defect_free & (area >= self.min_area)).sum())
        self.images += int(defect_free.sum())

    def counts(self) -> tuple[int, int]:
        """``(false positives, defect-free images)``, summed across processes."""
        with self.sync_context():
            return int(self.false_positives), int(self.images)

    def compute(self) -> torch.Tensor:
        """The false-positive rate; ``nan`` when the set has no defect-free image."""
        if int(self.images) == 0:
            return torch.tensor(float("nan"))
        return (self.false_positives.double() / self.images.double()).float()

    def log_values(self, class_names: Sequence[str] = ()) -> dict[str, float]:
        """``fp_rate_defect_free`` and ``defect_free_images``; nothing when the set has no
        defect-free image."""
        _, images = self.counts()  # summed across devices, like compute()
        if not images:
            return {}
        return {"fp_rate_defect_free": float(self.compute()), "defect_free_images": float(images)}


def segmentation_metrics(
    num_classes: int, ignore_index: int = 255, test: bool = False, fp_min_area: int = 1
) -> MetricCollection:
    """The metrics of a stage as one :class:`~torchmetrics.MetricCollection`.

    Validation: ``iou`` (:class:`SegmentationIoU`). Test: also ``global_defect_iou`` (sharing
    the IoU's confusion matrix: one compute group, updated once), ``iou_imagewise`` and
    ``fp_rate_defect_free``. Update it with ``(preds, target, defect_free=flags_or_None)``;
    each metric takes the arguments its ``update`` names.

    Args:
        num_classes: classes, background included.
        ignore_index: target value to skip.
        test: the test set of metrics (the papers' metrics) instead of the validation one.
        fp_min_area: smallest predicted defect area that makes a defect-free image a false positive.
    """
    if not test:
        return MetricCollection({"iou": SegmentationIoU(num_classes, ignore_index)}, compute_groups=False)
    return MetricCollection(
        {
            "iou": SegmentationIoU(num_classes, ignore_index),
            "global_defect_iou": GlobalDefectIoU(num_classes, ignore_index),
            "iou_imagewise": ImageWiseIoU(num_classes, ignore_index),
            "fp_rate_defect_free": DefectFreeFalsePositiveRate(fp_min_area, ignore_index),
        },
        compute_groups=[["iou", "global_defect_iou"], ["iou_imagewise"], ["fp_rate_defect_free"]],
    )


def metric_logs(metrics: MetricCollection, class_names: Sequence[str]) -> dict[str, float]:
    """Every value to log of a collection from :func:`segmentation_metrics` (names without the
    stage prefix: ``miou``, ``iou/<class>``, ``global_defect_iou``...), from each metric's
    ``log_values``."""
    values: dict[str, float] = {}
    for _, metric in metrics.items():
        values.update(metric.log_values(class_names))
    return values
