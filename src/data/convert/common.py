"""What every converter shares: the normalised source image, one record per image, the edge-case
policy, the counts, and the atomic writing of ``OUT.jsonl`` + ``OUT.categories.json``.

A format module (``coco``, ``lvis``, ``odvg``) only reads its file into :class:`SourceImage` values
and a category table; :func:`build_record` turns each into a data-contract record (pixels, boxes kept
exactly as the source has them unless clipped) and :func:`write_dataset` validates every record
through the contract and writes the files. No torch, no transformers here.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from src.data.contract import DataError, Record, parse_record
from src.data.coords import clip_polygon
from src.data.eval_fields import EvalFieldError, check_segmentation, is_number
from src.utils.files import atomic_path


class ConvertError(DataError):
    """Bad source input; ``str(e)`` is one line naming the file and the place in it."""


# ------------------------------------------------------------------------------------ the source


@dataclass(frozen=True)
class Category:
    """One source category: its id, its name, its ``desc`` (the NFC name) and LVIS' frequency."""

    id: int
    name: str
    desc: str
    frequency: str | None = None


@dataclass(frozen=True)
class SourceAnnotation:
    """One source annotation. ``bbox`` = ``[x, y, w, h]`` in pixels exactly as in the source; ``area``
    the source's area; ``segmentation`` the source's polygons / RLE (None when it has none)."""

    desc: str
    bbox: list
    area: float
    iscrowd: bool
    segmentation: Any
    where: str  # for errors, e.g. "instances.json: annotations[12] (id 9004)"


@dataclass
class SourceImage:
    """One source image with its annotations in file order. ``neg_categories`` /
    ``not_exhaustive_categories`` / ``frequency``: LVIS' image-level fields (None otherwise)."""

    image_id: int
    file: Path
    width: int
    height: int
    annotations: list[SourceAnnotation]
    where: str
    neg_categories: list[str] | None = None
    not_exhaustive_categories: list[str] | None = None
    frequency: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConvertOptions:
    """``geometry``: ``bbox`` or ``poly`` (training objects); ``max_objects``: keep at most this many
    training objects per image (the largest by source area; None = all)."""

    out: Path
    geometry: str = "bbox"
    max_objects: int | None = None


@dataclass
class ConvertCounts:
    """Edge cases met while converting (each object counted once per counter)."""

    images: int = 0
    objects: int = 0
    crowd: int = 0
    clipped: int = 0  # objects reaching outside the image, clipped to it
    skipped_zero_size: int = 0  # w <= 0 or h <= 0 in the source
    skipped_outside_image: int = 0  # nothing left inside the image after clipping
    dropped_max_objects: int = 0
    multipart_polygons: int = 0  # --geometry poly: several parts, the largest kept
    rle_as_bbox: int = 0  # --geometry poly: a non-crowd RLE mask, trained as its (clipped) box
    no_polygon_as_bbox: int = 0  # --geometry poly: no segmentation or no part with >= 3 points and area > 0
    area_from_bbox: int = 0  # the source had no area: w * h used
    per_category: Counter = field(default_factory=Counter)
    objects_per_image: list[int] = field(default_factory=list)

    def edge_cases(self) -> dict[str, int]:
        """The edge-case counters by name (for the summary)."""
        return {k: getattr(self, k) for k in ("crowd", "clipped", "skipped_zero_size", "skipped_outside_image",
                                               "dropped_max_objects", "multipart_polygons", "rle_as_bbox",
                                               "no_polygon_as_bbox", "area_from_bbox")}


# ------------------------------------------------------------------------------------ reading


