"""Log a few validation images with ground-truth and predicted masks to Weights & Biases."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from defectseg.utils.visualize import denormalize


class LogValidationSamples(Callback):
    """Each validation epoch, log the first ``num_images`` images with their masks to W&B.

    Images are logged under ``val/samples`` as ``wandb.Image`` objects with two mask layers,
    ``ground_truth`` and ``prediction``, so the W&B UI can toggle them. Loggers other than
    :class:`~lightning.pytorch.loggers.WandbLogger` are left alone.

    Args:
        num_images: images logged per epoch (0 turns it off).
    """

    def __init__(self, num_images: int = 4) -> None:
        super().__init__()
        self.num_images = num_images
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

        labels = dict(enumerate(getattr(pl_module, "class_names", [])))
        images = []
        for item in self._pending:
            mask = item["mask"].copy()
            mask[mask == 255] = 0
            images.append(
                wandb.Image(
                    item["image"].squeeze(),
                    caption=item["path"],
                    masks={
                        "ground_truth": {"mask_data": mask, "class_labels": labels},
                        "prediction": {"mask_data": item["pred"], "class_labels": labels},
                    },
                )
            )
        logger.experiment.log({"val/samples": images, "trainer/global_step": trainer.global_step})
        self._pending = []
