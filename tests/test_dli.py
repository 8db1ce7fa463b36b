"""Dynamic Label Injection: planning, injection, loaders, DDP split, CLI fit and preview."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import lightning as L
import numpy as np
import pytest
import torch
import yaml

from defectseg.data import IGNORE_INDEX, Sample, SyntheticDefectsDataModule
from defectseg.data.dli import (
    DefectInjector,
    DLIDataset,
    DLIBatchSampler,
    DLIConfig,
    DonorTransform,
    InjectionPlan,
    cut_paste,
    extract_defect,
    inject_defect,
    poisson_clone,
)

K = 5  # background + 4 defect classes


def fake_samples(classes_per_image: list[tuple[int, ...]]) -> list[Sample]:
    return [
        Sample(image=f"img{i}", pixel_counts={c: 10 for c in classes}, num_pixels=100)
        for i, classes in enumerate(classes_per_image)
    ]


def image_counts(masks: torch.Tensor, num_classes: int = K) -> np.ndarray:
    """Images holding each defect class (index 0 unused), computed from masks."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for mask in masks:
        values = mask[mask != IGNORE_INDEX].unique().tolist()
        for c in values:
            if c > 0:
                counts[c] += 1
    return counts


def assert_water_filled(before: np.ndarray, after: np.ndarray, eligible: list[int], injections: int) -> None:
    """Greedy fewest-first injection <=> every class that gained ends at most 1 above the minimum."""
    gained = after - before
    assert (gained >= 0).all(), (before, after)
    assert gained[eligible].sum() == injections, (before, after, injections)
    others = [c for c in range(1, len(before)) if c not in eligible]
    assert (gained[others] == 0).all()
    low = after[eligible].min()
    for c in eligible:
        if gained[c] > 0:
            assert after[c] <= low + 1, (before, after)


# ---------------------------------------------------------------------------- planning
def test_plan_fills_the_rarest_classes_first():
    # batch: class 1 in three images, class 2 in one, classes 3 and 4 in none, four defect-free
    classes = [(1,), (1,), (1, 2), (), (), (), ()]
    donors = [(3,), (4,), (2,), (1,)]
    sampler = DLIBatchSampler(fake_samples(classes + donors), batch_size=7, num_classes=K, shuffle=False)
    plans = sampler.plan_batch(list(range(7)))
    assert [p.index for p in plans] == list(range(7))
    assert not any(p.injects for p in plans[:3])
    labels = [p.label for p in plans[3:]]
    # by hand: counts (3, 1, 0, 0) -> 3 and 4 first (either order), then two of {2, 3, 4}
    assert sorted(labels[:2]) == [3, 4]
    final = np.array([0, 3, 1, 0, 0]) + np.bincount(labels, minlength=K)
    assert sorted(final[2:].tolist()) == [1, 2, 2] and final[1] == 3
    for plan in plans[3:]:
        assert plan.label in sampler.labels[plan.donor]  # a donor of that class
    assert len({p.seed for p in plans[3:]}) == 4


def test_plan_keeps_a_share_of_defect_free_images():
    classes = [(1,)] + [()] * 8 + [(2,), (3,), (4,)]
    config = DLIConfig(keep_defect_free=0.5)
    sampler = DLIBatchSampler(fake_samples(classes), 9, K, config, shuffle=False)
    for number in range(5):
        plans = sampler.plan_batch(list(range(9)), number)
        assert sum(p.injects for p in plans[1:]) == 4  # 0.5 x 8 defect-free, exactly
    keep_all = DLIBatchSampler(fake_samples(classes), 9, K, DLIConfig(keep_defect_free=1.0), shuffle=False)
    assert not any(p.injects for p in keep_all.plan_batch(list(range(9))))


def test_class_without_donor_is_never_planned():
    classes = [(1,), (2,), (4,), (), (), (), (), ()]  # nobody has class 3
    with pytest.warns(UserWarning, match="crack"):
        sampler = DLIBatchSampler(
            fake_samples(classes), 8, K, shuffle=False,
            class_names=["background", "scratch", "pit", "crack", "stain"],
        )
    assert sampler.eligible == [1, 2, 4]
    plans = sampler.plan_batch(list(range(8)))
    labels = [p.label for p in plans if p.injects]
    assert len(labels) == 5 and 3 not in labels
    before = np.array([0, 1, 1, 0, 1])
    assert_water_filled(before, before + np.bincount(labels, minlength=K), [1, 2, 4], 5)


