"""Sliding-window tiling with overlap blending, for images larger than a tile.

An image is covered by tiles of at most ``tile_size`` pixels per side. Along each axis the tiles
start every ``tile - overlap`` pixels and the last tile is aligned to the image's end, so every
pixel is covered and neighbouring tiles share at least ``overlap`` pixels. Each tile's
probabilities are weighted by a ramp that rises linearly over the first ``overlap`` pixels of
every edge shared with another tile (edges on the image border keep full weight), and the
weighted sum is divided by the summed weights. Predictions near a tile's edge, where the network
sees little context, therefore count less, and seams disappear.

An image that fits in one tile is predicted in one pass with weight 1, exactly as untiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or (height, width), got {value!r}")
        pair = (int(value[0]), int(value[1]))
    else:
        pair = (int(value), int(value))
    return pair


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles covering ``length`` pixels.

    Args:
        length: image size along the axis.
        tile: tile size along the axis.
        overlap: minimum overlap between neighbouring tiles (``0 <= overlap < tile``).

    Returns:
        ``[0]`` when the axis fits in one tile; otherwise starts every ``tile - overlap`` pixels,
        the last one being ``length - tile``.
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def axis_weights(start: int, size: int, length: int, overlap: int) -> np.ndarray:
    """Blending weights ``(size,)`` of a tile covering ``[start, start + size)`` of ``length``.

    The weight rises linearly from ``0.5 / overlap`` to 1 over the first ``overlap`` pixels of
    an edge that is inside the image, and is 1 elsewhere (always strictly positive).
    """
    weights = np.ones(size, np.float32)
    if overlap <= 0:
        return weights
    ramp = (np.arange(min(overlap, size), dtype=np.float32) + 0.5) / overlap
    if start > 0:
        weights[: ramp.size] = np.minimum(weights[: ramp.size], ramp)
    if start + size < length:
        weights[size - ramp.size :] = np.minimum(weights[size - ramp.size :], ramp[::-1])
    return weights


@dataclass(frozen=True)
class Tile:
    """One window of an image: rows ``y:y+height``, columns ``x:x+width``."""

    y: int
    x: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)


class TilePlan:
    """The tiles covering an image of ``height`` x ``width`` and their blending weights.

    Args:
        height: image height.
        width: image width.
        tile_size: maximum tile size, an int or ``(height, width)``; ``None`` or 0 for one tile
            covering the whole image.
        overlap: minimum overlap between neighbouring tiles, in pixels.
    """

    def __init__(
        self, height: int, width: int, tile_size: int | tuple[int, int] | None, overlap: int = 0
    ) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        if tile_size:
            tile_h, tile_w = _as_pair(tile_size, "tile_size")
            if min(tile_h, tile_w) < 1:
                raise ValueError(f"tile_size must be positive, got {tile_size!r}")
            if overlap < 0 or overlap >= min(tile_h, tile_w):
                raise ValueError(
                    f"overlap must be >= 0 and smaller than the tile ({tile_h}x{tile_w}), got {overlap}"
                )
        else:
            tile_h, tile_w = height, width
        self.height, self.width, self.overlap = height, width, max(0, int(overlap))
        size_h, size_w = min(tile_h, height), min(tile_w, width)
        ys = axis_starts(height, size_h, self.overlap)
        xs = axis_starts(width, size_w, self.overlap)
        self.tiles = [Tile(y, x, size_h, size_w) for y in ys for x in xs]
        self._wy = {y: axis_weights(y, size_h, height, self.overlap) for y in ys}
        self._wx = {x: axis_weights(x, size_w, width, self.overlap) for x in xs}

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def single(self) -> bool:
        """True when one tile covers the whole image."""
        return len(self.tiles) == 1

    def weights(self, tile: Tile) -> np.ndarray:
        """``(height, width)`` blending weights of ``tile``."""
        return np.outer(self._wy[tile.y], self._wx[tile.x])


class BlendAccumulator:
    """Sum weighted tile probabilities into a full-image canvas.

    Args:
        plan: the tile plan of the image.
        num_classes: channels of the probabilities.
    """

    def __init__(self, plan: TilePlan, num_classes: int) -> None:
        self.plan = plan
        self.canvas = np.zeros((num_classes, plan.height, plan.width), np.float32)
        self.weight = None if plan.single else np.zeros((plan.height, plan.width), np.float32)

    def add(self, tile: Tile, probabilities: np.ndarray, scale: float = 1.0) -> None:
        """Add ``probabilities`` ``(K, tile.height, tile.width)`` of ``tile``, times ``scale``.

        ``scale`` averages test-time-augmentation passes (``1 / passes`` each).
        """
        rows, cols = tile.slices
        if self.weight is None:
            self.canvas[:, rows, cols] += probabilities * scale
            return
        weights = self.plan.weights(tile)
        self.canvas[:, rows, cols] += probabilities * (weights * scale)
        self.weight[rows, cols] += weights * scale

    def result(self) -> np.ndarray:
        """The blended probabilities ``(K, H, W)``."""
        if self.weight is None:
            return self.canvas
        return self.canvas / self.weight
