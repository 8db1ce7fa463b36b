"""Weights & Biases extras: checkpoints as artifacts, a per-class IoU table, DLI count charts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger


def wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
    """The trainer's :class:`~lightning.pytorch.loggers.WandbLogger`, if any."""
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


class WandbExtras(Callback):
    """With a :class:`~lightning.pytorch.loggers.WandbLogger`, log what scalars cannot show.

    Without a W&B logger it does nothing. Offline runs keep everything in the run folder until
    ``wandb sync``.

    Args:
        log_checkpoints: at the end of ``fit``, log the best and the last checkpoint of each
            checkpoint callback as versions of a ``model-<run id>`` artifact (aliases ``best``
            and ``latest``), in offline mode too. Skipped when the logger has ``log_model`` set
            (it logs them itself).
        iou_table: after each validation, a ``val/iou_per_class`` table (epoch, class, IoU) and
            a bar chart ``val/iou_per_class_chart``.
        dli_chart: at the end of each training epoch with Dynamic Label Injection batches, a
            ``train/dli_counts`` table (step, stage, class, images per batch) and line charts
            ``train/dli_counts_before`` / ``train/dli_counts_after`` of the images holding each
            class in every batch, before and after injection.
    """

    def __init__(self, log_checkpoints: bool = True, iou_table: bool = True, dli_chart: bool = True) -> None:
        super().__init__()
        self.log_checkpoints = log_checkpoints
        self.iou_table = iou_table
        self.dli_chart = dli_chart
        self._dli_rows: list[tuple[int, list[float], list[float]]] = []

    # ------------------------------------------------------------------ per-class IoU
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = wandb_logger(trainer)
        if not self.iou_table or logger is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        import wandb

        metrics = trainer.callback_metrics
        rows = []
        for name in getattr(pl_module, "class_names", []):
            value = metrics.get(f"val/iou/{name}")
            value = float(value) if value is not None else None
            rows.append([trainer.current_epoch, name, None if value is None or math.isnan(value) else value])
        if not rows:
            return
        table = wandb.Table(columns=["epoch", "class", "iou"], data=rows)
        chart = wandb.plot.bar(table, "class", "iou", title=f"validation IoU per class (epoch {trainer.current_epoch})")
        logger.experiment.log(
            {"val/iou_per_class": table, "val/iou_per_class_chart": chart, "trainer/global_step": trainer.global_step}
        )

    # ------------------------------------------------------------------ DLI counts
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dli_rows = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.dli_chart or not isinstance(batch, dict) or "dli_counts" not in batch:
            return
        counts = batch["dli_counts"]
        if isinstance(counts, (list, tuple)):
            counts = torch.stack([torch.as_tensor(c) for c in counts])
        totals = counts.sum(dim=0).tolist()  # (2, classes): images per class before / after
        self._dli_rows.append((trainer.global_step, totals[0], totals[1]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = wandb_logger(trainer)
        if not self._dli_rows or logger is None or not trainer.is_global_zero:
            return
        import wandb

        names = ["defect_free", *getattr(pl_module, "class_names", [])[1:]]
        rows = [
            [step, stage, name, float(value)]
            for step, before, after in self._dli_rows
            for stage, values in (("before", before), ("after", after))
            for name, value in zip(names, values)
        ]
        steps = [step for step, _, _ in self._dli_rows]
        logged: dict[str, Any] = {
            "train/dli_counts": wandb.Table(columns=["step", "stage", "class", "images"], data=rows),
            "trainer/global_step": trainer.global_step,
        }
        for index, stage in ((1, "before"), (2, "after")):
            series = [[float(row[index][k]) for row in self._dli_rows] for k in range(len(names))]
            logged[f"train/dli_counts_{stage}"] = wandb.plot.line_series(
                xs=steps, ys=series, keys=names, xname="step",
                title=f"DLI: images holding each class per batch, {stage} injection",
            )
        logger.experiment.log(logged)
        self._dli_rows = []

    # ------------------------------------------------------------------ checkpoints
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = wandb_logger(trainer)
        if not self.log_checkpoints or logger is None or not trainer.is_global_zero or getattr(logger, "_log_model", False):
            return
        import wandb

        from defectseg.version import __version__

        run = logger.experiment
        for callback in trainer.checkpoint_callbacks:
            best, last = callback.best_model_path, callback.last_model_path
            files: dict[str, list[str]] = {}
            for path, alias in ((best, "best"), (last, "latest")):
                if path and Path(path).is_file():
                    files.setdefault(path, []).append(alias)
            for path, aliases in files.items():
                score = callback.best_model_score if "best" in aliases else None
                artifact = wandb.Artifact(
                    name=f"model-{run.id}",
                    type="model",
                    metadata={
                        "original_filename": Path(path).name,
                        "monitor": callback.monitor,
                        "score": float(score) if score is not None else None,
                        "epoch": trainer.current_epoch,
                        "defectseg_version": __version__,
                    },
                )
                artifact.add_file(path, name="model.ckpt")
                run.log_artifact(artifact, aliases=aliases)
