"""The raw-image model and the runtimes that execute it (PyTorch, ONNX Runtime, TorchScript).

:class:`InferenceModel` wraps a trained network so that it takes what a camera gives:
``uint8`` images ``(B, H, W, C)`` in RGB (or gray) channel order, with normalisation and padding
inside. It returns softmax probabilities ``(B, K, H, W)`` (and optionally the argmax mask). The
same module runs eagerly in the :class:`~defectseg.inference.Predictor` and is what
:mod:`defectseg.inference.export` writes to ONNX and TorchScript, so every runtime computes the
same function.

A backend is a callable ``uint8 (B, H, W, C) numpy -> float32 (B, K, H, W) numpy`` with the
model's metadata (:class:`ModelInfo`); :func:`load_backend` picks one from a file.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectseg.data.contract import default_normalization

#: Name of the metadata entry in exported files (ONNX metadata_props key, TorchScript extra file).
METADATA_KEY = "defectseg"
#: Input layout of exported and eager inference models, as written in the metadata.
INPUT_LAYOUT = "uint8 (batch, height, width, channels), RGB or gray, unnormalised 0..255"


@dataclass
class ModelInfo:
    """What a runtime needs to know about a model: classes, channels, preprocessing, size limits.

    Attributes:
        class_names: class names, background first.
        in_channels: channels the model takes (1 gray, 3 RGB).
        mean: normalisation mean on the 0..1 scale (applied inside the model).
        std: normalisation std on the 0..1 scale (applied inside the model).
        pad_multiple: the model pads height and width to this multiple inside.
        min_size: smallest height/width the model accepts (smaller images are padded by the
            predictor).
        static_size: ``(height, width)`` of a fixed-size export, ``None`` when dynamic.
        static_batch: batch size of a fixed-size export, ``None`` when dynamic.
        extra: further descriptive values (architecture, encoder, source checkpoint).
    """

    class_names: list[str]
    in_channels: int
    mean: list[float]
    std: list[float]
    pad_multiple: int = 32
    min_size: int = 32
    static_size: tuple[int, int] | None = None
    static_batch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        data = asdict(self)
        data["format"] = "defectseg-inference"
        data["input"] = INPUT_LAYOUT
        data["outputs"] = ["probabilities (batch, classes, height, width) float32", "mask (batch, height, width) uint8"]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> ModelInfo:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: the defectseg metadata is not valid JSON ({err})") from None
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("static_size",):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def _network_of(module: nn.Module) -> tuple[nn.Module, int]:
    """The plain network of a defectseg LightningModule and its padding multiple.

    A :class:`SegmentationModule` whose ``forward`` is not overridden runs ``net.network``
    directly (the padding is done by :class:`InferenceModel` in an export-friendly way); any other
    module (``UAPSModule``...) runs its own ``forward`` on inputs already padded to the multiple.
    """
    from defectseg.models.networks import PadToMultiple
    from defectseg.models.segmentation import SegmentationModule

    hparams = getattr(module, "hparams", {}) or {}
    multiple = int(hparams.get("pad_multiple", 32) or 1)
    net = getattr(module, "net", None)
    if (
        isinstance(module, SegmentationModule)
        and type(module).forward is SegmentationModule.forward
        and isinstance(net, PadToMultiple)
    ):
        return net.network, int(net.multiple)
    return module, multiple


class InferenceModel(nn.Module):
    """Raw ``uint8`` images in, class probabilities out, normalisation and padding inside.

    Args:
        network: maps normalised ``float32`` images ``(B, C, H, W)`` (``H``, ``W`` multiples of
            ``pad_multiple``) to logits ``(B, K, H, W)``.
        mean: per-channel mean on the 0..1 scale.
        std: per-channel std on the 0..1 scale.
        pad_multiple: height and width are padded (reflection, bottom/right) to this multiple
            before the network and the output is cropped back.
        with_mask: also return the argmax mask ``(B, H, W)`` ``uint8`` (exported models do).

    Inputs must be at least ``pad_multiple`` pixels high and wide (reflection padding needs it);
    :class:`~defectseg.inference.Predictor` pads smaller images first.
    """

    def __init__(
        self,
        network: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        pad_multiple: int = 32,
        with_mask: bool = False,
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean {list(mean)} and std {list(std)} need the same length")
        self.network = network
        self.register_buffer("mean", torch.tensor([float(v) * 255.0 for v in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) * 255.0 for v in std]).view(1, -1, 1, 1))
        self.pad_multiple = max(1, int(pad_multiple))
        self.with_mask = with_mask
        self.channels = len(mean)
        self.resample = self._needs_resample()

    @torch.no_grad()
    def _needs_resample(self) -> bool:
        """Whether the network's output size differs from its input (FPN at some depths)."""
        side = 2 * max(self.pad_multiple, 32)
        was_training = self.network.training
        self.network.eval()
        try:
            probe = torch.zeros(1, self.channels, side, side, device=self.mean.device)
            out = self.network(probe)
        finally:
            self.network.train(was_training)
        return tuple(out.shape[-2:]) != (side, side)

    @classmethod
    def from_module(cls, module: L.LightningModule | nn.Module, with_mask: bool = False) -> InferenceModel:
        """Wrap a defectseg LightningModule, reading ``mean``/``std``/``in_channels`` from its hparams."""
        hparams = getattr(module, "hparams", {}) or {}
        channels = int(hparams.get("in_channels", 3))
        default_mean, default_std = default_normalization(channels) if channels in (1, 3) else ((0.5,) * channels, (0.25,) * channels)
        mean = hparams.get("mean") or default_mean
        std = hparams.get("std") or default_std
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"the model's mean {list(mean)} / std {list(std)} do not have in_channels={channels} values"
            )
        network, multiple = _network_of(module)
        return cls(network.eval(), mean, std, multiple, with_mask=with_mask).eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``uint8`` ``(B, H, W, C)`` -> probabilities ``(B, K, H, W)`` (and mask ``(B, H, W)``)."""
        x = image.permute(0, 3, 1, 2).to(torch.float32)
        x = (x - self.mean) / self.std
        height, width = x.shape[-2], x.shape[-1]
        multiple = self.pad_multiple
        if multiple > 1:
            if height < multiple or width < multiple:
                raise ValueError(
                    f"images must be at least {multiple}x{multiple} pixels, got {height}x{width} "
                    "(HxW); pad them first (Predictor does)"
                )
            pad_h = (multiple - height % multiple) % multiple
            pad_w = (multiple - width % multiple) % multiple
            x = F.pad(x, [0, pad_w, 0, pad_h], mode="reflect")
        logits = self.network(x)
        if self.resample:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        probabilities = logits[:, :, :height, :width].float().softmax(dim=1)
        if self.with_mask:
            return probabilities, probabilities.argmax(dim=1).to(torch.uint8)
        return probabilities


def module_info(module: L.LightningModule | nn.Module, source: str | None = None) -> ModelInfo:
    """:class:`ModelInfo` of a defectseg LightningModule, from its hyper-parameters."""
    hparams = dict(getattr(module, "hparams", {}) or {})
    channels = int(hparams.get("in_channels", 3))
    num_classes = int(hparams.get("num_classes", getattr(module, "num_classes", 2)))
    names = getattr(module, "class_names", None) or hparams.get("class_names") or (
        ["background"] + [f"class_{k}" for k in range(1, num_classes)]
    )
    default_mean, default_std = default_normalization(channels) if channels in (1, 3) else ((0.5,) * channels, (0.25,) * channels)
    _, multiple = _network_of(module)
    extra = {k: hparams[k] for k in ("arch", "encoder", "encoder_depth") if k in hparams}
    extra["model_class"] = f"{type(module).__module__}.{type(module).__qualname__}"
    from defectseg.version import __version__

    extra["defectseg_version"] = __version__  # of the export; the checkpoint's own is in the .ckpt
    if source:
        extra["source"] = os.path.basename(source)
    return ModelInfo(
        class_names=[str(n) for n in names],
        in_channels=channels,
        mean=[float(v) for v in (hparams.get("mean") or default_mean)],
        std=[float(v) for v in (hparams.get("std") or default_std)],
        pad_multiple=multiple,
        min_size=multiple,
        extra=extra,
    )


# ---------------------------------------------------------------------------------- backends
class TorchBackend:
    """Run an :class:`InferenceModel` eagerly with PyTorch.

    Args:
        model: the wrapped network.
        info: its metadata.
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps`` or ``auto`` (CUDA when available).
    """

    name = "pytorch"

    def __init__(self, model: InferenceModel, info: ModelInfo, device: str | torch.device = "cpu") -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.info = info

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            out = self.model(tensor)
            if isinstance(out, tuple):
                out = out[0]
            return out.float().cpu().numpy()


class TorchScriptBackend(TorchBackend):
    """Run a TorchScript file written by :func:`defectseg.inference.export.export_torchscript`."""

    name = "torchscript"

    def __init__(self, path: str, device: str | torch.device = "cpu") -> None:
        extra = {f"{METADATA_KEY}.json": ""}
        self.device = resolve_device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
            self.model = torch.jit.load(path, map_location=self.device, _extra_files=extra)
        self.model.eval()
        if not extra[f"{METADATA_KEY}.json"]:
            raise ValueError(f"{path} is a TorchScript file without defectseg metadata; export it with defectseg export")
        self.info = ModelInfo.from_json(extra[f"{METADATA_KEY}.json"], path)


class OnnxBackend:
    """Run an ONNX file written by :func:`defectseg.inference.export.export_onnx` in ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA execution provider when available).
        num_threads: intra-op threads of the session (``None``: ONNX Runtime's default).
    """

    name = "onnxruntime"

    def __init__(self, path: str, device: str = "cpu", num_threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError(
                "running .onnx models needs onnxruntime: pip install onnxruntime (or 'defectseg[onnx]')"
            ) from err
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            # as for PyTorch's OpenMP threads: idle threads sleep instead of spinning (shared CPUs)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available):
            if "CUDAExecutionProvider" not in available:
                raise ValueError(f"device={device!r} but onnxruntime has no CUDA provider ({available}); install onnxruntime-gpu")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as err:
            raise ValueError(f"cannot load {path} with onnxruntime: {err}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(f"{path} is an ONNX model without defectseg metadata; export it with defectseg export")
        self.info = ModelInfo.from_json(meta[METADATA_KEY], path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        info = self.info
        count, height, width = batch.shape[:3]
        if info.static_size is not None and (height, width) != tuple(info.static_size):
            target_h, target_w = info.static_size
            if height > target_h or width > target_w:
                raise ValueError(
                    f"this ONNX model was exported for {target_h}x{target_w} inputs; got {height}x{width} "
                    "(use tiles of at most that size)"
                )
            batch = pad_images(batch, target_h, target_w)
        outputs = []
        step = info.static_batch or count
        for start in range(0, count, step):
            chunk = batch[start : start + step]
            real = chunk.shape[0]
            if info.static_batch and real < info.static_batch:
                filler = np.repeat(chunk[-1:], info.static_batch - real, axis=0)
                chunk = np.concatenate([chunk, filler])
            out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(chunk)})[0]
            outputs.append(out[:real])
        return np.concatenate(outputs)[:, :, :height, :width]


def pad_images(batch: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad ``(B, h, w, C)`` images at the bottom/right to ``height`` x ``width``.

    Reflection is used where the image is large enough, edge replication otherwise (the same rule
    as :class:`~defectseg.models.networks.PadToMultiple`).
    """
    pad_h, pad_w = height - batch.shape[1], width - batch.shape[2]
    if pad_h <= 0 and pad_w <= 0:
        return batch
    pad_h, pad_w = max(pad_h, 0), max(pad_w, 0)
    mode = "reflect" if pad_h < batch.shape[1] and pad_w < batch.shape[2] else "edge"
    return np.pad(batch, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given, checked."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; use --device cpu")
    return device


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith(f"extra/{METADATA_KEY}.json") for name in names) or any(
        name.endswith("code/__torch__.py") or "/code/__torch__/" in name for name in names
    )


