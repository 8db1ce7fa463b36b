"""Semi-supervised mode of every datamodule: a labelled subset plus unlabelled images.

Every :class:`~defectseg.data.base.DefectDataModule` accepts these arguments (YAML
``data.init_args``):

* ``labeled_fraction`` (or ``num_labeled``): a seeded subset of the training split, stratified
  by defect class (:func:`labeled_split`), keeps its masks; the rest of the training split is
  served **unlabelled**.
* ``unlabeled_dirs``: folders of extra images without masks (searched recursively).
* ``unlabeled_batch_size``: images per unlabelled batch (default ``batch_size``).
* ``labeled_seed``: seed of the labelled subset (default: the split's ``seed``), to draw
  several labelled subsets over the same train/val/test split.

With any of the first three set, the training loader is Lightning's
:class:`~lightning.pytorch.utilities.CombinedLoader` in ``max_size_cycle`` mode and yields
``{"labeled": batch, "unlabeled": batch}``; an epoch lasts as many steps as the longer stream
has batches, and the shorter stream starts again (reshuffled) when it runs out. A pool smaller
than its batch size simply gives smaller batches.

What the model sees of an unlabelled image: the usual batch contract, but ``mask`` is all
:data:`~defectseg.data.contract.IGNORE_INDEX` (255) and ``defect_free`` is ``False`` (unknown),
so no label reaches the model or a loss. The valid (unpadded) region is ``valid_size``. Masks of
the unlabelled part of the training split are never decoded into a batch, and statistics of the
``train`` split (``statistics("train")``, class frequencies for weighted losses, the samplers that
read metadata) cover the labelled subset only.

The labelled stream is built by the datamodule's ordinary training loader (its sampler,
augmentation and any batch-balancing option apply to it); the unlabelled stream uses the same
augmentation and normalisation.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from defectseg.data.contract import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    from lightning.pytorch.utilities import CombinedLoader

    from defectseg.data.base import Sample

#: Key of :attr:`Sample.extra` marking an image that came from ``unlabeled_dirs``.
UNLABELED_FILE = "unlabeled_file"


def _group_classes(samples: Sequence[Sample]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Groups of sample positions (by :attr:`Sample.group`) and the majority primary class of each."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        groups[sample.group if sample.group is not None else f"#{index}"].append(index)
    classes = {}
    for key, members in groups.items():
        counts = Counter(samples[i].primary_class for i in members)
        classes[key] = max(counts, key=lambda c: (counts[c], c))
    return groups, classes


def labeled_split(
    samples: Sequence[Sample],
    labeled_fraction: float | None = None,
    num_labeled: int | None = None,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """Split positions of ``samples`` into a labelled and an unlabelled part.

    The labelled part is stratified by primary defect class (defect-free images are class 0) with
    :func:`~defectseg.data.base.stratified_split`, keeps samples of one :attr:`Sample.group`
    together, and holds at least one group of every class present. With ``num_labeled`` the
    count is then made exact by moving whole groups (at random, seeded) between the parts, from or
    to the class furthest from its share; it can differ only when groups hold several images or
    every class is already down to one labelled group.

    Args:
        samples: the training samples.
        labeled_fraction: share of the samples to label, in ``(0, 1]``.
        num_labeled: number of samples to label (instead of ``labeled_fraction``).
        seed: seed of the draw.

    Returns:
        ``(labeled, unlabeled)``: sorted positions in ``samples``, disjoint, covering all.

    Raises:
        ValueError: both or neither of ``labeled_fraction`` and ``num_labeled``, or out of range.
    """
    from defectseg.data.base import stratified_split

    total = len(samples)
    if (labeled_fraction is None) == (num_labeled is None):
        raise ValueError(
            f"give exactly one of labeled_fraction and num_labeled, got labeled_fraction={labeled_fraction} "
            f"and num_labeled={num_labeled}"
        )
    if labeled_fraction is not None and not 0.0 < labeled_fraction <= 1.0:
        raise ValueError(f"labeled_fraction must be in (0, 1], got {labeled_fraction}")
    if num_labeled is not None and not 1 <= num_labeled <= total:
        raise ValueError(
            f"num_labeled must be between 1 and the {total} images of the training split, got {num_labeled}"
        )
    fraction = float(labeled_fraction) if labeled_fraction is not None else num_labeled / total
    if fraction >= 1.0:
        return list(range(total)), []
    parts = stratified_split(samples, {"unlabeled": 1.0 - fraction}, seed)
    labeled, unlabeled = set(parts["train"]), set(parts["unlabeled"])
    if num_labeled is not None and len(labeled) != num_labeled:
        groups, group_class = _group_classes(samples)
        rng = np.random.default_rng([seed, 1])
        class_size: Counter[int] = Counter()
        for key, members in groups.items():
            class_size[group_class[key]] += len(members)

        def labeled_of(label: int) -> int:
            return sum(len(m) for k, m in groups.items() if group_class[k] == label and m[0] in labeled)

        def move(source: set[int], target: set[int], pick_class: Callable[[list[int]], int], keep: int) -> bool:
            candidates = defaultdict(list)
            for key, members in groups.items():
                if members[0] in source:
                    candidates[group_class[key]].append(key)
            eligible = [c for c, keys in candidates.items() if len(keys) > keep]
            if not eligible:
                return False
            label = pick_class(eligible)
            keys = sorted(candidates[label])
            key = keys[int(rng.integers(len(keys)))]
            source.difference_update(groups[key])
            target.update(groups[key])
            return True

        def surplus(label: int) -> float:
            return labeled_of(label) - class_size[label] * num_labeled / total

        while len(labeled) > num_labeled:
            if not move(labeled, unlabeled, lambda cs: max(sorted(cs), key=surplus), keep=1):
                break
        while len(labeled) < num_labeled:
            if not move(unlabeled, labeled, lambda cs: min(sorted(cs), key=surplus), keep=0):
                break
        if len(labeled) != num_labeled:
            warnings.warn(
                f"num_labeled={num_labeled}: labelling {len(labeled)} images instead, to keep at least "
                f"one labelled image of each of the {len(class_size)} classes (defect-free included) "
                "and samples of one group together",
                stacklevel=2,
            )
    return sorted(labeled), sorted(unlabeled)


def find_unlabeled_images(dirs: Sequence[str]) -> list[str]:
    """Image files under each folder of ``dirs`` (recursive, dotfiles skipped), sorted per folder.

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: a folder holds no image file.
    """
    from defectseg.data.files import IMAGE_EXTENSIONS, list_image_files

    found: list[str] = []
    for folder in dirs:
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"unlabeled_dirs: folder {folder!r} does not exist; give folders of images without masks"
            )
        files = [str(p) for p in list_image_files(folder)]
        if not files:
            raise ValueError(
                f"unlabeled_dirs: no image file ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}"
            )
        found.extend(files)
    return found


class UnlabeledLoader:
    """Picklable ``sample -> (image, mask)`` that hides every label: the mask is all 255.

    Images of the training split are decoded by the format's own loader (whose mask is thrown
    away); images from ``unlabeled_dirs`` are read from their file.
    """

    def __init__(self, format_loader: Callable[[Sample], tuple[np.ndarray, np.ndarray]]) -> None:
        self.format_loader = format_loader

    def __call__(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        if sample.extra.get(UNLABELED_FILE):
            from defectseg.data.base import read_image

            image = read_image(sample.image)
        else:
            image, _ = self.format_loader(sample)
        return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)


class UnlabeledDataset(Dataset):
    """Unlabelled images as contract items: ``mask`` all 255, ``defect_free`` ``False``.

    Args:
        datamodule: the datamodule (size policy, channels, normalisation come from it).
        samples: the unlabelled samples.
        augment: augmentation pipeline (the training one), or ``None``.
    """

    def __init__(self, datamodule: Any, samples: Sequence[Sample], augment: Callable | None = None) -> None:
        from defectseg.data.base import DefectDataset

        self.dataset = DefectDataset(datamodule, samples, augment=augment)
        self.dataset.loader = UnlabeledLoader(self.dataset.loader)
        self.samples = self.dataset.samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        item["defect_free"] = False
        return item


class SemiSupervisedMixin:
    """Semi-supervised support of :class:`~defectseg.data.base.DefectDataModule` (see module doc)."""

    def configure_semi_supervised(
        self,
        labeled_fraction: float | None = None,
        num_labeled: int | None = None,
        labeled_seed: int | None = None,
        unlabeled_dirs: Sequence[str] | str | None = None,
        unlabeled_batch_size: int | None = None,
    ) -> None:
        """Check and store the semi-supervised arguments (called by ``DefectDataModule.__init__``)."""
        if labeled_fraction is not None and num_labeled is not None:
            raise ValueError(
                f"give labeled_fraction or num_labeled, not both (got {labeled_fraction} and {num_labeled})"
            )
        if labeled_fraction is not None and not 0.0 < float(labeled_fraction) <= 1.0:
            raise ValueError(f"labeled_fraction must be in (0, 1], got {labeled_fraction}")
        if num_labeled is not None and int(num_labeled) < 1:
            raise ValueError(f"num_labeled must be >= 1, got {num_labeled}")
        if unlabeled_batch_size is not None and unlabeled_batch_size < 1:
            raise ValueError(f"unlabeled_batch_size must be >= 1, got {unlabeled_batch_size}")
        if isinstance(unlabeled_dirs, (str, os.PathLike)):
            unlabeled_dirs = [unlabeled_dirs]
        self.labeled_fraction = float(labeled_fraction) if labeled_fraction is not None else None
        self.num_labeled = int(num_labeled) if num_labeled is not None else None
        self.labeled_seed = labeled_seed
        self.unlabeled_dirs = [os.path.expanduser(os.path.expandvars(str(d))) for d in unlabeled_dirs or []]
        self.unlabeled_batch_size = unlabeled_batch_size
        self._labeled_split: tuple[list[int], list[int]] | None = None
        self._building_labeled_stream = False

    @property
    def semi_supervised(self) -> bool:
        """True when a labelled subset or unlabelled folders are configured."""
        return bool(
            getattr(self, "labeled_fraction", None) is not None
            or getattr(self, "num_labeled", None) is not None
            or getattr(self, "unlabeled_dirs", None)
        )

    def _labeled_parts(self) -> tuple[list[int], list[int]]:
        """Metadata indices of the labelled and unlabelled parts of the training split."""
        if self._labeled_split is None:
            train = list(self.split_indices()["train"])
            if self.labeled_fraction is None and self.num_labeled is None:
                self._labeled_split = (train, [])
            else:
                seed = self.seed if self.labeled_seed is None else self.labeled_seed
                labeled, unlabeled = labeled_split(
                    [self.metadata[i] for i in train], self.labeled_fraction, self.num_labeled, seed
                )
                self._labeled_split = ([train[i] for i in labeled], [train[i] for i in unlabeled])
        return self._labeled_split

    def labeled_indices(self) -> list[int]:
        """Metadata indices of the labelled training images (the whole training split when only
        ``unlabeled_dirs`` is set)."""
        return list(self._labeled_parts()[0])

    def unlabeled_indices(self) -> list[int]:
        """Metadata indices of the training images served without masks."""
        return list(self._labeled_parts()[1])

    def unlabeled_samples(self) -> list[Sample]:
        """The unlabelled pool: the rest of the training split, then the ``unlabeled_dirs`` images.

        Raises:
            ValueError: the pool is empty.
        """
        from defectseg.data.base import Sample

        pool = [self.metadata[i] for i in self.unlabeled_indices()]
        files = find_unlabeled_images(self.unlabeled_dirs) if self.unlabeled_dirs else []
        if files:
            held_out = set()
            for split in ("val", "test"):
                for index in self.split_indices().get(split, []):
                    path = self.metadata[index].image
                    if os.path.isfile(path):
                        held_out.add(os.path.realpath(path))
            leaked = [f for f in files if os.path.realpath(f) in held_out]
            if leaked:
                warnings.warn(
                    f"{len(leaked)} images of unlabeled_dirs are validation or test images of this "
                    f"datamodule (e.g. {leaked[0]}); training on them inflates the scores",
                    stacklevel=2,
                )
        pool += [Sample(image=f, split="unlabeled", extra={UNLABELED_FILE: True}) for f in files]
        if not pool:
            raise ValueError(
                f"{type(self).__name__}: semi-supervised mode has no unlabelled image: every training "
                f"image is labelled (labeled_fraction={self.labeled_fraction}, num_labeled="
                f"{self.num_labeled}) and unlabeled_dirs is empty; lower labeled_fraction/num_labeled "
                "or add unlabeled_dirs"
            )
        return pool

    def make_unlabeled_dataset(self) -> UnlabeledDataset:
        """The unlabelled dataset, with the training augmentation."""
        from defectseg.data.base import build_augmentation

        return UnlabeledDataset(self, self.unlabeled_samples(), augment=build_augmentation(self.augment))

    def unlabeled_dataloader(self) -> DataLoader:
        """Shuffled loader of the unlabelled pool, ``unlabeled_batch_size`` images a batch.

        Under DDP (a trainer with ``world_size > 1``) each rank gets its own shard through a
        seeded :class:`~torch.utils.data.DistributedSampler`, also when
        ``use_distributed_sampler`` is off (as DLI needs for the labelled stream); Lightning sets
        its epoch.
        """
        dataset = self.make_unlabeled_dataset()
        trainer = getattr(self, "trainer", None)
        world_size = int(getattr(trainer, "world_size", 1) or 1)
        kwargs: dict[str, Any] = {"shuffle": True}
        if world_size > 1:
            kwargs = {
                "shuffle": False,
                "sampler": DistributedSampler(
                    dataset, num_replicas=world_size, rank=int(trainer.global_rank), shuffle=True, seed=self.seed
                ),
            }
        return self._loader(
            dataset, drop_last=False, batch_size=self.unlabeled_batch_size or self.batch_size, **kwargs
        )

    def semi_supervised_dataloader(self) -> CombinedLoader:
        """``CombinedLoader({"labeled": ..., "unlabeled": ...}, mode="max_size_cycle")``.

        The labelled stream is the datamodule's ordinary ``train_dataloader()`` (over the
        labelled subset, with its sampler and options).
        """
        from lightning.pytorch.utilities import CombinedLoader

        self._building_labeled_stream = True
        try:
            labeled = self.train_dataloader()
        finally:
            self._building_labeled_stream = False
        return CombinedLoader({"labeled": labeled, "unlabeled": self.unlabeled_dataloader()}, mode="max_size_cycle")

    def describe_semi_supervised(self) -> str:
        """``labeled: N, unlabeled: M (+F files)``, for logs."""
        if not self.semi_supervised:
            return "fully supervised"
        files = len(find_unlabeled_images(self.unlabeled_dirs)) if self.unlabeled_dirs else 0
        return (
            f"labeled: {len(self.labeled_indices())}, unlabeled: {len(self.unlabeled_indices())} "
            f"of the training split + {files} files"
        )
