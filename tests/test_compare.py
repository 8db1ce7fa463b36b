"""The experiment harness (defectseg compare) and the papers' test metrics.

* metrics against hand-made prediction/target maps (expected values counted by hand);
* grid files: expansion, merge order, ``${seed}``, errors;
* the runner's resume logic with a fake launcher (no subprocess);
* paired differences against a baseline, on a hand-made runs.csv (interval computed by hand);
* one tiny grid on synthetic data end to end (2 configurations x 1 seed, 32 px, a few steps):
  runs.csv, summary.md, plots, and a second invocation that runs nothing; one with W&B offline;
* the NEU-Seg CPU recipe trains one batch on generated NEU-Seg data.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import wandb_offline
from helpers.fake_data import make_neu_seg
from helpers.trainer import trainer_config

from defectseg.experiments import CompareRunner, CompareSettings, Grid, GridError, RunConflictError
from defectseg.experiments.paired import paired_difference, t_quantile_975
from defectseg.experiments.plots import plot_paired_differences
from defectseg.experiments.results import aggregate, summary_markdown, write_runs_csv
from defectseg.experiments.runner import best_checkpoint, harness_config, read_metrics_csv
from defectseg.metrics import (
    DefectFreeFalsePositiveRate,
    GlobalDefectIoU,
    ImageWiseIoU,
    global_defect_counts,
    global_defect_iou,
    per_image_confusion,
)

REPO = Path(__file__).resolve().parents[1]


def maps(*rows: str) -> torch.Tensor:
    """A (1, H, W) class map from strings of digits; '.' is 255 (ignore)."""
    return torch.tensor([[[255 if c == "." else int(c) for c in row] for row in rows]])


# ---------------------------------------------------------------------------- metrics
def test_per_image_confusion_counts_each_image_apart():
    target = torch.cat([maps("0011", "0011"), maps("0000", "0.00")])
    preds = torch.cat([maps("0001", "0111"), maps("0100", "0100")])
    confusion = per_image_confusion(preds, target, num_classes=2)
    # image 0: target 0 -> pred 0: 3, 0 -> 1: 1; target 1 -> pred 1: 3, 1 -> 0: 1
    assert confusion[0].tolist() == [[3, 1], [1, 3]]
    # image 1: the ignored pixel (row 1, col 1) counts nowhere, though predicted 1
    assert confusion[1].tolist() == [[6, 1], [0, 0]]


def test_imagewise_iou_skips_images_where_the_class_is_absent_from_both():
    metric = ImageWiseIoU(num_classes=3)
    # image A: class 1 annotated 4 px, predicted 2 of them + 2 elsewhere -> IoU 2/6; class 2 absent in both
    target_a = maps("1100", "1100", "0000")
    preds_a = maps("1000", "1000", "0011")
    # image B: class 1 absent in both (skipped); class 2 annotated 2, predicted 2, overlap 1 -> 1/3
    target_b = maps("0000", "0220", "0000")
    preds_b = maps("0000", "0200", "0020")
    # image C: defect-free, predicted class 1 on one pixel -> class 1 IoU 0 for this image
    target_c = maps("0000", "0000", "0000")
    preds_c = maps("0000", "0000", "0001")
    metric.update(torch.cat([preds_a, preds_b]), torch.cat([target_a, target_b]))
    metric.update(preds_c, target_c)
    iou = metric.compute()
    assert iou[1].item() == pytest.approx((2 / 6 + 0.0) / 2)  # images A and C; B skipped
    assert iou[2].item() == pytest.approx(1 / 3)  # image B only
    # background: A 6/(8+2)... counted by hand: A t0=8 px, p0=8 px, overlap 6 -> 6/10
    bg_a, bg_b, bg_c = 6 / 10, 9 / 11, 11 / 12
    assert iou[0].item() == pytest.approx((bg_a + bg_b + bg_c) / 3)
    assert metric.images.tolist() == [3, 2, 1]


def test_imagewise_iou_differs_from_dataset_level_iou():
    # one large defect found, one small defect missed: the image mean weighs them equally
    metric = ImageWiseIoU(num_classes=2)
    big_t, big_p = maps("1111", "1111"), maps("1111", "1111")
    small_t, small_p = maps("1000", "0000"), maps("0000", "0000")
    metric.update(torch.cat([big_p, small_p]), torch.cat([big_t, small_t]))
    assert metric.compute()[1].item() == pytest.approx(0.5)  # (1 + 0) / 2
    # dataset-level: TP 8, FN 1 -> 8/9
    confmat = per_image_confusion(torch.cat([big_p, small_p]), torch.cat([big_t, small_t]), 2).sum(0)
    assert confmat[1, 1] / (confmat[1].sum() + confmat[:, 1].sum() - confmat[1, 1]) == pytest.approx(8 / 9)


def test_imagewise_iou_is_nan_for_a_class_never_seen():
    metric = ImageWiseIoU(num_classes=3)
    metric.update(maps("0110"), maps("0100"))
    iou = metric.compute()
    assert iou[1].item() == pytest.approx(0.5)
    assert math.isnan(iou[2].item())


def test_global_defect_iou_sums_tp_fp_fn_over_images_and_classes():
    metric = GlobalDefectIoU(num_classes=3)
    # image 1: class 1 TP 2, FN 1; class 2 FP 1
    metric.update(maps("1102", "0000"), maps("1100", "1000"))
    # image 2: a class-2 pixel predicted as class 1: FP for 1, FN for 2; one TP of class 2
    metric.update(maps("12"), maps("22"))
    # TP = 2 + 1 = 3; FP = 1 (class 2, image 1) + 1 (class 1, image 2) = 2; FN = 1 + 1 = 2
    assert global_defect_counts(metric.confmat) == (3, 2, 2)
    assert metric.compute().item() == pytest.approx(3 / 7)


def test_global_defect_iou_from_confusion_matrix_and_empty_case():
    confmat = torch.tensor([[10, 1, 0], [2, 5, 1], [0, 0, 3]])
    # TP 5 + 3; FP: col1 1 + col2 1; FN: row1 2 + 1, row2 0
    assert global_defect_iou(confmat) == pytest.approx(8 / (8 + 2 + 3))
    assert global_defect_iou(torch.tensor([[9, 0], [0, 0]])) == 1.0
    empty = GlobalDefectIoU(2)
    empty.update(maps("00"), maps("00"))
    assert empty.compute().item() == 1.0


def test_fp_rate_on_defect_free_images_with_min_area():
    metric = DefectFreeFalsePositiveRate(min_area=2)
    preds = torch.cat([
        maps("0000", "0000"),  # free, nothing predicted
        maps("0100", "0000"),  # free, 1 px predicted: below min_area
        maps("0110", "0000"),  # free, 2 px: a false positive
        maps("1111", "0000"),  # defective image: not counted
        maps("0000", "0022"),  # free, 2 px predicted, but on ignored (padding) pixels
    ])
    target = torch.cat([
        maps("0000", "0000"), maps("0000", "0000"), maps("0000", "0000"), maps("1100", "0000"),
        maps("0000", "00.."),
    ])
    metric.update(preds, target)  # flags derived from the targets
    assert int(metric.images) == 4
    assert int(metric.false_positives) == 1  # the third image only
    assert metric.compute().item() == pytest.approx(1 / 4)
    assert metric.counts() == (1, 4)

    flagged = DefectFreeFalsePositiveRate(min_area=1)
    flagged.update(preds, target, defect_free=torch.tensor([True, True, False, False, True]))
    # the flags win: the third image is left out; the second (1 px >= 1) is a false positive
    assert int(flagged.images) == 3 and int(flagged.false_positives) == 1
    assert flagged.compute().item() == pytest.approx(1 / 3)


def test_fp_rate_without_defect_free_images_is_nan_and_bad_input_raises():
    metric = DefectFreeFalsePositiveRate()
    metric.update(maps("11"), maps("11"))
    assert math.isnan(metric.compute().item())
    with pytest.raises(ValueError, match="min_area"):
        DefectFreeFalsePositiveRate(min_area=0)
    with pytest.raises(ValueError, match="flags for a batch of 1"):
        metric.update(maps("11"), maps("11"), defect_free=torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        ImageWiseIoU(2).update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        GlobalDefectIoU(2).update(maps("3"), maps("0"))


def test_segmentation_module_logs_the_paper_metrics():
    from defectseg.models import SegmentationModule

    model = SegmentationModule(num_classes=3, class_names=["background", "a", "b"], encoder_depth=3,
                               decoder_channels=[8, 8, 8], fp_min_area=2)
    assert model.test_metrics["fp_rate_defect_free"].min_area == 2
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    model.test_metrics.update(maps("1100"), maps("1000"))
    model.test_metrics.update(maps("0022"), maps("0000"))
    model.log_metrics("test", model.test_metrics)
    # confusion matrix of the two images (rows target, columns prediction):
    # background 4 right, 1 taken for a, 2 for b; a 1 right
    # image-wise: a in image 1 (1 of 2 pixels), b only predicted in image 2 (0 of 2)
    assert logged["test/iou_imagewise/a"] == pytest.approx(0.5)
    assert logged["test/iou_imagewise/b"] == 0.0
    assert logged["test/iou_imagewise"] == pytest.approx(0.25)
    # dataset IoU: background 4 / 7, a 1 / 2, b 0 / 2
    assert logged["test/iou/background"] == pytest.approx(4 / 7)
    assert logged["test/iou/a"] == pytest.approx(0.5) and logged["test/iou/b"] == 0.0
    assert logged["test/miou"] == pytest.approx((4 / 7 + 0.5) / 3) and logged["test/miou_defect"] == pytest.approx(0.25)
    # global defect IoU from the same matrix: TP 1 (a), FP 1 (a) + 2 (b), FN 0 -> 1 / 4
    assert logged["test/global_defect_iou"] == pytest.approx(1 / 4)
    assert logged["test/fp_rate_defect_free"] == 1.0 and logged["test/defect_free_images"] == 1.0
    assert int(model.test_metrics["fp_rate_defect_free"].images) == 0  # reset after logging


# ---------------------------------------------------------------------------- grids
def write_grid(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_grid_product_of_axes_merge_order_and_seed_substitution(tmp_path):
    grid = Grid.from_dict({
        "common": {"model": {"init_args": {"loss": "bce+dice", "lr": 0.1}}},
        "quick": {"model": {"init_args": {"lr": 0.5}}, "data": {"init_args": {"labeled_seed": "${seed}"}}},
        "configurations": {"a": {"model": {"init_args": {"lr": 0.2}}}, "b": None},
        "axes": {"enc": {"r18": {"model": {"init_args": {"encoder": "resnet18"}}},
                         "mnv2": {"model": {"init_args": {"encoder": "mobilenet_v2"}}}}},
        "seeds": {"quick": 2, "full": 4},
    })
    names = [name for name, _ in grid.configurations()]
    assert names == ["a-r18", "a-mnv2", "b-r18", "b-mnv2"]
    runs = grid.runs("quick")
    assert [(r.config, r.seed) for r in runs][:3] == [("a-r18", 0), ("a-r18", 1), ("a-mnv2", 0)]
    assert len(grid.runs("full")) == 16 and len(grid.runs("quick", seeds=[7])) == 4

    from defectseg.experiments.runner import experiment_config

    base = {"model": {"class_path": "defectseg.models.SegmentationModule", "init_args": {"lr": 1.0, "encoder": "x"}},
            "data": {"class_path": "X", "init_args": {"batch_size": 4}}}
    spec = grid.runs("quick", only=["a-mnv2"])[1]
    config = experiment_config(base, grid, "quick", spec, ["trainer.max_epochs=2"])
    init = config["model"]["init_args"]
    # base lr 1.0 < common 0.1 < quick 0.5 < configuration 0.2
    assert init == {"lr": 0.2, "encoder": "mobilenet_v2", "loss": "bce+dice"}
    assert config["data"]["init_args"] == {"batch_size": 4, "labeled_seed": 1}
    assert config["trainer"]["max_epochs"] == 2


@pytest.mark.parametrize(
    "data, message",
    [
        ({"configurations": {"a": {}}, "sedes": 3}, "unknown keys"),
        ({"name": "x"}, "defines no configuration"),
        ({"configurations": {"a b": {}}}, "must start with a letter"),
        ({"configurations": {"a": [1]}}, "must be a config fragment"),
        ({"configurations": {"a": {}}, "seeds": 0}, "seeds.quick must be an int >= 1"),
        ({"configurations": {"a": {}}, "test_checkpoint": "first"}, "'best' or 'last'"),
        ({"configurations": {"a": {}}, "test_checkpoint": {"fast": "last"}}, "keys must be"),
        ({"configurations": {"a-b": {}}, "axes": {"x": {"c": {}}}}, "must start with a letter"),
        ({"configurations": {"a": {}}, "baseline": "z"}, r"baseline names \['z'\] are not configurations"),
        ({"configurations": {"a": {}, "b": {}}, "baseline": {"a": "c"}}, r"baseline names \['c'\]"),
        ({"configurations": {"a": {}}, "baseline": {"a": "a"}}, "with themselves"),
        ({"configurations": {"a": {}}, "baseline": [1]}, "must be a configuration name"),
    ],
)
def test_grid_errors_name_the_problem(data, message):
    with pytest.raises(GridError, match=message):
        Grid.from_dict(data, source="g.yaml")


def test_grid_only_unknown_configuration_and_missing_file(tmp_path):
    grid = Grid.from_dict({"configurations": {"a": {}, "b": {}}}, source="g.yaml")
    with pytest.raises(GridError, match=r"\['c'\]: not configurations.*\['a', 'b'\]"):
        grid.runs("quick", only=["c"])
    with pytest.raises(GridError, match="does not exist"):
        Grid.from_yaml(tmp_path / "missing.yaml")


def test_grid_baseline_pairs_and_the_cpu_mode():
    grid = Grid.from_dict({
        "configurations": {"a": {}, "b": {}, "c": {}}, "baseline": "a",
        "cpu": {"trainer": {"max_epochs": 7}}, "seeds": {"cpu": 2}, "test_checkpoint": {"cpu": "last"},
    })
    assert grid.comparisons(["a", "b", "c"]) == [("b", "a"), ("c", "a")]
    assert grid.comparisons(["b", "c"]) == []  # --only left the baseline out
    assert grid.comparisons(["a", "b", "c"], baseline="c") == [("a", "c"), ("b", "c")]
    with pytest.raises(GridError, match="--baseline 'z': not a configuration"):
        grid.comparisons(["a"], baseline="z")
    mapped = Grid.from_dict({"configurations": {"s10": {}, "u10": {}, "s20": {}, "u20": {}},
                             "baseline": {"u10": "s10", "u20": "s20"}})
    assert mapped.comparisons(["s10", "u10", "s20", "u20"]) == [("u10", "s10"), ("u20", "s20")]
    assert mapped.comparisons(["u10", "s20", "u20"]) == [("u20", "s20")]
    assert grid.seed_list("cpu") == [0, 1] and grid.test_checkpoint == {"quick": "best", "cpu": "last", "full": "best"}
    assert grid.defined_modes == ("cpu",)

    from defectseg.experiments.runner import experiment_config

    spec = grid.runs("cpu")[0]
    assert experiment_config({"trainer": {"max_epochs": 1}}, grid, "cpu", spec)["trainer"]["max_epochs"] == 7
    settings = CompareSettings(base=[], grid=grid, out=Path("o"), quick=True)
    assert settings.mode == "quick" and CompareSettings(base=[], grid=grid, out=Path("o"), mode="cpu").quick is False
    with pytest.raises(GridError, match="contradicts"):
        CompareSettings(base=[], grid=grid, out=Path("o"), mode="cpu", quick=True)
    with pytest.raises(GridError, match="mode must be one of"):
        CompareSettings(base=[], grid=grid, out=Path("o"), mode="fast")


def test_shipped_grids_expand():
    expected = {"losses": 8, "dli": 4, "semi_supervised": 7, "dli_balanced": 5}
    for name, count in expected.items():
        grid = Grid.from_yaml(REPO / "configs" / "compare" / f"{name}.yaml")
        assert len(grid.configurations()) == count
        assert grid.seed_list("cpu") == [0, 1, 2] and grid.seed_list("full") == [0, 1, 2, 3, 4]
        assert "cpu" in grid.defined_modes and grid.test_checkpoint["cpu"] == "last"
        assert grid.comparisons([n for n, _ in grid.configurations()]), f"{name}: no baseline"
        if name != "dli_balanced":  # no quick fragment: the pipeline check is the other grids
            assert grid.seed_list("quick") == [0, 1, 2]
    assert Grid.from_yaml(REPO / "configs/compare/dli_balanced.yaml").comparisons(["bce+dice", "dli", "dli+balanced"]) == [
        ("dli", "bce+dice"), ("dli+balanced", "bce+dice")]
    losses = Grid.from_yaml(REPO / "configs" / "compare" / "losses.yaml").configurations()
    assert [f["model"]["init_args"]["loss"] for _, f in losses] == [
        "ce", "wce", "focal", "dice", "lovasz", "bce+dice", "balanced", "balanced + dice"]


def test_harness_config_sets_folders_logger_seed_and_drops_progress_bars(tmp_path):
    experiment = {"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
                                            {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}],
                              "logger": {"class_path": "WandbLogger"}}}
    config = harness_config(experiment, tmp_path / "run", seed=3)
    assert config["seed_everything"] == 3
    assert config["trainer"]["logger"]["class_path"].endswith("CSVLogger")
    assert config["trainer"]["logger"]["init_args"] == {"save_dir": str(tmp_path / "run"), "name": "logs", "version": "fit"}
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == ["lightning.pytorch.callbacks.LearningRateMonitor"]
    assert config["checkpoint"]["dirpath"] == str(tmp_path / "run" / "checkpoints")
    assert experiment["trainer"]["logger"] == {"class_path": "WandbLogger"}  # not modified


def test_harness_config_with_wandb_keeps_the_csv_logger_last(tmp_path):
    experiment = {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                         "init_args": {"project": "mine", "entity": "team", "offline": True}}}}
    wandb = {"group": "losses/out", "job_type": "ce", "name": "ce/seed_3", "id": "abc", "tags": ["losses", "cpu"]}
    config = harness_config(experiment, tmp_path / "run", seed=3, wandb=wandb)
    first, last = config["trainer"]["logger"]
    assert first["class_path"].endswith("WandbLogger") and last["class_path"].endswith("CSVLogger")
    assert first["init_args"] == {"project": "mine", "entity": "team", "save_dir": str(tmp_path / "run"),
                                  "resume": "allow", **wandb}  # no `offline`: WANDB_MODE decides
    assert last["init_args"]["version"] == "fit"
    assert config["wandb"] == {"log_checkpoints": False}
    kept = harness_config({"wandb": {"log_checkpoints": True}}, tmp_path / "run", seed=0, wandb=wandb)
    assert kept["wandb"] == {"log_checkpoints": True} and kept["trainer"]["logger"][0]["init_args"]["project"] == "defectseg"

    settings = fake_settings(tmp_path, logger="wandb")
    runner = CompareRunner(settings, launcher=FakeLauncher(), printer=lambda s: None)
    plan = runner.plan()
    ids = {run.config["trainer"]["logger"][0]["init_args"]["id"] for run in plan}
    assert len(ids) == len(plan)  # one W&B run per compare run
    assert plan[2].config["trainer"]["logger"][0]["init_args"]["group"] == "grid/out"
    assert plan[2].config["trainer"]["logger"][0]["init_args"]["job_type"] == "b"
    again = CompareRunner(fake_settings(tmp_path, logger="wandb"), launcher=FakeLauncher(), printer=lambda s: None)
    assert [r.config for r in again.plan()] == [r.config for r in plan]  # ids stable: a resume logs to the same run
    csv_plan = CompareRunner(fake_settings(tmp_path), launcher=FakeLauncher(), printer=lambda s: None).plan()
    assert [r.config_hash for r in csv_plan] == [r.config_hash for r in plan]  # the logger is not the experiment


# ---------------------------------------------------------------------------- runner with a fake launcher
class FakeLauncher:
    """Plays the worker: writes checkpoints, marks the fit done, writes test metrics.

    ``interrupt_at`` (a run key) makes that run's first call stop after its last.ckpt."""

    def __init__(self, interrupt_at: str | None = None) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.interrupt_at = interrupt_at

    def __call__(self, command, log_path, env):
        run_dir = Path(command[-1])
        state = json.loads((run_dir / "run.json").read_text())
        key = f"{state['config']}/seed_{state['seed']}"
        self.calls.append((key, list(state.get("fit_command") or []) if not state["fit_done"] else ["test only"]))
        ckpt = Path(state["checkpoint_dir"])
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save({"callbacks": {}}, ckpt / "last.ckpt")
        if self.interrupt_at == key:
            self.interrupt_at = None
            return 1  # crashed mid-fit: last.ckpt written, fit not done
        state["fit_done"] = True
        (run_dir / "run.json").write_text(json.dumps(state))
        logs = run_dir / "logs" / "test"
        logs.mkdir(parents=True, exist_ok=True)
        value = 0.5 if state["config"] == "a" else 0.25
        (logs / "metrics.csv").write_text(
            "epoch,step,test/miou_defect,test/iou/background,test/iou/pit\n"
            f"0,0,{value + state['seed'] / 100},0.9,{value}\n"
        )
        (run_dir / "logs" / "test" / "hparams.yaml").write_text(
            "class_names:\n- background\n- pit\nmean: !!python/tuple\n- 0.5\n"
        )
        return 0