def load_backend(
    model: str | os.PathLike | L.LightningModule,
    device: str = "cpu",
    model_class: type[L.LightningModule] | None = None,
    expect: dict[str, Any] | None = None,
    num_threads: int | None = None,
) -> TorchBackend | OnnxBackend:
    """The runtime for ``model``: a LightningModule, a ``.ckpt`` checkpoint, an ``.onnx`` file or a
    TorchScript file written by ``defectseg export``.

    Args:
        model: module or file.
        device: ``cpu``, ``cuda`` or ``auto``.
        model_class: LightningModule class for checkpoints (default: the stored defectseg class).
        expect: expected ``num_classes``/``class_names``/``arch``... (checked against the model).
        num_threads: ONNX Runtime threads.
    """
    from defectseg.inference.checkpoint import CheckpointError, check_expectations, load_module

    if isinstance(model, nn.Module):
        backend: TorchBackend | OnnxBackend = TorchBackend(InferenceModel.from_module(model), module_info(model), device)
        source = type(model).__name__
    else:
        source = os.fspath(model)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"model file {source!r} does not exist")
        if source.lower().endswith(".onnx"):
            backend = OnnxBackend(source, device=device, num_threads=num_threads)
        elif _is_torchscript(source):
            backend = TorchScriptBackend(source, device=device)
        else:
            module = load_module(source, map_location="cpu", model_class=model_class, expect=expect)
            backend = TorchBackend(InferenceModel.from_module(module), module_info(module, source), device)
            expect = None  # checked by load_module before building the network
    if expect:
        info = backend.info
        summary = {
            "num_classes": info.num_classes,
            "class_names": info.class_names,
            "in_channels": info.in_channels,
            **{k: v for k, v in info.extra.items() if k in ("arch", "encoder", "encoder_depth")},
        }
        unknown = [k for k in expect if k not in summary and expect[k] is not None]
        if unknown:
            raise CheckpointError(f"{source} does not record {unknown}; cannot check them")
        check_expectations(summary, expect, source)
    return backend
