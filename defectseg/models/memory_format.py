"""Memory format of the network's activations: channels_last where it makes a step faster.

A convolution network in ``torch.channels_last`` (NHWC) format runs oneDNN's and cuDNN's fastest
kernels, most of all under bf16 autocast: on an AVX512-BF16 CPU a bf16 + channels_last training step
of a ResNet-18 U-Net (depth 3) is 1.3x (128x128) to 1.45x (256x256) faster than bf16 alone (see
``benchmarks/train_speed.py``). Both LightningModules take ``channels_last: auto | true | false``
and resolve it here.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from torch import nn

ChannelsLast = Union[Literal["auto"], bool]

#: device types on which ``auto`` turns channels_last on (MPS and others keep the default layout)
AUTO_DEVICE_TYPES = ("cpu", "cuda")


def check_channels_last(setting: object) -> ChannelsLast:
    """Validate a ``channels_last`` setting (``"auto"``, ``True`` or ``False``; the strings
    ``"true"``/``"false"`` from a command line are accepted) and return it normalised."""
    if isinstance(setting, bool) or setting == "auto":
        return setting  # type: ignore[return-value]
    if isinstance(setting, str) and setting.lower() in ("true", "false"):
        return setting.lower() == "true"
    raise ValueError(f"channels_last must be 'auto', true or false, got {setting!r}")


def resolve_channels_last(setting: ChannelsLast, device: torch.device | str) -> bool:
    """Whether to run in channels_last on ``device``: ``auto`` is on for CPU and CUDA."""
    setting = check_channels_last(setting)
    if setting == "auto":
        return torch.device(device).type in AUTO_DEVICE_TYPES
    return bool(setting)


def apply_memory_format(module: nn.Module, enabled: bool) -> nn.Module:
    """Convert ``module``'s 4-d parameters (convolution weights) to channels_last, or back."""
    return module.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)


def to_memory_format(images: torch.Tensor, enabled: bool) -> torch.Tensor:
    """A 4-d image batch in channels_last when ``enabled`` (other tensors unchanged)."""
    if enabled and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images
