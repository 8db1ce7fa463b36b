"""Label-confusion suppression (defectseg.losses.confusion): the dense and bit-packed kernels
against hand-computed entropies and against each other."""

from __future__ import annotations

import math

import pytest
import torch

from defectseg.losses.basic import validated_labels
from defectseg.losses.confusion import (
    _slide,
    _window_any,
    check_window,
    confusion_map,
    confusion_suppression_map,
)

IGNORE = 255


def test_confusion_weight_on_a_two_class_boundary_and_in_a_uniform_window():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, :, 3:] = 1  # vertical boundary between columns 2 and 3
    for method in ("dense", "packed"):
        m = confusion_suppression_map(target, 2, window=3, method=method)
        h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
        assert m[0, 2, 2].item() == pytest.approx(1 - h / math.log(2), abs=1e-6)  # 6 of one, 3 of the other
        assert m[0, 2, 2].item() < 1
        assert m[0, 2, 0].item() == 1.0 and m[0, 4, 5].item() == 1.0  # uniform windows: exactly 1
        # border: the window is clipped to the image; corner (0, 2) sees 4 of class 0, 2 of class 1
        h_corner = -(4 / 6 * math.log(4 / 6) + 2 / 6 * math.log(2 / 6))
        assert m[0, 0, 2].item() == pytest.approx(1 - h_corner / math.log(2), abs=1e-6)


def test_confusion_with_more_classes_and_ignore_pixels():
    target = torch.zeros(1, 5, 5, dtype=torch.long)
    target[0, :, 2] = 1
    target[0, :, 3:] = 2
    target[0, 0, 0] = IGNORE
    m = confusion_suppression_map(target, 4, window=3)  # C = 4: H is divided by ln 4
    third = -3 * (1 / 3) * math.log(1 / 3)
    assert m[0, 2, 2].item() == pytest.approx(1 - third / math.log(4), abs=1e-6)  # 3/3/3 junction
    # (1, 1): 8 labelled pixels in its window (one ignored): 5 of class 0 and 3 of class 1
    h = -(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8))
    assert m[0, 1, 1].item() == pytest.approx(1 - h / math.log(4), abs=1e-6)
    assert m[0, 1, 0].item() == 1.0  # class 0 and an ignored pixel only: uniform
    assert m[0, 0, 0].item() == 0.0  # an ignored pixel weighs 0
    only_ignore = torch.full((1, 4, 4), IGNORE)
    only_ignore[0, 1, 1] = 3
    assert confusion_suppression_map(only_ignore, 4, window=3)[0, 1, 1].item() == 1.0
    assert torch.equal(confusion_suppression_map(target, 4, window=1), (target != IGNORE).float())


@pytest.mark.parametrize("num_classes", [2, 3, 6, 12])
def test_packed_and_dense_confusion_agree(num_classes):
    torch.manual_seed(num_classes)
    target = torch.zeros(4, 33, 29, dtype=torch.long)  # image 3 stays uniform (defect-free)
    target[0, 4:20, 5:14] = 1
    target[1, 10:, :] = torch.randint(0, num_classes, (23, 29))  # noisy labels: every window mixed
    target[2, 2:30:3, :] = num_classes - 1
    target[0, :2] = IGNORE
    target[2, 5:9, 5:9] = IGNORE
    for window in (3, 5, 7, 9):
        dense = confusion_suppression_map(target, num_classes, window, method="dense")
        packed = confusion_suppression_map(target, num_classes, window, method="packed")
        torch.testing.assert_close(packed, dense, atol=1e-6, rtol=0)
        assert dense.min() >= 0 and dense.max() <= 1 and (packed[3] == 1).all()
        # batches without any defect-free image take the direct route; the values agree
        torch.testing.assert_close(confusion_suppression_map(target[:3], num_classes, window), packed[:3])


