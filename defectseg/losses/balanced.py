"""The balanced loss of Xie et al. (Applied Sciences 13(2), 826, 2023) and its three components.

Per pixel with annotated class ``k`` and predicted probability ``p`` of that class, the error is
``eps = 1 - p`` and::

    loss = reduce( TruncCE(eps) * M_class * M_confusion )      over the pixels not ignored

* :func:`truncated_cross_entropy` -- cross-entropy with a flat zero for easy pixels
  (``eps < eps_inf``) and a linear tail for very hard ones (``eps > eps_sup``);
* :func:`class_weight_map` -- dynamical class weighting from each image's own annotation,
  with effective numbers of pixels ``(1 - beta) / (1 - beta ** N_k)``;
* :func:`~defectseg.losses.confusion.confusion_suppression_map` (its own module, with the
  bit-packed kernel) -- ``1 - H / ln C``, ``H`` the entropy of the labels in an ``r x r``
  window: pixels on class boundaries, whose labels are the least certain, weigh less.

The paper published no code; this module is the reference implementation. Each component is
usable on its own (the truncated cross-entropy as a loss, the two maps as functions returning
``(B, H, W)`` weights), and :class:`BalancedLoss` combines them with a switch for each.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from defectseg.losses.basic import Labels, check_inputs, validated_labels
from defectseg.losses.confusion import check_window, confusion_map
from defectseg.losses.registry import register_loss

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")


def _check_truncation(eps_inf: float, eps_sup: float) -> None:
    if not (0.0 <= eps_inf < 1.0 and eps_inf <= eps_sup <= 1.0):
        raise ValueError(
            f"truncation needs 0 <= eps_inf <= eps_sup <= 1 and eps_inf < 1; got eps_inf={eps_inf}, "
            f"eps_sup={eps_sup} (eps_inf=0, eps_sup=1 gives plain cross-entropy)"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ---------------------------------------------------------------------------- truncated CE
def truncated_ce_from_error(error: torch.Tensor, eps_inf: float = 0.3, eps_sup: float = 0.7) -> torch.Tensor:
    """The truncated cross-entropy as a function of the error ``eps = 1 - p`` (elementwise).

    ``0`` for ``eps < eps_inf``; ``-ln(1 - eps) - t_inf`` for ``eps_inf <= eps <= eps_sup``;
    ``(eps - eps_sup) / (1 - eps_sup) + t_sup - t_inf`` for ``eps > eps_sup``, with
    ``t_x = -ln(1 - eps_x)``. Differentiable with autograd; its derivative is 0, ``1/(1 - eps)``
    and ``1/(1 - eps_sup)`` on the three pieces. Used for plots and as an independent check of
    :func:`truncated_cross_entropy`, which works from logits.

    Args:
        error: errors in ``[0, 1]``.
        eps_inf: lower truncation point.
        eps_sup: upper truncation point (``1`` disables the linear tail).
    """
    _check_truncation(eps_inf, eps_sup)
    t_inf = -math.log1p(-eps_inf)
    in_middle = (error >= eps_inf) & (error <= eps_sup)
    # evaluate (and differentiate) the logarithm only on its own piece: no inf, no 0 * inf
    middle = -torch.log1p(-torch.where(in_middle, error, torch.full_like(error, eps_inf))) - t_inf
    out = torch.where(in_middle, middle, torch.zeros_like(middle))
    if eps_sup < 1.0:
        t_sup = -math.log1p(-eps_sup)
        tail = (error - eps_sup) / (1.0 - eps_sup) + (t_sup - t_inf)
        out = torch.where(error > eps_sup, tail, out)
    return out


class _TruncatedCE(torch.autograd.Function):
    """Per-pixel ``weight * TruncCE(1 - p)`` from logits, with its exact piecewise gradient.

    With ``k = 1/(1 - eps_sup)``::

        TruncCE = relu(1 - k p) - clamp(log p, -t_sup, -t_inf) - t_inf

    which equals the three pieces of :func:`truncated_ce_from_error`. Its gradient with respect
    to the logits is ``s * (softmax - onehot)`` with ``s = p * dTruncCE/deps``: 0 below
    ``eps_inf``, exactly 1 in the middle piece (the cross-entropy gradient) and ``k p`` in the
    tail, i.e. ``s = min(k p, 1) = 1 - relu(1 - k p)`` above ``eps_inf``. No ``0 * inf`` can occur
    as ``p`` tends to 0 or 1. ``weight`` (``(B, H, W)`` or ``None``) multiplies both.

    With a tail (``eps_sup < 1``) ``log p`` only matters inside ``[-t_sup, -t_inf]``, so the
    forward pass needs the probabilities alone: one ``softmax`` (``log p`` is taken at the
    annotated class only; a ``p`` that underflows to 0 gives ``-inf``, clamped to ``-t_sup``),
    and the backward pass turns them into the gradient in place. Without a tail the loss grows
    like ``-log p`` without bound, so ``log p`` comes from ``log_softmax`` (finite for any finite
    logit) and is exponentiated in the backward pass.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, eps_inf, eps_sup):  # type: ignore[override]
        needs_grad = ctx.needs_input_grad[0]
        index = target.unsqueeze(1)
        factor = None
        t_inf = -math.log1p(-eps_inf)
        if eps_sup < 1.0:
            probs = torch.softmax(logits, dim=1)
            p = probs.gather(1, index).squeeze(1)
            t_sup = -math.log1p(-eps_sup)
            loss = torch.rsub(p, 1.0, alpha=1.0 / (1.0 - eps_sup)).clamp_(min=0.0)  # relu(1 - k p)
            if needs_grad:  # s = min(k p, 1) = 1 - relu(1 - k p), times the weight; 0 on the flat piece
                if weight is None and eps_inf == 0.0:
                    factor = torch.rsub(loss, 1.0)
                else:
                    w = torch.ones_like(p) if weight is None else weight
                    if eps_inf > 0.0:
                        w = w.masked_fill(p > 1.0 - eps_inf, 0.0)
                    factor = torch.addcmul(w, loss, w, value=-1.0)
            loss.sub_(p.log_().clamp_(min=-t_sup, max=-t_inf)).sub_(t_inf)  # p is not needed any more
            if weight is not None:
                loss.mul_(weight)
            saved, saved_is_log = probs, False
        else:
            log_probs = torch.log_softmax(logits, dim=1)
            log_p = log_probs.gather(1, index).squeeze(1)
            if eps_inf == 0.0:
                loss = log_p.neg()
            else:
                if needs_grad:
                    factor = torch.ones_like(log_p).masked_fill_(log_p > -t_inf, 0.0)
                loss = log_p.clamp(max=-t_inf).neg_().sub_(t_inf)
            if weight is not None:
                loss.mul_(weight)
                if needs_grad:
                    factor = weight if factor is None else factor.mul_(weight)
            saved, saved_is_log = log_probs, True
        ctx.saved_is_log = saved_is_log
        ctx.save_for_backward(saved, target, factor)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "the truncated cross-entropy's backward turns its saved probabilities into the "
                "gradient in place, so it runs once per forward: backward(retain_graph=True) twice "
                "is not supported; compute the loss again for a second backward"
            )
        ctx.consumed = True
        saved, target, factor = ctx.saved_tensors
        scale = grad_output if factor is None else factor * grad_output
        # in place: saves allocating (and faulting in) a logits-sized tensor
        grad = saved.exp_() if ctx.saved_is_log else saved
        minus_one = torch.full((1, 1, 1, 1), -1.0, device=grad.device, dtype=grad.dtype)
        grad.scatter_add_(1, target.unsqueeze(1), minus_one.expand_as(target.unsqueeze(1)))  # softmax - onehot
        grad.mul_(scale.unsqueeze(1))
        return grad, None, None, None, None


