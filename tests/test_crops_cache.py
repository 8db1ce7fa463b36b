"""Native-resolution training crops, defect-centred crops, ``scale``, the decode cache, and DLI on crops."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from defectseg.data import IGNORE_INDEX, MagneticTileDataModule, SyntheticDefectsDataModule
from defectseg.data.cache import DecodeCache
from defectseg.data.dataset import crop_window, random_crop
from helpers.fake_data import make_magnetic_tile


def test_a_defect_centred_crop_contains_a_defect_pixel_of_the_image():
    rng = np.random.default_rng(0)
    for trial in range(200):
        height, width = rng.integers(40, 120, size=2)
        mask = np.zeros((height, width), np.int64)
        y, x = rng.integers(0, height), rng.integers(0, width)
        label = int(rng.integers(1, 4))
        mask[y, x] = label  # one defect pixel, anywhere (borders included)
        image = np.zeros((height, width, 3), np.uint8)
        _, crop_mask = random_crop(image, mask, (32, 32), 1.0, rng)
        assert crop_mask.shape == (32, 32)
        assert (crop_mask == label).sum() == 1, f"trial {trial}: the defect at {(y, x)} is outside the crop"


def test_defect_centred_crops_pick_each_present_class():
    mask = np.zeros((100, 100), np.int64)
    mask[5, 5], mask[90, 90] = 1, 2
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(50):
        top, left = crop_window(mask, (20, 20), True, rng)
        window = mask[top : top + 20, left : left + 20]
        seen |= set(np.unique(window[window > 0]).tolist())
    assert seen == {1, 2}


def test_uniform_crops_stay_inside_and_cover_every_corner():
    mask = np.zeros((10, 12), np.int64)
    rng = np.random.default_rng(2)
    corners = {crop_window(mask, (8, 8), False, rng) for _ in range(400)}
    assert corners == {(t, l) for t in range(3) for l in range(5)}


def test_an_image_smaller_than_the_crop_is_padded_with_ignored_pixels():
    image = np.full((10, 20, 1), 7, np.uint8)
    mask = np.ones((10, 20), np.int64)
    crop_image, crop_mask = random_crop(image, mask, (16, 24), 0.0, np.random.default_rng(0))
    assert crop_image.shape == (16, 24, 1) and crop_mask.shape == (16, 24)
    assert (crop_mask == 1).sum() == 10 * 20 and (crop_mask == IGNORE_INDEX).sum() == 16 * 24 - 200
    assert (crop_image[crop_mask == IGNORE_INDEX] == 0).all() and (crop_image[crop_mask == 1] == 7).all()


def synthetic(**kwargs):
    base = dict(num_images=24, image_size=96, defect_free_fraction=0.3, augment=False, batch_size=4, seed=0)
    return SyntheticDefectsDataModule(**{**base, **kwargs})


def test_training_items_are_crops_and_evaluation_items_whole_images():
    dm = synthetic(crop_size=64, defect_crop_fraction=1.0)
    dm.setup("fit")
    train = dm.make_dataset("train")
    torch.manual_seed(0)
    for index, sample in enumerate(train.samples):
        item = train[index]
        assert item["image"].shape[-2:] == (64, 64) and item["valid_size"] == (64, 64)
        if not sample.defect_free:  # centred crops always show one of the image's defects
            assert set(item["mask"].unique().tolist()) & set(sample.classes)
    val = dm.make_dataset("val")
    assert val[0]["image"].shape[-2:] == (96, 96)


def test_scale_shrinks_images_and_masks_before_cropping():
    dm = synthetic(scale=0.5)
    dm.setup("fit")
    full = synthetic()
    full.setup("fit")
    item, original = dm.make_dataset("val")[0], full.make_dataset("val")[0]
    assert item["valid_size"] == (48, 48) and item["orig_size"] == (96, 96)
    assert item["image"].shape[-2:] == (64, 64)  # padded to the multiple of 32
    # nearest-neighbour: the scaled mask holds only values of the original, and every class survives
    assert set(item["mask"].unique().tolist()) - {IGNORE_INDEX} <= set(original["mask"].unique().tolist())
    with pytest.raises(ValueError, match="scale"):
        synthetic(scale=1.5)
    with pytest.raises(ValueError, match="resize"):
        synthetic(scale=0.5, size_policy="resize", image_size=64)


def test_dli_injects_into_the_crop_and_the_crop_keeps_the_injected_label():
    dm = synthetic(num_images=40, crop_size=64, defect_crop_fraction=1.0, dli={"p_poisson": 0.5}, batch_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    injected = 0
    for batch in loader:
        for mask, counts, done, image in zip(batch["mask"], batch["dli_counts"], batch["dli_injected"], batch["image"]):
            assert image.shape[-2:] == (64, 64)
            if done:
                injected += 1
                before, after = counts
                new = (after - before)[1:].nonzero().flatten() + 1
                assert new.numel() == 1  # one class was injected, and the crop's mask shows it
                assert (mask == int(new)).any()
    assert injected > 0


def mt_datamodule(root, cache_dir, **kwargs):
    return MagneticTileDataModule(root=str(root), cache_dir=str(cache_dir), augment=False, batch_size=2, **kwargs)


def test_the_decode_cache_serves_the_arrays_decoding_would(tmp_path):
    make_magnetic_tile(tmp_path / "mt")
    plain = mt_datamodule(tmp_path / "mt", tmp_path / "c0", decode_cache=False)
    cached = mt_datamodule(tmp_path / "mt", tmp_path / "c1", decode_cache=True)
    assert plain.decode_cache_for() is None
    for split in ("train", "val", "test"):
        a, b = plain.make_dataset(split), cached.make_dataset(split)
        assert b.cache is not None and len(a) == len(b)
        for i in range(len(a)):
            x, y = a.read(i), b.read(i)
            assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) and x[3] == y[3]
    assert cached.decode_cache_path().is_file()


def test_a_second_run_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    make_magnetic_tile(tmp_path / "mt")
    first = mt_datamodule(tmp_path / "mt", tmp_path / "c", decode_cache=True, scale=0.5)
    expected = [first.make_dataset("val").read(i)[:2] for i in range(len(first.make_dataset("val")))]
    second = mt_datamodule(tmp_path / "mt", tmp_path / "c", decode_cache=True, scale=0.5)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a file although the cache holds it")

    monkeypatch.setattr("defectseg.data.files.read_image", no_decoding)
    val = second.make_dataset("val")
    for i, (image, mask) in enumerate(expected):
        got = val.read(i)
        assert np.array_equal(got[0], image) and np.array_equal(got[1], mask)
    # workers get a pickled copy that reopens the file
    import pickle

    clone = pickle.loads(pickle.dumps(val))
    assert np.array_equal(clone.read(0)[0], expected[0][0])


def test_the_cache_is_rebuilt_when_a_file_or_a_setting_changes(tmp_path):
    make_magnetic_tile(tmp_path / "mt")
    dm = mt_datamodule(tmp_path / "mt", tmp_path / "c", decode_cache=True)
    first = dm.decode_cache_path()
    assert mt_datamodule(tmp_path / "mt", tmp_path / "c", decode_cache=True, scale=0.5).decode_cache_path() != first
    image = next((tmp_path / "mt").rglob("*.jpg"))
    stat = image.stat()
    os.utime(image, (stat.st_atime, stat.st_mtime + 10))
    assert mt_datamodule(tmp_path / "mt", tmp_path / "c", decode_cache=True).decode_cache_path() != first


def test_auto_keeps_the_cache_off_above_the_memory_budget(tmp_path):
    make_magnetic_tile(tmp_path / "mt")
    assert mt_datamodule(tmp_path / "mt", tmp_path / "c").use_decode_cache()  # tiny data: on
    assert not mt_datamodule(tmp_path / "mt", tmp_path / "c", decode_cache_max_gb=1e-9).use_decode_cache()
    assert not synthetic().use_decode_cache()  # generated data has nothing to decode from disk
    with pytest.raises(ValueError, match="decode_cache"):
        mt_datamodule(tmp_path / "mt", tmp_path / "c", decode_cache="sometimes")


def test_a_damaged_cache_file_is_ignored_and_rebuilt(tmp_path):
    make_magnetic_tile(tmp_path / "mt")
    dm = mt_datamodule(tmp_path / "mt", tmp_path / "c", decode_cache=True)
    dm.decode_cache_for()
    path = dm.decode_cache_path()
    path.write_bytes(path.read_bytes()[:-5])  # truncated: the index no longer matches
    assert DecodeCache.open(path) is None
    again = mt_datamodule(tmp_path / "mt", tmp_path / "c", decode_cache=True)
    assert again.decode_cache_for() is not None and DecodeCache.open(path) is not None


def test_datamodules_scale_twelve_bit_images_by_their_bit_depth(tmp_path):
    import cv2

    from defectseg.data import FolderDataModule
    from defectseg.data.bit_depth import BitDepthWarning
    from helpers.fake_data import make_folder

    fakes = make_folder(tmp_path / "parts", num_images=6, junk=False)
    rng = np.random.default_rng(0)
    raws = {}
    for fake in fakes:  # replace each 8-bit image with 12-bit camera data in a 16-bit PNG
        raw = rng.integers(0, 4096, size=cv2.imread(str(fake.image), cv2.IMREAD_GRAYSCALE).shape).astype(np.uint16)
        raw.flat[0] = 4095
        assert cv2.imwrite(str(fake.image), raw)
        raws[str(fake.image)] = raw

    def datamodule(**kwargs):
        return FolderDataModule(root=str(tmp_path / "parts"), channels=1, augment=False, decode_cache=False,
                                cache_dir=str(tmp_path / "cache"), val_fraction=0.0, test_fraction=0.2, **kwargs)

    dataset = datamodule(bit_depth=12).make_dataset("train")
    for index, sample in enumerate(dataset.samples):
        expected = np.rint(raws[sample.image].astype(np.float64) * 255 / 4095).astype(np.uint8)
        assert np.array_equal(dataset.read(index)[0][..., 0], expected)
    with pytest.warns(BitDepthWarning, match="12-bit"):
        auto = datamodule().make_dataset("train")
        assert np.array_equal(auto.read(0)[0], dataset.read(0)[0])
    with pytest.raises(ValueError, match="above the largest 10-bit value"):
        datamodule(bit_depth=10).make_dataset("train").read(0)
    with pytest.raises(ValueError, match="bit_depth"):
        datamodule(bit_depth=11)


# ------------------------------------------------------------------ defect_image_fraction
def _draw_share(fraction: float, num_images: int = 40, defect_free_fraction: float = 0.75, epochs: int = 25) -> float:
    dm = synthetic(num_images=num_images, defect_free_fraction=defect_free_fraction, defect_image_fraction=fraction)
    dm.setup("fit")
    loader = dm.train_dataloader()
    samples = loader.dataset.samples
    picks = [index for _ in range(epochs) for index in loader.sampler]
    assert len(list(loader.sampler)) == len(samples), "an epoch keeps the training split's length"
    return sum(not samples[i].defect_free for i in picks) / len(picks), samples


def test_defect_image_fraction_sets_the_share_of_defective_training_images():
    share, samples = _draw_share(0.5)
    natural = sum(not s.defect_free for s in samples) / len(samples)
    assert natural < 0.4  # the split itself is mostly defect-free
    # 25 epochs x ~28 draws at p = 0.5: the binomial's standard deviation is about 0.019
    assert abs(share - 0.5) < 0.08, share
    share_all, _ = _draw_share(1.0)
    assert share_all == 1.0


def test_defect_image_fraction_is_seeded():
    def picks(seed):
        dm = synthetic(defect_image_fraction=0.5, seed=seed)
        dm.setup("fit")
        return list(dm.train_dataloader().sampler)

    assert picks(3) == picks(3)
    assert picks(3) != picks(4)


def test_defect_image_fraction_rejects_bad_values_and_dli():
    with pytest.raises(ValueError, match=r"defect_image_fraction must be in \(0, 1\].*got 1.5"):
        synthetic(defect_image_fraction=1.5)
    with pytest.raises(ValueError, match="defect_image_fraction and dli"):
        synthetic(defect_image_fraction=0.5, dli=True)


def test_defect_image_fraction_without_defect_free_images_warns_and_shuffles():
    dm = synthetic(defect_free_fraction=0.0, defect_image_fraction=0.5)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="nothing to rebalance"):
        loader = dm.train_dataloader()
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler)
