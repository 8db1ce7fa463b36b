"""Write tiny datasets in the exact layouts the real ones ship in, for tests.

Each ``make_*`` function writes a few small images (32-64 px) with rectangular or elliptic
defects under ``root`` and returns a list of :class:`FakeImage`, one per image written, with
the class mask a correct reader must produce (``target``). Tests compare what a datamodule
loads with these targets, and compute expected statistics from them with plain numpy.

Usage (pytest's ``tmp_path``)::

    from helpers.fake_data import make_magnetic_tile

    fakes = make_magnetic_tile(tmp_path / "mt")
    dm = MagneticTileDataModule(root=str(tmp_path / "mt"))

Layouts written:

* :func:`make_magnetic_tile` -- ``MT_<Class>/Imgs/<stem>.jpg`` + ``<stem>.png`` (anti-aliased
  0..255 masks, images of varying size; optional empty masks in ``MT_Uneven``).
* :func:`make_neu_seg` -- ``images/{training,test}/*.jpg`` + ``annotations/...png`` (values
  0..3), with 90/180/270-degree rotated copies in training and test images that are rotated
  copies of training images (``FakeImage.group`` names the base scene).
* :func:`make_kolektor` -- ``{train,test}/<id>.png`` + ``<id>_GT.png`` (empty GT = good).
* :func:`make_dagm` -- ``Class<n>/{Train,Test}/<id>.PNG`` + ``Label/Labels.txt`` (header line,
  tab-separated, CRLF) + ``Label/<id>_label.PNG``.
* :func:`make_severstal` -- ``train_images/*.jpg`` + ``train.csv`` in the new
  (``ImageId,ClassId,EncodedPixels``) or old (``ImageId_ClassId,EncodedPixels``) layout, with
  1-indexed column-major run-length encoding.
* :func:`make_folder` -- a user's folder: ``images/`` and ``masks/`` (or masks beside the
  images), any mask name pattern, optional class subfolders, dotfiles and non-image files.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

MT_CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
NEU_CLASSES = ("inclusion", "patches", "scratches")


@dataclass
class FakeImage:
    """One image written by a ``make_*`` helper.

    Attributes:
        image: the image file.
        mask: the mask file, or ``None`` when none was written.
        target: the class mask (``uint8`` ``(H, W)``, 0 background, ``1..K``) that reading
            ``image`` must give.
        split: the official split (``train``/``test``) for formats that have one.
        label: the class given by the image's folder, for folder-labelled formats.
        group: the base scene of near-duplicate images (NEU-Seg).
    """

    image: Path
    mask: Path | None
    target: np.ndarray
    split: str | None = None
    label: int | None = None
    group: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the image."""
        return tuple(self.target.shape)


def write_image(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (gray ``(H, W)`` or RGB ``(H, W, 3)``) to ``path``, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 98] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), array, params):
        raise OSError(f"could not write {path}")
    return path


def smooth_image(rng: np.random.Generator, size: tuple[int, int], channels: int = 1) -> np.ndarray:
    """A smooth random texture (compresses well, so JPEG copies stay near-identical)."""
    height, width = size
    low = rng.uniform(40, 200, (6, 6, channels)).astype(np.float32)
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image, 0, 255).round().astype(np.uint8)
    return image if channels > 1 else image.reshape(height, width)


