"""The training/evaluation dataset: a sample list, a loader and explicit settings.

:class:`DefectDataset` turns :class:`~defectseg.data.records.Sample` records into batch-contract
items (:mod:`defectseg.data.contract`). It is built from a :class:`DatasetSettings` (classes,
channels, size policy, scale, crops, normalisation), a picklable ``sample -> (image, mask)``
loader and, optionally, a :class:`~defectseg.data.cache.DecodeCache`; it knows nothing of the
datamodule that made it. An item's route:

1. :meth:`DefectDataset.read`: decode (or take from the decode cache), check the mask, convert
   channels, apply ``scale`` or the ``resize`` policy;
2. :meth:`DefectDataset.load`: cut the training crop (``crop_size``), centred on a defect pixel
   for a ``defect_crop_fraction`` share of the crops;
3. :meth:`DefectDataset.finish`: augment, normalise, pad to ``pad_multiple``.

Dynamic Label Injection (:class:`defectseg.data.dli.DLIDataset`) wraps a dataset and injects
between steps 2 and 3; the semi-supervised pool (:class:`UnlabeledDataset`) wraps one and hides
the labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from defectseg.data.contract import IGNORE_INDEX, round_up
from defectseg.data.io import read_image, to_channels
from defectseg.data.records import Sample

if TYPE_CHECKING:  # pragma: no cover
    from defectseg.data.cache import DecodeCache

#: ``sample -> (image uint8 (H, W[, C]), mask (H, W))``, picklable (it runs in DataLoader workers)
SampleLoader = Callable[[Sample], tuple[np.ndarray, np.ndarray]]


def as_size(value: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    """``None``, or ``(height, width)`` from one int (a square) or a pair, each >= 1."""
    if value is None:
        return None
    pair = (int(value), int(value)) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class DatasetSettings:
    """Everything a :class:`DefectDataset` needs to turn a sample into an item.

    Attributes:
        num_classes: classes, background included (masks are checked against it).
        channels: channels served (1 or 3; gray is repeated, colour converted).
        mean: per-channel normalisation mean on the 0..1 scale.
        std: per-channel normalisation std on the 0..1 scale.
        size_policy: ``pad`` (keep the size, pad to ``pad_multiple``) or ``resize`` (to
            ``image_size``).
        image_size: ``(height, width)`` of the ``resize`` policy.
        pad_multiple: padding multiple of the served tensors (1 = none).
        scale: fixed down-scale factor applied after decoding (``None`` or 1 = native size).
        crop_size: ``(height, width)`` of random crops, or ``None`` for whole images.
        defect_crop_fraction: share of the crops centred on a defect pixel (of a randomly chosen
            class present in the image); the rest are uniform over the image.
    """

    num_classes: int
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    size_policy: str = "pad"
    image_size: tuple[int, int] | None = None
    pad_multiple: int = 32
    scale: float | None = None
    crop_size: tuple[int, int] | None = None
    defect_crop_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.scale is not None and not 0.0 < float(self.scale) <= 1.0:
            raise ValueError(f"scale must be in (0, 1] (a down-scale factor such as 0.5), got {self.scale}")
        if not 0.0 <= float(self.defect_crop_fraction) <= 1.0:
            raise ValueError(f"defect_crop_fraction must be in [0, 1], got {self.defect_crop_fraction}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean {self.mean} and std {self.std} need one value per channel (channels={self.channels})"
            )

    def without_crop(self) -> DatasetSettings:
        """The same settings serving whole images (validation, test, DLI donors)."""
        return DatasetSettings(**{**self.__dict__, "crop_size": None, "defect_crop_fraction": 0.0})


def rescale(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (area interpolation) and ``mask`` (nearest) resized to ``size`` = ``(h, w)``."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image, mask
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    if out.ndim == 2:
        out = out[..., None]
    labels = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return out, labels.astype(mask.dtype)


def scaled_size(shape: tuple[int, int], scale: float | None) -> tuple[int, int]:
    """``(h, w)`` of an image of ``shape`` down-scaled by ``scale`` (at least 1 pixel)."""
    if not scale or scale == 1.0:
        return int(shape[0]), int(shape[1])
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def crop_window(
    mask: np.ndarray,
    crop_size: tuple[int, int],
    defect_centred: bool,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Top-left corner of a crop of ``crop_size`` in an image of ``mask.shape`` (at least the crop).

    With ``defect_centred`` and a defect in ``mask`` the window is centred on a random pixel of a
    random class present (shifted inside the image at its borders, so the pixel stays inside);
    otherwise the corner is uniform.
    """
    height, width = mask.shape
    crop_h, crop_w = crop_size
    if defect_centred:
        classes = np.unique(mask)
        classes = classes[(classes > 0) & (classes != IGNORE_INDEX)]
        if classes.size:
            ys, xs = np.nonzero(mask == rng.choice(classes))
            pick = int(rng.integers(len(ys)))
            top = min(max(int(ys[pick]) - crop_h // 2, 0), height - crop_h)
            left = min(max(int(xs[pick]) - crop_w // 2, 0), width - crop_w)
            return top, left
    return int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))


def random_crop(
    image: np.ndarray,
    mask: np.ndarray,
    crop_size: tuple[int, int],
    defect_fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``crop_size`` crop of ``image`` (H, W, C) and ``mask`` (H, W).

    An image smaller than the crop is first padded (bottom/right) with 0 and, in the mask, with
    :data:`~defectseg.data.contract.IGNORE_INDEX`, so the padding is never learnt.
    """
    crop_h, crop_w = crop_size
    pad_h, pad_w = max(0, crop_h - image.shape[0]), max(0, crop_w - image.shape[1])
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    centred = defect_fraction > 0 and rng.random() < defect_fraction
    top, left = crop_window(mask, crop_size, centred, rng)
    return (
        np.ascontiguousarray(image[top : top + crop_h, left : left + crop_w]),
        np.ascontiguousarray(mask[top : top + crop_h, left : left + crop_w]),
    )


def torch_seeded_rng() -> np.random.Generator:
    """A numpy generator seeded from torch's, which Lightning and each DataLoader worker seed."""
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


def build_augmentation(spec: bool | Sequence[dict[str, Any]] | None):
    """Build an albumentations pipeline.

    Args:
        spec: ``True`` for the defaults (flips, rotation within 10 degrees, brightness and
            contrast; no blur, defects are tiny), ``False``/``None`` for none, or a list of
            ``{"name": <albumentations transform>, **kwargs}`` dictionaries (from YAML).
    """
    import albumentations as A

    if spec is None or spec is False:
        return None
    if spec is True:
        transforms = [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Rotate(
                limit=10,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
                p=0.3,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
        return A.Compose(transforms)
    transforms = []
    for item in spec:
        item = dict(item)
        name = item.pop("name", None)
        if not name or not hasattr(A, name):
            raise ValueError(
                f"augmentation entry {item!r} needs 'name' set to an albumentations transform "
                f"(for example HorizontalFlip); got name={name!r}"
            )
        transforms.append(getattr(A, name)(**item))
    return A.Compose(transforms)



class CallableLoader:
    """Picklable wrapper handed to DataLoader workers: ``sample -> (image, mask)``."""

    def __init__(self, load: SampleLoader) -> None:
        self.load = load

    def __call__(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        return self.load(sample)


class DefectDataset(Dataset):
    """Map-style dataset over :class:`~defectseg.data.records.Sample` records.

    Each item follows the batch contract (:mod:`defectseg.data.contract`) before collation.

    Args:
        samples: the records served.
        loader: picklable ``sample -> (image uint8, mask)`` (a datamodule's ``sample_loader()``).
        settings: how to turn a decoded sample into an item (:class:`DatasetSettings`).
        augment: albumentations pipeline (training), or ``None``.
        cache: decoded arrays shared by every worker (:class:`~defectseg.data.cache.DecodeCache`),
            or ``None`` to decode each time.
        split: the split's name, for messages.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        loader: SampleLoader,
        settings: DatasetSettings,
        augment: Callable | None = None,
        cache: DecodeCache | None = None,
        split: str | None = None,
    ) -> None:
        self.samples = list(samples)
        self.loader = loader
        self.settings = settings
        self.augment = augment
        self.cache = cache
        self.split = split
        self.num_classes = settings.num_classes
        self.mean = np.asarray(settings.mean, dtype=np.float32) * 255.0
        self.std = np.asarray(settings.std, dtype=np.float32) * 255.0

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Decode ``sample`` and apply the size policy (``scale`` or ``resize``); no channel
        conversion yet (a grayscale image stays one channel: what the decode cache stores).

        Returns ``(image uint8 (H, W, C), mask uint8 (H, W), original (H, W))``; the mask is
        checked against the image's size and the classes.
        """
        image, mask = self.loader(sample)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"mask {sample.mask} has size {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"{sample.image} is {image.shape[1]}x{image.shape[0]}; masks must match their image"
            )
        bad = np.setdiff1d(np.unique(mask), [*range(self.num_classes), IGNORE_INDEX])
        if bad.size:
            raise ValueError(
                f"mask of {sample.image} holds values {bad.tolist()} outside 0..{self.num_classes - 1} "
                f"and {IGNORE_INDEX}; check the dataset's class mapping"
            )
        mask = mask.astype(np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        original = (int(image.shape[0]), int(image.shape[1]))
        settings = self.settings
        if settings.size_policy == "resize" and settings.image_size is not None:
            image, mask = rescale(image, mask, settings.image_size)
        elif settings.scale:
            image, mask = rescale(image, mask, scaled_size(original, settings.scale))
        return image, mask, original

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, Sample, tuple[int, int]]:
        """:meth:`decode` sample ``index`` (or take it from the decode cache), then convert its
        channels.

        Returns ``(image uint8 (H, W, channels), mask int64 (H, W), sample, original (H, W))``.
        """
        sample = self.samples[index]
        hit = self.cache.get(sample) if self.cache is not None else None
        image, mask, original = hit if hit is not None else self.decode(sample)
        return to_channels(image, self.settings.channels), mask.astype(np.int64), sample, original

    def load(self, index: int, crop: bool = True) -> tuple[np.ndarray, np.ndarray, Sample, tuple[int, int]]:
        """:meth:`read` sample ``index``, then cut the training crop (when ``crop_size`` is set
        and ``crop``; DLI reads its donors whole with ``crop=False``).

        Returns ``(image uint8 (H, W, C), mask int64 (H, W), sample, original (H, W))``.
        """
        image, mask, sample, original = self.read(index)
        if crop and self.settings.crop_size is not None:
            image, mask = random_crop(
                image, mask, self.settings.crop_size, self.settings.defect_crop_fraction, torch_seeded_rng()
            )
        return image, mask, sample, original

    def finish(
        self, image: np.ndarray, mask: np.ndarray, sample: Sample, original: tuple[int, int]
    ) -> dict[str, Any]:
        """Augment, normalise and pad a loaded sample into a contract item."""
        if self.augment is not None:
            if hasattr(self.augment, "set_random_seed"):
                # albumentations 2 pipelines draw from their own generator, which seed_everything
                # does not reach: seed it from torch's, which Lightning and the DataLoader seed
                self.augment.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
            out = self.augment(image=image, mask=mask.astype(np.uint8))
            image, mask = out["image"], out["mask"].astype(np.int64)
            if image.ndim == 2:
                image = image[..., None]
        valid = (int(image.shape[0]), int(image.shape[1]))
        tensor = (image.astype(np.float32) - self.mean) / self.std
        image_t = torch.from_numpy(np.ascontiguousarray(tensor.transpose(2, 0, 1)))
        mask_t = torch.from_numpy(np.ascontiguousarray(mask)).long()
        multiple = self.settings.pad_multiple
        if multiple > 1:
            pad_h = round_up(valid[0], multiple) - valid[0]
            pad_w = round_up(valid[1], multiple) - valid[1]
            if pad_h or pad_w:
                image_t = torch.nn.functional.pad(image_t, (0, pad_w, 0, pad_h), value=0.0)
                mask_t = torch.nn.functional.pad(mask_t, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        labelled = mask_t[mask_t != IGNORE_INDEX]
        return {
            "image": image_t,
            "mask": mask_t,
            "defect_free": bool((labelled == 0).all()),
            "path": sample.image,
            "orig_size": original,
            "valid_size": valid,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(
                f"{type(self).__name__} takes integer indices, got {index!r}; DLI plan items go to "
                "defectseg.data.dli.DLIDataset, which wraps this dataset"
            )
        return self.finish(*self.load(int(index)))


#: Key of :attr:`Sample.extra` marking an image that came from ``unlabeled_dirs``.
UNLABELED_FILE = "unlabeled_file"


class UnlabeledLoader:
    """Picklable ``sample -> (image, mask)`` that hides every label: the mask is all 255.

    Images of the training split are decoded by the format's own loader (whose mask is thrown
    away); images from ``unlabeled_dirs`` are read from their file.
    """

    def __init__(self, format_loader: SampleLoader) -> None:
        self.format_loader = format_loader
        self.bit_depth = getattr(format_loader, "bit_depth", "auto")
        self.warned: set[int] = set()

    def __call__(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        if sample.extra.get(UNLABELED_FILE):
            image = read_image(sample.image, bit_depth=self.bit_depth, warned=self.warned)
        else:
            image, _ = self.format_loader(sample)
        return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)


class UnlabeledDataset(Dataset):
    """Unlabelled images as contract items: ``mask`` all 255, ``defect_free`` ``False``.

    Args:
        samples: the unlabelled samples.
        loader: the format's ``sample -> (image, mask)`` loader (its masks are thrown away).
        settings: as for :class:`DefectDataset` (crops apply too; a crop of an unlabelled image
            is uniform, there is no defect to centre on).
        augment: augmentation pipeline (the training one), or ``None``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        loader: SampleLoader,
        settings: DatasetSettings,
        augment: Callable | None = None,
    ) -> None:
        self.dataset = DefectDataset(samples, UnlabeledLoader(loader), settings, augment=augment, split="unlabeled")
        self.samples = self.dataset.samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        item["defect_free"] = False
        return item
