"""The built-in synthetic data: contract, reproducibility, imbalance, splits."""

import numpy as np
import pytest
import torch

from defectseg.data import IGNORE_INDEX, SyntheticDefectsDataModule
from defectseg.data.synthetic import SyntheticDefectGenerator


def test_batch_follows_the_contract():
    dm = SyntheticDefectsDataModule(num_images=30, image_size=(48, 80), batch_size=4, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 64, 96)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (4, 64, 96)
    assert batch["defect_free"].dtype == torch.bool and batch["defect_free"].shape == (4,)
    assert isinstance(batch["path"], list) and all(p.startswith("synthetic://") for p in batch["path"])
    # padding to a multiple of 32 is ignored in the mask; the image region is labelled
    assert (batch["mask"][:, 48:, :] == IGNORE_INDEX).all() and (batch["mask"][:, :, 80:] == IGNORE_INDEX).all()
    assert (batch["mask"][:, :48, :80] != IGNORE_INDEX).all()
    assert batch["valid_size"].tolist() == [[48, 80]] * 4
    for mask, free in zip(batch["mask"], batch["defect_free"]):
        labelled = mask[mask != IGNORE_INDEX]
        assert bool(free) == bool((labelled == 0).all())
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}
    # normalised: the surface is around the mean, not 0..255
    assert batch["image"][:, :, :48, :80].abs().mean() < 3


def test_generation_is_reproducible_and_seeded():
    a = SyntheticDefectGenerator(10, (64, 64), 4, 0.5, None, seed=3)
    b = SyntheticDefectGenerator(10, (64, 64), 4, 0.5, None, seed=3)
    c = SyntheticDefectGenerator(10, (64, 64), 4, 0.5, None, seed=4)
    for i in range(10):
        assert np.array_equal(a(i)[0], b(i)[0]) and np.array_equal(a(i)[1], b(i)[1])
    assert any(not np.array_equal(a(i)[0], c(i)[0]) for i in range(10))
    # the mask rendered for metadata is the one served with the image
    for i in range(10):
        assert np.array_equal(a.mask(i), a(i)[1])


def test_imbalance_follows_the_configuration():
    gen = SyntheticDefectGenerator(3000, (32, 32), 4, 0.6, None, seed=0)
    labels = np.array([gen.label_of(i) for i in range(3000)])
    assert abs((labels == 0).mean() - 0.6) < 0.03
    defective = labels[labels > 0]
    shares = [(defective == k).mean() for k in range(1, 5)]
    for share, expected in zip(shares, [0.6, 0.25, 0.1, 0.05]):
        assert abs(share - expected) < 0.04


def test_defect_areas_span_tiny_to_large():
    dm = SyntheticDefectsDataModule(num_images=300, image_size=128)
    ratios = [sum(s.pixel_counts.values()) / s.num_pixels for s in dm.metadata if not s.defect_free]
    assert min(ratios) < 0.005 and max(ratios) > 0.1
    # each defective image holds exactly one defect class; the class decides the look
    assert all(len(s.classes) == 1 for s in dm.metadata if not s.defect_free)


def test_splits_are_disjoint_cover_and_stratified():
    dm = SyntheticDefectsDataModule(num_images=400, val_fraction=0.2, test_fraction=0.2, seed=1)
    parts = dm.split_indices()
    train, val, test = (set(parts[k]) for k in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(400))
    for k in range(0, 5):
        total = sum(1 for s in dm.metadata if s.primary_class == k)
        in_val = sum(1 for i in val if dm.metadata[i].primary_class == k)
        assert abs(in_val - 0.2 * total) <= 1, (k, in_val, total)


def test_statistics_match_a_direct_count():
    dm = SyntheticDefectsDataModule(num_images=40, image_size=32)
    stats = dm.statistics()
    masks = [dm.generator(i)[1] for i in range(40)]
    for k, name in enumerate(dm.class_names[1:], start=1):
        with_k = [m for m in masks if (m == k).any()]
        assert stats[name]["image_ratio"] == pytest.approx(len(with_k) / 40)
        expected = np.mean([(m == k).mean() for m in with_k]) if with_k else 0.0
        assert stats[name]["pixel_ratio"] == pytest.approx(expected)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="class_weights must hold 4"):
        SyntheticDefectsDataModule(class_weights=[1, 2])
    with pytest.raises(ValueError, match="val_fraction"):
        SyntheticDefectsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticDefectsDataModule(size_policy="resize")
    with pytest.raises(ValueError, match="augmentation entry"):
        SyntheticDefectsDataModule(num_images=10, augment=[{"name": "NoSuchTransform"}]).make_dataset("train")


def test_augmented_batches_follow_the_global_seed():
    """albumentations 2 has its own generator: the dataset seeds it from torch, so
    seed_everything makes augmented training batches reproducible (and a new seed changes them)."""
    import lightning as L

    def first_batch(seed: int) -> torch.Tensor:
        L.seed_everything(seed, verbose=False)
        dm = SyntheticDefectsDataModule(num_images=24, image_size=32, batch_size=8, num_workers=0, augment=True)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["image"]

    torch.testing.assert_close(first_batch(3), first_batch(3), atol=0, rtol=0)
    assert not torch.equal(first_batch(3), first_batch(4))
