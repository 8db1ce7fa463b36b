"""The headline metrics of a grid's summary (:data:`METRICS`) and the number parsing shared by
the summary (:mod:`defectseg.experiments.results`) and the paired table
(:mod:`defectseg.experiments.paired`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetricInfo:
    """A headline metric: its logged key, its column title, direction and definition."""

    key: str
    title: str
    higher_is_better: bool | None
    definition: str


#: Headline metrics of the summary, in column order.
METRICS: tuple[MetricInfo, ...] = (
    MetricInfo(
        "test/miou_defect", "mIoU defect (dataset)", True,
        "dataset-level IoU of each defect class (TP, FP, FN summed over the test set), averaged over the "
        "defect classes (background left out)",
    ),
    MetricInfo(
        "test/iou_imagewise", "image-wise IoU", True,
        "the balanced-loss paper's image-wise class IoU: IoU of each defect class in each image, averaged over "
        "the images where the class is annotated or predicted (images where it is in neither are skipped), "
        "then over the defect classes",
    ),
    MetricInfo(
        "test/global_defect_iou", "global defect IoU", True,
        "the DLI paper's global defect IoU: TP / (TP + FP + FN) with TP, FP, FN summed over the whole test "
        "set and all defect classes",
    ),
    MetricInfo(
        "test/fp_rate_defect_free", "FP rate defect-free", False,
        "share of the defect-free test images on which at least `fp_min_area` pixels (default 1) are "
        "predicted as a defect (absent when the test set has no defect-free image)",
    ),
    MetricInfo(
        "test/miou", "mIoU all (dataset)", True,
        "dataset-level IoU averaged over all classes, background included",
    ),
    MetricInfo(
        "val/miou_defect_best", "best val mIoU defect", True,
        "best validation `val/miou_defect` during training (the checkpoint tested is picked on it)",
    ),
)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number
