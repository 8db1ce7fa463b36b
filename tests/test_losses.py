"""The loss zoo: hand-computed values and gradients, the common contract, the registry, YAML."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers.trainer import quiet_trainer
from jsonargparse import ArgumentParser

from defectseg.data import SyntheticDefectsDataModule
from defectseg.losses import (
    BalancedLoss,
    BCEDiceLoss,
    BinaryCrossEntropyLoss,
    ClassBalancedLoss,
    CombinedLoss,
    DiceLoss,
    FocalLoss,
    LovaszSoftmaxLoss,
    SigmoidDiceLoss,
    TverskyLoss,
    WeightedCrossEntropyLoss,
    available_losses,
    build_loss,
    class_balanced_weights,
    frequency_weights,
    register_loss,
)
from defectseg.models import SegmentationModule

IGNORE = 255
TINY = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}
# arguments the data-derived losses need when used outside a SegmentationModule
NEEDS = {"wce": {"class_frequencies": [0.7, 0.2, 0.1]}, "class_balanced": {"samples_per_class": [700, 200, 100]}}


def two_class(probs: list[float]) -> torch.Tensor:
    """(1, 2, 1, N) logits whose class-0 softmax probabilities are ``probs``."""
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()]).float().view(1, 2, 1, -1)


def assert_same_gradient(ours, ref, logits):
    """Gradients of a float32 loss and of its float64 reference agree to float32 precision."""
    got, want = (torch.autograd.grad(v, logits)[0].double() for v in (ours, ref))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def random_batch(num_classes=3, seed=0, shape=(2, 6, 5)):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], num_classes, *shape[1:], generator=gen)
    target = torch.randint(0, num_classes, shape, generator=gen)
    target[0, 0, :3] = IGNORE
    target[1, -1, 1] = IGNORE
    return logits, target


# ---------------------------------------------------------------------------- hand values
def test_ce_and_focal_by_hand():
    logits = two_class([0.8, 0.4]).requires_grad_()
    target = torch.tensor([[[0, 1]]])
    ce = build_loss("ce")(logits, target)
    assert ce.item() == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, rel=1e-6)
    ce.backward()
    softmax = torch.tensor([[0.8, 0.4], [0.2, 0.6]]).view(1, 2, 1, 2)
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    torch.testing.assert_close(logits.grad, (softmax - onehot) / 2)
    focal = FocalLoss(gamma=2.0, alpha=[0.25, 0.75])(logits, target)
    expected = -(0.25 * 0.2**2 * math.log(0.8) + 0.75 * 0.4**2 * math.log(0.6)) / 2
    assert focal.item() == pytest.approx(expected, rel=1e-6)
    logits, target = random_batch()
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target, ignore_index=IGNORE))


def test_focal_gradient_matches_its_formula():
    logits, target = random_batch(4, seed=3)
    logits.requires_grad_()
    ours = FocalLoss(gamma=2.0, alpha=[1.0, 2.0, 0.5, 1.5])(logits, target)
    valid = target != IGNORE
    safe = torch.where(valid, target, 0)
    p = logits.double().softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
    alpha = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)[safe]
    ref = (-(alpha * (1 - p) ** 2 * p.log()))[valid].mean()
    torch.testing.assert_close(ours.double(), ref)
    assert_same_gradient(ours, ref, logits)


def test_dice_by_hand_and_on_an_all_background_batch():
    logits = two_class([0.8, 0.4])
    target = torch.tensor([[[0, 1]]])
    dice0 = (2 * 0.8 + 1) / (1.2 + 1 + 1)
    dice1 = (2 * 0.6 + 1) / (0.8 + 1 + 1)
    assert DiceLoss()(logits, target).item() == pytest.approx(1 - (dice0 + dice1) / 2, rel=1e-6)
    # all background: a perfect prediction costs 0; predicted defect mass is penalised
    background = torch.zeros(1, 1, 4, dtype=torch.long)
    perfect = torch.tensor([100.0, -100.0]).view(1, 2, 1, 1).expand(1, 2, 1, 4)
    assert DiceLoss()(perfect, background).item() == 0.0
    logits = two_class([0.9, 0.9, 1.0 - 1e-7, 0.7])
    mass = 0.1 + 0.1 + 1e-7 + 0.3
    expected = 1 - ((2 * (4 - mass) + 1) / (2 * 4 - mass + 1) + 1 / (mass + 1)) / 2
    assert DiceLoss()(logits, background).item() == pytest.approx(expected, rel=1e-5)
    # gradient against the formula in float64
    logits, target = random_batch(3, seed=4)
    logits.requires_grad_()
    ours = DiceLoss(smooth=0.5)(logits, target)
    valid = (target != IGNORE).unsqueeze(1).double()
    probs = logits.double().softmax(1) * valid
    onehot = F.one_hot(torch.where(target == IGNORE, 0, target), 3).permute(0, 3, 1, 2).double() * valid
    inter, card = (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    ref = 1 - ((2 * inter + 0.5) / (card + 0.5)).mean()
    torch.testing.assert_close(ours.double(), ref)
    assert_same_gradient(ours, ref, logits)


def test_dice_absent_drop_averages_only_the_classes_present_in_the_batch():
    # all background, with predicted defect mass: "include" penalises it, "drop" keeps only class 0
    background = torch.zeros(1, 1, 4, dtype=torch.long)
    logits = two_class([0.9, 0.9, 0.8, 0.7])
    mass = 0.1 + 0.1 + 0.2 + 0.3
    dice0 = (2 * (4 - mass) + 1) / (2 * 4 - mass + 1)
    assert DiceLoss(absent="drop")(logits, background).item() == pytest.approx(1 - dice0, rel=1e-5)
    assert DiceLoss(absent="include")(logits, background).item() == pytest.approx(
        1 - (dice0 + 1 / (mass + 1)) / 2, rel=1e-5
    )
    # three classes, class 2 absent, one pixel ignored: the mean runs over classes 0 and 1 only
    logits, target = random_batch(3, seed=7)
    target = torch.where(target == 2, torch.zeros_like(target), target)
    assert (target == 1).any() and not (target == 2).any()
    valid = (target != IGNORE).unsqueeze(1).double()
    probs = logits.double().softmax(1) * valid
    onehot = F.one_hot(torch.where(target == IGNORE, 0, target), 3).permute(0, 3, 1, 2).double() * valid
    inter, card = (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    per_class = (2 * inter + 1) / (card + 1)
    assert DiceLoss(absent="drop")(logits, target).item() == pytest.approx(1 - per_class[:2].mean().item(), rel=1e-5)
    no_bg = DiceLoss(absent="drop", include_background=False)(logits, target)
    assert no_bg.item() == pytest.approx(1 - per_class[1].item(), rel=1e-5)
    # no class kept (background excluded, an all-background batch): 0 with a gradient path
    empty = DiceLoss(absent="drop", include_background=False)(logits.requires_grad_(), torch.zeros_like(target))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="absent must be 'include' or 'drop', got 'skip'"):
        DiceLoss(absent="skip")


def test_tversky_by_hand_and_as_dice():
    logits = two_class([0.8, 0.4])
    target = torch.tensor([[[0, 1]]])
    ti0 = (0.8 + 1) / (0.8 + 0.3 * 0.4 + 0.7 * 0.2 + 1)
    ti1 = (0.6 + 1) / (0.6 + 0.3 * 0.2 + 0.7 * 0.4 + 1)
    assert TverskyLoss()(logits, target).item() == pytest.approx(1 - (ti0 + ti1) / 2, rel=1e-6)
    focal = TverskyLoss(gamma=2.0)(logits, target)
    assert focal.item() == pytest.approx(((1 - ti0) ** 2 + (1 - ti1) ** 2) / 2, rel=1e-5)
    logits, target = random_batch(4, seed=5)
    logits.requires_grad_()
    tversky = TverskyLoss(alpha=0.5, beta=0.5, smooth=2.0)(logits, target)
    dice = DiceLoss(smooth=4.0)(logits, target)
    torch.testing.assert_close(tversky, dice)
    torch.testing.assert_close(torch.autograd.grad(tversky, logits)[0], torch.autograd.grad(dice, logits)[0])


def lovasz_reference(probs: torch.Tensor, target: torch.Tensor, classes: str) -> torch.Tensor:
    """Lovász extension from its definition: sorted errors times increments of |S| / |F ∪ S|."""
    valid = (target != IGNORE).flatten()
    flat_probs = probs.permute(1, 0, 2, 3).reshape(probs.shape[1], -1)[:, valid]
    labels = target.flatten()[valid].tolist()
    losses = []
    for c in range(probs.shape[1]):
        fg = {i for i, y in enumerate(labels) if y == c}
        if classes == "present" and not fg:
            continue
        errors = [(1.0 if i in fg else 0.0) - flat_probs[c, i] for i in range(len(labels))]
        errors = [e.abs() for e in errors]
        order = sorted(range(len(errors)), key=lambda i: -errors[i].item())
        total, previous, chosen = 0.0, 0.0, set()
        for i in order:
            chosen.add(i)
            delta = len(chosen) / len(fg | chosen)
            total = total + errors[i] * (delta - previous)
            previous = delta
        losses.append(total)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("classes", ["present", "all"])
def test_lovasz_against_its_definition(classes):
    logits, target = random_batch(3, seed=6, shape=(2, 3, 4))
    target[target == 2] = 0  # class 2 absent: "present" and "all" differ
    logits = logits.double().requires_grad_()
    ours = LovaszSoftmaxLoss(classes=classes)(logits, target)
    ref = lovasz_reference(logits.double().softmax(1), target, classes)
    torch.testing.assert_close(ours.double(), ref.double())
    assert_same_gradient(ours, ref, logits)
    per_image = LovaszSoftmaxLoss(classes=classes, per_image=True)(logits, target)
    expected = torch.stack([lovasz_reference(logits[i : i + 1].softmax(1), target[i : i + 1], classes) for i in range(2)])
    torch.testing.assert_close(per_image.double(), expected.mean().double())


def test_lovasz_by_hand_on_two_pixels():
    # delta(S) = |S| / |F u S|. Class 0, F = {0}: errors 0.2 (pixel 0), 0.4 (pixel 1, p0 = 0.4);
    # sorted: pixel 1 (S = {1}: 1/2), pixel 0 (S = {0, 1}: 2/2) -> 0.4 * 1/2 + 0.2 * 1/2 = 0.3.
    # Class 1, F = {1}: errors 0.2 (pixel 0), 0.4 (pixel 1); pixel 1 first (S = {1} inside F: 1/1),
    # then pixel 0 (2/2: increment 0) -> 0.4. Mean over the two present classes: 0.35.
    logits = two_class([0.8, 0.4])
    assert LovaszSoftmaxLoss()(logits, torch.tensor([[[0, 1]]])).item() == pytest.approx(0.35, rel=1e-6)


def test_bce_and_sigmoid_dice_by_hand():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).requires_grad_()
    target = torch.ones(1, 1, 1, dtype=torch.long)
    bce = BinaryCrossEntropyLoss()(logits, target)  # sigmoid 0.5 (y = 0) and 0.75 (y = 1)
    assert bce.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-6)
    bce.backward()
    torch.testing.assert_close(logits.grad.flatten(), torch.tensor([0.5, -0.25]) / 2)
    assert BinaryCrossEntropyLoss(include_background=False)(logits, target).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    # pooled sigmoid Dice over the defect channels 1 and 2 of two pixels
    p = torch.tensor([[0.5, 0.9, 0.2], [0.6, 0.3, 0.8]])  # (pixel, channel) sigmoids
    logits = (p / (1 - p)).log().T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[1, 0]]])
    inter, card = 0.9, 0.9 + 0.2 + 0.3 + 0.8 + 1
    assert SigmoidDiceLoss()(logits, target).item() == pytest.approx(1 - (2 * inter + 1) / (card + 1), rel=1e-5)
    per_class = 1 - ((2 * 0.9 + 1) / (1.2 + 1 + 1) + 1 / (1.0 + 1)) / 2
    assert SigmoidDiceLoss(pooled=False)(logits, target).item() == pytest.approx(per_class, rel=1e-5)


def test_bce_plus_dice_is_the_dli_loss():
    logits, target = random_batch(4, seed=7)
    dli = build_loss("bce+dice")
    assert isinstance(dli, BCEDiceLoss) and isinstance(build_loss(" BCE + dice "), BCEDiceLoss)
    assert isinstance(build_loss("bce_dice"), BCEDiceLoss) and dli.weights == [0.5, 0.5]
    expected = 0.5 * BinaryCrossEntropyLoss()(logits, target) + 0.5 * SigmoidDiceLoss()(logits, target)
    torch.testing.assert_close(dli(logits, target), expected)
    assert set(dli.last_terms) == {"bce", "sigmoid_dice"}
    plain = build_loss("1*bce + 1*dice")  # the literal sum of the registered bce and (softmax) dice
    assert isinstance(plain, CombinedLoss) and not isinstance(plain, BCEDiceLoss)
    assert [type(m) for m in plain.losses] == [BinaryCrossEntropyLoss, DiceLoss] and plain.weights == [1.0, 1.0]
    tuned = build_loss("bce+dice", loss_kwargs={"bce+dice": {"smooth": 1e-8}})
    assert tuned.losses[1].smooth == 1e-8


def test_wce_given_and_derived_weights():
    logits = two_class([0.8, 0.4])
    target = torch.tensor([[[0, 1]]])
    value = WeightedCrossEntropyLoss(weight=[1.0, 3.0])(logits, target)
    assert value.item() == pytest.approx(-(math.log(0.8) + 3 * math.log(0.6)) / 4, rel=1e-6)
    loss = WeightedCrossEntropyLoss(class_frequencies=[0.9, 0.1])
    torch.testing.assert_close(loss.weight, torch.tensor([1 / 0.9, 10.0]) / 2)  # sum_k f_k w_k = 1
    assert not loss.wants_class_statistics
    assert frequency_weights([0.75, 0.25], "inverse_sqrt") == pytest.approx(
        [w / (0.75 / math.sqrt(0.75) + 0.25 / math.sqrt(0.25)) for w in (1 / math.sqrt(0.75), 2.0)]
    )
    enet = [1 / math.log(1.02 + f) for f in (0.75, 0.25)]
    norm = 0.75 * enet[0] + 0.25 * enet[1]
    assert frequency_weights([0.75, 0.25], "log") == pytest.approx([w / norm for w in enet])
    assert frequency_weights([0.9, 0.1], max_weight=2.0) == pytest.approx([1 / 1.8, 2.0])
    with pytest.warns(UserWarning, match=r"classes \[2\] have frequency 0"):
        assert frequency_weights([0.5, 0.5, 0.0]) == pytest.approx([1.0, 1.0, 1.0])
    auto = WeightedCrossEntropyLoss()
    assert auto.wants_class_statistics
    with pytest.raises(RuntimeError, match="no class statistics yet"):
        auto(logits, target)
    auto.set_class_statistics([0.9, 0.1])
    torch.testing.assert_close(auto(logits, target), loss(logits, target))
    with pytest.raises(ValueError, match="2 class weights but the logits have 3"):
        auto(torch.zeros(1, 3, 1, 2), target)


def test_class_balanced_weights_and_value_by_hand():
    raw = [(1 - 0.9) / (1 - 0.9**n) for n in (100, 10, 1)]
    expected = [3 * w / sum(raw) for w in raw]
    assert class_balanced_weights([100, 10, 1], 0.9) == pytest.approx(expected, rel=1e-12)
    assert class_balanced_weights([5, 0], 0.5) == pytest.approx(class_balanced_weights([5, 1], 0.5))
    close_to_one = class_balanced_weights([1e7, 1e5], 1 - 1e-6)  # pixel counts need beta near 1
    assert close_to_one[1] / close_to_one[0] == pytest.approx((1 - math.exp(1e7 * math.log1p(-1e-6))) / (1 - math.exp(1e5 * math.log1p(-1e-6))), rel=1e-9)
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [2, 0]]])
    loss = ClassBalancedLoss(beta=0.9, samples_per_class=[100, 10, 1])
    ce = F.cross_entropy(logits, target, reduction="none")
    weights = torch.tensor(expected, dtype=torch.float32)[target]
    torch.testing.assert_close(loss(logits, target), (weights * ce).mean())
    focal = ClassBalancedLoss(beta=0.9, samples_per_class=[100, 10, 1], gamma=2.0)(logits, target)
    p = (-ce).exp()
    torch.testing.assert_close(focal, (weights * (1 - p) ** 2 * ce).mean())
    flat = ClassBalancedLoss(beta=0.0, samples_per_class=[100, 10, 1])
    torch.testing.assert_close(flat(logits, target), F.cross_entropy(logits, target))
    auto = ClassBalancedLoss(beta=0.9)
    with pytest.raises(ValueError, match="needs class pixel counts"):
        auto.set_class_statistics([0.9, 0.09, 0.01])
    auto.set_class_statistics([0.9, 0.09, 0.01], [100.0, 10.0, 1.0])
    torch.testing.assert_close(auto(logits, target), loss(logits, target))


# ---------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", [n for n in available_losses()])
def test_every_loss_honours_ignore_index_and_gives_finite_gradients(name):
    loss_fn = build_loss(name, loss_kwargs=NEEDS.get(name))
    logits, target = random_batch(3, seed=8, shape=(2, 8, 9))
    logits.requires_grad_()
    value = loss_fn(logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, logits)
    ignored = (target == IGNORE).unsqueeze(1).expand_as(grad)
    assert torch.isfinite(grad).all() and (grad[ignored] == 0).all() and grad.abs().sum() > 0
    changed = logits.detach().clone()
    changed[ignored] = 50.0  # whatever the network says on ignored pixels does not matter
    torch.testing.assert_close(loss_fn(changed, target), value.detach())
    everything_ignored = loss_fn(logits, torch.full_like(target, IGNORE))
    (grad,) = torch.autograd.grad(everything_ignored, logits)
    assert torch.isfinite(everything_ignored) and (grad == 0).all()
    with pytest.raises(ValueError, match=r"logits must be \(B, C, H, W\)"):
        loss_fn(logits[0], target)


@pytest.mark.parametrize("name", [n for n in available_losses()])
def test_every_loss_on_an_all_background_batch_prefers_predicting_background(name):
    loss_fn = build_loss(name, loss_kwargs=NEEDS.get(name))
    target = torch.zeros(2, 6, 6, dtype=torch.long)
    confident = torch.tensor([6.0, -6.0, -6.0]).view(1, 3, 1, 1).expand(2, 3, 6, 6).clone()
    false_positive = confident.clone()
    false_positive[:, :, 2:4, 2:4] = torch.tensor([-6.0, 6.0, -6.0]).view(1, 3, 1, 1)
    good, bad = loss_fn(confident, target), loss_fn(false_positive, target)
    assert torch.isfinite(good) and torch.isfinite(bad) and bad > good


def test_more_than_two_classes_and_bad_labels():
    logits, target = random_batch(5, seed=9)
    for name in ("lovasz", "tversky", "bce", "balanced", "class_balanced"):
        kwargs = {"samples_per_class": [5, 4, 3, 2, 1]} if name == "class_balanced" else None
        assert torch.isfinite(build_loss(name, loss_kwargs=kwargs)(logits, target))
    bad = target.clone()
    bad[0, 1, 1] = 5
    for name in ("lovasz", "tversky", "bce", "sigmoid_dice", "balanced", "truncated_ce"):
        with pytest.raises(ValueError, match="label 5 but the logits have 5 classes"):
            build_loss(name)(logits, bad)


# ---------------------------------------------------------------------------- registry
def test_registry_names_aliases_and_arguments():
    assert {"ce", "wce", "focal", "dice", "lovasz", "tversky", "class_balanced", "bce+dice", "balanced"} <= set(
        available_losses()
    )
    focal = build_loss("focal", loss_kwargs={"focal": {"gamma": 1.0}})  # nested form for one name
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.0
    with pytest.raises(ValueError, match=r"unknown arguments \['gama'\]"):
        build_loss("focal", loss_kwargs={"gama": 1.0})
    with pytest.raises(ValueError, match=r"not terms of"):
        build_loss("ce + dice", loss_kwargs={"ce": {}, "lovasz": {}})
    with pytest.raises(ValueError, match="lower-case identifiers"):
        register_loss("a+b")
    with pytest.raises(ValueError, match="already names the loss 'bce_dice'"):
        register_loss("other_dli", aliases=("bce + dice",))(BCEDiceLoss)


def test_losses_from_yaml_class_path_and_loss_kwargs():
    parser = ArgumentParser()
    parser.add_class_arguments(SegmentationModule, "model")
    config = yaml.safe_load(
        """
        model:
          num_classes: 3
          encoder_depth: 3
          decoder_channels: [16, 8, 8]
          loss:
            class_path: defectseg.losses.BalancedLoss
            init_args: {beta: 0.9, window: 5, confusion_suppression: false}
        """
    )
    init = parser.instantiate_classes(parser.parse_object(config))
    loss = init.model.loss_fn
    assert isinstance(loss, BalancedLoss) and loss.beta == 0.9 and loss.window == 5 and not loss.confusion_suppression
    model = SegmentationModule(num_classes=3, loss="balanced + 0.5 * dice", loss_kwargs={"balanced": {"beta": 0.9}}, **TINY)
    assert isinstance(model.loss_fn, CombinedLoss) and model.loss_fn.losses[0].beta == 0.9


def fit_one_step(tmp_path, model, data):
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, data)


def test_segmentation_module_hands_the_training_statistics_to_auto_weighted_losses(tmp_path):
    dm = SyntheticDefectsDataModule(
        num_images=12, image_size=32, batch_size=4, class_weights=[1, 1, 1, 1], defect_free_fraction=0.2
    )
    model = SegmentationModule(num_classes=dm.num_classes, loss="wce + class_balanced", **TINY)
    wce, balanced = model.loss_fn.losses
    assert wce.weight is None and balanced.weight is None
    fit_one_step(tmp_path, model, dm)
    frequencies = dm.class_pixel_frequencies("train")
    torch.testing.assert_close(wce.weight, torch.tensor(frequency_weights(frequencies)))
    total = sum(s.num_pixels for s in dm.samples_of("train"))
    expected = class_balanced_weights([f * total for f in frequencies], balanced.beta)
    torch.testing.assert_close(balanced.weight, torch.tensor(expected, dtype=torch.float32))
    assert wce.weight[0] < wce.weight[1:].min()  # the background is the most frequent class
    # derived weights stay out of checkpoints: a reloaded model gets them again in setup()
    assert not [key for key in model.state_dict() if key.startswith("loss_fn")]
    given = SegmentationModule(num_classes=dm.num_classes, loss="wce", loss_kwargs={"weight": [1, 2, 3, 4, 5]}, **TINY)
    assert not given.loss_fn.wants_class_statistics


def test_auto_weights_without_statistics_raise_a_clear_error(tmp_path):
    dm = SyntheticDefectsDataModule(num_images=12, image_size=32, batch_size=4)
    dm.setup("fit")
    model = SegmentationModule(num_classes=dm.num_classes, loss="wce", **TINY)
    with pytest.raises(ValueError, match=r"WeightedCrossEntropyLoss.*class_pixel_frequencies"):
        fit_one_step(tmp_path, model, dm.train_dataloader())


def test_soft_counts_by_hand_and_dice_tversky_agree_on_them():
    from defectseg.losses.basic import soft_counts

    # one image, 3 pixels: targets 0, 1 and ignored; probabilities of classes 0 and 1
    probs = torch.tensor([[[[0.8, 0.3, 0.5]], [[0.2, 0.7, 0.5]]]])
    target = torch.tensor([[[0, 1, 255]]])
    tp, fp, fn = soft_counts(probs, target, 255)
    assert torch.allclose(tp, torch.tensor([0.8, 0.7]))  # the ignored pixel counts nowhere
    assert torch.allclose(fp, torch.tensor([0.3, 0.2]))
    assert torch.allclose(fn, torch.tensor([0.2, 0.3]))
    pooled = soft_counts(probs, target, 255, channels=slice(1, None), dims=(0, 1, 2, 3))
    assert [round(float(v), 6) for v in pooled] == [0.7, 0.2, 0.3]
    # Tversky with alpha = beta = 0.5 is Dice with smooth doubled (the docstring's claim)
    logits = torch.randn(2, 3, 5, 6)
    labels = torch.randint(0, 3, (2, 5, 6))
    tversky = TverskyLoss(alpha=0.5, beta=0.5, smooth=1.0)(logits, labels)
    dice = DiceLoss(smooth=2.0)(logits, labels)
    assert torch.allclose(tversky, dice, atol=1e-6)
