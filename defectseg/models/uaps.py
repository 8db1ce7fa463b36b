"""UAPS: semi-supervised segmentation with uncertainty-aware, dynamically mixed pseudo-labels.

Sime, Wang, Zeng and Peng, "Uncertainty-aware and dynamically-mixed pseudo-labels for
semi-supervised defect segmentation", Computers in Industry 152 (2023).

A shared encoder feeds a main decoder and ``N`` auxiliary decoders (:class:`UAPSNet`), the
auxiliary ones on perturbed features. Each training step takes a labelled and an unlabelled
batch (the datamodule's semi-supervised mode, :mod:`defectseg.data.semi`). The defaults follow
the reference code (djene-mengistu/UAPS, ``UAPS_train.py``):

* **Supervised**: the registry loss (default ``0.5 * ce + 0.5 * dice``, the reference's
  ``0.5 * (CE + Dice)``) of every decoder on the labelled batch, averaged over the
  ``K = N + 1`` decoders.
* **Unsupervised**: with ``p_k`` the softmax of decoder ``k`` on the unlabelled batch,

  - mixing weights ``w ~ Dirichlet(1, ..., 1)``, drawn anew at every step;
  - pseudo-label ``y = argmax_c sum_k w_k p_k`` (computed without gradient);
  - uncertainty per pixel ``u_k = KL(p_mean || p_k) = sum_c p_mean,c (log p_mean,c - log p_k,c)``
    with ``p_mean = (1/K) sum_k p_k``;
  - pseudo-label term of decoder ``k``: ``pseudo_loss: reference`` (default) is
    ``0.5 * (CE(p_k, y) + Dice(p_k, y)) * mean_px(exp(-u_k))``, the reference's form;
    ``pseudo_loss: pixelwise`` is ``mean_px(exp(-u_k) * CE(p_k, y))``, each pixel weighted
    by its own certainty (the paper's intent);
  - ``L_ps = (1/K) sum_k pseudo_k`` and ``L_unc = (1/K) sum_k mean_px(u_k)``.

  The terms are averaged over the decoders (the paper writes a sum, the reference averages),
  so the weights need no change when ``num_aux_decoders`` changes. Gradients flow through
  ``u_k`` in both places (``detach_uncertainty_weight`` stops them in ``exp(-u_k)``).
* **Total**: ``L = L_sup + w(t) * (L_ps + lambda_u * L_unc)`` with
  ``w(t) = unsupervised_weight * exp(-5 (1 - t)^2)``, ``t = min(1, s / rampup_steps)`` and
  ``s`` the global step rounded down to a multiple of ``rampup_interval`` (the reference
  ramps in blocks of 40-80 iterations). ``uncertainty_rampup: false`` adds the uncertainty
  term outside the ramp, ``L = L_sup + w(t) L_ps + lambda_u L_unc`` (the reference's
  Magnetic Tile script, with ``lambda_u = 1``).

Validation, test, predict and export run the main decoder only (``forward``), so inference costs
the same as a plain network. ``unsupervised_weight: 0`` trains the same network on the labelled
subset only (the unlabelled batches are not even run through it): the supervised baseline.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from defectseg.data.contract import IGNORE_INDEX, check_batch
from defectseg.losses import CombinedLoss, DiceLoss
from defectseg.models.memory_format import to_memory_format
from defectseg.models.segmentation import SegmentationModule
from defectseg.models.uaps_net import UAPSNet


def rampup(step: int, length: int, interval: int = 1) -> float:
    """Sigmoid-shaped ramp ``exp(-5 (1 - t)^2)``, ``t = clip(s / length, 0, 1)``; 1 when ``length <= 0``.

    ``s`` is ``step`` rounded down to a multiple of ``interval``: the reference evaluates its
    ramp at ``iteration // interval`` over ``length / interval`` units, a staircase.
    """
    if interval < 1:
        raise ValueError(f"rampup_interval must be >= 1, got {interval}")
    if length <= 0:
        return 1.0
    step = (int(step) // interval) * interval
    t = min(max(float(step) / float(length), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def sample_mixing_weights(
    count: int, concentration: float = 1.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Mixing weights ``w ~ Dirichlet(concentration, ..., concentration)`` of ``count`` decoders.

    Drawn from torch's global generator (seeded by ``seed_everything``); positive, summing to 1.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if concentration <= 0:
        raise ValueError(f"mixing_concentration must be > 0, got {concentration}")
    if count == 1:
        return torch.ones(1, device=device)
    alpha = torch.full((count,), float(concentration), dtype=torch.float64)
    weights = torch.distributions.Dirichlet(alpha).sample()
    return (weights / weights.sum()).to(device=device, dtype=torch.float32)


@torch.no_grad()
def mix_pseudo_labels(probs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Pseudo-label ``argmax_c sum_k w_k p_k`` ``(B, H, W)`` long, computed without gradient.

    Args:
        probs: the decoders' probabilities, each ``(B, C, H, W)``.
        weights: one mixing weight per decoder ``(K,)``.
    """
    if len(probs) != weights.numel():
        raise ValueError(f"{len(probs)} predictions but {weights.numel()} mixing weights")
    stacked = torch.stack([p.detach() for p in probs])  # (K, B, C, H, W)
    mixed = (weights.to(stacked).view(-1, 1, 1, 1, 1) * stacked).sum(dim=0)
    return mixed.argmax(dim=1)


