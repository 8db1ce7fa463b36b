"""Plain ``nn.Module`` segmentation networks (no Lightning here).

Networks come from segmentation-models-pytorch by architecture and encoder name, with random
weights. :func:`load_weights` then loads pretrained weights: from a local file (a state dict,
encoder weights or a defectseg checkpoint), or by weight name (``imagenet``...) through
segmentation-models-pytorch / timm, which download them once into the Hugging Face cache; offline
that fails at once with :class:`PretrainedWeightsError`, naming the file to fetch and where to
put it (docs/pretrained.md).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from defectseg.data.contract import round_up


def available_architectures() -> list[str]:
    """Architecture names accepted by :func:`build_network` (case-insensitive)."""
    return sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


def architecture_class(arch: str) -> type[nn.Module]:
    """The segmentation-models-pytorch class of ``arch``, with a clear error for unknown names."""
    cls = smp.MODEL_ARCHITECTURES_MAPPING.get(str(arch).lower())
    if cls is None:
        raise ValueError(f"unknown architecture {arch!r}; choose from {available_architectures()}")
    return cls


def build_network(
    arch: str = "Unet",
    encoder: str = "resnet18",
    encoder_depth: int = 5,
    in_channels: int = 3,
    num_classes: int = 2,
    decoder_channels: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a segmentation-models-pytorch network with random weights.

    Args:
        arch: architecture name, e.g. ``Unet``, ``UnetPlusPlus``, ``FPN``, ``DeepLabV3Plus``.
        encoder: encoder name, e.g. ``resnet18``, ``mobilenet_v2``, ``efficientnet-b0`` or any
            timm encoder with the ``tu-`` prefix (``tu-mobilenetv3_small_100``).
        encoder_depth: number of encoder stages used (3 to 5).
        in_channels: image channels.
        num_classes: output channels (background included).
        decoder_channels: decoder widths for Unet-like architectures; by default smp's widths
            cut to ``encoder_depth`` stages.
        **kwargs: other arguments of the architecture.
    """
    cls = architecture_class(arch)
    params: dict[str, Any] = dict(kwargs)
    signature_params = inspect.signature(cls.__init__).parameters
    if "encoder_depth" in signature_params:
        params["encoder_depth"] = encoder_depth
    if "decoder_channels" in signature_params and cls in (smp.Unet, smp.UnetPlusPlus, smp.MAnet):
        params["decoder_channels"] = tuple(decoder_channels or (256, 128, 64, 32, 16)[:encoder_depth])
    elif decoder_channels is not None:
        params["decoder_channels"] = decoder_channels
    try:
        network = cls(
            encoder_name=encoder,
            encoder_weights=None,
            in_channels=in_channels,
            classes=num_classes,
            **params,
        )
    except KeyError as err:
        if "encoder" in str(err).lower():
            names = smp.encoders.get_encoder_names()
            raise ValueError(
                f"unknown encoder {encoder!r}; choose one of segmentation-models-pytorch's encoders "
                f"({', '.join(names[:12])}, ... {len(names)} in all) or a timm encoder with the "
                f"'tu-' prefix, e.g. 'tu-mobilenetv3_small_100'"
            ) from None
        raise
    prune_unused_modules(network, in_channels)
    return network


