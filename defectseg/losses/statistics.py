"""Class statistics for losses that derive their weights from the training data.

Losses such as ``wce`` and ``class_balanced`` with ``weight="auto"`` / ``samples_per_class="auto"``
are built before the training data is known (a :class:`~defectseg.models.SegmentationModule`
builds its loss in ``__init__``). They declare ``wants_class_statistics = True`` and implement
``set_class_statistics(class_frequencies, class_pixel_counts)``; the module calls
:func:`provide_class_statistics` from its ``setup()`` hook with the statistics of the
datamodule's training split (:func:`class_statistics`). Outside Lightning, call
``loss.set_class_statistics(...)`` yourself or pass the numbers to the loss directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn


def class_statistics(datamodule: Any, split: str = "train") -> dict[str, list[float] | None]:
    """``{"class_frequencies", "class_pixel_counts"}`` of ``split`` from a datamodule.

    ``class_frequencies`` is ``datamodule.class_pixel_frequencies(split)`` (shares of the
    labelled pixels, background first, summing to 1); ``class_pixel_counts`` multiplies them by
    the split's total pixel count when the datamodule lists its samples (``samples_of``), else
    it is ``None``.

    Raises:
        ValueError: the datamodule has no ``class_pixel_frequencies`` method.
    """
    frequencies_of = getattr(datamodule, "class_pixel_frequencies", None)
    if not callable(frequencies_of):
        raise ValueError(
            f"{type(datamodule).__name__} has no class_pixel_frequencies(split) method, so losses with "
            "weight='auto' cannot derive their class weights from it; give the weights explicitly "
            "(for example loss_kwargs={'wce': {'weight': [...]}})"
        )
    frequencies = [float(f) for f in frequencies_of(split)]
    counts = None
    samples_of = getattr(datamodule, "samples_of", None)
    if callable(samples_of):
        total = float(sum(getattr(s, "num_pixels", 0) for s in samples_of(split)))
        if total > 0:
            counts = [f * total for f in frequencies]
    return {"class_frequencies": frequencies, "class_pixel_counts": counts}


def modules_wanting_class_statistics(loss: nn.Module) -> list[nn.Module]:
    """The sub-modules of ``loss`` (itself included) that derive weights from class statistics."""
    return [m for m in loss.modules() if getattr(m, "wants_class_statistics", False)]


def provide_class_statistics(
    loss: nn.Module,
    class_frequencies: Sequence[float],
    class_pixel_counts: Sequence[float] | None = None,
) -> int:
    """Hand class statistics to every part of ``loss`` that wants them; returns how many took them."""
    wanting = modules_wanting_class_statistics(loss)
    for module in wanting:
        module.set_class_statistics(class_frequencies, class_pixel_counts)
    return len(wanting)
