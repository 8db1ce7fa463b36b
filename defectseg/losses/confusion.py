"""Label-confusion suppression of the balanced loss: ``M_confusion = 1 - H / ln C``.

``H`` is the entropy of the labels in the ``r x r`` window around each pixel
(:func:`confusion_suppression_map`). Two exact methods compute it: ``dense`` box-filters the
one-hot annotation; ``packed`` (the CPU default) skips the ``8 x 8`` tiles with no label change
within reach and counts the labels of the other windows from bit-packed row sums decoded with
shifts, so its cost grows with the length of the label boundaries, not with the image area.
:class:`~defectseg.losses.balanced.BalancedLoss` multiplies the map into its class weights
(:func:`confusion_map` with ``into``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from defectseg.losses.basic import Labels, validated_labels


def check_window(window: int) -> None:
    """Raise a ``ValueError`` unless ``window`` is an odd integer >= 1."""
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 1 (the r x r window is centred on the pixel), got {window!r}")


def confusion_suppression_map(
    target: torch.Tensor,
    num_classes: int,
    window: int = 7,
    ignore_index: int = 255,
    method: Literal["auto", "dense", "packed"] = "auto",
) -> torch.Tensor:
    """``M_confusion = 1 - H / ln C``, ``H`` the entropy of the labels around each pixel.

    ``H = -sum_k q_k ln q_k`` with ``q_k = n_k / n``: ``n_k`` counts label ``k`` in the
    ``window x window`` square centred on the pixel and ``n`` the labelled pixels there.
    Borders and ignored pixels are handled alike: the window is clipped to the image, and
    ignored pixels are left out of both ``n_k`` and ``n``, so they neither add confusion nor
    dilute it (the paper's ``n_k / r^2`` is the case of a full window). A pixel whose labelled
    neighbours all share its label gets exactly 1; on a boundary between two classes the
    weight drops below 1 (to ``1 - ln 2 / ln C`` for a half-half split).

    Args:
        target: ``(B, H, W)`` class indices.
        num_classes: ``C`` (at least 2).
        window: odd side ``r`` of the window (1 gives 1 everywhere).
        ignore_index: label of unlabelled pixels.
        method: ``"dense"`` box-filters the one-hot annotation (``C`` channels);
            ``"packed"`` skips the ``8 x 8`` tiles with no label change within reach and, in the
            others, counts only at the windows that can hold two labels, from bit-packed
            window-row counts decoded with shifts (exact; its cost grows with the length of the
            label boundaries, not with the image area, so it is many times cheaper on the CPU; it needs
            ``b (C + 1) <= 63`` with ``b`` the bits of ``r``, e.g. ``C <= 20`` with ``r = 7``,
            and falls back to dense otherwise);
            ``"auto"``: packed on the CPU, dense on accelerators.

    Returns:
        ``(B, H, W)`` float32 in ``[0, 1]``; 0 at ignored pixels.
    """
    check_window(window)
    if num_classes < 2:
        raise ValueError(f"confusion suppression needs num_classes >= 2, got {num_classes}")
    if method not in ("auto", "dense", "packed"):
        raise ValueError(f"method must be 'auto', 'dense' or 'packed', got {method!r}")
    if target.ndim != 3:
        raise ValueError(f"target must be (B, H, W), got shape {tuple(target.shape)}")
    return confusion_map(validated_labels(target, num_classes, ignore_index), num_classes, window, method)


def confusion_map(
    labels: Labels, num_classes: int, window: int, method: str = "auto", into: torch.Tensor | None = None
) -> torch.Tensor:
    """The confusion map, or ``into * map`` computed in place when ``into`` (a float32 ``(B, H, W)``
    map that is already 0 at ignored pixels, such as the class-weight map) is given."""
    label, valid = labels.label, labels.valid
    if window == 1:
        if into is not None:
            return into
        return torch.ones(label.shape, device=label.device) if valid is None else valid.to(torch.float32)
    if method == "auto":
        method = "packed" if label.device.type == "cpu" else "dense"
    if method == "packed":
        out = _confusion_packed(label, valid, num_classes, window, into)
        if out is not None:
            return out
    weight = _confusion_dense(label, valid, num_classes, window)
    return weight if into is None else into.mul_(weight)


def _entropy_weight(counts: torch.Tensor, num_classes: int, dim: int = -1) -> torch.Tensor:
    """``1 - H / ln C`` from label counts along ``dim`` (exactly 1 for one label)."""
    q = counts / counts.sum(dim=dim, keepdim=True).clamp(min=1.0)
    # q ln q, with 0 ln 0 = 0 (q >= 1e-30 inside the log): exactly 0 for a single label; a
    # vectorised log, several times faster than xlogy on the CPU
    negative_entropy = q.clamp(min=1e-30).log_().mul_(q).sum(dim=dim)
    return negative_entropy.mul_(1.0 / math.log(num_classes)).add_(1.0).clamp_(0.0, 1.0)


def _confusion_dense(label, valid, num_classes, window) -> torch.Tensor:
    batch, height, width = label.shape
    one_hot = torch.zeros(batch, num_classes + 1, height, width, device=label.device)
    one_hot.scatter_(1, label.unsqueeze(1), 1.0)
    # zero padding + divisor 1: sums over the part of the window inside the image
    counts = F.avg_pool2d(
        one_hot[:, :num_classes], window, stride=1, padding=window // 2, count_include_pad=True, divisor_override=1
    )
    weight = _entropy_weight(counts, num_classes, dim=1)
    return weight if valid is None else weight * valid


def _slide(x: torch.Tensor, window: int, dim: int, op) -> torch.Tensor:
    """``op`` (``torch.bitwise_or`` or ``torch.add``) over every ``window`` consecutive entries
    along ``dim`` (valid positions only: the result is ``window - 1`` shorter), by doubling:
    ``O(log window)`` passes instead of ``window``."""
    powers = {1: x}
    length = 1
    while 2 * length <= window:
        prev = powers[length]
        size = prev.shape[dim] - length
        powers[2 * length] = op(prev.narrow(dim, 0, size), prev.narrow(dim, length, size))
        length *= 2
    keep = x.shape[dim] - window + 1
    result, start, rest = None, 0, window
    for length in sorted(powers, reverse=True):
        if rest >= length:
            piece = powers[length].narrow(dim, start, keep)
            result = piece if result is None else op(result, piece)
            start, rest = start + length, rest - length
    return result


def _window_any(mask: torch.Tensor, window: int) -> torch.Tensor:
    """``out[b, y, x]`` = any of ``mask`` over the ``window x window`` square centred there (clipped)."""
    half = window // 2
    out = F.pad(mask, (half, half, half, half))
    return _slide(_slide(out, window, 2, torch.bitwise_or), window, 1, torch.bitwise_or)


_BLOCK = 8  # side of the tiles the packed method skips when no label changes near them (8: a tile row is an int64)
_TILES_PER_CHUNK = 4096  # tiles processed at once (about 0.8 M framed pixels)


def _confusion_packed(label, valid, num_classes, window, into=None) -> torch.Tensor | None:
    """The packed method: label counts only in the tiles near a label change.

    1. A pixel's window holds two labels only if it holds a pixel that differs from its right or
       lower neighbour (an edge pixel). The image is cut into ``8 x 8`` tiles; a tile is active
       when an edge pixel lies within ``r // 2`` of it (tiles with an edge, dilated). Elsewhere
       every window is uniform and the weight is 1: nothing is computed there.
    2. For each active tile, the labels of the tile and a frame of ``r // 2`` around it are
       gathered (pixels outside the image count nothing) and each label ``k`` becomes
       ``2 ** (b k)``, with ``b`` bits per digit, enough for ``r``: sliding sums along the rows
       give each window row's label counts as ``b``-bit digits (int32 when they fit, else int64).
    3. The row sums are split into their even and odd digits (each then has ``2 b`` bits, room for
       a window count up to ``r^2``), summed over the ``r`` rows, decoded with shifts into counts,
       and the entropy weight is multiplied into the map at the tile's pixels (uniform windows
       decode to exactly 1).
    Exact (equal to the dense method), with a cost that grows with the length of the label
    boundaries rather than the image area. Needs ``b (C + 1) <= 63`` (``C <= 20`` with ``r = 7``);
    returns ``None`` otherwise.
    """
    digits = num_classes + (valid is not None)  # ignored pixels get the top digit
    bits = window.bit_length()
    if bits * digits > 63:
        return None  # int64 could not hold a row's packed counts (one digit of r's bits per label)
    batch, height, width = label.shape
    half, size = window // 2, _BLOCK
    device = label.device
    if into is None:
        into = torch.ones(label.shape, device=device) if valid is None else valid.to(torch.float32)
    # 1. the labels as bytes in a frame of `half` (and up to whole tiles) that holds the sentinel
    #    `digits` (outside the image: packs to 0, counts nothing); bit 7 marks the edge pixels
    blocks_y, blocks_x = -(-height // size), -(-width // size)
    framed = torch.full(
        (batch, blocks_y * size + 2 * half, blocks_x * size + 2 * half), digits, dtype=torch.uint8, device=device
    )
    inner = framed[:, half : half + height, half : half + width]
    inner.copy_(label.to(torch.uint8))  # (converting first is faster than a converting strided copy)
    edge = torch.zeros(batch, blocks_y * size, blocks_x * size, dtype=torch.bool, device=device)
    edge[:, :height, : width - 1] = inner[:, :, 1:] != inner[:, :, :-1]
    edge[:, : height - 1, :width] |= inner[:, 1:, :] != inner[:, :-1, :]
    inner.bitwise_or_(edge[:, :height, :width].to(torch.uint8).bitwise_left_shift_(7))
    # active tiles: an edge pixel within `half` of them (a tile row of 8 bytes read as one int64)
    tile_rows = edge.view(torch.uint8).view(batch, blocks_y, size, blocks_x * size).view(torch.int64)
    tile_edge = tile_rows.amax(dim=2) != 0  # (B, tiles down, tiles across)
    reach = 2 * (-(-half // size)) + 1  # tiles within r // 2 pixels of a tile
    active = _window_any(tile_edge, reach).nonzero()  # (n, 3): image, tile row, tile column
    if active.numel() == 0:
        return into
    flat = into.view(-1)
    for chunk in active.split(_TILES_PER_CHUNK):  # bounds the memory when labels change everywhere
        index, weight = _confusion_tiles(framed, chunk, num_classes, window, digits, height, width)
        flat.index_copy_(0, index, flat.index_select(0, index).mul_(weight))
    return into


def _confusion_tiles(framed, tiles, num_classes, window, digits, height, width):
    """Steps 2 and 3 of the packed method for some active tiles ``(n, 3)`` (image, tile row, tile
    column): the flat ``(B, H, W)`` indices of their candidate pixels and the weights there."""
    half, size = window // 2, _BLOCK
    bits = window.bit_length()
    device = framed.device
    tile_b, tile_y, tile_x = tiles.unbind(1)
    # 2. each tile with its frame (one gather of bytes), then the windows there that hold an edge
    #    pixel (bit 7): the candidates (every window with two labels is one of them)
    side = size + 2 * half
    framed_h, framed_w = framed.shape[1:]
    index_dtype = torch.int32 if framed.numel() < 2**31 else torch.int64
    corner = ((tile_b * framed_h + tile_y * size) * framed_w + tile_x * size).to(index_dtype)
    offsets = (torch.arange(side, device=device) * framed_w).view(-1, 1) + torch.arange(side, device=device)
    gather = (corner.view(-1, 1, 1) + offsets.to(index_dtype)).view(-1)
    patch = framed.view(-1).index_select(0, gather).view(-1, side, side)
    mixed = _slide(_slide(patch >> 7, window, 2, torch.bitwise_or), window, 1, torch.bitwise_or)  # (n, size, size)
    candidate = mixed.view(-1).nonzero().squeeze(1)  # flat (tile, y, x) indices
    tile = candidate >> 6  # size 8: shifts and masks instead of integer division
    ys = tile_y.index_select(0, tile) * size + (candidate >> 3 & 7)
    xs = tile_x.index_select(0, tile) * size + (candidate & 7)
    if height % size or width % size:  # tiles at the right and lower borders overhang the image
        inside = (ys < height) & (xs < width)
        candidate, tile, ys, xs = candidate[inside], tile[inside], ys[inside], xs[inside]
    # 3. label k -> 2^(b k), the sentinel -> 0; sliding sums along the rows give each window row's
    #    counts as b-bit digits; a window count reaches r^2 < 2^(2b), so every other digit is kept
    #    (2b bits each), the r rows are summed and the counts decoded at the candidates
    dtype = torch.int32 if bits * digits <= 31 else torch.int64
    lut = torch.tensor([1 << (bits * k) for k in range(digits)] + [0], dtype=dtype, device=device)
    packed = lut.index_select(0, patch.bitwise_and_(127).view(-1).int()).view(patch.shape)
    rows = _slide(packed, window, 2, torch.add)  # (n, side, size)
    field = 2 * bits
    even = sum((1 << bits) - 1 << field * j for j in range((digits + 1) // 2))
    if field * ((digits + 1) // 2) > 31:
        rows = rows.long()
    halves = [_slide(rows & even, window, 1, torch.add), _slide(rows >> bits & even, window, 1, torch.add)]
    # class-major counts (C, N): the even digits 0, 2, ... then the odd ones 1, 3, ... below C (the
    # entropy does not depend on the order of the classes), decoded in place
    counts = torch.empty(num_classes, candidate.numel(), dtype=rows.dtype, device=device)
    start = 0
    for h, count in zip(halves, ((num_classes + 1) // 2, num_classes // 2)):
        shifts = torch.arange(0, field * count, field, dtype=rows.dtype, device=device).unsqueeze(1)
        digits_here = h.reshape(-1).index_select(0, candidate).unsqueeze(0)
        torch.bitwise_right_shift(digits_here, shifts, out=counts[start : start + count])
        start += count
    weight = _entropy_weight(counts.bitwise_and_((1 << field) - 1).to(torch.float32), num_classes, dim=0)
    return (tile_b.index_select(0, tile) * height + ys) * width + xs, weight
