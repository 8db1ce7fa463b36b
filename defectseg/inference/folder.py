"""Predict a folder or glob of raw images: masks, overlays and the defect report on disk.

Used by ``defectseg infer`` (and ``defectseg predict --input``); callable from Python as
:func:`predict_folder`.

Outputs mirror the inputs' sub-folders under the output folder:

* ``<stem>_mask.png``: class indices (``0`` background, ``1..K`` defect classes), original size;
* ``<stem>_overlay.png``: the image with defect pixels coloured and a box around each defect;
* ``report.csv`` and ``report.jsonl``: one row / JSON object per image
  (:mod:`defectseg.inference.report`).

Nothing that exists is overwritten unless ``overwrite`` is set: every target is checked before
the first image is predicted. Nothing a run writes is removed either: an image that cannot be
read becomes a report row with its error (``on_error="skip"``, the default), a stopped run keeps
its outputs and ``resume`` continues it without predicting finished images again.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from defectseg.data.io import IMAGE_EXTENSIONS
from defectseg.inference.predictor import Prediction, Predictor
from defectseg.inference.report import ReportWriter
from defectseg.utils.files import existing_files, write_png
from defectseg.utils.visualize import overlay, palette

_GLOB_CHARS = set("*?[")


def _is_image(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of image files.

    Args:
        inputs: image files (kept whatever their extension), folders (images with one of
            :data:`IMAGE_EXTENSIONS` directly inside, or in sub-folders with ``recursive``) and
            glob patterns (``images/*.png``, ``line1/**/*.bmp``).
        recursive: look into sub-folders of folder inputs.

    Returns:
        The image paths, each once, in the order of ``inputs`` (sorted within a folder or pattern).

    Raises:
        FileNotFoundError: an input does not exist, a pattern matches nothing, a folder holds no
            image, or nothing at all was found.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: dict[str, Path] = {}
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        if any(ch in text for ch in _GLOB_CHARS) and not os.path.exists(text):
            matches = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p) and _is_image(p))
            if not matches:
                raise FileNotFoundError(
                    f"no image matches the pattern {text!r} (looked for {', '.join(IMAGE_EXTENSIONS)})"
                )
            paths = [Path(p) for p in matches]
        elif os.path.isdir(text):
            walker = Path(text).rglob("*") if recursive else Path(text).iterdir()
            paths = sorted(p for p in walker if p.is_file() and _is_image(p))
            if not paths:
                hint = ""
                if not recursive and any(_is_image(p) for p in Path(text).rglob("*") if p.is_file()):
                    hint = "; its sub-folders hold images: pass --recursive"
                raise FileNotFoundError(
                    f"folder {text} holds no image ({', '.join(IMAGE_EXTENSIONS)}){hint}"
                )
        elif os.path.isfile(text):
            paths = [Path(text)]
        else:
            raise FileNotFoundError(f"input {text!r} does not exist (give image files, folders or glob patterns)")
        for path in paths:
            found.setdefault(os.path.abspath(path), path)
    if not found:
        raise FileNotFoundError(f"no images found in {list(map(str, inputs))}")
    return list(found.values())


def output_targets(paths: Sequence[Path], output_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """``(mask, overlay)`` files of each input, mirroring sub-folders below the inputs' common folder.

    Raises:
        ValueError: two inputs would write the same files (e.g. ``a.png`` and ``a.jpg``).
    """
    output_dir = Path(output_dir)
    parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
    root = os.path.commonpath(parents) if parents else ""
    targets, seen = [], {}
    for path, parent in zip(paths, parents):
        relative = os.path.relpath(parent, root)
        folder = output_dir if relative == "." else output_dir / relative
        stem = Path(path).stem
        pair = (folder / f"{stem}_mask.png", folder / f"{stem}_overlay.png")
        if pair[0] in seen:
            raise ValueError(
                f"{seen[pair[0]]} and {path} would both write {pair[0]}; rename one of them or "
                "predict them separately"
            )
        seen[pair[0]] = path
        targets.append(pair)
    return targets


def draw_boxes(image: np.ndarray, prediction: Prediction, num_classes: int) -> np.ndarray:
    """Draw each defect component's bounding box in its class colour on an RGB image."""
    colours = palette(num_classes)
    thickness = max(1, round(min(image.shape[:2]) / 400))
    for entry in prediction.report.classes.values():
        colour = tuple(int(v) for v in colours[entry.index])
        for x, y, w, h in entry.boxes:
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, thickness)
    return image


