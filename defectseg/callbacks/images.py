"""Log a few validation images with ground-truth and predicted masks to Weights & Biases."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from defectseg.utils.visualize import denormalize


class LogValidationSamples(Callback):
    """Each validation epoch, log the first ``num_images`` images with their masks to W&B.

    Images are logged under ``val/samples`` as ``wandb.Image`` objects with two mask layers,
    ``ground_truth`` and ``prediction``, so the W&B UI can toggle them. Loggers other than
    :class:`~lightning.pytorch.loggers.WandbLogger` are left alone.

    With ``table``, the same images also go to a ``val/predictions`` table: epoch, file, the
    image, the image with its ground truth, the image with the prediction, and the per-image
    defect IoU (:func:`image_defect_iou`), so the worst images can be sorted to the top.

    Args:
        num_images: images logged per epoch (0 turns it off).
        table: also log the ``val/predictions`` table.
    """

    def __init__(self, num_images: int = 4, table: bool = True) -> None:
        super().__init__()
        self.num_images = num_images
        self.table = table
        self._pending: list[dict[str, Any]] = []

    def _wandb(self, trainer: L.Trainer) -> WandbLogger | None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                return logger
        return None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or len(self._pending) >= self.num_images or not trainer.is_global_zero:
            return
        if self._wandb(trainer) is None or not isinstance(outputs, dict) or "preds" not in outputs:
            return
        dm = trainer.datamodule
        mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
        if mean is None or std is None:
            return
        for i in range(min(len(batch["path"]), self.num_images - len(self._pending))):
            height, width = (int(v) for v in batch["valid_size"][i])
            self._pending.append(
                {
                    "image": denormalize(batch["image"][i][:, :height, :width], mean, std),
                    "mask": batch["mask"][i][:height, :width].cpu().numpy(),
                    "pred": outputs["preds"][i][:height, :width].cpu().numpy(),
                    "path": batch["path"][i],
                }
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._wandb(trainer)
        if logger is None or not self._pending or not trainer.is_global_zero:
            return
        import wandb

        names = list(getattr(pl_module, "class_names", []))
        labels = dict(enumerate(names))
        images, rows = [], []
        for item in self._pending:
            mask = item["mask"].copy()
            mask[mask == 255] = 0
            ground_truth = {"mask_data": mask, "class_labels": labels}
            prediction = {"mask_data": item["pred"], "class_labels": labels}
            image = item["image"].squeeze()
            images.append(
                wandb.Image(image, caption=item["path"], masks={"ground_truth": ground_truth, "prediction": prediction})
            )
            if self.table:
                rows.append([
                    trainer.current_epoch,
                    str(item["path"]),
                    wandb.Image(image),
                    wandb.Image(image, masks={"ground_truth": ground_truth}),
                    wandb.Image(image, masks={"prediction": prediction}),
                    image_defect_iou(item["mask"], item["pred"], max(len(names), 2)),
                ])
        logged: dict[str, Any] = {"val/samples": images, "trainer/global_step": trainer.global_step}
        if rows:
            columns = ["epoch", "file", "image", "ground_truth", "prediction", "defect_iou"]
            logged["val/predictions"] = wandb.Table(columns=columns, data=rows)
        logger.experiment.log(logged)
        self._pending = []


def image_defect_iou(mask: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> float | None:
    """Mean IoU of one image over the defect classes (``1..num_classes-1``) present in its
    ground truth or its prediction; pixels equal to ``ignore_index`` are left out.

    Returns:
        The mean IoU, or ``None`` when neither holds a defect (nothing to score).
    """
    valid = mask != ignore_index
    scores = []
    for k in range(1, num_classes):
        truth, guess = (mask == k) & valid, (pred == k) & valid
        union = int(np.count_nonzero(truth | guess))
        if union:
            scores.append(np.count_nonzero(truth & guess) / union)
    return float(np.mean(scores)) if scores else None
