"""The ``defectseg`` command: dispatch to the Lightning subcommands and the extra commands.

``defectseg fit|validate|test|predict --config CONFIG.yaml`` run
:class:`defectseg.config.DefectSegCLI` (a LightningCLI). Extra commands that are not
Lightning subcommands (``stats``, ``infer``...) live in :mod:`defectseg.commands` and are
registered in :data:`~defectseg.commands.registry.EXTRA_COMMANDS`. This module imports no
Lightning at import time, so ``defectseg --version`` and ``defectseg --help`` answer at once;
library code never imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import defectseg
from defectseg.commands.registry import EXTRA_COMMANDS, register_command  # noqa: F401 (the commands' API)

#: The Lightning subcommands with their one-line help.
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model on a config's data (checkpoints, logs, config.yaml)",
    "validate": "validation metrics of a checkpoint on a config's data",
    "test": "test metrics of a checkpoint (IoU, image-wise IoU, global defect IoU, FP rate)",
    "predict": "write masks and overlays for a config's data (or raw images with --input)",
}


def __getattr__(name: str) -> Any:
    # DefectSegCLI lives in the library (defectseg.config); imported on demand, it keeps
    # ``defectseg --version`` free of Lightning
    if name in ("DefectSegCLI", "WandbConfigCallback"):
        import defectseg.config

        return getattr(defectseg.config, name)
    raise AttributeError(f"module 'defectseg.cli' has no attribute {name!r}")


def _print_help() -> None:
    names = [*LIGHTNING_COMMANDS, *(n for n in EXTRA_COMMANDS if n not in LIGHTNING_COMMANDS)]
    print("usage: defectseg {" + ",".join(names) + "} ...")
    print("       defectseg --version\n")
    print("defectseg: imbalanced surface-defect segmentation. Commands (defectseg COMMAND --help):")
    for name in names:
        text = LIGHTNING_COMMANDS.get(name) or EXTRA_COMMANDS[name][0]
        print(f"  {name:14s} {text}")


def _register_builtin_commands() -> None:
    """Import the modules that register extra commands."""
    import defectseg.commands  # noqa: F401


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
    if argv[:1] in ([], ["-h"], ["--help"]):
        _print_help()
        return 0 if argv else 2
    from defectseg.config import DefectSegCLI
    from defectseg.models.networks import PretrainedWeightsError

    try:
        # from the console LightningCLI reads sys.argv itself (given both, it warns on every run)
        DefectSegCLI(args=None if args is None else argv)
    except Exception as err:
        # offline pretrained weights: a short message, no traceback (jsonargparse wraps the error)
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, PretrainedWeightsError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise SystemExit(f"defectseg: {cause}") from None
    return 0
