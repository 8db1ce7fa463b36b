"""Built-in synthetic surface-defect data: textured surfaces with rare, imbalanced defects.

Nothing is downloaded: each image is generated from ``(seed, index)`` when it is loaded, in the
DataLoader workers, so the dataset is reproducible and costs no disk. Masks are cheap to render,
so the metadata scan renders masks only.

Defect kinds (one kind per defective image, one or more instances):

* ``scratch`` -- thin, long, slightly curved lines, darker or brighter than the surface;
* ``pit`` -- small round dark pits (a few pixels across);
* ``stain`` -- large irregular low-contrast blobs;
* ``crack`` -- dark branching random-walk cracks.

With more than four classes the kinds repeat with the opposite polarity (``scratch_2`` ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from defectseg.data.base import DefectDataModule, Sample, count_pixels

KINDS = ("scratch", "pit", "stain", "crack")


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def _defect_shapes(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Render the binary region (uint8 0/1) of one defect kind on an empty canvas."""
    height, width = size
    canvas = np.zeros((height, width), np.uint8)
    short = min(height, width)
    if kind == "scratch":
        for _ in range(int(rng.integers(1, 3))):
            length = rng.uniform(0.35, 0.8) * short
            angle = rng.uniform(0, np.pi)
            cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
            bend = rng.uniform(-0.15, 0.15) * length
            t = np.linspace(-0.5, 0.5, 24)
            xs = cx + t * length * np.cos(angle) - (1 - 4 * t**2) * bend * np.sin(angle)
            ys = cy + t * length * np.sin(angle) + (1 - 4 * t**2) * bend * np.cos(angle)
            points = np.stack([xs, ys], 1).round().astype(np.int32)
            cv2.polylines(canvas, [points], False, 1, thickness=int(rng.integers(1, 3)))
    elif kind == "pit":
        for _ in range(int(rng.integers(1, 5))):
            radius = int(rng.integers(2, max(3, short // 24)))
            center = (int(rng.integers(radius, width - radius)), int(rng.integers(radius, height - radius)))
            cv2.circle(canvas, center, radius, 1, thickness=-1)
    elif kind == "stain":
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        base = rng.uniform(0.12, 0.3) * short
        angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
        radii = base * rng.uniform(0.55, 1.3, 12)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [points.round().astype(np.int32)], 1)
        canvas = (cv2.GaussianBlur(canvas.astype(np.float32), (0, 0), base / 6) > 0.5).astype(np.uint8)
    elif kind == "crack":
        x, y = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
        branches = [(x, y, rng.uniform(0, 2 * np.pi), int(rng.integers(18, 30)))]
        thickness = int(rng.integers(1, 3))
        while branches:
            x, y, heading, steps = branches.pop()
            for _ in range(steps):
                heading += rng.normal(0, 0.35)
                nx, ny = x + 3 * np.cos(heading), y + 3 * np.sin(heading)
                cv2.line(canvas, (int(x), int(y)), (int(nx), int(ny)), 1, thickness)
                x, y = float(np.clip(nx, 0, width - 1)), float(np.clip(ny, 0, height - 1))
                if rng.random() < 0.06 and len(branches) < 3:
                    branches.append((x, y, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), steps // 2))
    else:  # pragma: no cover - kinds are fixed
        raise ValueError(kind)
    return canvas


class SyntheticDefectGenerator:
    """Deterministic generator of ``(image, mask)`` pairs.

    Args:
        num_images: how many images the dataset has.
        image_size: ``(height, width)`` of every image.
        num_defect_classes: K, the number of defect classes (background excluded).
        defect_free_fraction: share of images with no defect.
        class_weights: relative frequency of each defect class among defective images;
            ``None`` gives a skewed default (60/25/10/5 % for four classes).
        seed: the seed; the same seed and index always give the same pair.
    """

    def __init__(
        self,
        num_images: int,
        image_size: tuple[int, int],
        num_defect_classes: int,
        defect_free_fraction: float,
        class_weights: Sequence[float] | None,
        seed: int,
    ) -> None:
        self.num_images = num_images
        self.image_size = image_size
        self.num_defect_classes = num_defect_classes
        self.defect_free_fraction = defect_free_fraction
        if class_weights is None:
            defaults = [0.6, 0.25, 0.1, 0.05]
            class_weights = (
                defaults if num_defect_classes == 4 else [0.5**k for k in range(num_defect_classes)]
            )
        weights = np.asarray(class_weights, dtype=np.float64)
        self.class_probs = weights / weights.sum()
        self.seed = seed

    def label_of(self, index: int) -> int:
        """The defect class of image ``index`` (0 for defect-free)."""
        rng = _rng(self.seed, index, 0)
        if rng.random() < self.defect_free_fraction:
            return 0
        return int(rng.choice(self.num_defect_classes, p=self.class_probs)) + 1

    def mask(self, index: int) -> np.ndarray:
        """The ``uint8`` class mask of image ``index``."""
        label = self.label_of(index)
        mask = np.zeros(self.image_size, np.uint8)
        if label:
            kind = KINDS[(label - 1) % len(KINDS)]
            region = _defect_shapes(kind, self.image_size, _rng(self.seed, index, 1))
            mask[region > 0] = label
        return mask

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image uint8 (H, W), mask uint8 (H, W))`` of image ``index``."""
        height, width = self.image_size
        rng = _rng(self.seed, index, 2)
        base = rng.uniform(90, 150)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        gx, gy = rng.uniform(-25, 25, 2)
        illumination = gx * (xx / width - 0.5) + gy * (yy / height - 0.5)
        cx, cy, spread = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.3, 0.8) * width
        illumination += rng.uniform(-15, 15) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * spread**2))
        grain = rng.normal(0, 1, (height, width)).astype(np.float32)
        streak = int(rng.integers(7, 21))
        grain = cv2.blur(grain, (streak, 1) if rng.random() < 0.5 else (1, streak)) * rng.uniform(6, 12)
        noise = rng.normal(0, rng.uniform(2, 5), (height, width)).astype(np.float32)
        surface = base + illumination + grain + noise
        mask = self.mask(index)
        label = int(mask.max())
        if label:
            kind = KINDS[(label - 1) % len(KINDS)]
            flip = -1.0 if (label - 1) // len(KINDS) % 2 else 1.0
            region = (mask > 0).astype(np.float32)
            if kind == "scratch":
                delta = rng.choice([-1.0, 1.0]) * rng.uniform(30, 45)
                shade = cv2.GaussianBlur(region, (3, 3), 0.6)
            elif kind == "pit":
                delta = -rng.uniform(45, 70)
                shade = cv2.GaussianBlur(region, (3, 3), 0.8)
            elif kind == "stain":
                delta = -rng.uniform(22, 35)
                shade = cv2.GaussianBlur(region, (0, 0), 1.5)
            else:
                delta = -rng.uniform(50, 75)
                shade = cv2.GaussianBlur(region, (3, 3), 0.6)
            surface = surface + flip * delta * np.maximum(shade, region * 0.85)
        image = np.clip(surface, 0, 255).round().astype(np.uint8)
        return image, mask


class SyntheticDefectsDataModule(DefectDataModule):
    """Procedurally generated textured surfaces with K imbalanced defect classes.

    The default: 400 images of 128x128, 60 % defect-free, four defect classes (scratch, pit,
    stain, crack) in 60/25/10/5 % of the defective images, defect areas from well under 0.5 %
    of the image (pits, scratches) to about a quarter of it (stains). Nothing is downloaded or
    written to disk.

    Args:
        num_images: images in the whole dataset (split into train/val/test).
        image_size: side of the square images, or ``(height, width)``.
        num_defect_classes: K, defect classes (background excluded).
        defect_free_fraction: share of images with no defect.
        class_weights: relative frequency of each defect class among defective images.
        generator_seed: seed of the generator (the split has its own ``seed``).
        **kwargs: the :class:`~defectseg.data.base.DefectDataModule` arguments
            (``batch_size``, ``num_workers``, ``augment``...).
    """

    CACHE_METADATA = False

    def __init__(
        self,
        num_images: int = 400,
        image_size: int | tuple[int, int] = 128,
        num_defect_classes: int = 4,
        defect_free_fraction: float = 0.6,
        class_weights: list[float] | None = None,
        generator_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if num_images < 3:
            raise ValueError(f"num_images must be >= 3 (train, val and test), got {num_images}")
        if num_defect_classes < 1:
            raise ValueError(f"num_defect_classes must be >= 1, got {num_defect_classes}")
        if not 0.0 <= defect_free_fraction < 1.0:
            raise ValueError(f"defect_free_fraction must be in [0, 1), got {defect_free_fraction}")
        if class_weights is not None and (
            len(class_weights) != num_defect_classes or min(class_weights) < 0 or sum(class_weights) <= 0
        ):
            raise ValueError(
                f"class_weights must hold {num_defect_classes} non-negative values (one per defect "
                f"class) with a positive sum; got {class_weights}"
            )
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        kwargs.setdefault("split", "stratified")
        kwargs.pop("root", None)
        super().__init__(root=None, **kwargs)
        self.generator = SyntheticDefectGenerator(
            num_images, size, num_defect_classes, defect_free_fraction, class_weights, generator_seed
        )
        self.num_images = num_images
        self.num_defect_classes = num_defect_classes
        self.generated_size = size

    @property
    def class_names(self) -> list[str]:
        names = ["background"]
        for k in range(self.num_defect_classes):
            kind = KINDS[k % len(KINDS)]
            names.append(kind if k < len(KINDS) else f"{kind}_{k // len(KINDS) + 1}")
        return names

    def scan(self) -> list[Sample]:
        height, width = self.generated_size
        samples = []
        for index in range(self.num_images):
            mask = self.generator.mask(index)
            samples.append(
                Sample(
                    image=f"synthetic://{index}",
                    pixel_counts=count_pixels(mask, self.num_classes),
                    num_pixels=height * width,
                    extra={"index": index},
                )
            )
        return samples

    def load_sample(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        return self.generator(int(sample.extra["index"]))

    def sample_loader(self):
        return _GeneratorLoader(self.generator)


class _GeneratorLoader:
    """Picklable loader that carries only the generator (not the whole datamodule)."""

    def __init__(self, generator: SyntheticDefectGenerator) -> None:
        self.generator = generator

    def __call__(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        return self.generator(int(sample.extra["index"]))
