"""Bad input: every error names what is wrong (file, values, sizes) and how to fix it."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
from helpers.fake_data import (
    make_dagm,
    make_folder,
    make_kolektor,
    make_magnetic_tile,
    make_neu_seg,
    make_severstal,
)

from defectseg.data import (
    DAGMDataModule,
    DatasetNotFoundError,
    FolderDataModule,
    KolektorSDD2DataModule,
    MagneticTileDataModule,
    NEUSegDataModule,
    SeverstalDataModule,
)


def scan(dm):
    """The datamodule's metadata (scans the dataset, or reads the cache)."""
    return dm.metadata


FORMATS = [
    (MagneticTileDataModule, "MT_Blowhole/Imgs", "github.com/abin24"),
    (NEUSegDataModule, "annotations/training", "NEU"),
    (KolektorSDD2DataModule, "_GT.png", "vicos.si"),
    (DAGMDataModule, "Labels.txt", "hci.iwr.uni-heidelberg.de"),
    (SeverstalDataModule, "train.csv", "kaggle.com"),
    (FolderDataModule, "mask_pattern", ""),
]


@pytest.mark.parametrize(("cls", "layout", "source"), FORMATS)
def test_missing_root_names_the_layout_and_the_source(tmp_path, cls, layout, source):
    dm = cls(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        scan(dm)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "nowhere") in str(info.value)
    assert layout in str(info.value) and source in str(info.value)


@pytest.mark.parametrize(
    ("cls", "missing"),
    [
        (NEUSegDataModule, "images/training"),
        (KolektorSDD2DataModule, "train"),
        (DAGMDataModule, "Class1/Train"),
        (SeverstalDataModule, "train_images"),
        (FolderDataModule, "images"),
        (MagneticTileDataModule, "MT_<Class>/Imgs"),
    ],
)
def test_root_without_the_layout_raises_dataset_not_found(tmp_path, cls, missing):
    (tmp_path / "unrelated").mkdir()
    with pytest.raises(DatasetNotFoundError, match=re.escape(missing)):
        scan(cls(root=str(tmp_path)))


def test_image_without_mask_lists_the_offenders_or_skips_them(tmp_path):
    fakes = make_magnetic_tile(tmp_path, counts={"Crack": 14})
    for fake in fakes[:12]:
        fake.mask.unlink()
    with pytest.raises(FileNotFoundError, match="12 images without a mask") as info:
        scan(MagneticTileDataModule(root=str(tmp_path)))
    message = str(info.value)
    assert str(fakes[0].image) in message and f"(looked for {fakes[0].mask.name})" in message
    assert "... and 2 more" in message and "on_missing: skip" in message
    with pytest.warns(UserWarning, match="12 images without a mask"):
        dm = MagneticTileDataModule(root=str(tmp_path), on_missing="skip")
        assert [s.image for s in dm.metadata] == [str(f.image) for f in fakes[12:]]
    # the cache of the skipping run does not hide the error from a strict one
    with pytest.raises(FileNotFoundError, match="12 images without a mask"):
        scan(MagneticTileDataModule(root=str(tmp_path)))


@pytest.mark.parametrize(
    ("maker", "cls", "suffix"),
    [
        (make_neu_seg, NEUSegDataModule, ".jpg"),
        (make_kolektor, KolektorSDD2DataModule, ".png"),
        (lambda root: make_folder(root, junk=False), FolderDataModule, ".png"),
    ],
)
def test_mask_without_image_is_reported(tmp_path, maker, cls, suffix):
    fakes = maker(tmp_path)
    fakes[0].image.unlink()
    with pytest.raises(FileNotFoundError, match="1 masks without an image") as info:
        scan(cls(root=str(tmp_path)))
    assert str(fakes[0].mask) in str(info.value)
    with pytest.warns(UserWarning, match="masks without an image"):
        assert len(cls(root=str(tmp_path), on_missing="skip").metadata) == len(fakes) - 1