def random_box(rng: np.random.Generator, size: tuple[int, int]) -> tuple[slice, slice]:
    """A random rectangle (rows, cols) inside ``size``, 3 to half the side long."""
    height, width = size
    h = int(rng.integers(3, max(4, height // 2)))
    w = int(rng.integers(3, max(4, width // 2)))
    top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
    return slice(top, top + h), slice(left, left + w)


def make_magnetic_tile(
    root: str | Path,
    counts: dict[str, int] | None = None,
    empty_uneven: int = 1,
    seed: int = 0,
) -> list[FakeImage]:
    """Magnetic Tile layout: ``MT_<Class>/Imgs/<stem>.jpg`` with ``<stem>.png`` beside it.

    Defect masks are a 255 rectangle inside a ring of 100 (anti-aliasing that binarising at
    >127 must drop). Image sizes vary. ``MT_Free`` masks are all zero. All six ``MT_*/Imgs``
    folders are created, empty for classes not in ``counts``.

    Args:
        root: the dataset folder to create.
        counts: images per folder name (``Blowhole``... ``Free``); default 3 per defect class
            and 4 Free.
        empty_uneven: how many ``MT_Uneven`` images get an empty mask (their target is empty).
        seed: random seed.
    """
    root = Path(root)
    counts = {**{name: 3 for name in MT_CLASSES}, "Free": 4} if counts is None else counts
    rng = np.random.default_rng(seed)
    sizes = [(40, 32), (36, 52), (48, 40), (44, 30)]
    fakes = []
    for name in (*MT_CLASSES, "Free"):  # the release has every folder, even where count is 0
        (root / f"MT_{name}" / "Imgs").mkdir(parents=True, exist_ok=True)
    for name, count in counts.items():
        label = MT_CLASSES.index(name) + 1 if name in MT_CLASSES else 0
        for i in range(count):
            size = sizes[i % len(sizes)]
            stem = f"exp{label}_num_{1000 + i}"
            folder = root / f"MT_{name}" / "Imgs"
            raw = np.zeros(size, np.uint8)
            target = np.zeros(size, np.uint8)
            if label and not (name == "Uneven" and i < empty_uneven):
                rows, cols = random_box(rng, (size[0] - 2, size[1] - 2))
                rows, cols = slice(rows.start + 1, rows.stop + 1), slice(cols.start + 1, cols.stop + 1)
                raw[rows.start - 1 : rows.stop + 1, cols.start - 1 : cols.stop + 1] = 100
                raw[rows, cols] = 255
                target[rows, cols] = label
            image = write_image(folder / f"{stem}.jpg", smooth_image(rng, size))
            mask = write_image(folder / f"{stem}.png", raw)
            fakes.append(FakeImage(image, mask, target, label=label))
    return fakes


def make_neu_seg(
    root: str | Path,
    num_scenes: int = 6,
    test_copies: int = 2,
    test_unique: int = 2,
    size: int = 48,
    seed: int = 0,
) -> list[FakeImage]:
    """NEU-Seg layout with the release's leak: rotated copies in training and in test.

    Each of ``num_scenes`` scenes is written to ``images/training`` at 0, 90, 180 and 270
    degrees; the first ``test_copies`` scenes also get a rotated copy in ``images/test``;
    ``test_unique`` more scenes appear in test only. Masks (``annotations/...``) hold 0 and the
    scene's class (1 inclusion, 2 patches, 3 scratches, cycling); one scene holds two classes.
    ``FakeImage.group`` is the scene id.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    fakes: list[FakeImage] = []
    counter = {"training": 0, "test": 0}

    def write(part: str, image: np.ndarray, target: np.ndarray, group: str) -> None:
        counter[part] += 1
        stem = f"{counter[part] + (0 if part == 'test' else 200):06d}"
        path = write_image(root / "images" / part / f"{stem}.jpg", np.repeat(image[..., None], 3, 2))
        mask = write_image(root / "annotations" / part / f"{stem}.png", target)
        split = "train" if part == "training" else "test"
        fakes.append(FakeImage(path, mask, target, split=split, group=group))

    for scene in range(num_scenes + test_unique):
        image = smooth_image(rng, (size, size))
        target = np.zeros((size, size), np.uint8)
        target[random_box(rng, (size, size))] = scene % 3 + 1
        if scene == 1:
            target[random_box(rng, (size, size))] = 3
        group = f"scene{scene}"
        if scene >= num_scenes:
            write("test", image, target, group)
            continue
        for turns in range(4):
            write("training", np.rot90(image, turns).copy(), np.rot90(target, turns).copy(), group)
        if scene < test_copies:
            write("test", np.rot90(image, scene + 1).copy(), np.rot90(target, scene + 1).copy(), group)
    return fakes


def make_kolektor(
    root: str | Path,
    defective: dict[str, int] | None = None,
    good: dict[str, int] | None = None,
    seed: int = 0,
) -> list[FakeImage]:
    """KolektorSDD2 layout: ``{train,test}/<id>.png`` (RGB) and ``<id>_GT.png`` (0/255).

    Args:
        defective: defective images per part; default 3 train, 2 test.
        good: defect-free images (empty GT) per part; default 4 train, 2 test.
    """
    root = Path(root)
    defective = defective or {"train": 3, "test": 2}
    good = good or {"train": 4, "test": 2}
    rng = np.random.default_rng(seed)
    fakes, number = [], 10000
    for part in ("train", "test"):
        for i in range(defective.get(part, 0) + good.get(part, 0)):
            size = (48 + 4 * (i % 2), 24)
            target = np.zeros(size, np.uint8)
            if i < defective.get(part, 0):
                target[random_box(rng, size)] = 1
            image = write_image(root / part / f"{number}.png", smooth_image(rng, size, channels=3))
            mask = write_image(root / part / f"{number}_GT.png", target * 255)
            fakes.append(FakeImage(image, mask, target, split=part))
            number += 1
    return fakes


def make_dagm(
    root: str | Path,
    classes: tuple[int, ...] = (1, 2),
    defective: int = 2,
    good: int = 3,
    size: int = 32,
    seed: int = 0,
) -> list[FakeImage]:
    """DAGM 2007 layout: ``Class<n>/{Train,Test}/<id>.PNG`` listed in ``Label/Labels.txt``.

    ``Labels.txt`` has a header line, then ``id<TAB>flag<TAB>image<TAB>0<TAB>label or 0``
    rows with Windows (CRLF) line endings. Defects are ellipses in ``<id>_label.PNG`` (0/255).
    ``FakeImage.label`` and the defect pixels of ``target`` hold the texture class number
    (1..10): the class index when all ten classes are selected (remap for a subset).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    fakes = []
    for number in classes:
        for part in ("Train", "Test"):
            folder = root / f"Class{number}" / part
            lines = ["1"]
            for i in range(defective + good):
                stem = f"{i + 1:04d}"
                target = np.zeros((size, size), np.uint8)
                mask = None
                if i < defective:
                    center = (int(rng.integers(8, size - 8)), int(rng.integers(8, size - 8)))
                    cv2.ellipse(target, center, (6, 3), float(rng.uniform(0, 180)), 0, 360, number, -1)
                    mask = write_image(folder / "Label" / f"{stem}_label.PNG", (target > 0).astype(np.uint8) * 255)
                image = write_image(folder / f"{stem}.PNG", smooth_image(rng, (size, size)))
                lines.append(f"{i + 1}\t{int(mask is not None)}\t{stem}.PNG\t0\t{mask.name if mask else 0}")
                fakes.append(FakeImage(image, mask, target, split=part.lower(), label=number))
            (folder / "Label").mkdir(parents=True, exist_ok=True)
            (folder / "Label" / "Labels.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return fakes


def encode_rle_column_major(mask: np.ndarray) -> str:
    """1-indexed, column-major ``start length`` runs of the true pixels of ``mask`` (plain loop)."""
    height, width = mask.shape
    runs, start = [], None
    for index in range(height * width):
        on = bool(mask[index % height, index // height])
        if on and start is None:
            start = index
        elif not on and start is not None:
            runs += [start + 1, index - start]
            start = None
    if start is not None:
        runs += [start + 1, height * width - start]
    return " ".join(map(str, runs))


def make_severstal(
    root: str | Path,
    layout: str = "new",
    num_images: int = 8,
    size: tuple[int, int] = (16, 40),
    seed: int = 0,
) -> list[FakeImage]:
    """Severstal layout: ``train_images/<id>.jpg`` and ``train.csv`` with run-length encodings.

    ``layout="new"`` writes ``ImageId,ClassId,EncodedPixels`` rows for defects only;
    ``layout="old"`` writes ``ImageId_ClassId,EncodedPixels`` rows for every image and class
    (empty when absent). Image ``i`` holds class ``i % 5`` (0: defect-free); image 1 also holds
    class 4 in a separate box. Real images are 1600x256; these are ``size`` (height, width).
    """
    if layout not in ("new", "old"):
        raise ValueError(f"layout must be 'new' or 'old', got {layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    fakes, rows = [], []
    for i in range(num_images):
        name = f"{i:04x}abcd.jpg"
        target = np.zeros(size, np.uint8)
        per_class: dict[int, np.ndarray] = {}
        classes = [i % 5] if i % 5 else []
        if i == 1:
            classes.append(4)
        for j, class_id in enumerate(classes):
            region = np.zeros(size, bool)
            half = size[1] // 2
            box = random_box(rng, (size[0], half))
            region[box[0], slice(box[1].start + j * half, box[1].stop + j * half)] = True
            per_class[class_id] = region
            target[region] = class_id
        image = write_image(root / "train_images" / name, smooth_image(rng, size))
        fakes.append(FakeImage(image, None, target))
        for class_id in range(1, 5):
            rle = encode_rle_column_major(per_class[class_id]) if class_id in per_class else ""
            if layout == "old":
                rows.append([f"{name}_{class_id}", rle])
            elif rle:
                rows.append([name, str(class_id), rle])
    with (root / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId_ClassId", "EncodedPixels"] if layout == "old" else ["ImageId", "ClassId", "EncodedPixels"])
        writer.writerows(rows)
    return fakes


def make_folder(
    root: str | Path,
    num_images: int = 6,
    image_dir: str = "images",
    mask_dir: str | None = "masks",
    pattern: str = "{stem}.png",
    image_ext: str = ".png",
    mask_values: tuple[int, ...] = (255,),
    classes: tuple[str, ...] | None = None,
    nested: bool = False,
    without_mask: int = 0,
    junk: bool = True,
    size: tuple[int, int] = (32, 40),
    seed: int = 0,
) -> list[FakeImage]:
    """A user's folder: images under ``root/image_dir``, masks named by ``pattern``.

    Args:
        root: the dataset folder to create.
        num_images: images written (per class subfolder when ``classes`` is given).
        image_dir: image folder under ``root`` (``.`` for root itself).
        mask_dir: mask folder under ``root``, or ``None`` for masks beside the images.
        pattern: mask file name with ``{stem}`` (``{stem}.png``, ``{stem}_GT.png``...).
        image_ext: extension of the images.
        mask_values: stored value of each class; image ``i`` uses ``mask_values[i % len]``
            and its target is that value's position + 1. Every third image is defect-free
            (all-zero mask).
        classes: write images into these subfolders; the class is the subfolder's position
            + 1 (the mask stores ``mask_values[0]``).
        nested: put the images (and masks) of each folder under an extra ``batch<k>/`` level.
        without_mask: the last this many images get no mask file (target all zero).
        junk: also write a dotfile and a text file next to the images (to be ignored).
    """
    if mask_dir is None and pattern.format(stem="x") == f"x{image_ext}":
        raise ValueError(f"masks beside the images need a pattern other than '{{stem}}{image_ext}'")
    root = Path(root)
    rng = np.random.default_rng(seed)
    fakes = []
    folders = list(classes) if classes else [""]
    for c, folder in enumerate(folders):
        for i in range(num_images):
            sub = Path(folder) / (f"batch{i % 2}" if nested else "")
            stem = f"part_{c}_{i:03d}"
            value_index = 0 if classes else i % len(mask_values)
            target = np.zeros(size, np.uint8)
            raw = np.zeros(size, np.uint8)
            if i % 3 != 2:
                box = random_box(rng, size)
                raw[box] = mask_values[value_index]
                target[box] = (c + 1) if classes else value_index + 1
            image_path = write_image(root / image_dir / sub / f"{stem}{image_ext}", smooth_image(rng, size))
            mask_path = None
            if i < num_images - without_mask:
                base = root / (mask_dir if mask_dir is not None else image_dir) / sub
                mask_path = write_image(base / pattern.format(stem=stem), raw)
            else:
                target[:] = 0
            fakes.append(FakeImage(image_path, mask_path, target, label=c + 1 if classes else None))
    if junk:
        (root / image_dir / ".DS_Store").write_bytes(b"\x00\x01junk")
        (root / image_dir / "notes.txt").write_text("not an image\n")
    return fakes
