"""The one coordinate convention (SPEC §3), used by data, matching, eval and visualisation.

Bins: k in 0..999. For an image dimension D (width for x, height for y):

    k = clamp(round_half_up(v / (D - 1) * 999), 0, 999)        pixel -> bin
    v = k / 999 * (D - 1)                                      bin   -> pixel

Pixel 0 maps to bin 0 and pixel D-1 (the last pixel centre) to bin 999; values up to D are accepted
and clamp to 999. A quantized box keeps x2 > x1 and y2 > y1: when rounding collapses it, the far edge
is nudged one bin out (or the near edge in, at 999).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

NUM_BINS = 1000
MAX_BIN = NUM_BINS - 1
COORD_TOKEN_RE = re.compile(r"^<\|coord_(\d{1,3})\|>$")


def pixel_to_bin(v: float, size: int) -> int:
    """Quantize one pixel coordinate ``v`` on an axis of ``size`` pixels to a bin 0..999."""
    if size < 2:
        raise ValueError(f"image dimension must be >= 2 pixels, got {size}")
    k = math.floor(v / (size - 1) * MAX_BIN + 0.5)
    return min(max(k, 0), MAX_BIN)


def bin_to_pixel(k: int, size: int) -> float:
    """Pixel coordinate of bin ``k`` on an axis of ``size`` pixels."""
    return k / MAX_BIN * (size - 1)


def coord_token(k: int) -> str:
    if not 0 <= k <= MAX_BIN:
        raise ValueError(f"bin {k} outside 0..{MAX_BIN}")
    return f"<|coord_{k}|>"


def parse_coord_token(s: str) -> int | None:
    """Bin of a ``<|coord_k|>`` string, or None when ``s`` is not exactly one coord token 0..999."""
    m = COORD_TOKEN_RE.match(s)
    if not m:
        return None
    k = int(m.group(1))
    if k > MAX_BIN or (len(m.group(1)) > 1 and m.group(1)[0] == "0"):
        return None
    return k


def fix_box_bins(bins: Sequence[int]) -> tuple[int, int, int, int]:
    """Nudge a quantized box so that x2 > x1 and y2 > y1 (one bin at most per axis)."""
    x1, y1, x2, y2 = (int(b) for b in bins)
    if x2 <= x1:
        x1, x2 = (x1, x1 + 1) if x1 < MAX_BIN else (MAX_BIN - 1, MAX_BIN)
    if y2 <= y1:
        y1, y2 = (y1, y1 + 1) if y1 < MAX_BIN else (MAX_BIN - 1, MAX_BIN)
    return x1, y1, x2, y2


def pixels_to_bins(values: Sequence[float], width: int, height: int, geometry: str) -> tuple[int, ...]:
    """Quantize a flat ``[x, y, x, y, ...]`` list; boxes are nudged to keep positive extent."""
    bins = tuple(pixel_to_bin(v, width if i % 2 == 0 else height) for i, v in enumerate(values))
    return fix_box_bins(bins) if geometry == "bbox_2d" else bins


def bins_to_pixels(bins: Sequence[int], width: int, height: int) -> tuple[float, ...]:
    """Inverse of :func:`pixels_to_bins` (up to quantization) for a flat ``[x, y, ...]`` list."""
    return tuple(bin_to_pixel(k, width if i % 2 == 0 else height) for i, k in enumerate(bins))


def clip_polygon(flat: list, width: int, height: int) -> tuple[list, bool]:
    """Every vertex of a flat ``[x1, y1, x2, y2, ...]`` list (a box too) clamped into the image
    (0..width, 0..height), and whether any moved."""
    out = [min(max(v, 0), width if i % 2 == 0 else height) for i, v in enumerate(flat)]
    return out, out != flat