def test_batches_without_defect_free_images_are_left_alone():
    sampler = DLIBatchSampler(fake_samples([(1,), (2,), (1, 3), (4,)]), 4, K, shuffle=False)
    assert all(not p.injects for p in sampler.plan_batch([0, 1, 2, 3]))
    with pytest.warns(UserWarning, match="never injected"):
        none_defective = DLIBatchSampler(fake_samples([(), (), ()]), 3, K, shuffle=False)
    assert all(not p.injects for p in none_defective.plan_batch([0, 1, 2]))


def test_same_seed_and_epoch_give_the_same_batches():
    classes = [(1,), (2,), (3,), (4,)] * 5 + [()] * 20
    make = lambda seed: DLIBatchSampler(fake_samples(classes), 6, K, seed=seed)  # noqa: E731
    a, b, other = make(3), make(3), make(4)
    for sampler in (a, b, other):
        sampler.set_epoch(2)
    assert list(a) == list(b)
    assert list(a) != list(other)
    b.set_epoch(3)
    assert list(a) != list(b)
    # Lightning sets the epoch through batch_sampler.sampler
    from lightning.fabric.utilities.data import _set_sampler_epoch

    loader = torch.utils.data.DataLoader(range(40), batch_sampler=a)
    _set_sampler_epoch(loader, 7)
    assert a.epoch == 7


@pytest.mark.filterwarnings("ignore:DLI")
@pytest.mark.parametrize(("num_images", "batch_size", "world"), [(37, 4, 2), (9, 4, 2), (23, 3, 3), (5, 8, 2)])
def test_ranks_get_disjoint_batches_that_cover_the_epoch(num_images, batch_size, world):
    classes = [(1 + i % 4,) if i % 3 else () for i in range(num_images)]
    samples = fake_samples(classes)
    ranks = [DLIBatchSampler(samples, batch_size, K, seed=1, num_replicas=world, rank=r) for r in range(world)]
    single = DLIBatchSampler(samples, batch_size, K, seed=1, num_replicas=1, rank=0)
    seen: list[int] = []
    lengths = set()
    for sampler in ranks:
        sampler.set_epoch(5)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        lengths.add(len(batches))
        assert all(len(b) >= 1 for b in batches)
        seen += [p.index for b in batches for p in b]
    assert len(lengths) == 1  # every rank runs the same number of steps
    assert sorted(seen) == list(range(num_images))  # disjoint and covering
    # a batch's plan depends on (seed, epoch, batch number) only, not on the rank split
    global_batches = ranks[0].global_batches(5)
    for number, indices in enumerate(global_batches):
        owner = ranks[number % world]
        assert owner.plan_batch(indices, number, 5) == single.plan_batch(indices, number, 5)


@pytest.mark.filterwarnings("ignore:DLI")
def test_drop_last_drops_the_incomplete_round():
    samples = fake_samples([(1,), ()] * 10)
    ranks = [DLIBatchSampler(samples, 3, K, num_replicas=2, rank=r, drop_last=True) for r in range(2)]
    batches = [list(s) for s in ranks]
    assert [len(b) for b in batches] == [3, 3]
    indices = [p.index for rank in batches for b in rank for p in b]
    assert len(indices) == len(set(indices)) == 18


