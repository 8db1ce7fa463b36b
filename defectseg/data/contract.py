"""The batch contract shared by every datamodule, and the collate function that builds it.

Every training, validation, test and predict batch is a ``dict`` with:

* ``image``: ``float32`` tensor ``(B, C, H, W)``, normalised with the datamodule's mean/std.
* ``mask``: ``int64`` tensor ``(B, H, W)``; ``0`` is background, ``1..K`` are the defect
  classes and :data:`IGNORE_INDEX` (255) marks pixels that carry no label (padding, ignored
  regions).
* ``defect_free``: ``bool`` tensor ``(B,)``, true for images with no defect pixel.
* ``path``: ``list[str]`` with the source of each image (a file path, or an identifier such
  as ``synthetic://17`` for generated images).
* ``orig_size``: ``int64`` tensor ``(B, 2)``: ``(height, width)`` of the image as stored.
* ``valid_size``: ``int64`` tensor ``(B, 2)``: the top-left region of ``image`` that holds the
  (possibly resized) picture; the rest is padding added at the bottom and on the right.

Images in one batch may come in different sizes (real datasets such as Magnetic Tile do);
:func:`collate_batch` pads them at the bottom/right to the largest size in the batch, with
``0`` in ``image`` (the normalised mean) and :data:`IGNORE_INDEX` in ``mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
"""Mask value for pixels that carry no label. Losses and metrics skip them."""

BATCH_KEYS = ("image", "mask", "defect_free", "path", "orig_size", "valid_size")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the default ``(mean, std)`` for ``channels`` (1 or 3), on the 0..1 scale."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        return GRAY_MEAN, GRAY_STD
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return ((value + multiple - 1) // multiple) * multiple


def collate_batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch that follows the contract, padding to a common size.

    Args:
        items: samples as returned by :class:`defectseg.data.base.DefectDataset`.

    Returns:
        The batch dictionary described in the module docstring. Keys other than the contract's
        are collected into lists.
    """
    if not items:
        raise ValueError("collate_batch got an empty list of samples")
    height = max(int(item["image"].shape[-2]) for item in items)
    width = max(int(item["image"].shape[-1]) for item in items)
    images, masks = [], []
    for item in items:
        image, mask = item["image"], item["mask"]
        pad_h, pad_w = height - image.shape[-2], width - image.shape[-1]
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        images.append(image)
        masks.append(mask)
    batch: dict[str, Any] = {
        "image": torch.stack(images),
        "mask": torch.stack(masks).long(),
        "defect_free": torch.tensor([bool(item["defect_free"]) for item in items]),
        "path": [str(item["path"]) for item in items],
        "orig_size": torch.tensor([list(item["orig_size"]) for item in items], dtype=torch.long),
        "valid_size": torch.tensor([list(item["valid_size"]) for item in items], dtype=torch.long),
    }
    for key in items[0]:
        if key not in batch:
            batch[key] = [item.get(key) for item in items]
    return batch


def check_batch(batch: dict[str, Any], num_classes: int | None = None) -> None:
    """Raise a ``ValueError`` naming the offending key and shape if ``batch`` breaks the contract."""
    missing = [key for key in ("image", "mask") if key not in batch]
    if missing:
        raise ValueError(f"batch is missing keys {missing}; it has {sorted(batch)}")
    image, mask = batch["image"], batch["mask"]
    if image.ndim != 4 or not torch.is_floating_point(image):
        raise ValueError(
            f"batch['image'] must be a float tensor (B, C, H, W); got {tuple(image.shape)} {image.dtype}"
        )
    if mask.ndim != 3 or mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"batch['mask'] must be (B, H, W) matching image {tuple(image.shape)}; got {tuple(mask.shape)}"
        )
    if num_classes is not None:
        valid = mask[mask != IGNORE_INDEX]
        if valid.numel() and int(valid.max()) >= num_classes:
            raise ValueError(
                f"mask holds class {int(valid.max())} but the model has num_classes={num_classes} "
                "(background included); set model.num_classes to match the data"
            )
