"""The supervised segmentation LightningModule, parameterised by its network and its loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection

from defectseg.data.contract import IGNORE_INDEX, check_batch
from defectseg.losses import CombinedLoss, build_loss
from defectseg.losses.statistics import (
    class_statistics,
    modules_wanting_class_statistics,
    provide_class_statistics,
)
from defectseg.metrics import metric_logs, segmentation_metrics
from defectseg.models.memory_format import (
    ChannelsLast,
    apply_memory_format,
    check_channels_last,
    resolve_channels_last,
    to_memory_format,
)
from defectseg.models.networks import PadToMultiple, build_network, load_weights


def loss_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate a loss given as ``{"class_path": "pkg.Class", "init_args": {...}}`` (YAML).

    Raises:
        ValueError: the mapping has no ``class_path`` or other keys, or the class is not an
            ``nn.Module``; the message shows the expected form.
    """
    from lightning.pytorch.cli import instantiate_class

    form = "{class_path: defectseg.losses.BalancedLoss, init_args: {...}}"
    if "class_path" not in config or set(config) - {"class_path", "init_args"}:
        raise ValueError(f"a loss given as a mapping needs the form {form}, got {dict(config)}")
    try:
        loss = instantiate_class((), {"class_path": config["class_path"], "init_args": dict(config.get("init_args") or {})})
    except (ImportError, AttributeError) as err:
        raise ValueError(f"loss class_path {config['class_path']!r} cannot be imported ({err})") from None
    if not isinstance(loss, nn.Module):
        raise ValueError(f"loss class_path {config['class_path']!r} is not an nn.Module (form: {form})")
    return loss


