"""The defectseg command end to end on tiny synthetic data: fit, test, predict, resume, DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import lightning as L
import pytest
import torch
import yaml
from helpers.trainer import trainer_config

import defectseg
from defectseg.cli import DefectSegCLI, main
from defectseg.data import SyntheticDefectsDataModule
from defectseg.models import SegmentationModule

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, **trainer) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": trainer_config(tmp_path, **{"limit_train_batches": 2, "enable_progress_bar": True, **trainer}),
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
        "model": {
            "class_path": "defectseg.models.SegmentationModule",
            "init_args": {"encoder_depth": 3, "decoder_channels": [16, 8, 8], "loss": "ce+dice"},
        },
        "data": {
            "class_path": "defectseg.data.SyntheticDefectsDataModule",
            "init_args": {
                "num_images": 20, "image_size": [40, 56], "batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.2,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "defectseg", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"defectseg {defectseg.__version__}"
    result = subprocess.run([sys.executable, "-m", "defectseg", "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"defectseg {defectseg.__version__}"


@pytest.mark.slow
def test_fit_test_predict_end_to_end(tmp_path):
    config = tiny_config(tmp_path)
    fitted = run_cli("fit", "--config", str(config), cwd=tmp_path)
    assert "args parameter" not in fitted.stderr, "the console run must not pass sys.argv twice to LightningCLI"
    ckpt_dir = tmp_path / "ckpt"
    assert (ckpt_dir / "last.ckpt").is_file()
    assert any(p.name.startswith("best-") for p in ckpt_dir.iterdir())
    saved = list((tmp_path / "logs").rglob("config.yaml"))
    assert saved, "the resolved config is saved next to the logs"
    resolved = yaml.safe_load(saved[0].read_text())
    assert resolved["model"]["init_args"]["loss"] == "ce+dice"
    hparams = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["num_classes"] == 5 and hparams["class_names"][1] == "scratch"  # linked from the data
    metrics = list((tmp_path / "logs").rglob("metrics.csv"))[0]
    header = next(csv.reader(metrics.open()))
    assert {"val/miou_defect", "val/miou", "val/iou/background", "train/loss"} <= set(header)

    # a re-run into the same folders does not fail on the existing config.yaml
    run_cli("fit", "--config", str(config), cwd=tmp_path)

    result = run_cli("test", "--config", str(config), "--ckpt_path", str(ckpt_dir / "last.ckpt"), cwd=tmp_path)
    assert "test/miou_defect" in result.stdout

    out = tmp_path / "preds"
    run_cli("predict", "--config", str(config), "--ckpt_path", str(ckpt_dir / "last.ckpt"), "--output_dir", str(out), cwd=tmp_path)
    masks = sorted(out.glob("*_mask.png"))
    overlays = sorted(out.glob("*_overlay.png"))
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    expected = {f"synthetic_{s.extra['index']}" for s in SyntheticDefectsDataModule(**data).samples_of("test")}
    assert expected and {p.name[: -len("_mask.png")] for p in masks} == expected
    assert len(overlays) == len(masks)
    for path in masks:
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (40, 56) and mask.dtype == "uint8" and mask.max() < 5  # original size, class ids
    assert cv2.imread(str(overlays[0])).shape == (40, 56, 3)

    # never overwrite unless asked
    before = masks[0].read_bytes()
    env = {**os.environ, "WANDB_MODE": "offline"}
    refused = subprocess.run(
        [sys.executable, "-m", "defectseg", "predict", "--config", str(config), "--ckpt_path",
         str(ckpt_dir / "last.ckpt"), "--output_dir", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert refused.returncode != 0 and "already exists" in refused.stderr + refused.stdout
    assert masks[0].read_bytes() == before
    run_cli("predict", "--config", str(config), "--ckpt_path", str(ckpt_dir / "last.ckpt"),
            "--output_dir", str(out), "--overwrite", "true", cwd=tmp_path)

    # the checkpoint loads with weights_only and carries what predict needs
    model = SegmentationModule.load_from_checkpoint(ckpt_dir / "last.ckpt", weights_only=True)
    assert model.hparams.mean == pytest.approx([0.485, 0.456, 0.406]) and model.num_classes == 5


class StopAt(L.Callback):
    """Simulates Ctrl-C at a given global step."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class CountSteps(SegmentationModule):
    """Records the global step of every training step it runs."""

    seen_steps: list[int] = []  # class-level: survives the SystemExit of an interrupted run

    def training_step(self, batch, batch_idx):
        CountSteps.seen_steps.append(self.global_step)
        return super().training_step(batch, batch_idx)