def kl_uncertainty(mean_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``KL(p_mean || p_k) = sum_c p_mean,c (log p_mean,c - log p_k,c)``, ``(B, H, W)``.

    Args:
        mean_probs: the mean prediction ``p_mean`` ``(B, C, H, W)``.
        log_probs: ``log p_k`` ``(B, C, H, W)`` (log-softmax of decoder ``k``).
    """
    return (torch.xlogy(mean_probs, mean_probs) - mean_probs * log_probs).sum(dim=1)


def valid_pixels(valid_size: torch.Tensor | None, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Boolean ``(B, H, W)`` map of the picture region (top-left ``valid_size``) of padded images."""
    batch, height, width = shape
    if valid_size is None:
        return torch.ones(batch, height, width, dtype=torch.bool, device=device)
    valid_size = torch.as_tensor(valid_size, device=device)
    rows = torch.arange(height, device=device).view(1, -1, 1) < valid_size[:, 0].view(-1, 1, 1)
    cols = torch.arange(width, device=device).view(1, 1, -1) < valid_size[:, 1].view(-1, 1, 1)
    return rows & cols


PSEUDO_LOSSES = ("reference", "pixelwise")


def uaps_unsupervised_loss(
    logits: Sequence[torch.Tensor],
    mixing_weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    uncertainty_weight: float = 1.0,
    detach_uncertainty_weight: bool = False,
    pseudo_loss: Literal["reference", "pixelwise"] = "reference",
    dice: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The UAPS loss on an unlabelled batch.

    Args:
        logits: every decoder's logits ``(B, C, H, W)``, main first.
        mixing_weights: ``(K,)`` weights of the pseudo-label mixture (sum 1).
        valid: ``(B, H, W)`` bool map of the pixels that count (padding excluded); all if ``None``.
        uncertainty_weight: ``lambda_u`` of ``loss``.
        detach_uncertainty_weight: compute ``exp(-u_k)`` without gradient.
        pseudo_loss: ``reference``: ``0.5 * (CE + Dice)`` against the pseudo-label times the mean
            of ``exp(-u_k)`` over the valid pixels (the reference code); ``pixelwise``: the
            cross-entropy of each pixel weighted by its own ``exp(-u_k)``.
        dice: the Dice loss of ``reference`` (default :class:`~defectseg.losses.DiceLoss`); pixels
            outside ``valid`` reach it as its ``ignore_index``.

    Returns:
        ``loss`` (``pseudo + lambda_u * uncertainty``), ``pseudo`` and ``uncertainty`` (means
        over decoders), ``pseudo_k`` and ``uncertainty_k`` ``(K,)`` per decoder, ``certainty``
        (mean ``exp(-u)``), and detached maps ``pseudo_label`` ``(B, H, W)`` and
        ``uncertainty_map`` ``(K, B, H, W)``.
    """
    if not logits:
        raise ValueError("uaps_unsupervised_loss needs the logits of at least one decoder")
    if pseudo_loss not in PSEUDO_LOSSES:
        raise ValueError(f"pseudo_loss must be one of {list(PSEUDO_LOSSES)}, got {pseudo_loss!r}")
    log_probs = [x.float().log_softmax(dim=1) for x in logits]
    probs = [lp.exp() for lp in log_probs]
    pseudo = mix_pseudo_labels(probs, mixing_weights)
    mean_probs = torch.stack(probs).mean(dim=0)
    if valid is None:
        valid = torch.ones_like(pseudo, dtype=torch.bool)
    valid_f = valid.to(mean_probs.dtype)
    count = valid_f.sum().clamp_min(1.0)
    if pseudo_loss == "reference":
        dice = dice if dice is not None else DiceLoss(ignore_index=IGNORE_INDEX)
        target = pseudo.masked_fill(~valid, getattr(dice, "ignore_index", IGNORE_INDEX))
    pseudo_terms, u_terms, certainty, maps = [], [], [], []
    for x, lp in zip(logits, log_probs):
        u = kl_uncertainty(mean_probs, lp)
        weight = torch.exp(-(u.detach() if detach_uncertainty_weight else u))
        ce = F.nll_loss(lp, pseudo, reduction="none")
        mean_weight = (weight * valid_f).sum() / count
        if pseudo_loss == "reference":
            ce_mean = (ce * valid_f).sum() / count
            pseudo_terms.append(0.5 * (ce_mean + dice(x.float(), target)) * mean_weight)
        else:
            pseudo_terms.append((weight * ce * valid_f).sum() / count)
        u_terms.append((u * valid_f).sum() / count)
        certainty.append(mean_weight.detach())
        maps.append(u.detach())
    pseudo_k = torch.stack(pseudo_terms)
    uncertainty_k = torch.stack(u_terms)
    pseudo_mean = pseudo_k.mean()
    uncertainty = uncertainty_k.mean()
    return {
        "loss": pseudo_mean + uncertainty_weight * uncertainty,
        "pseudo": pseudo_mean,
        "uncertainty": uncertainty,
        "pseudo_k": pseudo_k,
        "uncertainty_k": uncertainty_k,
        "certainty": torch.stack(certainty).mean(),
        "pseudo_label": pseudo,
        "uncertainty_map": torch.stack(maps),
    }


def find_dice(loss: nn.Module) -> nn.Module | None:
    """The :class:`~defectseg.losses.DiceLoss` of ``loss`` (itself or a term of a sum), if any."""
    if isinstance(loss, DiceLoss):
        return loss
    if isinstance(loss, CombinedLoss):
        return next((term for term in loss.losses if isinstance(term, DiceLoss)), None)
    return None


class UAPSModule(SegmentationModule):
    """Semi-supervised UAPS training of a :class:`UAPSNet` (see the module docstring).

    Takes every :class:`~defectseg.models.SegmentationModule` argument (``arch``, ``encoder``,
    ``lr``...) plus:

    Args:
        num_aux_decoders: auxiliary decoders (default 3).
        perturbations: one per auxiliary decoder (cycled): ``noise``, ``dropout``,
            ``feature_drop``, ``none`` or ``+`` combinations. Default
            ``["noise", "dropout", "feature_drop"]``.
        noise_range: ``r`` of the multiplicative feature noise ``U(-r, r)`` (0.3).
        dropout_p: feature dropout probability (0.5).
        drop_threshold: ``(low, high)`` range of ``gamma`` of the attention-guided drop.
        perturb_levels: perturb ``all`` encoder stages (default) or the ``deepest`` only.
        unsupervised_weight: maximum weight of the pseudo-label loss (reached at the end of the
            ramp); 0 gives the supervised-only baseline on the labelled subset.
        uncertainty_weight: ``lambda_u``, weight of the uncertainty term (inside the ramp, so
            its coefficient is ``w(t) * lambda_u``, unless ``uncertainty_rampup`` is false).
        uncertainty_rampup: ramp the uncertainty term with the pseudo-label term (default, the
            reference's NEU-Seg, DAGM and KolektorSDD2 scripts); false adds
            ``lambda_u * L_unc`` at full weight from the first step (its Magnetic Tile script).
        pseudo_loss: ``reference`` (default): ``0.5 * (CE + Dice)`` against the mixed
            pseudo-label times the decoder's mean certainty ``exp(-u_k)``; ``pixelwise``: the
            cross-entropy weighted pixel by pixel by ``exp(-u_k)``. The Dice is the supervised
            loss's Dice term when it has one (same smoothing), else the default Dice.
        rampup_steps: optimizer steps of the ramp ``exp(-5 (1 - t)^2)``; 0 turns it off.
        rampup_fraction: when ``rampup_steps`` is ``None``, the ramp lasts this share of the
            run's optimizer steps (``trainer.estimated_stepping_batches``).
        rampup_interval: the ramp moves in steps of this many optimizer steps (the reference:
            40-80); 1 (default) is a smooth ramp.
        mixing_concentration: concentration of the Dirichlet mixing weights (1: uniform on the
            simplex, as in the paper).
        detach_uncertainty_weight: no gradient through ``exp(-u_k)``.
        forward_passes: ``joint`` (default): labelled and unlabelled images go through the
            network as one batch (one encoder pass; batch norm sees both); ``separate``: one
            pass each, so batch-norm statistics are not mixed, as in the reference. Images of
            different sizes always take separate passes.
        loss: supervised loss of every decoder: a registry name or weighted sum (default
            ``0.5 * ce + 0.5 * dice``), or a ``{class_path, init_args}`` dict of an
            ``nn.Module`` with the loss contract.
        **kwargs: the other :class:`~defectseg.models.SegmentationModule` arguments.
    """

    def __init__(
        self,
        num_aux_decoders: int = 3,
        perturbations: list[str] | None = None,
        noise_range: float = 0.3,
        dropout_p: float = 0.5,
        drop_threshold: tuple[float, float] = (0.7, 0.9),
        perturb_levels: Literal["all", "deepest"] = "all",
        unsupervised_weight: float = 0.1,
        uncertainty_weight: float = 1.0,
        uncertainty_rampup: bool = True,
        pseudo_loss: Literal["reference", "pixelwise"] = "reference",
        rampup_steps: int | None = None,
        rampup_fraction: float = 0.3,
        rampup_interval: int = 1,
        mixing_concentration: float = 1.0,
        detach_uncertainty_weight: bool = False,
        forward_passes: Literal["joint", "separate"] = "joint",
        loss: str | dict = "0.5 * ce + 0.5 * dice",
        **kwargs: Any,
    ) -> None:
        if unsupervised_weight < 0 or uncertainty_weight < 0:
            raise ValueError(
                f"unsupervised_weight and uncertainty_weight must be >= 0, got {unsupervised_weight} "
                f"and {uncertainty_weight}"
            )
        if rampup_steps is not None and rampup_steps < 0:
            raise ValueError(f"rampup_steps must be >= 0 (0: no ramp), got {rampup_steps}")
        if not 0.0 <= rampup_fraction <= 1.0:
            raise ValueError(f"rampup_fraction must be in [0, 1], got {rampup_fraction}")
        if rampup_interval < 1:
            raise ValueError(f"rampup_interval must be >= 1 (1: a smooth ramp), got {rampup_interval}")
        if mixing_concentration <= 0:
            raise ValueError(f"mixing_concentration must be > 0, got {mixing_concentration}")
        if pseudo_loss not in PSEUDO_LOSSES:
            raise ValueError(f"pseudo_loss must be one of {list(PSEUDO_LOSSES)}, got {pseudo_loss!r}")
        if forward_passes not in ("joint", "separate"):
            raise ValueError(f"forward_passes must be 'joint' or 'separate', got {forward_passes!r}")
        if isinstance(loss, dict) and "class_path" not in loss:
            raise ValueError(
                f"a loss given as a dict needs a class_path (and optional init_args), got keys {sorted(loss)}; "
                "or give a registry name such as '0.5 * ce + 0.5 * dice'"
            )
        super().__init__(loss=loss, **kwargs)
        self._rampup_length: int | None = rampup_steps

    # ------------------------------------------------------------------ configuration
    def configure_network(self) -> nn.Module:
        """A :class:`UAPSNet` with the module's architecture, encoder and perturbations."""
        h = self.hparams
        return UAPSNet(
            **self.network_kwargs(),  # architecture, encoder, classes and the architecture's own arguments
            num_aux_decoders=h.num_aux_decoders,
            perturbations=h.perturbations,
            noise_range=h.noise_range,
            dropout_p=h.dropout_p,
            drop_threshold=tuple(h.drop_threshold),
            perturb_levels=h.perturb_levels,
        )

    def configure_models(self) -> None:
        """``self.net``: the padded :class:`UAPSNet` (``weights`` loaded as by the parent).

        ``self(image)`` and ``self.net`` run the main decoder only; :meth:`forward_all` runs all.
        """
        super().configure_models()
        if not isinstance(self.net.network, UAPSNet):
            raise TypeError(
                f"UAPSModule.configure_network must return a UAPSNet, got {type(self.net.network).__name__}"
            )

    def configure_losses(self) -> None:
        """``self.loss_fn``; a ``{class_path, init_args}`` loss is instantiated here."""
        if isinstance(self._loss_spec, dict):
            from lightning.pytorch.cli import instantiate_class

            spec = self._loss_spec
            self.__dict__["_loss_spec"] = instantiate_class((), {"init_args": {}, **spec})
        super().configure_losses()

    @property
    def uaps_net(self) -> UAPSNet:
        """The unpadded :class:`UAPSNet`."""
        return self.net.network

    @property
    def decoder_names(self) -> list[str]:
        """``["main", "aux1_noise", ...]``: names used in the logs."""
        return list(self.uaps_net.decoder_names)

    # ------------------------------------------------------------------ forward
    def forward_all(self, image: torch.Tensor, perturb: bool | None = None) -> list[torch.Tensor]:
        """Logits of every decoder (main first) for images of any size (padded and cropped back),
        in channels_last when the module's ``channels_last`` is on.

        Args:
            image: normalised images ``(B, C, H, W)``.
            perturb: perturb the auxiliary decoders' features; default: in training mode.
        """
        padded = self.net.pad(to_memory_format(image, self._channels_last))
        return [
            self.net.crop(out, padded.shape[-2:], image.shape[-2:])
            for out in self.uaps_net.forward_all(padded, perturb)
        ]

    @torch.no_grad()
    def uncertainty_map(self, image: torch.Tensor, perturb: bool = True) -> dict[str, torch.Tensor]:
        """Per-pixel uncertainty of the main decoder, ``KL(p_mean || p_main)``, for a figure or QA.

        Args:
            image: normalised images ``(B, C, H, W)``.
            perturb: perturb the auxiliary decoders' features as in training (batch norm stays
                in its current mode).

        Returns:
            ``uncertainty`` ``(B, H, W)`` of the main decoder, ``uncertainty_all`` ``(K, B, H, W)``,
            ``prediction`` (main decoder's argmax) and ``probs`` (main decoder's softmax).
        """
        outputs = self.forward_all(image, perturb=perturb)
        log_probs = [o.float().log_softmax(dim=1) for o in outputs]
        mean_probs = torch.stack([lp.exp() for lp in log_probs]).mean(dim=0)
        maps = torch.stack([kl_uncertainty(mean_probs, lp) for lp in log_probs])
        return {
            "uncertainty": maps[0],
            "uncertainty_all": maps,
            "prediction": outputs[0].argmax(dim=1),
            "probs": log_probs[0].exp(),
        }

    # ------------------------------------------------------------------ schedule
    @property
    def rampup_length(self) -> int:
        """Optimizer steps of the ramp (resolved from ``rampup_fraction`` once a trainer is attached)."""
        if self._rampup_length is None:
            steps = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
            if not math.isfinite(steps):
                raise ValueError(
                    "the run has no fixed length (max_epochs=-1 and no max_steps), so "
                    "rampup_fraction cannot be turned into steps; set model.init_args.rampup_steps"
                )
            self._rampup_length = int(round(self.hparams.rampup_fraction * steps))
        return self._rampup_length

    def current_unsupervised_weight(self) -> float:
        """``w(t) = unsupervised_weight * exp(-5 (1 - t)^2)`` at the current global step."""
        if self.hparams.unsupervised_weight == 0:
            return 0.0
        return self.hparams.unsupervised_weight * rampup(
            self.global_step, self.rampup_length, self.hparams.rampup_interval
        )

    # ------------------------------------------------------------------ training
    @staticmethod
    def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(labelled, unlabelled or None)`` from a combined ``{"labeled", "unlabeled"}`` batch or a
        plain labelled batch."""
        if "labeled" in batch and "image" not in batch:
            labeled = batch["labeled"]
            if labeled is None:
                raise ValueError(
                    "the combined batch has no labelled part; use CombinedLoader(mode='max_size_cycle') "
                    "(the datamodule's semi-supervised mode does)"
                )
            return labeled, batch.get("unlabeled")
        return batch, None

    def run_decoders(
        self, labeled: torch.Tensor, unlabeled: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Every decoder's logits on the labelled and the unlabelled images (``None``: not run).

        With ``forward_passes: joint`` and images of one size, both batches go through the
        network as one batch (the encoder runs once); otherwise one pass each.
        """
        if unlabeled is None:
            return self.forward_all(labeled), None
        if self.hparams.forward_passes == "joint" and unlabeled.shape[1:] == labeled.shape[1:]:
            size = labeled.shape[0]
            outputs = self.forward_all(torch.cat([labeled, unlabeled]))
            return [o[:size] for o in outputs], [o[size:] for o in outputs]
        return self.forward_all(labeled), self.forward_all(unlabeled)

    def supervised_loss(self, outputs: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The supervised loss averaged over the decoders; logs each decoder's and the main one's terms."""
        size = mask.shape[0]
        terms = []
        for index, (name, logits) in enumerate(zip(self.decoder_names, outputs)):
            value = self.loss_fn(logits, mask)
            terms.append(value)
            self.log(f"train/loss_sup/{name}", value, batch_size=size)
            if index == 0 and isinstance(self.loss_fn, CombinedLoss):
                for term, term_value in getattr(self.loss_fn, "last_terms", {}).items():
                    self.log(f"train/loss_sup/main_{term}", term_value, batch_size=size)
        supervised = torch.stack(terms).mean()
        self.log("train/loss_sup", supervised, batch_size=size)
        return supervised

    def unsupervised_loss(self, outputs: Sequence[torch.Tensor], unlabeled: dict[str, Any]) -> dict[str, torch.Tensor]:
        """:func:`uaps_unsupervised_loss` of the unlabelled batch (padding excluded), logged."""
        first = outputs[0]
        mixing = sample_mixing_weights(len(outputs), self.hparams.mixing_concentration, device=first.device)
        valid = valid_pixels(unlabeled.get("valid_size"), (first.shape[0], *first.shape[2:]), first.device)
        terms = uaps_unsupervised_loss(
            outputs,
            mixing,
            valid=valid,
            uncertainty_weight=self.hparams.uncertainty_weight,
            detach_uncertainty_weight=self.hparams.detach_uncertainty_weight,
            pseudo_loss=self.hparams.pseudo_loss,
            dice=find_dice(self.loss_fn),
        )
        size = first.shape[0]
        self.log("train/loss_pseudo", terms["pseudo"], batch_size=size)
        self.log("train/loss_uncertainty", terms["uncertainty"], batch_size=size)
        self.log("train/certainty", terms["certainty"], batch_size=size)
        pseudo = terms["pseudo_label"][valid]
        if pseudo.numel():
            self.log("train/pseudo_defect_fraction", (pseudo > 0).float().mean(), batch_size=size)
        for k, name in enumerate(self.decoder_names):
            self.log(f"train/mix_weight/{name}", mixing[k], batch_size=size)
            self.log(f"train/loss_pseudo/{name}", terms["pseudo_k"][k], batch_size=size)
            self.log(f"train/uncertainty/{name}", terms["uncertainty_k"][k], batch_size=size)
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Supervised loss on every decoder, plus the ramped UAPS loss on the unlabelled batch."""
        labeled, unlabeled = self.split_batch(batch)
        if batch_idx == 0:
            check_batch(labeled, self.num_classes)
        if "dli_counts" in labeled:
            self.log_dli_counts(labeled)  # DLI balances the labelled stream
        size = labeled["image"].shape[0]
        if self.hparams.unsupervised_weight == 0:
            unlabeled = None  # the supervised baseline never runs the unlabelled images
        sup_outputs, unsup_outputs = self.run_decoders(
            labeled["image"], unlabeled["image"] if unlabeled is not None else None
        )
        total = self.supervised_loss(sup_outputs, labeled["mask"])
        weight = self.current_unsupervised_weight()
        self.log("train/unsup_weight", weight, batch_size=size)
        if unsup_outputs is not None:
            terms = self.unsupervised_loss(unsup_outputs, unlabeled)
            lambda_u = float(self.hparams.uncertainty_weight)
            uncertainty_coefficient = weight * lambda_u if self.hparams.uncertainty_rampup else lambda_u
            unsupervised = weight * terms["pseudo"] + uncertainty_coefficient * terms["uncertainty"]
            total = total + unsupervised
            unsup_size = unsup_outputs[0].shape[0]
            self.log("train/loss_unsup", unsupervised, batch_size=unsup_size)
            self.log("train/uncertainty_coefficient", uncertainty_coefficient, batch_size=unsup_size)
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        return total

    def on_train_start(self) -> None:
        if self.hparams.unsupervised_weight > 0:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is not None and not getattr(datamodule, "semi_supervised", True):
                warnings.warn(
                    f"UAPSModule is training on {type(datamodule).__name__} without its semi-supervised "
                    "mode: no unlabelled batch, so only the supervised loss is used. Set "
                    "data.init_args.labeled_fraction (or num_labeled, or unlabeled_dirs)",
                    stacklevel=2,
                )
            _ = self.rampup_length  # resolve now, while the trainer knows the run's length
