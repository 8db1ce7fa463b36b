"""A ModelCheckpoint that also writes ``last.ckpt`` when training is interrupted, and the
resolution of ``--ckpt_path best`` / ``last`` from a checkpoint folder in a new process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class ResumableCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that keeps an up-to-date last checkpoint.

    Besides the usual best-k checkpoints, ``last.ckpt`` is written after every validation (also
    when the monitored metric did not improve: Lightning 2.6 alone refreshes it only together with
    a best-k checkpoint, which left ``last.ckpt`` at the last improving epoch) and at the end of
    training, and, with ``save_on_exception`` (on by default), also when the run stops on an exception or
    Ctrl-C, at the step where it stopped, so ``defectseg fit ... --ckpt_path last`` resumes
    exactly there. That uses Lightning's own on-exception checkpointing, which also keeps the
    stopped state as ``interrupted-<epoch>-<step>.ckpt`` (not among the best checkpoints);
    nothing is saved when ``validate``/``test``/``predict`` fail.
    """

    #: File name (without ``.ckpt``) of the checkpoint saved when a fit stops on an exception.
    interrupted_filename = "interrupted-{epoch:03d}-{step}"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("save_on_exception", True)
        super().__init__(*args, **kwargs)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit":
            return
        filename, auto_insert = self.filename, self.auto_insert_metric_name
        # Lightning names the exception checkpoint like a best one; name it for what it is
        self.filename, self.auto_insert_metric_name = self.interrupted_filename, False
        try:
            super().on_exception(trainer, pl_module, exception)
        finally:
            self.filename, self.auto_insert_metric_name = filename, auto_insert

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def _refresh_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` unless it already holds this step (or nothing may be saved now)."""
        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != "fit"
            or getattr(self, "_last_saved_step", None) == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke test writes nothing (Lightning 2.6 would save last.ckpt)
            return
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)  # e.g. max_time stopped the run between two validations


def resolve_checkpoint(name: str, dirpath: str | os.PathLike | None) -> str:
    """The file that ``--ckpt_path best`` or ``last`` means in ``dirpath``, from a new process.

    ``last`` is ``last.ckpt`` (the newest ``last*.ckpt`` when Lightning versioned it); ``best``
    is the best model path that the checkpoint callback recorded in that last checkpoint, when
    the file still exists.

    Raises:
        FileNotFoundError: no folder configured, no last checkpoint, or the best one is gone;
            the message says what to pass instead.
    """
    if name not in ("best", "last"):
        raise ValueError(f"name must be 'best' or 'last', got {name!r}")
    if dirpath is None:
        raise FileNotFoundError(
            f"--ckpt_path {name} needs the checkpoint folder of the training run: set checkpoint.dirpath "
            "(as the fit config does) or give the checkpoint file"
        )
    folder = Path(dirpath)
    lasts = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not lasts:
        raise FileNotFoundError(
            f"--ckpt_path {name}: no last.ckpt in {folder} (checkpoint.dirpath); train first with "
            "defectseg fit and the same config, or give the checkpoint file"
        )
    last = lasts[-1]
    if name == "last":
        return str(last)
    state = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
    for value in state.values():  # keyed by the callback's class name and settings
        best = value.get("best_model_path") if isinstance(value, dict) else None
        if best:
            for candidate in (Path(best), folder / Path(best).name):  # the folder may have moved
                if candidate.is_file():
                    return str(candidate)
            raise FileNotFoundError(f"--ckpt_path best: {last} names {best} as the best checkpoint, but it is gone")
    raise FileNotFoundError(
        f"--ckpt_path best: {last} records no best checkpoint (no monitored metric was logged); "
        f"use --ckpt_path last or a checkpoint file"
    )
