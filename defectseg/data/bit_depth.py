"""Images of more than 8 bits: scale 10-, 12- and 16-bit camera data to ``uint8``.

Industrial cameras often store 10- or 12-bit data in 16-bit files (largest value 1023 or 4095).
Dividing such a file by 257, as for true 16-bit data, leaves values 0..16: nearly black. The
stored bit depth says how to scale instead: ``value * 255 / (2**bits - 1)``, rounded.

``bit_depth`` is one of:

* ``8``, ``10``, ``12`` or ``16``: the bits the camera wrote; a value above ``2**bits - 1``
  raises a :class:`ValueError` naming the file (the setting is wrong for that file);
* ``"auto"``: from the file's largest value, the smallest of 8, 10, 12 and 16 bits that holds
  it, with a warning naming the file and the depth chosen (a dark 16-bit image would be taken
  for 12 bits; set the depth once it is known).

``uint8`` arrays are 8-bit files and come back unchanged whatever the setting.

Call :func:`to_uint8` right after decoding an image (``cv2.IMREAD_UNCHANGED``), before any
channel conversion or normalisation (:func:`defectseg.data.io.read_image` does both
for a file). This module needs numpy only, so the file readers can import it.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import numpy as np

#: Accepted bit depths (besides ``"auto"``).
BIT_DEPTHS = (8, 10, 12, 16)

BitDepth = Literal["auto", 8, 10, 12, 16]


class BitDepthWarning(UserWarning):
    """``bit_depth="auto"`` guessed the bit depth of a file from its largest value."""


def check_bit_depth(bit_depth: BitDepth | str | int) -> str | int:
    """``bit_depth`` as ``"auto"`` or an int of :data:`BIT_DEPTHS`.

    Raises:
        ValueError: any other value, naming the accepted ones.
    """
    if isinstance(bit_depth, str) and bit_depth.strip().lower() == "auto":
        return "auto"
    try:
        value = int(bit_depth)
    except (TypeError, ValueError):
        value = None
    if value not in BIT_DEPTHS or isinstance(bit_depth, bool):
        raise ValueError(f"bit_depth must be 'auto' or one of {list(BIT_DEPTHS)}, got {bit_depth!r}")
    return value


def infer_bit_depth(largest: int) -> int:
    """The smallest of :data:`BIT_DEPTHS` whose range ``0 .. 2**bits - 1`` holds ``largest``."""
    for bits in BIT_DEPTHS:
        if largest <= 2**bits - 1:
            return bits
    raise ValueError(f"value {largest} does not fit in 16 bits")


def resolve_bit_depth(
    array: np.ndarray,
    bit_depth: BitDepth | str | int = "auto",
    source: str | os.PathLike | None = None,
) -> int:
    """The bit depth used to scale ``array``: 8 for ``uint8`` arrays, else the checked setting
    or, for ``"auto"``, :func:`infer_bit_depth` of its largest value.

    Raises:
        ValueError: an unsupported dtype, an unknown ``bit_depth``, or a value above the stated
            depth (the message names ``source``, the largest value and the fix).
    """
    name = os.fspath(source) if source is not None else "image"
    depth = check_bit_depth(bit_depth)
    if array.dtype == np.uint8:
        return 8
    if array.dtype != np.uint16:
        raise ValueError(
            f"{name}: unsupported pixel type {array.dtype}; expected 8-bit or 16-bit integer images"
        )
    largest = int(array.max()) if array.size else 0
    if depth == "auto":
        return infer_bit_depth(largest)
    if largest > 2**depth - 1:
        raise ValueError(
            f"{name}: pixel value {largest} is above the largest {depth}-bit value {2**depth - 1}; "
            f"set bit_depth to the camera's real depth (e.g. {infer_bit_depth(largest)} or 16) or 'auto'"
        )
    return depth


def to_uint8(
    array: np.ndarray,
    bit_depth: BitDepth | str | int = "auto",
    source: str | os.PathLike | None = None,
    warn: bool = True,
    warned: set[int] | None = None,
) -> np.ndarray:
    """Scale a decoded image of ``bit_depth`` bits to ``uint8`` (``value * 255 / (2**bits - 1)``).

    Args:
        array: the image as decoded (``uint8`` or ``uint16``, any shape).
        bit_depth: ``"auto"``, 8, 10, 12 or 16 (see the module's documentation).
        source: the file the array came from, named in warnings and errors.
        warn: with ``"auto"`` on a 16-bit array, emit one :class:`BitDepthWarning` naming
            ``source`` and the depth chosen.
        warned: depths already warned about, updated in place: a run passes one set to warn
            once per depth found, naming the first file of each.

    Returns:
        A ``uint8`` array of the same shape (``array`` itself when it already is ``uint8``).

    Raises:
        ValueError: see :func:`resolve_bit_depth`.
    """
    depth = resolve_bit_depth(array, bit_depth, source)
    if array.dtype == np.uint8:
        return array
    if warn and check_bit_depth(bit_depth) == "auto" and (warned is None or depth not in warned):
        if warned is not None:
            warned.add(depth)
        name = os.fspath(source) if source is not None else "image"
        warnings.warn(
            f"{name}: 16-bit file with largest value {int(array.max()) if array.size else 0}, read as "
            f"{depth}-bit data (bit_depth: auto); set bit_depth: {depth} (or the camera's real depth) "
            "to silence this and to scale every file alike",
            BitDepthWarning,
            stacklevel=2,
        )
    # float64: no value of 10, 12 or 16 bits lands within float32 rounding of a .5 tie
    return np.rint(array.astype(np.float64) * (255.0 / (2**depth - 1))).astype(np.uint8)

