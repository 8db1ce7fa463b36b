"""Records of a dataset and how they are split: :class:`Sample`, train/val/test splits and the
labelled subset of semi-supervised training. Pure metadata: nothing here decodes an image."""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from defectseg.data.contract import IGNORE_INDEX

#: The splits every datamodule serves.
SPLITS = ("train", "val", "test")


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
    :func:`stratified_split`, keeps samples of one :attr:`Sample.group`
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

