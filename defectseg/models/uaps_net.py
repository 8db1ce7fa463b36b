"""``UAPSNet``: one shared encoder, a main decoder and perturbed auxiliary decoders (plain ``nn.Module``).

The network of UAPS (Sime et al., "Uncertainty-aware and dynamically-mixed pseudo-labels for
semi-supervised defect segmentation", Computers in Industry 152, 2023). Any
segmentation-models-pytorch architecture and encoder works: the main decoder and its head are
exactly those of the smp model (same parameter names, ``encoder.*``, ``decoder.*``,
``segmentation_head.*``), and each auxiliary decoder is a freshly initialised copy of them.

* :meth:`UAPSNet.forward` runs the encoder and the main decoder only, in every mode: this is what
  validation, test, predict and export see, so inference costs what the plain network costs.
* :meth:`UAPSNet.forward_all` also runs the auxiliary decoders. In training mode each auxiliary
  decoder sees its own perturbation of the encoder features (the main decoder always sees the
  clean features); in eval mode nothing is perturbed.

Perturbations (applied to every encoder stage by default, as in the published U-Net):

* ``noise``: multiplicative uniform noise, ``x + x * n`` with ``n ~ U(-r, r)`` drawn per element
  (``r = noise_range``, 0.3).
* ``dropout``: element-wise dropout with probability ``dropout_p`` (0.5), survivors rescaled by
  ``1 / (1 - p)``.
* ``feature_drop``: attention-guided drop; the attention map is the channel mean of the features,
  and every location whose attention exceeds ``gamma * max`` is zeroed, ``gamma ~ U(0.7, 0.9)``
  drawn per image. (When the largest channel mean of an image is not positive nothing is
  dropped.)

An auxiliary decoder may combine kinds with ``+`` (``"noise+dropout"``) or take ``"none"``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.base import initialization as smp_init
from torch import nn

from defectseg.models.networks import build_network

PERTURBATIONS = ("noise", "dropout", "feature_drop", "none")
DEFAULT_PERTURBATIONS = ("noise", "dropout", "feature_drop")


def feature_noise(x: torch.Tensor, noise_range: float = 0.3) -> torch.Tensor:
    """Multiplicative uniform noise: ``x + x * n``, ``n ~ U(-noise_range, noise_range)`` per element."""
    noise = torch.empty_like(x).uniform_(-noise_range, noise_range)
    return x + x * noise


def feature_dropout(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Element-wise dropout with probability ``p`` (survivors scaled by ``1 / (1 - p)``)."""
    return F.dropout(x, p=p, training=True)


def attention_feature_drop(x: torch.Tensor, gamma_range: Sequence[float] = (0.7, 0.9)) -> torch.Tensor:
    """Zero the locations whose channel-mean activation exceeds ``gamma * max`` (per image).

    Args:
        x: features ``(B, C, H, W)``.
        gamma_range: ``(low, high)`` of the uniform distribution of ``gamma``, drawn per image.
    """
    attention = x.mean(dim=1, keepdim=True)
    peak = attention.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    gamma = torch.empty_like(peak).uniform_(float(gamma_range[0]), float(gamma_range[1]))
    keep = attention <= gamma * peak
    return x * keep.to(x.dtype)


class FeaturePerturbation(nn.Module):
    """Apply one or more perturbation kinds, in order, to a list of encoder features.

    Args:
        kinds: perturbation names (see :data:`PERTURBATIONS`); ``[]`` or ``["none"]`` is the identity.
        levels: ``all`` perturbs every encoder stage but the first entry of the feature list
            (smp encoders put the input image or a placeholder there); ``deepest`` only the last.
        noise_range: ``r`` of the ``noise`` perturbation.
        dropout_p: probability of the ``dropout`` perturbation.
        drop_threshold: ``(low, high)`` range of ``gamma`` of ``feature_drop``.
    """

    def __init__(
        self,
        kinds: Sequence[str],
        levels: Literal["all", "deepest"] = "all",
        noise_range: float = 0.3,
        dropout_p: float = 0.5,
        drop_threshold: Sequence[float] = (0.7, 0.9),
    ) -> None:
        super().__init__()
        self.kinds = [k for k in kinds if k != "none"]
        self.levels = levels
        self.noise_range = float(noise_range)
        self.dropout_p = float(dropout_p)
        self.drop_threshold = (float(drop_threshold[0]), float(drop_threshold[1]))

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        for kind in self.kinds:
            if kind == "noise":
                x = feature_noise(x, self.noise_range)
            elif kind == "dropout":
                x = feature_dropout(x, self.dropout_p)
            elif kind == "feature_drop":
                x = attention_feature_drop(x, self.drop_threshold)
        return x

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        features = list(features)
        if not self.kinds:
            return features
        first = len(features) - 1 if self.levels == "deepest" else 1
        return features[:first] + [self.perturb(f) for f in features[first:]]

    def extra_repr(self) -> str:
        return f"kinds={self.kinds or ['none']}, levels={self.levels}"


