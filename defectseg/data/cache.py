"""Decode cache: every image and mask of a dataset decoded once, in one memory-mapped file.

Decoding JPEGs (and PNG masks) costs more than a training step's data work once crops are small.
:class:`DecodeCache` decodes every sample once (after ``scale``, before the channel conversion,
crops and augmentation: a grayscale dataset is stored with one channel), writes the ``uint8`` arrays into one file under the cache folder and serves them
from a read-only ``numpy.memmap``. DataLoader workers open the same file, so the operating
system's page cache holds one copy shared by all workers (nothing is copied per worker), and a
later run with the same dataset and settings starts without decoding anything.

The file's name is a digest of the dataset's file listing (names, sizes, modification times)
and of the settings that change the decoded arrays; any change makes a new file. A datamodule's
``decode_cache: auto`` builds it when the decoded dataset fits ``decode_cache_max_gb``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from defectseg.data.records import Sample

#: format version of the cache files (bump when the layout changes)
VERSION = 1

Decoded = tuple[np.ndarray, np.ndarray, tuple[int, int]]


def sample_key(sample: Sample) -> str:
    """Identity of a sample in the cache: its image, mask and folder label."""
    return f"{sample.image}|{sample.mask}|{sample.label}"


class DecodeCache:
    """Read-only view of a decode-cache file (picklable: workers reopen the file lazily).

    Args:
        path: the ``.bin`` file; its index is ``<path>.json`` beside it.
        index: ``{sample_key: [offset, height, width, channels, orig_h, orig_w]}``; the mask
            (``height x width`` bytes) follows the image in the file.
    """

    def __init__(self, path: str | os.PathLike, index: dict[str, list[int]]) -> None:
        self.path = str(path)
        self.index = index
        self._data: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "index": self.index, "_data": None}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, sample: Sample) -> bool:
        return sample_key(sample) in self.index

    def get(self, sample: Sample) -> Decoded | None:
        """``(image (H, W, C), mask (H, W), original (H, W))`` copies, or ``None`` on a miss."""
        entry = self.index.get(sample_key(sample))
        if entry is None:
            return None
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        offset, height, width, channels, orig_h, orig_w = entry
        size = height * width * channels
        image = np.array(self._data[offset : offset + size]).reshape(height, width, channels)
        mask = np.array(self._data[offset + size : offset + size + height * width]).reshape(height, width)
        return image, mask, (orig_h, orig_w)

    @classmethod
    def open(cls, path: str | os.PathLike) -> DecodeCache | None:
        """The cache at ``path`` if it and its index exist and are readable, else ``None``."""
        path = Path(path)
        index_path = path.with_suffix(".json")
        if not path.is_file() or not index_path.is_file():
            return None
        try:
            meta = json.loads(index_path.read_text())
            if meta.get("version") != VERSION or path.stat().st_size != meta.get("bytes"):
                return None
            return cls(path, {k: list(v) for k, v in meta["index"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        samples: Sequence[Sample],
        decode: Callable[[Sample], Decoded],
        map_function: Callable[[Callable[[Sample], Any], Sequence[Sample]], list[Any]] | None = None,
        progress: bool = True,
    ) -> DecodeCache:
        """Decode ``samples`` with ``decode`` and write them to ``path`` (atomically: a file being
        written is never read). ``map_function`` maps ``decode`` over chunks (e.g. a thread pool)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        index: dict[str, list[int]] = {}
        offset = 0
        chunk = 64
        run = map_function or (lambda f, items: [f(x) for x in items])
        bar = tqdm(total=len(samples), desc="decode cache", unit="img", disable=not progress, leave=False)
        try:
            with open(tmp, "wb") as handle:
                for start in range(0, len(samples), chunk):
                    part = list(samples[start : start + chunk])
                    for sample, (image, mask, original) in zip(part, run(decode, part)):
                        if image.ndim == 2:
                            image = image[..., None]
                        height, width, channels = image.shape
                        handle.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
                        handle.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
                        index[sample_key(sample)] = [offset, height, width, channels, *map(int, original)]
                        offset += height * width * (channels + 1)
                    bar.update(len(part))
            meta = {"version": VERSION, "bytes": offset, "index": index}
            tmp_index = tmp.with_suffix(".json.tmp")
            tmp_index.write_text(json.dumps(meta))
            tmp.replace(path)
            tmp_index.replace(path.with_suffix(".json"))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
        return cls(path, index)


def estimated_bytes(samples: Sequence[Sample], channels: int, scale: float | None) -> int:
    """Bytes a decode cache of ``samples`` would take at most (from the scan's pixel counts;
    grayscale files take fewer: the cache keeps images before the channel conversion)."""
    factor = (scale or 1.0) ** 2
    return int(sum(s.num_pixels for s in samples) * factor * (channels + 1))


def warn_unwritable(path: Path, err: OSError) -> None:
    warnings.warn(f"could not write the decode cache {path}: {err}; decoding every epoch", stacklevel=3)
