"""Reading defectseg configs: the one parser of every command.

Every command that reads a config (``defectseg fit|validate|test|predict``, ``stats``,
``dli-preview``, ``compare``) parses it with the jsonargparse machinery of
:class:`DefectSegCLI` (a ``LightningCLI``), so they agree on everything:

* ``--config a.yaml --config b.yaml`` merges as ``defectseg fit --print_config`` shows;
* ``--section.key value`` overrides (``--data.init_args.num_images 50``) work everywhere;
* an unknown key (``data.init_args.num_imags``) stops with one paragraph that names the key and
  the closest valid names, exit code 2, no traceback (:class:`DefectSegArgumentParser`).

Library use::

    from defectseg.config import load_datamodule

    data = load_datamodule(["configs/quickstart.yaml", "--data.init_args.num_images", "50"])

:func:`merge_config` and :func:`set_dotted` are the plain-dict forms used for ``defectseg
compare``'s grid fragments (which are merged before they are parsed).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from defectseg.callbacks import (
    LogValidationSamples,
    PredictionWriter,
    ResumableCheckpoint,
    WandbExtras,
)
from defectseg.data.base import DefectDataModule
from defectseg.models.segmentation import SegmentationModule
from defectseg.utils.hardware import resolve_precision
from defectseg.utils.help import DefectSegArgumentParser as PlainHelpParser

# ---------------------------------------------------------------------------- plain dicts


def merge_config(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` over ``base`` as LightningCLI merges two config files (a new dict).

    Mappings merge key by key, a ``class_path`` different from the base's replaces the whole
    block, lists and scalars replace.
    """
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        current = out.get(key)
        if (
            isinstance(value, Mapping)
            and isinstance(current, dict)
            and not ("class_path" in value and value.get("class_path") != current.get("class_path"))
        ):
            out[key] = merge_config(current, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``config["a"]["b"]["c"] = value`` for ``dotted = "a.b.c"`` (creating mappings)."""
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def read_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """One YAML config file as a dict.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file does not hold a mapping.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with open(path) as handle:
        loaded = yaml.safe_load(handle.read()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} does not hold a mapping (key: value lines)")
    return loaded


_DOTTED_ITEM = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def overrides_to_args(overrides: Sequence[str]) -> list[str]:
    """``key.sub=value`` items (the older override form) as ``--key.sub value`` arguments;
    every other item (``--key.sub value``, ``--key.sub=value``, option values) passes unchanged."""
    args: list[str] = []
    for item in overrides:
        if _DOTTED_ITEM.match(item):
            key, value = item.split("=", 1)
            args += [f"--{key}", value]
        else:
            args.append(item)
    return args


# ---------------------------------------------------------------------------- errors
_NOT_ACCEPTED = re.compile(r"""Option '([^']+)' is not accepted""")
_UNRECOGNIZED = re.compile(r"""Unrecognized arguments:\s*(\S+)""")
_UNEXPECTED = re.compile(r"""Key "([^"]+)" is not expected""")
_GROUP = re.compile(r"""Group '([^']+)' does not accept option '([^']+)'""")
_PARSER_KEY = re.compile(r"""Parser key "([^"]+)\"""")
_CLASS_PATH = re.compile(r"""class_path '([^']+)'""")


def _class_parameters(class_path: str) -> list[str]:
    """``__init__`` parameter names of ``class_path`` and of the base classes it passes
    ``**kwargs`` to (``[]`` when the class cannot be imported)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # a class that does not import is reported by the parser itself
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


def _parser_keys(parser: Any) -> list[str]:
    """Every option key of ``parser`` (``trainer.max_epochs``, ``data``, ``ckpt_path``...)."""
    keys = []
    for action in parser._actions:
        dest = getattr(action, "dest", None)
        if dest and dest not in ("help", "config", "print_config") and not dest.startswith("__"):
            keys.append(dest)
        subcommands = getattr(action, "choices", None)
        if isinstance(subcommands, dict):
            for name, sub in subcommands.items():
                if hasattr(sub, "_actions"):
                    keys += [f"{name}.{key}" for key in _parser_keys(sub)]
    return keys


def unknown_key_message(parser: Any, message: str) -> str | None:
    """One paragraph for a parser ``message`` about an unknown key, or ``None`` for others.

    Names the key as a dotted path (``data.init_args.num_imags``), the closest valid names
    (``difflib``), and how to list every key.
    """
    group = _GROUP.search(message)
    found = group or _NOT_ACCEPTED.search(message) or _UNEXPECTED.search(message) or _UNRECOGNIZED.search(message)
    if found is None:
        return None
    key = f"{group.group(1)}.{group.group(2)}" if group else found.group(1).lstrip("-").split("=", 1)[0]
    section = _PARSER_KEY.search(message)
    class_path = _CLASS_PATH.search(message)
    if section and class_path and "." not in key:
        prefix = f"{section.group(1)}.init_args."
        candidates = [prefix + name for name in _class_parameters(class_path.group(1))]
        owner = f" ({class_path.group(1).rsplit('.', 1)[-1]} takes no such argument)"
        key = prefix + key
    else:
        candidates = _parser_keys(parser)
        if section and not key.startswith(section.group(1) + "."):
            key = f"{section.group(1)}.{key}"
        owner = ""
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close:  # compare the last part only (a typo in a long path)
        tail = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] in difflib.get_close_matches(
            tail, [c.rsplit(".", 1)[-1] for c in candidates], n=3, cutoff=0.6)][:3]
    hint = f"closest valid names: {', '.join(close)}" if close else "no valid name is close"
    prog = parser.prog.replace(" [options]", "")
    return (
        f"{prog}: error: unknown key '{key}'{owner}; {hint}. Correct the key in the config file "
        f"or on the command line; `{prog} --help` lists every key."
    )


class DefectSegArgumentParser(PlainHelpParser):
    """The LightningCLI parser of every command: help without reST markup
    (:mod:`defectseg.utils.help`) and a one-paragraph error for an unknown key (exit code 2)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        friendly = unknown_key_message(getattr(ex, "subcommand_parser", None) or self, message)
        if friendly is None or not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(friendly + "\n")
        raise SystemExit(2)


# ---------------------------------------------------------------------------- the CLI


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
    ``val/miou_defect``, W&B sample images and a prediction writer for ``predict``.

    ``defectseg fit|validate|test|predict --config CONFIG.yaml`` run the Lightning subcommands
    with any :class:`~defectseg.models.SegmentationModule` subclass as ``model`` and any
    :class:`~defectseg.data.DefectDataModule` subclass as ``data``. The datamodule's
    ``num_classes``, ``class_names``, ``in_channels``, ``mean`` and ``std`` are linked into the
    model, so a config names them once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", WandbConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", DefectSegArgumentParser)
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", "defectseg: imbalanced surface-defect segmentation.")
        parser_kwargs.setdefault("prog", "defectseg")
        super().__init__(SegmentationModule, DefectDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("num_classes", "class_names", "in_channels", "mean", "std"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/miou_defect",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_on_exception": True,
            }
        )
        parser.add_lightning_class_args(LogValidationSamples, "image_logger")
        parser.add_lightning_class_args(WandbExtras, "wandb")  # artifacts, IoU table, DLI charts

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
        """Resolve ``--ckpt_path best|last`` from the checkpoint folder (a new process knows no
        best model) and stop with a clear message when it does not fit the configured model."""
        ckpt_path = self.config.get(subcommand, {}).get("ckpt_path")
        if ckpt_path in ("best", "last"):
            from defectseg.callbacks.checkpoint import resolve_checkpoint

            folder = next((c.dirpath for c in self.trainer.checkpoint_callbacks if c.dirpath), None)
            try:
                ckpt_path = resolve_checkpoint(ckpt_path, folder)
            except FileNotFoundError as err:
                raise SystemExit(f"defectseg {subcommand}: {err}") from None
            self.config[subcommand]["ckpt_path"] = self.config_init[subcommand]["ckpt_path"] = ckpt_path
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