def test_corrupt_image_and_mask_are_named(tmp_path):
    fakes = make_kolektor(tmp_path)
    fakes[1].image.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=re.escape(f"cannot read {fakes[1].image}")):
        scan(KolektorSDD2DataModule(root=str(tmp_path)))
    fakes = make_kolektor(tmp_path / "b")
    fakes[2].mask.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"cannot decode {fakes[2].mask}")):
        scan(KolektorSDD2DataModule(root=str(tmp_path / "b")))


def test_image_corrupted_after_the_scan_is_named_when_loaded(tmp_path):
    fakes = make_magnetic_tile(tmp_path, counts={"Break": 2})
    dm = MagneticTileDataModule(root=str(tmp_path))
    sample = dm.metadata[0]
    with open(sample.image, "r+b") as handle:  # keep the header, break the data
        handle.seek(20)
        handle.truncate()
    assert fakes
    with pytest.raises(ValueError, match=re.escape(sample.image)):
        dm.load_sample(sample)


def test_mask_size_mismatch_names_both_files(tmp_path):
    fakes = make_neu_seg(tmp_path)
    cv2.imwrite(str(fakes[3].mask), np.zeros((20, 30), np.uint8))
    with pytest.raises(ValueError, match="is 30x20 \\(WxH\\) but its image") as info:
        scan(NEUSegDataModule(root=str(tmp_path)))
    assert str(fakes[3].mask) in str(info.value) and str(fakes[3].image) in str(info.value)
    assert "48x48" in str(info.value)


def test_unexpected_mask_values_are_listed(tmp_path):
    fakes = make_neu_seg(tmp_path)
    bad = fakes[5].target.copy()
    bad[:2, :2] = 7
    bad[-1, -1] = 200
    cv2.imwrite(str(fakes[5].mask), bad)
    with pytest.raises(ValueError, match=re.escape("holds unexpected values [7, 200]")) as info:
        scan(NEUSegDataModule(root=str(tmp_path)))
    assert str(fakes[5].mask) in str(info.value) and "expected only [0, 1, 2, 3]" in str(info.value)


def test_folder_values_outside_the_value_map_and_non_binary_masks(tmp_path):
    make_folder(tmp_path, mask_values=(80, 160))
    with pytest.raises(ValueError, match=re.escape("unexpected values [160]")):
        scan(FolderDataModule(root=str(tmp_path), value_map={80: 1}))
    fakes = make_folder(tmp_path / "b", mask_values=(1, 2, 3))
    with pytest.raises(ValueError, match="not a binary 0/1 or 0/255 mask.*set value_map") as info:
        scan(FolderDataModule(root=str(tmp_path / "b")))
    assert any(str(f.mask) in str(info.value) for f in fakes)


def test_zero_samples_is_an_error(tmp_path):
    make_magnetic_tile(tmp_path, counts={})
    with pytest.raises(ValueError, match="found no samples"):
        scan(MagneticTileDataModule(root=str(tmp_path)))
    (tmp_path / "f" / "images").mkdir(parents=True)
    (tmp_path / "f" / "masks").mkdir()
    (tmp_path / "f" / "images" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="found no samples"):
        scan(FolderDataModule(root=str(tmp_path / "f")))


def test_every_sample_skipped_is_zero_samples(tmp_path):
    fakes = make_kolektor(tmp_path, defective={"train": 1, "test": 1}, good={})
    for fake in fakes:
        fake.mask.unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="found no samples"):
        scan(KolektorSDD2DataModule(root=str(tmp_path), on_missing="skip"))