@dataclass
class FolderSummary:
    """What :func:`predict_folder` did."""

    images: int = 0
    defective: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report_csv: Path | None = None
    report_jsonl: Path | None = None
    skipped_inputs: int = 0
    resumed: int = 0

    @property
    def defect_free(self) -> int:
        return self.images - self.defective - len(self.failed)


def predict_folder(
    predictor: Predictor,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    recursive: bool = False,
    save_masks: bool = True,
    save_overlays: bool = True,
    boxes: bool = True,
    on_error: Literal["raise", "skip"] = "skip",
    progress: bool = True,
    resume: bool = False,
) -> FolderSummary:
    """Predict every image of ``inputs`` and write masks, overlays and the reports.

    Args:
        predictor: the configured :class:`Predictor`.
        inputs: files, folders or glob patterns (see :func:`list_images`).
        output_dir: where outputs go (created if missing).
        overwrite: replace existing outputs; otherwise any existing target stops the run before
            anything is predicted.
        recursive: look into sub-folders of folder inputs.
        save_masks: write ``<stem>_mask.png``.
        save_overlays: write ``<stem>_overlay.png``.
        boxes: draw the defects' bounding boxes on the overlays.
        on_error: ``skip`` records an image that cannot be read or predicted in the report
            (``error`` column, listed in :attr:`FolderSummary.failed`) and goes on; ``raise``
            stops at the first one. Either way the outputs already written are kept.
        progress: show a progress bar (rich).
        resume: continue an interrupted run in the same ``output_dir``: images with a
            successful report row are skipped (counted in :attr:`FolderSummary.resumed`),
            the others (failed before, or not reached) are predicted and their rows appended.

    Raises:
        FileNotFoundError: no inputs found.
        FileExistsError: outputs exist and ``overwrite`` is false.
    """
    output_dir = Path(output_dir)
    paths = list_images(inputs, recursive=recursive)
    out_abs = os.path.abspath(output_dir) + os.sep
    kept = [p for p in paths if not os.path.abspath(p).startswith(out_abs)]
    summary = FolderSummary(skipped_inputs=len(paths) - len(kept))
    if not kept:
        raise FileNotFoundError(f"every input image lies inside the output folder {output_dir}; nothing to predict")
    paths = kept
    targets = output_targets(paths, output_dir)
    writer = ReportWriter(output_dir, predictor.class_names, overwrite=overwrite, resume=resume)
    finished = writer.finished()
    if writer.resuming:
        todo = [i for i, path in enumerate(paths) if str(path) not in finished]
        summary.resumed = len(paths) - len(todo)
        paths, targets = [paths[i] for i in todo], [targets[i] for i in todo]
    elif not overwrite:
        planned = list(writer.paths)
        for mask_file, overlay_file in targets:
            planned += ([mask_file] if save_masks else []) + ([overlay_file] if save_overlays else [])
        existing = existing_files(planned)
        if existing:
            shown = ", ".join(str(p) for p in existing[:3])
            raise FileExistsError(
                f"{len(existing)} output file(s) already exist (e.g. {shown}); choose another "
                "output folder or pass --overwrite to replace them"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    num_classes = predictor.num_classes
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    # a run that stops (on_error="raise", Ctrl-C) keeps what it wrote: the report rows so far
    # are flushed, and `resume` continues from them
    with writer, Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("predict", total=len(paths))
        names = [str(p) for p in paths]
        results = predictor.predict_iter(paths, names=names, on_error=on_error)
        for prediction, (mask_file, overlay_file) in zip(results, targets):
            summary.images += 1
            report = prediction.report
            if prediction.error is not None:
                summary.failed.append(f"{prediction.path}: {prediction.error}")
            else:
                if save_masks:
                    write_png(mask_file, prediction.mask)
                    report.outputs["mask"] = str(mask_file)
                if save_overlays:
                    blended = overlay(prediction.image, prediction.mask, num_classes)
                    if boxes:
                        blended = draw_boxes(blended, prediction, num_classes)
                    write_png(overlay_file, blended, rgb=True)
                    report.outputs["overlay"] = str(overlay_file)
                if not report.defect_free:
                    summary.defective += 1
            writer.write(report)
            bar.advance(task)
    summary.seconds = time.perf_counter() - start
    summary.report_csv, summary.report_jsonl = writer.csv_path, writer.jsonl_path
    if summary.failed:
        print(f"{len(summary.failed)} image(s) could not be read:", file=sys.stderr)
        for line in summary.failed[:10]:
            print(f"  {line}", file=sys.stderr)
    return summary
