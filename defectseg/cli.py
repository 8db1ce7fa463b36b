"""The ``defectseg`` command line: a LightningCLI with defect-segmentation defaults.

``defectseg fit|validate|test|predict --config CONFIG.yaml`` run the Lightning subcommands
with any :class:`~defectseg.models.SegmentationModule` subclass as ``model`` and any
:class:`~defectseg.data.DefectDataModule` subclass as ``data``. The datamodule's
``num_classes``, ``class_names``, ``in_channels``, ``mean`` and ``std`` are linked into the
model, so a config names them once.

Extra commands that are not Lightning subcommands (``stats``...) are registered in
:data:`EXTRA_COMMANDS`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import defectseg
from defectseg.callbacks import LogValidationSamples, PredictionWriter, ResumableCheckpoint
from defectseg.data.base import DefectDataModule
from defectseg.models.segmentation import SegmentationModule
from defectseg.utils.hardware import resolve_precision

#: Extra commands: name -> (one-line help, function taking the remaining argv).
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[list[str]], int | None]]] = {}


def register_command(name: str, help: str) -> Callable:
    """Register ``function(argv) -> exit code`` as ``defectseg <name>``."""

    def wrap(function: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
        EXTRA_COMMANDS[name] = (help, function)
        return function

    return wrap


class WandbConfigCallback(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` (replacing the one of an earlier run in the
    same folder) and store it in the W&B run's config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_check=True))
                logger.experiment.config.update(resolved, allow_val_change=True)


class DefectSegCLI(LightningCLI):
    """LightningCLI with links between data and model, a resumable checkpoint on
    ``val/miou_defect``, W&B sample images and a prediction writer for ``predict``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", WandbConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", "defectseg: imbalanced surface-defect segmentation.")
        super().__init__(SegmentationModule, DefectDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in (
            ("num_classes", "num_classes"),
            ("class_names", "class_names"),
            ("in_channels", "in_channels"),
            ("mean", "mean"),
            ("std", "std"),
        ):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/miou_defect",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LogValidationSamples, "image_logger")

    def before_instantiate_classes(self) -> None:
        """Fall back from bf16 where the hardware lacks it (one warning, see
        :func:`defectseg.utils.hardware.resolve_precision`)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer") if config is not None else None
        if trainer is not None and trainer.get("precision") is not None:
            trainer["precision"] = resolve_precision(trainer["precision"], trainer.get("accelerator", "auto"))

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument(
                "--output_dir", type=str | None, default=None,
                help="folder where <stem>_mask.png and <stem>_overlay.png are written",
            )
            parser.add_argument(
                "--overwrite", type=bool, default=False, help="replace existing prediction files"
            )
            parser.set_defaults(return_predictions=False)
        return parser

    def _check_ckpt_path(self, subcommand: str) -> None:
        """Stop with a clear message when ``--ckpt_path`` does not fit the configured model."""
        ckpt_path = self.config.get(subcommand, {}).get("ckpt_path")
        if not ckpt_path or not os.path.isfile(str(ckpt_path)):
            return
        from defectseg.inference.checkpoint import CheckpointError, check_checkpoint_matches

        try:
            check_checkpoint_matches(ckpt_path, self.model)
        except CheckpointError as err:
            raise SystemExit(f"defectseg {subcommand}: {err}") from None

    def before_validate(self) -> None:
        self._check_ckpt_path("validate")

    def before_test(self) -> None:
        self._check_ckpt_path("test")

    def before_predict(self) -> None:
        self._check_ckpt_path("predict")
        config = self.config.get("predict", self.config)
        output_dir = config.get("output_dir")
        if output_dir:
            self.trainer.callbacks.append(PredictionWriter(output_dir, overwrite=bool(config.get("overwrite"))))
        elif not any(isinstance(c, PredictionWriter) for c in self.trainer.callbacks):
            raise SystemExit(
                "defectseg predict needs --output_dir DIR (the folder where masks and overlays are written)"
            )

    def before_fit(self) -> None:
        ckpt_path = self.config.get("fit", {}).get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and not os.path.isfile(ckpt_path):
            raise SystemExit(f"--ckpt_path {ckpt_path!r} does not exist; give a checkpoint file or 'last'")


def _print_help() -> None:
    print("usage: defectseg {fit,validate,test,predict," + ",".join(EXTRA_COMMANDS) + "} ...")
    print("       defectseg --version\n")
    print("Lightning subcommands: fit, validate, test, predict (defectseg fit --help).")
    for name, (text, _) in EXTRA_COMMANDS.items():
        print(f"  {name:14s} {text}")


def _register_builtin_commands() -> None:
    """Import the modules that register extra commands."""
    import importlib

    for module in ("defectseg.commands",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def main(args: Sequence[str] | None = None) -> int | None:
    """Entry point of the ``defectseg`` command."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["--version"]:
        print(f"defectseg {defectseg.__version__}")
        return 0
    _register_builtin_commands()
    if argv[:1] == ["predict"] and "infer" in EXTRA_COMMANDS and any(
        a == "--input" or a.startswith("--input=") for a in argv[1:]
    ):
        # raw images with a checkpoint, no config: the same as ``defectseg infer``
        return EXTRA_COMMANDS["infer"][1](argv[1:])
    if argv[:1] and argv[0] in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[argv[0]][1](argv[1:])
    if argv[:1] in ([], ["-h"], ["--help"]) and EXTRA_COMMANDS:
        _print_help()
        if not argv:
            return 2
    # from the console LightningCLI reads sys.argv itself (given both, it warns on every run)
    DefectSegCLI(args=None if args is None else argv)
    return 0