class AuxiliaryDecoder(nn.Module):
    """A decoder and its segmentation head, fed with perturbed encoder features in training."""

    def __init__(self, decoder: nn.Module, head: nn.Module, perturbation: FeaturePerturbation) -> None:
        super().__init__()
        self.decoder = decoder
        self.segmentation_head = head
        self.perturbation = perturbation

    def forward(self, features: Sequence[torch.Tensor], perturb: bool | None = None) -> torch.Tensor:
        """Logits from ``features``, perturbed when ``perturb`` (default: in training mode)."""
        if self.training if perturb is None else perturb:
            features = self.perturbation(features)
        return self.segmentation_head(self.decoder(list(features)))


def _parse_perturbations(perturbations: Sequence[str] | None, count: int) -> list[list[str]]:
    """One list of kinds per auxiliary decoder (the given list is cycled when shorter)."""
    if isinstance(perturbations, str):
        raise ValueError(
            f"perturbations must be a list such as ['noise', 'dropout', 'feature_drop'], got the string "
            f"{perturbations!r}"
        )
    specs = list(perturbations) if perturbations is not None else list(DEFAULT_PERTURBATIONS)
    if count and not specs:
        raise ValueError(
            "perturbations is empty but num_aux_decoders > 0; give one kind per auxiliary decoder, "
            f"choosing from {list(PERTURBATIONS)} (combine kinds with '+')"
        )
    parsed = []
    for i in range(count):
        spec = str(specs[i % len(specs)])
        kinds = [part.strip().lower() for part in spec.split("+") if part.strip()]
        unknown = [k for k in kinds if k not in PERTURBATIONS]
        if unknown or not kinds:
            raise ValueError(
                f"unknown perturbation {spec!r} for auxiliary decoder {i + 1}; choose from "
                f"{list(PERTURBATIONS)} or combine them with '+', e.g. 'noise+dropout'"
            )
        parsed.append(kinds)
    return parsed


def _reset(module: nn.Module) -> None:
    """Give a copied decoder or head fresh random weights (smp's own initialisation)."""
    for sub in module.modules():
        if sub is not module and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()


