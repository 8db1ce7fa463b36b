"""KolektorSDD2 (Bozic, Tabernik and Skocaj, Computers in Industry 2021), as released."""

from __future__ import annotations

from defectseg.data.base import Sample
from defectseg.data.files import FileDataModule, list_image_files

#: Official parts: folder name -> split name.
KSDD2_PARTS = {"train": "train", "test": "test"}
GT_SUFFIX = "_GT"


class KolektorSDD2DataModule(FileDataModule):
    """KolektorSDD2 in its release layout.

    ``train/`` and ``test/`` hold ``<id>.png`` images and their ``<id>_GT.png`` masks. One
    defect class; masks are binarised (>127, or any non-zero pixel of a 0/1 mask); an empty
    mask means a defect-free image. The official train/test split is used by default
    (validation carved out of training, stratified), ``split: stratified`` re-splits all.

    Args:
        root: the folder holding ``train/`` and ``test/``; default
            ``$DEFECTSEG_DATA_ROOT/kolektorsdd2``.
        **kwargs: the :class:`~defectseg.data.base.DefectDataModule` arguments.
    """

    CLASS_NAMES = ("background", "defect")
    DEFAULT_SUBDIR = "kolektorsdd2"
    SOURCE = "https://www.vicos.si/resources/kolektorsdd2/"
    LAYOUT = (
        "  train/<id>.png and train/<id>_GT.png (mask, same size; empty = defect-free)\n"
        "  test/<id>.png  and test/<id>_GT.png"
    )

    def scan(self) -> list[Sample]:
        root = self.check_root()
        samples = []
        for folder, split in KSDD2_PARTS.items():
            files = list_image_files(self.require(root / folder), recursive=False)
            masks = {p.stem[: -len(GT_SUFFIX)]: p for p in files if p.stem.endswith(GT_SUFFIX)}
            images = {p.stem: p for p in files if not p.stem.endswith(GT_SUFFIX)}
            pairs = self.pair(images, masks, lambda stem, image: f"{stem}{GT_SUFFIX}.png")
            samples += [Sample(image=str(i), mask=str(m), split=split) for _, i, m in pairs]
        return self.measure(samples)
