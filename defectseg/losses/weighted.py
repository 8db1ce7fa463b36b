"""Class-weighted cross-entropy: ``wce`` and the class-balanced loss of Cui et al. (``class_balanced``).

Both can take their class weights from the training data: with ``weight="auto"`` (``wce``) or
``samples_per_class="auto"`` (``class_balanced``) the weights are derived from the class pixel
statistics of the datamodule's training split, which
:class:`~defectseg.models.SegmentationModule` hands over in ``setup()`` (see
:mod:`defectseg.losses.statistics`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from defectseg.losses.basic import check_inputs, split_target
from defectseg.losses.registry import register_loss

WeightScheme = Literal["inverse", "inverse_sqrt", "log"]
SCHEMES = ("inverse", "inverse_sqrt", "log")


def frequency_weights(
    frequencies: Sequence[float], scheme: WeightScheme = "inverse", max_weight: float | None = None
) -> list[float]:
    """Class weights from class pixel frequencies.

    ``"inverse"``: ``1 / f_k``; ``"inverse_sqrt"``: ``1 / sqrt(f_k)``; ``"log"``:
    ``1 / ln(1.02 + f_k)`` (ENet, Paszke et al. 2016). The weights are normalised so that
    ``sum_k f_k w_k = 1`` (a pixel drawn from the training distribution weighs 1 on average),
    then capped at ``max_weight``. A class with frequency 0 (absent from the training split)
    gets the largest weight of the others, with a warning.

    Raises:
        ValueError: negative frequencies, all zero, or an unknown scheme.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    freqs = [float(f) for f in frequencies]
    if not freqs or min(freqs) < 0 or sum(freqs) <= 0:
        raise ValueError(f"class frequencies must be non-negative with a positive sum, got {freqs}")
    total = sum(freqs)
    freqs = [f / total for f in freqs]
    present = [f > 0 for f in freqs]
    if scheme == "inverse":
        raw = [1.0 / f if p else 0.0 for f, p in zip(freqs, present)]
    elif scheme == "inverse_sqrt":
        raw = [1.0 / math.sqrt(f) if p else 0.0 for f, p in zip(freqs, present)]
    else:
        raw = [1.0 / math.log(1.02 + f) for f in freqs]
    norm = sum(f * w for f, w in zip(freqs, raw))
    weights = [w / norm for w in raw]
    if not all(present):
        largest = max(w for w, p in zip(weights, present) if p)
        missing = [k for k, p in enumerate(present) if not p]
        warnings.warn(
            f"classes {missing} have frequency 0 in the training statistics; they get the largest "
            f"weight of the others ({largest:.4g})",
            stacklevel=2,
        )
        weights = [w if p else largest for w, p in zip(weights, present)]
    if max_weight is not None:
        if max_weight <= 0:
            raise ValueError(f"max_weight must be > 0, got {max_weight}")
        weights = [min(w, max_weight) for w in weights]
    return weights


