"""Integration tests on the real Magnetic Tile and NEU-Seg (skipped when they are absent).

They find the data through ``DEFECTSEG_DATA_ROOT`` (default ``../shared/datasets``). The NEU-Seg
metadata (with its near-duplicate groups) is scanned once per test session and then read from
the session's metadata cache.
"""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest

from defectseg.data import IGNORE_INDEX, MagneticTileDataModule, NEUSegDataModule

pytestmark = pytest.mark.realdata

MT_COUNTS = {"Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32, "Uneven": 103, "Free": 952}


def magnetic_tile(root, **kwargs) -> MagneticTileDataModule:
    return MagneticTileDataModule(root=str(root / "magnetic_tile"), **kwargs)


def neu_seg(root, **kwargs) -> NEUSegDataModule:
    return NEUSegDataModule(root=str(root / "neu_seg"), **kwargs)


def test_magnetic_tile_counts_per_class(real_data_root):
    dm = magnetic_tile(real_data_root)
    names = dm.class_names
    counts = Counter(names[s.label] if s.label else "Free" for s in dm.metadata)
    assert counts == MT_COUNTS
    # defect-free by their mask: exactly the defect-folder masks with no pixel above 127
    empty = {
        s.image
        for s in dm.metadata
        if s.label and not (cv2.imread(s.mask, cv2.IMREAD_GRAYSCALE) > 127).any()
    }
    assert empty == {s.image for s in dm.metadata if s.label and s.defect_free}
    assert all(s.classes == (s.label,) for s in dm.metadata if s.label and not s.defect_free)
    for sample in dm.metadata[::97]:
        height, width = cv2.imread(sample.image, cv2.IMREAD_GRAYSCALE).shape
        assert sample.num_pixels == height * width
    parts = {name: {s.image for s in dm.samples_of(name)} for name in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == 1344 and not parts["train"] & parts["test"]


def test_magnetic_tile_batch_shapes_and_mask_values(real_data_root):
    dm = magnetic_tile(real_data_root, batch_size=6, augment=False)
    dataset = dm.make_dataset("test")
    label_of = {s.image: s.label for s in dm.metadata}
    batch = next(iter(dm._loader(dataset, shuffle=False)))
    images, masks = batch["image"], batch["mask"]
    assert images.shape[:2] == (6, 3) and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    assert masks.shape == (6, *images.shape[2:])
    for i, path in enumerate(batch["path"]):
        h, w = batch["valid_size"][i].tolist()
        assert batch["orig_size"][i].tolist() == [h, w]
        inside = masks[i, :h, :w]
        assert set(inside.unique().tolist()) <= {0, label_of[path]}
        assert (masks[i, h:] == IGNORE_INDEX).all() and (masks[i, :, w:] == IGNORE_INDEX).all()
        assert bool(batch["defect_free"][i]) == (not (inside > 0).any())


def thumbnails(paths) -> np.ndarray:
    """64x64 grayscale thumbnails, read independently of the library."""
    return np.stack(
        [
            cv2.resize(cv2.imread(p, cv2.IMREAD_GRAYSCALE), (64, 64), interpolation=cv2.INTER_AREA)
            for p in paths
        ]
    ).astype(np.float32)


def nearest_copy(query: np.ndarray, pool: np.ndarray) -> float:
    """Smallest mean absolute difference between ``query`` (any rotation) and a pool image."""
    flat = pool.reshape(len(pool), -1)
    return min(float(np.abs(flat - np.rot90(query, r).reshape(-1)).mean(axis=1).min()) for r in range(4))


def test_neu_seg_grouped_split_keeps_every_duplicate_group_on_one_side(real_data_root):
    dm = neu_seg(real_data_root)
    assert dm.split == "grouped" and len(dm.metadata) == 4470
    side: dict[str, str] = {}
    parts = {name: dm.samples_of(name) for name in ("train", "val", "test")}
    for name, samples in parts.items():
        for sample in samples:
            assert side.setdefault(sample.group, name) == name, f"group {sample.group} in two splits"
    sizes = Counter(Counter(s.group for s in dm.metadata).values())
    assert sizes.most_common(1)[0][0] == 4  # a scene and its three rotations
    # the leak of the official split, as documented: 810 of 840 test images share a group
    # with a training image
    train_groups = {s.group for s in dm.metadata if s.split == "train"}
    official_test = [s for s in dm.metadata if s.split == "test"]
    assert len(official_test) == 840
    assert sum(s.group in train_groups for s in official_test) == 810
    # independent check: no sampled grouped-test image has a near-copy among the training images,
    # while most sampled official-test images do
    rng = np.random.default_rng(0)
    index = {s.image: i for i, s in enumerate(dm.metadata)}
    thumbs = thumbnails([s.image for s in dm.metadata])
    grouped_train = thumbs[[index[s.image] for s in parts["train"]]]
    for k in rng.choice(len(parts["test"]), 15, replace=False):
        assert nearest_copy(thumbs[index[parts["test"][k].image]], grouped_train) > 1.0
    official_train = thumbs[[i for i, s in enumerate(dm.metadata) if s.split == "train"]]
    leaked = [official_test[k].image for k in rng.choice(840, 15, replace=False)]
    assert sum(nearest_copy(thumbs[index[image]], official_train) < 1.0 for image in leaked) >= 12


def test_neu_seg_batch_shapes_and_mask_values(real_data_root):
    dm = neu_seg(real_data_root, batch_size=8, augment=False)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (8, 3, 224, 224) and batch["mask"].shape == (8, 224, 224)
    assert batch["valid_size"].tolist() == [[200, 200]] * 8
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    assert (batch["mask"][:, :200, :200] != IGNORE_INDEX).all()
    assert (batch["mask"][:, 200:] == IGNORE_INDEX).all()
    for i, path in enumerate(batch["path"]):
        raw = cv2.imread(path.replace("/images/", "/annotations/").replace(".jpg", ".png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(batch["mask"][i, :200, :200].numpy(), raw)


def test_magnetic_tile_crops_and_decode_cache_at_native_resolution(real_data_root, tmp_path):
    """The recipe's data path on the real data: the decode cache holds exactly what decoding
    gives, and defect-centred training crops show the image's defect class."""
    dm = magnetic_tile(real_data_root, crop_size=160, defect_crop_fraction=1.0, augment=False,
                       decode_cache=True, cache_dir=str(tmp_path), scale=0.75)
    train = dm.make_dataset("train")
    assert train.cache is not None and len(train.cache) == 1344
    plain = magnetic_tile(real_data_root, decode_cache=False, scale=0.75, cache_dir=str(tmp_path)).make_dataset("train")
    for index in range(0, len(train), 61):
        cached, decoded = train.read(index), plain.read(index)
        assert np.array_equal(cached[0], decoded[0]) and np.array_equal(cached[1], decoded[1])
        sample = train.samples[index]
        item = train[index]
        assert item["image"].shape[-2:] == (160, 160)
        if (cached[1] == sample.label).any():  # (a defect of a few pixels can vanish at scale 0.75)
            assert (item["mask"] == sample.label).any(), sample.image
