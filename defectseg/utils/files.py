"""Output files shared by the prediction writers (the Lightning callback and ``defectseg infer``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np


def write_png(path: str | os.PathLike, array: np.ndarray, rgb: bool = False) -> None:
    """Write ``array`` (class indices, gray or ``rgb`` colour ``uint8``) as a PNG file.

    Creates the parent folder; raises :class:`OSError` naming the file when OpenCV cannot write it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if rgb else array
    ok, encoded = cv2.imencode(".png", data)
    if not ok:
        raise OSError(f"cannot encode {path} as PNG (array {array.shape} {array.dtype})")
    encoded.tofile(str(path))


def existing_files(files: Iterable[str | os.PathLike]) -> list[Path]:
    """The files among ``files`` that already exist (outputs that must not be overwritten)."""
    return [Path(f) for f in files if Path(f).exists()]
