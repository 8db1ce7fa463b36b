"""``Predictor``: predict defects on raw images of any size with a trained model.

>>> from defectseg import Predictor
>>> predictor = Predictor("model.ckpt", tile_size=512, overlap=64, min_area={"scratch": 20})
>>> result = predictor.predict("images/part_0001.png")
>>> result.mask.shape, result.report.defect_free

The model can be a checkpoint written by ``defectseg fit``, a LightningModule, or an ONNX /
TorchScript file written by ``defectseg export`` (ONNX runs in ONNX Runtime). Images are read
as RGB (or gray) ``uint8``, 16-bit files scaled by ``bit_depth``; arrays given directly must be
RGB (convert OpenCV's BGR first), ``uint8`` or ``uint16`` (scaled by ``bit_depth`` too).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np

from defectseg.data.bit_depth import check_bit_depth, to_uint8
from defectseg.data.contract import round_up
from defectseg.data.io import read_image, to_channels
from defectseg.inference.report import ImageReport, analyze, resolve_min_area
from defectseg.inference.runtime import ModelInfo, load_backend, pad_images
from defectseg.inference.tiling import BlendAccumulator, Tile, TilePlan, _as_pair

#: Test-time augmentation passes: flips applied to the input (and undone on the output).
TTA_FLIPS: dict[str, tuple[tuple[bool, bool], ...]] = {
    "none": ((False, False),),
    "hflip": ((False, False), (False, True)),
    "vflip": ((False, False), (True, False)),
    "flip": ((False, False), (False, True), (True, False), (True, True)),
}

ImageInput = str | os.PathLike | np.ndarray


@dataclass
class Prediction:
    """The result for one image.

    Attributes:
        path: the image's path, or the name given with an array (``None`` if none).
        mask: class indices ``(H, W)`` ``uint8`` at the image's size, specks below ``min_area``
            removed.
        confidence: probability of the predicted class per pixel ``(H, W)`` ``float32``.
        report: the defect report (areas, components, boxes, confidences).
        image: the image as read (``uint8`` RGB or gray), for overlays.
        probabilities: per-class probabilities ``(K, H, W)`` when asked for.
        error: why the image failed (then ``mask``/``confidence`` are ``None``), with
            ``on_error='skip'``.
    """

    path: str | None
    mask: np.ndarray | None
    confidence: np.ndarray | None
    report: ImageReport
    image: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    error: str | None = None

    @property
    def defect_free(self) -> bool | None:
        return self.report.defect_free


class _Job:
    """One image in flight: its tiles, the blended canvas and what is left to run."""

    def __init__(self, order: int, path: str | None, image: np.ndarray, prepared: np.ndarray,
                 content: tuple[int, int], plan: TilePlan, num_classes: int, passes: int) -> None:
        self.order = order
        self.path = path
        self.image = image
        self.prepared = prepared
        self.content = content
        self.plan = plan
        self.accumulator = BlendAccumulator(plan, num_classes)
        self.remaining = len(plan) * passes


class Predictor:
    """Predict defect masks and reports on raw images of any size.

    Args:
        model: a ``.ckpt`` checkpoint of a defectseg model, an ``.onnx``/TorchScript file written
            by ``defectseg export``, or a LightningModule.
        device: ``auto`` (the default: CUDA when present, else CPU), ``cpu``, ``cuda``
            (``cuda:1``...).
        tile_size: images larger than this (an int or ``(height, width)``) are predicted tile by
            tile with :mod:`sliding-window blending <defectseg.inference.tiling>`; ``None`` or 0
            predicts every image in one pass. Multiples of 32 avoid padding each tile. Models
            exported with a fixed size use tiles of at most that size.
        overlap: minimum overlap of neighbouring tiles, in pixels.
        batch_size: tiles (of all images) run per forward pass.
        tta: test-time augmentation: ``none``, ``hflip``, ``vflip`` or ``flip`` (identity,
            horizontal, vertical and both; probabilities are averaged).
        min_area: components smaller than this many pixels are dropped from the mask and the
            report; one int for all classes or ``{class name or index: pixels}``.
        connectivity: 8 or 4, for connected components.
        resize: ``(height, width)`` to resize images to before the model (for models trained
            with ``size_policy: resize``); probabilities are resized back to the image's size.
        model_class: LightningModule class of a checkpoint saved outside the defectseg package.
        expect: values the model must have, e.g. ``{"num_classes": 5}`` or
            ``{"class_names": [...]}``; a mismatch raises an error naming both.
        return_probabilities: keep the ``(K, H, W)`` probabilities in each :class:`Prediction`.
        num_workers: threads decoding images ahead of the model (0: decode in the caller).
        num_threads: intra-op threads of ONNX Runtime (``.onnx`` models).
        bit_depth: bits of data in 16-bit images: ``8``, ``10``, ``12``, ``16`` or ``"auto"``
            (from each file's largest value, warning once per depth found); see
            :mod:`defectseg.data.bit_depth`. Use the setting the model was trained with.
    """

    def __init__(
        self,
        model: str | os.PathLike | L.LightningModule,
        device: str = "auto",
        tile_size: int | tuple[int, int] | None = 1024,
        overlap: int = 64,
        batch_size: int = 8,
        tta: Literal["none", "hflip", "vflip", "flip"] | None = None,
        min_area: int | Mapping[str | int, int] | None = None,
        connectivity: int = 8,
        resize: int | tuple[int, int] | None = None,
        model_class: type[L.LightningModule] | None = None,
        expect: Mapping[str, Any] | None = None,
        return_probabilities: bool = False,
        num_workers: int = 1,
        num_threads: int | None = None,
        bit_depth: Literal["auto", 8, 10, 12, 16] | str = "auto",
    ) -> None:
        self.bit_depth = check_bit_depth(bit_depth)
        self._warned_depths: set[int] = set()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tta = tta or "none"
        if tta not in TTA_FLIPS:
            raise ValueError(f"tta must be one of {sorted(TTA_FLIPS)}, got {tta!r}")
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        self.backend = load_backend(
            model, device=device, model_class=model_class, expect=dict(expect) if expect else None,
            num_threads=num_threads,
        )
        info = self.info
        if info.static_size is not None:
            # a fixed-size export runs tiles of at most its size (smaller ones are padded)
            static = tuple(info.static_size)
            tile = _as_pair(tile_size, "tile_size") if tile_size else static
            tile_size = (min(tile[0], static[0]), min(tile[1], static[1]))
        if tile_size:
            tile = _as_pair(tile_size, "tile_size")
            if overlap < 0 or overlap >= min(tile):
                raise ValueError(f"overlap must be >= 0 and smaller than tile_size {tile}, got {overlap}")
        self.tile_size = tile_size or None
        self.overlap = int(overlap)
        self.batch_size = int(batch_size)
        self.tta = tta
        self.min_area = resolve_min_area(min_area, info.class_names)
        self.connectivity = connectivity
        self.resize = _as_pair(resize, "resize") if resize else None
        self.return_probabilities = return_probabilities
        self.num_workers = max(0, int(num_workers))

    # ------------------------------------------------------------------ model facts
    @property
    def info(self) -> ModelInfo:
        """Classes, channels, normalisation and size limits of the model."""
        return self.backend.info

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    # ------------------------------------------------------------------ public API
    def predict(self, image: ImageInput, name: str | None = None) -> Prediction:
        """Predict one image (a path, or an RGB/gray ``uint8`` array).

        Args:
            image: file path or array ``(H, W)`` / ``(H, W, C)``.
            name: the name used in the report for an array (default ``"image_0"``).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file cannot be decoded, or the array has the wrong type or shape.
        """
        return next(self.predict_iter([image], names=[name] if name else None))

    def predict_batch(self, images: Sequence[ImageInput], names: Sequence[str] | None = None) -> list[Prediction]:
        """Predict several images, batching their tiles together."""
        return list(self.predict_iter(images, names=names))

    def predict_iter(
        self,
        images: Iterable[ImageInput],
        names: Sequence[str] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> Iterator[Prediction]:
        """Predict a stream of images, yielding results in input order.

        Tiles of consecutive images are batched together; images are decoded ahead in
        ``num_workers`` threads. A result comes out once its tiles have run, which may wait for
        up to ``batch_size`` tiles of later images: for the lowest latency on a live camera
        stream, call :meth:`predict` per image instead.

        Args:
            images: paths or arrays.
            names: report names of the images (default: the path, or ``image_<i>`` for arrays).
            on_error: ``raise`` stops at the first unreadable image (after yielding the
                images before it); ``skip`` yields a :class:`Prediction` with ``error`` set and
                goes on.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        passes = TTA_FLIPS[self.tta]
        queues: dict[tuple[int, int], list[tuple[_Job, Tile, tuple[bool, bool]]]] = {}
        jobs: dict[int, _Job] = {}
        done: dict[int, Prediction] = {}
        next_out = 0
        max_pending = 4 * self.batch_size

        def run(shape: tuple[int, int]) -> None:
            entries = queues.pop(shape, [])
            for start in range(0, len(entries), self.batch_size):
                chunk = entries[start : start + self.batch_size]
                batch = np.stack([_flip(job.prepared[tile.slices], flip) for job, tile, flip in chunk])
                probs = self.backend(batch)
                for (job, tile, flip), prob in zip(chunk, probs):
                    job.accumulator.add(tile, _flip_chw(prob, flip), 1.0 / len(passes))
                    job.remaining -= 1
                    if job.remaining == 0:
                        done[job.order] = self._finish(job)
                        del jobs[job.order]

        def flush() -> None:
            for shape in list(queues):
                run(shape)

        for order, (path, loaded) in enumerate(self._load_all(images, names)):
            job = None
            error = loaded if isinstance(loaded, Exception) else None
            if error is None:
                try:
                    job = self._start(order, path, loaded, len(passes))
                except ValueError as err:
                    error = err
            if error is not None:
                if on_error == "raise":
                    # the images before this one are finished and yielded first
                    flush()
                    while next_out in done:
                        yield done.pop(next_out)
                        next_out += 1
                    raise error
                done[order] = _failed(path, error)
            if job is not None:
                jobs[order] = job
                for tile in job.plan.tiles:
                    for flip in passes:
                        queue = queues.setdefault((tile.height, tile.width), [])
                        queue.append((job, tile, flip))
                        if len(queue) >= self.batch_size:
                            run((tile.height, tile.width))
                if len(jobs) > max_pending:
                    flush()
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
        flush()
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1

    # ------------------------------------------------------------------ internals
    def _load_all(
        self, images: Iterable[ImageInput], names: Sequence[str] | None
    ) -> Iterator[tuple[str | None, np.ndarray | Exception]]:
        """Decode images (ahead, in threads), yielding ``(name, image or the error)``."""
        items = ((i, item, names[i] if names is not None and i < len(names) else None) for i, item in enumerate(images))
        if self.num_workers == 0:
            for index, item, name in items:
                yield self._load_one(index, item, name)
            return
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.num_workers) as pool:
            for index, item, name in items:
                pending.append(pool.submit(self._load_one, index, item, name))
                if len(pending) > 2 * self.num_workers + self.batch_size:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _load_one(self, index: int, item: ImageInput, name: str | None) -> tuple[str | None, np.ndarray | Exception]:
        if isinstance(item, np.ndarray):
            label = name or f"image_{index}"
            try:
                if item.dtype == np.uint16:
                    item = to_uint8(item, self.bit_depth, label, warned=self._warned_depths)
                return label, _check_array(item, label)
            except ValueError as err:
                return label, err
        path = os.fspath(item)
        label = name or path
        if not os.path.exists(path):
            return label, FileNotFoundError(f"image {path!r} does not exist")
        if os.path.isdir(path):
            return label, IsADirectoryError(
                f"{path} is a folder; pass image files (or use defectseg.inference.list_images)"
            )
        try:
            return label, read_image(path, bit_depth=self.bit_depth, warned=self._warned_depths)
        except (ValueError, FileNotFoundError) as err:
            return label, err

    def _start(self, order: int, path: str | None, image: np.ndarray, passes: int) -> _Job:
        info = self.info
        try:
            prepared = to_channels(image, info.in_channels)
        except ValueError as err:
            raise ValueError(f"{path}: {err} (the model takes {info.in_channels} channels)") from None
        if self.resize is not None and prepared.shape[:2] != self.resize:
            height, width = self.resize
            shrink = height * width < prepared.shape[0] * prepared.shape[1]
            prepared = cv2.resize(prepared, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            if prepared.ndim == 2:
                prepared = prepared[..., None]
        # images smaller than the model's minimum are padded to the padding multiple as
        # PadToMultiple does in training (reflection, or edge replication when too small)
        content = (int(prepared.shape[0]), int(prepared.shape[1]))
        if min(content) < info.min_size:
            multiple = max(1, info.pad_multiple)
            target_h = max(info.min_size, round_up(content[0], multiple))
            target_w = max(info.min_size, round_up(content[1], multiple))
            prepared = pad_images(prepared[None], target_h, target_w)[0]
        prepared = np.ascontiguousarray(prepared)
        plan = TilePlan(prepared.shape[0], prepared.shape[1], self.tile_size, self.overlap if self.tile_size else 0)
        return _Job(order, path, image, prepared, content, plan, info.num_classes, passes)

    def _finish(self, job: _Job) -> Prediction:
        probabilities = job.accumulator.result()
        height, width = job.content
        probabilities = probabilities[:, :height, :width]
        orig_h, orig_w = job.image.shape[:2]
        if (height, width) != (orig_h, orig_w):
            resized = cv2.resize(
                np.ascontiguousarray(probabilities.transpose(1, 2, 0)), (orig_w, orig_h), interpolation=cv2.INTER_LINEAR
            )
            probabilities = resized.reshape(orig_h, orig_w, -1).transpose(2, 0, 1)
        mask = probabilities.argmax(axis=0).astype(np.uint8)
        confidence = probabilities.max(axis=0).astype(np.float32)
        mask, report = analyze(
            mask, confidence, self.info.class_names, self.min_area, self.connectivity, file=job.path or ""
        )
        return Prediction(
            path=job.path,
            mask=mask,
            confidence=confidence,
            report=report,
            image=job.image,
            probabilities=np.ascontiguousarray(probabilities) if self.return_probabilities else None,
        )

    def __repr__(self) -> str:
        return (
            f"Predictor({self.backend.name}, classes={self.class_names}, tile_size={self.tile_size}, "
            f"overlap={self.overlap}, batch_size={self.batch_size}, tta={self.tta!r})"
        )


def _flip(image: np.ndarray, flip: tuple[bool, bool]) -> np.ndarray:
    """Flip ``(H, W, C)`` vertically and/or horizontally."""
    vertical, horizontal = flip
    if vertical:
        image = image[::-1]
    if horizontal:
        image = image[:, ::-1]
    return image


def _flip_chw(probabilities: np.ndarray, flip: tuple[bool, bool]) -> np.ndarray:
    """Undo :func:`_flip` on ``(K, H, W)`` probabilities."""
    vertical, horizontal = flip
    if vertical:
        probabilities = probabilities[:, ::-1]
    if horizontal:
        probabilities = probabilities[:, :, ::-1]
    return probabilities


def _check_array(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(
            f"{name}: images must be uint8 (raw 0..255 pixels) or uint16 arrays (scaled by bit_depth), "
            f"got {image.dtype}; the model normalises them itself"
        )
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"{name}: expected an (H, W) or (H, W, C) image with 1, 3 or 4 channels, got {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"{name}: empty image {image.shape}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    return image


def _failed(path: str | None, error: Exception) -> Prediction:
    return Prediction(path=path, mask=None, confidence=None, report=ImageReport(file=path or "", error=str(error)), error=str(error))