@register_loss("wce")
class WeightedCrossEntropyLoss(nn.Module):
    """Cross-entropy with one weight per class, given or derived from class frequencies.

    The value is PyTorch's weighted mean ``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` over the
    pixels not ignored (as ``nn.CrossEntropyLoss(weight=...)``), so only the ratios of the
    weights matter.

    Args:
        weight: ``C`` weights, or ``"auto"`` to derive them from class pixel frequencies with
            ``scheme`` (see :func:`frequency_weights`): from ``class_frequencies`` when given,
            else from the training split's statistics, which ``SegmentationModule`` passes in
            ``setup()`` (or call :meth:`set_class_statistics`).
        scheme: ``"inverse"``, ``"inverse_sqrt"`` or ``"log"`` (for ``weight="auto"``).
        class_frequencies: class pixel shares (background first) for ``weight="auto"``.
        max_weight: optional cap on the derived weights (after normalisation).
        ignore_index: label of pixels that contribute nothing.
    """

    def __init__(
        self,
        weight: Sequence[float] | Literal["auto"] = "auto",
        scheme: WeightScheme = "inverse",
        class_frequencies: Sequence[float] | None = None,
        max_weight: float | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        self.auto = isinstance(weight, str)
        if self.auto and weight != "auto":
            raise ValueError(f"weight must be a list of class weights or 'auto', got {weight!r}")
        self.scheme = scheme
        self.max_weight = max_weight
        self.ignore_index = ignore_index
        self.register_buffer("weight", None, persistent=False)
        if not self.auto:
            values = [float(w) for w in weight]  # type: ignore[union-attr]
            if not values or min(values) < 0:
                raise ValueError(f"class weights must be non-negative, got {values}")
            self.weight = torch.tensor(values, dtype=torch.float32)
        elif class_frequencies is not None:
            self.set_class_statistics(class_frequencies)
        self.wants_class_statistics = self.auto and class_frequencies is None

    def set_class_statistics(
        self, class_frequencies: Sequence[float], class_pixel_counts: Sequence[float] | None = None
    ) -> None:
        """Derive the weights from class pixel frequencies (``weight="auto"`` only)."""
        if not self.auto:
            return
        weights = frequency_weights(class_frequencies, self.scheme, self.max_weight)
        device = self.weight.device if self.weight is not None else None
        self.weight = torch.tensor(weights, dtype=torch.float32, device=device)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        if self.weight is None:
            raise RuntimeError(
                "wce with weight='auto' has no class statistics yet: pass class_frequencies=[...], call "
                "set_class_statistics(...), or train it in a SegmentationModule whose datamodule provides "
                "class_pixel_frequencies('train')"
            )
        if self.weight.numel() != logits.shape[1]:
            raise ValueError(f"wce has {self.weight.numel()} class weights but the logits have {logits.shape[1]} classes")
        valid = target != self.ignore_index
        if not valid.any():
            return logits.float().sum() * 0.0
        return F.cross_entropy(
            logits.float(), target.long(), weight=self.weight.to(logits.device), ignore_index=self.ignore_index
        )

    def extra_repr(self) -> str:
        return f"weight={'auto' if self.auto else ''}{self.weight.tolist() if self.weight is not None else ''}"


def class_balanced_weights(samples_per_class: Sequence[float], beta: float) -> list[float]:
    """Cui et al.'s weights ``(1 - beta) / (1 - beta ** n_k)``, normalised to sum to ``C``.

    Computed in double precision with ``expm1`` so that ``beta`` close to 1 (as pixel counts
    need) stays exact; ``n_k`` below 1 (a class absent from the data) counts as 1.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = [max(float(n), 1.0) for n in samples_per_class]
    if not counts:
        raise ValueError("samples_per_class is empty")
    if beta == 0.0:
        raw = [1.0] * len(counts)
    else:
        log_beta = math.log(beta)
        raw = [math.expm1(log_beta) / math.expm1(n * log_beta) for n in counts]
    scale = len(raw) / sum(raw)
    return [w * scale for w in raw]


@register_loss("class_balanced")
class ClassBalancedLoss(nn.Module):
    """Class-balanced loss of Cui et al. (CVPR 2019), effective number of samples.

    ``loss = mean_i w_{y_i} (1 - p_i)^gamma (-ln p_i)`` over the pixels not ignored, with
    ``w_k = (1 - beta) / (1 - beta ** n_k)`` normalised to ``sum_k w_k = C`` as in the paper
    (``gamma = 0``: softmax cross-entropy; ``gamma > 0``: focal). The mean divides by the
    number of pixels, not by the sum of the weights (again as in the paper).

    ``n_k`` are numbers of pixels, so useful values of ``beta`` are very close to 1: classes
    with more than about ``1 / (1 - beta)`` pixels saturate (all get the same weight). The
    default ``beta = 1 - 1e-6`` separates classes of up to a few million training pixels.

    Args:
        beta: in ``[0, 1)``; 0 gives equal weights.
        samples_per_class: ``n_k`` per class (background first), or ``"auto"`` for the training
            split's class pixel counts (passed by ``SegmentationModule`` in ``setup()``).
        gamma: focal exponent (0 for cross-entropy).
        ignore_index: label of pixels that contribute nothing.
    """

    def __init__(
        self,
        beta: float = 0.999999,
        samples_per_class: Sequence[float] | Literal["auto"] = "auto",
        gamma: float = 0.0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.ignore_index = ignore_index
        self.auto = isinstance(samples_per_class, str)
        if self.auto and samples_per_class != "auto":
            raise ValueError(f"samples_per_class must be a list of counts or 'auto', got {samples_per_class!r}")
        self.register_buffer("weight", None, persistent=False)
        if not self.auto:
            self._set_counts(samples_per_class)  # type: ignore[arg-type]
        self.wants_class_statistics = self.auto

    def _set_counts(self, counts: Sequence[float]) -> None:
        if min(float(n) for n in counts) < 0:
            raise ValueError(f"samples_per_class must be non-negative, got {list(counts)}")
        device = self.weight.device if self.weight is not None else None
        self.weight = torch.tensor(class_balanced_weights(counts, self.beta), dtype=torch.float32, device=device)

    def set_class_statistics(
        self, class_frequencies: Sequence[float], class_pixel_counts: Sequence[float] | None = None
    ) -> None:
        """Take ``n_k`` from the training split's class pixel counts (``samples_per_class="auto"``)."""
        if not self.auto:
            return
        if class_pixel_counts is None:
            raise ValueError(
                "class_balanced with samples_per_class='auto' needs class pixel counts, but the datamodule "
                "gives only frequencies; pass samples_per_class=[...]"
            )
        self._set_counts(class_pixel_counts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        if self.weight is None:
            raise RuntimeError(
                "class_balanced with samples_per_class='auto' has no class counts yet: pass "
                "samples_per_class=[...], call set_class_statistics(...), or train it in a SegmentationModule "
                "whose datamodule provides class statistics"
            )
        num_classes = logits.shape[1]
        if self.weight.numel() != num_classes:
            raise ValueError(
                f"class_balanced has {self.weight.numel()} class weights but the logits have {num_classes} classes"
            )
        safe, valid = split_target(target, num_classes, self.ignore_index)
        if not valid.any():
            return logits.float().sum() * 0.0
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -log_p
        if self.gamma > 0:
            loss = loss * (1.0 - log_p.exp()).clamp(min=0.0) ** self.gamma
        loss = loss * self.weight.to(logits.device)[safe]
        return loss[valid].mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, samples_per_class={'auto' if self.auto else 'given'}"