def _reduce(loss_map: torch.Tensor, num_valid: torch.Tensor | int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_map
    total = loss_map.sum()
    if reduction == "sum":
        return total
    # mean over the pixels that are not ignored; 0 (with a graph) when there are none
    if isinstance(num_valid, int):
        return total / max(num_valid, 1)
    return total / num_valid.clamp(min=1).to(total.dtype)


def truncated_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps_inf: float = 0.3,
    eps_sup: float = 0.7,
    ignore_index: int = 255,
    reduction: Reduction = "mean",
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Truncated cross-entropy of Xie et al. from logits; see :func:`truncated_ce_from_error`.

    Computed in float32 from ``log_softmax`` whatever the logits' dtype (float16/bfloat16 under
    autocast included), so it is finite for every finite logit; its gradient is exact (0,
    ``1/(1 - eps)`` and ``1/(1 - eps_sup)`` times ``d eps``) and bounded by
    ``max(1, 1/(1 - eps_sup))`` per logit. With ``eps_inf = 0`` and ``eps_sup = 1`` it is the
    cross-entropy.

    Args:
        logits: ``(B, C, H, W)`` scores.
        target: ``(B, H, W)`` class indices (``ignore_index`` for unlabelled pixels).
        eps_inf: errors below it cost nothing.
        eps_sup: errors above it grow linearly (``1`` disables the tail).
        ignore_index: label of pixels that contribute nothing.
        reduction: ``"mean"`` over the pixels not ignored, ``"sum"``, or ``"none"`` for the
            ``(B, H, W)`` map (0 at ignored pixels).
        pixel_weight: optional ``(B, H, W)`` weights multiplying each pixel's loss (for example
            the product of :func:`class_weight_map` and :func:`confusion_suppression_map`);
            no gradient flows into them, and the mean still divides by the number of pixels
            not ignored.
    """
    check_inputs(logits, target)
    _check_truncation(eps_inf, eps_sup)
    _check_reduction(reduction)
    labels = validated_labels(target, logits.shape[1], ignore_index)
    weight = None if labels.valid is None else labels.valid.to(torch.float32)
    if pixel_weight is not None:
        if pixel_weight.shape != target.shape:
            raise ValueError(
                f"pixel_weight must have the target's shape {tuple(target.shape)}, got {tuple(pixel_weight.shape)}"
            )
        pixel_weight = pixel_weight.detach().to(device=logits.device, dtype=torch.float32)
        weight = pixel_weight if weight is None else weight * pixel_weight
    loss_map = _TruncatedCE.apply(logits.float(), labels.safe, weight, float(eps_inf), float(eps_sup))
    return _reduce(loss_map, labels.num_valid, reduction)


@register_loss("truncated_ce")
class TruncatedCrossEntropyLoss(nn.Module):
    """The truncated cross-entropy of the balanced loss, on its own (see :func:`truncated_cross_entropy`).

    Args:
        eps_inf: errors ``1 - p`` below it cost nothing (easy pixels stop pulling).
        eps_sup: errors above it grow linearly with slope ``1/(1 - eps_sup)`` instead of
            ``-ln(1 - eps)`` (outliers and label noise stop dominating); ``1`` disables it.
        ignore_index: label of pixels that contribute nothing.
        reduction: ``"mean"`` (over pixels not ignored), ``"sum"`` or ``"none"``.
    """

    def __init__(
        self, eps_inf: float = 0.3, eps_sup: float = 0.7, ignore_index: int = 255, reduction: Reduction = "mean"
    ) -> None:
        super().__init__()
        _check_truncation(eps_inf, eps_sup)
        _check_reduction(reduction)
        self.eps_inf, self.eps_sup = float(eps_inf), float(eps_sup)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return truncated_cross_entropy(
            logits, target, self.eps_inf, self.eps_sup, self.ignore_index, self.reduction
        )

    def extra_repr(self) -> str:
        return f"eps_inf={self.eps_inf}, eps_sup={self.eps_sup}, reduction={self.reduction!r}"


# ---------------------------------------------------------------------------- class weights
def _count_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _counts(labels: Labels, num_classes: int) -> torch.Tensor:
    """``(B, C + 1)`` pixel counts per image; the last column counts ignored pixels."""
    label = labels.label
    batch = label.shape[0]
    flat = label.reshape(batch, -1)
    dtype = _count_dtype(label.device)
    slots = num_classes + 1
    # one scatter for the whole batch, in integers where the device has them (exact, and faster
    # than bincount on the CPU); MPS counts in float32 as it has no float64
    accumulate = dtype if label.device.type == "mps" else torch.int64
    counts = torch.zeros(batch, slots, dtype=accumulate, device=label.device)
    ones = torch.ones(1, 1, dtype=accumulate, device=label.device).expand_as(flat)
    return counts.scatter_add_(1, flat, ones).to(dtype)


def class_pixel_counts(target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Pixels of each class in each image: ``(B, C)`` float (ignored pixels not counted)."""
    if target.ndim < 2:
        raise ValueError(f"target must be (B, H, W), got shape {tuple(target.shape)}")
    return _counts(validated_labels(target, num_classes, ignore_index), num_classes)[:, :num_classes]