# ---------------------------------------------------------------------------- injection
def textured(shape: tuple[int, ...], seed: int, level: float = 120.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(level + rng.normal(0, 3, shape), 0, 255).astype(np.uint8)


def still(**overrides) -> DLIConfig:
    """A config without random transforms (identity), for exact checks."""
    transform = DonorTransform(hflip=0, vflip=0, rotate=0, scale=(1, 1), shift=0)
    return DLIConfig(transform=transform, **overrides)


def test_identity_cut_paste_copies_the_donor_pixels_in_place():
    donor = textured((40, 50, 1), 0)
    donor_mask = np.zeros((40, 50), np.int64)
    donor_mask[10:14, 20:31] = 2
    donor[10:14, 20:31] = 30
    target = textured((40, 50, 1), 1)
    target_mask = np.zeros((40, 50), np.int64)
    config = still(p_poisson=0.0)
    crop = extract_defect(donor, donor_mask, 2, config.transform, config.margin())
    image, mask, result = inject_defect(target, target_mask, crop, 2, 0, config)
    assert result.method == "cut_paste"
    assert np.array_equal(mask, donor_mask)  # same place, same class
    assert np.array_equal(image[10:14, 20:31], donor[10:14, 20:31])
    outside = donor_mask == 0
    assert np.array_equal(image[outside], target[outside])
    assert image.dtype == np.uint8 and image.shape == target.shape


def test_flips_mirror_the_defect_position():
    donor = textured((30, 40, 3), 0)
    donor_mask = np.zeros((30, 40), np.int64)
    donor_mask[5:9, 0:6] = 1  # touching the left edge
    config = DLIConfig(p_poisson=0.0, transform=DonorTransform(hflip=1, vflip=1, rotate=0, scale=(1, 1), shift=0))
    crop = extract_defect(donor, donor_mask, 1, config.transform, config.margin())
    _, mask, _ = inject_defect(textured((30, 40, 3), 1), np.zeros((30, 40), np.int64), crop, 1, 0, config)
    expected = np.zeros((30, 40), np.int64)
    expected[30 - 9 : 30 - 5, 40 - 6 : 40] = 1  # mirrored: now touching the right edge
    assert np.array_equal(mask, expected)


def test_donor_placement_keeps_the_distance_to_the_nearest_edge_in_other_sizes():
    donor = textured((60, 80), 0)
    donor_mask = np.zeros((60, 80), np.int64)
    donor_mask[50:60, 70:80] = 3  # bottom-right corner
    config = still(p_poisson=0.0)
    crop = extract_defect(donor, donor_mask, 3, config.transform, config.margin())
    _, mask, _ = inject_defect(textured((30, 35), 1), np.zeros((30, 35), np.int64), crop, 3, 0, config)
    rows, cols = np.nonzero(mask == 3)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 29, 25, 34)


@pytest.mark.parametrize("placement", ["donor", "random"])
def test_a_defect_wider_than_the_target_keeps_its_densest_part(placement):
    # two blobs at opposite ends of a 100 px wide donor (like Magnetic Tile's Fray), 30 px target
    donor = textured((20, 100), 0)
    donor_mask = np.zeros((20, 100), np.int64)
    donor_mask[5:11, 0:10] = 4  # 60 px
    donor_mask[5:9, 90:100] = 4  # 40 px
    config = still(p_poisson=0.0, placement=placement)
    crop = extract_defect(donor, donor_mask, 4, config.transform, config.margin())
    for seed in range(4):
        _, mask, result = inject_defect(textured((20, 30), seed), np.zeros((20, 30), np.int64), crop, 4, seed, config)
        assert (mask == 4).sum() == 60 and result.method == "cut_paste"


def test_random_placement_stays_inside_and_moves():
    donor = textured((64, 64, 3), 0)
    donor_mask = np.zeros((64, 64), np.int64)
    donor_mask[30:36, 30:40] = 4
    config = DLIConfig(placement="random", transform=DonorTransform(rotate=30, scale=(0.8, 1.2)))
    crop = extract_defect(donor, donor_mask, 4, config.transform, config.margin())
    corners = set()
    for seed in range(12):
        _, mask, result = inject_defect(textured((48, 56, 3), seed), np.zeros((48, 56), np.int64), crop, 4, seed, config)
        rows, cols = np.nonzero(mask == 4)
        assert rows.size and result.method in ("poisson", "cut_paste")
        corners.add((int(rows.min()), int(cols.min())))
    assert len(corners) > 6


@pytest.mark.parametrize("mode", ["normal", "mixed"])
def test_poisson_cloning_transfers_the_defect(mode):
    # a thin dark line with a tight mask: OpenCV erodes clone masks by 3 px and its MIXED_CLONE
    # ignores 1-channel masks; both would leave the target unchanged
    donor = textured((64, 64, 1), 0)
    donor_mask = np.zeros((64, 64), np.int64)
    donor_mask[30:32, 10:50] = 1
    donor[30:32, 10:50] = 40
    target = textured((64, 64, 1), 1)
    config = still(p_poisson=1.0, clone_mode=mode)
    crop = extract_defect(donor, donor_mask, 1, config.transform, config.margin())
    image, mask, result = inject_defect(target, np.zeros((64, 64), np.int64), crop, 1, 0, config)
    assert result.method == "poisson"
    inside = mask == 1
    drop = target[inside].mean() - image[inside].mean()
    assert drop > 0.6 * (120 - 40), drop
    # pixels change only around the defect (clone mask: dilation + OpenCV's 3 px)
    reach = config.dilation + 3 + 1
    changed = np.nonzero((image != target)[..., 0])
    assert changed[0].min() >= 30 - reach and changed[0].max() <= 31 + reach
    assert changed[1].min() >= 10 - reach and changed[1].max() <= 49 + reach


