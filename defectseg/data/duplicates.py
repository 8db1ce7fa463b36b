"""Find near-duplicate images, identical up to a 90-degree rotation, and group them.

Used by NEU-Seg's ``grouped`` split: its training set holds rotated copies of its own images and
most test images have an identical or rotated near-copy in training, so an honest split must
keep every such group on one side.

Two images are near-duplicates when, on grayscale thumbnails of ``size`` x ``size`` pixels, the
mean absolute difference between one and some rotation (0, 90, 180 or 270 degrees) of the other
is below ``threshold`` grey levels. Comparing all pairs at full resolution would be slow, so the
search prunes with exact lower bounds: the difference of the images' mean brightness, then the
mean absolute difference of 4x4 and 16x16 block averages (block-averaging never increases the
mean absolute difference, and rotations commute with it). Only the few surviving pairs are
compared at ``size`` x ``size``. Connected pairs form a group (union-find).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

from defectseg.data.io import read_image
from defectseg.data.io import parallel_map


def thumbnail(path: str | os.PathLike, size: int = 64) -> np.ndarray:
    """Grayscale ``size`` x ``size`` ``float32`` thumbnail (area interpolation) of an image."""
    image = read_image(path, cv2.IMREAD_GRAYSCALE)  # decoding straight to gray is twice as fast
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)


def _block_mean(thumbs: np.ndarray, side: int) -> np.ndarray:
    n, size, _ = thumbs.shape
    step = size // side
    return thumbs.reshape(n, side, step, side, step).mean(axis=(2, 4))


def _rotation_distance(images: np.ndarray, i: np.ndarray, j: np.ndarray, rotations: int) -> np.ndarray:
    """min over rotations r of mean |images[i] - rot90(images[j], r)| for pairs (i, j), in chunks."""
    n, side, _ = images.shape
    flat_a = images.reshape(n, -1)
    rotated = [np.rot90(images, r, axes=(1, 2)).reshape(n, -1) for r in range(rotations)]
    out = np.empty(len(i), dtype=np.float32)
    chunk = max(1, 4_000_000 // (side * side))
    for start in range(0, len(i), chunk):
        ii, jj = i[start : start + chunk], j[start : start + chunk]
        left = flat_a[ii]
        best = np.abs(left - rotated[0][jj]).mean(axis=1)
        for rot in rotated[1:]:
            np.minimum(best, np.abs(left - rot[jj]).mean(axis=1), out=best)
        out[start : start + chunk] = best
    return out


def near_duplicate_pairs(
    thumbs: np.ndarray, threshold: float = 1.0, rotations: bool = True
) -> np.ndarray:
    """Index pairs ``(i, j)``, ``i != j``, of near-duplicate thumbnails.

    Args:
        thumbs: ``(N, S, S)`` grayscale thumbnails, ``S`` a multiple of 16.
        threshold: largest mean absolute difference (grey levels) of a near-duplicate.
        rotations: also compare the 90, 180 and 270 degree rotations.

    Returns:
        ``(M, 2)`` int array of pairs.
    """
    thumbs = np.asarray(thumbs, dtype=np.float32)
    n, size = thumbs.shape[0], thumbs.shape[1]
    if thumbs.ndim != 3 or thumbs.shape[2] != size or size % 16:
        raise ValueError(f"thumbnails must be (N, S, S) with S a multiple of 16, got {thumbs.shape}")
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    turns = 4 if rotations else 1
    # 1. mean brightness differs by at most the mean absolute difference: sliding window
    means = thumbs.mean(axis=(1, 2))
    order = np.argsort(means, kind="stable")
    sorted_means = means[order]
    upper = np.searchsorted(sorted_means, sorted_means + threshold, side="right")
    counts = upper - np.arange(n) - 1
    first = np.repeat(np.arange(n), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    i, j = order[first], order[first + 1 + offsets]
    # 2. coarse-to-fine lower bounds, then the exact distance at full thumbnail size
    for side in (4, 16, size):
        blocks = thumbs if side == size else _block_mean(thumbs, side)
        keep = _rotation_distance(blocks, i, j, turns) < threshold
        i, j = i[keep], j[keep]
    return np.stack([i, j], axis=1).astype(np.int64)


def group_labels(num_items: int, pairs: np.ndarray) -> list[int]:
    """Connected components of a graph given as index pairs: the smallest index of each group."""
    parent = list(range(num_items))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(x) for x in range(num_items)]


def near_duplicate_groups(
    paths: Sequence[str | os.PathLike],
    threshold: float = 1.0,
    size: int = 64,
    rotations: bool = True,
) -> list[int]:
    """Group images that are identical or rotated near-copies of each other.

    Args:
        paths: the image files.
        threshold: largest mean absolute difference (grey levels, on ``size`` x ``size``
            grayscale thumbnails) between near-duplicates.
        size: thumbnail side, a multiple of 16.
        rotations: also match 90, 180 and 270 degree rotations.

    Returns:
        For each path, the index (into ``paths``) of the first member of its group; an image
        with no near-duplicate is its own group.
    """
    thumbs = np.stack(parallel_map(lambda p: thumbnail(p, size), list(paths))) if paths else np.zeros((0, size, size))
    return group_labels(len(paths), near_duplicate_pairs(thumbs, threshold, rotations))
