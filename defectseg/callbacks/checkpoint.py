"""A ModelCheckpoint that also writes ``last.ckpt`` when training is interrupted."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class ResumableCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that keeps an up-to-date last checkpoint.

    Besides the usual best-k checkpoints, ``last.ckpt`` is written after every validation and
    also when the run stops on an exception or Ctrl-C, at the step where it stopped, so
    ``defectseg fit ... --ckpt_path last`` resumes exactly there.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        super().__init__(*args, **kwargs)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or trainer.fast_dev_run or not self.save_last:
            return
        monitor_candidates = self._monitor_candidates(trainer)
        self._save_last_checkpoint(trainer, monitor_candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke test writes nothing (Lightning 2.6 would save last.ckpt)
            return
        super().on_train_end(trainer, pl_module)