@pytest.mark.parametrize("border", ["pad", "cut_paste"])
def test_border_defects_never_crash(border):
    shapes = [(24, 24), (5, 7), (40, 17), (1, 30)]
    regions = [
        (slice(0, 3), slice(None)),  # along the top edge
        (slice(None), slice(-2, None)),  # along the right edge
        (slice(-4, None), slice(0, 4)),  # bottom-left corner
        (slice(None), slice(None)),  # the whole image
        (slice(0, 1), slice(0, 1)),  # one corner pixel
    ]
    methods = set()
    for donor_shape in shapes:
        for region in regions:
            for channels in (1, 3):
                donor = textured((*donor_shape, channels), 0, 200)
                donor_mask = np.zeros(donor_shape, np.int64)
                donor_mask[region] = 2
                for target_shape in shapes:
                    for seed in range(3):
                        config = DLIConfig(
                            p_poisson=1.0 if seed < 2 else 0.0, border=border, feather=1.0 * seed,
                            placement="random" if seed == 1 else "donor",
                            transform=DonorTransform(rotate=45, scale=(0.5, 1.5), shift=0.3),
                        )
                        crop = extract_defect(donor, donor_mask, 2, config.transform, config.margin())
                        target = textured((*target_shape, channels), seed)
                        target_mask = np.zeros(target_shape, np.int64)
                        target_mask[0, 0] = IGNORE_INDEX
                        image, mask, result = inject_defect(target, target_mask, crop, 2, seed, config)
                        assert image.shape == target.shape and image.dtype == np.uint8
                        assert mask.shape == target_shape and mask.dtype == np.int64
                        changed = mask != target_mask
                        assert (mask[changed] == 2).all()
                        assert (mask == 2).any(), (donor_shape, region, target_shape, seed)
                        methods.add(result.method)
    if border == "pad":
        assert "poisson" in methods
    else:
        assert "cut_paste_fallback" in methods


def test_low_level_blends_leave_other_pixels_alone():
    target = textured((20, 20, 3), 0)
    patch = np.full((10, 10, 3), 255, np.uint8)
    region = np.zeros((10, 10), bool)
    region[4:6, 4:6] = True
    assert np.array_equal(cut_paste(target, patch, region, (-6, 16)), target)  # region entirely outside
    hard = cut_paste(target, patch, region, (-5, 15))  # one pixel of the region is inside
    assert np.argwhere((hard != target).any(axis=2)).tolist() == [[0, 19]]
    hard = cut_paste(target, patch, region, (0, 0))
    assert np.array_equal(np.argwhere((hard != target).any(axis=2)), np.argwhere(region[:20, :20]))
    soft = cut_paste(target, patch, region, (0, 0), feather=1.0)
    assert (soft != target).any(axis=2).sum() > 4
    out, method = poisson_clone(target, patch, region, (-4, -4), "normal", 1)
    assert method == "poisson" and out.shape == target.shape
    out, method = poisson_clone(target, patch, region, (-4, -4), "normal", 1, border="cut_paste")
    assert method == "cut_paste_fallback"


# ---------------------------------------------------------------------------- loaders
def dli_datamodule(**kwargs) -> SyntheticDefectsDataModule:
    defaults = dict(num_images=40, image_size=48, batch_size=8, augment=False, val_fraction=0.1, test_fraction=0.1)
    defaults.update(kwargs)
    defaults.setdefault("dli", {"p_poisson": 0.5})
    dm = SyntheticDefectsDataModule(**defaults)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("channels", [1, 3])