def fake_settings(tmp_path: Path, **kwargs) -> CompareSettings:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"init_args": {"loss": "ce"}}}))
    grid = Grid.from_dict({"configurations": {"a": {}, "b": {"model": {"init_args": {"loss": "dice"}}}},
                           "seeds": {"quick": 2}}, source="fake.yaml")
    return CompareSettings(base=[str(base)], grid=grid, out=tmp_path / "out", quick=True, **kwargs)


def test_runner_resumes_crashed_runs_from_last_ckpt_and_skips_finished(tmp_path):
    launcher = FakeLauncher(interrupt_at="b/seed_0")
    lines: list[str] = []
    runner = CompareRunner(fake_settings(tmp_path), launcher=launcher, printer=lines.append)
    summary = runner.run(validate=False)
    assert summary["executed"] == 3 and [k for k, _ in summary["failed"]] == ["b/seed_0"]
    out = tmp_path / "out"
    assert not (out / "runs" / "b" / "seed_0" / "results.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_*/results.json")}
    assert len(finished) == 3
    assert any("run 4/4: b seed 1" in line for line in lines)

    launcher2 = FakeLauncher()
    summary = CompareRunner(fake_settings(tmp_path), launcher=launcher2, printer=lines.append).run(validate=False)
    assert summary["executed"] == 1 and summary["skipped"] == 3 and not summary["failed"]
    assert [key for key, _ in launcher2.calls] == ["b/seed_0"]  # only the crashed run
    fit = launcher2.calls[0][1]
    last = str(out / "runs" / "b" / "seed_0" / "checkpoints" / "last.ckpt")
    assert fit[fit.index("--ckpt_path") + 1] == last  # resumed from its last checkpoint
    assert fit[-2:] == ["--trainer.logger.init_args.version", "fit_2"]  # first attempt's logs kept
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished runs untouched

    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["config"], r["seed"], r["status"]) for r in rows] == [
        ("a", "0", "finished"), ("a", "1", "finished"), ("b", "0", "finished"), ("b", "1", "finished")]
    assert [float(r["test/miou_defect"]) for r in rows] == [0.5, 0.51, 0.25, 0.26]
    summary_md = (out / "summary.md").read_text()
    assert "| a | 2 | **0.505 ± 0.007** |" in summary_md  # mean and sample std of 0.5, 0.51
    assert "| b | 2 | 0.255 ± 0.007 |" in summary_md
    assert "| configuration | runs | background | pit |" in summary_md  # class order from hparams
    plan = json.loads((out / "compare.json").read_text())
    assert len(plan["invocations"]) == 2 and plan["runs"][0] == "a/seed_0"

    # a run whose fit was done but whose test crashed redoes only its test
    state_path = out / "runs" / "a" / "seed_1" / "run.json"
    (out / "runs" / "a" / "seed_1" / "results.json").unlink()
    launcher3 = FakeLauncher()
    CompareRunner(fake_settings(tmp_path), launcher=launcher3, printer=lines.append).run(validate=False)
    assert launcher3.calls == [("a/seed_1", ["test only"])]
    assert json.loads(state_path.read_text())["fit_done"] is True