class _ConfigOnlyCLI(DefectSegCLI):
    """The ``fit`` parser of :class:`DefectSegCLI` (same sections, links and merge), with the
    command's own arguments added; it parses, seeds nothing and instantiates only ``data``."""

    def __init__(
        self,
        prog: str,
        description: str,
        add_arguments: Callable[[Any], None] | None,
        args: Sequence[str],
        instantiate: bool = True,
    ) -> None:
        self._extra = add_arguments
        self._instantiate = instantiate
        super().__init__(
            args=list(args), run=False, save_config_callback=None,
            parser_kwargs={"prog": prog, "description": description},
        )

    def _add_arguments(self, parser) -> None:
        from lightning.pytorch import Trainer

        super()._add_arguments(parser)
        # a data-only config (configs/data/*.yaml) is enough for a command that needs no model
        for action in parser._actions:
            if action.dest == "model":
                action.required = False
        getattr(parser, "_extra_required_keys", set()).discard("model")
        # the fit subcommand's own keys (ckpt_path...), so a fit config parses unchanged
        parser.add_method_arguments(Trainer, "fit", skip=set(self.subcommands()["fit"]))
        if self._extra is not None:
            self._extra(parser)

    def parse_arguments(self, parser, args) -> None:
        """Parse ``args`` (the command's own list, never ``sys.argv``: no LightningCLI warning)."""
        self.config = parser.parse_args(list(args))

    def before_instantiate_classes(self) -> None:
        """No trainer is built: its precision is left as written."""

    def _set_seed(self) -> None:
        """Reading a config seeds nothing (the datamodule's own ``seed`` decides its splits)."""

    def instantiate_classes(self) -> None:
        """Instantiate only the datamodule (``self.datamodule``); no model, no trainer."""
        from jsonargparse import ArgumentParser, Namespace

        self.model = self.trainer = self.datamodule = None
        if not self._instantiate:
            return
        data_parser = ArgumentParser(exit_on_error=False)
        data_parser.add_subclass_arguments(DefectDataModule, "data", required=True)
        self.datamodule = data_parser.instantiate_classes(Namespace(data=self.config.data)).data


