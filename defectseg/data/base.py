"""The common base of every defectseg datamodule.

A format (Magnetic Tile, NEU-Seg, a user's folder, the synthetic generator...) subclasses
:class:`DefectDataModule` and implements two things:

* :meth:`DefectDataModule.scan`: list the dataset as :class:`Sample` records, including the
  per-image metadata (classes present, defect pixel counts). It is run once; the result is
  cached on disk so that later runs, and the class-balancing sampler, never decode an image.
* :meth:`DefectDataModule.load_sample`: decode one sample into a ``uint8`` image and an
  integer mask (``0`` background, ``1..K`` classes, ``255`` ignore).

Everything else -- splits, the size policy, channels, augmentation, normalisation, statistics,
loaders -- lives here, so every format behaves the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from defectseg.data.contract import IGNORE_INDEX, collate_batch, default_normalization, round_up
from defectseg.data.semi import SemiSupervisedMixin

SPLITS = ("train", "val", "test")


def default_data_root() -> str:
    """``$DEFECTSEG_DATA_ROOT``, or ``../shared/datasets`` (relative to the working directory)."""
    return os.environ.get("DEFECTSEG_DATA_ROOT", os.path.join("..", "shared", "datasets"))


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's root folder, or the layout expected inside it, is missing."""


@dataclass
class Sample:
    """Metadata of one image, known without decoding it (after the first scan).

    Attributes:
        image: path of the image file (or an identifier for generated images).
        mask: path of the mask file, ``None`` when the format has no mask file for this image
            (a defect-free image, or masks stored elsewhere, e.g. run-length encoded).
        label: class index given by the folder the image sits in, for formats whose masks are
            binary (Magnetic Tile, DAGM); ``None`` when mask values are the classes.
        pixel_counts: number of pixels of each defect class ``1..K`` (absent = 0).
        num_pixels: pixels in the image (height x width as stored).
        split: the official split (``train``, ``val`` or ``test``), if the dataset has one.
        group: samples sharing a group are kept on the same side of every split (duplicates,
            rotations of one scene).
        extra: format-specific data needed to load the sample.
    """

    image: str
    mask: str | None = None
    label: int | None = None
    pixel_counts: dict[int, int] = field(default_factory=dict)
    num_pixels: int = 0
    split: str | None = None
    group: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> tuple[int, ...]:
        """Defect classes present in the image, sorted."""
        return tuple(sorted(k for k, v in self.pixel_counts.items() if v > 0))

    @property
    def defect_free(self) -> bool:
        """True when the image holds no defect pixel."""
        return not self.classes

    @property
    def primary_class(self) -> int:
        """The defect class covering most pixels, or 0 for a defect-free image."""
        present = {k: v for k, v in self.pixel_counts.items() if v > 0}
        return max(present, key=lambda k: (present[k], -k)) if present else 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["pixel_counts"] = {str(k): int(v) for k, v in self.pixel_counts.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        data = dict(data)
        data["pixel_counts"] = {int(k): int(v) for k, v in data.get("pixel_counts", {}).items()}
        return cls(**data)


def count_pixels(mask: np.ndarray, num_classes: int) -> dict[int, int]:
    """Pixels of each defect class ``1..num_classes-1`` in ``mask`` (classes with 0 omitted)."""
    counts = np.bincount(mask[mask != IGNORE_INDEX].ravel().astype(np.int64), minlength=num_classes)
    return {k: int(counts[k]) for k in range(1, min(len(counts), num_classes)) if counts[k] > 0}


def _decode_file(path: str, flags: int) -> np.ndarray:
    """Decode ``path`` with OpenCV as stored, raising errors that name the file."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise FileNotFoundError(f"cannot open {path}: {err}") from err
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode {path}: the file is empty, corrupt or not an image")
    return image


def read_image(path: str | os.PathLike, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode an image file with OpenCV, raising a clear error for unreadable files.

    Returns ``uint8`` arrays: ``(H, W)`` for grayscale, ``(H, W, 3)`` RGB for colour.
    """
    path = str(path)
    image = _decode_file(path, flags)
    if image.dtype == np.uint16:
        image = (image / 257.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"{path}: unsupported pixel type {image.dtype}; expected 8 or 16 bit")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    elif image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a mask file into a 2-D ``uint8`` array (a colour mask is read as grayscale).

    Values are kept as stored (no rescaling): 16-bit masks keep their values when they fit in
    0..255 (label images saved as 16 bit), 0/65535 masks become 0/255, other 16-bit masks raise
    a ``ValueError``. A colour mask must have equal channels (the alpha channel is dropped).
    """
    path = str(path)
    mask = _decode_file(path, cv2.IMREAD_UNCHANGED)
    if mask.dtype == np.uint16:
        high = int(mask.max())
        if high > 255 and not np.isin(mask, (0, 65535)).all():
            raise ValueError(
                f"mask {path} is 16 bit with values up to {high}; masks must hold values 0..255 "
                "(class indices, or 0/255)"
            )
        mask = (mask // 257 if high > 255 else mask).astype(np.uint8)
    elif mask.dtype != np.uint8:
        raise ValueError(f"mask {path}: unsupported pixel type {mask.dtype}; expected 8 or 16 bit")
    if mask.ndim == 3:
        mask = mask[..., :3]
        if np.all(mask == mask[..., :1]):
            mask = mask[..., 0]
        else:
            raise ValueError(
                f"mask {path} is a colour image with differing channels; masks must hold class "
                "indices (or 0/255) in a single channel"
            )
    return mask


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


class DefectDataset(Dataset):
    """Map-style dataset over :class:`Sample` records of a :class:`DefectDataModule`.

    Each item follows the batch contract (:mod:`defectseg.data.contract`) before collation.

    Besides integer indices, ``__getitem__`` accepts plan items (anything with an ``index``
    attribute, such as :class:`defectseg.data.dli.InjectionPlan` from a class-balancing batch
    sampler); they are handed to :attr:`injector`, which loads, injects and finishes the item.
    """

    #: ``(dataset, plan_item) -> item`` hook for plan items (set by the DLI training loader).
    injector: Callable[[DefectDataset, Any], dict[str, Any]] | None = None

    def __init__(
        self,
        datamodule: DefectDataModule,
        samples: Sequence[Sample],
        augment: Callable | None = None,
    ) -> None:
        self.loader = datamodule.sample_loader()
        self.samples = list(samples)
        self.augment = augment
        self.num_classes = datamodule.num_classes
        self.channels = datamodule.channels
        self.size_policy = datamodule.size_policy
        self.image_size = datamodule.image_size
        self.pad_multiple = datamodule.pad_multiple
        self.mean = np.asarray(datamodule.mean, dtype=np.float32) * 255.0
        self.std = np.asarray(datamodule.std, dtype=np.float32) * 255.0

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, Sample, tuple[int, int]]:
        """Decode sample ``index`` and apply the channel and size policy.

        Returns ``(image uint8 (H, W, C), mask int64 (H, W), sample, original (H, W))``.
        """
        sample = self.samples[index]
        image, mask = self.loader(sample)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"mask {sample.mask} has size {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"{sample.image} is {image.shape[1]}x{image.shape[0]}; masks must match their image"
            )
        mask = mask.astype(np.int64)
        bad = np.setdiff1d(np.unique(mask), [*range(self.num_classes), IGNORE_INDEX])
        if bad.size:
            raise ValueError(
                f"mask of {sample.image} holds values {bad.tolist()} outside 0..{self.num_classes - 1} "
                f"and {IGNORE_INDEX}; check the dataset's class mapping"
            )
        original = (int(image.shape[0]), int(image.shape[1]))
        image = to_channels(image, self.channels)
        if self.size_policy == "resize" and self.image_size is not None:
            height, width = self.image_size
            if (image.shape[0], image.shape[1]) != (height, width):
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
                if image.ndim == 2:
                    image = image[..., None]
                mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
                mask = mask.astype(np.int64)
        return image, mask, sample, original

    def finish(
        self, image: np.ndarray, mask: np.ndarray, sample: Sample, original: tuple[int, int]
    ) -> dict[str, Any]:
        """Augment, normalise and pad a decoded sample into a contract item."""
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
        if self.pad_multiple > 1:
            pad_h = round_up(valid[0], self.pad_multiple) - valid[0]
            pad_w = round_up(valid[1], self.pad_multiple) - valid[1]
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

    def __getitem__(self, index: int | Any) -> dict[str, Any]:
        if not isinstance(index, (int, np.integer)):
            if self.injector is None:
                raise TypeError(
                    f"{type(self).__name__} got the plan item {index!r} but has no injector; plan "
                    "items come from a DLI batch sampler, whose loader sets dataset.injector"
                )
            return self.injector(self, index)
        return self.finish(*self.load(index))


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Return ``image`` as ``(H, W, channels)`` ``uint8``: gray repeated to 3, or RGB to gray."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == channels:
        return image
    if channels == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 1 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    raise ValueError(f"cannot convert an image with {image.shape[2]} channels to {channels}")


class _SampleLoader:
    """Picklable callable handed to DataLoader workers: ``sample -> (image, mask)``."""

    def __init__(self, load: Callable[[Sample], tuple[np.ndarray, np.ndarray]]) -> None:
        self.load = load

    def __call__(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        return self.load(sample)


def stratified_split(
    samples: Sequence[Sample],
    fractions: dict[str, float],
    seed: int,
) -> dict[str, list[int]]:
    """Split sample indices into named parts, stratified by primary defect class.

    Samples that share a :attr:`Sample.group` always land in the same part. The remainder
    after the given fractions goes to ``train``.

    Args:
        samples: the records to split.
        fractions: share of each part other than ``train`` (e.g. ``{"val": .15, "test": .15}``).
        seed: seed of the shuffle, so the split is reproducible.

    Returns:
        A dict from part name (``train`` and the keys of ``fractions``) to sorted indices.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        groups[sample.group if sample.group is not None else f"#{index}"].append(index)
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, members in groups.items():
        labels = Counter(samples[i].primary_class for i in members)
        by_class[max(labels, key=lambda c: (labels[c], c))].append(key)
    rng = np.random.default_rng(seed)
    labels = sorted(by_class)
    keys_of = {}
    for label in labels:
        keys = sorted(by_class[label])
        rng.shuffle(keys)
        keys_of[label] = keys
    sizes = {label: len(keys_of[label]) for label in labels}
    total = sum(sizes.values())
    # largest-remainder allocation: each part gets round(total * fraction) groups overall,
    # shared among classes in proportion to their size; every class keeps one group for training
    quota: dict[str, dict[int, int]] = {}
    left = {label: max(0, sizes[label] - 1) for label in labels}
    for name, fraction in fractions.items():
        exact = {label: sizes[label] * fraction for label in labels}
        counts = {label: min(int(np.floor(exact[label])), left[label]) for label in labels}
        remainder = int(round(total * fraction)) - sum(counts.values())
        order = sorted(labels, key=lambda c: (-(exact[c] - np.floor(exact[c])), -sizes[c], c))
        for label in order:
            if remainder <= 0:
                break
            if counts[label] < left[label]:
                counts[label] += 1
                remainder -= 1
        for label in labels:
            left[label] -= counts[label]
        quota[name] = counts
    parts: dict[str, list[int]] = {"train": [], **{name: [] for name in fractions}}
    for label in labels:
        start = 0
        for name in fractions:
            for key in keys_of[label][start : start + quota[name][label]]:
                parts[name].extend(groups[key])
            start += quota[name][label]
        for key in keys_of[label][start:]:
            parts["train"].extend(groups[key])
    return {name: sorted(indices) for name, indices in parts.items()}


class DefectDataModule(SemiSupervisedMixin, L.LightningDataModule):
    """Base class of every defectseg datamodule.

    Args:
        root: folder that holds the dataset (formats that read files). When omitted, formats
            with a ``DEFAULT_SUBDIR`` look in ``$DEFECTSEG_DATA_ROOT/<DEFAULT_SUBDIR>``.
        batch_size: images per training batch (validation and test use the same).
        num_workers: DataLoader worker processes.
        split: ``official`` to use the dataset's own split (val carved from train when the
            dataset has none), ``stratified`` for a seeded split stratified by defect class.
            ``None`` picks ``official`` when the dataset has one.
        val_fraction: share of the images (of the training split, with an official split)
            used for validation.
        test_fraction: share of the images used for testing when there is no official split.
        seed: seed of the split.
        size_policy: ``pad`` keeps each image's size and pads it (bottom/right) to a multiple
            of ``pad_multiple``; ``resize`` resizes to ``image_size`` (masks nearest-neighbour).
        image_size: ``(height, width)`` or one int for a square, used by ``resize``.
        pad_multiple: padding multiple of the ``pad`` policy (32 suits every smp network).
        channels: 3 repeats grayscale images to three channels (for 3-channel encoders); 1
            serves single-channel images (set the model's ``in_channels`` to 1; the CLI links it).
        mean: per-channel normalisation mean on the 0..1 scale; ``None`` for the default.
        std: per-channel normalisation std on the 0..1 scale; ``None`` for the default.
        augment: ``True`` for the default augmentation, ``False`` for none, or a list of
            albumentations transforms as ``{"name": ..., **kwargs}``.
        train_defect_free: keep defect-free images in the training split (validation and test
            always keep them).
        on_missing: ``error`` (default) stops on an image without its mask or a mask without
            its image; ``skip`` leaves such files out with a warning.
        cache_dir: where the scan's metadata is cached; defaults to ``$DEFECTSEG_CACHE_DIR``
            or ``~/.cache/defectseg``.
        pin_memory: pin batches in memory (for GPU training).
        labeled_fraction: semi-supervised mode: share of the training split that keeps its masks
            (a seeded subset stratified by defect class); the rest is served unlabelled. The
            training loader then yields ``{"labeled": batch, "unlabeled": batch}``
            (:mod:`defectseg.data.semi`).
        num_labeled: the same as a count of images (instead of ``labeled_fraction``).
        labeled_seed: seed of the labelled subset (default ``seed``).
        unlabeled_dirs: folders of extra images without masks, added to the unlabelled pool.
        unlabeled_batch_size: images per unlabelled batch (default ``batch_size``).
        dli: Dynamic Label Injection on the training batches (:mod:`defectseg.data.dli`):
            ``None``/``false`` off, ``true`` for the defaults, or a mapping of
            :class:`~defectseg.data.dli.DLIConfig` settings (``p_poisson``, ``placement``,
            ``transform``, ...). Under DDP it needs ``trainer.use_distributed_sampler: false``.
    """

    #: Class names, background first. Formats with fixed classes set this.
    CLASS_NAMES: tuple[str, ...] = ()
    #: Where to get the dataset, printed when the root is missing.
    SOURCE: str = ""
    #: The layout expected under ``root``, printed when the root is missing.
    LAYOUT: str = ""
    #: Folder of this dataset under ``$DEFECTSEG_DATA_ROOT`` (default ``../shared/datasets``),
    #: used when ``root`` is not given.
    DEFAULT_SUBDIR: str = ""
    #: Whether the scan result is cached on disk.
    CACHE_METADATA: bool = True

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        split: Literal["official", "stratified"] | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        size_policy: Literal["pad", "resize"] = "pad",
        image_size: int | tuple[int, int] | None = None,
        pad_multiple: int = 32,
        channels: Literal[1, 3] = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool | list[dict[str, Any]] = True,
        train_defect_free: bool = True,
        on_missing: Literal["error", "skip"] = "error",
        cache_dir: str | None = None,
        pin_memory: bool = False,
        labeled_fraction: float | None = None,
        num_labeled: int | None = None,
        labeled_seed: int | None = None,
        unlabeled_dirs: list[str] | None = None,
        unlabeled_batch_size: int | None = None,
        dli: bool | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must leave images for training; got "
                f"{val_fraction} + {test_fraction}"
            )
        if size_policy not in ("pad", "resize"):
            raise ValueError(f"size_policy must be 'pad' or 'resize', got {size_policy!r}")
        if size_policy == "resize" and image_size is None:
            raise ValueError("size_policy='resize' needs image_size, e.g. image_size: 256")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if split not in (None, "official", "stratified") and not self._accepts_split(split):
            raise ValueError(f"split must be 'official' or 'stratified', got {split!r}")
        if root is None and self.DEFAULT_SUBDIR:
            root = os.path.join(default_data_root(), self.DEFAULT_SUBDIR)
        self.root = os.path.expanduser(os.path.expandvars(str(root))) if root is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.split = split
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.size_policy = size_policy
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = tuple(image_size) if image_size is not None else None
        self.pad_multiple = pad_multiple if size_policy == "pad" else 1
        self.channels = channels
        default_mean, default_std = default_normalization(channels)
        self.mean = tuple(float(v) for v in (mean if mean is not None else default_mean))
        self.std = tuple(float(v) for v in (std if std is not None else default_std))
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean {self.mean} and std {self.std} need one value per channel (channels={channels})"
            )
        self.augment = augment
        self.train_defect_free = train_defect_free
        self.on_missing = on_missing
        self.cache_dir = cache_dir
        self.pin_memory = pin_memory
        self._metadata: list[Sample] | None = None
        self._splits: dict[str, list[int]] | None = None
        from defectseg.data.dli import DLIConfig

        self.dli = dli
        self.dli_config = DLIConfig.from_spec(dli)
        self.configure_semi_supervised(
            labeled_fraction, num_labeled, labeled_seed, unlabeled_dirs, unlabeled_batch_size
        )

    # ------------------------------------------------------------------ format hooks
    def _accepts_split(self, split: str) -> bool:
        """Formats with extra split modes (e.g. NEU-Seg's ``grouped``) override this."""
        return False

    @property
    def class_names(self) -> list[str]:
        """Class names, background first."""
        if not self.CLASS_NAMES:
            raise NotImplementedError(f"{type(self).__name__} must define CLASS_NAMES or class_names")
        return list(self.CLASS_NAMES)

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Channels of the images served (what the model's ``in_channels`` must be)."""
        return self.channels

    def scan(self) -> list[Sample]:
        """List the dataset as :class:`Sample` records (decoding masks once for the counts)."""
        raise NotImplementedError

    def load_sample(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Decode ``sample`` into ``(image uint8 (H, W[, 3]), mask int (H, W))``."""
        raise NotImplementedError

    def sample_loader(self) -> Callable[[Sample], tuple[np.ndarray, np.ndarray]]:
        """The picklable ``sample -> (image, mask)`` function used in DataLoader workers."""
        return _SampleLoader(self.load_sample)

    def scan_params(self) -> dict[str, Any]:
        """Parameters that change the scan's result; part of the metadata cache key."""
        return {}

    # ------------------------------------------------------------------ metadata
    def check_root(self) -> Path:
        """Return ``root`` as a path, raising :class:`DatasetNotFoundError` if it is missing."""
        if self.root is None or not os.path.isdir(self.root):
            hint = f"\nExpected layout:\n{self.LAYOUT}" if self.LAYOUT else ""
            source = f"\nGet the dataset from: {self.SOURCE}" if self.SOURCE else ""
            raise DatasetNotFoundError(
                f"{type(self).__name__}: dataset root {self.root!r} does not exist or is not a "
                f"folder. Set data.init_args.root (or DEFECTSEG_DATA_ROOT for the configs)."
                f"{hint}{source}"
            )
        return Path(self.root)

    def _cache_path(self) -> Path:
        base = self.cache_dir or os.environ.get("DEFECTSEG_CACHE_DIR") or "~/.cache/defectseg"
        listing = []
        if self.root is not None and os.path.isdir(self.root):
            for dirpath, _, files in os.walk(self.root):
                for name in files:
                    full = os.path.join(dirpath, name)
                    stat = os.stat(full)
                    listing.append((os.path.relpath(full, self.root), stat.st_size, int(stat.st_mtime)))
        key = {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "root": os.path.abspath(self.root) if self.root else None,
            "params": self.scan_params(),
            "on_missing": self.on_missing,  # 'skip' caches a shorter list than 'error' accepts
            "files": hashlib.sha1(json.dumps(sorted(listing)).encode()).hexdigest(),
            "version": 1,
        }
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return Path(os.path.expanduser(base)) / f"{type(self).__name__.lower()}-{digest[:16]}.json"

    @property
    def metadata(self) -> list[Sample]:
        """All samples with their metadata; scanned once, then read from the cache."""
        if self._metadata is None:
            self._metadata = self._load_metadata()
        return self._metadata

    def _load_metadata(self) -> list[Sample]:
        cache = self._cache_path() if self.CACHE_METADATA else None
        if cache is not None and cache.is_file():
            try:
                return [Sample.from_json(item) for item in json.loads(cache.read_text())]
            except (ValueError, TypeError, KeyError):
                pass  # unreadable cache: scan again and rewrite it
        samples = self.scan()
        if not samples:
            raise ValueError(
                f"{type(self).__name__} found no samples under {self.root!r}; check the path and "
                f"the expected layout:\n{self.LAYOUT}"
            )
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps([s.to_json() for s in samples]))
                tmp.replace(cache)
            except OSError as err:
                warnings.warn(f"could not write the metadata cache {cache}: {err}", stacklevel=2)
        return samples

    def report_unpaired(self, kind: str, offenders: Sequence[str]) -> None:
        """Raise for (or warn about) images without masks / masks without images."""
        if not offenders:
            return
        shown = "\n  ".join(str(o) for o in list(offenders)[:10])
        more = f"\n  ... and {len(offenders) - 10} more" if len(offenders) > 10 else ""
        message = f"{len(offenders)} {kind}:\n  {shown}{more}"
        if self.on_missing == "skip":
            warnings.warn(f"{message}\nskipping them (on_missing='skip')", stacklevel=2)
        else:
            raise FileNotFoundError(f"{message}\nfix the files, or set on_missing: skip to leave them out")

    # ------------------------------------------------------------------ splits
    def split_indices(self) -> dict[str, list[int]]:
        """Indices of the metadata in each split (computed once, disjoint)."""
        if self._splits is None:
            self._splits = self._make_splits(self.metadata)
            for name in ("train",):
                if not self._splits.get(name):
                    raise ValueError(f"{type(self).__name__}: the {name} split is empty")
        return self._splits

    def _make_splits(self, samples: Sequence[Sample]) -> dict[str, list[int]]:
        has_official = any(s.split is not None for s in samples)
        mode = self.split or ("official" if has_official else "stratified")
        if mode == "official":
            if not has_official:
                raise ValueError(
                    f"{type(self).__name__} has no official split; use split: stratified"
                )
            parts = {name: [i for i, s in enumerate(samples) if s.split == name] for name in SPLITS}
            if not parts["val"] and self.val_fraction > 0:
                train = [samples[i] for i in parts["train"]]
                sub = stratified_split(train, {"val": self.val_fraction}, self.seed)
                parts["val"] = [parts["train"][i] for i in sub["val"]]
                parts["train"] = [parts["train"][i] for i in sub["train"]]
            return parts
        return stratified_split(
            samples, {"val": self.val_fraction, "test": self.test_fraction}, self.seed
        )

    def samples_of(self, split: str) -> list[Sample]:
        """Samples of ``train``, ``val`` or ``test`` (defect-free training images dropped if asked)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        indices = self.split_indices()[split]
        if split == "train" and self.semi_supervised:
            indices = self.labeled_indices()  # the unlabelled rest never shows its masks
        samples = [self.metadata[i] for i in indices]
        if split == "train" and not self.train_defect_free:
            samples = [s for s in samples if not s.defect_free]
        return samples

    # ------------------------------------------------------------------ statistics
    def statistics(self, split: str | None = None) -> dict[str, dict[str, float]]:
        """Per-class pixel ratio and image ratio, as in Table 2 of the balanced-loss paper.

        Args:
            split: ``train``, ``val``, ``test`` or ``None`` for the whole dataset.

        Returns:
            ``{class_name: {"pixel_ratio": ..., "image_ratio": ..., "images": ...}}`` where the
            pixel ratio is the mean share of the image the class covers in the images that contain
            it, and the image ratio the share of images containing it. Background's pixel ratio
            is taken over all images.
        """
        samples = self.metadata if split is None else self.samples_of(split)
        total = len(samples)
        stats: dict[str, dict[str, float]] = {}
        for k, name in enumerate(self.class_names):
            if k == 0:
                ratios = [
                    1.0 - sum(s.pixel_counts.values()) / s.num_pixels for s in samples if s.num_pixels
                ]
                images = total
            else:
                ratios = [
                    s.pixel_counts[k] / s.num_pixels
                    for s in samples
                    if s.pixel_counts.get(k, 0) > 0 and s.num_pixels
                ]
                images = len(ratios)
            stats[name] = {
                "pixel_ratio": float(np.mean(ratios)) if ratios else 0.0,
                "image_ratio": images / total if total else 0.0,
                "images": float(images),
            }
        return stats

    def class_pixel_frequencies(self, split: str = "train") -> list[float]:
        """Share of all labelled pixels that belong to each class in ``split`` (sums to 1)."""
        samples = self.samples_of(split)
        counts = np.zeros(self.num_classes, dtype=np.float64)
        for s in samples:
            for k, v in s.pixel_counts.items():
                counts[k] += v
            counts[0] += s.num_pixels - sum(s.pixel_counts.values())
        return (counts / max(counts.sum(), 1.0)).tolist()

    # ------------------------------------------------------------------ loaders
    def make_dataset(self, split: str) -> DefectDataset:
        """The dataset of ``split``, with augmentation on the training split only."""
        augment = build_augmentation(self.augment) if split == "train" else None
        dataset = DefectDataset(self, self.samples_of(split), augment=augment)
        dataset.split = split
        return dataset

    def setup(self, stage: str | None = None) -> None:
        self.split_indices()

    def _loader(self, dataset: Dataset, shuffle: bool, **kwargs: Any) -> DataLoader:
        if len(dataset) == 0:
            split = getattr(dataset, "split", None) or "this"
            raise ValueError(
                f"{type(self).__name__}: the {split} split has no samples ({self.describe()}); with "
                "a small dataset raise val_fraction/test_fraction, or set them to 0 and skip that stage"
            )
        return DataLoader(
            dataset,
            batch_size=kwargs.pop("batch_size", self.batch_size),
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.semi_supervised and not self._building_labeled_stream:
            return self.semi_supervised_dataloader()  # builds the labelled stream by calling this
        if self.dli_config is not None:  # class-balancing injection (issue 5)
            from defectseg.data.dli import build_dli_loader

            return build_dli_loader(self)
        return self._loader(self.make_dataset("train"), shuffle=True, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.make_dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.make_dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.make_dataset("test"), shuffle=False)

    def describe(self) -> str:
        """One line per split with image counts, for logs."""
        parts = self.split_indices()
        return ", ".join(f"{name}: {len(parts.get(name, []))}" for name in SPLITS)
