"""The common base of every defectseg datamodule.

A format (Magnetic Tile, NEU-Seg, a user's folder, the synthetic generator...) subclasses
:class:`DefectDataModule` and implements two things:

* :meth:`DefectDataModule.scan`: list the dataset as :class:`Sample` records, including the
  per-image metadata (classes present, defect pixel counts). It is run once; the result is
  cached on disk so that later runs, and the class-balancing sampler, never decode an image.
* :meth:`DefectDataModule.load_sample`: decode one sample into a ``uint8`` image and an
  integer mask (``0`` background, ``1..K`` classes, ``255`` ignore).

Everything else -- splits, the size policy, scale and crops, channels, augmentation,
normalisation, the decode cache, statistics, loaders -- is shared, so every format behaves the
same. The datamodule only holds settings and metadata; the work is done one level down:
:mod:`~defectseg.data.records` (samples, splits), :mod:`~defectseg.data.dataset` (items),
:mod:`~defectseg.data.cache` (decoded arrays), :mod:`~defectseg.data.streams` (the training
stream: plain, DLI, semi-supervised) and :mod:`~defectseg.data.io` (files).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from defectseg.data import streams
from defectseg.data.bit_depth import check_bit_depth
from defectseg.data.cache import DecodeCache, estimated_bytes
from defectseg.data.contract import default_normalization
from defectseg.data.dataset import (
    CallableLoader,
    DatasetSettings,
    DefectDataset,
    UnlabeledDataset,
    as_size,
    build_augmentation,
)
from defectseg.data.dli import DLIConfig
from defectseg.data.io import parallel_map, read_image, read_mask, to_channels
from defectseg.data.records import SPLITS, Sample, count_pixels, stratified_split
from defectseg.data.semi import SemiSupervisedPool

# re-exported: the names users imported from here before the data layer was split
__all__ = [
    "SPLITS",
    "DatasetNotFoundError",
    "DefectDataModule",
    "DefectDataset",
    "Sample",
    "build_augmentation",
    "count_pixels",
    "default_data_root",
    "read_image",
    "read_mask",
    "stratified_split",
    "to_channels",
]


def default_data_root() -> str:
    """``$DEFECTSEG_DATA_ROOT``, or ``../shared/datasets`` (relative to the working directory)."""
    return os.environ.get("DEFECTSEG_DATA_ROOT", os.path.join("..", "shared", "datasets"))


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's root folder, or the layout expected inside it, is missing."""