def test_loader_balances_batches_and_changes_masks_only_where_injected(channels):
    dm = dli_datamodule(channels=channels, dli={"p_poisson": 0.5, "transform": {"rotate": 20}})
    loader = dm.train_dataloader()
    sampler = loader.batch_sampler
    assert isinstance(sampler, DLIBatchSampler)
    plain = dm.make_dataset("train", augment=False)
    margin = dm.dli_config.margin()
    low = (0 - np.array(dm.mean) * 255) / (np.array(dm.std) * 255)
    high = (255 - np.array(dm.mean) * 255) / (np.array(dm.std) * 255)
    injected_total = 0
    for plans, batch in zip(list(sampler), loader):
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1] == channels
        assert batch["mask"].dtype == torch.int64
        for c in range(channels):
            values = batch["image"][:, c]
            assert values.min() >= low[c] - 1e-4 and values.max() <= high[c] + 1e-4
        assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}
        originals = [plain[p.index] for p in plans]
        before = image_counts(torch.stack([o["mask"] for o in originals]))
        after = image_counts(batch["mask"])
        injections = sum(p.injects for p in plans)
        injected_total += injections
        assert_water_filled(before, after, sampler.eligible, injections)
        assert not batch["defect_free"].any() or not sampler.eligible
        # the counts attached for logging are those of the masks
        counts = batch["dli_counts"].sum(0)
        assert counts[0, 1:].tolist() == before[1:].tolist() and counts[1, 1:].tolist() == after[1:].tolist()
        assert batch["dli_injected"].tolist() == [p.injects for p in plans]
        for plan, original, mask, image in zip(plans, originals, batch["mask"], batch["image"]):
            changed = mask != original["mask"]
            if not plan.injects:
                assert not changed.any() and torch.equal(image, original["image"])
                continue
            assert changed.any() and (mask[changed] == plan.label).all()
            rows, cols = torch.nonzero(changed, as_tuple=True)
            moved = (image != original["image"]).any(dim=0)
            m_rows, m_cols = torch.nonzero(moved, as_tuple=True)
            assert m_rows.min() >= rows.min() - margin and m_rows.max() <= rows.max() + margin
            assert m_cols.min() >= cols.min() - margin and m_cols.max() <= cols.max() + margin
    assert injected_total > 5


def test_injection_happens_after_resizing_and_before_padding():
    # pad policy: 40x56 images padded to 64x64; injected labels stay in the valid area
    dm = dli_datamodule(image_size=(40, 56), batch_size=4, num_images=30)
    injected = 0
    for batch in dm.train_dataloader():
        injected += int(batch["dli_injected"].sum())
        assert batch["image"].shape[-2:] == (64, 64)
        assert (batch["mask"][:, 40:, :] == IGNORE_INDEX).all() and (batch["mask"][:, :, 56:] == IGNORE_INDEX).all()
        assert (batch["mask"][:, :40, :56] != IGNORE_INDEX).all()
    assert injected > 0
    # resize policy: generated at 48x48, served (and injected) at 24x40
    resized = dli_datamodule(num_images=30, batch_size=4, image_size=48)
    resized.size_policy, resized.image_size, resized.pad_multiple = "resize", (24, 40), 1
    batch = next(iter(resized.train_dataloader()))
    assert batch["mask"].shape[-2:] == (24, 40) and batch["dli_injected"].any()
    assert (batch["mask"] != IGNORE_INDEX).all()


def test_num_workers_two_gives_the_same_batches():
    masks = []
    for workers in (0, 2):
        dm = dli_datamodule(num_workers=workers, num_images=32)
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(1)
        masks.append([(b["mask"], b["image"]) for b in loader])
    assert len(masks[0]) == len(masks[1])
    for (m0, i0), (m1, i1) in zip(*masks):
        assert torch.equal(m0, m1) and torch.equal(i0, i1)


def test_dli_applies_to_the_labelled_stream_of_semi_supervised_training():
    dm = SyntheticDefectsDataModule(
        num_images=40, image_size=32, batch_size=4, labeled_fraction=0.5, augment=False, dli=True
    )
    dm.setup("fit")
    combined = dm.train_dataloader()
    labeled = combined.iterables["labeled"]
    assert isinstance(labeled.batch_sampler, DLIBatchSampler)
    assert labeled.batch_sampler.num_samples == len(dm.samples_of("train"))  # the labelled subset
    batch, _, _ = next(iter(combined))
    assert "dli_counts" in batch["labeled"] and "dli_counts" not in batch["unlabeled"]


