"""The JSONL data contract (SPEC §2): one image per line.

    {"images": ["imgs/0001.png"], "width": 640, "height": 480,
     "objects": [{"desc": "cat", "bbox_2d": [10, 20, 200, 300]},
                 {"desc": "red triangle", "poly": [5, 5, 60, 5, 30, 50]}],
     "coords": "pixel", "metadata": {...}, "summary": "..."}

* ``images``: exactly one path, relative paths resolved against the JSONL file's folder.
* ``objects``: each with a non-empty ``desc`` and exactly one geometry, ``bbox_2d`` = [x1, y1, x2, y2]
  or ``poly`` = flat [x1, y1, ..., xn, yn] (even length, >= 6 values).
* How coordinate values are read — one explicit rule, never guessed:
  - strings ``"<|coord_k|>"`` are always bins 0..999;
  - numbers are pixels unless the record says ``"coords": "bins"``, then they are ints 0..999;
  - one geometry never mixes strings and numbers.
  Pixels must lie inside the image (0 <= x <= width, 0 <= y <= height) and are quantized with the
  one codec (:mod:`src.data.coords`).
* An image with zero objects is valid (its answer is ``{}``).
* ``desc`` is stored NFC-normalised (Qwen's tokenizer normalises to NFC, so text and tokens agree).
* Optional ``eval``: evaluation-only ground truth from a source annotation file (crowd regions, source
  boxes and areas, LVIS image-level fields), validated by :mod:`src.data.eval_fields`. Training never
  reads it; ``load_jsonl(..., keep_eval=False)`` validates it and then drops it.

Every problem raises :class:`DataError` naming the file and the 1-based line. With
``on_invalid="skip"`` bad lines are skipped and counted instead (``LoadStats``), never silently.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from src.data.coords import MAX_BIN, fix_box_bins, parse_coord_token, pixels_to_bins
from src.data.eval_fields import EvalFieldError, EvalInfo, is_number, parse_eval_info
from src.data.objects import GEOMETRIES, DetObject, control_text_in

RECORD_KEYS = {"images", "width", "height", "objects", "coords", "metadata", "summary", "id", "eval"}
OBJECT_KEYS = {"desc", *GEOMETRIES}


class DataError(ValueError):
    """A record breaks the data contract. The message starts with ``file:line:``."""


@dataclass(frozen=True)
class Record:
    """One validated training/eval sample. ``objects`` are in bins and in file order."""

    image: Path
    width: int
    height: int
    objects: tuple[DetObject, ...]
    source: str  # "file:line"
    pixel_objects: tuple[tuple[float, ...], ...] | None = None  # original pixel coords (same order) when given in pixels
    metadata: dict | None = None
    id: str | None = None
    eval: EvalInfo | None = None  # evaluation-only ground truth (src.data.eval_fields); never a training object


@dataclass
class LoadStats:
    lines: int = 0
    records: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)


def _fail(where: str, msg: str) -> DataError:
    return DataError(f"{where}: {msg}")


def parse_geometry(values: Any, geometry: str, width: int, height: int, coords: str, where: str) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """Validate one geometry list; return (bins, pixels or None)."""
    if not isinstance(values, list) or not values:
        raise _fail(where, f"'{geometry}' must be a non-empty flat list of coordinates")
    if geometry == "bbox_2d" and len(values) != 4:
        raise _fail(where, f"'bbox_2d' needs exactly 4 values [x1, y1, x2, y2], got {len(values)}")
    if geometry == "poly" and (len(values) % 2 or len(values) < 6):
        raise _fail(where, f"'poly' needs an even number (>= 6) of flat values [x1, y1, x2, y2, ...], got {len(values)}")
    if all(isinstance(v, str) for v in values):
        bins = []
        for v in values:
            k = parse_coord_token(v)
            if k is None:
                raise _fail(where, f"{v!r} is not a coord token <|coord_0|>..<|coord_{MAX_BIN}|>")
            bins.append(k)
        return _check_bins(tuple(bins), geometry, where), None
    if not all(is_number(v) for v in values):
        raise _fail(where, f"'{geometry}' mixes strings and numbers or holds non-finite values: {values!r}")
    if coords == "bins":
        if not all(isinstance(v, int) and 0 <= v <= MAX_BIN for v in values):
            raise _fail(where, f"record says \"coords\": \"bins\" but '{geometry}' holds values that are not ints 0..{MAX_BIN}: {values!r}")
        return _check_bins(tuple(values), geometry, where), None
    for i, v in enumerate(values):
        limit = width if i % 2 == 0 else height
        if not 0 <= v <= limit:
            axis = "x" if i % 2 == 0 else "y"
            raise _fail(where, f"{axis}={v} lies outside the image (0..{limit}); fix the annotation or the record's width/height")
    if geometry == "bbox_2d" and not (values[2] > values[0] and values[3] > values[1]):
        raise _fail(where, f"'bbox_2d' {values!r} needs x2 > x1 and y2 > y1")
    return pixels_to_bins(values, width, height, geometry), tuple(float(v) for v in values)


def _check_bins(bins: tuple[int, ...], geometry: str, where: str) -> tuple[int, ...]:
    if geometry == "bbox_2d":
        if not (bins[2] > bins[0] and bins[3] > bins[1]):
            raise _fail(where, f"'bbox_2d' bins {list(bins)} need x2 > x1 and y2 > y1")
        return fix_box_bins(bins)
    return bins


def parse_object(o: Any, width: int, height: int, coords: str, where: str) -> tuple[DetObject, tuple[float, ...] | None]:
    """Validate one object of an image ``width`` x ``height`` (raises :class:`DataError` starting with
    ``where``): the object in bins, and its pixel coordinates (None when given as bins / coord tokens)."""
    if not isinstance(o, dict):
        raise _fail(where, "each object must be a JSON object")
    unknown = set(o) - OBJECT_KEYS
    if unknown:
        raise _fail(where, f"unknown object key(s) {sorted(unknown)}; an object has 'desc' and one of 'bbox_2d' / 'poly'")
    desc = o.get("desc")
    if not isinstance(desc, str) or not desc.strip():
        raise _fail(where, "'desc' must be a non-empty string")
    if (token := control_text_in(desc)) is not None:
        raise _fail(where, f"'desc' {desc!r} contains {token!r}, the text of a tokenizer control token (it would be "
                    "encoded as that token, not as text); remove or rewrite it")
    geoms = [g for g in GEOMETRIES if g in o]
    if len(geoms) != 1:
        raise _fail(where, f"needs exactly one geometry ('bbox_2d' or 'poly'), found {geoms or 'none'}")
    bins, px = parse_geometry(o[geoms[0]], geoms[0], width, height, coords, where)
    desc = unicodedata.normalize("NFC", desc)  # the Qwen tokenizer normalises to NFC; keep text and tokens in step
    return DetObject(desc=desc, geometry=geoms[0], bins=bins), px  # type: ignore[arg-type]


def parse_record(obj: Any, base_dir: Path, where: str, check_image: bool = True, keep_eval: bool = True) -> Record:
    """Validate one decoded JSON line into a :class:`Record` (raises :class:`DataError`). ``keep_eval``:
    keep the validated ``eval`` value on the record (False: validate it, then drop it)."""
    if not isinstance(obj, dict):
        raise _fail(where, f"each line must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - RECORD_KEYS
    if unknown:
        raise _fail(where, f"unknown record key(s) {sorted(unknown)}; allowed: {sorted(RECORD_KEYS)}")
    for key in ("images", "width", "height", "objects"):
        if key not in obj:
            raise _fail(where, f"missing required key '{key}'")
    images = obj["images"]
    if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], str) and images[0]):
        raise _fail(where, f"'images' must be a list with exactly one path, got {images!r}")
    width, height = obj["width"], obj["height"]
    for name, v in (("width", width), ("height", height)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 2):
            raise _fail(where, f"'{name}' must be an int >= 2, got {v!r}")
    coords = obj.get("coords", "pixel")
    if coords not in ("pixel", "bins"):
        raise _fail(where, f"'coords' must be \"pixel\" or \"bins\", got {coords!r}")
    if not isinstance(obj["objects"], list):
        raise _fail(where, "'objects' must be a list (use [] for an image with no objects)")
    image = Path(images[0])
    if not image.is_absolute():
        image = base_dir / image
    if check_image and not image.is_file():
        raise _fail(where, f"image file not found: {image} (paths are relative to the JSONL's folder)")
    objects, pixels = [], []
    for j, o in enumerate(obj["objects"]):
        det, px = parse_object(o, width, height, coords, f"{where}: objects[{j}]")
        objects.append(det)
        pixels.append(px)
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _fail(where, "'metadata' must be an object when present")
    rid = obj.get("id")
    eval_info = None
    if "eval" in obj:
        try:
            eval_info = parse_eval_info(obj["eval"], len(objects))
        except EvalFieldError as e:
            raise _fail(where, str(e)) from None
    return Record(
        image=image, width=width, height=height, objects=tuple(objects), source=where,
        pixel_objects=tuple(pixels) if pixels and all(p is not None for p in pixels) else None,
        metadata=metadata, id=str(rid) if rid is not None else None, eval=eval_info if keep_eval else None,
    )


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any | DataError]]:
    """Yield ``(line_no, decoded JSON)`` for each non-blank line; a malformed line yields a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})")


def load_jsonl(path: str | Path, on_invalid: str = "error", check_images: bool = True, limit: int | None = None,
               keep_eval: bool = True) -> tuple[list[Record], LoadStats]:
    """Load and validate a whole JSONL. ``on_invalid``: ``error`` (raise at the first bad line) or
    ``skip`` (skip it and count it in the returned stats). ``keep_eval=False`` drops the validated
    ``eval`` values (training has no use for them)."""
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    path = Path(path)
    records, stats = [], LoadStats()
    for n, obj in iter_jsonl(path):
        stats.lines += 1
        try:
            if isinstance(obj, DataError):
                raise obj
            records.append(parse_record(obj, path.parent, f"{path}:{n}", check_images, keep_eval))
        except DataError as e:
            if on_invalid == "error":
                raise
            stats.skipped += 1
            stats.skip_reasons.append(str(e))
        if limit is not None and len(records) >= limit:
            break
    stats.records = len(records)
    return records, stats