class SegmentationModule(L.LightningModule):
    """Supervised semantic segmentation of surface defects.

    The network is a plain ``nn.Module`` built by :meth:`configure_network`; override it to use
    your own. Losses come from the registry (:func:`defectseg.losses.build_loss`).

    Args:
        num_classes: classes, background included (the CLI links it from the datamodule).
        class_names: class names, background first (linked from the datamodule); used to name
            the per-class metrics.
        arch: segmentation-models-pytorch architecture (``Unet``, ``UnetPlusPlus``, ``FPN``,
            ``Linknet``, ``PSPNet``, ``DeepLabV3``, ``DeepLabV3Plus``, ``MAnet``, ``PAN``...).
        encoder: encoder name, including timm encoders as ``tu-<name>``.
        encoder_depth: encoder stages (3 to 5).
        decoder_channels: decoder widths for Unet-like architectures.
        in_channels: image channels (linked from the datamodule).
        weights: None (random initialisation, nothing downloaded), a pretrained weight name of
            the encoder (imagenet, ssl...; for tu- timm encoders any name, the tag being part of
            the encoder name), downloaded once into the Hugging Face cache, or the path of a
            local state dict, encoder state dict or defectseg checkpoint (docs/pretrained.md).
        loss: a registered loss name (ce, wce, dice, focal, balanced...), a weighted sum such as
            "balanced + 0.5 * dice", or, in Python or YAML, a loss module: in YAML a mapping with
            class_path (e.g. defectseg.losses.BalancedLoss) and init_args. Any nn.Module with the
            loss contract (logits, mask) -> scalar works.
        loss_kwargs: arguments of the loss (``{name: {...}}`` per term for a sum).
        ignore_index: mask value to ignore in the loss and the metrics.
        lr: learning rate of the default optimizer (AdamW).
        weight_decay: weight decay of the default optimizer.
        optimizer: optimizer factory from YAML (``class_path``/``init_args``); default AdamW.
        lr_scheduler: scheduler factory from YAML; default cosine annealing to 0 over the whole
            run, stepped every batch.
        mean: normalisation mean of the images (linked from the datamodule; stored so a
            checkpoint can predict on raw images).
        std: normalisation std (likewise).
        pad_multiple: inputs are padded to this multiple inside the network and cropped back.
        arch_kwargs: further arguments of the architecture.
        fp_min_area: smallest predicted defect area (pixels, at the tested resolution) that makes
            a defect-free test image a false positive in ``test/fp_rate_defect_free``.
        channels_last: run the network in channels_last memory format: ``auto`` (on for CPU
            and CUDA, where oneDNN and cuDNN have faster NHWC kernels, above all under bf16
            autocast), ``true`` or ``false``.
        eval_tile_size: validate and test with a sliding window of this tile size (an int or
            ``(height, width)``), blended as :class:`~defectseg.inference.Predictor` does, so
            the metrics describe what inference gives; ``None`` (default) runs whole images.
        eval_tile_overlap: overlap of neighbouring tiles of the sliding window, in pixels.
    """

    def __init__(
        self,
        num_classes: int = 5,
        class_names: list[str] | None = None,
        arch: str = "Unet",
        encoder: str = "resnet18",
        encoder_depth: int = 5,
        decoder_channels: list[int] | None = None,
        in_channels: int = 3,
        weights: str | None = None,
        loss: str | dict[str, Any] = "ce",
        loss_kwargs: dict[str, Any] | None = None,
        ignore_index: int = IGNORE_INDEX,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pad_multiple: int = 32,
        arch_kwargs: dict[str, Any] | None = None,
        fp_min_area: int = 1,
        channels_last: ChannelsLast = "auto",
        eval_tile_size: int | tuple[int, int] | None = None,
        eval_tile_overlap: int = 32,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and at least one defect), got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names {list(class_names)} but num_classes={num_classes}"
            )
        channels_last = check_channels_last(channels_last)
        self._channels_last = False  # resolved for the trainer's device in setup()
        ignore = ["optimizer", "lr_scheduler"]
        if isinstance(loss, nn.Module):
            ignore.append("loss")
        self.save_hyperparameters(ignore=ignore)
        if isinstance(loss, Mapping):
            loss = loss_from_config(loss)  # the hyperparameters keep the mapping
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else ["background"] + [
            f"class_{k}" for k in range(1, num_classes)
        ]
        # kept out of nn.Module registration: build_loss returns the module itself
        self.__dict__["_loss_spec"] = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    # ------------------------------------------------------------------ configuration
    def network_kwargs(self) -> dict[str, Any]:
        """The network's arguments from the hyperparameters (architecture, encoder, classes, ...)."""
        h = self.hparams
        return {
            "arch": h.arch,
            "encoder": h.encoder,
            "encoder_depth": h.encoder_depth,
            "in_channels": h.in_channels,
            "num_classes": self.num_classes,
            "decoder_channels": h.decoder_channels,
            **(h.arch_kwargs or {}),
        }

    def configure_network(self) -> nn.Module:
        """Build the network (a plain ``nn.Module`` mapping images to logits). Override freely."""
        return build_network(**self.network_kwargs())

    def configure_models(self) -> None:
        """Create ``self.net`` (the padded network) and load ``weights`` if given."""
        network = self.configure_network()
        h = self.hparams
        if h.weights:
            load_weights(network, h.weights, encoder=h.encoder, in_channels=h.in_channels, encoder_depth=h.encoder_depth)
        self.net = PadToMultiple(network, self.hparams.pad_multiple)

    def loss_context(self) -> dict[str, Any]:
        """Values that losses may take from the model (``num_classes``...)."""
        return {"num_classes": self.num_classes}

    def configure_losses(self) -> None:
        """Create ``self.loss_fn`` from the ``loss`` argument."""
        self.loss_fn = build_loss(
            self._loss_spec, ignore_index=self.hparams.ignore_index, loss_kwargs=self.hparams.loss_kwargs,
            context=self.loss_context(),
        )

    def configure_metrics(self) -> None:
        """Create ``self.val_metrics`` (IoU) and ``self.test_metrics`` (IoU, global defect IoU from
        the same confusion matrix, image-wise IoU, false-positive rate on defect-free images):
        :func:`defectseg.metrics.segmentation_metrics` collections."""
        ignore = self.hparams.ignore_index
        self.val_metrics = segmentation_metrics(self.num_classes, ignore)
        self.test_metrics = segmentation_metrics(
            self.num_classes, ignore, test=True, fp_min_area=self.hparams.get("fp_min_area", 1)
        )

    # ------------------------------------------------------------------ forward
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for normalised images ``(B, C, H, W)`` of any size."""
        return self.net(to_memory_format(image, self._channels_last))

    def configure_memory_format(self, device: torch.device | str) -> bool:
        """Put the network in channels_last when ``channels_last`` resolves to on for ``device``
        (called by :meth:`setup` with the trainer's device, before the model moves there)."""
        self._channels_last = resolve_channels_last(self.hparams.get("channels_last", "auto"), device)
        apply_memory_format(self.net, self._channels_last)
        return self._channels_last

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"model.num_classes={self.num_classes} but the datamodule "
                f"{type(datamodule).__name__} has {data_classes} classes {getattr(datamodule, 'class_names', '')}; "
                "set model.num_classes to match (the defectseg CLI links it for you)"
            )
        data_channels = getattr(datamodule, "in_channels", None)
        if data_channels is not None and data_channels != self.hparams.in_channels:
            raise ValueError(
                f"model.in_channels={self.hparams.in_channels} but the datamodule serves "
                f"{data_channels}-channel images; set them equal"
            )
        self.check_normalization(datamodule)
        self.provide_class_statistics(datamodule, stage)
        if self._trainer is not None:
            self.configure_memory_format(self.trainer.strategy.root_device)

    def check_normalization(self, datamodule: Any) -> None:
        """Make the stored ``mean``/``std`` those the datamodule normalises with.

        Checkpoints and exports normalise raw images with the model's ``mean``/``std``; a model
        without them takes the datamodule's, and a model whose values differ raises, naming
        both (the defectseg CLI links them).
        """
        for name in ("mean", "std"):
            data_value = getattr(datamodule, name, None)
            if data_value is None:
                continue
            data_value = [float(v) for v in data_value]
            own = self.hparams.get(name)
            if own is None:
                self.hparams[name] = data_value
            elif len(own) != len(data_value) or any(abs(float(a) - b) > 1e-6 for a, b in zip(own, data_value)):
                raise ValueError(
                    f"model.{name}={[float(v) for v in own]} but the datamodule {type(datamodule).__name__} "
                    f"normalises with {name}={data_value}; a checkpoint or export would normalise raw "
                    f"images wrongly. Set model.{name} to the datamodule's (the defectseg CLI links it) or null"
                )

    def provide_class_statistics(self, datamodule: Any, stage: str) -> None:
        """Give the training split's class statistics to the losses that derive weights from them.

        The loss is built in ``__init__``, before any data exists; parts of it with
        ``wants_class_statistics`` (``wce`` with ``weight="auto"``, ``class_balanced`` with
        ``samples_per_class="auto"``) receive ``datamodule.class_pixel_frequencies("train")``
        and the class pixel counts here, called from :meth:`setup`. Nothing happens when no loss
        wants them; without a datamodule that has them, ``predict`` goes on (it needs no loss)
        and the other stages raise.
        """
        wanting = modules_wanting_class_statistics(self.loss_fn)
        if not wanting:
            return
        if datamodule is None or not hasattr(datamodule, "class_pixel_frequencies"):
            if stage == "predict":
                return
            names = sorted({type(m).__name__ for m in wanting})
            raise ValueError(
                f"the loss parts {names} derive their class weights from the training data, but "
                f"{type(datamodule).__name__ if datamodule is not None else 'no datamodule'} provides no "
                "class_pixel_frequencies('train'); pass the trainer a DefectDataModule or give the weights explicitly"
            )
        stats = class_statistics(datamodule, "train")
        provide_class_statistics(self.loss_fn, stats["class_frequencies"], stats["class_pixel_counts"])

    # ------------------------------------------------------------------ steps
    def compute_loss(self, logits: torch.Tensor, mask: torch.Tensor, prefix: str) -> torch.Tensor:
        """Loss of ``logits`` against ``mask``; logs it (and each term of a sum) under ``prefix``."""
        loss = self.loss_fn(logits, mask)
        batch_size = mask.shape[0]
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "train", batch_size=batch_size, sync_dist=prefix != "train")
        if isinstance(self.loss_fn, CombinedLoss) and prefix == "train":
            for name, value in getattr(self.loss_fn, "last_terms", {}).items():
                self.log(f"{prefix}/loss_{name}", value, batch_size=batch_size)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if "labeled" in batch and "image" not in batch:
            batch = batch["labeled"]  # a semi-supervised datamodule: train on its labelled stream
        if batch_idx == 0:
            check_batch(batch, self.num_classes)
        if "dli_counts" in batch:
            self.log_dli_counts(batch)
        logits = self(batch["image"])
        return self.compute_loss(logits, batch["mask"], "train")

    def log_dli_counts(self, batch: dict[str, Any]) -> None:
        """Log a DLI batch's class counts: ``train/dli/{before,after}/<class>`` (images holding
        each defect class, and ``defect_free`` images) and ``train/dli/injected``."""
        counts = batch["dli_counts"]
        if isinstance(counts, (list, tuple)):
            counts = torch.stack([torch.as_tensor(c) for c in counts])
        totals = counts.sum(dim=0).tolist()  # (2, num_classes)
        batch_size = int(counts.shape[0])
        names = ["defect_free", *self.class_names[1:]]
        for row, stage in enumerate(("before", "after")):
            for name, value in zip(names, totals[row]):
                self.log(f"train/dli/{stage}/{name}", float(value), batch_size=batch_size)
        if "dli_injected" in batch:
            injected = torch.as_tensor(batch["dli_injected"]).sum().item()
            self.log("train/dli/injected", float(injected), batch_size=batch_size)

    def eval_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Logits of a validation/test batch: whole images, or with ``eval_tile_size`` a sliding
        window over each image's valid region, tiled and blended as the
        :class:`~defectseg.inference.Predictor` does (log of the blended probabilities)."""
        images = batch["image"]
        tile_size = self.hparams.get("eval_tile_size")
        if not tile_size:
            return self(images)
        from defectseg.inference.tiling import TilePlan

        height, width = images.shape[-2:]
        sizes = batch.get("valid_size")
        sizes = sizes.tolist() if sizes is not None else [(height, width)] * images.shape[0]
        overlap = self.hparams.get("eval_tile_overlap", 32)
        plans = [TilePlan(int(h), int(w), tile_size, overlap) for h, w in sizes]
        if all(plan.single for plan in plans):
            return self(images)  # one tile covers every image: exactly the whole-image pass
        out = images.new_full((images.shape[0], self.num_classes, height, width), float("-inf"))
        for index, ((valid_h, valid_w), plan) in enumerate(zip(sizes, plans)):
            if plan.single:
                out[index, :, :valid_h, :valid_w] = self(images[index : index + 1, :, :valid_h, :valid_w])[0].float()
                continue
            canvas = images.new_zeros((self.num_classes, valid_h, valid_w), dtype=torch.float32)
            weight = images.new_zeros((valid_h, valid_w), dtype=torch.float32)
            for tile in plan.tiles:
                rows, cols = tile.slices
                probs = self(images[index : index + 1, :, rows, cols])[0].float().softmax(dim=0)
                tile_weight = torch.from_numpy(plan.weights(tile)).to(probs.device)
                canvas[:, rows, cols] += probs * tile_weight
                weight[rows, cols] += tile_weight
            out[index, :, :valid_h, :valid_w] = (canvas / weight).clamp_min(1e-12).log()
        return out.nan_to_num(neginf=0.0)  # the padding (ignored by loss and metrics)

    def _eval_step(self, batch: dict[str, Any], prefix: str, metrics: MetricCollection) -> dict[str, Any]:
        logits = self.eval_logits(batch)
        self.compute_loss(logits, batch["mask"], prefix)
        preds = logits.argmax(dim=1)
        metrics.update(preds, batch["mask"], defect_free=batch.get("defect_free"))
        return {"preds": preds}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test", self.test_metrics)

    def log_metrics(self, prefix: str, metrics: MetricCollection) -> None:
        """Log every value of ``metrics`` as ``{prefix}/<name>`` (synced across devices by
        torchmetrics), then reset them: ``miou``, ``miou_defect``, ``iou/<class>`` and, for the
        test, ``global_defect_iou``, ``iou_imagewise`` (and per class), ``fp_rate_defect_free``
        with ``defect_free_images`` (left out when the set has no defect-free image)."""
        for name, value in metric_logs(metrics, self.class_names).items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "miou_defect", sync_dist=False)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self.log_metrics("test", self.test_metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        probs = self(batch["image"]).float().softmax(dim=1)
        confidence, mask = probs.max(dim=1)
        return {"mask": mask.to(torch.uint8), "confidence": confidence, "path": batch["path"]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the defectseg version that wrote the checkpoint (``defectseg_version``)."""
        from defectseg.version import __version__

        checkpoint["defectseg_version"] = __version__

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(self.parameters())
        else:
            optimizer = torch.optim.AdamW(
                self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
            )
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                return {
                    "optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"},
                }
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