def test_interrupted_fit_resumes_at_the_step_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 2 batches per epoch, 3 epochs: the interruption at step 3 falls in the middle of epoch 1
    config = tiny_config(tmp_path, limit_train_batches=2, max_epochs=3, limit_val_batches=1)
    common = ["--config", str(config), "--model.class_path", f"{__name__}.CountSteps",
              "--model.init_args.encoder_depth", "3", "--model.init_args.decoder_channels", "[16, 8, 8]"]
    CountSteps.seen_steps = []
    with pytest.raises(SystemExit):  # Lightning exits with 1 after a graceful Ctrl-C shutdown
        DefectSegCLI(args=["fit", *common, "--trainer.callbacks+=" + f"{__name__}.StopAt"])
    assert CountSteps.seen_steps == [0, 1, 2]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    CountSteps.seen_steps = []
    second = DefectSegCLI(args=["fit", *common, "--ckpt_path", "last"])
    assert CountSteps.seen_steps == [3, 4, 5]  # continues mid-epoch, does not start over
    assert second.trainer.global_step == 6


def test_missing_ckpt_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="nope.ckpt"):
        DefectSegCLI(args=["fit", "--config", str(tiny_config(tmp_path)), "--ckpt_path", "nope.ckpt"])


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_logs_synced_metrics(tmp_path):
    """fit with devices=2, strategy=ddp (gloo): the logged val IoU equals a single-process
    validation of the same weights over the whole validation set."""
    config = tiny_config(tmp_path, devices=2, strategy="ddp", limit_train_batches=2)
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    # an even validation set: no sample is repeated by the distributed sampler's padding
    assert len(SyntheticDefectsDataModule(**data).samples_of("val")) % 2 == 0
    run_cli("fit", "--config", str(config), cwd=tmp_path)
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    logged = [float(r["val/miou"]) for r in rows if r.get("val/miou")][-1]
    (tmp_path / "single").mkdir()
    single = tiny_config(tmp_path / "single")
    run_cli("validate", "--config", str(single), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), cwd=tmp_path)
    rows = list(csv.DictReader(next((tmp_path / "single" / "logs").rglob("metrics.csv")).open()))
    reference = [float(r["val/miou"]) for r in rows if r.get("val/miou")][-1]
    assert logged == pytest.approx(reference, abs=1e-6)


def test_wandb_offline_run_stores_config_and_validation_images(tmp_path):
    config = tiny_config(tmp_path, limit_val_batches=1)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"save_dir": str(tmp_path / "wb"), "offline": True, "project": "defectseg-test"},
    }
    data["image_logger"] = {"num_images": 2}
    config.write_text(yaml.safe_dump(data))
    run_cli("fit", "--config", str(config), cwd=tmp_path)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].rglob("media/images/val/samples_*.png"))
    masks = list(runs[0].rglob("media/images/mask/val/samples_*.png"))
    # a ground-truth and a prediction layer per image (W&B stores identical mask files once)
    assert len(images) == 2 and 2 <= len(masks) <= 4
    # offline runs keep their config records in the run's .wandb file until `wandb sync`
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b'"class_path":"defectseg.data.SyntheticDefectsDataModule"' in record
    assert b'"loss":"ce+dice"' in record and b'"num_images":20' in record


@pytest.mark.parametrize("config", ["quickstart.yaml", "dli_synthetic.yaml", "uaps_synthetic.yaml"])
def test_shipped_synthetic_configs_run(config, tmp_path):
    """The configs the README tells users to run parse and train one step as shipped (data
    shrunk, fast_dev_run), relative paths and all, so they cannot rot."""
    result = run_cli(
        "fit", "--config", str(REPO / "configs" / config), "--trainer.fast_dev_run", "1",
        "--data.init_args.num_images", "40", "--data.init_args.num_workers", "0", cwd=tmp_path,
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))  # fast_dev_run: no ckpt