def test_plan_items_go_to_the_dli_wrapper_not_the_dataset():
    dm = dli_datamodule()
    plain = dm.make_dataset("train")
    with pytest.raises(TypeError, match="DLIDataset"):
        plain[InjectionPlan(0, 1, 1, 0)]
    dataset = DLIDataset(plain, DefectInjector(dm.dli_config, dm.class_names))
    assert dataset.samples is plain.samples and len(dataset) == len(plain)
    item = dataset[InjectionPlan(0)]
    assert item["dli_injected"] is False and item["dli_counts"].shape == (2, K)
    # workers started with "spawn" (macOS, Windows) receive a pickled copy
    plan = next(p for batch in dm.train_dataloader().batch_sampler for p in batch if p.injects)
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[plan]["mask"], dataset[plan]["mask"]) and clone[plan]["dli_injected"]


def test_ddp_needs_use_distributed_sampler_off():
    dm = dli_datamodule()
    dm.trainer = SimpleNamespace(
        world_size=2, global_rank=1, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True)
    )
    with pytest.raises(RuntimeError, match="use_distributed_sampler: false"):
        dm.train_dataloader()
    dm.trainer._accelerator_connector.use_distributed_sampler = False
    sampler = dm.train_dataloader().batch_sampler
    assert (sampler.num_replicas, sampler.rank) == (2, 1)
    with pytest.raises(TypeError, match="use_distributed_sampler"):
        DLIBatchSampler(torch.utils.data.SequentialSampler(range(4)), 2, K)


def test_config_from_yaml_and_its_errors():
    assert DLIConfig.from_spec(None) is None and DLIConfig.from_spec(False) is None
    assert DLIConfig.from_spec({"enabled": False}) is None
    assert DLIConfig.from_spec(True) == DLIConfig()
    config = DLIConfig.from_spec(
        {"p_poisson": 0.3, "transform": {"rotate": 5}, "class_transforms": {"stain": {"scale": [0.5, 0.7]}, 1: {"hflip": 0}}}
    )
    names = ["background", "scratch", "pit", "stain", "crack"]
    per_class = config.resolve(names)
    assert per_class[3].scale == (0.5, 0.7) and per_class[3].rotate == 5  # override on top of transform
    assert per_class[1].hflip == 0 and per_class[2] == config.transform
    with pytest.raises(ValueError, match=r"unknown dli settings \['p_posson'\]"):
        DLIConfig.from_spec({"p_posson": 0.5})
    with pytest.raises(ValueError, match="p_poisson"):
        DLIConfig(p_poisson=1.5)
    with pytest.raises(ValueError, match="placement"):
        DLIConfig(placement="somewhere")
    with pytest.raises(ValueError, match=r"unknown dli transform keys \['rotation'\]"):
        DLIConfig.from_spec({"transform": {"rotation": 3}})
    with pytest.raises(ValueError, match="'dent'"):
        DLIConfig.from_spec({"class_transforms": {"dent": {}}}).resolve(names)
    with pytest.raises(ValueError, match="scale"):
        DonorTransform(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="unknown dli settings"):
        SyntheticDefectsDataModule(num_images=10, dli={"bogus": 1})


