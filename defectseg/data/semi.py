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

The labelled stream is the datamodule's ordinary training stream (its crops, augmentation and
DLI apply to it); the unlabelled stream uses the same crops, augmentation and normalisation.
This module holds the pool (:class:`SemiSupervisedPool`, a component of the datamodule); the
two loaders are put together in :mod:`defectseg.data.streams`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

from defectseg.data.dataset import UNLABELED_FILE
from defectseg.data.io import IMAGE_EXTENSIONS, list_image_files
from defectseg.data.records import Sample, labeled_split

__all__ = ["UNLABELED_FILE", "SemiSupervisedPool", "find_unlabeled_images", "labeled_split"]


def find_unlabeled_images(dirs: Sequence[str]) -> list[str]:
    """Image files under each folder of ``dirs`` (recursive, dotfiles skipped), sorted per folder.

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: a folder holds no image file.
    """
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



class SemiSupervisedPool:
    """The labelled subset and the unlabelled pool of a datamodule's training split.

    Args:
        labeled_fraction: share of the training split that keeps its masks.
        num_labeled: the same as a count of images.
        labeled_seed: seed of the labelled subset (default: the split's seed).
        unlabeled_dirs: folders of extra images without masks.
        unlabeled_batch_size: images per unlabelled batch (default: the labelled batch size).

    Raises:
        ValueError: both of ``labeled_fraction`` and ``num_labeled``, or a value out of range.
    """

    def __init__(
        self,
        labeled_fraction: float | None = None,
        num_labeled: int | None = None,
        labeled_seed: int | None = None,
        unlabeled_dirs: Sequence[str] | str | None = None,
        unlabeled_batch_size: int | None = None,
    ) -> None:
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
        self._parts: tuple[list[int], list[int]] | None = None

    @property
    def enabled(self) -> bool:
        """True when a labelled subset or unlabelled folders are configured."""
        return bool(self.labeled_fraction is not None or self.num_labeled is not None or self.unlabeled_dirs)

    def parts(self, metadata: Sequence[Sample], train: Sequence[int], seed: int) -> tuple[list[int], list[int]]:
        """Metadata indices of the labelled and unlabelled parts of the training split ``train``
        (computed once)."""
        if self._parts is None:
            train = list(train)
            if self.labeled_fraction is None and self.num_labeled is None:
                self._parts = (train, [])
            else:
                seed = seed if self.labeled_seed is None else self.labeled_seed
                labeled, unlabeled = labeled_split(
                    [metadata[i] for i in train], self.labeled_fraction, self.num_labeled, seed
                )
                self._parts = ([train[i] for i in labeled], [train[i] for i in unlabeled])
        return self._parts

    def unlabeled_samples(self, pool: Sequence[Sample], held_out: Sequence[Sample], owner: str) -> list[Sample]:
        """The unlabelled pool: ``pool`` (the unlabelled part of the training split), then the
        ``unlabeled_dirs`` images; warns when a folder image is one of ``held_out`` (validation and
        test samples).

        Raises:
            ValueError: the pool is empty.
        """
        pool = list(pool)
        files = find_unlabeled_images(self.unlabeled_dirs) if self.unlabeled_dirs else []
        if files:
            held = {os.path.realpath(s.image) for s in held_out if os.path.isfile(s.image)}
            leaked = [f for f in files if os.path.realpath(f) in held]
            if leaked:
                warnings.warn(
                    f"{len(leaked)} images of unlabeled_dirs are validation or test images of this "
                    f"datamodule (e.g. {leaked[0]}); training on them inflates the scores",
                    stacklevel=3,
                )
        pool += [Sample(image=f, split="unlabeled", extra={UNLABELED_FILE: True}) for f in files]
        if not pool:
            raise ValueError(
                f"{owner}: semi-supervised mode has no unlabelled image: every training "
                f"image is labelled (labeled_fraction={self.labeled_fraction}, num_labeled="
                f"{self.num_labeled}) and unlabeled_dirs is empty; lower labeled_fraction/num_labeled "
                "or add unlabeled_dirs"
            )
        return pool

    def describe(self, labeled: int, unlabeled: int) -> str:
        """``labeled: N, unlabeled: M of the training split + F files``, for logs."""
        if not self.enabled:
            return "fully supervised"
        files = len(find_unlabeled_images(self.unlabeled_dirs)) if self.unlabeled_dirs else 0
        return f"labeled: {labeled}, unlabeled: {unlabeled} of the training split + {files} files"
