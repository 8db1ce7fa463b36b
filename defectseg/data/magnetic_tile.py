"""Magnetic Tile surface defects (Huang, Qiu and Yuan, The Visual Computer 2020), as released."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from defectseg.data.base import Sample
from defectseg.data.files import FileDataModule, list_image_files

#: Defect classes in class-index order (folder ``MT_<name>``); ``MT_Free`` is defect-free.
MT_CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")


class MagneticTileDataModule(FileDataModule):
    """The Magnetic Tile dataset in its official layout.

    Each ``MT_<Class>/Imgs/<stem>.jpg`` has its mask ``<stem>.png`` beside it. The defect class
    comes from the folder (Blowhole=1, Break=2, Crack=3, Fray=4, Uneven=5); masks are
    binarised at >127 because their edges are anti-aliased. ``MT_Free`` images are defect-free
    (their all-zero masks are optional). Images are grayscale and vary in size (width 103-632),
    so the default ``size_policy: pad`` keeps each one's size. There is no official split: the
    default is a seeded split stratified by class.

    A few Uneven masks (4 in the release, 5 after binarising) hold no defect pixel. With
    ``empty_defect_masks: keep`` (default) they stay, labelled by their mask: all background,
    counted as defect-free by the statistics and by ``train_defect_free``. ``drop`` leaves them
    out of every split, so no Uneven-looking tile is trained or scored as defect-free.

    Args:
        root: the folder holding the ``MT_*`` folders; default
            ``$DEFECTSEG_DATA_ROOT/magnetic_tile``.
        include_free: include the 952 ``MT_Free`` images.
        empty_defect_masks: ``keep`` or ``drop`` images of a defect folder whose mask is empty.
        **kwargs: the :class:`~defectseg.data.base.DefectDataModule` arguments.
    """

    CLASS_NAMES = ("background", *MT_CLASSES)
    DEFAULT_SUBDIR = "magnetic_tile"
    SOURCE = "https://github.com/abin24/Magnetic-tile-defect-datasets. (Huang et al., 2020)"
    LAYOUT = (
        "  MT_Blowhole/Imgs/<stem>.jpg and <stem>.png (mask, same size)\n"
        "  MT_Break/Imgs/...  MT_Crack/Imgs/...  MT_Fray/Imgs/...  MT_Uneven/Imgs/...\n"
        "  MT_Free/Imgs/...   (defect-free; masks optional)"
    )

    def __init__(
        self,
        root: str | None = None,
        include_free: bool = True,
        empty_defect_masks: Literal["keep", "drop"] = "keep",
        **kwargs: Any,
    ) -> None:
        if empty_defect_masks not in ("keep", "drop"):
            raise ValueError(f"empty_defect_masks must be 'keep' or 'drop', got {empty_defect_masks!r}")
        super().__init__(root=root, **kwargs)
        self.include_free = include_free
        self.empty_defect_masks = empty_defect_masks

    def scan_params(self) -> dict[str, Any]:
        return {"include_free": self.include_free, "empty_defect_masks": self.empty_defect_masks}

    def scan(self) -> list[Sample]:
        root = self.check_root()
        folders = [(name, k) for k, name in enumerate(MT_CLASSES, start=1)]
        if self.include_free:
            folders.append(("Free", 0))
        present = [(name, k) for name, k in folders if (root / f"MT_{name}" / "Imgs").is_dir()]
        if not present:
            raise self.layout_error(f"no MT_<Class>/Imgs folder under {root}")
        missing = [f"MT_{name}/Imgs" for name, label in folders if (name, label) not in present]
        if missing:
            warnings.warn(f"{type(self).__name__}: {root} has no {', '.join(missing)}", stacklevel=2)
        samples = []
        for name, label in present:
            files = list_image_files(root / f"MT_{name}" / "Imgs", recursive=False)
            images = {p.stem: p for p in files if p.suffix.lower() == ".jpg"}
            masks = {p.stem: p for p in files if p.suffix.lower() == ".png"}
            pairs = self.pair(
                images, masks, lambda stem, image: f"{stem}.png", mask_optional=label == 0
            )
            samples += [
                Sample(image=str(image), mask=str(mask) if mask else None, label=label)
                for _, image, mask in pairs
            ]
        samples = self.measure(samples)
        if self.empty_defect_masks == "drop":
            samples = [s for s in samples if not (s.label and s.defect_free)]
        return samples
