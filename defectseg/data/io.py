"""Reading images and masks: the one place that turns files into arrays.

Training (every datamodule), the semi-supervised pool and inference (``defectseg infer``, the
:class:`~defectseg.inference.Predictor`) all list and decode files here, so a dataset that trains
is a dataset that predicts: one list of image extensions (:data:`IMAGE_EXTENSIONS`), one decoder
with errors that name the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from defectseg.data.bit_depth import BitDepth, to_uint8

#: File extensions read as images, compared case-insensitively (training and inference alike).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of the :data:`IMAGE_EXTENSIONS` (and is not a dotfile)."""
    name = os.path.basename(str(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder``, sorted.

    Dotfiles and dot-folders (``.DS_Store``, ``.ipynb_checkpoints``...) and files whose
    extension is not in :data:`IMAGE_EXTENSIONS` are ignored.

    Args:
        folder: the folder to list; a missing folder gives an empty list.
        recursive: descend into subfolders.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in filenames:
            if is_image_file(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image read from its header only (no decoding).

    Raises:
        ValueError: naming the file when it is empty, corrupt or not an image.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read {path}: the file is empty, corrupt or not an image ({err})") from err
    return int(height), int(width)



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


def read_image(
    path: str | os.PathLike,
    flags: int = cv2.IMREAD_UNCHANGED,
    bit_depth: BitDepth | str | int = "auto",
    warned: set[int] | None = None,
) -> np.ndarray:
    """Decode an image file with OpenCV, raising a clear error for unreadable files.

    Files of more than 8 bits are scaled by their ``bit_depth`` (``"auto"``: from the file's
    largest value, with one warning per depth found when ``warned`` is a set kept by the caller;
    see :func:`defectseg.data.bit_depth.to_uint8`): 12-bit camera data in a 16-bit file keeps its
    contrast instead of being divided by 257.

    Returns ``uint8`` arrays: ``(H, W)`` for grayscale, ``(H, W, 3)`` RGB for colour (alpha dropped).

    Raises:
        FileNotFoundError: the file cannot be opened.
        ValueError: the file cannot be decoded, or a value is above ``bit_depth`` (naming it).
    """
    path = str(path)
    image = to_uint8(_decode_file(path, flags), bit_depth, source=path, warned=warned)
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



def scan_workers() -> int:
    """Threads used to measure samples (file reads and PNG decoding release the GIL)."""
    return max(1, min(8, os.cpu_count() or 1))


def parallel_map(function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[function(x) for x in items]`` in a thread pool; the first error (in order) is raised."""
    if len(items) < 16:
        return [function(item) for item in items]
    with ThreadPoolExecutor(scan_workers()) as pool:
        return list(pool.map(function, items))

