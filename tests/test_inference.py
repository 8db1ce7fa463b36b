"""Inference on raw images: Predictor, tiling, reports, the infer command, safe checkpoints."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers.trainer import quiet_trainer
from torch import nn

from defectseg.cli import main
from defectseg.data.synthetic import SyntheticDefectsDataModule
from defectseg.inference import (
    CheckpointError,
    Predictor,
    ReportWriter,
    TilePlan,
    analyze,
    list_images,
    load_module,
)
from defectseg.inference.checkpoint import _under_identity, check_checkpoint_matches
from defectseg.inference.report import resolve_min_area
from defectseg.inference.tiling import axis_starts
from defectseg.models import SegmentationModule

CLASSES = ["background", "scratch", "pit"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_module(**kwargs) -> SegmentationModule:
    torch.manual_seed(0)
    args = dict(num_classes=3, class_names=CLASSES, encoder_depth=3, decoder_channels=[16, 8, 8],
                mean=MEAN, std=STD)
    args.update(kwargs)
    return SegmentationModule(**args)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint after one real training step on synthetic data."""
    folder = tmp_path_factory.mktemp("ckpt")
    data = SyntheticDefectsDataModule(num_images=12, image_size=64, num_defect_classes=2, batch_size=4,
                                      cache_dir=str(folder / "cache"))
    module = tiny_module()
    trainer = quiet_trainer(folder, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = folder / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (so predictions are not pure noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def _reference_probs(module: nn.Module, image: np.ndarray) -> np.ndarray:
    """Probabilities computed the training way: normalise by hand, module.forward, softmax."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return module.eval()(x).softmax(1)[0].numpy()


# ---------------------------------------------------------------------------------- tiling
def test_axis_starts_cover_with_overlap():
    # stride 512 - 64 = 448: 0, 448, 896 and the last tile aligned to the end at 1600 - 512
    assert axis_starts(1600, 512, 64) == [0, 448, 896, 1088]
    assert axis_starts(300, 512, 64) == [0]
    plan = TilePlan(256, 1600, 512, 64)
    assert len(plan) == 4 and all(t.height == 256 and t.width == 512 for t in plan.tiles)
    covered = np.zeros((256, 1600), int)
    total = np.zeros((256, 1600))
    for tile in plan.tiles:
        covered[tile.slices] += 1
        total[tile.slices] += plan.weights(tile)
    assert covered.min() >= 1 and total.min() > 0
    assert np.all(total[:, :448] == 1.0)  # image border and single coverage keep full weight
    with pytest.raises(ValueError, match="overlap"):
        TilePlan(100, 100, 64, 64)


def test_tiling_reproduces_untiled_on_image_that_fits_in_one_tile():
    module = tiny_module()
    image = _rgb(64, 96)
    whole = Predictor(module, tile_size=None, return_probabilities=True).predict(image)
    tiled = Predictor(module, tile_size=(64, 128), overlap=16, return_probabilities=True).predict(image)
    np.testing.assert_array_equal(tiled.mask, whole.mask)
    np.testing.assert_allclose(tiled.probabilities, whole.probabilities, atol=1e-6)
    np.testing.assert_allclose(whole.probabilities, _reference_probs(module, image), atol=1e-5)
    assert whole.mask.shape == (64, 96)
    np.testing.assert_array_equal(whole.mask, whole.probabilities.argmax(0))


class PointwiseModule(SegmentationModule):
    """A per-pixel network (1x1 conv): tiled and untiled predictions must agree exactly."""

    def configure_network(self) -> nn.Module:
        return nn.Conv2d(self.hparams.in_channels, self.num_classes, 1)


def test_blending_is_exact_for_a_pointwise_model_on_many_tiles():
    torch.manual_seed(0)
    module = PointwiseModule(num_classes=3, class_names=CLASSES, mean=MEAN, std=STD)
    image = _rgb(100, 150, seed=3)
    whole = Predictor(module, tile_size=None, return_probabilities=True).predict(image)
    for tile, overlap in ((32, 8), ((64, 48), 20), (40, 0)):
        tiled = Predictor(module, tile_size=tile, overlap=overlap, batch_size=3,
                          return_probabilities=True).predict(image)
        np.testing.assert_allclose(tiled.probabilities, whole.probabilities, atol=1e-5)
    flipped = Predictor(module, tile_size=32, overlap=8, tta="flip", return_probabilities=True).predict(image)
    np.testing.assert_allclose(flipped.probabilities, whole.probabilities, atol=1e-5)


def test_flip_tta_is_the_mean_over_flips():
    module = tiny_module()
    image = _rgb(64, 64, seed=5)
    got = Predictor(module, tile_size=None, tta="flip", return_probabilities=True).predict(image).probabilities
    expected = np.zeros_like(got)
    for axes in ((), (0,), (1,), (0, 1)):
        flipped = np.ascontiguousarray(np.flip(image, axis=axes) if axes else image)
        probs = _reference_probs(module, flipped)
        expected += np.flip(probs, axis=tuple(a + 1 for a in axes)) if axes else probs
    np.testing.assert_allclose(got, expected / 4, atol=1e-5)
    hflip = Predictor(module, tile_size=None, tta="hflip", return_probabilities=True).predict(image).probabilities
    manual = (_reference_probs(module, image) + _reference_probs(module, np.ascontiguousarray(image[:, ::-1]))[:, :, ::-1]) / 2
    np.testing.assert_allclose(hflip, manual, atol=1e-5)


def test_small_images_are_padded_like_training():
    module = tiny_module()
    image = _rgb(20, 30, seed=2)
    result = Predictor(module, return_probabilities=True).predict(image)
    assert result.mask.shape == (20, 30)
    # SegmentationModule.forward pads with PadToMultiple: the same result
    np.testing.assert_allclose(result.probabilities, _reference_probs(module, image), atol=1e-5)


def test_batched_stream_matches_single_images_in_order():
    module = tiny_module()
    images = [_rgb(64, 64, 1), _rgb(64, 200, 2), _rgb(20, 40, 3), _rgb(96, 64, 4)]
    predictor = Predictor(module, tile_size=64, overlap=16, batch_size=3, return_probabilities=True)
    batched = predictor.predict_batch(images, names=["a", "b", "c", "d"])
    assert [p.path for p in batched] == ["a", "b", "c", "d"]
    one_by_one = Predictor(module, tile_size=64, overlap=16, batch_size=1, return_probabilities=True,
                           num_workers=0)
    for image, result in zip(images, batched):
        single = one_by_one.predict(image)
        assert result.mask.shape == image.shape[:2]
        np.testing.assert_allclose(result.probabilities, single.probabilities, atol=1e-5)


def test_gray_image_and_resize():
    module = tiny_module()
    gray = _rgb(64, 64, 7)[..., 0]
    result = Predictor(module, return_probabilities=True).predict(gray)
    np.testing.assert_allclose(result.probabilities, _reference_probs(module, np.repeat(gray[..., None], 3, 2)), atol=1e-5)
    image = _rgb(64, 64, 8)
    resized = Predictor(module, resize=32, return_probabilities=True).predict(image)
    small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)
    expected = cv2.resize(_reference_probs(module, small).transpose(1, 2, 0), (64, 64), interpolation=cv2.INTER_LINEAR)
    assert resized.mask.shape == (64, 64)
    np.testing.assert_allclose(resized.probabilities, expected.transpose(2, 0, 1), atol=1e-5)


def test_predictor_rejects_bad_arrays_and_options():
    module = tiny_module()
    predictor = Predictor(module)
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        predictor.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="tta"):
        Predictor(module, tta="rotate")
    with pytest.raises(ValueError, match="overlap"):
        Predictor(module, tile_size=64, overlap=64)
    with pytest.raises(ValueError, match=r"'crack'.*\['scratch', 'pit'\]"):
        Predictor(module, min_area={"crack": 3})


# ---------------------------------------------------------------------------------- reports
def test_report_matches_hand_made_mask():
    mask = np.zeros((20, 30), np.uint8)
    confidence = np.full((20, 30), 0.5, np.float32)
    mask[2:5, 3:8] = 1  # 3 x 5 = 15 px, box x=3 y=2 w=5 h=3
    confidence[2:5, 3:8] = 0.9
    confidence[3, 4] = 0.95
    mask[10, 10] = 1  # a 1-px speck
    confidence[10, 10] = 0.6
    mask[15, 20] = mask[16, 21] = 2  # diagonal neighbours: one component with 8-connectivity
    mask[12:14, 25:27] = 2  # 2 x 2 block
    confidence[mask == 2] = 0.7
    confidence[12, 25] = 0.8

    filtered, report = analyze(mask, confidence, CLASSES, file="part.png")
    scratch, pit = report.classes["scratch"], report.classes["pit"]
    assert scratch.area == 16 and scratch.count == 2
    assert sorted(scratch.boxes) == [(3, 2, 5, 3), (10, 10, 1, 1)]
    assert scratch.max_confidence == pytest.approx(0.95)
    assert scratch.mean_confidence == pytest.approx((14 * 0.9 + 0.95 + 0.6) / 16, rel=1e-6)
    assert pit.area == 6 and pit.count == 2
    assert sorted(pit.boxes) == [(20, 15, 2, 2), (25, 12, 2, 2)]
    assert pit.max_confidence == pytest.approx(0.8)
    assert report.defect_free is False and report.num_defects == 4
    assert filtered is mask  # nothing dropped

    _, four = analyze(mask, confidence, CLASSES, connectivity=4)
    assert four.classes["pit"].count == 3

    filtered, report = analyze(mask, confidence, CLASSES, min_area={"scratch": 2, "pit": 5})
    scratch, pit = report.classes["scratch"], report.classes["pit"]
    assert scratch.area == 15 and scratch.count == 1 and scratch.dropped == 1
    assert scratch.boxes == [(3, 2, 5, 3)]
    assert scratch.max_confidence == pytest.approx(0.95)
    assert pit.area == 0 and pit.count == 0 and pit.dropped == 2
    assert filtered[10, 10] == 0 and filtered[16, 21] == 0 and filtered[3, 4] == 1
    assert mask[10, 10] == 1  # the input is not modified
    assert (filtered > 0).sum() == 15

    _, empty = analyze(np.zeros((8, 8), np.uint8), np.ones((8, 8), np.float32), CLASSES)
    assert empty.defect_free is True and empty.num_defects == 0


def test_min_area_resolution():
    assert resolve_min_area(None, CLASSES) == {1: 0, 2: 0}
    assert resolve_min_area(7, CLASSES) == {1: 7, 2: 7}
    assert resolve_min_area({"pit": 4, 1: 2}, CLASSES) == {1: 2, 2: 4}
    with pytest.raises(ValueError, match="background"):
        resolve_min_area({0: 3}, CLASSES)
    with pytest.raises(ValueError, match=">= 0"):
        resolve_min_area(-1, CLASSES)


def test_report_writer_files(tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[1:3, 2:6] = 2
    confidence = np.full(mask.shape, 0.75, np.float32)
    _, report = analyze(mask, confidence, CLASSES, file="x.png")
    with ReportWriter(tmp_path, CLASSES) as writer:
        writer.write(report)
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert rows[0]["file"] == "x.png" and rows[0]["defect_free"] == "0"
    assert rows[0]["pit_area"] == "8" and rows[0]["pit_count"] == "1" and rows[0]["pit_boxes"] == "2 1 4 2"
    assert rows[0]["scratch_area"] == "0" and float(rows[0]["pit_max_conf"]) == pytest.approx(0.75)
    record = json.loads((tmp_path / "report.jsonl").read_text())
    assert record["classes"]["pit"]["components"] == [
        {"area": 8, "bbox": [2, 1, 4, 2], "max_confidence": 0.75, "mean_confidence": 0.75}
    ]
    before = (tmp_path / "report.csv").read_bytes()
    with pytest.raises(FileExistsError, match="report.csv"):
        ReportWriter(tmp_path, CLASSES).__enter__()
    assert (tmp_path / "report.csv").read_bytes() == before


# ---------------------------------------------------------------------------------- files and CLI
def _write_images(folder: Path) -> list[Path]:
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.png", folder / "strip.png", folder / "sub" / "c.bmp"]
    cv2.imwrite(str(paths[0]), cv2.cvtColor(_rgb(64, 64, 11), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(paths[1]), _rgb(48, 160, 12)[..., 0])  # gray strip
    cv2.imwrite(str(paths[2]), cv2.cvtColor(_rgb(40, 40, 13), cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image")
    return paths


def test_list_images(tmp_path):
    paths = _write_images(tmp_path / "in")
    assert list_images(tmp_path / "in") == paths[:2]
    assert list_images(tmp_path / "in", recursive=True) == [paths[0], paths[1], paths[2]]
    assert list_images(str(tmp_path / "in" / "*.png")) == paths[:2]
    assert list_images([str(tmp_path / "in" / "**" / "*.bmp"), paths[0]]) == [paths[2], paths[0]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no image matches"):
        list_images(str(tmp_path / "in" / "*.jpg"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    only_sub = tmp_path / "nested"
    (only_sub / "x").mkdir(parents=True)
    cv2.imwrite(str(only_sub / "x" / "i.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(FileNotFoundError, match="--recursive"):
        list_images(only_sub)


def test_infer_command_writes_masks_overlays_and_reports(tmp_path, ckpt, capsys):
    paths = _write_images(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["infer", "--ckpt", str(ckpt), "--input", str(tmp_path / "in"), "--recursive",
                 "--output", str(out), "--tile", "64", "--overlap", "16", "--min-area", "pit=3", "-q"])
    assert code == 0
    assert "3 images" in capsys.readouterr().out
    predictor = Predictor(ckpt, tile_size=64, overlap=16, min_area={"pit": 3})
    for path, stem_dir in zip(paths, [out, out, out / "sub"]):
        mask_file, overlay_file = stem_dir / f"{path.stem}_mask.png", stem_dir / f"{path.stem}_overlay.png"
        written = cv2.imread(str(mask_file), cv2.IMREAD_UNCHANGED)
        expected = predictor.predict(path).mask
        assert written.dtype == np.uint8 and written.shape == expected.shape
        np.testing.assert_array_equal(written, expected)
        assert cv2.imread(str(overlay_file)).shape == (*expected.shape, 3)
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [r["file"] for r in rows] == [str(p) for p in paths]
    records = [json.loads(line) for line in open(out / "report.jsonl")]
    assert records[1]["height"] == 48 and records[1]["width"] == 160
    for record in records:
        mask = cv2.imread(record["outputs"]["mask"], cv2.IMREAD_UNCHANGED)
        for name, entry in record["classes"].items():
            assert entry["area"] == int((mask == entry["index"]).sum()), name
            assert entry["count"] == len(entry["components"])
        assert record["defect_free"] == (not mask.any())


def test_infer_never_overwrites_without_asking(tmp_path, ckpt):
    _write_images(tmp_path / "in")
    out = tmp_path / "out"
    args = ["infer", "--ckpt", str(ckpt), "--input", str(tmp_path / "in" / "*.png"), "--output", str(out), "-q"]
    assert main(args) == 0
    mask_file = out / "a_mask.png"
    mask_file.write_bytes(b"user data")
    (out / "report.csv").write_text("old report")
    with pytest.raises(SystemExit, match="already exist.*--overwrite"):
        main(args)
    assert mask_file.read_bytes() == b"user data" and (out / "report.csv").read_text() == "old report"
    # the same through the predict alias, asking to overwrite
    assert main(["predict", *args[1:], "--overwrite"]) == 0
    assert cv2.imread(str(mask_file), cv2.IMREAD_UNCHANGED) is not None
    assert (out / "report.csv").read_text().startswith("file,")


def test_infer_bad_inputs_give_clear_errors(tmp_path, ckpt):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no image"):
        main(["infer", "--ckpt", str(ckpt), "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o1")])
    folder = tmp_path / "in"
    _write_images(folder)
    (folder / "b_broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "o2"
    with pytest.raises(SystemExit, match=r"cannot decode .*b_broken.png.*kept.*--resume"):
        main(["infer", "--ckpt", str(ckpt), "--input", str(folder), "--output", str(out), "-q", "--on-error", "raise"])
    # what was written before the broken image is kept (a.png comes first)
    assert (out / "a_mask.png").exists() and (out / "report.csv").exists()
    # the default records the broken image and goes on, exiting 1 at the end
    assert main(["infer", "--ckpt", str(ckpt), "--input", str(folder), "--output", str(tmp_path / "o2b"), "-q"]) == 1
    out = tmp_path / "o2b"
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert len(rows) == 3
    broken = [r for r in rows if r["file"].endswith("b_broken.png")][0]
    assert "cannot decode" in broken["error"] and broken["defect_free"] == ""
    assert (out / "strip_mask.png").exists() and not (out / "b_broken_mask.png").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        main(["infer", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", str(folder), "--output", str(tmp_path / "o3")])
    with pytest.raises(SystemExit, match=r"num_classes: checkpoint 3, expected 5"):
        main(["infer", "--ckpt", str(ckpt), "--input", str(folder), "--output", str(tmp_path / "o4"),
              "--expect-classes", "5"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor(ckpt).predict(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------- checkpoints
class Opaque:
    """A class that weights_only loading refuses to unpickle."""


def test_checkpoints_load_safely_with_clear_errors(tmp_path, ckpt):
    module = load_module(ckpt)
    assert isinstance(module, SegmentationModule) and not module.training
    state = torch.load(ckpt, weights_only=True)

    stored = dict(state, hyper_parameters={**state["hyper_parameters"], "_class_path": "defectseg.models.SegmentationModule",
                                           "_instantiator": "lightning.pytorch.cli.instantiate_module"})
    torch.save(stored, tmp_path / "cli.ckpt")
    assert type(load_module(tmp_path / "cli.ckpt")) is SegmentationModule

    foreign = dict(state, hyper_parameters={**state["hyper_parameters"], "_class_path": "os.system"})
    torch.save(foreign, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="'os.system', which is not a defectseg model"):
        load_module(tmp_path / "foreign.ckpt")

    torch.save({"state_dict": {}, "hyper_parameters": {"payload": Opaque()}}, tmp_path / "unsafe.ckpt")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_module(tmp_path / "unsafe.ckpt")

    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read .*text.ckpt"):
        load_module(tmp_path / "text.ckpt")

    torch.save(state["state_dict"], tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_module(tmp_path / "plain.pt")

    # hyper-parameters saying FPN with Unet weights: names both sides
    other = dict(state, hyper_parameters={**state["hyper_parameters"], "arch": "FPN"})
    torch.save(other, tmp_path / "fpn.ckpt")
    with pytest.raises(CheckpointError, match=r"FPN/resnet18.*do not fit|do not fit.*FPN/resnet18"):
        load_module(tmp_path / "fpn.ckpt")

    with pytest.raises(CheckpointError, match=r"num_classes: checkpoint 3, expected 5"):
        Predictor(ckpt, expect={"num_classes": 5})
    with pytest.raises(CheckpointError, match=r"arch: checkpoint 'Unet', expected 'FPN'"):
        Predictor(ckpt, expect={"arch": "FPN"})
    assert Predictor(ckpt, expect={"class_names": CLASSES}).class_names == CLASSES


def test_configured_model_must_match_checkpoint(ckpt):
    check_checkpoint_matches(ckpt, tiny_module())
    with pytest.raises(CheckpointError, match=r"3 classes.*5 classes.*num_classes: checkpoint 3, model 5"):
        check_checkpoint_matches(ckpt, tiny_module(num_classes=5, class_names=None))
    with pytest.raises(CheckpointError, match=r"Unet/resnet18.*FPN/resnet18.*arch: checkpoint 'Unet', model 'FPN'"):
        check_checkpoint_matches(ckpt, tiny_module(arch="FPN", decoder_channels=None))


def test_weights_of_pruned_layers_are_ignored():
    model = nn.Sequential(nn.Linear(2, 2), nn.Identity())
    assert _under_identity(model, "1.weight")
    assert not _under_identity(model, "0.weight")
    assert not _under_identity(model, "2.weight")


def test_predictor_api_on_files(ckpt, tmp_path):
    image = _rgb(64, 80, 21)
    cv2.imwrite(str(tmp_path / "x.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    predictor = Predictor(ckpt, tile_size=None, return_probabilities=True)
    from_file = predictor.predict(tmp_path / "x.png")
    from_array = predictor.predict(image, name="x")
    assert from_file.path == str(tmp_path / "x.png") and from_array.report.file == "x"
    np.testing.assert_array_equal(from_file.mask, from_array.mask)
    np.testing.assert_allclose(from_file.probabilities, _reference_probs(load_module(ckpt), image), atol=1e-5)
    assert from_file.confidence.shape == (64, 80)
    np.testing.assert_allclose(from_file.confidence, from_file.probabilities.max(0), atol=1e-6)
    assert os.fspath(ckpt).endswith(".ckpt") and "Predictor(pytorch" in repr(predictor)


def test_uaps_checkpoint_predicts_with_its_main_decoder(tmp_path):
    uaps = pytest.importorskip("defectseg.models.uaps")
    torch.manual_seed(0)
    module = uaps.UAPSModule(num_classes=3, class_names=CLASSES, encoder_depth=3, decoder_channels=[16, 8, 8],
                             mean=MEAN, std=STD, num_aux_decoders=1).eval()
    hparams = {**dict(module.hparams), "_class_path": "defectseg.models.uaps.UAPSModule"}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, tmp_path / "uaps.ckpt")
    assert type(load_module(tmp_path / "uaps.ckpt")) is uaps.UAPSModule
    image = _rgb(64, 64, 31)
    result = Predictor(tmp_path / "uaps.ckpt", return_probabilities=True).predict(image)
    np.testing.assert_allclose(result.probabilities, _reference_probs(module, image), atol=1e-5)
