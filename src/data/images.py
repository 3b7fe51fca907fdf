"""Images: the ONE place an image file is opened (training, rollouts, inference, pictures, bench).

    load_image(path, source)          -> PIL.Image in 8-bit "RGB": the pixels the model sees
    check_image_size(path, w, h, src) -> refuse a record whose width/height differ from the file

Mode policy (``to_rgb``; every mode of Pillow 13's ``Image.MODES`` is handled, any other is refused):

* ``RGB`` as is; ``1``, ``L``, ``P``, ``RGBX``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``: Pillow's own
  conversion to RGB.
* integer modes wider than 8 bits (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``): values clipped
  to 0..65535, then scaled to 0..255 (``round(v * 255 / 65535)``), grey. Pillow's plain conversion
  clips instead, which turns a typical 16-bit image almost entirely white.
* ``F`` (float): when every finite value lies in [0, 1] (max <= 1) the values are scaled by 255,
  otherwise they are clipped to 0..255 as they are; NaN counts as 0.
* alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, and any image whose file declares a transparency
  colour or palette entry, e.g. PNG ``tRNS``): composited onto :data:`BACKGROUND` (white).
* multi-frame files (GIF, TIFF, ...): the first frame.
* 16-bit-per-channel RGB(A) PNGs are reduced to 8 bits by Pillow's decoder itself (they open as
  ``RGB`` / ``RGBA``).

EXIF orientation: the STORED pixels are used, never rotated; annotations (``width``, ``height``,
coordinates) refer to the stored pixels, as in COCO. An image whose EXIF ``Orientation`` tag would
rotate or flip it (values 2..8) is logged ONCE per file per process (logger ``src.data.images``,
level WARNING), naming the file and the tag.

A missing, unreadable or unconvertible file is a :class:`DataError` naming the record (``file:line``).
No torch / transformers here.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from src.data.contract import DataError, Record

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)  # RGB that transparent pixels are composited onto (white)
WIDE_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # integer modes wider than 8 bits
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
PIL_CONVERTED_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"})
SUPPORTED_MODES = WIDE_INT_MODES | ALPHA_MODES | PIL_CONVERTED_MODES | {"F"}
ORIENTATION_TAG = 0x0112  # EXIF "Orientation"
ORIENTATIONS = {  # EXIF Orientation value -> what a viewer would do to the stored pixels
    2: "mirror left-right", 3: "rotate 180", 4: "mirror top-bottom", 5: "mirror + rotate 90 counter-clockwise",
    6: "rotate 90 clockwise", 7: "mirror + rotate 90 clockwise", 8: "rotate 90 counter-clockwise",
}
_orientation_warned: set[str] = set()  # files already warned about in this process


class UnsupportedModeError(ValueError):
    """An image mode :func:`to_rgb` has no rule for (``mode``: the PIL mode string)."""

    def __init__(self, mode: str) -> None:
        super().__init__(f"image mode {mode!r} cannot be converted to RGB")
        self.mode = mode


# ------------------------------------------------------------------------------------------ modes


def _wide_int_to_l(image) -> "np.ndarray":
    """``[H, W]`` uint8 from an integer image of up to 16 bits: clip to 0..65535, scale to 0..255."""
    v = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)  # round half up


def _float_to_l(image) -> "np.ndarray":
    """``[H, W]`` uint8 from a float image: values in [0, 1] scaled by 255, otherwise clipped; NaN -> 0."""
    v = np.asarray(image, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size and finite.max() <= 1.0:
        v = v * 255.0
    v = np.nan_to_num(v, nan=0.0, posinf=255.0, neginf=0.0)
    return np.floor(np.clip(v, 0.0, 255.0) + 0.5).astype(np.uint8)


def _composite(rgba):
    """An ``RGBA`` image composited onto :data:`BACKGROUND`; returns ``RGB``."""
    from PIL import Image

    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image):
    """The 8-bit ``RGB`` image the model sees, from any supported PIL mode (module docstring: the
    policy). Raises :class:`UnsupportedModeError` for a mode outside :data:`SUPPORTED_MODES`."""
    from PIL import Image

    mode = image.mode
    if mode not in SUPPORTED_MODES:
        raise UnsupportedModeError(mode)
    transparency = image.info.get("transparency")
    if mode in WIDE_INT_MODES or mode == "F":
        grey = _wide_int_to_l(image) if mode != "F" else _float_to_l(image)
        l_image = Image.fromarray(grey)
        if transparency is None or mode == "F":
            return l_image.convert("RGB")
        # a transparency colour of a 16-bit greyscale file is in the file's own 16-bit units
        alpha = Image.fromarray(np.where(np.asarray(image) == transparency, 0, 255).astype(np.uint8))
        return _composite(Image.merge("RGBA", (l_image, l_image, l_image, alpha)))
    if mode in ALPHA_MODES or transparency is not None:
        if mode == "La":  # Pillow converts premultiplied La only to LA
            image = image.convert("LA")
        return _composite(image.convert("RGBA"))
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------- EXIF


def orientation(image) -> int:
    """The EXIF ``Orientation`` value of an opened image (1 = as stored, also when there is none)."""
    return int(image.getexif().get(ORIENTATION_TAG, 1))


def _warn_orientation_once(image, path: Path) -> None:
    """Log once per file per process when its EXIF orientation would rotate/flip it (we do not)."""
    value = orientation(image)
    key = str(Path(path).resolve())
    if value in ORIENTATIONS and key not in _orientation_warned:
        _orientation_warned.add(key)
        logger.warning(
            "%s: EXIF Orientation=%d (%s) is NOT applied: the stored pixels are used and the annotations must "
            "refer to them (COCO convention); rotate the file and its annotations together if that is wrong",
            path, value, ORIENTATIONS[value],
        )


# ------------------------------------------------------------------------------------------ files


def _where(source: str) -> str:
    return f"{source}: " if source else ""


@contextmanager
def _opened(path: Path, source: str) -> Iterator:
    """``PIL.Image.open(path)`` as a context; a missing or unreadable file (header or pixel data) is a
    :class:`DataError` naming ``source``."""
    from PIL import Image, UnidentifiedImageError

    where = _where(source)
    try:
        with Image.open(path) as im:
            yield im
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{where}image file not found: {path}") from None
    except UnsupportedModeError as e:
        raise DataError(f"{where}image {path} has mode {e.mode!r}, which has no RGB rule; save it as 8-bit RGB") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}cannot read image {path} ({msg}); replace the file or remove the line") from None


def load_image(path: Path, source: str = "", header_only: bool = False):
    """Open an image as 8-bit ``RGB`` (:func:`to_rgb`; first frame; stored pixels, EXIF orientation
    not applied). ``header_only``: parse the header only and return None (a cheap check). A missing,
    unreadable or unconvertible file is a :class:`DataError` naming the record (``source``)."""
    with _opened(Path(path), source) as im:
        if header_only:
            return None
        im.load()
        _warn_orientation_once(im, Path(path))
        return to_rgb(im)


def require_size(size: tuple[int, int], width: int, height: int, path: Path, source: str) -> None:
    """Refuse a record whose ``width``/``height`` differ from the image's stored ``size`` ``(w, h)``
    (the targets would be scaled wrongly without a word)."""
    if tuple(size) != (width, height):
        raise DataError(
            f"{_where(source)}the record says {width}x{height} (width x height) but {path} is {size[0]}x{size[1]} "
            "(stored pixels, EXIF orientation not applied); fix the record's width/height or the image"
        )


def check_image_size(path: Path, width: int, height: int, source: str = "") -> None:
    """Open only the image header (no pixel decoding) and :func:`require_size`."""
    with _opened(Path(path), source) as im:
        size = im.size
    require_size(size, width, height, path, source)


def check_record_images(records: Iterable[Record]) -> None:
    """Every record's image opens and has the record's ``width`` x ``height`` (headers only)."""
    for r in records:
        check_image_size(r.image, r.width, r.height, r.source)