def effective_number_weights(
    counts: torch.Tensor,
    beta: float = 0.99,
    unit: Literal["percent", "pixels"] = "percent",
    max_weight: float | None = None,
) -> torch.Tensor:
    """Dynamical class weights of each image from its class pixel counts.

    ``w_k = (1 - beta) / (1 - beta ** N_k)`` (the inverse effective number of Cui et al.),
    normalised per image by the weight of the image's most frequent class, so that
    ``w_k = (1 - beta ** N_dom) / (1 - beta ** N_k)``: the dominant class (usually the
    background) weighs exactly 1 and rarer classes more. ``beta = 0`` gives 1 for every class,
    ``beta = 1`` the inverse frequency ``N_dom / N_k``.

    Args:
        counts: ``(B, C)`` pixel counts per image (see :func:`class_pixel_counts`).
        beta: in ``[0, 1]``.
        unit: ``"percent"`` (default): ``N_k`` is the share of the image's labelled pixels, in
            percent, so the weights do not depend on the image resolution and ``beta = 0.99``
            saturates at the whole image (a class covering 3 %, 5 % or 10 % of an image gets
            about 21, 12.6 or 6.2: the 6 to 20 the paper reports for rare classes).
            ``"pixels"``: ``N_k`` is the raw pixel count, as the formula is written (at
            ``beta = 0.99`` only classes of fewer than ~100 pixels are then up-weighted).
        max_weight: optional cap on the weights (>= 1).

    Returns:
        ``(B, C)`` weights (float32, or the dtype of float ``counts``), 0 for the classes absent
        from an image.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if unit not in ("percent", "pixels"):
        raise ValueError(f"unit must be 'percent' or 'pixels', got {unit!r}")
    if max_weight is not None and max_weight < 1.0:
        raise ValueError(f"max_weight must be >= 1 (the dominant class weighs 1), got {max_weight}")
    if counts.ndim != 2:
        raise ValueError(f"counts must be (B, C), got shape {tuple(counts.shape)}")
    if not counts.is_floating_point():
        counts = counts.to(torch.float32)
    present = counts > 0
    amount = counts
    if unit == "percent":
        amount = counts * (100.0 / counts.sum(dim=1, keepdim=True).clamp(min=1.0))
    dominant = amount.max(dim=1, keepdim=True).values
    safe_amount = torch.where(present, amount, torch.ones_like(amount))
    if beta == 0.0:
        weights = torch.ones_like(amount)
    elif beta == 1.0:
        weights = dominant / safe_amount
    else:
        log_beta = math.log(beta)
        weights = torch.expm1(dominant * log_beta) / torch.expm1(safe_amount * log_beta)
    if max_weight is not None:
        weights = weights.clamp(max=max_weight)
    return torch.where(present, weights, torch.zeros_like(weights))


def class_weight_map(
    target: torch.Tensor,
    num_classes: int,
    beta: float = 0.99,
    ignore_index: int = 255,
    unit: Literal["percent", "pixels"] = "percent",
    max_weight: float | None = None,
) -> torch.Tensor:
    """``M_class``: each pixel's dynamical class weight, from its own image's annotation.

    See :func:`effective_number_weights` for the formula and the normalisation. Vectorised
    (one ``bincount`` or ``scatter_add`` and one ``gather`` for the whole batch), on the
    target's device.

    Returns:
        ``(B, H, W)`` float32; 0 at ignored pixels.
    """
    if target.ndim != 3:
        raise ValueError(f"target must be (B, H, W), got shape {tuple(target.shape)}")
    effective_number_weights(torch.ones(1, 1), beta, unit, max_weight)  # validates the arguments
    return _class_weight_map(validated_labels(target, num_classes, ignore_index), num_classes, beta, unit, max_weight)


def _class_weight_map(labels: Labels, num_classes, beta, unit, max_weight) -> torch.Tensor:
    counts = _counts(labels, num_classes)
    weights = effective_number_weights(counts[:, :num_classes], beta, unit, max_weight)
    table = F.pad(weights.to(torch.float32), (0, 1))  # ignored pixels (label C) weigh 0
    label = labels.label
    return table.gather(1, label.reshape(label.shape[0], -1)).view(label.shape)


# ---------------------------------------------------------------------------- the loss
@register_loss("balanced")
class BalancedLoss(nn.Module):
    """Balanced loss: ``reduce(TruncCE * M_class * M_confusion)`` (Xie et al., 2023).

    * **Truncated cross-entropy** (``truncation``): see :func:`truncated_cross_entropy`.
    * **Dynamical class weighting** (``class_weighting``): ``M_class`` from each image's own
      annotation, ``(1 - beta ** N_dom) / (1 - beta ** N_k)`` (see
      :func:`effective_number_weights` for the normalisation and ``class_weight_unit``).
    * **Label-confusion suppression** (``confusion_suppression``): ``1 - H / ln C`` over a
      ``window x window`` neighbourhood (see :func:`confusion_suppression_map`).

    Both maps depend on the annotation only; they are recomputed on the batch's device at
    every call (so they follow augmentation and label injection) and carry no gradient. The
    reduction ``"mean"`` divides by the number of pixels not ignored (not by the sum of the
    weights), so with every component off the loss is the cross-entropy exactly, and with
    ``eps_inf = 0, eps_sup = 1`` the truncation is the cross-entropy.

    Args:
        beta: class-weighting parameter in ``[0, 1]`` (0: every class weighs 1).
        eps_inf: lower truncation point of the error ``1 - p``.
        eps_sup: upper truncation point (linear tail above it).
        window: odd side of the confusion window.
        class_weighting: use ``M_class``.
        truncation: use the truncated cross-entropy (else the plain cross-entropy).
        confusion_suppression: use ``M_confusion``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the ``(B, H, W)`` map).
        ignore_index: label of pixels that contribute nothing.
        class_weight_unit: ``"percent"`` (default, resolution independent) or ``"pixels"``:
            the unit of ``N_k``.
        max_class_weight: optional cap on ``M_class``.
    """

    def __init__(
        self,
        beta: float = 0.99,
        eps_inf: float = 0.3,
        eps_sup: float = 0.7,
        window: int = 7,
        class_weighting: bool = True,
        truncation: bool = True,
        confusion_suppression: bool = True,
        reduction: Reduction = "mean",
        ignore_index: int = 255,
        class_weight_unit: Literal["percent", "pixels"] = "percent",
        max_class_weight: float | None = None,
    ) -> None:
        super().__init__()
        _check_truncation(eps_inf, eps_sup)
        _check_reduction(reduction)
        check_window(window)
        effective_number_weights(torch.ones(1, 1), beta, class_weight_unit, max_class_weight)  # validates
        self.beta = float(beta)
        self.eps_inf, self.eps_sup = float(eps_inf), float(eps_sup)
        self.window = window
        self.class_weighting = class_weighting
        self.truncation = truncation
        self.confusion_suppression = confusion_suppression
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.class_weight_unit = class_weight_unit
        self.max_class_weight = max_class_weight

    def pixel_weights(self, target: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``M_class * M_confusion`` (the components switched on) for ``target``: ``(B, H, W)``,
        1 where no component applies and 0 at ignored pixels."""
        if target.ndim != 3:
            raise ValueError(f"target must be (B, H, W), got shape {tuple(target.shape)}")
        labels = validated_labels(target, num_classes, self.ignore_index)
        weight = self._pixel_weights(labels, num_classes)
        if weight is None:
            weight = torch.ones(target.shape, device=target.device)
            if labels.valid is not None:
                weight = weight * labels.valid
        return weight

    def _pixel_weights(self, labels: Labels, num_classes: int) -> torch.Tensor | None:
        weight = None
        if self.class_weighting:
            weight = _class_weight_map(labels, num_classes, self.beta, self.class_weight_unit, self.max_class_weight)
        if self.confusion_suppression:  # multiplied into the class weights in place
            weight = confusion_map(labels, num_classes, self.window, "auto", into=weight)
        return weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_inputs(logits, target)
        num_classes = logits.shape[1]
        if not (self.class_weighting or self.truncation or self.confusion_suppression):
            # plain cross-entropy, bit for bit
            if self.reduction == "mean" and not (target != self.ignore_index).any():
                return logits.float().sum() * 0.0
            return F.cross_entropy(
                logits.float(), target.long(), ignore_index=self.ignore_index, reduction=self.reduction
            )
        if self.confusion_suppression and num_classes < 2:
            raise ValueError("confusion suppression needs at least 2 classes")
        labels = validated_labels(target, num_classes, self.ignore_index)
        weight = self._pixel_weights(labels, num_classes)
        if weight is None and labels.valid is not None:
            weight = labels.valid.to(torch.float32)
        eps_inf, eps_sup = (self.eps_inf, self.eps_sup) if self.truncation else (0.0, 1.0)
        loss_map = _TruncatedCE.apply(logits.float(), labels.safe, weight, eps_inf, eps_sup)
        return _reduce(loss_map, labels.num_valid, self.reduction)

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        if self.truncation:
            parts.append(f"eps_inf={self.eps_inf}, eps_sup={self.eps_sup}")
        if self.class_weighting:
            parts.append(f"beta={self.beta}, class_weight_unit={self.class_weight_unit!r}")
        if self.confusion_suppression:
            parts.append(f"window={self.window}")
        return ", ".join(parts)
