"""Severstal steel defect detection (Kaggle, 2019), as released."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from defectseg.data.base import Sample
from defectseg.data.files import FileDataModule, FileSampleLoader, MaskDecoder, list_image_files

SEVERSTAL_NUM_CLASSES = 4
NEW_HEADER = ["ImageId", "ClassId", "EncodedPixels"]
OLD_HEADER = ["ImageId_ClassId", "EncodedPixels"]


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``(height, width)`` mask of a run-length encoding.

    ``rle`` holds pairs ``start length``; pixels are numbered from 1, top to bottom, then left
    to right (column-major), as in Severstal's ``EncodedPixels``.

    Raises:
        ValueError: for an odd number of values, non-integers, or runs outside the image.
    """
    height, width = shape
    tokens = rle.split()
    try:
        values = np.asarray(tokens, dtype=np.int64).reshape(-1, 2)
    except ValueError as err:
        raise ValueError(f"run-length encoding must be integer pairs 'start length'; got {rle[:60]!r}") from err
    starts, lengths = values[:, 0] - 1, values[:, 1]
    if (starts < 0).any() or (lengths < 0).any() or (starts + lengths > height * width).any():
        raise ValueError(
            f"run-length encoding has runs outside a {width}x{height} image (pixels 1..{height * width})"
        )
    edges = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + lengths, -1)
    return (np.cumsum(edges[:-1]) > 0).reshape(width, height).T


def rle_encode(mask: np.ndarray) -> str:
    """Run-length encoding (1-indexed, column-major) of a boolean ``(height, width)`` mask."""
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).T.ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends))


def read_severstal_csv(path: str | Path) -> dict[str, dict[str, str]]:
    """Read ``train.csv`` in either layout into ``{image: {class id: run-length encoding}}``.

    The current layout has ``ImageId,ClassId,EncodedPixels`` rows for defects only; the older
    one has ``ImageId_ClassId,EncodedPixels`` rows for every image and class, with an empty
    encoding for no defect. Images listed without any defect map to ``{}``; runs given twice
    for one image and class are merged.

    Raises:
        ValueError: naming the file (and line) for an unknown header or a bad class id.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lstrip("\ufeff") for h in next(reader, [])]
        old = header[:2] == OLD_HEADER
        if not old and header[:3] != NEW_HEADER:
            raise ValueError(
                f"{path}: unknown header {header}; expected {','.join(NEW_HEADER)} or "
                f"{','.join(OLD_HEADER)}"
            )
        runs: dict[str, dict[str, str]] = {}
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if old:
                image, _, class_id = row[0].rpartition("_")
                rle = row[1] if len(row) > 1 else ""
            else:
                image, class_id, rle = row[0], row[1] if len(row) > 1 else "", row[2] if len(row) > 2 else ""
            if class_id.strip() not in {str(k) for k in range(1, SEVERSTAL_NUM_CLASSES + 1)}:
                raise ValueError(f"{path}, line {number}: class id {class_id!r} is not 1..{SEVERSTAL_NUM_CLASSES}")
            entry = runs.setdefault(image.strip(), {})
            if rle.strip():
                key = class_id.strip()
                entry[key] = f"{entry[key]} {rle.strip()}" if key in entry else rle.strip()
    return runs


class RLESampleLoader(FileSampleLoader):
    """Loads an image and draws its mask from the run-length encodings in ``sample.extra``."""

    def mask(self, sample: Sample, size: tuple[int, int]) -> np.ndarray:
        mask = np.zeros(size, dtype=np.uint8)
        for class_id, rle in sorted(sample.extra.get("rle", {}).items()):
            try:
                mask[rle_decode(rle, size)] = int(class_id)
            except ValueError as err:
                raise ValueError(f"train.csv entry of {sample.image}, class {class_id}: {err}") from err
        return mask


class SeverstalDataModule(FileDataModule):
    """Severstal steel defects in the Kaggle layout (either ``train.csv`` layout).

    ``train_images/<id>.jpg`` (1600x256) with their defects run-length encoded in
    ``train.csv``; four defect classes (ClassId 1..4). An image with no defect row is
    defect-free. Where two classes overlap, the higher class id wins (this is rare). The
    Kaggle test set has no labels, so the default split is seeded and stratified by class.

    Args:
        root: the folder holding ``train_images/`` and ``train.csv``; default
            ``$DEFECTSEG_DATA_ROOT/severstal``.
        **kwargs: the :class:`~defectseg.data.base.DefectDataModule` arguments.
    """

    CLASS_NAMES = ("background", *(f"class_{k}" for k in range(1, SEVERSTAL_NUM_CLASSES + 1)))
    DEFAULT_SUBDIR = "severstal"
    SOURCE = "https://www.kaggle.com/c/severstal-steel-defect-detection"
    LAYOUT = (
        "  train_images/<id>.jpg\n"
        "  train.csv   (ImageId,ClassId,EncodedPixels  or  ImageId_ClassId,EncodedPixels)"
    )

    def sample_loader(self) -> RLESampleLoader:
        return RLESampleLoader(MaskDecoder(), self.bit_depth)

    def scan(self) -> list[Sample]:
        root = self.check_root()
        image_dir = self.require(root / "train_images", "image folder")
        runs = read_severstal_csv(self.require(root / "train.csv", "label file", is_file=True))
        images = {p.name: p for p in list_image_files(image_dir, recursive=False)}
        self.report_unpaired(
            f"images in {root / 'train.csv'} missing from {image_dir}",
            [str(image_dir / name) for name in sorted(runs) if name not in images],
        )
        samples = [
            Sample(image=str(path), extra={"rle": runs.get(name, {})}) for name, path in sorted(images.items())
        ]
        return self.measure(samples)
