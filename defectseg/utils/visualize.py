"""Colour palettes, mask colouring and overlays for predictions and W&B images."""

from __future__ import annotations

import numpy as np
import torch

from defectseg.data.contract import IGNORE_INDEX

_BASE_PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    dtype=np.uint8,
)


def palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` RGB colours; background is black."""
    if num_classes <= len(_BASE_PALETTE):
        return _BASE_PALETTE[:num_classes].copy()
    rng = np.random.default_rng(0)
    extra = rng.integers(40, 256, (num_classes - len(_BASE_PALETTE), 3), dtype=np.uint8)
    return np.concatenate([_BASE_PALETTE, extra])


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """RGB image ``(H, W, 3)`` of a class-index mask; ignored pixels are grey."""
    colours = palette(num_classes)
    out = np.zeros((*mask.shape, 3), np.uint8)
    valid = (mask != IGNORE_INDEX) & (mask < num_classes)
    out[valid] = colours[mask[valid]]
    out[mask == IGNORE_INDEX] = 128
    return out


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """Blend the colours of defect pixels (class >= 1) over an RGB or gray ``uint8`` image."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    elif image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    colours = colorize(mask, num_classes).astype(np.float32)
    defect = ((mask > 0) & (mask != IGNORE_INDEX))[..., None]
    blended = np.where(defect, (1 - alpha) * image.astype(np.float32) + alpha * colours, image)
    return blended.clip(0, 255).astype(np.uint8)


def denormalize(image: torch.Tensor, mean, std) -> np.ndarray:
    """``(C, H, W)`` normalised tensor back to an ``(H, W, C)`` ``uint8`` array."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    raw = (image.detach().float().cpu() * std_t + mean_t) * 255.0
    return raw.clamp(0, 255).byte().permute(1, 2, 0).numpy()
