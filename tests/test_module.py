"""SegmentationModule: configuration errors, training on synthetic data, checkpoint reload."""

import pytest
import torch
from helpers.trainer import quiet_trainer
from torch import nn

from defectseg.data import SyntheticDefectsDataModule
from defectseg.losses import CombinedLoss, CrossEntropyLoss
from defectseg.models import SegmentationModule

TINY = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


def tiny_data(**kwargs):
    kwargs.setdefault("num_images", 16)
    kwargs.setdefault("image_size", 32)
    kwargs.setdefault("batch_size", 4)
    return SyntheticDefectsDataModule(**kwargs)


def trainer(tmp_path, **kwargs):
    kwargs.setdefault("max_steps", 2)
    return quiet_trainer(tmp_path, **kwargs)


def test_unknown_loss_and_architecture_name_the_choices():
    with pytest.raises(ValueError, match=r"unknown loss 'cee'.*'ce'"):
        SegmentationModule(loss="cee", **TINY)
    with pytest.raises(ValueError, match=r"unknown architecture 'UNetX'.*Unet"):
        SegmentationModule(arch="UNetX")
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        SegmentationModule(weights="nowhere.ckpt", **TINY)
    with pytest.raises(ValueError, match="class_names has 2 names"):
        SegmentationModule(num_classes=3, class_names=["background", "a"], **TINY)


def test_loss_sums_and_modules():
    model = SegmentationModule(num_classes=3, loss="ce + 0.5*dice", **TINY)
    assert isinstance(model.loss_fn, CombinedLoss) and model.loss_fn.weights == [1.0, 0.5]
    custom = CrossEntropyLoss(weight=[1.0, 2.0, 3.0])
    model = SegmentationModule(num_classes=3, loss=custom, **TINY)
    assert model.loss_fn is custom and "loss" not in model.hparams


def test_num_classes_that_disagrees_with_the_data_raises(tmp_path):
    model = SegmentationModule(num_classes=3, **TINY)
    with pytest.raises(ValueError, match=r"num_classes=3.*5 classes"):
        trainer(tmp_path).fit(model, tiny_data())


def test_mask_values_beyond_num_classes_are_caught(tmp_path):
    from defectseg.data.contract import check_batch

    batch = {"image": torch.zeros(1, 3, 4, 4), "mask": torch.full((1, 4, 4), 4)}
    with pytest.raises(ValueError, match="num_classes=3"):
        check_batch(batch, 3)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        check_batch({"image": torch.zeros(1, 3, 4, 4), "mask": torch.zeros(1, 5, 4)})


def test_fit_logs_per_class_metrics_and_reloads_identically(tmp_path):
    torch.manual_seed(0)
    dm = tiny_data()
    model = SegmentationModule(num_classes=dm.num_classes, class_names=dm.class_names, loss="ce+dice", **TINY)
    t = trainer(tmp_path, max_steps=3, limit_val_batches=2)
    t.fit(model, dm)
    metrics = t.callback_metrics
    assert "val/miou_defect" in metrics and "val/miou" in metrics and "val/iou/background" in metrics
    assert 0.0 <= float(metrics["val/miou_defect"]) <= 1.0
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    loaded = SegmentationModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.class_names == dm.class_names
    assert loaded.hparams.mean == pytest.approx(list(dm.mean))  # recorded from the datamodule by setup()
    model.eval(), loaded.eval()
    loaded.configure_memory_format("cpu")  # the trained model runs in channels_last (auto, on the CPU)
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_optimizer_and_scheduler_factories(tmp_path):
    model = SegmentationModule(
        num_classes=5,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1),
        **TINY,
    )
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(model, tiny_data())
    assert isinstance(t.optimizers[0], torch.optim.SGD)
    assert isinstance(t.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)
    default = SegmentationModule(num_classes=5, **TINY)
    t = trainer(tmp_path, max_steps=4, limit_val_batches=0)
    t.fit(default, tiny_data())
    assert isinstance(t.optimizers[0], torch.optim.AdamW)
    # cosine over the run, stepped per batch: after 4 of 4 steps the lr reached 0
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_configure_network_can_be_overridden(tmp_path):
    class Tiny(SegmentationModule):
        def configure_network(self) -> nn.Module:
            return nn.Conv2d(self.hparams.in_channels, self.num_classes, 3, padding=1)

    model = Tiny(num_classes=5)
    assert isinstance(model.net.network, nn.Conv2d)
    trainer(tmp_path, max_steps=1, limit_val_batches=1).fit(model, tiny_data())
