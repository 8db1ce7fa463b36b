"""Load defectseg checkpoints safely and check that they fit the model a user expects.

Checkpoints are read with ``torch.load(..., weights_only=True)``: only tensors and plain Python
values are unpickled, never arbitrary objects. The LightningModule class is taken from the
``_class_path`` that LightningCLI stores in the hyper-parameters, but only classes of the
``defectseg`` package are imported; other checkpoints need the class given explicitly.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

#: Hyper-parameters that describe the network; compared when a checkpoint is checked.
DESCRIBING_KEYS = ("arch", "encoder", "encoder_depth", "num_classes", "in_channels")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or it does not match the model it is used with."""


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a Lightning checkpoint with ``weights_only=True``.

    Args:
        path: the ``.ckpt`` file.
        map_location: where tensors are loaded.

    Returns:
        The checkpoint dictionary (``state_dict``, ``hyper_parameters``...).

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is not a PyTorch checkpoint, holds objects that cannot be
            loaded safely, or is not a Lightning checkpoint of a defectseg model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Unsupported global" in text or found:
            what = f" (e.g. {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} holds Python objects{what} that cannot be loaded safely "
                "(weights_only=True). defectseg only loads checkpoints made of tensors and plain "
                "values; if the file comes from a source you trust, load it with "
                "torch.load(weights_only=False) and re-save its 'state_dict' and 'hyper_parameters'"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = detail.group(1).strip() if detail else (text.strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({reason}); is it a .ckpt file written by "
            "defectseg fit?"
        ) from None
    except Exception as err:  # torch raises many types for files that are not checkpoints
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); is it a .ckpt file "
            "written by defectseg fit?"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (it has no 'state_dict'; found {keys}). A plain "
            "state dict does not say which network it belongs to: build the module yourself, load "
            "the weights into it and pass the module to Predictor"
        )
    if not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise CheckpointError(
            f"{path} stores no hyper-parameters, so the network it holds cannot be rebuilt; it was "
            "not saved by a defectseg model (they call save_hyperparameters)"
        )
    return checkpoint


def checkpoint_summary(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters that describe a checkpoint's network, for messages and checks."""
    summary = {"class_path": hparams.get("_class_path", "defectseg.models.SegmentationModule")}
    for key in DESCRIBING_KEYS:
        if key in hparams:
            summary[key] = hparams[key]
    if hparams.get("class_names"):
        summary["class_names"] = list(hparams["class_names"])
    return summary


def describe(summary: Mapping[str, Any]) -> str:
    """One-line description such as ``Unet/resnet18 (depth 3), 3 classes [background, ...]``."""
    parts = []
    if "arch" in summary or "encoder" in summary:
        text = f"{summary.get('arch', '?')}/{summary.get('encoder', '?')}"
        if "encoder_depth" in summary:
            text += f" (depth {summary['encoder_depth']})"
        parts.append(text)
    if "num_classes" in summary:
        text = f"{summary['num_classes']} classes"
        if summary.get("class_names"):
            text += f" {list(summary['class_names'])}"
        parts.append(text)
    if "in_channels" in summary:
        parts.append(f"{summary['in_channels']} input channels")
    class_path = summary.get("class_path")
    if class_path and class_path != "defectseg.models.SegmentationModule":
        parts.append(class_path)
    return ", ".join(parts) or "unknown model"


def resolve_module_class(class_path: str | None) -> type[L.LightningModule]:
    """Import the LightningModule class named in a checkpoint, from the defectseg package only.

    Args:
        class_path: dotted path stored by LightningCLI (``_class_path``); ``None`` for
            :class:`~defectseg.models.SegmentationModule`.

    Raises:
        CheckpointError: the class is outside ``defectseg``, missing, or not a LightningModule.
    """
    if not class_path:
        from defectseg.models.segmentation import SegmentationModule

        return SegmentationModule
    if not isinstance(class_path, str) or not class_path.startswith("defectseg."):
        raise CheckpointError(
            f"the checkpoint was saved by {class_path!r}, which is not a defectseg model; only "
            "classes of the defectseg package are imported from checkpoints (for safety). If you "
            "trust that class, import it yourself and pass model_class=... to Predictor"
        )
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(
            f"the checkpoint's model class {class_path} cannot be imported ({err}); was it saved by "
            "a newer defectseg version?"
        ) from None
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, L.LightningModule)):
        raise CheckpointError(f"{class_path} named by the checkpoint is not a LightningModule class")
    return cls


