"""Inference on a production folder: bit depths above 8, failures that keep outputs, resume."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch

from defectseg.cli import main
from defectseg.commands.infer import build_parser
from defectseg.data.bit_depth import BitDepthWarning, infer_bit_depth, resolve_bit_depth, to_uint8
from defectseg.data.synthetic import SyntheticDefectsDataModule
from defectseg.inference import Predictor
from defectseg.data.io import read_image
from defectseg.inference.runtime import resolve_device
from defectseg.models import SegmentationModule

CLASSES = ["background", "scratch", "pit"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_module(**normalization) -> SegmentationModule:
    torch.manual_seed(0)
    normalization = normalization or {"mean": [0.5], "std": [0.25]}
    return SegmentationModule(num_classes=3, class_names=CLASSES, encoder_depth=3, decoder_channels=[16, 8, 8],
                              in_channels=1, **normalization)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A gray-image checkpoint after one training step on synthetic data."""
    folder = tmp_path_factory.mktemp("ckpt")
    data = SyntheticDefectsDataModule(num_images=8, image_size=64, num_defect_classes=2, batch_size=4,
                                      channels=1, cache_dir=str(folder / "cache"))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(folder))
    trainer.fit(tiny_module(mean=None, std=None), datamodule=data)  # mean/std from the data
    path = folder / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def _twelve_bit(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth 12-bit camera data in uint16, reaching the 12-bit maximum 4095."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 4096, (6, 8)).astype(np.float32)
    image = np.rint(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)).astype(np.uint16)
    image[0, 0] = 4095
    return np.clip(image, 0, 4095)


# ---------------------------------------------------------------------------------- bit depth
def test_to_uint8_scales_by_the_stated_depth():
    values = np.array([0, 1, 8, 2048, 4094, 4095], np.uint16)
    # value * 255 / 4095 rounded, by hand: 0, 0.06, 0.50 (8*255/4095 = 0.498), 127.53, 254.94, 255
    assert to_uint8(values, 12).tolist() == [0, 0, 0, 128, 255, 255]
    assert to_uint8(np.array([0, 257, 32768, 65535], np.uint16), 16).tolist() == [0, 1, 128, 255]
    assert to_uint8(np.array([0, 512, 1023], np.uint16), 10).tolist() == [0, 128, 255]  # 127.62
    assert to_uint8(np.array([0, 200, 255], np.uint16), 8).tolist() == [0, 200, 255]
    # the old division by 257 would leave 12-bit data at 0..16
    assert to_uint8(values, 16).max() == 16
    eight = np.array([[3, 250]], np.uint8)
    assert to_uint8(eight, 12) is eight  # an 8-bit file is 8-bit data whatever the setting
    assert to_uint8(values, "12").dtype == np.uint8


def test_bit_depth_auto_and_errors():
    assert [infer_bit_depth(v) for v in (0, 255, 256, 1023, 1024, 4095, 4096, 65535)] == [8, 8, 10, 10, 12, 12, 16, 16]
    data = np.array([[0, 4095]], np.uint16)
    with pytest.warns(BitDepthWarning, match=r"cam_01\.png.*4095.*12-bit.*bit_depth: 12"):
        out = to_uint8(data, "auto", source="cam_01.png")
    assert out.tolist() == [[0, 255]]
    warned: set[int] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_uint8(data, "auto", "a.png", warned=warned)
        to_uint8(data, "auto", "b.png", warned=warned)
        to_uint8(np.array([1000], np.uint16), "auto", "c.png", warned=warned)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and messages[0].startswith("a.png") and messages[1].startswith("c.png")
    assert warned == {10, 12}
    with pytest.raises(ValueError, match=r"cam_02\.png: pixel value 4095 is above the largest 10-bit value 1023"):
        to_uint8(data, 10, source="cam_02.png")
    with pytest.raises(ValueError, match=r"bit_depth must be 'auto' or one of \[8, 10, 12, 16\], got 14"):
        resolve_bit_depth(data, 14)
    with pytest.raises(ValueError, match=r"f\.tif: unsupported pixel type float32"):
        to_uint8(np.zeros(3, np.float32), 12, "f.tif")