# ---------------------------------------------------------------------------- CLI and preview
class RecordTrainingPaths(L.Callback):
    """Writes, per rank, the image paths of every training batch (used by the DDP CLI test)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {"epoch": trainer.current_epoch, "paths": list(batch["path"])}
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")


def tiny_config(tmp_path: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "use_distributed_sampler": False,
            "max_epochs": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}},
            "callbacks": [{"class_path": "test_dli.RecordTrainingPaths", "init_args": {"out_dir": str(tmp_path)}}],
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
        },
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
        "model": {
            "class_path": "defectseg.models.SegmentationModule",
            "init_args": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        },
        "data": {
            "class_path": "defectseg.data.SyntheticDefectsDataModule",
            "init_args": {
                "num_images": 24, "image_size": 32, "batch_size": 4, "test_fraction": 0.15,
                "class_weights": [0.4, 0.3, 0.2, 0.1],
                "dli": {"p_poisson": 0.5, "placement": "random"},
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_cli_ddp_fit_with_dli_splits_batches_and_logs_class_counts(tmp_path):
    """`defectseg fit` on two CPU processes (DDP, gloo) with the YAML `dli:` switch: the ranks
    train on disjoint batches covering each epoch, epochs differ, and the logs show the
    per-batch class counts before and after injection."""
    config = tiny_config(tmp_path)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [sys.executable, "-m", "defectseg", "fit", "--config", str(config)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data_args = yaml.safe_load(config.read_text())["data"]["init_args"]
    data_args.pop("dli")
    train = SyntheticDefectsDataModule(**data_args).samples_of("train")
    records = {
        rank: [json.loads(line) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }
    orders = []
    for epoch in (0, 1):
        per_rank = [[p for r in records[rank] if r["epoch"] == epoch for p in r["paths"]] for rank in (0, 1)]
        steps = [sum(r["epoch"] == epoch for r in records[rank]) for rank in (0, 1)]
        assert steps[0] == steps[1] >= 2  # the same number of steps on both ranks
        assert not set(per_rank[0]) & set(per_rank[1])  # disjoint
        assert sorted(per_rank[0] + per_rank[1]) == sorted(s.image for s in train)  # covering
        orders.append(per_rank[0] + per_rank[1])
    assert orders[0] != orders[1]  # Lightning set the sampler's epoch

    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    names = ["defect_free", "scratch", "pit", "stain", "crack"]
    header = set(rows[0])
    for stage in ("before", "after"):
        assert {f"train/dli/{stage}/{n}" for n in names} <= header
    eligible = sorted({c for sample in train for c in sample.classes})  # classes with a donor
    assert len(eligible) >= 3
    steps = [r for r in rows if r.get("train/dli/after/scratch")]
    assert len(steps) == len(records[0])  # one row per rank-0 step
    for row in steps:
        before = np.array([float(row[f"train/dli/before/{n}"]) for n in names])
        after = np.array([float(row[f"train/dli/after/{n}"]) for n in names])
        injected = float(row["train/dli/injected"])
        assert after[0] == 0 and injected == before[0]  # every defect-free image got a defect
        before[0] = after[0] = 0
        assert_water_filled(before, after, eligible, int(injected))


def test_preview_writes_a_grid_and_never_overwrites(tmp_path, capsys):
    from defectseg.cli import main

    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "class_path": "defectseg.data.SyntheticDefectsDataModule",
        "init_args": {"num_images": 30, "image_size": 48, "batch_size": 6, "dli": {"p_poisson": 1.0}},
    }}))
    out = tmp_path / "figs" / "grid.png"
    assert main(["dli-preview", "--config", str(config), "--out", str(out), "--num", "4", "--columns", "2", "--tile", "64"]) == 0
    grid = cv2.imread(str(out))
    # 2 rows of 2 triplets: 3 tiles of 64 + 2 gaps of 4; rows of 64 + a 14 px caption, 4 apart
    assert grid.shape == (2 * (64 + 14) + 4, 2 * (3 * 64 + 2 * 4) + 16, 3)
    # the result tile differs from the target tile (something was injected)
    target, result = grid[14:78, 68:132], grid[14:78, 136:200]
    assert (np.abs(target.astype(int) - result.astype(int)) > 30).any()
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="already exists"):
        main(["dli-preview", "--config", str(config), "--out", str(out)])
    assert out.read_bytes() == before


# ---------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_magnetic_tile_batches_are_balanced(real_data_root):
    magnetic_tile = pytest.importorskip("defectseg.data.magnetic_tile")
    if not (real_data_root / "magnetic_tile").is_dir():
        pytest.skip("magnetic_tile not in the real datasets")
    dm = magnetic_tile.MagneticTileDataModule(
        root=str(real_data_root / "magnetic_tile"), batch_size=12, augment=False, channels=1,
        dli={"p_poisson": 0.5},
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    sampler = loader.batch_sampler
    assert sampler.eligible == [1, 2, 3, 4, 5]
    plain = dm.make_dataset("train", augment=False)
    for number, (plans, batch) in enumerate(zip(sampler, loader)):
        if number == 3:
            break
        before = sum(image_counts(plain[p.index]["mask"][None], dm.num_classes) for p in plans)
        after = image_counts(batch["mask"], dm.num_classes)
        injections = sum(p.injects for p in plans)
        assert injections == sum(sampler.defect_free[p.index] for p in plans)
        assert_water_filled(before, after, sampler.eligible, injections)
        # images of different sizes: each injection stays inside its image's valid area
        for mask, valid in zip(batch["mask"], batch["valid_size"]):
            h, w = valid.tolist()
            assert (mask[h:, :] == IGNORE_INDEX).all() and (mask[:, w:] == IGNORE_INDEX).all()