def _skipped_prefixes(module: torch.nn.Module) -> tuple[str, ...]:
    """State-dict prefixes not needed for inference: losses and metrics."""
    from torchmetrics import Metric

    prefixes = []
    for name, child in module.named_modules():
        if not name:
            continue
        if isinstance(child, Metric) or name.split(".")[-1] in ("loss_fn", "criterion"):
            prefixes.append(name + ".")
    return tuple(prefixes)


def check_expectations(summary: Mapping[str, Any], expect: Mapping[str, Any], source: str) -> None:
    """Raise :class:`CheckpointError` when a checkpoint differs from what the user expects.

    Args:
        summary: :func:`checkpoint_summary` of the checkpoint.
        expect: expected values, e.g. ``{"num_classes": 5, "arch": "Unet"}`` or
            ``{"class_names": [...]}``.
        source: the checkpoint's name for the message.
    """
    differences = []
    for key, wanted in expect.items():
        if wanted is None:
            continue
        have = summary.get(key)
        if key == "class_names":
            same = have is not None and [str(v) for v in have] == [str(v) for v in wanted]
        elif isinstance(wanted, str) and isinstance(have, str):
            same = have.lower() == wanted.lower()
        else:
            same = have == wanted
        if not same:
            differences.append(f"{key}: checkpoint {have!r}, expected {wanted!r}")
    if differences:
        raise CheckpointError(
            f"{source} holds {describe(summary)}, which does not match the expected model: "
            + "; ".join(differences)
            + ". Use the checkpoint trained for this model/dataset, or change the expected values"
        )


def load_module(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    model_class: type[L.LightningModule] | None = None,
    expect: Mapping[str, Any] | None = None,
) -> L.LightningModule:
    """Rebuild the LightningModule of a checkpoint for inference (eval mode).

    The module is built from the stored hyper-parameters with ``weights=None`` (the pretrained
    file used for training is not needed) and the plain ``ce`` loss (losses are not used for
    inference, so plug-in losses need not be importable); then the network weights are loaded
    strictly, skipping loss and metric states.

    Args:
        path: the checkpoint.
        map_location: device of the loaded weights.
        model_class: the LightningModule class to build; by default the class stored in the
            checkpoint (``defectseg`` classes only), else :class:`SegmentationModule`.
        expect: values the checkpoint must have (``num_classes``, ``class_names``, ``arch``,
            ``encoder``, ``in_channels``...); a difference raises naming both.

    Raises:
        CheckpointError: unreadable or unsafe file, foreign class, expectation not met, or weights
            that do not fit the network the hyper-parameters describe.
    """
    source = os.fspath(path)
    checkpoint = read_checkpoint(source, map_location)
    hparams = dict(checkpoint["hyper_parameters"])
    summary = checkpoint_summary(hparams)
    if expect:
        check_expectations(summary, expect, source)
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    cls = model_class or resolve_module_class(class_path)
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in hparams.items() if takes_any or k in parameters}
    for key in ("optimizer", "lr_scheduler"):
        kwargs.pop(key, None)
    if "weights" in parameters:
        kwargs["weights"] = None
    if "loss" in parameters:
        kwargs["loss"] = "ce"
        if "loss_kwargs" in parameters:
            kwargs["loss_kwargs"] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cls(**kwargs)
    except Exception as err:
        raise CheckpointError(
            f"cannot rebuild {cls.__module__}.{cls.__qualname__} from the hyper-parameters of "
            f"{source} ({describe(summary)}): {type(err).__name__}: {err}"
        ) from err
    _load_state(module, checkpoint["state_dict"], source, summary)
    module.eval()
    return module