def test_twelve_bit_png_is_read_and_predicted_at_full_range(tmp_path):
    raw = _twelve_bit()
    path = tmp_path / "cam.png"
    assert cv2.imwrite(str(path), raw)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    expected = np.rint(raw.astype(np.float64) * 255 / 4095).astype(np.uint8)
    assert np.array_equal(read_image(path, bit_depth=12), expected)
    with pytest.warns(BitDepthWarning, match="cam.png"):
        assert np.array_equal(read_image(path, bit_depth="auto"), expected)

    module = tiny_module()
    predictor = Predictor(module, tile_size=None, bit_depth=12)
    from_file = predictor.predict(path)
    assert np.array_equal(from_file.image, expected) and from_file.image.max() == 255
    reference = predictor.predict(expected, name="reference")
    assert np.array_equal(from_file.mask, reference.mask)
    np.testing.assert_allclose(from_file.confidence, reference.confidence, atol=1e-6)
    # uint16 arrays are scaled the same way
    assert np.array_equal(predictor.predict(raw, name="array").image, expected)
    with pytest.raises(ValueError, match="bit_depth must be"):
        Predictor(module, bit_depth=11)


# ---------------------------------------------------------------------------------- the infer command
def _folder(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i}.png"
        cv2.imwrite(str(path), _twelve_bit(seed=i))
        paths.append(path)
    return paths


def _rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(out / "report.csv", newline="")))


def test_infer_bit_depth_flag_and_device_default(tmp_path, ckpt):
    assert build_parser().parse_args(["--ckpt", "m", "--input", "x", "--output", "o"]).device == "auto"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    paths = _folder(tmp_path / "in", 2)
    base = ["infer", "--ckpt", str(ckpt), "--input", str(tmp_path / "in"), "-q", "--no-overlays"]
    assert main([*base, "--output", str(tmp_path / "o12"), "--bit-depth", "12"]) == 0
    # a 10-bit setting on 12-bit data: each file is a failure row naming its value, exit status 1
    assert main([*base, "--output", str(tmp_path / "o10"), "--bit-depth", "10"]) == 1
    rows = _rows(tmp_path / "o10")
    assert [r["file"] for r in rows] == [str(p) for p in paths]
    assert all("pixel value 4095 is above the largest 10-bit value" in r["error"] for r in rows)
    assert not list((tmp_path / "o10").glob("*_mask.png"))


def test_resume_skips_finished_images_and_redoes_failed_ones(tmp_path, ckpt):
    paths = _folder(tmp_path / "in", 3)
    broken = tmp_path / "in" / "img_1.png"
    broken.write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    args = ["infer", "--ckpt", str(ckpt), "--input", str(tmp_path / "in"), "--output", str(out), "-q",
            "--bit-depth", "12"]
    assert main(args) == 1
    assert [bool(r["error"]) for r in _rows(out)] == [False, True, False]
    # without --resume nothing is overwritten
    with pytest.raises(SystemExit, match="already exist"):
        main(args)
    # a stop while the last image's rows were written: its CSV row lost, half its JSON line
    last = str(paths[2])
    lines = (out / "report.csv").read_text().splitlines(keepends=True)
    (out / "report.csv").write_text("".join(line for line in lines if not line.startswith(last)))
    lines = (out / "report.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["file"] != last]
    (out / "report.jsonl").write_text("".join(kept) + '{"file": "' + last[:10])
    (out / "img_2_mask.png").unlink()
    finished_mask = out / "img_0_mask.png"
    finished_mask.write_bytes(b"not redone")  # marks the finished image: --resume must leave it
    cv2.imwrite(str(broken), _twelve_bit(seed=1))  # the camera file is fixed
    assert main([*args, "--resume"]) == 0
    assert finished_mask.read_bytes() == b"not redone"
    rows = _rows(out)
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in paths)  # each image once
    assert not any(r["error"] for r in rows)
    records = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in records) == sorted(str(p) for p in paths)
    assert (out / "img_1_mask.png").exists() and (out / "img_2_mask.png").exists()
    # nothing left to do: a second resume predicts nothing and keeps the report
    before = (out / "report.csv").read_bytes()
    assert main([*args, "--resume"]) == 0
    assert (out / "report.csv").read_bytes() == before


def test_resume_refuses_a_report_of_other_classes(tmp_path, ckpt):
    _folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.csv").write_text("file,defect_free,error\n")
    (out / "report.jsonl").write_text("")
    with pytest.raises(SystemExit, match="cannot resume.*other classes"):
        main(["infer", "--ckpt", str(ckpt), "--input", str(tmp_path / "in"), "--output", str(out), "-q", "--resume"])
    assert (out / "report.csv").read_text() == "file,defect_free,error\n"
