"""UAPS: network, perturbations, pseudo-labels, uncertainty, ramp, semi-supervised data, CLI."""

from __future__ import annotations

import csv
import math
import warnings
from collections import Counter
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
import yaml

from defectseg.cli import DefectSegCLI
from defectseg.data import SyntheticDefectsDataModule
from defectseg.data.semi import labeled_split
from defectseg.losses import DiceLoss, FocalLoss
from defectseg.models import SegmentationModule, UAPSModule, UAPSNet, build_network, load_weights
from defectseg.models.uaps import (
    find_dice,
    kl_uncertainty,
    mix_pseudo_labels,
    rampup,
    sample_mixing_weights,
    uaps_unsupervised_loss,
    valid_pixels,
)
from defectseg.models.uaps_net import (
    FeaturePerturbation,
    attention_feature_drop,
    feature_dropout,
    feature_noise,
)

TINY = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}
REPO = Path(__file__).resolve().parents[1]


def tiny_net(**kwargs) -> UAPSNet:
    kwargs.setdefault("num_classes", 3)
    return UAPSNet(**{**TINY, **kwargs})


def copy_main_into_aux(net: UAPSNet) -> None:
    for branch in net.aux_decoders:
        branch.decoder.load_state_dict(net.decoder.state_dict())
        branch.segmentation_head.load_state_dict(net.segmentation_head.state_dict())


# ---------------------------------------------------------------- network
def test_every_decoder_outputs_full_size_logits():
    torch.manual_seed(0)
    net = tiny_net(num_aux_decoders=3)
    x = torch.randn(2, 3, 64, 96)
    for mode in (True, False):
        net.train(mode)
        outputs = net.forward_all(x)
        assert len(outputs) == 4 == net.num_decoders
        assert all(o.shape == (2, 3, 64, 96) for o in outputs)
    assert net.decoder_names == ["main", "aux1_noise", "aux2_dropout", "aux3_feature_drop"]
    assert net(x).shape == (2, 3, 64, 96)
    # the module pads odd sizes and crops every decoder's output back
    module = UAPSModule(num_classes=4, num_aux_decoders=2, perturbations=["noise+dropout"], **TINY)
    outputs = module.forward_all(torch.randn(1, 3, 37, 45))
    assert [tuple(o.shape) for o in outputs] == [(1, 4, 37, 45)] * 3
    assert module.decoder_names == ["main", "aux1_noise+dropout", "aux2_noise+dropout"]
    # another architecture shares its encoder the same way
    fpn = UAPSNet(arch="FPN", encoder_depth=5, num_classes=2, num_aux_decoders=1).eval()
    assert [tuple(o.shape) for o in fpn.forward_all(torch.randn(1, 3, 64, 64))] == [(1, 2, 64, 64)] * 2


def test_auxiliary_decoders_are_independent_and_main_names_match_smp():
    net = tiny_net(num_aux_decoders=2)
    main = net.decoder.state_dict()
    aux = net.aux_decoders[0].decoder.state_dict()
    conv = next(k for k in main if k.endswith("weight") and main[k].ndim == 4)
    assert not torch.equal(main[conv], aux[conv]), "auxiliary decoders start from their own random weights"
    plain = build_network("Unet", num_classes=3, **TINY)
    assert set(net.main_state_dict()) == set(plain.state_dict())