class DefectDataModule(L.LightningDataModule):
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
            With ``crop_size`` the defect is injected into the training crop.
        scale: fixed down-scale factor applied to every image and mask after decoding (e.g.
            ``0.5``), before crops; validation, test and the metrics then work at that scale.
            Not combined with ``size_policy: resize``.
        crop_size: train-time random crops of this size (an int for a square, or ``(height,
            width)``), cut at native resolution (after ``scale``); an image smaller than the
            crop is padded with ignored pixels. Validation and test keep whole images.
        defect_crop_fraction: share of the training crops centred on a random defect pixel (of
            a random class present in the image); the rest are uniform over the image.
        defect_image_fraction: share of the training images drawn from defective images (with
            replacement, a seeded :class:`~torch.utils.data.WeightedRandomSampler`; an epoch
            keeps the training split's length). ``None`` (default) shuffles the split as it is.
            On Magnetic Tile, where 7 in 10 images are defect-free, ``0.5`` doubles the defect
            crops per step. Not combined with ``dli`` (which balances batches itself).
        decode_cache: keep every decoded (and scaled) image and mask in one memory-mapped file
            under ``cache_dir``, shared by all DataLoader workers, so no epoch decodes a file
            again: ``auto`` (when the decoded dataset fits ``decode_cache_max_gb``), ``true`` or
            ``false``.
        decode_cache_max_gb: the size limit of ``decode_cache: auto``.
        bit_depth: bits of the image files: ``auto`` (from each 16-bit file's largest value, with
            one warning per depth found), 8, 10, 12 or 16; 12-bit camera data stored in 16-bit
            files is scaled by 255/4095 instead of being divided by 257
            (:mod:`defectseg.data.bit_depth`). 8-bit files are read as they are.
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
        scale: float | None = None,
        crop_size: int | tuple[int, int] | None = None,
        defect_crop_fraction: float = 0.5,
        defect_image_fraction: float | None = None,
        decode_cache: Literal["auto"] | bool = "auto",
        decode_cache_max_gb: float = 2.0,
        bit_depth: Literal["auto", 8, 10, 12, 16] = "auto",
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
        if scale is not None and not 0.0 < float(scale) <= 1.0:
            raise ValueError(f"scale must be a down-scale factor in (0, 1] such as 0.5, got {scale}")
        if scale not in (None, 1, 1.0) and size_policy == "resize":
            raise ValueError(
                f"scale={scale} and size_policy='resize' both set the size; use one (scale keeps the "
                "aspect ratio, resize sets image_size)"
            )
        if not 0.0 <= float(defect_crop_fraction) <= 1.0:
            raise ValueError(f"defect_crop_fraction must be in [0, 1], got {defect_crop_fraction}")
        if defect_image_fraction is not None and not 0.0 < float(defect_image_fraction) <= 1.0:
            raise ValueError(
                f"defect_image_fraction must be in (0, 1] (e.g. 0.5), or null to shuffle the split as it "
                f"is; got {defect_image_fraction}"
            )
        if defect_image_fraction is not None and dli not in (None, False):
            raise ValueError(
                "defect_image_fraction and dli both decide what a training batch holds; DLI already "
                "balances the classes of every batch: set one of them (defect_image_fraction: null or dli: null)"
            )
        if decode_cache not in ("auto", True, False):
            raise ValueError(f"decode_cache must be 'auto', true or false, got {decode_cache!r}")
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
        self.bit_depth = check_bit_depth(bit_depth)
        self.scale = float(scale) if scale not in (None, 1, 1.0) else None
        self.crop_size = as_size(crop_size, "crop_size")
        self.defect_crop_fraction = float(defect_crop_fraction)
        self.defect_image_fraction = float(defect_image_fraction) if defect_image_fraction is not None else None
        self.decode_cache = decode_cache
        self.decode_cache_max_gb = float(decode_cache_max_gb)
        self._decode_cache: DecodeCache | None = None
        self._metadata: list[Sample] | None = None
        self._splits: dict[str, list[int]] | None = None
        self.dli = dli
        self.dli_config = DLIConfig.from_spec(dli)
        self.semi = SemiSupervisedPool(labeled_fraction, num_labeled, labeled_seed, unlabeled_dirs, unlabeled_batch_size)

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
        return CallableLoader(self.load_sample)

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

    def cache_folder(self) -> Path:
        """``cache_dir``, else ``$DEFECTSEG_CACHE_DIR``, else ``~/.cache/defectseg``."""
        base = self.cache_dir or os.environ.get("DEFECTSEG_CACHE_DIR") or "~/.cache/defectseg"
        return Path(os.path.expanduser(base))

    def _cache_path(self) -> Path:
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
        return self.cache_folder() / f"{type(self).__name__.lower()}-{digest[:16]}.json"

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
        if split == "train" and self.semi.enabled:
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

    # ------------------------------------------------------------------ datasets
    def dataset_settings(self, split: str = "train") -> DatasetSettings:
        """The :class:`~defectseg.data.dataset.DatasetSettings` of ``split``'s dataset (crops on
        the training split only)."""
        train = split == "train"
        return DatasetSettings(
            num_classes=self.num_classes,
            channels=self.channels,
            mean=self.mean,
            std=self.std,
            size_policy=self.size_policy,
            image_size=self.image_size,
            pad_multiple=self.pad_multiple,
            scale=self.scale,
            crop_size=self.crop_size if train else None,
            defect_crop_fraction=self.defect_crop_fraction if train else 0.0,
        )

    def make_dataset(self, split: str, augment: bool | None = None) -> DefectDataset:
        """The dataset of ``split``. Augmentation is on for the training split only, unless
        ``augment`` says otherwise (``False`` gives the training split unaugmented)."""
        use_augment = split == "train" if augment is None else augment
        return DefectDataset(
            self.samples_of(split),
            self.sample_loader(),
            self.dataset_settings(split),
            augment=build_augmentation(self.augment) if use_augment else None,
            cache=self.decode_cache_for(),
            split=split,
        )

    # ------------------------------------------------------------------ decode cache
    def decode_cache_path(self) -> Path:
        """The decode cache file of this dataset and its decoding settings."""
        settings = {"channels": self.channels, "scale": self.scale, "size_policy": self.size_policy,
                    "image_size": self.image_size, "num_classes": self.num_classes, "bit_depth": self.bit_depth}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self._cache_path().with_name(f"{self._cache_path().stem}-decoded-{digest}.bin")

    def use_decode_cache(self) -> bool:
        """Whether ``decode_cache`` is on: ``auto`` when the format reads files whose scan is
        cached and the decoded dataset fits ``decode_cache_max_gb``."""
        if self.decode_cache is False or self.decode_cache is None:
            return False
        if self.decode_cache is True:
            return True
        if not self.CACHE_METADATA:
            return False  # generated data: nothing to decode from disk
        return estimated_bytes(self.metadata, self.channels, self.scale) <= self.decode_cache_max_gb * 1e9

    def decode_cache_for(self) -> DecodeCache | None:
        """The decode cache (built on first use), or ``None`` when it is off."""
        if self._decode_cache is not None or not self.use_decode_cache():
            return self._decode_cache
        path = self.decode_cache_path()
        cache = DecodeCache.open(path)
        if cache is None or any(s not in cache for s in self.metadata):
            decoder = DefectDataset([], self.sample_loader(), self.dataset_settings("val"))
            try:
                cache = DecodeCache.build(path, self.metadata, decoder.decode, map_function=parallel_map)
            except OSError as err:
                warnings.warn(
                    f"could not write the decode cache {path}: {err}; decoding every epoch "
                    "(set cache_dir to a writable folder, or decode_cache: false)",
                    stacklevel=2,
                )
                self.decode_cache = False
                return None
        self._decode_cache = cache
        return cache

    def setup(self, stage: str | None = None) -> None:
        self.split_indices()

    # ------------------------------------------------------------------ semi-supervised
    @property
    def semi_supervised(self) -> bool:
        """True when a labelled subset or unlabelled folders are configured."""
        return self.semi.enabled

    def labeled_indices(self) -> list[int]:
        """Metadata indices of the labelled training images (the whole training split when only
        ``unlabeled_dirs`` is set)."""
        return list(self.semi.parts(self.metadata, self.split_indices()["train"], self.seed)[0])

    def unlabeled_indices(self) -> list[int]:
        """Metadata indices of the training images served without masks."""
        return list(self.semi.parts(self.metadata, self.split_indices()["train"], self.seed)[1])

    def unlabeled_samples(self) -> list[Sample]:
        """The unlabelled pool: the rest of the training split, then the ``unlabeled_dirs`` images."""
        held_out = [self.metadata[i] for split in ("val", "test") for i in self.split_indices().get(split, [])]
        pool = [self.metadata[i] for i in self.unlabeled_indices()]
        return self.semi.unlabeled_samples(pool, held_out, type(self).__name__)

    def make_unlabeled_dataset(self) -> UnlabeledDataset:
        """The unlabelled dataset, with the training crops and augmentation."""
        return UnlabeledDataset(
            self.unlabeled_samples(), self.sample_loader(), self.dataset_settings("train"),
            augment=build_augmentation(self.augment),
        )

    def unlabeled_dataloader(self) -> DataLoader:
        """Shuffled loader of the unlabelled pool (:func:`defectseg.data.streams.unlabeled_loader`)."""
        return streams.unlabeled_loader(self)

    def describe_semi_supervised(self) -> str:
        """``labeled: N, unlabeled: M (+F files)``, for logs."""
        if not self.semi.enabled:
            return "fully supervised"
        return self.semi.describe(len(self.labeled_indices()), len(self.unlabeled_indices()))

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, shuffle: bool, **kwargs: Any) -> DataLoader:
        return streams.make_loader(self, dataset, shuffle, **kwargs)

    def train_dataloader(self) -> Any:
        """The training stream (:mod:`defectseg.data.streams`): plain, DLI, or labelled +
        unlabelled."""
        return streams.train_loader(self)

    def val_dataloader(self) -> DataLoader:
        """The validation split in order (under DDP, each rank's share: see
        :func:`defectseg.data.streams.eval_loader`)."""
        return streams.eval_loader(self, self.make_dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return streams.eval_loader(self, self.make_dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        return streams.eval_loader(self, self.make_dataset("test"))

    def describe(self) -> str:
        """One line per split with image counts, for logs."""
        parts = self.split_indices()
        return ", ".join(f"{name}: {len(parts.get(name, []))}" for name in SPLITS)