def load_json(path: Path) -> Any:
    """A whole JSON file; a missing file or malformed JSON is a :class:`ConvertError` with the position."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise ConvertError(f"{path}: is a directory, expected an annotation JSON file") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno}, char {e.pos})") from None
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def nfc_desc(name: Any, where: str) -> str:
    """A category name as ``desc``: NFC-normalised, non-empty."""
    if not isinstance(name, str) or not name.strip():
        raise ConvertError(f"{where}: category name must be a non-empty string, got {name!r}")
    return unicodedata.normalize("NFC", name)


def check_unique_descs(categories: Iterable[Category], where: str) -> None:
    """Two categories with one desc could not be told apart by the model or the evaluation."""
    seen: dict[str, int] = {}
    for c in categories:
        if c.desc in seen:
            raise ConvertError(f"{where}: categories {seen[c.desc]} and {c.id} are both named {c.desc!r}; rename one (a desc names one category)")
        seen[c.desc] = c.id


def image_size(img: dict, where: str) -> tuple[int, int]:
    w, h = img.get("width"), img.get("height")
    for name, v in (("width", w), ("height", h)):
        if not (type(v) is int and v >= 2):
            raise ConvertError(f"{where}: '{name}' must be an int >= 2, got {v!r}")
    return w, h  # type: ignore[return-value]


def check_image_file(path: Path, where: str) -> None:
    if not path.is_file():
        raise ConvertError(f"{where}: image file not found: {path} (check --images)")


# ------------------------------------------------------------------------------ edge-case policy


def polygon_area(flat: Sequence[float]) -> float:
    """Shoelace area of a flat ``[x1, y1, ..., xn, yn]`` polygon (pixels²)."""
    xs, ys = flat[0::2], flat[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2.0


def clip_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[list, bool]:
    """``[x1, y1, x2, y2]`` of a source ``[x, y, w, h]`` box clipped to the image, and whether clipping
    changed it. Values inside the image are kept exactly (``x2 = x + w``)."""
    box = [x, y, x + w, y + h]
    clipped = [min(max(box[0], 0), width), min(max(box[1], 0), height), min(max(box[2], 0), width), min(max(box[3], 0), height)]
    return clipped, clipped != box


def largest_polygon(segmentation: list) -> tuple[list | None, int]:
    """The part with the largest shoelace area among the parts with >= 3 points (None when none has
    area > 0), and the number of parts."""
    best, best_area = None, 0.0
    for part in segmentation:
        if isinstance(part, list) and len(part) >= 6 and len(part) % 2 == 0 and all(is_number(v) for v in part):
            a = polygon_area(part)
            if a > best_area:
                best, best_area = part, a
    return best, len(segmentation)


def training_geometry(ann: SourceAnnotation, box: list, img: SourceImage, geometry: str, counts: ConvertCounts) -> tuple[dict, bool]:
    """``{"bbox_2d": box}`` or ``{"poly": [...]}`` for a kept annotation, and whether the source mask
    must travel in ``eval`` (the training geometry does not reproduce it exactly)."""
    if geometry == "bbox":
        return {"bbox_2d": box}, False
    seg = ann.segmentation
    if isinstance(seg, dict):
        counts.rle_as_bbox += 1
        return {"bbox_2d": box}, True
    part, parts = largest_polygon(seg) if isinstance(seg, list) else (None, 0)
    if part is not None:
        poly, moved = clip_polygon(part, img.width, img.height)
        if polygon_area(poly) > 0:
            counts.multipart_polygons += parts > 1
            counts.clipped += moved
            return {"poly": poly}, parts > 1 or moved
    counts.no_polygon_as_bbox += 1
    return {"bbox_2d": box}, seg is not None


def region(ann: SourceAnnotation, geometry: str, with_segmentation: bool, desc: bool = True, reason: str | None = None) -> dict:
    """The ``eval`` entry of one source annotation: its source box and area, its source mask when
    asked for (``--geometry poly`` only), desc and skip reason for non-object regions."""
    out: dict[str, Any] = {"desc": ann.desc} if desc else {}
    out.update(bbox=ann.bbox, area=ann.area)
    if with_segmentation and geometry == "poly" and ann.segmentation is not None:
        try:
            out["segmentation"] = check_segmentation(ann.segmentation, ann.where)
        except EvalFieldError as e:
            raise ConvertError(f"{e}; fix the annotation (pycocotools could not rasterise it either)") from None
    if reason is not None:
        out["reason"] = reason
    return out


def keep_largest(objects: list[tuple[dict, dict, SourceAnnotation]], max_objects: int | None) -> tuple[list, list]:
    """``--max-objects N``: keep the N objects with the largest source area (ties: the earlier
    annotation), in annotation order; return (kept, dropped)."""
    if max_objects is None or len(objects) <= max_objects:
        return objects, []
    order = sorted(range(len(objects)), key=lambda i: -objects[i][2].area)  # stable: earlier wins ties
    keep = set(order[:max_objects])
    return [o for i, o in enumerate(objects) if i in keep], [o for i, o in enumerate(objects) if i not in keep]


def image_path(file: Path, out_dir: Path) -> str:
    """The image path as written in the record: relative to the output file's folder where possible."""
    try:
        return os.path.relpath(os.path.abspath(file), os.path.abspath(out_dir))
    except ValueError:  # another drive (Windows): no relative path exists
        return os.path.abspath(file)