def _under_identity(module: torch.nn.Module, key: str) -> bool:
    """True when a state-dict ``key`` belongs to a sub-module replaced by ``nn.Identity``."""
    node = module
    for part in key.split(".")[:-1]:
        node = getattr(node, part, None) if not part.isdigit() or not isinstance(node, (torch.nn.Sequential, torch.nn.ModuleList)) else (
            node[int(part)] if int(part) < len(node) else None
        )
        if node is None:
            return False
        if isinstance(node, torch.nn.Identity):
            return True
    return False


def _load_state(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, summary: Mapping[str, Any]
) -> None:
    skipped = _skipped_prefixes(module)
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(skipped)}
    stored = {k: v for k, v in state.items() if not k.startswith(skipped)}
    missing = [k for k in own if k not in stored]
    # weights of layers the network replaced by nn.Identity (unused encoder stages, pruned by
    # build_network) are not needed: older checkpoints still carry them
    unexpected = [k for k in stored if k not in own and not _under_identity(module, k)]
    mismatched = [k for k in own if k in stored and tuple(own[k].shape) != tuple(stored[k].shape)]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            key = mismatched[0]
            problems.append(
                f"{len(mismatched)} tensors differ in shape, e.g. {key}: checkpoint "
                f"{tuple(stored[key].shape)} vs model {tuple(own[key].shape)}"
            )
        if missing:
            problems.append(f"{len(missing)} tensors of the model are missing, e.g. {missing[0]}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors are not in the model, e.g. {unexpected[0]}")
        raise CheckpointError(
            f"the weights in {source} do not fit the {type(module).__name__} its hyper-parameters "
            f"describe ({describe(summary)}): " + "; ".join(problems)
        )
    module.load_state_dict({k: v for k, v in stored.items() if k in own}, strict=False)


def check_checkpoint_matches(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Check, before Lightning loads it, that a checkpoint fits ``model``.

    Used by ``defectseg validate|test|predict --ckpt_path``: the model there is built from the
    config (with ``num_classes``/``in_channels`` linked from the datamodule), and a checkpoint of
    another architecture or class count would otherwise fail deep inside ``load_state_dict``.

    Raises:
        CheckpointError: naming what the checkpoint holds and what the model is.
    """
    source = os.fspath(path)
    checkpoint = read_checkpoint(source)
    stored = checkpoint_summary(checkpoint["hyper_parameters"])
    hparams = dict(getattr(model, "hparams", {}) or {})
    hparams.setdefault("_class_path", f"{type(model).__module__}.{type(model).__qualname__}")
    current = checkpoint_summary(hparams)
    differences = [
        f"{key}: checkpoint {stored[key]!r}, model {current[key]!r}"
        for key in DESCRIBING_KEYS
        if key in stored and key in current and stored[key] != current[key]
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {source} holds {describe(stored)} but the configured model is "
            f"{describe(current)} ({'; '.join(differences)}). Use the data and model settings the "
            "checkpoint was trained with (num_classes and in_channels come from the datamodule)"
        )
    names_stored, names_current = stored.get("class_names"), current.get("class_names")
    if names_stored and names_current and list(names_stored) != list(names_current):
        warnings.warn(
            f"checkpoint {source} was trained with classes {list(names_stored)} but the datamodule "
            f"names them {list(names_current)}",
            stacklevel=2,
        )
    skipped = _skipped_prefixes(model)
    own = model.state_dict()
    for key, value in checkpoint["state_dict"].items():
        if key.startswith(skipped) or key not in own:
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"checkpoint {source} ({describe(stored)}) does not fit the configured model "
                f"({describe(current)}): {key} is {tuple(value.shape)} in the checkpoint and "
                f"{tuple(own[key].shape)} in the model"
            )
