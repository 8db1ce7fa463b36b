"""ONNX and TorchScript export: raw uint8 in, parity with PyTorch, metadata, no overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from defectseg.cli import main
from defectseg.inference import Predictor, export_onnx, export_torchscript, load_module
from defectseg.models import SegmentationModule

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

CLASSES = ["background", "scratch", "pit"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint in Lightning's layout with random batch-norm statistics (no training needed:
    tests/test_inference.py covers checkpoints written by a real Trainer)."""
    folder = tmp_path_factory.mktemp("export_ckpt")
    torch.manual_seed(0)
    module = SegmentationModule(num_classes=3, class_names=CLASSES, encoder_depth=3,
                                decoder_channels=[16, 8, 8], mean=MEAN, std=STD)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    path = folder / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def _images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _torch_probs(ckpt: Path, images: np.ndarray) -> np.ndarray:
    """PyTorch reference, normalised by hand (independent of the export wrapper)."""
    module = load_module(ckpt)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return module(x).softmax(1).numpy()


def test_onnx_dynamic_export_matches_pytorch(ckpt, tmp_path):
    path = tmp_path / "model.onnx"
    result = export_onnx(ckpt, path, size=64)
    assert path.is_file() and result.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "image" and image_input.type == "tensor(uint8)"
    assert [o.name for o in session.get_outputs()] == ["probabilities", "mask"]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["defectseg"])
    assert meta["class_names"] == CLASSES and meta["static_size"] is None
    for shape in [(1, 64, 64, 3), (3, 70, 131, 3)]:  # other batch and sizes, not multiples of 32
        images = _images(shape, seed=shape[1])
        probabilities, mask = session.run(None, {"image": images})
        expected = _torch_probs(ckpt, images)
        assert probabilities.shape == expected.shape
        assert np.abs(probabilities - expected).max() < 1e-4
        np.testing.assert_array_equal(mask, probabilities.argmax(1))
        assert mask.dtype == np.uint8


def test_onnx_static_export_command(ckpt, tmp_path, capsys):
    path = tmp_path / "static.onnx"
    code = main(["export", "--ckpt", str(ckpt), "--format", "onnx", "--out", str(path), "--size", "64x96",
                 "--batch-size", "2", "--static", "--exporter", "legacy"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "uint8 (2, 64, 96, 3)" in printed and "max |probability difference|" in printed
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 64, 96, 3]
    images = _images((2, 64, 96, 3), seed=4)
    probabilities = session.run(["probabilities"], {"image": images})[0]
    assert np.abs(probabilities - _torch_probs(ckpt, images)).max() < 1e-4
    # Predictor runs the fixed-size model on larger and smaller images (tiles, padding)
    strip = _images((48, 200, 3), seed=5)
    static = Predictor(path, tile_size=None, overlap=16, return_probabilities=True).predict(strip)
    eager = Predictor(ckpt, tile_size=(64, 96), overlap=16, return_probabilities=True).predict(strip)
    assert static.mask.shape == (48, 200)
    assert np.abs(static.probabilities - eager.probabilities).max() < 1e-4

    before = path.read_bytes()
    with pytest.raises(SystemExit, match="already exists.*--overwrite"):
        main(["export", "--ckpt", str(ckpt), "--format", "onnx", "--out", str(path), "--exporter", "legacy"])
    assert path.read_bytes() == before


def test_torchscript_export_matches_pytorch(ckpt, tmp_path):
    path = tmp_path / "model.pt"
    result = export_torchscript(ckpt, path, size=64)
    assert result.max_abs_diff < 1e-4 and len(result.checked_sizes) == 2
    extra = {"defectseg.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["defectseg.json"])["class_names"] == CLASSES
    images = _images((2, 90, 70, 3), seed=7)
    with torch.no_grad():
        probabilities, mask = loaded(torch.from_numpy(images))
    assert np.abs(probabilities.numpy() - _torch_probs(ckpt, images)).max() < 1e-4
    np.testing.assert_array_equal(mask.numpy(), probabilities.argmax(1).numpy())
    # the Predictor runs it like the checkpoint
    image = _images((64, 150, 3), seed=8)
    scripted = Predictor(path, tile_size=64, overlap=16, return_probabilities=True).predict(image)
    eager = Predictor(ckpt, tile_size=64, overlap=16, return_probabilities=True).predict(image)
    assert np.abs(scripted.probabilities - eager.probabilities).max() < 1e-4


def test_export_command_errors(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "m.onnx")])
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read .*bad.ckpt"):
        main(["export", "--ckpt", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "m.onnx")])
    with pytest.raises(SystemExit, match="below the model's minimum"):
        main(["export", "--ckpt", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--size", "16"])
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.pt").exists()


def test_one_verification_rejects_drifting_or_reshaped_outputs(ckpt, tmp_path):
    from defectseg.inference.export import ExportResult, verify_export
    from defectseg.inference.runtime import InferenceModel, module_info

    module = load_module(ckpt)
    wrapper = InferenceModel.from_module(module, with_mask=True).eval()

    def reference(image: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return wrapper(torch.from_numpy(image))[0].numpy()

    def result() -> ExportResult:
        return ExportResult(tmp_path / "m.onnx", "onnx", module_info(module, None), 0.0, [], None)

    same = result()
    verify_export(same, reference, wrapper, (64, 64), 1, True, 1e-6, "hint")
    assert same.max_abs_diff == 0.0 and same.checked_sizes == [(1, 64, 64), (2, 101, 85)]
    with pytest.raises(RuntimeError, match=r"ONNX Runtime and PyTorch probabilities differ by 1\.00e-02.*try this"):
        verify_export(result(), lambda image: reference(image) + 0.01, wrapper, (64, 64), 1, False, 1e-4, "try this")
    with pytest.raises(RuntimeError, match=r"gives \(1, 3, 64, 32\) for input \(1, 64, 64, 3\)"):
        verify_export(result(), lambda image: reference(image)[..., :32], wrapper, (64, 64), 1, False, 1e-4, "hint")