class UAPSNet(nn.Module):
    """Shared encoder, main decoder and ``num_aux_decoders`` perturbed auxiliary decoders.

    Args:
        arch: segmentation-models-pytorch architecture (``Unet``, ``FPN``, ``DeepLabV3Plus``...).
        encoder: encoder name (``resnet18``, ``tu-<timm name>``...).
        encoder_depth: encoder stages (3 to 5).
        in_channels: image channels.
        num_classes: classes, background included.
        decoder_channels: decoder widths for Unet-like architectures.
        num_aux_decoders: auxiliary decoders (default 3; 0 leaves the main decoder alone).
        perturbations: one perturbation per auxiliary decoder, cycled when shorter than
            ``num_aux_decoders``: ``noise``, ``dropout``, ``feature_drop``, ``none`` or a ``+``
            combination. Default ``["noise", "dropout", "feature_drop"]``.
        noise_range: ``r`` of the multiplicative noise ``U(-r, r)``.
        dropout_p: probability of the feature dropout.
        drop_threshold: ``(low, high)`` range of ``gamma`` of the attention-guided drop.
        perturb_levels: ``all`` (every encoder stage, default) or ``deepest`` (the last only).
        **arch_kwargs: further arguments of the architecture.

    Raises:
        ValueError: unknown perturbation, bad ranges, or an architecture whose forward is not
            ``encoder -> decoder -> head`` (DPT).
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder: str = "resnet18",
        encoder_depth: int = 5,
        in_channels: int = 3,
        num_classes: int = 2,
        decoder_channels: Sequence[int] | None = None,
        num_aux_decoders: int = 3,
        perturbations: Sequence[str] | None = None,
        noise_range: float = 0.3,
        dropout_p: float = 0.5,
        drop_threshold: Sequence[float] = (0.7, 0.9),
        perturb_levels: Literal["all", "deepest"] = "all",
        **arch_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_aux_decoders < 0:
            raise ValueError(f"num_aux_decoders must be >= 0, got {num_aux_decoders}")
        if not 0.0 <= noise_range < 1.0:
            raise ValueError(f"noise_range must be in [0, 1), got {noise_range}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
        if len(drop_threshold) != 2 or not 0.0 < drop_threshold[0] <= drop_threshold[1] <= 1.0:
            raise ValueError(
                f"drop_threshold must be (low, high) with 0 < low <= high <= 1, got {drop_threshold}"
            )
        if perturb_levels not in ("all", "deepest"):
            raise ValueError(f"perturb_levels must be 'all' or 'deepest', got {perturb_levels!r}")
        if arch_kwargs.get("aux_params"):
            raise ValueError("UAPSNet does not support smp's classification head (aux_params)")
        kinds = _parse_perturbations(perturbations, num_aux_decoders)
        main = build_network(
            arch=arch,
            encoder=encoder,
            encoder_depth=encoder_depth,
            in_channels=in_channels,
            num_classes=num_classes,
            decoder_channels=decoder_channels,
            **arch_kwargs,
        )
        if type(main).forward is not SegmentationModel.forward:
            raise ValueError(
                f"architecture {arch!r} ({type(main).__name__}) does not run encoder -> decoder -> head "
                "in its forward, so its decoder cannot be shared; use another architecture "
                "(Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...)"
            )
        self.arch = type(main).__name__
        self.encoder = main.encoder
        self.decoder = main.decoder
        self.segmentation_head = main.segmentation_head
        self.output_stride = int(getattr(main.encoder, "output_stride", 1) or 1)
        self.requires_divisible_input_shape = bool(getattr(main, "requires_divisible_input_shape", True))
        self.aux_decoders = nn.ModuleList()
        for aux_kinds in kinds:
            decoder = copy.deepcopy(main.decoder)
            head = copy.deepcopy(main.segmentation_head)
            _reset(decoder)
            _reset(head)
            smp_init.initialize_decoder(decoder)
            smp_init.initialize_head(head)
            perturbation = FeaturePerturbation(aux_kinds, perturb_levels, noise_range, dropout_p, drop_threshold)
            self.aux_decoders.append(AuxiliaryDecoder(decoder, head, perturbation))
        self.decoder_names = ["main"] + [
            f"aux{i + 1}_{'+'.join(k)}" for i, k in enumerate(kinds)
        ]

    @property
    def num_decoders(self) -> int:
        """Main plus auxiliary decoders."""
        return 1 + len(self.aux_decoders)

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing() or torch.jit.is_scripting() or not self.requires_divisible_input_shape:
            return
        height, width = x.shape[-2:]
        stride = self.output_stride
        if height % stride or width % stride:
            raise ValueError(
                f"UAPSNet input of {height}x{width} (HxW) is not divisible by the encoder's output "
                f"stride {stride}; pad it (PadToMultiple does) to "
                f"{-(-height // stride) * stride}x{-(-width // stride) * stride}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Main-decoder logits ``(B, num_classes, H, W)``; the auxiliary decoders never run here."""
        self._check_input(x)
        return self.segmentation_head(self.decoder(self.encoder(x)))

    def forward_all(self, x: torch.Tensor, perturb: bool | None = None) -> list[torch.Tensor]:
        """Logits of every decoder, main first: ``[main, aux1, ..., auxN]``.

        Each auxiliary decoder sees its own perturbation of the shared encoder features (drawn
        anew at every call); the main decoder always sees them unperturbed.

        Args:
            x: images ``(B, C, H, W)``, ``H`` and ``W`` multiples of the encoder's output stride.
            perturb: perturb the auxiliary decoders' features; ``None`` (default) perturbs in
                training mode only.
        """
        self._check_input(x)
        features = self.encoder(x)
        outputs = [self.segmentation_head(self.decoder(list(features)))]
        outputs.extend(branch(features, perturb) for branch in self.aux_decoders)
        return outputs

    def main_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of the encoder, main decoder and head, named as in the plain smp model.

        ``build_network(arch, ...).load_state_dict(net.main_state_dict())`` gives a plain network
        that predicts exactly like this one.
        """
        return {k: v for k, v in self.state_dict().items() if not k.startswith("aux_decoders.")}