def test_perturbations_act_only_on_auxiliary_decoders_and_only_in_training():
    torch.manual_seed(0)
    net = tiny_net(num_aux_decoders=3)
    copy_main_into_aux(net)  # identical decoders: any difference comes from the perturbations
    x = torch.randn(2, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        reference = net(x)
        for output in net.forward_all(x):
            torch.testing.assert_close(output, reference)
    net.train()
    with torch.no_grad():
        clean = net(x)  # training-mode batch norm, no auxiliary decoder involved
        main, *aux = net.forward_all(x)
    torch.testing.assert_close(main, clean)
    for output in aux:
        assert (output - clean).abs().max() > 1e-3
    # perturb=True in eval mode perturbs (for uncertainty figures), perturb=False never does
    net.eval()
    with torch.no_grad():
        assert all((o - reference).abs().max() > 1e-3 for o in net.forward_all(x, perturb=True)[1:])
        net.train()
        for output in net.forward_all(x, perturb=False)[1:]:
            torch.testing.assert_close(output, clean)
    # "none" leaves an auxiliary decoder unperturbed even in training
    quiet = tiny_net(num_aux_decoders=1, perturbations=["none"]).train()
    copy_main_into_aux(quiet)
    with torch.no_grad():
        main, aux = quiet.forward_all(x)
    torch.testing.assert_close(aux, main)


def test_perturbation_functions():
    torch.manual_seed(0)
    x = torch.rand(2, 4, 8, 8) + 0.5
    ratio = feature_noise(x, 0.3) / x - 1
    assert ratio.abs().max() <= 0.3 + 1e-6 and ratio.std() > 0.1
    dropped = feature_dropout(x, 0.5)
    zero = dropped == 0
    assert 0.4 < zero.float().mean() < 0.6
    torch.testing.assert_close(dropped[~zero], 2 * x[~zero])
    # attention = channel mean; locations above gamma * max are zeroed, gamma in [0.7, 0.9]
    feats = torch.zeros(1, 2, 2, 2)
    feats[0, :, 0, 0] = 1.0  # attention 1.0 (the max): dropped
    feats[0, :, 0, 1] = 0.95  # above 0.9 * max: dropped
    feats[0, :, 1, 0] = 0.5  # below 0.7 * max: kept
    feats[0, :, 1, 1] = 0.1
    for _ in range(20):
        out = attention_feature_drop(feats, (0.7, 0.9))
        assert out[0, :, 0, 0].eq(0).all() and out[0, :, 0, 1].eq(0).all()
        torch.testing.assert_close(out[0, :, 1], feats[0, :, 1])
    # levels: 'all' skips the first entry of smp's feature list, 'deepest' touches the last only
    features = [torch.ones(1, 2, 4, 4) for _ in range(4)]
    every = FeaturePerturbation(["dropout"], "all", dropout_p=0.9)(features)
    assert torch.equal(every[0], features[0]) and all(not torch.equal(f, features[0]) for f in every[1:])
    deepest = FeaturePerturbation(["dropout"], "deepest", dropout_p=0.9)(features)
    assert all(torch.equal(f, features[0]) for f in deepest[:3]) and not torch.equal(deepest[3], features[3])


def test_bad_network_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown perturbation 'blur'.*noise.*feature_drop"):
        tiny_net(perturbations=["noise", "blur"])
    with pytest.raises(ValueError, match="must be a list"):
        tiny_net(perturbations="noise")
    with pytest.raises(ValueError, match="dropout_p"):
        tiny_net(dropout_p=1.0)
    with pytest.raises(ValueError, match="drop_threshold"):
        tiny_net(drop_threshold=(0.9, 0.7))
    with pytest.raises(ValueError, match="not divisible by the encoder's output stride 8"):
        UAPSNet(arch="Linknet", encoder_depth=3)(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="unsupervised_weight"):
        UAPSModule(unsupervised_weight=-1, **TINY)


# ---------------------------------------------------------------- the UAPS loss
def test_rampup_values():
    assert rampup(0, 100) == pytest.approx(math.exp(-5))
    assert rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert rampup(80, 100) == pytest.approx(math.exp(-0.2))
    assert rampup(100, 100) == 1.0 and rampup(250, 100) == 1.0
    assert rampup(7, 0) == 1.0  # no ramp
    # the reference's staircase: sigmoid_rampup(iteration // 80, 200) is rampup(iteration, 16000, 80)
    assert rampup(79, 16000, 80) == pytest.approx(math.exp(-5))
    assert rampup(80, 16000, 80) == pytest.approx(math.exp(-5 * (1 - 1 / 200) ** 2))
    assert rampup(8079, 16000, 80) == pytest.approx(math.exp(-5 * (1 - 100 / 200) ** 2))
    with pytest.raises(ValueError, match="rampup_interval"):
        UAPSModule(rampup_interval=0, **TINY)
    module = UAPSModule(unsupervised_weight=0.4, rampup_steps=100, **TINY)
    assert module.current_unsupervised_weight() == pytest.approx(0.4 * math.exp(-5))  # global step 0
    assert UAPSModule(unsupervised_weight=0.0, **TINY).current_unsupervised_weight() == 0.0


def test_kl_uncertainty_equals_hand_computed_value():
    p1, p2 = [0.8, 0.2], [0.4, 0.6]
    mean = [0.6, 0.4]
    u1 = mean[0] * math.log(mean[0] / p1[0]) + mean[1] * math.log(mean[1] / p1[1])
    u2 = mean[0] * math.log(mean[0] / p2[0]) + mean[1] * math.log(mean[1] / p2[1])
    log1 = torch.tensor(p1).log().view(1, 2, 1, 1)
    log2 = torch.tensor(p2).log().view(1, 2, 1, 1)
    mean_t = torch.tensor(mean).view(1, 2, 1, 1)
    assert kl_uncertainty(mean_t, log1).item() == pytest.approx(u1, abs=1e-6)  # 0.10465
    assert kl_uncertainty(mean_t, log2).item() == pytest.approx(u2, abs=1e-6)
    terms = uaps_unsupervised_loss([log1, log2], torch.tensor([0.5, 0.5]))
    assert terms["uncertainty_k"].tolist() == pytest.approx([u1, u2], abs=1e-6)
    # identical decoders: no uncertainty; a zero probability in p_mean contributes 0, not nan
    same = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    assert kl_uncertainty(same, torch.tensor([0.0, -30.0]).view(1, 2, 1, 1)).item() == pytest.approx(0.0)


def test_mixing_weights_are_dirichlet_and_sum_to_one():
    torch.manual_seed(0)
    draws = torch.stack([sample_mixing_weights(4) for _ in range(2000)])
    assert draws.shape == (2000, 4) and (draws > 0).all()
    torch.testing.assert_close(draws.sum(dim=1), torch.ones(2000))
    assert draws.mean(dim=0).tolist() == pytest.approx([0.25] * 4, abs=0.02)
    # Dirichlet(1,1,1,1): each weight has variance (1 * 3) / (16 * 5) = 0.0375
    assert draws.var(dim=0).tolist() == pytest.approx([0.0375] * 4, abs=0.006)
    assert sample_mixing_weights(1).tolist() == [1.0]
    assert draws[0].tolist() != draws[1].tolist(), "drawn anew every time"
    with pytest.raises(ValueError, match="mixing_concentration"):
        sample_mixing_weights(3, concentration=0)


def test_pseudo_labels_follow_the_mixture_and_carry_no_gradient():
    p1 = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    p2 = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1)
    assert mix_pseudo_labels([p1, p2], torch.tensor([0.2, 0.8])).item() == 1  # 0.42 vs 0.58
    assert mix_pseudo_labels([p1, p2], torch.tensor([0.8, 0.2])).item() == 0  # 0.78 vs 0.22

    torch.manual_seed(0)
    logits = [torch.randn(2, 3, 4, 5, requires_grad=True) for _ in range(3)]
    weights = torch.tensor([0.5, 0.3, 0.2])
    pseudo = mix_pseudo_labels([x.softmax(1) for x in logits], weights)
    assert not pseudo.requires_grad and pseudo.grad_fn is None
    terms = uaps_unsupervised_loss(logits, weights, uncertainty_weight=0.7, pseudo_loss="pixelwise")
    assert not terms["pseudo_label"].requires_grad
    torch.testing.assert_close(terms["pseudo_label"], pseudo)
    grads = torch.autograd.grad(terms["loss"], logits)
    # the same loss written out with the pseudo-label as a constant gives the same gradients
    target = pseudo.clone()
    log_probs = [x.log_softmax(1) for x in logits]
    mean = torch.stack([lp.exp() for lp in log_probs]).mean(0)
    total = 0
    for lp in log_probs:
        u = (mean * (mean.log() - lp)).sum(1)
        ce = -lp.gather(1, target.unsqueeze(1)).squeeze(1)
        total = total + (torch.exp(-u) * ce).mean() + 0.7 * u.mean()
    expected = torch.autograd.grad(total / 3, logits)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_pixelwise_unsupervised_loss_value_by_hand_with_padding_excluded():
    # one image of 1x2 pixels, 2 decoders, 2 classes; the second pixel is padding
    probs = [np.array([[0.7, 0.1], [0.3, 0.9]]), np.array([[0.2, 0.5], [0.8, 0.5]])]  # (C, W) per decoder
    logits = [torch.tensor(np.log(p), dtype=torch.float32).view(1, 2, 1, 2) for p in probs]
    weights = torch.tensor([0.6, 0.4])
    valid = valid_pixels(torch.tensor([[1, 1]]), (1, 1, 2), torch.device("cpu"))
    assert valid.tolist() == [[[True, False]]]
    terms = uaps_unsupervised_loss(logits, weights, valid=valid, uncertainty_weight=0.5, pseudo_loss="pixelwise")
    # pixel 0: mixture = 0.6 * (0.7, 0.3) + 0.4 * (0.2, 0.8) = (0.5, 0.5) -> tie -> class 0 (first max)
    mixture = 0.6 * probs[0][:, 0] + 0.4 * probs[1][:, 0]
    label = int(np.argmax(mixture))
    mean = (probs[0][:, 0] + probs[1][:, 0]) / 2
    ce, unc = [], []
    for p in probs:
        u = float(np.sum(mean * np.log(mean / p[:, 0])))
        ce.append(math.exp(-u) * -math.log(p[label, 0]))
        unc.append(u)
    assert terms["pseudo"].item() == pytest.approx(np.mean(ce), rel=1e-5)
    assert terms["uncertainty"].item() == pytest.approx(np.mean(unc), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(np.mean(ce) + 0.5 * np.mean(unc), rel=1e-5)


def hand_ce(probs: np.ndarray, target: np.ndarray) -> float:
    """Mean cross-entropy of per-pixel probabilities ``(C, N)`` against labels ``(N,)``."""
    return float(np.mean([-math.log(probs[label, i]) for i, label in enumerate(target)]))


def hand_dice(probs: np.ndarray, target: np.ndarray, smooth: float = 1.0, eps: float = 0.0) -> float:
    """``1 - mean_c (2 I_c + smooth) / (P_c + T_c + smooth + eps)`` over all classes, by loops."""
    scores = []
    for c in range(probs.shape[0]):
        inter = sum(probs[c, i] for i in range(len(target)) if target[i] == c)
        card = sum(probs[c]) + sum(1 for t in target if t == c)
        scores.append((2 * inter + smooth) / (card + smooth + eps))
    return 1.0 - float(np.mean(scores))


def as_logits(probs: np.ndarray, height: int, width: int) -> torch.Tensor:
    return torch.tensor(np.log(probs), dtype=torch.float32).view(1, probs.shape[0], height, width)


def test_default_supervised_loss_is_the_references_half_ce_plus_half_dice():
    # 3 classes, one 2x2 image, probabilities per pixel (columns)
    probs = np.array([[0.7, 0.1, 0.2, 0.3], [0.2, 0.3, 0.1, 0.6], [0.1, 0.6, 0.7, 0.1]])
    target = np.array([0, 2, 2, 1])
    logits, mask = as_logits(probs, 2, 2), torch.tensor(target).view(1, 2, 2)
    module = UAPSModule(num_classes=3, **TINY)
    assert module.hparams.loss == "0.5 * ce + 0.5 * dice" and module.hparams.pseudo_loss == "reference"
    expected = 0.5 * hand_ce(probs, target) + 0.5 * hand_dice(probs, target, smooth=1.0)
    assert module.loss_fn(logits, mask).item() == pytest.approx(expected, rel=1e-6)
    # the presets' Dice (smooth 1e-7) is the reference's 1 - mean 2 I / (P + T + 1e-7)
    preset = yaml.safe_load((REPO / "configs" / "model" / "uaps_neu_seg.yaml").read_text())["model"]["init_args"]
    module = UAPSModule(num_classes=3, loss=preset["loss"], loss_kwargs=preset["loss_kwargs"], **TINY)
    reference = 0.5 * (hand_ce(probs, target) + hand_dice(probs, target, smooth=0.0, eps=1e-7))
    assert module.loss_fn(logits, mask).item() == pytest.approx(reference, rel=1e-6)


def test_reference_pseudo_loss_by_hand_with_and_without_the_uncertainty_weight():
    # 2 decoders, 2 classes, one 1x3 image
    probs = [np.array([[0.7, 0.4, 0.2], [0.3, 0.6, 0.8]]), np.array([[0.6, 0.1, 0.45], [0.4, 0.9, 0.55]])]
    logits = [as_logits(p, 1, 3) for p in probs]
    weights = np.array([0.3, 0.7])
    label = np.argmax(weights[0] * probs[0] + weights[1] * probs[1], axis=0)
    mean = (probs[0] + probs[1]) / 2
    u = [np.sum(mean * np.log(mean / p), axis=0) for p in probs]  # KL(mean || p_k) per pixel
    terms_by_hand = [
        0.5 * (hand_ce(p, label) + hand_dice(p, label)) * float(np.mean(np.exp(-uk))) for p, uk in zip(probs, u)
    ]
    terms = uaps_unsupervised_loss(logits, torch.tensor(weights, dtype=torch.float32), uncertainty_weight=0.3)
    assert terms["pseudo_label"].flatten().tolist() == label.tolist()
    assert terms["pseudo_k"].tolist() == pytest.approx(terms_by_hand, rel=1e-5)
    unc = float(np.mean([uk.mean() for uk in u]))
    assert terms["loss"].item() == pytest.approx(np.mean(terms_by_hand) + 0.3 * unc, rel=1e-5)
    # the reference's Dice (epsilon only in the denominator)
    terms = uaps_unsupervised_loss(logits, torch.tensor(weights), dice=DiceLoss(smooth=1e-7))
    expected = [
        0.5 * (hand_ce(p, label) + hand_dice(p, label, smooth=0.0, eps=1e-7)) * float(np.mean(np.exp(-uk)))
        for p, uk in zip(probs, u)
    ]
    assert terms["pseudo_k"].tolist() == pytest.approx(expected, rel=1e-5)
    # identical decoders: u = 0, so the weight exp(-u) is 1 and the term is the bare 0.5 (CE + Dice)
    terms = uaps_unsupervised_loss([logits[0], logits[0]], torch.tensor([0.5, 0.5]))
    own = np.argmax(probs[0], axis=0)
    bare = 0.5 * (hand_ce(probs[0], own) + hand_dice(probs[0], own))
    assert terms["uncertainty"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["pseudo"].item() == pytest.approx(bare, rel=1e-5)
    # padding (the third pixel) takes no part: the same numbers as the first two pixels alone
    valid = valid_pixels(torch.tensor([[1, 2]]), (1, 1, 3), torch.device("cpu"))
    padded = uaps_unsupervised_loss(logits, torch.tensor(weights), valid=valid)
    cut = uaps_unsupervised_loss([x[..., :2] for x in logits], torch.tensor(weights))
    torch.testing.assert_close(padded["pseudo_k"], cut["pseudo_k"])
    with pytest.raises(ValueError, match="pseudo_loss"):
        uaps_unsupervised_loss(logits, torch.tensor(weights), pseudo_loss="mean")


def record_logs(module: UAPSModule) -> dict[str, float]:
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    return logged


@pytest.mark.parametrize("ramped", [True, False])
def test_uncertainty_term_inside_or_outside_the_ramp(ramped):
    labeled, unlabeled = combined_batch()
    module = UAPSModule(
        num_classes=5, unsupervised_weight=0.5, uncertainty_weight=2.0, uncertainty_rampup=ramped,
        rampup_steps=100, **TINY,
    )
    logged = record_logs(module)
    loss = module.training_step({"labeled": labeled, "unlabeled": unlabeled}, 0)
    weight = 0.5 * math.exp(-5)  # step 0 of a 100-step ramp
    coefficient = weight * 2.0 if ramped else 2.0
    assert logged["train/unsup_weight"] == pytest.approx(weight)
    assert logged["train/uncertainty_coefficient"] == pytest.approx(coefficient)
    expected = logged["train/loss_sup"] + weight * logged["train/loss_pseudo"] + coefficient * logged["train/loss_uncertainty"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- semi-supervised data
def tiny_data(**kwargs) -> SyntheticDefectsDataModule:
    kwargs.setdefault("num_images", 24)
    kwargs.setdefault("image_size", 32)
    kwargs.setdefault("batch_size", 4)
    return SyntheticDefectsDataModule(**kwargs)


def test_labeled_and_unlabeled_subsets_are_disjoint_and_stratified():
    dm = tiny_data(num_images=300, labeled_fraction=0.2)
    train = dm.split_indices()["train"]
    labeled, unlabeled = dm.labeled_indices(), dm.unlabeled_indices()
    assert not set(labeled) & set(unlabeled)
    assert sorted(labeled + unlabeled) == sorted(train)
    classes = Counter(dm.metadata[i].primary_class for i in train)
    picked = Counter(dm.metadata[i].primary_class for i in labeled)
    assert set(picked) == set(classes), "every class (defect-free included) has labelled images"
    for label, count in classes.items():
        assert abs(picked[label] - 0.2 * count) <= 1, (label, picked[label], count)
    # the training split seen by losses, samplers and statistics is the labelled subset
    assert [s.image for s in dm.samples_of("train")] == [dm.metadata[i].image for i in labeled]
    # val/test are those of the fully supervised datamodule; the subset is seeded
    plain = tiny_data(num_images=300)
    for split in ("val", "test"):
        assert dm.split_indices()[split] == plain.split_indices()[split]
    assert tiny_data(num_images=300, labeled_fraction=0.2).labeled_indices() == labeled
    assert tiny_data(num_images=300, labeled_fraction=0.2, labeled_seed=5).labeled_indices() != labeled
    # num_labeled is exact
    assert len(tiny_data(num_images=300, num_labeled=37).labeled_indices()) == 37


def test_labeled_split_keeps_groups_together():
    from defectseg.data.base import Sample

    samples = [Sample(image=str(i), pixel_counts={1: 5} if i % 3 else {}, group=f"g{i // 4}") for i in range(40)]
    labeled, unlabeled = labeled_split(samples, labeled_fraction=0.3, seed=1)
    groups = lambda part: {samples[i].group for i in part}  # noqa: E731
    assert not groups(labeled) & groups(unlabeled)
    with pytest.raises(ValueError, match="exactly one"):
        labeled_split(samples, 0.3, 4)
    with pytest.raises(ValueError, match="between 1 and the 40"):
        labeled_split(samples, num_labeled=41)


def write_images(folder: Path, sizes) -> None:
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        cv2.imwrite(str(folder / f"extra_{i}.png"), np.full((h, w), 90 + i, np.uint8))
    (folder / ".hidden.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")


def test_combined_loader_hides_masks_and_handles_small_pools(tmp_path):
    extra = tmp_path / "extra"
    write_images(extra, [(32, 32), (20, 28)])
    dm = tiny_data(num_images=24, num_labeled=5, batch_size=8, unlabeled_batch_size=32, unlabeled_dirs=[str(extra)])
    dm.setup("fit")
    loader = dm.train_dataloader()
    steps = list(iter(loader))
    pool = len(dm.unlabeled_indices()) + 2
    assert pool < 32 and len(steps) == 1, "both pools are smaller than their batch: one batch each"
    batch, _, _ = steps[0]
    labeled, unlabeled = batch["labeled"], batch["unlabeled"]
    assert labeled["image"].shape[0] == 5 and unlabeled["image"].shape[0] == pool
    assert (unlabeled["mask"] == 255).all() and not unlabeled["defect_free"].any()
    assert unlabeled["image"].shape[1] == 3  # the grayscale files follow the datamodule's channels
    assert (labeled["mask"] != 255).any()
    paths = set(unlabeled["path"])
    assert {str(extra / "extra_0.png"), str(extra / "extra_1.png")} <= paths
    assert not paths & set(labeled["path"])
    small = [i for i, p in enumerate(unlabeled["path"]) if p.endswith("extra_1.png")][0]
    assert unlabeled["valid_size"][small].tolist() == [20, 28]  # padding is known, masks are not

    # unlabelled batches outnumber labelled ones: the labelled stream cycles
    dm = tiny_data(num_images=40, labeled_fraction=0.2, batch_size=2, unlabeled_batch_size=2)
    loader = dm.train_dataloader()
    iter(loader)
    unlabeled_batches = math.ceil(len(dm.unlabeled_indices()) / 2)
    assert len(loader) == unlabeled_batches > math.ceil(len(dm.labeled_indices()) / 2)
    # only unlabelled folders: every training image keeps its mask
    only_dirs = tiny_data(unlabeled_dirs=[str(extra)])
    assert only_dirs.labeled_indices() == only_dirs.split_indices()["train"]
    assert only_dirs.unlabeled_indices() == []


def test_unlabeled_stream_is_sharded_across_ranks():
    from types import SimpleNamespace

    shards = []
    for rank in (0, 1):
        dm = tiny_data(num_images=40, labeled_fraction=0.3, unlabeled_batch_size=4)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        shards.append([p for batch in dm.unlabeled_dataloader() for p in batch["path"]])
    pool = {dm.metadata[i].image for i in dm.unlabeled_indices()}
    # disjoint, except the one image DistributedSampler repeats to even out an odd pool
    assert len(set(shards[0]) & set(shards[1])) == len(pool) % 2
    assert set(shards[0]) | set(shards[1]) == pool
    assert len(shards[0]) == len(shards[1]) == math.ceil(len(pool) / 2)


def test_dli_balances_the_labelled_stream_with_labelled_donors_only():
    dm = tiny_data(num_images=40, labeled_fraction=0.5, dli=True)
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert "dli_counts" in batch["labeled"] and "dli_counts" not in batch["unlabeled"]
    labelled = {dm.metadata[i].image for i in dm.labeled_indices()}
    assert set(batch["labeled"]["path"]) <= labelled
    assert {s.image for s in dm.make_dataset("train").samples} == labelled  # donors come from here


def test_semi_supervised_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        tiny_data(labeled_fraction=0.1, num_labeled=3)
    with pytest.raises(ValueError, match=r"labeled_fraction must be in \(0, 1\]"):
        tiny_data(labeled_fraction=0.0)
    with pytest.raises(ValueError, match="no unlabelled image"):
        tiny_data(labeled_fraction=1.0).train_dataloader()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tiny_data(unlabeled_dirs=[str(tmp_path / "nowhere")]).train_dataloader()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image file"):
        tiny_data(unlabeled_dirs=[str(tmp_path / "empty")]).train_dataloader()
    with pytest.warns(UserWarning, match="num_labeled=2: labelling 5"):
        tiny_data(num_images=40, num_labeled=2).labeled_indices()  # 5 classes need 5 images


# ---------------------------------------------------------------- training step
class EncoderBatchSizes:
    def __init__(self, module: UAPSModule) -> None:
        self.sizes: list[int] = []
        module.uaps_net.encoder.register_forward_hook(lambda m, args, out: self.sizes.append(args[0].shape[0]))


def combined_batch(labeled_size=2, unlabeled_size=3, classes=5):
    torch.manual_seed(1)
    labeled = {"image": torch.randn(labeled_size, 3, 32, 32), "mask": torch.randint(0, classes, (labeled_size, 32, 32))}
    unlabeled = {
        "image": torch.randn(unlabeled_size, 3, 32, 32),
        "mask": torch.full((unlabeled_size, 32, 32), 255),
        "valid_size": torch.tensor([[32, 32]] * unlabeled_size),
    }
    return labeled, unlabeled


def test_training_step_uses_both_batches_and_weight_zero_is_the_supervised_baseline():
    warnings.filterwarnings("ignore", message=".*self.log.*")
    labeled, unlabeled = combined_batch()
    module = UAPSModule(num_classes=5, unsupervised_weight=0.5, rampup_steps=0, **TINY)
    seen = EncoderBatchSizes(module)
    loss = module.training_step({"labeled": labeled, "unlabeled": unlabeled}, 0)
    assert seen.sizes == [5], "labelled and unlabelled images go through the encoder together"
    loss.backward()
    for branch in module.uaps_net.aux_decoders:
        assert branch.segmentation_head[0].weight.grad.abs().sum() > 0

    baseline = UAPSModule(num_classes=5, unsupervised_weight=0.0, **TINY)
    baseline.load_state_dict(module.state_dict())
    seen = EncoderBatchSizes(baseline)
    torch.manual_seed(3)
    combined = baseline.training_step({"labeled": labeled, "unlabeled": unlabeled}, 0)
    torch.manual_seed(3)
    plain = baseline.training_step(labeled, 0)  # a plain labelled batch: the supervised part only
    assert seen.sizes == [2, 2], "with unsupervised_weight 0 the unlabelled batch is never run"
    torch.testing.assert_close(combined, plain)
    # the supervised loss is the mean of every decoder's loss
    baseline.eval()
    with torch.no_grad():
        outputs = baseline.forward_all(labeled["image"], perturb=False)
        expected = torch.stack([baseline.loss_fn(o, labeled["mask"]) for o in outputs]).mean()
        assert baseline.training_step(labeled, 1).item() == pytest.approx(expected.item(), rel=1e-5)


def test_segmentation_module_trains_on_the_labelled_stream(tmp_path):
    model = SegmentationModule(num_classes=5, **TINY)
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, tiny_data(labeled_fraction=0.5))
    assert trainer.global_step == 1


def test_separate_forward_passes_keep_batch_norm_statistics_apart():
    labeled, unlabeled = combined_batch()
    joint = UAPSModule(num_classes=5, **TINY)
    separate = UAPSModule(num_classes=5, forward_passes="separate", **TINY)
    separate.load_state_dict(joint.state_dict())
    with torch.no_grad():
        alone = separate.forward_all(labeled["image"])[0]  # the main decoder on the labelled images alone
        seen = EncoderBatchSizes(separate)
        sup, unsup = separate.run_decoders(labeled["image"], unlabeled["image"])
        assert seen.sizes == [2, 3] and len(unsup) == 4 and unsup[0].shape[0] == 3
        torch.testing.assert_close(sup[0], alone)  # batch norm saw the labelled images only
        mixed, _ = joint.run_decoders(labeled["image"], unlabeled["image"])
        assert (mixed[0] - alone).abs().max() > 1e-3, "one joint pass normalises with both batches' statistics"
    with pytest.raises(ValueError, match="forward_passes"):
        UAPSModule(forward_passes="both", **TINY)


def test_channels_last_option():
    module = UAPSModule(num_classes=3, **TINY)
    image = torch.randn(2, 3, 40, 36)
    module.eval()
    with torch.no_grad():
        before = module(image)
        assert module.configure_memory_format("cpu") is True  # auto: on for CPU
        weight = module.uaps_net.encoder.conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        torch.testing.assert_close(module(image), before, rtol=1e-4, atol=1e-5)
        formats = []
        module.uaps_net.encoder.register_forward_pre_hook(
            lambda m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        torch.testing.assert_close(module.forward_all(image, perturb=False)[0], before, rtol=1e-4, atol=1e-5)
        assert formats == [True], "forward_all (training) runs in channels_last too"
        assert module.configure_memory_format("mps") is False  # auto: off elsewhere
        assert module.uaps_net.encoder.conv1.weight.is_contiguous()
    off = UAPSModule(num_classes=3, channels_last="false", **TINY)
    assert off.configure_memory_format("cpu") is False
    with pytest.raises(ValueError, match="channels_last must be 'auto', true or false"):
        UAPSModule(channels_last="yes", **TINY)


def test_loss_is_a_registry_name_or_a_class_path_dict():
    module = UAPSModule(num_classes=3, loss={"class_path": "defectseg.losses.FocalLoss", "init_args": {"gamma": 0.5}}, **TINY)
    assert isinstance(module.loss_fn, FocalLoss) and module.loss_fn.gamma == 0.5
    assert module.hparams.loss["class_path"] == "defectseg.losses.FocalLoss"  # saved in checkpoints as given
    with pytest.raises(ValueError, match="needs a class_path"):
        UAPSModule(loss={"init_args": {"gamma": 1.0}}, **TINY)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(UAPSModule, "model")
    help_text = parser.format_help()
    assert "class_path" in help_text and len(help_text.splitlines()) < 400, "no list of every torch module"


def test_dli_counts_of_the_labelled_stream_are_logged_and_channels_last_weights_train(tmp_path):
    model = UAPSModule(num_classes=5, rampup_steps=0, **TINY)
    initial = model.uaps_net.encoder.conv1.weight.detach().clone()
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=2, limit_val_batches=0, log_every_n_steps=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, tiny_data(num_images=40, labeled_fraction=0.5, dli=True))
    header = next(csv.reader(next(tmp_path.rglob("metrics.csv")).open()))
    assert {"train/dli/before/defect_free", "train/dli/after/defect_free", "train/dli/injected"} <= set(header)
    assert any(h.startswith("train/dli/after/") and h != "train/dli/after/defect_free" for h in header)
    assert "train/loss_pseudo" in header
    # converted to channels_last when fitting started, and still the parameters the optimizer updates
    weight = model.uaps_net.encoder.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not torch.equal(weight.detach(), initial)


# ---------------------------------------------------------------- presets
#: the reference scripts' coefficients (github.com/djene-mengistu/UAPS): learning rate, ramp in
#: iterations (iteration // interval over length units), and whether the uncertainty term is ramped
REFERENCE = {
    "neu_seg": {"lr": 0.001, "interval": 80, "units": 200, "uncertainty_rampup": True},
    "magnetic_tile": {"lr": 0.002, "interval": 50, "units": 200, "uncertainty_rampup": False},
    "dagm": {"lr": 0.001, "interval": 60, "units": 200, "uncertainty_rampup": True},
    "kolektorsdd2": {"lr": 0.002, "interval": 40, "units": 150, "uncertainty_rampup": True},
}


def make_fake(name: str, root: Path) -> list[str]:
    """Write a tiny dataset in ``name``'s layout; return the extra CLI arguments it needs."""
    from helpers.fake_data import make_dagm, make_kolektor, make_magnetic_tile, make_neu_seg

    if name == "neu_seg":
        make_neu_seg(root)
    elif name == "magnetic_tile":
        make_magnetic_tile(root, counts={"Blowhole": 4, "Crack": 4, "Free": 4})
    elif name == "dagm":
        make_dagm(root, classes=(1, 2), defective=3, good=3)
        return ["--data.init_args.classes", "[1, 2]"]
    else:
        make_kolektor(root, defective={"train": 4, "test": 1}, good={"train": 4, "test": 1})
    return []


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_preset_follows_the_reference_and_trains_on_its_layout(name, tmp_path, monkeypatch):
    preset = REPO / "configs" / "model" / f"uaps_{name}.yaml"
    args = yaml.safe_load(preset.read_text())["model"]["init_args"]
    ref = REFERENCE[name]
    assert args["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {"lr": ref["lr"]}}
    assert (args["rampup_steps"], args["rampup_interval"]) == (ref["interval"] * ref["units"], ref["interval"])
    assert args["uncertainty_rampup"] is ref["uncertainty_rampup"]
    assert (args["unsupervised_weight"], args["uncertainty_weight"]) == (0.1, 1.0)
    assert (args["pseudo_loss"], args["forward_passes"], args["loss"]) == ("reference", "separate", "0.5 * ce + 0.5 * dice")

    root = tmp_path / name
    extra = make_fake(name, root)
    monkeypatch.chdir(tmp_path)
    cli = DefectSegCLI(
        args=[
            "fit", "--config", str(REPO / "configs" / "data" / f"{name}.yaml"), "--config", str(preset),
            "--data.init_args.root", str(root), "--data.init_args.labeled_fraction", "0.5",
            "--data.init_args.batch_size", "2", "--data.init_args.unlabeled_batch_size", "2",
            "--data.init_args.num_workers", "0", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra,
        ]
    )
    assert cli.trainer.global_step == 2
    model = cli.model
    assert isinstance(model, UAPSModule) and model.hparams.rampup_interval == ref["interval"]
    assert isinstance(cli.trainer.optimizers[0], torch.optim.Adam)
    assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == ref["lr"]
    assert find_dice(model.loss_fn).smooth == pytest.approx(1e-7)


def test_full_neu_seg_config_uses_the_preset():
    full = yaml.safe_load((REPO / "configs" / "uaps_neu_seg.yaml").read_text())["model"]
    assert full == yaml.safe_load((REPO / "configs" / "model" / "uaps_neu_seg.yaml").read_text())["model"]


# ---------------------------------------------------------------- CLI and checkpoints
def semi_config(tmp_path: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}},
            "enable_model_summary": False,
            "enable_progress_bar": False,
        },
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
        "model": {
            "class_path": "defectseg.models.UAPSModule",
            "init_args": {**TINY, "num_aux_decoders": 2, "unsupervised_weight": 1.0, "rampup_steps": 4},
        },
        "data": {
            "class_path": "defectseg.data.SyntheticDefectsDataModule",
            "init_args": {
                "num_images": 24, "image_size": 32, "batch_size": 2, "labeled_fraction": 0.3,
                "unlabeled_batch_size": 3, "test_fraction": 0.2,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_fit_test_predict_in_semi_supervised_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(semi_config(tmp_path))
    DefectSegCLI(args=["fit", "--config", config])
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()
    header = next(csv.reader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    expected = {
        "train/loss", "train/loss_sup", "train/loss_sup/main", "train/loss_sup/aux2_dropout", "train/loss_unsup",
        "train/loss_pseudo", "train/loss_uncertainty", "train/unsup_weight", "train/mix_weight/main",
        "train/mix_weight/aux1_noise", "train/uncertainty/aux1_noise", "train/loss_pseudo/main", "val/miou_defect",
    }
    assert expected <= set(header), expected - set(header)
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    ramp = [float(r["train/unsup_weight"]) for r in rows if r.get("train/unsup_weight")]
    assert ramp == pytest.approx([rampup(0, 4), rampup(1, 4)])

    cli = DefectSegCLI(args=["test", "--config", config, "--ckpt_path", str(last)])
    assert "test/miou_defect" in cli.trainer.callback_metrics
    out = tmp_path / "preds"
    DefectSegCLI(args=["predict", "--config", config, "--ckpt_path", str(last), "--output_dir", str(out)])
    data = yaml.safe_load(Path(config).read_text())["data"]["init_args"]
    expected_masks = {f"synthetic_{s.extra['index']}_mask.png" for s in SyntheticDefectsDataModule(**data).samples_of("test")}
    assert expected_masks and {p.name for p in out.glob("*_mask.png")} == expected_masks

    # the checkpoint predicts with the main decoder only
    model = UAPSModule.load_from_checkpoint(last, weights_only=True).eval()
    image = torch.randn(2, 3, 40, 56)
    batch = {"image": image, "path": ["a", "b"]}
    with torch.no_grad():
        before = model(image)
        predicted = model.predict_step(batch, 0)
        calls = []
        for branch in model.uaps_net.aux_decoders:
            branch.register_forward_hook(lambda *args: calls.append(1))
            for p in branch.parameters():
                p.fill_(float("nan"))
        after = model(image)
        again = model.predict_step(batch, 0)
    assert not calls and torch.equal(before, after)
    assert torch.equal(predicted["mask"], again["mask"]) and torch.isfinite(again["confidence"]).all()
    # and a plain network of the same architecture loads it and predicts the same
    plain = build_network("Unet", num_classes=5, **TINY).eval()
    assert load_weights(plain, last) == "network"
    with torch.no_grad():
        torch.testing.assert_close(plain(torch.nn.functional.pad(image, (0, 8, 0, 24), mode="reflect"))[..., :40, :56], before)