def parse_config(
    args: Sequence[str],
    prog: str = "defectseg",
    description: str = "",
    add_arguments: Callable[[Any], None] | None = None,
) -> tuple[Any, DefectDataModule]:
    """Parse ``--config`` files and ``--section.key value`` overrides as ``defectseg fit`` does,
    and build the datamodule.

    Args:
        args: command-line arguments (``["--config", "a.yaml", "--data.init_args.num_images", "50"]``;
            ``data.init_args.num_images=50`` items are read as ``--data.init_args.num_images 50``).
        prog: the command's name in messages (``"defectseg stats"``).
        description: the command's ``--help`` text.
        add_arguments: adds the command's own options to the parser (``parser.add_argument``).

    Returns:
        ``(config, datamodule)``: the parsed config (a jsonargparse ``Namespace`` holding the
        command's own options too) and the instantiated ``data`` section.

    Raises:
        SystemExit: with code 2 and one paragraph for an unknown key or a bad value.
    """
    cli = _ConfigOnlyCLI(prog, description, add_arguments, overrides_to_args(args))
    return cli.config, cli.datamodule


def load_datamodule(configs: Sequence[str], overrides: Sequence[str] = ()) -> DefectDataModule:
    """The datamodule of config files (in order) with overrides, parsed as ``defectseg fit`` does.

    Args:
        configs: YAML config paths.
        overrides: ``--data.init_args.root /data`` arguments or ``data.init_args.root=/data`` items.
    """
    args = [part for path in configs for part in ("--config", str(path))]
    return parse_config([*args, *overrides])[1]


def check_config(configs: Sequence[str], prog: str = "defectseg") -> Any:
    """Parse config files with the ``fit`` parser, instantiating nothing; the parsed config.

    Raises:
        SystemExit: with code 2 and one paragraph for an unknown key or a bad value.
    """
    args = [part for path in configs for part in ("--config", str(path))]
    return _ConfigOnlyCLI(prog, "", None, args, instantiate=False).config