def prune_unused_modules(network: nn.Module, in_channels: int, size: int = 64) -> list[str]:
    """Replace layers that a forward pass never calls by ``nn.Identity``.

    segmentation-models-pytorch keeps every encoder stage even when ``encoder_depth`` uses
    fewer; those parameters never receive a gradient, which breaks DDP ("parameters that were
    not used in producing the loss") and wastes optimizer time. One forward pass on a dummy
    input finds them.

    Returns:
        The names of the replaced modules.
    """
    called: set[int] = set()
    hooks = [
        module.register_forward_hook(lambda m, *_: called.add(id(m)))
        for module in network.modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            network(torch.zeros(1, in_channels, size, size))
    finally:
        for hook in hooks:
            hook.remove()
        network.train(was_training)
    pruned = []
    for name, module in list(network.named_modules()):
        if not name or id(module) in called or not any(True for _ in module.parameters()):
            continue
        if any(name.startswith(done + ".") for done in pruned):
            continue
        if any(id(sub) in called for sub in module.modules()):
            continue  # partly used: prune its unused children instead
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        if getattr(parent, child, None) is module:
            setattr(parent, child, nn.Identity())
            pruned.append(name)
    return pruned


class PadToMultiple(nn.Module):
    """Wrap a network so inputs of any size work: pad to a multiple, run, crop back.

    Padding is added at the bottom and on the right by reflection (replication for tiny inputs).
    """

    def __init__(self, network: nn.Module, multiple: int = 32) -> None:
        super().__init__()
        self.network = network
        self.multiple = multiple

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded at the bottom and right to multiples of ``multiple`` (unchanged if already)."""
        height, width = x.shape[-2:]
        pad_h = round_up(height, self.multiple) - height
        pad_w = round_up(width, self.multiple) - width
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return x

    @staticmethod
    def crop(out: torch.Tensor, padded_size: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        """A network output for a padded input of ``padded_size`` cut back to ``size`` ``(H, W)``.

        Some architecture/depth pairs (e.g. FPN with encoder_depth 4) upsample by a fixed factor
        that does not return the input size: the output is resampled to ``padded_size`` first.
        """
        if tuple(out.shape[-2:]) != tuple(padded_size):
            out = F.interpolate(out, size=tuple(padded_size), mode="bilinear", align_corners=False)
        return out[..., : size[0], : size[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = self.pad(x)
        return self.crop(self.network(padded), padded.shape[-2:], x.shape[-2:])


_PREFIXES = ("net.network.", "network.", "net.", "model.", "module.")


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


class PretrainedWeightsError(RuntimeError):
    """Pretrained encoder weights could not be downloaded (no internet, or the hub is down)."""


#: File endings that make a ``weights`` value a path rather than a weight name.
WEIGHT_FILE_ENDINGS = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


def is_weights_file(weights: str | os.PathLike) -> bool:
    """Whether ``weights`` names a file (it exists, has a folder part or a weights file ending)
    rather than a pretrained weight name such as ``imagenet``."""
    text = os.fspath(weights)
    return os.path.exists(text) or "/" in text or os.sep in text or text.lower().endswith(WEIGHT_FILE_ENDINGS)


def huggingface_cache() -> Path:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``, ``HF_HOME``/hub or
    ``~/.cache/huggingface/hub``), where segmentation-models-pytorch and timm keep downloads."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _download_hint(encoder: str, weights: str) -> str:
    """What to fetch, and where to put it, for the pretrained ``weights`` of ``encoder``."""
    recipe = "or save the encoder's weights to a file and set weights: /path/to/file (see docs/pretrained.md)"
    if encoder.startswith("tu-"):
        return (
            f"timm keeps its downloads in the Hugging Face cache {huggingface_cache()} (models--timm--*) or in "
            f"the torch hub cache {torch.hub.get_dir()}/checkpoints; run once on a machine with internet and "
            f"copy that folder here, {recipe}"
        )
    settings = smp.encoders.encoders[encoder]["pretrained_settings"][weights]
    repo, revision = settings["repo_id"], settings["revision"]
    folder = huggingface_cache() / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    return (
        f"fetch https://huggingface.co/{repo}/resolve/{revision}/model.safetensors and config.json and put "
        f"both in {folder}/ (the Hugging Face cache; HF_HUB_CACHE or HF_HOME move it), {recipe}"
    )


def load_pretrained_encoder(
    network: nn.Module, encoder: str, weights: str, in_channels: int = 3, encoder_depth: int = 5
) -> str:
    """Load the pretrained ``weights`` (``imagenet``, ``ssl``..., any timm tag for ``tu-``
    encoders) of ``encoder`` into ``network.encoder``, downloading them once through
    segmentation-models-pytorch / timm.

    Returns:
        ``"encoder"``.

    Raises:
        ValueError: the encoder has no weights of that name (the message lists those it has).
        PretrainedWeightsError: the download failed (offline): the message names the file to
            fetch and the cache folder to put it in.
    """
    timm_encoder = encoder.startswith("tu-")
    if not timm_encoder:
        available = list(smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}))
        if weights not in available:
            raise ValueError(
                f"encoder {encoder!r} has no pretrained weights {weights!r}; choose one of {available} "
                "or give the path of a local weights file"
            )
    try:
        pretrained = smp.encoders.get_encoder(
            encoder, in_channels=in_channels, depth=encoder_depth, weights=True if timm_encoder else weights
        )
    except KeyError as err:
        raise ValueError(f"cannot load pretrained weights {weights!r} of encoder {encoder!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - hub, HTTP and socket errors of several libraries
        reason = str(err).strip().splitlines()[0].split(". ")[0][:160] if str(err).strip() else ""
        raise PretrainedWeightsError(
            f"cannot download the {weights!r} weights of encoder {encoder!r} (offline? "
            f"{type(err).__name__}{': ' + reason if reason else ''}). {_download_hint(encoder, weights)}; "
            "weights: null trains from random initialisation"
        ) from None
    own = network.encoder.state_dict()
    state = {k: v for k, v in pretrained.state_dict().items() if k in own and own[k].shape == v.shape}
    network.encoder.load_state_dict(state, strict=False)
    return "encoder"


def load_weights(
    network: nn.Module,
    path: str | os.PathLike,
    encoder: str | None = None,
    in_channels: int = 3,
    encoder_depth: int = 5,
) -> str:
    """Load weights from a local file into ``network`` (an smp model), or pretrained encoder
    weights by name.

    Accepts a plain state dict of the whole network, a Lightning checkpoint of a defectseg
    model, or an encoder-only state dict (such as ImageNet weights of a torchvision/timm
    backbone saved to disk, see docs/pretrained.md). Files are read with ``weights_only=True``.
    A value that is no file path (``imagenet``...) with ``encoder`` given is a pretrained weight
    name: :func:`load_pretrained_encoder`.

    Returns:
        ``"network"`` or ``"encoder"``: what was loaded.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: nothing in the file matches the network.
        PretrainedWeightsError: a named download failed (offline).
    """
    if encoder is not None and not is_weights_file(path):
        return load_pretrained_encoder(network, encoder, os.fspath(path), in_channels, encoder_depth)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file {path!r} does not exist; give the path of a local state dict or "
            "checkpoint, a pretrained weight name such as imagenet, or weights: null for random initialisation"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    full = {k: v for k, v in state.items() if not k.startswith(("loss_fn.", "criterion."))}
    full = _strip({k: v for k, v in full.items() if "metric" not in k})
    own = network.state_dict()
    if not any(k.startswith("aux_decoders.") for k in own):
        # a UAPS checkpoint into a plain network: its main path has the plain network's names
        full = {k: v for k, v in full.items() if not k.startswith("aux_decoders.")}
    if set(full) == set(own):
        mismatched = [k for k in own if own[k].shape != full[k].shape]
        if mismatched:
            raise ValueError(
                f"{path} matches the network's layers but not their shapes, e.g. {mismatched[0]}: "
                f"file {tuple(full[mismatched[0]].shape)} vs network {tuple(own[mismatched[0]].shape)} "
                "(different num_classes or in_channels?)"
            )
        network.load_state_dict(full)
        return "network"
    encoder_state = {k[len("encoder.") :]: v for k, v in full.items() if k.startswith("encoder.")} or full
    encoder = network.encoder
    enc_own = encoder.state_dict()
    matched = {k: v for k, v in encoder_state.items() if k in enc_own and enc_own[k].shape == v.shape}
    if not matched and all(k.startswith("model.") for k in enc_own):
        # a plain timm model's state dict for a ``tu-`` encoder, which wraps it as ``model``
        prefixed = {f"model.{k}": v for k, v in encoder_state.items()}
        matched = {k: v for k, v in prefixed.items() if k in enc_own and enc_own[k].shape == v.shape}
    if not matched:
        raise ValueError(
            f"no tensor in {path} matches the network or its encoder ({type(encoder).__name__}); "
            "is it the weights of another architecture or encoder?"
        )
    missing = len(enc_own) - len(matched)
    if missing:
        warnings.warn(f"{path}: {missing} encoder tensors were not in the file and stay random", stacklevel=2)
    encoder.load_state_dict(matched, strict=False)
    return "encoder"
