"""Class statistics of a datamodule as text (``defectseg stats`` and the notebooks)."""

from __future__ import annotations

from typing import Any


def format_statistics(datamodule: Any, split: str | None = None) -> str:
    """A markdown table of :meth:`~defectseg.data.DefectDataModule.statistics`.

    Args:
        datamodule: a :class:`~defectseg.data.DefectDataModule` (its ``statistics(split)``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` for the whole dataset.

    Returns:
        One row per class: images holding it, image ratio and pixel ratio (4 decimals).
    """
    stats = datamodule.statistics(split)
    lines = ["| class | images | image ratio | pixel ratio |", "|---|---:|---:|---:|"]
    for name, row in stats.items():
        lines.append(
            f"| {name} | {int(row['images'])} | {row['image_ratio']:.4f} | {row['pixel_ratio']:.4f} |"
        )
    return "\n".join(lines)
