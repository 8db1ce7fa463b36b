"""The metrics of defectseg.metrics on hand-made predictions and targets."""

import math

import pytest
import torch

from defectseg.metrics import SegmentationIoU, summarize_iou


def test_iou_matches_hand_computed_values():
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 255]]])
    preds = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 2]]])
    metric = SegmentationIoU(num_classes=4)
    metric.update(preds, target)
    iou = metric.compute()
    # class 0: TP=2 (pixels (0,0),(1,0)); FP=1 ((1,2) predicted 0, is 2); FN=1 ((0,1) is 0, predicted 1)
    assert iou[0].item() == pytest.approx(2 / 4)
    # class 1: TP=2, FP=1 ((0,1)), FN=0
    assert iou[1].item() == pytest.approx(2 / 3)
    # class 2: TP=1, FP=0 (the 255 pixel is ignored), FN=1
    assert iou[2].item() == pytest.approx(1 / 2)
    # class 3: absent from both -> nan, not 0
    assert math.isnan(iou[3].item())
    summary = summarize_iou(iou)
    assert summary["miou"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)
    assert summary["miou_defect"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_iou_accumulates_over_batches_like_one_big_batch():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (4, 8, 8))
    preds = torch.randint(0, 3, (4, 8, 8))
    split = SegmentationIoU(3)
    split.update(preds[:2], target[:2])
    split.update(preds[2:], target[2:])
    whole = SegmentationIoU(3)
    whole.update(preds, target)
    assert torch.equal(split.compute(), whole.compute())


def test_class_only_predicted_counts_as_zero():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    preds = torch.tensor([[[0, 1], [0, 0]]])
    metric = SegmentationIoU(2)
    metric.update(preds, target)
    iou = metric.compute()
    assert iou[1].item() == 0.0  # a false positive class is present in predictions: IoU 0
    assert summarize_iou(iou)["miou_defect"] == 0.0


def test_no_defect_anywhere_gives_perfect_defect_miou():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    metric = SegmentationIoU(3)
    metric.update(target.clone(), target)
    assert summarize_iou(metric.compute()) == {"miou": 1.0, "miou_defect": 1.0}


def test_bad_shapes_and_classes_raise():
    metric = SegmentationIoU(2)
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="out of range"):
        metric.update(torch.full((1, 2, 2), 5), torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("name", ["SegmentationIoU", "ImageWiseIoU", "GlobalDefectIoU"])
def test_class_map_metrics_need_a_defect_class(name):
    import defectseg.metrics

    cls = getattr(defectseg.metrics, name)
    with pytest.raises(ValueError, match="num_classes must be >= 2 .* got 1"):
        cls(num_classes=1)


def test_global_defect_iou_shares_the_iou_confusion_matrix_in_the_test_collection():
    from defectseg.metrics import global_defect_iou, metric_logs, segmentation_metrics

    metrics = segmentation_metrics(3, test=True)
    target = torch.tensor([[[0, 1, 1, 2], [0, 0, 2, 255]]])
    preds = torch.tensor([[[0, 1, 2, 2], [1, 0, 2, 1]]])
    metrics.update(preds, target, defect_free=None)
    metrics.update(preds, target, defect_free=torch.tensor([False]))
    # one compute group: the global defect IoU metric was not updated apart, it reads the IoU's matrix
    assert metrics.compute_groups[0] == ["iou", "global_defect_iou"]
    confmat = metrics["iou"].confmat
    assert torch.equal(metrics["global_defect_iou"].confmat, confmat)
    expected = torch.tensor([[2, 1, 0], [0, 1, 1], [0, 0, 2]]) * 2  # by hand, twice the batch
    assert torch.equal(confmat, expected)
    tp, fp, fn = 1 + 2, 1 + 1, 1 + 0  # per batch: a (1, 1, 1), b (2, 1, 0)
    logs = metric_logs(metrics, ["background", "a", "b"])
    assert logs["global_defect_iou"] == pytest.approx(tp / (tp + fp + fn)) == pytest.approx(global_defect_iou(confmat))
    assert logs["iou/a"] == pytest.approx(1 / 3) and logs["iou/b"] == pytest.approx(2 / 3)
    assert "fp_rate_defect_free" not in logs  # no defect-free image


def test_validation_collection_logs_the_same_names_as_before():
    from defectseg.metrics import metric_logs, segmentation_metrics

    metrics = segmentation_metrics(2)
    metrics.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]), defect_free=None)
    assert set(metric_logs(metrics, ["background", "defect"])) == {"iou/background", "iou/defect", "miou", "miou_defect"}
