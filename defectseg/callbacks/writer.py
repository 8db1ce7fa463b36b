"""Write predicted masks and colour overlays to disk, at each image's original size."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from defectseg.utils.visualize import denormalize, overlay


def _stem(path: str) -> str:
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}_{rest.replace('/', '_')}"
    return Path(path).stem


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


def restore_size(mask: np.ndarray, valid_size: tuple[int, int], orig_size: tuple[int, int]) -> np.ndarray:
    """Crop the padding off a predicted mask and resize it back to the original image size."""
    height, width = valid_size
    mask = mask[:height, :width]
    if (height, width) != tuple(orig_size):
        mask = cv2.resize(mask, (orig_size[1], orig_size[0]), interpolation=cv2.INTER_NEAREST)
    return mask


class PredictionWriter(BasePredictionWriter):
    """Write ``<stem>_mask.png`` (class indices) and ``<stem>_overlay.png`` for each image.

    Both are written at the image's original size. Existing files are never overwritten unless
    ``overwrite`` is true: the run stops with an error naming the first file that exists.

    Args:
        output_dir: folder for the PNGs (created if missing).
        overwrite: replace existing files.
    """

    def __init__(self, output_dir: str, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def targets(self, path: str) -> tuple[Path, Path]:
        """The mask and overlay files written for the image at ``path``."""
        stem = _stem(path)
        return self.output_dir / f"{stem}_mask.png", self.output_dir / f"{stem}_overlay.png"

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        paths = batch["path"]
        files = [self.targets(p) for p in paths]
        if not self.overwrite:
            for pair in files:
                for file in pair:
                    if file.exists():
                        raise FileExistsError(
                            f"{file} already exists; choose another output folder or pass "
                            "--overwrite true to replace existing predictions"
                        )
        num_classes = getattr(pl_module, "num_classes", 2)
        dm = trainer.datamodule
        for i, path in enumerate(paths):
            orig = tuple(int(v) for v in batch["orig_size"][i])
            valid = tuple(int(v) for v in batch["valid_size"][i])
            mask = restore_size(prediction["mask"][i].cpu().numpy().astype(np.uint8), valid, orig)
            if os.path.isfile(path):
                from defectseg.data.io import read_image

                image = read_image(path)
            else:
                image = denormalize(batch["image"][i][:, : valid[0], : valid[1]], dm.mean, dm.std)
                image = restore_size(image, valid, orig)
            mask_file, overlay_file = files[i]
            write_png(mask_file, mask)
            write_png(overlay_file, overlay(image, mask, num_classes), rgb=True)
