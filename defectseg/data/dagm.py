"""DAGM 2007 (Weakly Supervised Learning for Industrial Optical Inspection), as released."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectseg.data.base import Sample
from defectseg.data.files import FileDataModule, list_image_files

#: Official parts: folder name -> split name.
DAGM_PARTS = {"Train": "train", "Test": "test"}
DAGM_NUM_CLASSES = 10


@dataclass(frozen=True)
class DagmLabel:
    """One row of a DAGM ``Labels.txt``: the image file and its label file (``None``: no defect)."""

    image: str
    label: str | None

    @property
    def defective(self) -> bool:
        return self.label is not None


def read_dagm_labels(path: str | Path) -> list[DagmLabel]:
    """Parse a DAGM ``Labels.txt``.

    The first line is a header. Each further line holds tab-separated fields: a running id,
    ``1`` for a defective image or ``0``, the image file, ``0``, and the label file or ``0``.
    Windows (CRLF) and Unix line endings are accepted; blank lines are skipped.

    Raises:
        ValueError: naming the file and line for a malformed or inconsistent row.
    """
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines()[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 5 or fields[1] not in ("0", "1"):
            raise ValueError(
                f"{path}, line {number}: expected tab-separated 'id, 0/1, image file, 0, label "
                f"file or 0'; got {line!r}"
            )
        label = None if fields[4] == "0" else fields[4]
        if (fields[1] == "1") != (label is not None):
            raise ValueError(
                f"{path}, line {number}: the defect flag is {fields[1]} but the label file is "
                f"{fields[4]!r}; a defective image (1) needs a label file, a good one (0) has '0'"
            )
        rows.append(DagmLabel(image=fields[2], label=label))
    return rows


class DAGMDataModule(FileDataModule):
    """DAGM 2007 in its release layout; each selected texture class is one defect class.

    ``Class<n>/{Train,Test}/<id>.PNG`` images; ``Class<n>/{Train,Test}/Label/Labels.txt`` lists
    every image with its defect flag and label file ``Label/<id>_label.PNG`` (an ellipse, 0/255,
    binarised). Images flagged 0 are defect-free. Selecting classes ``[c1, c2, ...]`` makes
    ``Class<c1>`` defect class 1, ``Class<c2>`` class 2... (a multi-class setting where the
    class is the texture). The official Train/Test split is used by default (validation carved
    out of Train, stratified).

    Args:
        root: the folder holding the ``Class<n>`` folders; default ``$DEFECTSEG_DATA_ROOT/dagm``.
        classes: texture classes to use (1..10); default all ten.
        **kwargs: the :class:`~defectseg.data.base.DefectDataModule` arguments.
    """

    DEFAULT_SUBDIR = "dagm"
    SOURCE = "https://hci.iwr.uni-heidelberg.de/content/weakly-supervised-learning-industrial-optical-inspection"
    LAYOUT = (
        "  Class1/Train/<id>.PNG   Class1/Train/Label/Labels.txt   Class1/Train/Label/<id>_label.PNG\n"
        "  Class1/Test/...         ...   Class10/Test/..."
    )

    def __init__(self, root: str | None = None, classes: Sequence[int] | None = None, **kwargs: Any) -> None:
        classes = list(range(1, DAGM_NUM_CLASSES + 1)) if classes is None else [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or not all(1 <= c <= DAGM_NUM_CLASSES for c in classes):
            raise ValueError(f"classes must be distinct texture classes in 1..{DAGM_NUM_CLASSES}, got {classes}")
        super().__init__(root=root, **kwargs)
        self.classes = classes

    @property
    def class_names(self) -> list[str]:
        return ["background", *(f"Class{c}" for c in self.classes)]

    def scan_params(self) -> dict[str, Any]:
        return {"classes": self.classes}

    def scan(self) -> list[Sample]:
        root = self.check_root()
        samples = []
        for label, number in enumerate(self.classes, start=1):
            for part, split in DAGM_PARTS.items():
                folder = self.require(root / f"Class{number}" / part, f"folder of class {number}")
                labels_txt = self.require(folder / "Label" / "Labels.txt", "image list", is_file=True)
                samples += self._part_samples(folder, read_dagm_labels(labels_txt), label, split)
        return self.measure(samples)

    def _part_samples(self, folder: Path, rows: list[DagmLabel], label: int, split: str) -> list[Sample]:
        """Samples of one ``Class<n>/<part>`` folder, reporting files that do not match its list."""
        on_disk = {p.name for p in list_image_files(folder, recursive=False)}
        listed = {row.image for row in rows}
        self.report_unpaired(
            f"images listed in {folder / 'Label' / 'Labels.txt'} but missing",
            [str(folder / row.image) for row in rows if row.image not in on_disk],
        )
        self.report_unpaired(
            f"images in {folder} not listed in Label/Labels.txt", sorted(on_disk - listed)
        )
        missing_labels = [
            row for row in rows if row.defective and not (folder / "Label" / row.label).is_file()
        ]
        self.report_unpaired(
            "label files listed in Labels.txt but missing",
            [f"{folder / 'Label' / row.label} (for {row.image})" for row in missing_labels],
        )
        return [
            Sample(
                image=str(folder / row.image),
                mask=str(folder / "Label" / row.label) if row.label else None,
                label=label,
                split=split,
            )
            for row in rows
            if row.image in on_disk and row not in missing_labels
        ]
