"""Tiny trainers for tests: a quiet ``L.Trainer`` and the ``trainer`` section of a CLI config.

Usage::

    from helpers.trainer import quiet_trainer, trainer_config

    quiet_trainer(tmp_path, max_steps=1).fit(model, data)
    config = {"trainer": trainer_config(tmp_path, limit_train_batches=2), "model": ..., "data": ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def trainer_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """The ``trainer`` section of a tiny ``defectseg fit`` config: CPU, one device, one epoch,
    CSV logs under ``tmp_path/logs``, no model summary, no progress bar; ``overrides`` win."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "log_every_n_steps": 1,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}},
        "enable_model_summary": False,
        "enable_progress_bar": False,
        **overrides,
    }


def quiet_trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    """A CPU ``L.Trainer`` in ``tmp_path`` without logger, checkpoints, progress bar or summary."""
    options = {
        "default_root_dir": tmp_path, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, **kwargs,
    }
    return L.Trainer(**options)