def test_packed_confusion_in_chunks_of_tiles_and_on_tiny_images(monkeypatch):
    # labels that change everywhere activate every tile; in chunks of 2 tiles the result is the same
    from defectseg.losses import confusion

    torch.manual_seed(5)
    target = torch.randint(0, 3, (2, 19, 21))
    target[1, :4, :5] = IGNORE
    dense = confusion_suppression_map(target, 3, 5, method="dense")
    monkeypatch.setattr(confusion, "_TILES_PER_CHUNK", 2)
    torch.testing.assert_close(confusion_suppression_map(target, 3, 5, method="packed"), dense, atol=1e-6, rtol=0)
    # images narrower or lower than the window (and than a tile): the window is clipped alike
    for shape in [(1, 1, 6), (1, 5, 1), (2, 2, 3)]:
        tiny = torch.randint(0, 3, shape)
        torch.testing.assert_close(
            confusion_suppression_map(tiny, 3, 7, method="packed"),
            confusion_suppression_map(tiny, 3, 7, method="dense"),
            atol=1e-6,
            rtol=0,
        )


def test_packed_confusion_falls_back_to_dense_when_digits_do_not_fit():
    # r = 7 packs 3 bits per label: 25 classes need 3 * 26 = 78 bits > 63 -> dense counts
    torch.manual_seed(0)
    target = torch.randint(0, 25, (2, 12, 13))
    target[0, :3] = IGNORE
    packed = confusion_suppression_map(target, 25, 7, method="packed")
    dense = confusion_suppression_map(target, 25, 7, method="dense")
    torch.testing.assert_close(packed, dense, atol=1e-6, rtol=0)
    # a pixel whose 7 x 7 window holds 49 distinct-enough labels is far from uniform
    assert packed[1].max() < 1.0


def test_sliding_or_and_sum_by_doubling_equal_the_naive_loops():
    torch.manual_seed(1)
    x = torch.randint(0, 50, (2, 5, 23))
    bits = torch.randint(0, 2, (2, 5, 23), dtype=torch.uint8)
    for window in (1, 2, 3, 5, 7, 8, 13, 23):
        naive_sum = torch.stack([x[..., i : i + window].sum(-1) for i in range(23 - window + 1)], dim=-1)
        assert torch.equal(_slide(x, window, 2, torch.add), naive_sum)
        naive_or = torch.stack([bits[..., i : i + window].amax(-1) for i in range(23 - window + 1)], dim=-1)
        assert torch.equal(_slide(bits, window, 2, torch.bitwise_or), naive_or)


def test_window_any_is_a_clipped_square_dilation():
    mask = torch.zeros(1, 6, 7, dtype=torch.bool)
    mask[0, 0, 6] = True
    mask[0, 4, 1] = True
    out = _window_any(mask, 3)
    expected = torch.zeros_like(mask)
    for y, x in ((0, 6), (4, 1)):
        expected[0, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = True
    assert torch.equal(out, expected)


def test_confusion_map_multiplies_into_given_weights_in_place():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, :, 3:] = 1
    target[0, 0, 0] = IGNORE
    labels = validated_labels(target, 2, IGNORE)
    weights = torch.full((1, 6, 6), 2.0)
    weights[0, 0, 0] = 0.0  # the class-weight map is 0 at ignored pixels
    for method in ("dense", "packed"):
        into = weights.clone()
        out = confusion_map(labels, 2, 3, method, into=into)
        assert out.data_ptr() == into.data_ptr()  # in place
        torch.testing.assert_close(out, weights * confusion_suppression_map(target, 2, 3, method="dense"))


def test_bad_windows_classes_methods_and_shapes_raise():
    for window in (0, 2, 4.0, -3):
        with pytest.raises(ValueError, match="odd integer >= 1"):
            check_window(window)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="num_classes >= 2, got 1"):
        confusion_suppression_map(target, 1)
    with pytest.raises(ValueError, match="'auto', 'dense' or 'packed', got 'fast'"):
        confusion_suppression_map(target, 2, method="fast")
    with pytest.raises(ValueError, match=r"\(B, H, W\), got shape \(4, 4\)"):
        confusion_suppression_map(target[0], 2)
    with pytest.raises(ValueError, match="label 5 but the logits have 3 classes"):
        confusion_suppression_map(target + 5, 3)
