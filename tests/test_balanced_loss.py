"""The balanced loss (Xie et al., 2023): every component against hand-computed formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.trainer import quiet_trainer

from defectseg.data import SyntheticDefectsDataModule
from defectseg.losses import (
    BalancedLoss,
    CombinedLoss,
    DiceLoss,
    TruncatedCrossEntropyLoss,
    build_loss,
    class_pixel_counts,
    class_weight_map,
    confusion_suppression_map,
    effective_number_weights,
    truncated_ce_from_error,
    truncated_cross_entropy,
)
from defectseg.models import SegmentationModule

IGNORE = 255


def logits_for(probs: list[float]) -> torch.Tensor:
    """(1, 2, 1, N) two-class logits whose class-0 probabilities are ``probs``."""
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()]).float().view(1, 2, 1, -1)


def manual_balanced(logits, target, eps_inf, eps_sup, weight):
    """Independent path: softmax -> error -> piecewise curve -> weights -> mean over labelled pixels."""
    valid = target != IGNORE
    safe = torch.where(valid, target, torch.zeros_like(target))
    p = logits.float().softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
    per_pixel = truncated_ce_from_error(1 - p, eps_inf, eps_sup) * weight * valid
    return per_pixel.sum() / valid.sum()


# ---------------------------------------------------------------------------- truncated CE
def test_truncated_curve_values_and_derivatives_by_hand():
    eps = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64, requires_grad=True)
    value = truncated_ce_from_error(eps, 0.3, 0.7)
    t_inf, t_sup = -math.log(0.7), -math.log(0.3)
    expected = [0.0, 0.0, -math.log(0.5) - t_inf, t_sup - t_inf, 0.2 / 0.3 + t_sup - t_inf]
    assert value.tolist() == pytest.approx(expected, abs=1e-12)
    (grad,) = torch.autograd.grad(value.sum(), eps)
    # 0 below eps_inf, 1/(1 - eps) on [eps_inf, eps_sup], 1/(1 - eps_sup) above
    assert grad.tolist() == pytest.approx([0.0, 1 / 0.7, 2.0, 1 / 0.3, 1 / 0.3], abs=1e-12)


def test_truncated_ce_from_logits_by_hand():
    # three pixels of class 0 with p = 0.9 (easy), 0.5 (middle), 0.1 (hard)
    logits = logits_for([0.9, 0.5, 0.1]).requires_grad_()
    target = torch.zeros(1, 1, 3, dtype=torch.long)
    loss = truncated_cross_entropy(logits, target, 0.3, 0.7)
    t_inf, t_sup = -math.log(0.7), -math.log(0.3)
    per_pixel = [0.0, math.log(2) - t_inf, (0.9 - 0.7) / 0.3 + t_sup - t_inf]
    assert loss.item() == pytest.approx(sum(per_pixel) / 3, rel=1e-6)
    loss.backward()
    # d/dlogits = s (softmax - onehot) / N, s = p * dTrunc/deps = 0, 1, p / (1 - eps_sup)
    s = torch.tensor([0.0, 1.0, 0.1 / 0.3])
    p = torch.tensor([0.9, 0.5, 0.1])
    expected = torch.stack([s * (p - 1), s * (1 - p)]).view(1, 2, 1, 3) / 3
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-5)


def test_truncation_with_0_and_1_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0, :3] = IGNORE
    ours = truncated_cross_entropy(logits, target, 0.0, 1.0)
    ref = F.cross_entropy(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(ours, ref)
    g_ours, g_ref = (torch.autograd.grad(v, logits)[0] for v in (ours, ref))
    torch.testing.assert_close(g_ours, g_ref)
    loss = BalancedLoss(eps_inf=0.0, eps_sup=1.0, class_weighting=False, confusion_suppression=False)
    torch.testing.assert_close(loss(logits, target), ref)


@pytest.mark.parametrize("eps", [(0.3, 0.7), (0.0, 0.7), (0.2, 1.0), (0.5, 0.5)])
def test_truncated_gradient_is_the_chain_rule_of_the_curve(eps):
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 4, 7, requires_grad=True)
    target = torch.randint(0, 5, (2, 4, 7))
    target[1, 2] = IGNORE
    ours = truncated_cross_entropy(logits, target, *eps)
    ref = manual_balanced(logits, target, *eps, weight=1.0)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_truncated_ce_is_finite_at_extreme_probabilities_and_low_precision():
    logits = torch.tensor([[3e4, -3e4, 0.0], [-3e4, 3e4, 0.0]]).view(1, 2, 1, 3).repeat(1, 1, 2, 1)
    target = torch.tensor([[0, 0, 1], [1, 0, 0]]).view(1, 2, 3)  # p = 1, p = 0, p = 1/2 ...
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z = logits.to(dtype).requires_grad_()
        for loss_fn in (TruncatedCrossEntropyLoss(), BalancedLoss(window=3)):
            loss = loss_fn(z, target)
            (grad,) = torch.autograd.grad(loss, z)
            assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.dtype == dtype
    # p -> 0 sits on the linear tail: per-pixel loss (1 - 0.7)/0.3 + t_sup - t_inf = 1 + ln(7/3)
    z = torch.tensor([-3e4, 3e4]).view(1, 2, 1, 1)
    value = truncated_cross_entropy(z, torch.zeros(1, 1, 1, dtype=torch.long))
    assert value.item() == pytest.approx(1 + math.log(7 / 3), rel=1e-6)
    # under bf16 autocast the network emits bf16 logits; the loss still computes in float32
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    torch.nn.init.constant_(conv.weight, 50.0)
    x = torch.randn(2, 3, 16, 16)
    target = torch.randint(0, 4, (2, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        assert out.dtype == torch.bfloat16
        loss = BalancedLoss()(out, target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(conv.weight.grad).all()


# ---------------------------------------------------------------------------- class weights
def test_class_weights_per_image_by_hand():
    target = torch.zeros(2, 10, 10, dtype=torch.long)
    target[0, :5, 0] = 1  # image 0: 5 % class 1
    target[1, :, :2] = 2  # image 1: 20 % class 2, 2 % class 1
    target[1, :2, 5] = 1
    weights = class_weight_map(target, 3, beta=0.99)
    w = lambda n_dom, n: (1 - 0.99**n_dom) / (1 - 0.99**n)  # noqa: E731
    assert weights[0, 0, 0].item() == pytest.approx(w(95, 5), rel=1e-5)  # about 12.6
    assert weights[0, 9, 9].item() == 1.0
    assert weights[1, 0, 0].item() == pytest.approx(w(78, 20), rel=1e-5)
    assert weights[1, 0, 5].item() == pytest.approx(w(78, 2), rel=1e-5)
    # per image: class 1 weighs differently in the two images
    assert weights[0, 0, 0].item() != pytest.approx(weights[1, 0, 5].item())
    # in pixels, as the formula is written
    pixels = class_weight_map(target, 3, beta=0.99, unit="pixels")
    assert pixels[0, 0, 0].item() == pytest.approx(w(95, 5), rel=1e-5)  # 100-pixel images: same numbers
    big = target.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 4x the pixels, same shares
    assert class_weight_map(big, 3)[0, 0, 0].item() == pytest.approx(weights[0, 0, 0].item(), rel=1e-5)
    assert class_weight_map(big, 3, unit="pixels")[0, 0, 0].item() == pytest.approx(w(380, 20), rel=1e-5)


def test_class_weights_beta_limits_and_paper_range():
    target = torch.zeros(3, 20, 20, dtype=torch.long)
    target[0, :2, :6] = 1  # 3 %
    target[1, :4, :5] = 1  # 5 %
    target[2, :4, :10] = 1  # 10 %
    assert torch.equal(class_weight_map(target, 2, beta=0.0), torch.ones(3, 20, 20))
    rare = class_weight_map(target, 2, beta=0.99)[:, 0, 0]
    assert rare.tolist() == pytest.approx([20.97, 12.55, 6.22], abs=0.01)  # the paper's 6 to 20
    assert 6 <= rare.min() and rare.max() <= 21
    inverse = class_weight_map(target, 2, beta=1.0)[:, 0, 0]
    assert inverse.tolist() == pytest.approx([97 / 3, 95 / 5, 90 / 10], rel=1e-5)
    assert class_weight_map(target, 2, beta=0.99, max_weight=10.0)[:, 0, 0].tolist() == pytest.approx(
        [10.0, 10.0, 6.22], abs=0.01
    )
    free = torch.zeros(1, 8, 8, dtype=torch.long)  # a defect-free image: weight 1 everywhere
    assert torch.equal(class_weight_map(free, 4), torch.ones(1, 8, 8))


def test_class_weights_ignore_pixels_and_counts():
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :5, 0] = 1
    target[0, 5:, :] = IGNORE  # half the image unlabelled: class 1 covers 10 % of the labelled part
    counts = class_pixel_counts(target, 2)
    assert counts.tolist() == [[45.0, 5.0]]
    weights = class_weight_map(target, 2, beta=0.99)
    assert weights[0, 0, 0].item() == pytest.approx((1 - 0.99**90) / (1 - 0.99**10), rel=1e-5)
    assert (weights[0, 5:] == 0).all()
    raw = effective_number_weights(torch.tensor([[0.0, 50.0, 50.0]]), beta=0.5)
    assert raw.tolist() == [[0.0, 1.0, 1.0]]  # absent classes 0, ties 1


# ---------------------------------------------------------------------------- confusion x class weights
def test_pixel_weights_equal_the_product_of_the_two_maps_on_every_route():
    # the loss multiplies the confusion weights into the class weights in place; compare with the
    # two public maps computed apart: a defect-free image (the subset route), ignore pixels,
    # r = 1, and 25 classes (too many digits to pack: the dense route)
    torch.manual_seed(4)
    for num_classes in (6, 25):
        target = torch.zeros(4, 21, 19, dtype=torch.long)  # image 3 stays defect-free
        target[0, 4:15, 5:14] = 1
        target[1, 8:, :] = torch.randint(0, num_classes, (13, 19))
        target[2, 2:20:3, :] = num_classes - 1
        target[0, :2] = IGNORE
        for window in (1, 3, 7):
            loss = BalancedLoss(window=window)
            expected = class_weight_map(target, num_classes) * confusion_suppression_map(
                target, num_classes, window, method="dense"
            )
            torch.testing.assert_close(loss.pixel_weights(target, num_classes), expected, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(loss.pixel_weights(target[:3], num_classes), expected[:3], atol=1e-6, rtol=1e-6)
            assert (expected[0, :2] == 0).all() and (expected[3] == 1).all()


# ---------------------------------------------------------------------------- the loss
def test_balanced_loss_with_every_component_off_is_cross_entropy_exactly():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, 0] = IGNORE
    loss = BalancedLoss(class_weighting=False, truncation=False, confusion_suppression=False)
    assert torch.equal(loss(logits, target), F.cross_entropy(logits, target, ignore_index=IGNORE))


def test_balanced_loss_equals_its_formula_with_each_component():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 12, 10, requires_grad=True)
    target = torch.zeros(2, 12, 10, dtype=torch.long)
    target[0, 3:7, 2:6] = 1
    target[1, 5:, 4:] = 2
    target[1, 0, :] = IGNORE
    m_class = class_weight_map(target, 3, beta=0.9)
    m_conf = confusion_suppression_map(target, 3, window=5)
    cases = {
        (True, True, True): (0.3, 0.7, m_class * m_conf),
        (True, False, False): (0.0, 1.0, m_class),
        (False, True, False): (0.3, 0.7, 1.0),
        (False, False, True): (0.0, 1.0, m_conf),
        (True, True, False): (0.3, 0.7, m_class),
    }
    for (cw, tr, cs), (e_inf, e_sup, weight) in cases.items():
        loss = BalancedLoss(beta=0.9, window=5, class_weighting=cw, truncation=tr, confusion_suppression=cs)
        ours = loss(logits, target)
        ref = manual_balanced(logits, target, e_inf, e_sup, weight)
        torch.testing.assert_close(ours, ref, msg=f"value with {(cw, tr, cs)}")
        torch.testing.assert_close(
            torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0], msg=f"grad with {(cw, tr, cs)}"
        )
    full = BalancedLoss(beta=0.9, window=5)
    assert torch.equal(full.pixel_weights(target, 3), m_class * m_conf)
    none = BalancedLoss(beta=0.9, window=5, reduction="none")(logits, target)
    assert none.shape == (2, 12, 10) and (none[1, 0] == 0).all()
    total = BalancedLoss(beta=0.9, window=5, reduction="sum")(logits, target)
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(full(logits, target), total / (target != IGNORE).sum())


def test_balanced_loss_edge_cases_and_errors():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    all_ignored = torch.full((1, 4, 4), IGNORE)
    loss = BalancedLoss()(logits, all_ignored)
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()
    free = torch.zeros(1, 4, 4, dtype=torch.long)  # defect-free: every weight is 1
    torch.testing.assert_close(BalancedLoss(truncation=False)(logits, free), F.cross_entropy(logits, free))
    with pytest.raises(ValueError, match="label 7 but the logits have 3 classes"):
        BalancedLoss()(logits, torch.full((1, 4, 4), 7))
    with pytest.raises(ValueError, match="eps_inf <= eps_sup"):
        BalancedLoss(eps_inf=0.8, eps_sup=0.5)
    with pytest.raises(ValueError, match="odd integer"):
        BalancedLoss(window=4)
    with pytest.raises(ValueError, match="beta must be in"):
        BalancedLoss(beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        BalancedLoss(reduction="avg")


def test_balanced_loss_from_the_registry_and_a_sum():
    loss = build_loss("balanced + 0.5 * dice", loss_kwargs={"balanced": {"beta": 0.9, "window": 5}})
    assert isinstance(loss, CombinedLoss) and loss.weights == [1.0, 0.5]
    assert isinstance(loss.losses[0], BalancedLoss) and loss.losses[0].beta == 0.9 and loss.losses[0].window == 5
    assert isinstance(loss.losses[1], DiceLoss)
    single = build_loss("balanced", loss_kwargs={"balanced": {"eps_inf": 0.2}})
    assert isinstance(single, BalancedLoss) and single.eps_inf == 0.2
    assert isinstance(build_loss("truncated_ce"), TruncatedCrossEntropyLoss)


def test_balanced_loss_trains_the_synthetic_quickstart_without_nan(tmp_path):
    torch.manual_seed(0)
    dm = SyntheticDefectsDataModule(num_images=24, image_size=64, batch_size=4)
    model = SegmentationModule(
        num_classes=dm.num_classes,
        class_names=dm.class_names,
        loss="balanced + 0.5 * dice",
        loss_kwargs={"balanced": {"beta": 0.9}},
        encoder_depth=3,
        decoder_channels=[16, 8, 8],
    )
    assert model.hparams.loss_kwargs == {"balanced": {"beta": 0.9}}
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=3)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss_balanced", "train/loss_dice", "val/loss"):
        assert torch.isfinite(metrics[key]), key
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_second_backward_through_the_same_graph_raises_a_clear_error():
    logits = torch.randn(2, 3, 5, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 5))
    loss = BalancedLoss()(logits, target)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    with pytest.raises(RuntimeError, match="runs once per forward"):
        loss.backward()
    logits.grad = None
    BalancedLoss()(logits, target).backward()  # a new forward is fine and gives the same gradient
    torch.testing.assert_close(logits.grad, first)
