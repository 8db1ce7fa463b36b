"""The PNG writers shared by the prediction callback and defectseg infer (defectseg.utils.files)."""

from __future__ import annotations

import cv2
import numpy as np

from defectseg.utils.files import existing_files, write_png


def test_write_png_keeps_class_indices_and_rgb_order(tmp_path):
    mask = np.array([[0, 1, 2], [3, 0, 255]], np.uint8)
    write_png(tmp_path / "new" / "folder" / "mask.png", mask)  # folders are created
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "new/folder/mask.png"), cv2.IMREAD_UNCHANGED), mask)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 200  # red
    write_png(tmp_path / "overlay.png", rgb, rgb=True)
    bgr = cv2.imread(str(tmp_path / "overlay.png"))
    assert bgr[0, 0].tolist() == [0, 0, 200]  # OpenCV reads BGR: red is last


def test_existing_files_lists_only_files_that_exist(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    assert existing_files([tmp_path / "a.png", tmp_path / "b.png", str(tmp_path / "a.png")]) == [
        tmp_path / "a.png", tmp_path / "a.png"
    ]