# ------------------------------------------------------------------------------------ one record


def build_record(img: SourceImage, opts: ConvertOptions, counts: ConvertCounts) -> dict:
    """The data-contract record of one source image (see docs/datasets.md for every edge case)."""
    objects: list[tuple[dict, dict, SourceAnnotation]] = []
    crowd, skipped = [], []
    for ann in img.annotations:
        if ann.iscrowd:
            counts.crowd += 1
            crowd.append(region(ann, opts.geometry, with_segmentation=True))
            continue
        x, y, w, h = ann.bbox
        if w <= 0 or h <= 0:
            counts.skipped_zero_size += 1
            skipped.append(region(ann, opts.geometry, with_segmentation=True, reason="zero_size"))
            continue
        box, clipped = clip_box(x, y, w, h, img.width, img.height)
        if box[2] <= box[0] or box[3] <= box[1]:
            counts.skipped_outside_image += 1
            skipped.append(region(ann, opts.geometry, with_segmentation=True, reason="outside_image"))
            continue
        geom, carry_mask = training_geometry(ann, box, img, opts.geometry, counts)
        counts.clipped += clipped and "bbox_2d" in geom
        objects.append(({"desc": ann.desc, **geom}, region(ann, opts.geometry, carry_mask, desc=False), ann))
    kept, dropped = keep_largest(objects, opts.max_objects)
    for _, _, ann in dropped:
        counts.dropped_max_objects += 1
        skipped.append(region(ann, opts.geometry, with_segmentation=True, reason="max_objects"))
    counts.images += 1
    counts.objects += len(kept)
    counts.objects_per_image.append(len(kept))
    counts.per_category.update(obj["desc"] for obj, _, _ in kept)

    ev: dict[str, Any] = {"image_id": img.image_id, "objects": [r for _, r, _ in kept]}
    if crowd:
        ev["crowd"] = crowd
    if skipped:
        ev["skipped"] = skipped
    if img.neg_categories is not None:
        ev["neg_categories"] = img.neg_categories
        ev["not_exhaustive_categories"] = img.not_exhaustive_categories or []
        present = {a.desc for a in img.annotations}
        ev["frequency"] = {d: f for d, f in sorted(img.frequency.items()) if d in present}
    return {
        "id": str(img.image_id), "images": [image_path(img.file, opts.out.parent)],
        "width": img.width, "height": img.height, "objects": [o for o, _, _ in kept], "eval": ev,
    }


# ------------------------------------------------------------------------------------ writing


def categories_path(out: Path) -> Path:
    """``train.jsonl`` -> ``train.categories.json`` (the id table ``src.eval --categories`` reads)."""
    return out.with_name(out.stem + ".categories.json")


def write_dataset(images: Iterable[SourceImage], categories: Sequence[Category], opts: ConvertOptions,
                  counts: ConvertCounts, on_record=None, progress_total: int | None = None) -> ConvertCounts:
    """Convert, validate through the data contract and write ``opts.out`` and its categories file, both
    atomically (temp file + rename: an error leaves neither half-written), adding to ``counts``.
    ``on_record(Record)`` sees every validated record (the summary's token counts)."""
    from tqdm import tqdm

    out = opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    cats_out = categories_path(out)
    with atomic_path(out) as tmp, atomic_path(cats_out) as cats_tmp:
        with open(tmp, "w", encoding="utf-8") as f, tqdm(total=progress_total, desc="convert", unit="img", disable=None) as bar:
            for img in images:
                rec = build_record(img, opts, counts)
                record = validated(rec, out, img.where)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                if on_record is not None:
                    on_record(record)
                bar.update(1)
        table = [{"id": c.id, "name": c.name, "desc": c.desc, **({"frequency": c.frequency} if c.frequency else {}),
                  "objects": counts.per_category.get(c.desc, 0)} for c in categories]
        rows = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in table)  # one category per line
        cats_tmp.write_text(f'{{"categories": [\n  {rows}\n]}}\n', encoding="utf-8")
    return counts


def validated(rec: dict, out: Path, where: str) -> Record:
    """The record through the data contract (the image file was checked when it was read)."""
    try:
        return parse_record(rec, out.parent, f"{where} -> record", check_image=False)
    except DataError as e:
        raise ConvertError(str(e)) from None
