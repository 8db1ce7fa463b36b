"""channels_last, the bf16 fallback and sliding-window evaluation."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn

from defectseg.data import SyntheticDefectsDataModule
from defectseg.models import SegmentationModule
from defectseg.models.memory_format import check_channels_last, resolve_channels_last
from defectseg.utils import hardware


def small_model(**kwargs):
    base = dict(num_classes=5, encoder_depth=3, decoder_channels=[16, 8, 8], lr=1e-3)
    return SegmentationModule(**{**base, **kwargs})


def test_channels_last_settings_resolve_per_device():
    assert resolve_channels_last("auto", "cpu") and resolve_channels_last("auto", torch.device("cuda", 0))
    assert not resolve_channels_last("auto", "mps") and resolve_channels_last(True, "mps")
    assert not resolve_channels_last(False, "cpu") and not resolve_channels_last("false", "cpu")
    with pytest.raises(ValueError, match="channels_last"):
        check_channels_last("sometimes")
    with pytest.raises(ValueError, match="channels_last"):
        small_model(channels_last="sometimes")


def convs_channels_last(module: nn.Module) -> list[bool]:
    # 1x1 kernels and single-channel inputs are contiguous in both formats: only the others tell
    return [
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in module.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.in_channels > 1
    ]


@pytest.mark.parametrize("setting, expected", [("auto", True), (False, False)])
def test_the_trainer_puts_the_network_in_the_resolved_format(setting, expected):
    model = small_model(channels_last=setting)
    dm = SyntheticDefectsDataModule(num_images=12, image_size=64, batch_size=4, augment=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    flags = convs_channels_last(model.net)
    assert flags and all(f == expected for f in flags)
    assert model._channels_last is expected


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = small_model().eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = model(images)
        model.configure_memory_format("cpu")
        fast = model(images)
    assert model._channels_last and fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_bf16_falls_back_to_fp32_on_a_cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert hardware.resolve_precision("bf16-mixed", "cpu") == "32-true"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.resolve_precision("32-true", "cpu") == "32-true"
        assert hardware.resolve_precision("16-mixed", "cpu") == "16-mixed"
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_the_cli_builds_the_trainer_with_the_fallback(monkeypatch, tmp_path):
    from defectseg.cli import DefectSegCLI

    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    args = ["--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path),
            "--model", "defectseg.models.SegmentationModule", "--model.encoder_depth", "3",
            "--model.decoder_channels", "[16, 8, 8]",
            "--data", "defectseg.data.SyntheticDefectsDataModule", "--data.num_images", "12"]
    with pytest.warns(UserWarning, match="no native bf16"):
        cli = DefectSegCLI(args=args, run=False)
    assert cli.trainer.precision == "32-true"


class PixelNet(nn.Module):
    """A per-pixel network (1x1 convolutions): its output does not depend on the tiling."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    def forward(self, x):
        return self.body(x)


class PixelModule(SegmentationModule):
    def configure_network(self) -> nn.Module:
        return PixelNet(self.hparams.in_channels, self.num_classes)


def eval_batch():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    return {"image": images, "mask": torch.zeros(2, 96, 128, dtype=torch.long),
            "valid_size": torch.tensor([[96, 128], [80, 100]])}


def test_sliding_evaluation_with_one_covering_tile_is_the_whole_image_pass():
    model = small_model(eval_tile_size=128).eval()
    batch = eval_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval_logits(batch), model(batch["image"]), rtol=0, atol=0)


def test_sliding_evaluation_blends_tiles_into_the_whole_image_prediction():
    whole = PixelModule(num_classes=5).eval()
    tiled = PixelModule(num_classes=5, eval_tile_size=48, eval_tile_overlap=16).eval()
    tiled.load_state_dict(whole.state_dict())
    batch = eval_batch()
    with torch.no_grad():
        expected = whole(batch["image"]).softmax(dim=1)
        got = tiled.eval_logits(batch).softmax(dim=1)
    for index, (h, w) in enumerate(batch["valid_size"].tolist()):
        torch.testing.assert_close(got[index, :, :h, :w], expected[index, :, :h, :w], rtol=1e-5, atol=1e-6)
