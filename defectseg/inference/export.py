"""Export a trained model to ONNX or TorchScript, normalisation included.

The exported graph is :class:`~defectseg.inference.runtime.InferenceModel`:

* input ``image``: ``uint8`` ``(batch, height, width, channels)``, RGB (or gray for 1-channel
  models), raw 0..255 pixels -- no preprocessing to apply (OpenCV users convert BGR to RGB);
* output ``probabilities``: ``float32`` ``(batch, classes, height, width)`` softmax;
* output ``mask``: ``uint8`` ``(batch, height, width)`` argmax class indices.

Height and width are padded inside to the network's multiple (32) and must be at least that
(:class:`~defectseg.inference.Predictor` pads smaller images). With ``dynamic=True`` batch,
height and width are free; otherwise the graph is fixed to the example size. The model's
class names, normalisation and size facts are stored in the file (ONNX ``metadata_props`` /
TorchScript extra file ``defectseg.json``), so :class:`Predictor` can run the file directly.

Every export is verified: the exported model is run on random images (a second size too for a
dynamic export) and compared with PyTorch; a difference above ``tolerance`` raises.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch

from defectseg.inference.runtime import METADATA_KEY, InferenceModel, ModelInfo, module_info


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how close it is to PyTorch."""

    path: Path
    format: str
    info: ModelInfo
    max_abs_diff: float
    checked_sizes: list[tuple[int, int, int]]
    exporter: str = ""


def _load(model: str | os.PathLike | L.LightningModule) -> tuple[L.LightningModule, str | None]:
    if isinstance(model, torch.nn.Module):
        return model.eval(), None
    from defectseg.inference.checkpoint import load_module

    source = os.fspath(model)
    return load_module(source, map_location="cpu"), source


def _parse_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another --out or pass --overwrite")
    if path.is_dir():
        raise IsADirectoryError(f"--out {path} is a folder; give a file name such as model.onnx")
    path.parent.mkdir(parents=True, exist_ok=True)


