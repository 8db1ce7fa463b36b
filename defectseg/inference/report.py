"""Per-image defect reports: areas, connected components, bounding boxes and confidences.

:func:`analyze` turns a predicted class mask and its confidence map into an
:class:`ImageReport`, dropping connected components smaller than a per-class minimum area
(specks) from both the report and the mask. :class:`ReportWriter` streams reports to
``report.csv`` (one row per image) and ``report.jsonl`` (one JSON object per image, with every
component).

Bounding boxes are ``[x, y, width, height]`` in pixels of the original image, ``x``/``y`` being
the top-left corner (column, row).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np


@dataclass
class Component:
    """One connected region of a defect class."""

    area: int
    bbox: tuple[int, int, int, int]
    max_confidence: float
    mean_confidence: float

    def to_json(self) -> dict[str, Any]:
        return {
            "area": self.area,
            "bbox": list(self.bbox),
            "max_confidence": round(self.max_confidence, 6),
            "mean_confidence": round(self.mean_confidence, 6),
        }


@dataclass
class ClassReport:
    """All regions of one defect class in an image (after the minimum-area filter)."""

    index: int
    name: str
    components: list[Component] = field(default_factory=list)
    area: int = 0
    max_confidence: float = 0.0
    mean_confidence: float = 0.0
    dropped: int = 0

    @property
    def count(self) -> int:
        """Number of connected components kept."""
        return len(self.components)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [c.bbox for c in self.components]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "area": self.area,
            "count": self.count,
            "max_confidence": round(self.max_confidence, 6),
            "mean_confidence": round(self.mean_confidence, 6),
            "dropped_components": self.dropped,
            "components": [c.to_json() for c in self.components],
        }


@dataclass
class ImageReport:
    """The defect report of one image.

    Attributes:
        file: the image's path (or a name given by the caller).
        height: image height in pixels.
        width: image width in pixels.
        classes: one :class:`ClassReport` per defect class (background excluded), by name.
        error: why the image could not be processed (then ``classes`` is empty).
        outputs: files written for the image (mask, overlay).
    """

    file: str
    height: int = 0
    width: int = 0
    classes: dict[str, ClassReport] = field(default_factory=dict)
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def defect_free(self) -> bool | None:
        """True when no defect pixel is left after filtering; ``None`` for failed images."""
        if self.error is not None:
            return None
        return all(c.area == 0 for c in self.classes.values())

    @property
    def num_defects(self) -> int:
        """Connected components of all defect classes."""
        return sum(c.count for c in self.classes.values())

    @property
    def max_confidence(self) -> float:
        """Highest confidence of any defect pixel (0 when defect-free)."""
        return max((c.max_confidence for c in self.classes.values()), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "height": self.height,
            "width": self.width,
            "defect_free": self.defect_free,
            "num_defects": self.num_defects,
            "max_confidence": round(self.max_confidence, 6),
            "classes": {name: c.to_json() for name, c in self.classes.items()},
            "outputs": dict(self.outputs),
            "error": self.error,
        }


def resolve_min_area(
    min_area: int | Mapping[str | int, int] | None, class_names: Sequence[str]
) -> dict[int, int]:
    """Minimum component area per defect class index.

    Args:
        min_area: one value for every defect class, or a mapping from class name (or index) to
            value (classes not named keep 0). ``None``: no filtering.
        class_names: class names, background first.

    Raises:
        ValueError: unknown class name/index or negative area.
    """
    indices = range(1, len(class_names))
    if min_area is None:
        return {k: 0 for k in indices}
    if isinstance(min_area, (int, np.integer)):
        if min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {min_area}")
        return {k: int(min_area) for k in indices}
    out = {k: 0 for k in indices}
    by_name = {str(name): k for k, name in enumerate(class_names)}
    for key, value in dict(min_area).items():
        if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit() and key not in by_name):
            index = int(key)
        elif str(key) in by_name:
            index = by_name[str(key)]
        else:
            raise ValueError(
                f"min_area names class {key!r}, which the model does not have; its defect classes "
                f"are {list(class_names[1:])}"
            )
        if not 1 <= index < len(class_names):
            raise ValueError(
                f"min_area class index {index} is not a defect class (1..{len(class_names) - 1}; "
                "0 is the background)"
            )
        if int(value) < 0:
            raise ValueError(f"min_area for {key!r} must be >= 0, got {value}")
        out[index] = int(value)
    return out


def analyze(
    mask: np.ndarray,
    confidence: np.ndarray,
    class_names: Sequence[str],
    min_area: int | Mapping[str | int, int] | None = None,
    connectivity: int = 8,
    file: str = "",
) -> tuple[np.ndarray, ImageReport]:
    """Report the defects of a predicted mask and remove specks below the minimum area.

    Args:
        mask: class indices ``(H, W)`` (``0`` background).
        confidence: probability of the predicted class per pixel ``(H, W)``.
        class_names: class names, background first.
        min_area: minimum component area (pixels) per class; smaller components are set to
            background in the returned mask and left out of the report (counted as ``dropped``).
        connectivity: 8 (diagonal neighbours connect) or 4.
        file: the image's name for the report.

    Returns:
        ``(filtered mask, report)``; the mask is a copy when anything was dropped.
    """
    if mask.shape != confidence.shape:
        raise ValueError(f"mask {mask.shape} and confidence {confidence.shape} must have the same shape")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    thresholds = resolve_min_area(min_area, class_names)
    height, width = mask.shape
    report = ImageReport(file=file, height=int(height), width=int(width))
    out = mask
    for index in range(1, len(class_names)):
        name = str(class_names[index])
        entry = ClassReport(index=index, name=name)
        report.classes[name] = entry
        binary = (mask == index).astype(np.uint8)
        if not binary.any():
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=connectivity)
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = areas >= thresholds.get(index, 0)
        entry.dropped = int((~keep).sum())
        if entry.dropped:
            if out is mask:
                out = mask.copy()
            drop = np.zeros(count, bool)
            drop[1:] = ~keep
            out[drop[labels]] = 0
        rows, cols = np.nonzero(binary)
        ids = labels[rows, cols]
        values = confidence[rows, cols].astype(np.float64)
        sums = np.bincount(ids, weights=values, minlength=count)
        maxima = np.zeros(count, np.float64)
        np.maximum.at(maxima, ids, values)
        kept_area, kept_sum, kept_max = 0, 0.0, 0.0
        for label in range(1, count):
            if not keep[label - 1]:
                continue
            x, y, w, h, area = (int(v) for v in stats[label])
            entry.components.append(
                Component(
                    area=area,
                    bbox=(x, y, w, h),
                    max_confidence=float(maxima[label]),
                    mean_confidence=float(sums[label] / area),
                )
            )
            kept_area += area
            kept_sum += sums[label]
            kept_max = max(kept_max, float(maxima[label]))
        entry.area = kept_area
        entry.max_confidence = kept_max
        entry.mean_confidence = float(kept_sum / kept_area) if kept_area else 0.0
    return out, report


def csv_header(class_names: Sequence[str]) -> list[str]:
    """Columns of ``report.csv``."""
    columns = ["file", "defect_free", "num_defects", "max_confidence", "height", "width"]
    for name in class_names[1:]:
        columns += [f"{name}_area", f"{name}_count", f"{name}_max_conf", f"{name}_mean_conf", f"{name}_boxes"]
    return columns + ["error"]


def csv_row(report: ImageReport, class_names: Sequence[str]) -> list[Any]:
    """One ``report.csv`` row; boxes are ``x y w h`` separated by ``;``."""
    failed = report.error is not None
    row: list[Any] = [
        report.file,
        "" if failed else int(bool(report.defect_free)),
        "" if failed else report.num_defects,
        "" if failed else f"{report.max_confidence:.4f}",
        report.height or "",
        report.width or "",
    ]
    for name in class_names[1:]:
        entry = report.classes.get(str(name))
        if entry is None:
            row += [""] * 5
            continue
        boxes = ";".join(" ".join(str(v) for v in box) for box in entry.boxes)
        row += [entry.area, entry.count, f"{entry.max_confidence:.4f}", f"{entry.mean_confidence:.4f}", boxes]
    return row + [report.error or ""]


class ReportWriter:
    """Stream :class:`ImageReport` objects to ``report.csv`` and ``report.jsonl``.

    Use as a context manager; each report is flushed as it is written, so a long run can be
    followed (``tail -f``) and a crash keeps what was done.

    Args:
        output_dir: folder of the two files.
        class_names: class names, background first (the CSV columns).
        overwrite: replace existing report files; otherwise an existing file raises
            :class:`FileExistsError`.
        name: base name of the files.
        resume: continue the reports of an interrupted run: rows of images that were
            predicted (no error) are kept, failed and half-written rows are dropped (those
            images are predicted again) and new rows are appended. :meth:`finished` names the
            images to skip.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        overwrite: bool = False,
        name: str = "report",
        resume: bool = False,
    ) -> None:
        self.csv_path = Path(output_dir) / f"{name}.csv"
        self.jsonl_path = Path(output_dir) / f"{name}.jsonl"
        self.class_names = [str(n) for n in class_names]
        self.overwrite = overwrite
        self.resume = resume
        self._csv: TextIO | None = None
        self._jsonl: TextIO | None = None
        self._writer: Any = None
        self._kept: tuple[list[list[str]], list[str]] | None = None

    @property
    def paths(self) -> list[Path]:
        return [self.csv_path, self.jsonl_path]

    @property
    def resuming(self) -> bool:
        """Whether :meth:`finished` found reports to continue (then they are appended to)."""
        return self._kept is not None

    def finished(self) -> set[str]:
        """With ``resume``: the ``file`` names of the images the existing reports hold a
        successful row for (empty when there is no report yet).

        Raises:
            ValueError: the existing ``report.csv`` has other columns (another model's classes).
        """
        if not self.resume or not all(path.exists() for path in self.paths):
            return set()
        with open(self.csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        if not rows or rows[0] != csv_header(self.class_names):
            raise ValueError(
                f"cannot resume: {self.csv_path} was written for other classes than the model's "
                f"{self.class_names}; use the model of the interrupted run or another output folder"
            )
        good: dict[str, str] = {}
        with open(self.jsonl_path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the run stopped
                if isinstance(record, dict) and record.get("error") is None and "file" in record:
                    good.setdefault(str(record["file"]), line if line.endswith("\n") else line + "\n")
        error_column = len(rows[0]) - 1
        kept_rows: dict[str, list[str]] = {}
        for row in rows[1:]:
            if len(row) == len(rows[0]) and row[0] in good and not row[error_column]:
                kept_rows.setdefault(row[0], row)
        names = [n for n in good if n in kept_rows]
        self._kept = ([kept_rows[n] for n in names], [good[n] for n in names])
        return set(names)

    def __enter__(self) -> ReportWriter:
        if self.resume and self._kept is None:
            self.finished()
        if not self.overwrite and self._kept is None:
            for path in self.paths:
                if path.exists():
                    raise FileExistsError(
                        f"{path} already exists; choose another output folder, pass --resume to "
                        "continue that run or --overwrite to replace it"
                    )
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        if self._kept is not None:
            # rewrite the kept rows (atomically), then append
            rows, lines = self._kept
            table = io.StringIO()
            csv.writer(table).writerows([csv_header(self.class_names), *rows])
            _replace_text(self.csv_path, table.getvalue())
            _replace_text(self.jsonl_path, "".join(lines))
            self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
            self._writer = csv.writer(self._csv)
            return self
        self._csv = open(self.csv_path, "w", newline="", encoding="utf-8")
        self._jsonl = open(self.jsonl_path, "w", encoding="utf-8")
        self._writer = csv.writer(self._csv)
        self._writer.writerow(csv_header(self.class_names))
        return self

    def write(self, report: ImageReport) -> None:
        """Append one image's report to both files."""
        if self._writer is None or self._jsonl is None or self._csv is None:
            raise RuntimeError("ReportWriter.write called outside its 'with' block")
        self._writer.writerow(csv_row(report, self.class_names))
        self._jsonl.write(json.dumps(report.to_json()) + "\n")
        self._csv.flush()
        self._jsonl.flush()

    def __exit__(self, *exc: Any) -> None:
        for handle in (self._csv, self._jsonl):
            if handle is not None:
                handle.close()
        self._csv = self._jsonl = self._writer = None


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a crash leaves the old or the new."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)
