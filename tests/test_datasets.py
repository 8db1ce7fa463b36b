"""The dataset formats on tiny fakes written in each official layout (tests/helpers/fake_data.py).

Per format: counts, classes, decoded masks (against the masks the helper drew), official and
stratified splits (disjoint, stratified, grouped), statistics against values computed with
numpy from the drawn masks, and the common-base options (size policy, channels, augmentation,
defect-free images in training, the metadata cache, ``defectseg stats``).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers.fake_data import (
    make_dagm,
    make_folder,
    make_kolektor,
    make_magnetic_tile,
    make_neu_seg,
    make_severstal,
)

from defectseg.data import (
    IGNORE_INDEX,
    DAGMDataModule,
    FolderDataModule,
    KolektorSDD2DataModule,
    MagneticTileDataModule,
    NEUSegDataModule,
    SeverstalDataModule,
)
from defectseg.data.base import build_augmentation, read_mask
from defectseg.data.dagm import read_dagm_labels
from defectseg.data.duplicates import group_labels, near_duplicate_pairs
from defectseg.data.severstal import read_severstal_csv, rle_decode, rle_encode

REPO = Path(__file__).resolve().parents[1]


def loaded_masks(dm) -> dict[str, np.ndarray]:
    """Decoded class mask of every sample, by image path."""
    loader = dm.sample_loader()
    return {s.image: loader(s)[1] for s in dm.metadata}


def assert_masks_match(dm, fakes) -> None:
    masks = loaded_masks(dm)
    assert sorted(masks) == sorted(str(f.image) for f in fakes)
    for fake in fakes:
        np.testing.assert_array_equal(masks[str(fake.image)], fake.target, err_msg=str(fake.image))


def expected_statistics(targets: list[np.ndarray], class_names: list[str]) -> dict[str, dict[str, float]]:
    """Table 2 statistics straight from the drawn masks."""
    out = {}
    for k, name in enumerate(class_names):
        if k == 0:
            ratios = [float((t == 0).mean()) for t in targets]
        else:
            ratios = [float((t == k).mean()) for t in targets if (t == k).any()]
        out[name] = {
            "pixel_ratio": float(np.mean(ratios)) if ratios else 0.0,
            "image_ratio": len(ratios) / len(targets),
            "images": float(len(ratios)),
        }
    return out


def assert_statistics(dm, fakes) -> None:
    expected = expected_statistics([f.target for f in fakes], dm.class_names)
    got = dm.statistics()
    assert list(got) == dm.class_names
    for name in dm.class_names:
        for key in ("pixel_ratio", "image_ratio", "images"):
            assert got[name][key] == pytest.approx(expected[name][key]), (name, key)


def assert_disjoint_cover(dm) -> dict[str, set[str]]:
    parts = {name: {s.image for s in dm.samples_of(name)} for name in ("train", "val", "test")}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert set().union(*parts.values()) == {s.image for s in dm.metadata}
    return parts


# --------------------------------------------------------------------------- Magnetic Tile
def test_magnetic_tile_counts_classes_masks_and_statistics(tmp_path):
    fakes = make_magnetic_tile(tmp_path, empty_uneven=1)
    dm = MagneticTileDataModule(root=str(tmp_path))
    assert dm.class_names == ["background", "Blowhole", "Break", "Crack", "Fray", "Uneven"]
    labels = Counter(s.label for s in dm.metadata)
    assert labels == {1: 3, 2: 3, 3: 3, 4: 3, 5: 3, 0: 4}
    # the ring of 100 around each defect (anti-aliasing) is cut by binarising at >127
    assert_masks_match(dm, fakes)
    for sample in dm.metadata:
        fake = next(f for f in fakes if str(f.image) == sample.image)
        assert sample.num_pixels == fake.target.size
        assert sample.classes == tuple(sorted(set(np.unique(fake.target)) - {0}))
    # the Uneven image with an empty mask is defect-free by its mask
    empty = [s for s in dm.metadata if s.label == 5 and s.defect_free]
    assert len(empty) == 1
    assert_statistics(dm, fakes)


def test_magnetic_tile_options(tmp_path):
    make_magnetic_tile(tmp_path, empty_uneven=2)
    dropped = MagneticTileDataModule(root=str(tmp_path), empty_defect_masks="drop")
    assert Counter(s.label for s in dropped.metadata)[5] == 1
    assert not any(s.label and s.defect_free for s in dropped.metadata)
    no_free = MagneticTileDataModule(root=str(tmp_path), include_free=False)
    assert 0 not in {s.label for s in no_free.metadata} and len(no_free.metadata) == 15
    with pytest.raises(ValueError, match="empty_defect_masks"):
        MagneticTileDataModule(root=str(tmp_path), empty_defect_masks="ignore")


def test_magnetic_tile_free_images_need_no_mask(tmp_path):
    fakes = make_magnetic_tile(tmp_path, counts={"Crack": 2, "Free": 3})
    for fake in fakes:
        if fake.label == 0:
            fake.mask.unlink()
    dm = MagneticTileDataModule(root=str(tmp_path))
    free = [s for s in dm.metadata if s.label == 0]
    assert len(free) == 3 and all(s.mask is None and s.defect_free for s in free)


def test_stratified_split_is_disjoint_stratified_and_seeded(tmp_path):
    counts = {"Blowhole": 20, "Break": 10, "Crack": 10, "Fray": 10, "Uneven": 10, "Free": 40}
    make_magnetic_tile(tmp_path, counts=counts, empty_uneven=0)
    dm = MagneticTileDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, seed=3)
    parts = assert_disjoint_cover(dm)
    label_of = {s.image: s.label for s in dm.metadata}
    for name in ("val", "test"):
        per_class = Counter(label_of[i] for i in parts[name])
        for label, total in enumerate([40, 20, 10, 10, 10, 10]):
            assert per_class[label] == round(total * 0.2), (name, label)
    again = MagneticTileDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, seed=3)
    assert assert_disjoint_cover(again) == parts
    other = MagneticTileDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, seed=4)
    assert assert_disjoint_cover(other)["test"] != parts["test"]


def test_batches_pad_varying_sizes_and_serve_one_channel(tmp_path):
    fakes = make_magnetic_tile(tmp_path, counts={"Break": 4})
    dm = MagneticTileDataModule(root=str(tmp_path), batch_size=4, augment=False, val_fraction=0, test_fraction=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].shape == (4, 64, 64)
    for i, path in enumerate(batch["path"]):
        fake = next(f for f in fakes if str(f.image) == path)
        h, w = fake.size
        assert batch["orig_size"][i].tolist() == [h, w] == batch["valid_size"][i].tolist()
        assert torch.equal(batch["mask"][i, :h, :w], torch.from_numpy(fake.target).long())
        assert (batch["mask"][i, h:, :] == IGNORE_INDEX).all() and (batch["mask"][i, :, w:] == IGNORE_INDEX).all()
    gray = MagneticTileDataModule(root=str(tmp_path), batch_size=2, channels=1, augment=False, val_fraction=0, test_fraction=0)
    assert gray.in_channels == 1
    assert next(iter(gray.train_dataloader()))["image"].shape[1] == 1


def test_resize_policy_uses_nearest_for_masks(tmp_path):
    make_magnetic_tile(tmp_path, counts={"Crack": 3})
    dm = MagneticTileDataModule(
        root=str(tmp_path), size_policy="resize", image_size=(24, 20), batch_size=3, augment=False,
        val_fraction=0, test_fraction=0,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 24, 20) and batch["valid_size"].tolist() == [[24, 20]] * 3
    assert set(batch["mask"].unique().tolist()) <= {0, 3}  # nearest neighbour: no blended values
    assert (batch["mask"] == 3).any()


def test_augmentation_from_yaml_moves_image_and_mask_together(tmp_path):
    fakes = make_magnetic_tile(tmp_path, counts={"Fray": 2})
    spec = yaml.safe_load("- {name: HorizontalFlip, p: 1.0}\n")
    dm = MagneticTileDataModule(root=str(tmp_path), augment=spec, batch_size=1, val_fraction=0, test_fraction=0)
    plain = MagneticTileDataModule(root=str(tmp_path), augment=False, batch_size=1, val_fraction=0, test_fraction=0)
    flipped, original = dm.make_dataset("train")[0], plain.make_dataset("train")[0]
    h, w = flipped["valid_size"]
    fake = next(f for f in fakes if str(f.image) == flipped["path"])
    assert torch.equal(flipped["mask"][:h, :w], torch.from_numpy(fake.target[:, ::-1].copy()).long())
    assert torch.allclose(flipped["image"][:, :h, :w], original["image"][:, :h, :w].flip(-1))
    names = [type(t).__name__ for t in build_augmentation(True).transforms]
    assert "HorizontalFlip" in names and not any("Blur" in n for n in names)
    with pytest.raises(ValueError, match="albumentations transform"):
        build_augmentation([{"name": "NoSuchTransform"}])


def test_train_defect_free_option_only_affects_training(tmp_path):
    make_magnetic_tile(tmp_path, counts={"Crack": 10, "Free": 10}, empty_uneven=0)
    keep = MagneticTileDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    drop = MagneticTileDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, train_defect_free=False)
    assert any(s.defect_free for s in keep.samples_of("train"))
    assert not any(s.defect_free for s in drop.samples_of("train"))
    assert {s.image for s in drop.samples_of("train")} == {s.image for s in keep.samples_of("train") if not s.defect_free}
    for split in ("val", "test"):
        assert [s.image for s in drop.samples_of(split)] == [s.image for s in keep.samples_of(split)]
        assert any(s.defect_free for s in drop.samples_of(split))


def test_metadata_is_cached_and_rescanned_when_files_change(tmp_path, monkeypatch):
    fakes = make_magnetic_tile(tmp_path / "mt", counts={"Crack": 2, "Free": 1})
    cache = tmp_path / "cache"
    first = MagneticTileDataModule(root=str(tmp_path / "mt"), cache_dir=str(cache))
    assert len(first.metadata) == 3 and len(list(cache.glob("*.json"))) == 1

    def no_scan(self):
        raise AssertionError("scanned again although the cache is valid")

    monkeypatch.setattr(MagneticTileDataModule, "scan", no_scan)
    second = MagneticTileDataModule(root=str(tmp_path / "mt"), cache_dir=str(cache))
    assert [s.to_json() for s in second.metadata] == [s.to_json() for s in first.metadata]
    monkeypatch.undo()
    # a changed mask changes the listing: the next datamodule scans again and sees the change
    crack = next(f for f in fakes if f.label == 3)
    cv2.imwrite(str(crack.mask), np.zeros(crack.size, np.uint8))
    os.utime(crack.mask, (1, 1))
    third = MagneticTileDataModule(root=str(tmp_path / "mt"), cache_dir=str(cache))
    assert sum(1 for s in third.metadata if s.defect_free) == 2
    assert len(list(cache.glob("*.json"))) == 2


# --------------------------------------------------------------------------- NEU-Seg
def test_neu_seg_official_split_classes_and_masks(tmp_path):
    fakes = make_neu_seg(tmp_path)
    dm = NEUSegDataModule(root=str(tmp_path), split="official", val_fraction=0)
    assert dm.class_names == ["background", "inclusion", "patches", "scratches"]
    assert_masks_match(dm, fakes)
    parts = assert_disjoint_cover(dm)
    assert parts["train"] == {str(f.image) for f in fakes if f.split == "train"}
    assert parts["test"] == {str(f.image) for f in fakes if f.split == "test"}
    assert len(parts["train"]) == 24 and len(parts["test"]) == 4
    assert any(len(s.classes) == 2 for s in dm.metadata)
    assert_statistics(dm, fakes)


def test_neu_seg_finds_rotated_duplicates_and_grouped_split_keeps_them_together(tmp_path):
    fakes = make_neu_seg(tmp_path, num_scenes=12, test_copies=4, test_unique=3)
    dm = NEUSegDataModule(root=str(tmp_path), val_fraction=0.25, test_fraction=0.25)
    assert dm.split == "grouped"
    scene = {str(f.image): f.group for f in fakes}
    # the groups found are exactly the scenes the helper drew (a partition equality)
    found, drawn = defaultdict(set), defaultdict(set)
    for sample in dm.metadata:
        found[sample.group].add(sample.image)
    for image, group in scene.items():
        drawn[group].add(image)
    assert sorted(map(sorted, found.values())) == sorted(map(sorted, drawn.values()))
    parts = assert_disjoint_cover(dm)
    side = {}
    for name, images in parts.items():
        for image in images:
            assert side.setdefault(scene[image], name) == name, f"scene {scene[image]} in two splits"
    assert parts["val"] and parts["test"]
    # the official split leaks: test images share scenes with training
    official = NEUSegDataModule(root=str(tmp_path), split="official", val_fraction=0)
    off = assert_disjoint_cover(official)
    assert {scene[i] for i in off["test"]} & {scene[i] for i in off["train"]}


def test_near_duplicate_search_matches_brute_force():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 255, (6, 16, 16)).astype(np.float32)
    thumbs = np.concatenate([base, np.rot90(base[:3], 1, axes=(1, 2)) + 0.5, base[3:4] + 3.0])
    pairs = {tuple(sorted(p)) for p in near_duplicate_pairs(thumbs, threshold=1.0).tolist()}
    brute = {
        (i, j)
        for i in range(len(thumbs))
        for j in range(i + 1, len(thumbs))
        if min(np.abs(thumbs[i] - np.rot90(thumbs[j], r)).mean() for r in range(4)) < 1.0
    }
    assert pairs == brute == {(0, 6), (1, 7), (2, 8)}
    assert near_duplicate_pairs(thumbs, threshold=1.0, rotations=False).size == 0
    assert group_labels(5, np.array([[3, 1], [1, 4]])) == [0, 1, 2, 1, 1]


# --------------------------------------------------------------------------- KolektorSDD2
def test_kolektor_pairs_gt_files_and_empty_gt_is_defect_free(tmp_path):
    fakes = make_kolektor(tmp_path)
    dm = KolektorSDD2DataModule(root=str(tmp_path), val_fraction=0.25)
    assert dm.class_names == ["background", "defect"]
    assert_masks_match(dm, fakes)
    assert sum(s.defect_free for s in dm.metadata) == 6
    assert all(not s.image.endswith("_GT.png") for s in dm.metadata)
    parts = assert_disjoint_cover(dm)
    assert parts["test"] == {str(f.image) for f in fakes if f.split == "test"}
    assert parts["val"] and parts["val"] < {str(f.image) for f in fakes if f.split == "train"}
    assert_statistics(dm, fakes)


# --------------------------------------------------------------------------- DAGM
def test_dagm_labels_txt_parsing(tmp_path):
    path = tmp_path / "Labels.txt"
    path.write_bytes(b"1\r\n1\t0\t0001.PNG\t0\t0\r\n2\t1\t0002.PNG\t0\t0002_label.PNG\r\n\r\n")
    rows = read_dagm_labels(path)
    assert [(r.image, r.label, r.defective) for r in rows] == [
        ("0001.PNG", None, False),
        ("0002.PNG", "0002_label.PNG", True),
    ]


def test_dagm_classes_masks_and_official_split(tmp_path):
    fakes = make_dagm(tmp_path, classes=(1, 2, 3))
    dm = DAGMDataModule(root=str(tmp_path), classes=[1, 2, 3], val_fraction=0)
    assert dm.class_names == ["background", "Class1", "Class2", "Class3"]
    assert_masks_match(dm, fakes)
    assert_statistics(dm, fakes)
    parts = assert_disjoint_cover(dm)
    assert parts["test"] == {str(f.image) for f in fakes if f.split == "test"}
    # a subset: Class3 alone is defect class 1
    subset = DAGMDataModule(root=str(tmp_path), classes=[3])
    assert subset.class_names == ["background", "Class3"] and len(subset.metadata) == 10
    masks = loaded_masks(subset)
    for fake in fakes:
        if fake.label == 3:
            np.testing.assert_array_equal(masks[str(fake.image)], (fake.target > 0).astype(np.uint8))
    assert DAGMDataModule(root=str(tmp_path), classes=[1, 2, 3]).statistics()["Class3"]["images"] == 4


# --------------------------------------------------------------------------- Severstal
def test_rle_decoding_against_a_hand_made_mask():
    # 3 rows x 4 columns; pixels are numbered 1.. down each column, then the next column
    expected = np.array(
        [[0, 1, 0, 1],
         [1, 0, 0, 1],
         [1, 0, 0, 0]], dtype=bool,
    )
    np.testing.assert_array_equal(rle_decode("2 3 10 2", (3, 4)), expected)
    assert rle_encode(expected) == "2 3 10 2"
    assert not rle_decode("", (3, 4)).any()
    with pytest.raises(ValueError, match="outside a 4x3 image"):
        rle_decode("11 3", (3, 4))
    with pytest.raises(ValueError, match="integer pairs"):
        rle_decode("1 2 3", (3, 4))


@pytest.mark.parametrize("layout", ["new", "old"])
def test_severstal_both_csv_layouts(tmp_path, layout):
    fakes = make_severstal(tmp_path, layout=layout)
    runs = read_severstal_csv(tmp_path / "train.csv")
    assert set(runs["0001abcd.jpg"]) == {"1", "4"}
    dm = SeverstalDataModule(root=str(tmp_path))
    assert dm.class_names == ["background", "class_1", "class_2", "class_3", "class_4"]
    assert_masks_match(dm, fakes)
    assert_statistics(dm, fakes)
    assert [s.defect_free for s in dm.metadata] == [not f.target.any() for f in fakes]


# --------------------------------------------------------------------------- Folder
def test_folder_masks_in_another_folder_with_value_map(tmp_path):
    fakes = make_folder(tmp_path, mask_values=(80, 160))
    dm = FolderDataModule(root=str(tmp_path), value_map={80: 1, 160: 2}, class_names=["bg", "oil", "dent"])
    assert dm.class_names == ["bg", "oil", "dent"]
    assert_masks_match(dm, fakes)  # the dotfile and notes.txt beside the images are ignored
    assert_statistics(dm, fakes)


@pytest.mark.parametrize(
    ("pattern", "image_ext"),
    [("{stem}_GT.png", ".png"), ("{stem}_label.bmp", ".png"), ("{stem}.png", ".jpg")],
)
def test_folder_masks_beside_images(tmp_path, pattern, image_ext):
    fakes = make_folder(tmp_path, image_dir=".", mask_dir=None, pattern=pattern, image_ext=image_ext)
    dm = FolderDataModule(root=str(tmp_path), image_dir=".", mask_dir=None, mask_pattern=pattern)
    assert dm.class_names == ["background", "defect"]
    assert_masks_match(dm, fakes)


def test_folder_classes_from_nested_subfolders_and_defect_free_folder(tmp_path):
    fakes = make_folder(tmp_path, classes=("oil", "scratch"), nested=True)
    fakes += make_folder(tmp_path, num_images=2, classes=("good",), junk=False, seed=1)
    for fake in fakes[-2:]:
        fake.mask.unlink()
        fake.target[:] = 0
    dm = FolderDataModule(root=str(tmp_path), class_source="subfolder", defect_free_folders=["good"])
    assert dm.class_names == ["background", "oil", "scratch"]
    assert_masks_match(dm, fakes)
    assert Counter(s.label for s in dm.metadata) == {1: 6, 2: 6, 0: 2}


def test_folder_flat_mask_folder_for_nested_images_and_missing_masks(tmp_path):
    fakes = make_folder(tmp_path, nested=True, without_mask=2)
    for fake in fakes:  # move every mask to the top of masks/ (found by its unique name)
        if fake.mask is not None:
            fake.mask.rename(tmp_path / "masks" / fake.mask.name)
    dm = FolderDataModule(root=str(tmp_path), missing_mask_defect_free=True)
    assert_masks_match(dm, fakes)
    assert sum(s.mask is None for s in dm.metadata) == 2


def test_folder_16_bit_label_masks_keep_their_values(tmp_path):
    mask = np.zeros((8, 8), np.uint16)
    mask[2:4, 2:5] = 2
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask.astype(np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), mask.astype(bool).astype(np.uint16) * 65535)
    assert set(np.unique(read_mask(tmp_path / "b.png")).tolist()) == {0, 255}


# --------------------------------------------------------------------------- configs and CLI
def data_config(name: str) -> str:
    return str(REPO / "configs" / "data" / f"{name}.yaml")


@pytest.mark.parametrize(
    ("name", "maker", "cls"),
    [
        ("magnetic_tile", make_magnetic_tile, MagneticTileDataModule),
        ("neu_seg", make_neu_seg, NEUSegDataModule),
        ("kolektorsdd2", make_kolektor, KolektorSDD2DataModule),
        ("dagm", lambda root: make_dagm(root, classes=tuple(range(1, 11)), defective=1, good=1), DAGMDataModule),
        ("severstal", make_severstal, SeverstalDataModule),
        ("folder", make_folder, FolderDataModule),
    ],
)
def test_every_data_config_loads_its_dataset(tmp_path, name, maker, cls):
    from defectseg.config import load_datamodule

    fakes = maker(tmp_path)
    dm = load_datamodule([data_config(name)], [f"data.init_args.root={tmp_path}"])
    assert type(dm) is cls and len(dm.metadata) == len(fakes)


def test_data_config_root_defaults_to_the_data_root_variable(tmp_path, monkeypatch):
    from defectseg.config import load_datamodule

    make_magnetic_tile(tmp_path / "magnetic_tile", counts={"Crack": 2})
    monkeypatch.setenv("DEFECTSEG_DATA_ROOT", str(tmp_path))
    dm = load_datamodule([data_config("magnetic_tile")])
    assert dm.root == str(tmp_path / "magnetic_tile") and len(dm.metadata) == 2


def test_stats_command_prints_the_statistics_table(tmp_path, capsys):
    from defectseg.cli import main

    fakes = make_magnetic_tile(tmp_path, counts={"Blowhole": 2, "Crack": 3, "Free": 2}, seed=5)
    assert main(["stats", "--config", data_config("magnetic_tile"), f"data.init_args.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "MagneticTileDataModule: 7 images" in out
    expected = expected_statistics([f.target for f in fakes], list(MagneticTileDataModule.CLASS_NAMES))
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for name in ("background", "Blowhole", "Crack", "Fray"):
        row = expected[name]
        assert rows[name] == (
            f"| {name} | {int(row['images'])} | {row['image_ratio']:.4f} | {row['pixel_ratio']:.4f} |"
        )
    assert rows["Crack"].startswith("| Crack | 3 | 0.4286 |")


def test_fit_runs_with_the_data_and_model_configs(tmp_path):
    from defectseg.cli import main

    make_magnetic_tile(tmp_path / "mt", counts={"Crack": 7, "Free": 7})  # 1 of 7 per class in val
    main([
        "fit",
        "--config", data_config("magnetic_tile"),
        "--config", str(REPO / "configs" / "model" / "unet_resnet18.yaml"),
        f"--data.init_args.root={tmp_path / 'mt'}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2",
        "--model.init_args.encoder_depth=3",
        "--model.init_args.decoder_channels=[16, 8, 8]",
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
    ])