def test_dagm_bad_labels_and_unlisted_files(tmp_path):
    make_dagm(tmp_path, classes=(1,))
    labels = tmp_path / "Class1" / "Train" / "Label" / "Labels.txt"
    original = labels.read_bytes()
    labels.write_bytes(original + b"9\t1\t0009.PNG\t0\r\n")
    with pytest.raises(ValueError, match=re.escape(f"{labels}, line 7")):
        scan(DAGMDataModule(root=str(tmp_path), classes=[1]))
    labels.write_bytes(original + b"9\t1\t0009.PNG\t0\t0\r\n")
    with pytest.raises(ValueError, match="needs a label file"):
        scan(DAGMDataModule(root=str(tmp_path), classes=[1]))
    labels.write_bytes(original + b"9\t0\t0009.PNG\t0\t0\r\n")
    with pytest.raises(FileNotFoundError, match="listed in .* but missing:\n.*0009.PNG"):
        scan(DAGMDataModule(root=str(tmp_path), classes=[1]))
    labels.write_bytes(original)
    (tmp_path / "Class1" / "Train" / "Label" / "0002_label.PNG").unlink()
    with pytest.raises(FileNotFoundError, match="label files listed in Labels.txt but missing"):
        scan(DAGMDataModule(root=str(tmp_path), classes=[1]))
    with pytest.raises(DatasetNotFoundError, match="Class2"):
        scan(DAGMDataModule(root=str(tmp_path), classes=[2]))
    with pytest.raises(ValueError, match="distinct texture classes"):
        DAGMDataModule(root=str(tmp_path), classes=[0, 11])


def test_dagm_image_not_listed(tmp_path):
    fakes = make_dagm(tmp_path, classes=(1,))
    cv2.imwrite(str(fakes[0].image.parent / "0099.PNG"), np.zeros((32, 32), np.uint8))
    with pytest.raises(FileNotFoundError, match="not listed in Label/Labels.txt:\n  0099.PNG"):
        scan(DAGMDataModule(root=str(tmp_path), classes=[1]))


def test_severstal_bad_csv(tmp_path):
    make_severstal(tmp_path)
    csv_path = tmp_path / "train.csv"
    text = csv_path.read_text()
    csv_path.write_text("Image,Class,Pixels\n" + text.split("\n", 1)[1])
    with pytest.raises(ValueError, match="unknown header"):
        scan(SeverstalDataModule(root=str(tmp_path)))
    csv_path.write_text(text + "0000abcd.jpg,7,1 3\n")
    with pytest.raises(ValueError, match="class id '7' is not 1..4"):
        scan(SeverstalDataModule(root=str(tmp_path)))
    csv_path.write_text(text + "0000abcd.jpg,2,630 20\n")
    with pytest.raises(ValueError, match="0000abcd.jpg, class 2: .*outside a 40x16 image"):
        scan(SeverstalDataModule(root=str(tmp_path)))
    csv_path.write_text(text + "ffffabcd.jpg,2,1 3\n")
    with pytest.raises(FileNotFoundError, match="missing from .*train_images:\n.*ffffabcd.jpg"):
        scan(SeverstalDataModule(root=str(tmp_path)))


def test_folder_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match="holding \\{stem\\} once"):
        FolderDataModule(root=str(tmp_path), mask_pattern="mask.png")
    with pytest.raises(ValueError, match="value_map applies to class_source: values"):
        FolderDataModule(root=str(tmp_path), class_source="subfolder", value_map={255: 1})
    with pytest.raises(ValueError, match="must name 3 classes"):
        FolderDataModule(root=str(tmp_path), value_map={1: 1, 2: 2}, class_names=["bg", "a"])
    fakes = make_folder(tmp_path / "a", junk=False)
    cv2.imwrite(str(fakes[0].image.with_suffix(".jpg")), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="two images share the name 'part_0_000'"):
        scan(FolderDataModule(root=str(tmp_path / "a")))
    make_folder(tmp_path / "b", classes=("oil",), junk=False)
    cv2.imwrite(str(tmp_path / "b" / "images" / "stray.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="1 images are not in a class subfolder.*stray.png"):
        scan(FolderDataModule(root=str(tmp_path / "b"), class_source="subfolder"))


def test_missing_list_files_raise_dataset_not_found(tmp_path):
    make_dagm(tmp_path / "dagm", classes=(1,))
    (tmp_path / "dagm" / "Class1" / "Test" / "Label" / "Labels.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="expected image list .*Class1/Test/Label/Labels.txt"):
        scan(DAGMDataModule(root=str(tmp_path / "dagm"), classes=[1]))
    make_severstal(tmp_path / "sev")
    (tmp_path / "sev" / "train.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match="train.csv is missing") as info:
        scan(SeverstalDataModule(root=str(tmp_path / "sev")))
    assert "kaggle.com" in str(info.value)
