"""A user's own data: an image folder and masks found by a file-name pattern."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from defectseg.data.base import Sample
from defectseg.data.contract import IGNORE_INDEX
from defectseg.data.files import FileDataModule, MaskDecoder, list_image_files

Key = tuple[str, str]  # (folder relative to the image or mask base, stem)


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Regular expression matching the file names of ``pattern`` (``{stem}`` captured).

    Raises:
        ValueError: unless ``pattern`` is a file name holding ``{stem}`` once.
    """
    if pattern.count("{stem}") != 1 or "/" in pattern or "\\" in pattern:
        raise ValueError(
            f"mask_pattern must be a file name holding {{stem}} once, such as '{{stem}}.png', "
            f"'{{stem}}_GT.png' or '{{stem}}_label.bmp'; got {pattern!r}"
        )
    before, after = pattern.split("{stem}")
    return re.compile(re.escape(before) + "(?P<stem>.+)" + re.escape(after), re.IGNORECASE)


class FolderDataModule(FileDataModule):
    """Images and masks from a user's folders, in any layout a pattern can describe.

    Images are read from ``image_dir`` (recursively by default); the mask of
    ``<image_dir>/<sub>/<stem>.<ext>`` is ``mask_pattern`` with ``{stem}`` filled in, looked up
    in ``<mask_dir>/<sub>/`` and, when it is not there, anywhere under ``mask_dir`` if only one
    file has that name. With ``mask_dir: null`` masks sit beside their images. Dotfiles and
    files that are not images are ignored. Examples::

        # images/a.jpg + masks/a.png
        image_dir: images
        mask_dir: masks
        mask_pattern: "{stem}.png"
        # KolektorSDD-like: x.png with x_GT.png beside it
        image_dir: .
        mask_dir: null
        mask_pattern: "{stem}_GT.png"

    Classes come from mask values (``class_source: values``) or from the first subfolder under
    ``image_dir`` (``class_source: subfolder``, masks binarised). With values, ``value_map``
    maps stored values to classes (``{255: 1}``, ``{1: 1, 2: 2}``; map to 255 to ignore a value);
    without it masks must be binary (0/1 or 0/255, edges above 127 count) and there is one class.

    Args:
        root: the dataset folder (``image_dir`` and ``mask_dir`` are relative to it).
        image_dir: folder of the images, relative to ``root`` (or absolute); ``.`` for root.
        mask_dir: folder of the masks; ``null`` for masks beside their images. Files inside
            ``mask_dir`` are never taken as images, even when it lies inside ``image_dir``.
        mask_pattern: the mask's file name, with ``{stem}`` standing for the image's name
            without extension.
        recursive: search subfolders of ``image_dir`` and ``mask_dir``.
        class_source: ``values`` (mask values are classes) or ``subfolder``.
        value_map: stored mask value -> class index (or 255 to ignore), for ``values``.
        class_names: names, background first. Default: ``defect`` for one class,
            ``class_<k>`` otherwise; with ``subfolder``, the subfolders in sorted order
            (given names must be subfolder names).
        defect_free_folders: subfolders (first level under ``image_dir``) of defect-free
            images, which need no mask.
        missing_mask_defect_free: take every image without a mask as defect-free, instead of
            reporting it (see ``on_missing``).
        **kwargs: the :class:`~defectseg.data.base.DefectDataModule` arguments.
    """

    LAYOUT = (
        "  <image_dir>/**/<stem>.<png|jpg|jpeg|bmp|tif|tiff>\n"
        "  <mask_dir>/**/<mask_pattern with {stem}>   (or beside the images with mask_dir: null)"
    )

    def __init__(
        self,
        root: str | None = None,
        image_dir: str = "images",
        mask_dir: str | None = "masks",
        mask_pattern: str = "{stem}.png",
        recursive: bool = True,
        class_source: Literal["values", "subfolder"] = "values",
        value_map: dict[int, int] | None = None,
        class_names: list[str] | None = None,
        defect_free_folders: Sequence[str] | None = None,
        missing_mask_defect_free: bool = False,
        **kwargs: Any,
    ) -> None:
        self.regex = pattern_regex(mask_pattern)
        if class_source not in ("values", "subfolder"):
            raise ValueError(f"class_source must be 'values' or 'subfolder', got {class_source!r}")
        if class_source == "subfolder" and value_map is not None:
            raise ValueError("value_map applies to class_source: values; subfolder masks are binarised")
        if value_map is not None:
            classes = [v for v in value_map.values() if v != IGNORE_INDEX]
            bad = [k for k in value_map if not 0 <= int(k) <= 255] + [v for v in classes if v < 0]
            if bad or not classes:
                raise ValueError(
                    f"value_map must map mask values 0..255 to classes 0..K or {IGNORE_INDEX}; got {value_map}"
                )
            needed = max(classes) + 1
            if class_names is not None and len(class_names) != needed:
                raise ValueError(
                    f"class_names {class_names} must name {needed} classes (background and the "
                    f"classes 1..{needed - 1} of value_map {value_map})"
                )
        super().__init__(root=root, **kwargs)
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.mask_pattern = mask_pattern
        self.recursive = recursive
        self.class_source = class_source
        self.value_map = {int(k): int(v) for k, v in value_map.items()} if value_map else None
        self._class_names = list(class_names) if class_names is not None else None
        self.defect_free_folders = list(defect_free_folders or [])
        self.missing_mask_defect_free = missing_mask_defect_free

    # ------------------------------------------------------------------ classes
    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            if self.class_source == "subfolder":
                self._class_names = ["background", *self._subfolders()]
            else:
                top = max(v for v in (self.value_map or {1: 1}).values() if v != IGNORE_INDEX)
                names = ["defect"] if top == 1 else [f"class_{k}" for k in range(1, top + 1)]
                self._class_names = ["background", *names]
        return list(self._class_names)

    def _subfolders(self) -> list[str]:
        """First-level subfolders of ``image_dir`` that hold images (defect-free ones excluded)."""
        self.check_root()
        base = self.require(self._folder(self.image_dir), "image_dir")
        return sorted(
            entry.name
            for entry in base.iterdir()
            if entry.is_dir()
            and not entry.name.startswith(".")
            and entry.name not in self.defect_free_folders
            and list_image_files(entry, self.recursive)
        )

    def mask_decoder(self) -> MaskDecoder:
        return MaskDecoder(self.value_map, strict_binary=True)

    def scan_params(self) -> dict[str, Any]:
        return {
            "image_dir": self.image_dir,
            "mask_dir": self.mask_dir,
            "mask_pattern": self.mask_pattern,
            "recursive": self.recursive,
            "class_source": self.class_source,
            "value_map": self.value_map,
            "class_names": self.class_names,
            "defect_free_folders": self.defect_free_folders,
            "missing_mask_defect_free": self.missing_mask_defect_free,
        }

    # ------------------------------------------------------------------ scan
    def _folder(self, path: str) -> Path:
        return Path(path) if os.path.isabs(path) else Path(self.root or ".") / path

    def _key(self, path: Path, base: Path, stem: str) -> Key:
        return (path.parent.relative_to(base).as_posix(), stem)

    def _find_files(self) -> tuple[Path, dict[Key, Path], dict[Key, Path]]:
        """The image base folder, images and masks found, both keyed by (subfolder, stem)."""
        self.check_root()
        image_base = self.require(self._folder(self.image_dir), "image_dir")
        files = list_image_files(image_base, self.recursive)
        masks: dict[Key, Path] = {}
        if self.mask_dir is not None:
            mask_base = self.require(self._folder(self.mask_dir), "mask_dir")
            inside = mask_base.resolve()
            files = [f for f in files if inside not in f.resolve().parents]
            for path in list_image_files(mask_base, self.recursive):
                match = self.regex.fullmatch(path.name)
                if match:
                    masks[self._key(path, mask_base, match["stem"])] = path
            candidates = files
        else:  # beside the images: a file matching the pattern is a mask when its image exists
            by_stem: dict[Key, list[Path]] = defaultdict(list)
            for path in files:
                by_stem[self._key(path, image_base, path.stem)].append(path)
            distinct = Path(self.mask_pattern).stem != "{stem}"
            candidates = []
            for path in files:
                match = self.regex.fullmatch(path.name)
                key = self._key(path, image_base, match["stem"]) if match else None
                if key is not None and (distinct or any(p != path for p in by_stem.get(key, []))):
                    masks[key] = path
                else:
                    candidates.append(path)
        images: dict[Key, Path] = {}
        for path in candidates:
            key = self._key(path, image_base, path.stem)
            if key in images:
                raise ValueError(
                    f"two images share the name {key[1]!r} in {image_base / key[0]}: {images[key].name} "
                    f"and {path.name}; their masks could not be told apart"
                )
            images[key] = path
        return image_base, images, masks

    def _match_masks(self, images: dict[Key, Path], masks: dict[Key, Path]) -> dict[Any, Path]:
        """Masks keyed like their images: same subfolder first, else a unique name anywhere."""
        by_name: dict[str, list[Key]] = defaultdict(list)
        for key in masks:
            by_name[key[1]].append(key)
        matched: dict[Any, Path] = {key: masks[key] for key in images if key in masks}
        used: set[Key] = set(matched)
        for key in images:  # then masks elsewhere whose name is unique and not yet taken
            candidates = by_name.get(key[1], [])
            if key not in matched and len(candidates) == 1 and candidates[0] not in used:
                matched[key] = masks[candidates[0]]
                used.add(candidates[0])
        matched.update({("unmatched", str(path)): path for key, path in masks.items() if key not in used})
        return matched

    def _label(self, key: Key) -> int | None:
        """Folder class of an image key: 0 in a defect-free folder, the subfolder's class, or None."""
        top = key[0].split("/", 1)[0]
        if top in self.defect_free_folders:
            return 0
        if self.class_source == "values":
            return None
        names = self.class_names
        return names.index(top) if top in names[1:] else -1

    def scan(self) -> list[Sample]:
        image_base, images, masks = self._find_files()
        labels = {key: self._label(key) for key in images}
        bad = sorted(str(images[k]) for k, label in labels.items() if label == -1)
        if bad:
            raise ValueError(
                f"{len(bad)} images are not in a class subfolder of {image_base} (classes "
                f"{self.class_names[1:]}, defect-free folders {self.defect_free_folders}): "
                f"{bad[:10]}; move them, or set class_names / defect_free_folders"
            )
        mask_base = self._folder(self.mask_dir) if self.mask_dir is not None else image_base
        pairs = self.pair(
            images,
            self._match_masks(images, masks),
            lambda key, _: str(mask_base / key[0] / self.mask_pattern.format(stem=key[1])),
            mask_optional=lambda key: self.missing_mask_defect_free or labels[key] == 0,
        )
        samples = [
            # images of defect-free folders are defect-free whatever mask they may have
            Sample(image=str(image), mask=str(mask) if mask and labels[key] != 0 else None, label=labels[key])
            for key, image, mask in pairs
        ]
        return self.measure(samples)
