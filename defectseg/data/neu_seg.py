"""NEU-Seg hot-rolled steel strip defects (Song and Yan, NEU surface defect database)."""

from __future__ import annotations

from typing import Any, Literal

from defectseg.data.base import Sample
from defectseg.data.duplicates import near_duplicate_groups
from defectseg.data.files import FileDataModule, MaskDecoder, list_image_files

#: Official parts: folder name -> split name.
NEU_PARTS = {"training": "train", "test": "test"}


class NEUSegDataModule(FileDataModule):
    """NEU-Seg in its release layout, with a leak-free ``grouped`` split (the default).

    ``images/{training,test}/<id>.jpg`` pair with ``annotations/{training,test}/<id>.png``
    whose values are the classes: 0 background, 1 inclusion, 2 patches, 3 scratches (any other
    value is an error). All images are 200x200.

    The official split leaks: the training set holds 90/180/270-degree rotated copies of its
    own images, and 810 of the 840 test images have an identical or rotated near-copy in
    training, so official test scores measure memorisation. The scan finds these
    near-duplicates (mean absolute difference below ``duplicate_threshold`` grey levels on
    64x64 grayscale thumbnails, for some rotation; see :mod:`defectseg.data.duplicates`) and
    stores each image's group in the metadata (cached). ``split: grouped`` pools both official
    parts and makes a seeded split stratified by class that keeps every group on one side
    (``val_fraction`` and ``test_fraction`` set the sizes). ``split: stratified`` is the same.
    ``split: official`` uses the release's parts (validation carved, grouped, out of training)
    for comparison with published numbers.

    Args:
        root: the folder holding ``images/`` and ``annotations/``; default
            ``$DEFECTSEG_DATA_ROOT/neu_seg``.
        split: ``grouped`` (default), ``stratified`` (same as grouped) or ``official``.
        duplicate_threshold: largest mean absolute difference (grey levels, 64x64 thumbnails)
            between two images of one group. Duplicates in the release differ by under 0.8,
            distinct images by over 1.2.
        **kwargs: the :class:`~defectseg.data.base.DefectDataModule` arguments.
    """

    CLASS_NAMES = ("background", "inclusion", "patches", "scratches")
    DEFAULT_SUBDIR = "neu_seg"
    SOURCE = (
        "the NEU surface defect database, segmentation release (NEU-Seg; Song and Yan, Applied "
        "Surface Science 2013), distributed through public GitHub copies"
    )
    LAYOUT = (
        "  images/training/<id>.jpg   annotations/training/<id>.png (values 0..3)\n"
        "  images/test/<id>.jpg       annotations/test/<id>.png"
    )

    def __init__(
        self,
        root: str | None = None,
        split: Literal["grouped", "official", "stratified"] = "grouped",
        duplicate_threshold: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if duplicate_threshold < 0:
            raise ValueError(f"duplicate_threshold must be >= 0, got {duplicate_threshold}")
        super().__init__(root=root, split=split, **kwargs)
        self.duplicate_threshold = duplicate_threshold

    def _accepts_split(self, split: str) -> bool:
        return split == "grouped"

    def scan_params(self) -> dict[str, Any]:
        return {"duplicate_threshold": self.duplicate_threshold}

    def mask_decoder(self) -> MaskDecoder:
        return MaskDecoder({k: k for k in range(len(self.CLASS_NAMES))})

    def scan(self) -> list[Sample]:
        root = self.check_root()
        samples = []
        for folder, split in NEU_PARTS.items():
            image_dir = self.require(root / "images" / folder, "image folder")
            mask_dir = self.require(root / "annotations" / folder, "annotation folder")
            images = {p.stem: p for p in list_image_files(image_dir, recursive=False)}
            masks = {p.stem: p for p in list_image_files(mask_dir, recursive=False)}
            pairs = self.pair(images, masks, lambda stem, _, d=mask_dir: str(d / f"{stem}.png"))
            samples += [Sample(image=str(i), mask=str(m), split=split) for _, i, m in pairs]
        samples = self.measure(samples)
        groups = near_duplicate_groups([s.image for s in samples], self.duplicate_threshold)
        for sample, first in zip(samples, groups):
            sample.group = samples[first].image
        return samples
