"""A user's first week: trainer fragments that keep tracking, W&B artifacts and tables read back
from the offline run, `--ckpt_path best` in a new process, on-exception checkpoints, readable
help, the version in checkpoints, normalisation checks and pretrained encoders offline."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from helpers import wandb_offline
from torch import nn

import defectseg
from defectseg.callbacks.checkpoint import resolve_checkpoint
from defectseg.callbacks.images import image_defect_iou
from defectseg.cli import DefectSegCLI, main
from defectseg.data import SyntheticDefectsDataModule
from defectseg.inference.runtime import ModelInfo, module_info
from defectseg.models import PretrainedWeightsError, SegmentationModule
from defectseg.models.networks import build_network, load_pretrained_encoder, load_weights
from defectseg.models.segmentation import loss_from_config
from defectseg.utils.help import strip_rst

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"class_path": "defectseg.models.SegmentationModule",
              "init_args": {"encoder_depth": 3, "decoder_channels": [16, 8, 8], "loss": "ce"}}


def data_model_config(tmp_path: Path, dli: bool = False) -> Path:
    """A data + model config without any trainer settings, like configs/data + configs/model."""
    data = {"num_images": 24, "image_size": [40, 56], "batch_size": 4, "val_fraction": 0.2,
            "test_fraction": 0.2, "num_workers": 0}
    if dli:
        data["dli"] = {"p_poisson": 0.0}
    path = tmp_path / "data_model.yaml"
    path.write_text(yaml.safe_dump({"model": TINY_MODEL, "data": {
        "class_path": "defectseg.data.SyntheticDefectsDataModule", "init_args": data}}))
    return path


def run(*args: str, cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
                   "WANDB_DATA_DIR": str(cwd / "wandb-data"), "WANDB_CACHE_DIR": str(cwd / "wandb-cache"), **env}
    result = subprocess.run([sys.executable, "-m", "defectseg", *args], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# ---------------------------------------------------------------------------------- fragments + W&B
@pytest.fixture(scope="module")
def fragment_run(tmp_path_factory) -> Path:
    """`defectseg fit` with the shipped cpu + wandb fragments on a tiny DLI data + model config."""
    folder = tmp_path_factory.mktemp("fragments")
    config = data_model_config(folder, dli=True)
    run("fit", "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "configs/trainer/wandb.yaml"),
        "--config", str(config), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--checkpoint.dirpath", "ckpt", cwd=folder)
    return folder


@pytest.mark.slow
def test_trainer_fragments_log_to_wandb_offline_with_artifacts_and_tables(fragment_run):
    runs = list((fragment_run / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "wandb.yaml logs offline under runs/"
    run_dir = runs[0]
    # the resolved config keeps the fragments' precision, progress bar and image logger
    saved = yaml.safe_load(next((fragment_run / "runs").rglob("config.yaml")).read_text())
    assert saved["trainer"]["precision"] == "bf16-mixed"
    assert any(c["class_path"].endswith("RichProgressBar") for c in saved["trainer"]["callbacks"])
    assert saved["image_logger"]["num_images"] == 4 and saved["wandb"]["log_checkpoints"] is True

    # checkpoints as artifacts: the best and the last, one artifact name, model.ckpt inside
    logged = wandb_offline.artifacts(run_dir)
    models = [a for a in logged if a[1] == "model"]
    assert {alias for a in models for alias in a[2]} == {"best", "latest"}
    assert all(a[0].startswith("model-") and a[3] == ["model.ckpt"] for a in models)

    rows = wandb_offline.history(run_dir)
    keys = set().union(*rows)
    assert {"val/iou_per_class", "val/iou_per_class_chart_table", "val/predictions", "val/samples",
            "train/dli_counts", "train/dli_counts_before_table", "train/dli_counts_after_table"} <= keys
    # the per-class IoU table holds the IoU logged as scalars at that validation
    row = [r for r in rows if "val/iou_per_class" in r][-1]
    iou = wandb_offline.table(run_dir, row["val/iou_per_class"]["path"])
    assert iou["columns"] == ["epoch", "class", "iou"]
    assert [r[1] for r in iou["data"]] == ["background", "scratch", "pit", "stain", "crack"]
    scalars = [r for r in rows if "val/iou/background" in r][-1]
    assert iou["data"][0][2] == pytest.approx(scalars["val/iou/background"], abs=1e-6)
    # a small predictions table: image, ground truth, prediction, per-image IoU
    row = [r for r in rows if "val/predictions" in r][-1]
    predictions = wandb_offline.table(run_dir, row["val/predictions"]["path"])
    assert predictions["columns"] == ["epoch", "file", "image", "ground_truth", "prediction", "defect_iou"]
    assert len(predictions["data"]) == 4
    assert all(r[5] is None or 0.0 <= r[5] <= 1.0 for r in predictions["data"])
    # DLI counts per batch: 2 batches x (before, after) x 5 columns (defect-free + 4 classes)
    row = [r for r in rows if "train/dli_counts" in r][0]
    counts = wandb_offline.table(run_dir, row["train/dli_counts"]["path"])
    assert counts["columns"] == ["step", "stage", "class", "images"] and len(counts["data"]) == 2 * 2 * 5
    after = [r for r in counts["data"] if r[1] == "after" and r[2] == "defect_free"]
    before = [r for r in counts["data"] if r[1] == "before" and r[2] == "defect_free"]
    assert sum(r[3] for r in after) <= sum(r[3] for r in before)  # DLI turns defect-free images into defective ones


@pytest.mark.slow
def test_ckpt_path_best_and_last_resolve_in_a_new_process(fragment_run):
    config_args = ["--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(fragment_run / "data_model.yaml"),
                   "--checkpoint.dirpath", "ckpt", "--trainer.logger", "false"]
    best = resolve_checkpoint("best", fragment_run / "ckpt")
    assert Path(best).name.startswith("best-")
    state = torch.load(fragment_run / "ckpt" / "last.ckpt", weights_only=True)
    assert state["defectseg_version"] == defectseg.__version__  # the version is in every checkpoint
    result = run("test", *config_args, "--ckpt_path", "best", cwd=fragment_run)
    assert "test/miou_defect" in result.stdout and Path(best).name in result.stdout + result.stderr
    result = run("validate", *config_args, "--ckpt_path", "last", cwd=fragment_run)
    assert "last.ckpt" in result.stdout + result.stderr


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="set checkpoint.dirpath"):
        resolve_checkpoint("best", None)
    with pytest.raises(FileNotFoundError, match="no last.ckpt in"):
        resolve_checkpoint("last", tmp_path)
    torch.save({"callbacks": {"ResumableCheckpoint{}": {"best_model_path": str(tmp_path / "best-003.ckpt")}}},
               tmp_path / "last.ckpt")
    assert resolve_checkpoint("last", tmp_path) == str(tmp_path / "last.ckpt")
    with pytest.raises(FileNotFoundError, match="best-003.ckpt as the best checkpoint, but it is gone"):
        resolve_checkpoint("best", tmp_path)
    (tmp_path / "best-003.ckpt").write_bytes(b"x")
    assert resolve_checkpoint("best", tmp_path) == str(tmp_path / "best-003.ckpt")
    with pytest.raises(SystemExit, match="no last.ckpt"):
        main(["test", "--config", str(data_model_config(tmp_path)), "--checkpoint.dirpath", str(tmp_path / "none"),
              "--trainer.logger", "false", "--ckpt_path", "best"])


@pytest.mark.slow
def test_quickstart_next_steps_run_exactly_as_printed(tmp_path):
    """Train the quickstart briefly, then run the `Then:` commands of configs/quickstart.yaml
    and the README's quickstart block, character for character, in a new process each."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    run("fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "2", "--data.init_args.num_workers", "0", cwd=tmp_path)
    comment = (REPO / "configs/quickstart.yaml").read_text().split("seed_everything")[0]
    commands = [line.split("defectseg", 1)[1] for line in comment.splitlines()[2:] if "defectseg " in line]
    readme = (REPO / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands += [line.split("#")[0].split("defectseg", 1)[1] for line in readme.splitlines()
                 if line.startswith("defectseg test") or line.startswith("defectseg predict")]
    assert any("--ckpt_path best" in c for c in commands)
    for args in dict.fromkeys(tuple(shlex.split(c)) for c in commands):
        result = run(*args, cwd=tmp_path)
        assert "Traceback" not in result.stderr, args
        if args[0] == "test":
            assert "test/miou_defect" in result.stdout and "best-000.ckpt" in result.stdout + result.stderr
        else:
            assert len(list((tmp_path / "predictions").glob("*_mask.png"))) == 60  # the 15 % test split


# ---------------------------------------------------------------------------------- exceptions
class StopAt(L.Callback):
    """Ctrl-C at a given global step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize("save_on_exception", [True, False])
def test_save_on_exception_uses_lightning_and_is_honoured(tmp_path, monkeypatch, save_on_exception):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(data_model_config(tmp_path)), "--trainer.logger", "false",
            "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", "ckpt",
            f"--checkpoint.save_on_exception={str(save_on_exception).lower()}",
            "--trainer.callbacks+=" + f"{__name__}.StopAt"]
    with pytest.raises(SystemExit):
        DefectSegCLI(args=args)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt")) if (tmp_path / "ckpt").exists() else []
    if save_on_exception:
        assert files == ["interrupted-000-1.ckpt", "last.ckpt"]  # not named like a best checkpoint
        assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 1
    else:
        assert files == []


# ---------------------------------------------------------------------------------- help and loss
def test_model_help_is_short_and_plain(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--model.help", "SegmentationModule"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 200  # was 1,572 lines when loss listed every torch module
    assert "``" not in text and ":class:" not in text
    assert "class_path" in text and "--model.loss LOSS" in text
    assert strip_rst("see :class:`~defectseg.losses.BalancedLoss` and ``ce``, :mod:`tiling <a.b>`") == (
        "see BalancedLoss and ce, tiling"
    )


def test_loss_as_class_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loss = '{"class_path": "torch.nn.CrossEntropyLoss", "init_args": {"ignore_index": 255}}'
    cli = DefectSegCLI(args=["fit", "--config", str(data_model_config(tmp_path)), "--trainer.fast_dev_run", "1",
                             "--trainer.logger", "false", "--model.init_args.loss", loss])
    assert isinstance(cli.model.loss_fn, nn.CrossEntropyLoss) and cli.model.loss_fn.ignore_index == 255
    assert cli.model.hparams.loss["class_path"] == "torch.nn.CrossEntropyLoss"  # stored, so checkpoints rebuild it
    with pytest.raises(ValueError, match="needs the form"):
        loss_from_config({"init_args": {}})
    with pytest.raises(ValueError, match="is not an nn.Module"):
        loss_from_config({"class_path": "collections.OrderedDict"})


# ---------------------------------------------------------------------------------- normalisation, version
def _fast_trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path))


def test_setup_checks_mean_and_std_against_the_datamodule(tmp_path):
    data = SyntheticDefectsDataModule(num_images=12, image_size=32, batch_size=4, num_workers=0)
    kwargs = dict(num_classes=data.num_classes, encoder_depth=3, decoder_channels=[8, 8, 8])
    with pytest.raises(ValueError, match=r"model.mean=\[0.5, 0.5, 0.5\] but the datamodule .* normalises with mean="):
        _fast_trainer(tmp_path).fit(SegmentationModule(mean=[0.5] * 3, std=list(data.std), **kwargs), datamodule=data)
    with pytest.raises(ValueError, match=r"model.std="):
        _fast_trainer(tmp_path).fit(SegmentationModule(mean=list(data.mean), std=[1.0] * 3, **kwargs), datamodule=data)
    module = SegmentationModule(**kwargs)  # no mean/std given: the datamodule's are recorded
    _fast_trainer(tmp_path).fit(module, datamodule=data)
    assert module.hparams.mean == pytest.approx(list(data.mean)) and module.hparams.std == pytest.approx(list(data.std))
    info = module_info(module)
    assert info.mean == pytest.approx(list(data.mean)) and info.extra["defectseg_version"] == defectseg.__version__
    # the export metadata (ONNX metadata_props / TorchScript extra file) carries it all
    restored = ModelInfo.from_json(info.to_json())
    assert restored.extra["defectseg_version"] == defectseg.__version__ and restored.class_names == module.class_names


# ---------------------------------------------------------------------------------- W&B helpers
def test_image_defect_iou_by_hand():
    mask = np.array([[0, 1, 1, 255], [0, 2, 2, 2]], np.uint8)
    pred = np.array([[1, 1, 0, 1], [0, 2, 2, 0]], np.uint8)
    # class 1: truth {(0,1),(0,2)}, pred {(0,0),(0,1)} (the ignored pixel drops out): 1/3
    # class 2: truth {(1,1),(1,2),(1,3)}, pred {(1,1),(1,2)}: 2/3; classes 3, 4 absent
    assert image_defect_iou(mask, pred, 5) == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert image_defect_iou(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), 3) is None


# ---------------------------------------------------------------------------------- pretrained encoders
def test_pretrained_weights_offline_fail_at_once_with_the_file_to_fetch(tmp_path):
    """A real offline run (HF_HUB_OFFLINE, empty cache): no download, a short error, no traceback."""
    cache = tmp_path / "hub"
    result = run("fit", "--config", str(data_model_config(tmp_path)), "--trainer.fast_dev_run", "1",
                 "--trainer.logger", "false", "--model.init_args.encoder", "resnet18",
                 "--model.init_args.weights", "imagenet", cwd=tmp_path, check=False,
                 HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "cannot download the 'imagenet' weights of encoder 'resnet18'" in message
    assert re.search(r"https://huggingface.co/smp-hub/resnet18.imagenet/resolve/[0-9a-f]{40}/model.safetensors", message)
    assert str(cache / "models--smp-hub--resnet18.imagenet" / "snapshots") in message
    assert "docs/pretrained.md" in message


def test_pretrained_weight_names_and_timm_offline(monkeypatch):
    network = build_network(encoder="resnet18", encoder_depth=3, num_classes=2, decoder_channels=[8, 8, 8])
    with pytest.raises(ValueError, match=r"no pretrained weights 'imagenet21k'; choose one of \['imagenet', 'ssl', 'swsl'\]"):
        load_pretrained_encoder(network, "resnet18", "imagenet21k")

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    import segmentation_models_pytorch as smp

    monkeypatch.setattr(smp.encoders, "get_encoder", offline)
    with pytest.raises(PretrainedWeightsError, match=r"'tu-resnet18' \(offline\? ConnectionError: Failed to resolve.*timm"):
        load_pretrained_encoder(network, "tu-resnet18", "imagenet")
    with pytest.raises(PretrainedWeightsError, match="cannot download"):
        SegmentationModule(num_classes=2, encoder_depth=3, decoder_channels=[8, 8, 8], weights="imagenet")


def _encoder_equal(module: SegmentationModule, state: dict[str, torch.Tensor], prefix: str = "") -> int:
    own = module.net.network.encoder.state_dict()
    compared = [k for k in state if prefix + k in own and own[prefix + k].shape == state[k].shape]
    assert compared and all(torch.equal(own[prefix + k], state[k]) for k in compared)
    return len(compared)


def test_local_encoder_state_dict_and_the_documented_recipes(tmp_path):
    """The docs/pretrained.md recipes, with random weights instead of downloaded ones."""
    torch.manual_seed(1)
    source = build_network(encoder="resnet18", encoder_depth=5, num_classes=2).encoder.state_dict()
    torch.save(source, tmp_path / "encoder.pt")
    module = SegmentationModule(num_classes=3, encoder_depth=3, decoder_channels=[8, 8, 8],
                                weights=str(tmp_path / "encoder.pt"))
    assert _encoder_equal(module, source) > 10

    import torchvision  # recipe 1: a torchvision ResNet checkpoint, classifier dropped

    state = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "resnet18_torchvision.pt")
    module = SegmentationModule(num_classes=3, weights=str(tmp_path / "resnet18_torchvision.pt"))
    assert _encoder_equal(module, state) == len(state)

    import timm  # recipe 2: a timm model's state dict for a tu- encoder

    state = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save(state, tmp_path / "resnet18_timm.pt")
    module = SegmentationModule(num_classes=3, encoder="tu-resnet18", weights=str(tmp_path / "resnet18_timm.pt"))
    assert _encoder_equal(module, state, prefix="model.") > 10
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(module.net.network, tmp_path / "missing.pt", encoder="resnet18")


# ---------------------------------------------------------------------------------- docs
def _fit_commands() -> list[tuple[str, list[str]]]:
    """Every `defectseg fit` command of the README and docs/*.md, continuation lines joined."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip().strip("`")
            if line.startswith("defectseg fit ") and "--config" in line:
                found.append((f"{path.name}: {line}", re.findall(r"--config\s+(\S+)", line.split("#")[0])))
    return found


def test_every_documented_fit_command_keeps_wandb_and_the_progress_bar():
    commands = _fit_commands()
    assert len(commands) >= 8
    for where, configs in commands:
        merged: dict = {}
        for config in configs:
            path = REPO / config
            if not path.is_file():
                continue  # a run's own saved config (docs/results.md) keeps what its run had
            trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer", {})
            merged.update({k: v for k, v in trainer.items() if k in ("logger", "callbacks")})
        if not any((REPO / c).is_file() for c in configs):
            continue
        logger = merged.get("logger") or {}
        assert str(logger.get("class_path", "")).endswith("WandbLogger"), f"no W&B logger: {where}"
        assert logger.get("init_args", {}).get("offline") is True, f"W&B not offline: {where}"
        callbacks = [c.get("class_path", "") for c in merged.get("callbacks") or []]
        assert any(c.endswith("RichProgressBar") for c in callbacks), f"no rich progress bar: {where}"


@pytest.mark.parametrize("val_every", [1, 2])
def test_last_checkpoint_holds_the_final_step_when_the_metric_stops_improving(tmp_path, val_every):
    """lr 0: the monitored metric never improves after the first validation. Lightning 2.6 alone
    would leave last.ckpt at that first validation; ours holds every later one and the end."""
    from defectseg.callbacks.checkpoint import ResumableCheckpoint
    from defectseg.data import SyntheticDefectsDataModule
    from defectseg.models import SegmentationModule

    data = SyntheticDefectsDataModule(num_images=12, image_size=32, batch_size=4, augment=False, seed=0)
    model = SegmentationModule(num_classes=data.num_classes, encoder_depth=3, decoder_channels=[8, 8, 8], lr=0.0)
    checkpoint = ResumableCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/miou_defect", mode="max", filename="best-{epoch:03d}"
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", logger=False, callbacks=[checkpoint], max_epochs=3,
        check_val_every_n_epoch=val_every, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    bests = sorted(p.name for p in (tmp_path / "ckpt").glob("best-*.ckpt"))
    assert len(bests) == 1  # only the first validation counted as an improvement
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False, map_location="cpu")
    assert state["global_step"] == trainer.global_step and state["epoch"] >= 2