def _examples(info: ModelInfo, size: tuple[int, int], batch: int, dynamic: bool, seed: int = 0) -> list[np.ndarray]:
    """Random uint8 images at the export size and, for dynamic exports, at another size."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, *size)]
    if dynamic:
        shapes.append((batch + 1, size[0] + 37, size[1] + 21))
    return [rng.integers(0, 256, (*shape, info.in_channels), dtype=np.uint8) for shape in shapes]


def _reference(model: InferenceModel, image: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(image))[0].numpy()


def _prepare(model, path, size, batch_size: int, dynamic: bool, overwrite: bool):
    """Shared first steps of the exports: the target path (checked), the model's metadata with
    the static size and batch when not ``dynamic``, the wrapped eval model and the size."""
    target = Path(path)
    _check_target(target, overwrite)
    module, source = _load(model)
    height, width = _parse_size(size)
    info = module_info(module, source)
    if min(height, width) < info.min_size:
        raise ValueError(f"export size {height}x{width} is below the model's minimum {info.min_size}x{info.min_size}")
    info = replace(
        info,
        static_size=None if dynamic else (height, width),
        static_batch=None if dynamic else int(batch_size),
    )
    wrapper = InferenceModel.from_module(module, with_mask=True).cpu().eval()
    return target, info, wrapper, (height, width)


def export_onnx(
    model: str | os.PathLike | L.LightningModule,
    path: str | os.PathLike,
    size: int | tuple[int, int] = 256,
    batch_size: int = 1,
    dynamic: bool = True,
    opset: int = 18,
    exporter: Literal["auto", "dynamo", "legacy"] = "auto",
    overwrite: bool = False,
    tolerance: float = 1e-4,
) -> ExportResult:
    """Export to ONNX (needs ``onnx``; ``onnxruntime`` to verify; ``onnxscript`` for ``dynamo``).

    Args:
        model: checkpoint path or LightningModule.
        path: the ``.onnx`` file to write.
        size: ``(height, width)`` (or one int) of the example input; the fixed size when
            ``dynamic`` is false.
        batch_size: batch of the example input; the fixed batch when ``dynamic`` is false.
        dynamic: free batch, height and width (at least the padding multiple).
        opset: ONNX opset.
        exporter: ``dynamo`` (``torch.export``-based, needs ``onnxscript``), ``legacy``
            (TorchScript-based) or ``auto`` (dynamo when onnxscript is installed).
        overwrite: replace an existing file.
        tolerance: largest accepted difference of probabilities with PyTorch.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        RuntimeError: the exported model differs from PyTorch by more than ``tolerance``.
    """
    try:
        import onnx
    except ImportError as err:
        raise ImportError("ONNX export needs the onnx package: pip install onnx onnxruntime") from err
    target, info, wrapper, (height, width) = _prepare(model, path, size, batch_size, dynamic, overwrite)
    if exporter == "auto":
        exporter = "dynamo" if importlib.util.find_spec("onnxscript") is not None else "legacy"
    # dynamo specialises dimensions of size 0/1: trace with a batch of at least 2
    trace_batch = max(2, batch_size) if dynamic else batch_size
    example = torch.from_numpy(_examples(info, (height, width), trace_batch, False)[0])
    names = {"input_names": ["image"], "output_names": ["probabilities", "mask"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            if importlib.util.find_spec("onnxscript") is None:
                raise ImportError("exporter='dynamo' needs onnxscript: pip install onnxscript (or use exporter='legacy')")
            dynamic_shapes = None
            if dynamic:
                from torch.export import Dim

                limit = 1 << 16
                dynamic_shapes = (
                    {
                        0: Dim("batch", min=1, max=4096),
                        1: Dim("height", min=info.min_size, max=limit),
                        2: Dim("width", min=info.min_size, max=limit),
                    },
                )
            torch.onnx.export(
                wrapper, (example,), str(target), dynamo=True, external_data=False,
                dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False, **names,
            )
        elif exporter == "legacy":
            axes = None
            if dynamic:
                axes = {
                    "image": {0: "batch", 1: "height", 2: "width"},
                    "probabilities": {0: "batch", 2: "height", 3: "width"},
                    "mask": {0: "batch", 1: "height", 2: "width"},
                }
            torch.onnx.export(
                wrapper, (example,), str(target), dynamo=False, dynamic_axes=axes,
                opset_version=opset, **names,
            )
        else:
            raise ValueError(f"exporter must be 'auto', 'dynamo' or 'legacy', got {exporter!r}")
    proto = onnx.load(str(target))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info.to_json()
    proto.doc_string = (
        "defectseg model. Input 'image': uint8 (batch, height, width, channels) RGB, raw pixels. "
        "Outputs: 'probabilities' float32 (batch, classes, height, width), 'mask' uint8 "
        f"(batch, height, width). Classes: {info.class_names}."
    )
    onnx.save(proto, str(target))
    result = ExportResult(target, "onnx", info, 0.0, [], exporter)
    _verify_onnx(result, wrapper, (height, width), batch_size, dynamic, tolerance)
    return result


def verify_export(
    result: ExportResult,
    run: Callable[[np.ndarray], np.ndarray],
    wrapper: InferenceModel,
    size: tuple[int, int],
    batch: int,
    dynamic: bool,
    tolerance: float,
    hint: str,
) -> None:
    """Compare an exported model with PyTorch on random uint8 inputs (the export size and, when
    ``dynamic``, another size and batch); fill ``result.checked_sizes`` and ``max_abs_diff``.

    Args:
        result: the export's result (its ``format`` and ``path`` name the file in messages).
        run: the exported model: uint8 ``(B, H, W, C)`` images to probabilities ``(B, K, H, W)``.
        wrapper: the PyTorch model it was exported from.
        size: the export ``(height, width)``.
        batch: the export batch.
        dynamic: also check another size and batch.
        tolerance: largest accepted probability difference.
        hint: what to try when the outputs differ (the end of the error message).

    Raises:
        RuntimeError: an output shape or a probability differs (by more than ``tolerance``).
    """
    name = {"onnx": "ONNX Runtime", "torchscript": "TorchScript"}.get(result.format, result.format)
    worst = 0.0
    for image in _examples(result.info, size, batch, dynamic, seed=1):
        got = run(image)
        want = _reference(wrapper, image)
        if got.shape != want.shape:
            raise RuntimeError(
                f"{result.path}: {name} gives {got.shape} for input {image.shape} instead of PyTorch's "
                f"{want.shape}; {hint}"
            )
        worst = max(worst, float(np.abs(got - want).max()))
        result.checked_sizes.append(tuple(image.shape[:3]))
    result.max_abs_diff = worst
    if worst > tolerance:
        raise RuntimeError(
            f"{result.path}: {name} and PyTorch probabilities differ by {worst:.2e} (> {tolerance:.0e}) "
            f"on inputs {result.checked_sizes}; {hint}"
        )


def _verify_onnx(result: ExportResult, wrapper: InferenceModel, size: tuple[int, int], batch: int,
                 dynamic: bool, tolerance: float) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        warnings.warn("onnxruntime is not installed: the exported model was not verified", stacklevel=3)
        result.max_abs_diff = float("nan")
        return
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    verify_export(
        result, lambda image: session.run(["probabilities"], {"image": image})[0], wrapper, size, batch, dynamic,
        tolerance, "try exporter='legacy'/'dynamo' or a static size",
    )


def export_torchscript(
    model: str | os.PathLike | L.LightningModule,
    path: str | os.PathLike,
    size: int | tuple[int, int] = 256,
    batch_size: int = 1,
    dynamic: bool = True,
    overwrite: bool = False,
    tolerance: float = 1e-4,
) -> ExportResult:
    """Export to TorchScript by tracing (load with ``torch.jit.load``; no defectseg needed).

    Args:
        model: checkpoint path or LightningModule.
        path: the file to write (``.pt``/``.ts``).
        size: example ``(height, width)``.
        batch_size: example batch.
        dynamic: verify that the trace also holds for another size and batch (tracing records
            shape arithmetic, so smp networks stay size-independent); a trace that does not
            raises. With ``dynamic=False`` only the example size is promised.
        overwrite: replace an existing file.
        tolerance: largest accepted difference of probabilities with PyTorch.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        RuntimeError: the trace differs from PyTorch by more than ``tolerance``.
    """
    target, info, wrapper, (height, width) = _prepare(model, path, size, batch_size, dynamic, overwrite)
    example = torch.from_numpy(_examples(info, (height, width), batch_size, False)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        torch.jit.save(traced, str(target), _extra_files={f"{METADATA_KEY}.json": info.to_json()})
    result = ExportResult(target, "torchscript", info, 0.0, [], "trace")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(target), map_location="cpu")

    def run(image: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return loaded(torch.from_numpy(image))[0].numpy()

    verify_export(
        result, run, wrapper, (height, width), batch_size, dynamic, tolerance,
        "the trace may be size-specific, export with dynamic=False (--static)",
    )
    return result


def export_model(
    model: str | os.PathLike | L.LightningModule,
    path: str | os.PathLike,
    format: Literal["onnx", "torchscript"] = "onnx",
    **kwargs,
) -> ExportResult:
    """Export to ``onnx`` or ``torchscript`` (see :func:`export_onnx` / :func:`export_torchscript`)."""
    if format == "onnx":
        return export_onnx(model, path, **kwargs)
    if format == "torchscript":
        kwargs.pop("opset", None)
        kwargs.pop("exporter", None)
        return export_torchscript(model, path, **kwargs)
    raise ValueError(f"format must be 'onnx' or 'torchscript', got {format!r}")
