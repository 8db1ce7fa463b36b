"""Shared machinery of the datamodules that read image and mask files from disk.

:class:`FileDataModule` is the parent of every file-based format (Magnetic Tile, NEU-Seg,
KolektorSDD2, DAGM, Severstal, a user's folder). A format only lists its files as
:class:`~defectseg.data.base.Sample` records (image, mask, folder label, official split) and
says how mask values become classes (a :class:`MaskDecoder`); this module pairs images with
masks, reports unpaired files, measures every sample (image size from the file header, defect
pixel counts from the mask) in a thread pool, and loads samples in DataLoader workers with a
small picklable :class:`FileSampleLoader`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np

from defectseg.data.base import DatasetNotFoundError, DefectDataModule
from defectseg.data.contract import IGNORE_INDEX
from defectseg.data.io import (  # noqa: F401  (list_image_files and friends: re-exported for formats)
    IMAGE_EXTENSIONS,
    image_size,
    list_image_files,
    parallel_map,
    read_image,
    read_mask,
    scan_workers,
)
from defectseg.data.records import Sample, count_pixels


def binarize(mask: np.ndarray, threshold: int = 127) -> np.ndarray:
    """Boolean defect mask of a binary mask file.

    0/255 masks (anti-aliased edges included) are cut at ``> threshold``; masks whose values are
    all 0 or 1 count every 1 as defect.
    """
    if mask.size and int(mask.max()) <= 1:
        return mask > 0
    return mask > threshold


class MaskDecoder:
    """Turn the values of a mask file into class indices (``0`` background, ``1..K``, ``255``).

    Args:
        value_map: ``None`` for binary masks: defect pixels (see :func:`binarize`) take the
            sample's folder class (:attr:`Sample.label`, ``1`` when unset; a label of ``0``
            gives an all-background mask). Otherwise a mapping from stored value to class index
            (``255`` for pixels to ignore); ``0`` maps to background unless listed, and any
            other value raises an error naming the mask and the values found.
        threshold: binarisation threshold of binary masks.
        strict_binary: refuse binary masks whose largest value is between 2 and ``threshold``
            (they look like class-index masks, which binarising would empty).
    """

    def __init__(
        self,
        value_map: Mapping[int, int] | None = None,
        threshold: int = 127,
        strict_binary: bool = False,
    ) -> None:
        self.threshold = threshold
        self.strict_binary = strict_binary
        self.value_map = None if value_map is None else {0: 0, **{int(k): int(v) for k, v in value_map.items()}}
        self.lut: np.ndarray | None = None
        if self.value_map is not None:
            self.lut = np.full(256, -1, dtype=np.int16)
            for value, target in self.value_map.items():
                if not 0 <= value <= 255:
                    raise ValueError(f"value_map key {value} is not a mask value (0..255)")
                self.lut[value] = target

    def __call__(self, raw: np.ndarray, sample: Sample) -> np.ndarray:
        """Class-index mask (``uint8``) of ``raw``, the values stored in ``sample.mask``."""
        if self.lut is None:
            label = 1 if sample.label is None else int(sample.label)
            if self.strict_binary and raw.size and 1 < int(raw.max()) <= self.threshold:
                raise ValueError(
                    f"mask {sample.mask} holds values {np.unique(raw).tolist()}: not a binary 0/1 or "
                    f"0/255 mask. If the values are classes, set value_map (e.g. {{1: 1, 2: 2}}) "
                    "and class_names"
                )
            return binarize(raw, self.threshold).astype(np.uint8) * np.uint8(label)
        out = self.lut[raw]
        if (out < 0).any():
            found = np.unique(raw).tolist()
            bad = [v for v in found if self.lut[v] < 0]
            raise ValueError(
                f"mask {sample.mask} holds unexpected values {bad} (values found: {found}); "
                f"expected only {sorted(self.value_map)} (value_map {self.value_map})"
            )
        return out.astype(np.uint8)


class FileSampleLoader:
    """Picklable ``sample -> (image, mask)`` loader for DataLoader workers.

    It carries only the :class:`MaskDecoder` and the image bit depth, not the datamodule and its
    metadata.

    Args:
        decoder: how mask values become classes.
        bit_depth: bits of the image files (``"auto"``, 8, 10, 12 or 16; see
            :mod:`defectseg.data.bit_depth`); 8-bit files are read as they are.
    """

    def __init__(self, decoder: MaskDecoder, bit_depth: str | int = "auto") -> None:
        self.decoder = decoder
        self.bit_depth = bit_depth
        self.warned: set[int] = set()  # bit depths "auto" has warned about (once per worker)

    def mask(self, sample: Sample, size: tuple[int, int]) -> np.ndarray:
        """The class mask of ``sample`` whose image is ``size`` = ``(height, width)``.

        Raises:
            ValueError: when the mask's size differs from the image's (naming both files).
        """
        if sample.mask is None:
            return np.zeros(size, dtype=np.uint8)
        raw = read_mask(sample.mask)
        if raw.shape[:2] != tuple(size):
            raise ValueError(
                f"mask {sample.mask} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                f"{sample.image} is {size[1]}x{size[0]}; a mask must have its image's size"
            )
        return self.decoder(raw, sample)

    def __call__(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(sample.image, bit_depth=self.bit_depth, warned=self.warned)
        return image, self.mask(sample, image.shape[:2])


class FileDataModule(DefectDataModule):
    """Base of the datamodules that read image and mask files.

    Subclasses implement :meth:`~defectseg.data.base.DefectDataModule.scan` by listing
    :class:`Sample` records (without counts) and returning ``self.measure(samples)``, and
    override :meth:`mask_decoder` when mask values are classes (the default is binary masks
    whose class is the sample's folder label).
    """

    def mask_decoder(self) -> MaskDecoder:
        """How mask values become classes; binary masks by default."""
        return MaskDecoder()

    def sample_loader(self) -> FileSampleLoader:
        return FileSampleLoader(self.mask_decoder(), self.bit_depth)

    def load_sample(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        return self.sample_loader()(sample)

    def measure(self, samples: Sequence[Sample]) -> list[Sample]:
        """Fill ``num_pixels`` and ``pixel_counts`` of ``samples`` (in place) and return them.

        Images are measured from their headers; masks are decoded once, checked against their
        image's size and converted with :meth:`mask_decoder`.

        Raises:
            ValueError: for an unreadable file, a mask whose size differs from its image's, or
                unexpected mask values (each error names the file).
        """
        loader = self.sample_loader()
        num_classes = self.num_classes

        def one(sample: Sample) -> Sample:
            size = image_size(sample.image)
            sample.num_pixels = size[0] * size[1]
            mask = loader.mask(sample, size)
            sample.pixel_counts = count_pixels(mask, num_classes)
            labels = mask[mask != IGNORE_INDEX]
            if labels.size and int(labels.max()) >= num_classes:
                raise ValueError(
                    f"mask {sample.mask} gives class {int(labels.max())} but {type(self).__name__} "
                    f"has {num_classes} classes {self.class_names}"
                )
            return sample

        return parallel_map(one, list(samples))

    def layout_error(self, problem: str) -> DatasetNotFoundError:
        """A :class:`DatasetNotFoundError` stating ``problem``, the expected layout and source."""
        source = f"\nGet the dataset from: {self.SOURCE}" if self.SOURCE else ""
        return DatasetNotFoundError(
            f"{type(self).__name__}: {problem}.\nExpected layout under {self.root}:\n{self.LAYOUT}{source}"
        )

    def require(self, path: Path, what: str = "folder", is_file: bool = False) -> Path:
        """Return ``path``, raising :meth:`layout_error` when the folder (or file) is missing."""
        if not (path.is_file() if is_file else path.is_dir()):
            raise self.layout_error(f"expected {what} {path} is missing")
        return path

    def pair(
        self,
        images: Mapping[Hashable, Path],
        masks: Mapping[Hashable, Path],
        expected_mask: Callable[[Hashable, Path], str] | None = None,
        mask_optional: bool | Callable[[Hashable], bool] = False,
    ) -> list[tuple[Hashable, Path, Path | None]]:
        """Match images with masks by key; report the unpaired ones.

        Args:
            images: key -> image path.
            masks: key -> mask path.
            expected_mask: ``(key, image) -> text`` naming the mask that was looked for, shown
                with each image that has none.
            mask_optional: images without a mask are defect-free instead of an error (a
                function of the key to decide per image).

        Returns:
            ``(key, image, mask or None)`` sorted by image path. With ``on_missing: skip``
            unpaired files are left out (with a warning); otherwise they raise a
            ``FileNotFoundError`` listing the first offenders.
        """
        lonely_masks = [str(masks[k]) for k in masks if k not in images]
        self.report_unpaired("masks without an image", sorted(lonely_masks))
        optional = mask_optional if callable(mask_optional) else lambda key: mask_optional
        pairs, lonely_images = [], []
        for key, image in images.items():
            mask = masks.get(key)
            if mask is None and not optional(key):
                hint = f" (looked for {expected_mask(key, image)})" if expected_mask else ""
                lonely_images.append(f"{image}{hint}")
                continue
            pairs.append((key, image, mask))
        self.report_unpaired("images without a mask", sorted(lonely_images))
        return sorted(pairs, key=lambda item: str(item[1]))