def test_runner_runs_jobs_in_parallel_with_a_thread_each(tmp_path, monkeypatch):
    import threading
    import time

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fake = FakeLauncher(interrupt_at="a/seed_1")
    lock, state = threading.Lock(), {"now": 0, "max": 0, "threads": set()}

    def launcher(command, log_path, env):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            state["threads"].add(env.get("OMP_NUM_THREADS"))
        time.sleep(0.3)
        try:
            return fake(command, log_path, env)
        finally:
            with lock:
                state["now"] -= 1

    lines: list[str] = []
    summary = CompareRunner(fake_settings(tmp_path, jobs=2), launcher=launcher, printer=lines.append).run(validate=False)
    assert summary["executed"] == 3 and [k for k, _ in summary["failed"]] == ["a/seed_1"]
    assert state["max"] == 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert state["threads"] == {str(max(1, cores // 2))}
    rows = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    assert [r["status"] for r in rows] == ["finished", "unfinished", "finished", "finished"]
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["invocations"][0]["jobs"] == 2


def test_runner_refuses_foreign_folders_and_changed_configs(tmp_path):
    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(GridError, match="not a defectseg compare folder"):
        CompareRunner(fake_settings(tmp_path), launcher=FakeLauncher(), printer=lambda s: None).run(validate=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    (foreign / "notes.txt").unlink()

    CompareRunner(fake_settings(tmp_path), launcher=FakeLauncher(), printer=lambda s: None).run(validate=False)
    changed = fake_settings(tmp_path, overrides=["model.init_args.lr=0.5"])
    with pytest.raises(RunConflictError, match="different config"):
        CompareRunner(changed, launcher=FakeLauncher(), printer=lambda s: None).run(validate=False)


def test_runner_refuses_a_folder_another_invocation_is_running_in(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "out"
    out.mkdir()
    with (out / ".compare.lock").open("a+") as handle:
        handle.write("pid 12345 on host")
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        launcher = FakeLauncher()
        with pytest.raises(GridError, match="another defectseg compare .pid 12345 on host. is running"):
            CompareRunner(fake_settings(tmp_path), launcher=launcher, printer=lambda s: None).run(validate=False)
        assert launcher.calls == []
    summary = CompareRunner(fake_settings(tmp_path), launcher=FakeLauncher(), printer=lambda s: None).run(validate=False)
    assert summary["executed"] == 4


def test_summary_aggregation_helpers(tmp_path):
    rows = [
        {"config": "x", "seed": 0, "status": "finished", "test/miou_defect": 0.2, "test/fp_rate_defect_free": 0.5},
        {"config": "x", "seed": 1, "status": "finished", "test/miou_defect": 0.4, "test/fp_rate_defect_free": 0.3},
        {"config": "y", "seed": 0, "status": "finished", "test/miou_defect": 0.1, "test/fp_rate_defect_free": 0.1},
        {"config": "y", "seed": 1, "status": "unfinished"},
    ]
    stats = aggregate(rows, "test/miou_defect")
    assert stats["x"][0] == pytest.approx(0.3) and stats["x"][1] == pytest.approx(0.1414, abs=1e-4)
    assert stats["y"] == (0.1, 0.0, 1)
    text = summary_markdown(rows, {"grid": "g", "mode": "quick", "seeds": [0, 1]})
    assert "| x | 2 | **0.300 ± 0.141** |" in text
    assert "| y | 1 | 0.100 | **0.100** |" in text  # lowest FP rate is the best
    assert "Not finished: y/seed_1 (unfinished)" in text
    columns = write_runs_csv(rows, tmp_path / "runs.csv")
    assert columns[:5] == ["config", "seed", "status", "test/miou_defect", "test/fp_rate_defect_free"]
    assert read_metrics_csv(tmp_path / "missing.csv") == {}
    assert best_checkpoint(tmp_path) is None


# ---------------------------------------------------------------------------- paired differences
#: A hand-made runs.csv: `wide` is base + 0.1, 0.2, 0.3 (seeds 0-2), its seed 3 failed; `tight` is
#: base + 0.10, 0.11, 0.12 on both metrics and has no seed 3; base has seeds 0-3.
RUNS_CSV = """config,seed,status,test/miou_defect,test/fp_rate_defect_free
base,0,finished,0.30,0.50
base,1,finished,0.40,0.40
base,2,finished,0.50,0.30
base,3,finished,0.60,0.20
wide,0,finished,0.40,0.50
wide,1,finished,0.60,0.40
wide,2,finished,0.80,0.30
wide,3,unfinished,,
tight,0,finished,0.40,0.60
tight,1,finished,0.51,0.51
tight,2,finished,0.62,0.42
"""


def hand_made_rows(tmp_path: Path) -> list[dict]:
    path = tmp_path / "runs.csv"
    path.write_text(RUNS_CSV)
    return list(csv.DictReader(path.open()))


def test_t_quantiles():
    assert t_quantile_975(2) == 4.3027 and t_quantile_975(1) == 12.7062 and t_quantile_975(30) == 2.0423
    assert t_quantile_975(31) == 1.96  # normal above 30 degrees of freedom
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_differences_by_hand_on_a_made_up_runs_csv(tmp_path):
    rows = hand_made_rows(tmp_path)
    wide = paired_difference(rows, "wide", "base", "test/miou_defect")
    # diffs 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.3027 * 0.057735
    assert [seed for seed, _ in wide.diffs] == [0, 1, 2] and wide.missing == (3,)
    assert wide.mean == pytest.approx(0.2) and wide.sd == pytest.approx(0.1)
    assert wide.half_width == pytest.approx(0.2484, abs=1e-4)
    assert wide.interval == pytest.approx((0.2 - 0.24842, 0.2 + 0.24842), abs=1e-5)
    assert not wide.clear  # -0.048 .. 0.448 holds 0
    tight = paired_difference(rows, "tight", "base", "test/miou_defect")
    # diffs 0.10, 0.11, 0.12: mean 0.11, sd 0.01, half-width 0.02484 -> 0.085 .. 0.135
    assert tight.mean == pytest.approx(0.11) and tight.half_width == pytest.approx(0.02484, abs=1e-5)
    assert tight.clear and tight.missing == (3,)
    assert paired_difference(rows, "base", "base", "test/miou_defect").mean == 0.0
    one = paired_difference(rows[:1] + rows[4:5], "wide", "base", "test/miou_defect")
    assert one.n == 1 and not one.clear and math.isnan(one.half_width)

    text = summary_markdown(rows, {"grid": "g", "mode": "cpu", "seeds": [0, 1, 2, 3]},
                            comparisons=[("wide", "base"), ("tight", "base")])
    assert "## Paired differences against the baseline" in text and "Baseline: `base`" in text
    assert "**With 3 pairs the interval is wide**" in text and "t = 4.30 for 2 degrees of freedom" in text
    assert "| configuration | baseline | pairs | mIoU defect (dataset) | FP rate defect-free |" in text
    assert "| wide | base | 3 (1 left out) | +0.200 [-0.048, +0.448] | +0.000 [+0.000, +0.000] |" in text
    # FP rate: lower is better, so a clear rise is worse
    assert ("| tight | base | 3 (1 left out) | +0.110 [+0.085, +0.135] **clear, better** | "
            "+0.110 [+0.085, +0.135] **clear, worse** |") in text
    assert "Left out, no pair: wide vs base, seed 3 (no result for wide); tight vs base, seed 3 (no result for tight)." in text
    assert "Mode cpu: the base config is a CPU training recipe" in text

    png = plot_paired_differences([r for r in rows if r["status"] == "finished"],
                                  [("wide", "base"), ("tight", "base")], tmp_path / "paired.png", "g (cpu)")
    assert png == tmp_path / "paired.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_paired_differences(rows, [], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_reports_pair_against_the_grid_baseline_and_report_only_takes_another(tmp_path, capsys):
    from defectseg.cli import main

    grid_file = write_grid(tmp_path / "grid.yaml", {"name": "grid", "baseline": "a", "seeds": {"quick": 2},
                                                    "configurations": {"a": {}, "b": {"model": {"init_args": {"loss": "dice"}}}}})
    settings = fake_settings(tmp_path)
    settings.grid = Grid.from_yaml(grid_file)
    CompareRunner(settings, launcher=FakeLauncher(), printer=lambda s: None).run(validate=False)
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    # the fake runs score a 0.5 + seed / 100, b 0.25 + seed / 100: b - a = -0.25 for both seeds
    assert "| b | a | 2 | -0.250 [-0.250, -0.250] **clear, worse** |" in summary
    assert "**With 2 pairs the interval is wide**" in summary
    assert (out / "paired_differences.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "compare.json").read_text())["comparisons"] == [["b", "a"]]

    code = main(["compare", "--base", settings.base[0], "--grid", str(grid_file), "--out", str(out),
                 "--mode", "quick", "--report-only", "--baseline", "b"])
    assert code == 0
    summary = (out / "summary.md").read_text()
    assert "Baseline: `b`" in summary and "| a | b | 2 | +0.250 [+0.250, +0.250] **clear, better** |" in summary


# ---------------------------------------------------------------------------- end to end
def tiny_base(tmp_path: Path) -> Path:
    base = {
        "seed_everything": 0,
        "trainer": trainer_config(tmp_path, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0),
        "model": {"class_path": "defectseg.models.SegmentationModule",
                  "init_args": {"encoder_depth": 3, "decoder_channels": [8, 8, 8], "loss": "ce"}},
        "data": {"class_path": "defectseg.data.SyntheticDefectsDataModule",
                 "init_args": {"num_images": 16, "image_size": 32, "batch_size": 4, "defect_free_fraction": 0.4,
                               "val_fraction": 0.25, "test_fraction": 0.25}},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def run_compare(*args: str, capsys) -> tuple[int, str]:
    """``defectseg compare ARGS`` in this process (the runs are still subprocesses); exit code, stdout."""
    from defectseg.cli import main

    code = main(["compare", *args])
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_compare_tiny_grid_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each run's process: one thread, no oversubscription
    base = tiny_base(tmp_path)
    grid = write_grid(tmp_path / "grid.yaml", {
        "name": "tiny", "seeds": {"quick": 1},
        "quick": {"trainer": {"max_epochs": 1}},
        "configurations": {"ce": {"model": {"init_args": {"loss": "ce"}}},
                           "bce+dice": {"model": {"init_args": {"loss": "bce+dice"}}}},
    })
    args = ["--base", str(base), "--grid", str(grid), "--out", "out", "--quick"]
    code, stdout = run_compare(*args, capsys=capsys)
    logs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("out/runs/*/seed_*/run.log"))
    assert code == 0, stdout + logs
    assert "run 1/2: ce seed 0" in stdout and "run 2/2: bce+dice seed 0" in stdout
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["config"], r["seed"], r["status"]) for r in rows] == [("ce", "0", "finished"), ("bce+dice", "0", "finished")]
    for row in rows:
        for key in ("test/miou_defect", "test/iou_imagewise", "test/global_defect_iou", "test/fp_rate_defect_free"):
            assert 0.0 <= float(row[key]) <= 1.0, (key, row[key])
        assert float(row["wall_time_s"]) > 0
        assert float(row["test/defect_free_images"]) >= 1
    summary = (out / "summary.md").read_text()
    for title in ("mIoU defect (dataset)", "image-wise IoU", "global defect IoU", "FP rate defect-free"):
        assert title in summary
    assert "| ce | 1 |" in summary and "| bce+dice | 1 |" in summary
    for name in ("iou_per_class.png", "miou_per_method.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_dir = out / "runs" / "ce" / "seed_0"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed_everything"] == 0 and saved["model"]["init_args"]["loss"] == "ce"
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == str(run_dir)
    state = json.loads((run_dir / "run.json").read_text())
    assert [c[1] for c in state["commands"]] == ["fit", "test"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # second invocation: everything finished, nothing runs, the results stay as they were
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_*/*") if p.is_file()}
    code, stdout = run_compare(*args, capsys=capsys)
    assert code == 0, stdout
    assert "2 finished earlier, 0 to run" in stdout and "run 1/" not in stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 2


@pytest.mark.slow
def test_compare_logs_each_run_to_wandb_offline_and_still_reads_its_csv(tmp_path, monkeypatch, capsys):
    """--logger wandb: one offline W&B run per compare run (fit and test together), grouped by grid
    and output folder, the configuration as job type; runs.csv still comes from the CSV logs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    grid = write_grid(tmp_path / "grid.yaml", {"name": "tiny", "seeds": {"quick": 1},
                                               "quick": {"trainer": {"max_epochs": 1}},
                                               "configurations": {"ce": {}}})
    args = ["--base", str(tiny_base(tmp_path)), "--grid", str(grid), "--out", "out", "--mode", "quick", "--logger", "wandb"]
    code, stdout = run_compare(*args, capsys=capsys)
    run_dir = tmp_path / "out" / "runs" / "ce" / "seed_0"
    assert code == 0, stdout + (run_dir / "run.log").read_text()[-3000:]
    assert "W&B (offline): group 'tiny/out'" in stdout
    rows = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    assert [(r["config"], r["status"]) for r in rows] == [("ce", "finished")] and float(rows[0]["test/miou_defect"]) >= 0
    assert (run_dir / "logs" / "fit" / "metrics.csv").is_file() and (run_dir / "logs" / "test" / "metrics.csv").is_file()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # the test logged into the fit's W&B run
    records = wandb_offline.read_records(runs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type, run.display_name, run.project) == ("tiny/out", "ce", "ce/seed_0", "defectseg")
    keys = {key for row in wandb_offline.history(runs[0]) for key in row}
    assert {"val/miou_defect", "test/miou_defect"} <= keys, sorted(keys)  # fit and test, one run


def test_a_bad_fragment_is_reported_before_anything_runs(tmp_path):
    grid = Grid.from_dict({"configurations": {"ok": {}, "typo": {"model": {"init_args": {"lossy": "ce"}}}},
                           "seeds": 1}, source="g.yaml")
    settings = CompareSettings(base=[str(tiny_base(tmp_path))], grid=grid, out=tmp_path / "out", quick=True)
    launcher = FakeLauncher()
    with pytest.raises(GridError, match="(?s)configuration 'typo'.*lossy") as error:
        CompareRunner(settings, launcher=launcher, printer=lambda s: None).run()
    assert "'ok'" not in str(error.value)
    assert launcher.calls == [] and not (tmp_path / "out").exists()


def test_shipped_grids_parse_with_the_cli_in_both_modes(tmp_path, capsys):
    """--dry-run checks every merged config of the shipped grids with the `defectseg fit` parser."""
    from defectseg.cli import main

    for grid in ("losses", "dli", "semi_supervised"):
        for mode in (["--quick"], []):
            out = tmp_path / f"{grid}{mode}"
            code = main(["compare", "--base", str(REPO / "configs/compare/synthetic.yaml"), "--grid",
                         str(REPO / f"configs/compare/{grid}.yaml"), "--out", str(out), "--dry-run", *mode])
            assert code == 0
            assert not out.exists()  # a dry run writes nothing
    text = capsys.readouterr().out
    assert "24 runs; configs parse." in text and "40 runs; configs parse." in text  # losses quick, full
    assert "balanced+dice/seed_4" in text


def test_shipped_grids_parse_in_cpu_mode_over_the_cpu_recipes(tmp_path, capsys):
    """Issue 17's grids: every merged cpu-mode config of the shipped grids over the recipes parses."""
    from defectseg.cli import main

    cases = [
        ("magnetic_tile_cpu", "dli_balanced", []),
        ("magnetic_tile_cpu", "dli", ["--only", "resnet18-no_dli,resnet18-dli"]),
        ("neu_seg_cpu", "losses", ["--only", "ce,balanced,dice,balanced+dice"]),
        ("neu_seg_cpu", "semi_supervised", ["--only", "supervised_10,uaps_10"]),
    ]
    for recipe, grid, only in cases:
        code = main(["compare", "--base", str(REPO / f"configs/{recipe}.yaml"), "--grid",
                     str(REPO / f"configs/compare/{grid}.yaml"), "--out", str(tmp_path / grid), "--mode", "cpu",
                     "--dry-run", *only])
        assert code == 0
    text = capsys.readouterr().out
    assert "15 runs; configs parse." in text and "12 runs; configs parse." in text and "6 runs; configs parse." in text
    assert "note:" not in text  # the recipes are CPU configs; every grid has a cpu fragment


def test_neu_seg_cpu_recipe_trains_a_batch_on_generated_neu_seg_data(tmp_path, monkeypatch):
    """configs/neu_seg_cpu.yaml as shipped (relative paths, W&B logger, grouped split), on a tiny
    generated NEU-Seg folder: one training and one validation batch (fast_dev_run)."""
    from defectseg.config import DefectSegCLI

    make_neu_seg(tmp_path / "neu_seg", num_scenes=8, test_unique=3)
    monkeypatch.chdir(tmp_path)
    cli = DefectSegCLI(args=[
        "fit", "--config", str(REPO / "configs/neu_seg_cpu.yaml"), "--data.init_args.root", str(tmp_path / "neu_seg"),
        "--trainer.fast_dev_run", "1", "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
    ])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert cli.datamodule.split == "grouped" and cli.model.hparams.encoder_depth == 4
    assert cli.model.hparams.loss == "wce + dice"


def test_compare_command_errors(tmp_path):
    from defectseg.cli import main

    base = str(tiny_base(tmp_path))
    with pytest.raises(SystemExit, match="grid file .*missing.yaml.* does not exist"):
        main(["compare", "--base", base, "--grid", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])
    grid = write_grid(tmp_path / "g.yaml", {"configurations": {"a": {}}})
    with pytest.raises(SystemExit, match="config file .*nope.yaml.* does not exist"):
        main(["compare", "--base", str(tmp_path / "nope.yaml"), "--grid", str(grid), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="holds no compare.json"):
        main(["compare", "--base", base, "--grid", str(grid), "--out", str(tmp_path / "o"), "--report-only"])
    with pytest.raises(SystemExit):
        main(["compare", "--base", base, "--grid", str(grid), "--out", "o", "--seeds", "2", "--seed-list", "1,2"])


def test_interrupted_runs_get_sigint_after_the_grace_time(tmp_path):
    """On Ctrl-C a run that has not exited by itself within the grace time gets SIGINT (so it can
    write last.ckpt), and one that ignores SIGINT is killed."""
    import signal
    import subprocess
    import sys

    from defectseg.experiments.runner import _exited, _stop_gently

    polite = "import signal, sys, time\nsignal.signal(signal.SIGINT, lambda *a: sys.exit(3))\nprint('ready', flush=True)\ntime.sleep(60)\n"
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    for code, expected in ((polite, 3), (stubborn, -signal.SIGKILL)):
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"  # its handler is installed
        waits = []

        def wait_exited(timeout, process=process, waits=waits):
            waits.append(timeout)
            return _exited(process, min(timeout, 2.0))

        _stop_gently([process], wait_exited, grace=0.1)
        assert process.returncode == expected
        assert waits[0] == 0.1
