"""COCO ``instances_*.json`` -> :class:`SourceImage` values (``python -m src.data.convert coco``).

Reads ``images`` (``id``, ``file_name``, ``width``, ``height``), ``categories`` (``id``, ``name``) and
``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``area``, ``iscrowd``,
``segmentation``). Images come out in file order, each with its annotations in file order; the image
file is ``--images`` / ``file_name``. The LVIS reader (:mod:`.lvis`) reuses everything here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from src.data.convert.common import (
    Category, ConvertCounts, ConvertError, SourceAnnotation, SourceImage, check_image_file, check_unique_descs,
    image_size, is_number, load_json, nfc_desc,
)


def top_level(data: Any, path: Path) -> tuple[list, list, list]:
    """``images``, ``annotations``, ``categories`` of a COCO-style file."""
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    lists = []
    for key in ("images", "annotations", "categories"):
        value = data.get(key)
        if not isinstance(value, list):
            raise ConvertError(f"{path}: '{key}' must be a list (a COCO annotation file has 'images', 'annotations', 'categories')")
        lists.append(value)
    return lists[0], lists[1], lists[2]


def read_categories(cats: list, path: Path) -> dict[int, Category]:
    """Category id -> :class:`Category` (``desc`` = NFC name; LVIS' ``frequency`` kept when present)."""
    out: dict[int, Category] = {}
    for i, c in enumerate(cats):
        where = f"{path}: categories[{i}]"
        if not isinstance(c, dict) or type(c.get("id")) is not int:
            raise ConvertError(f"{where}: needs an int 'id' and a 'name'")
        if c["id"] in out:
            raise ConvertError(f"{where}: category id {c['id']} appears twice")
        freq = c.get("frequency")
        out[c["id"]] = Category(id=c["id"], name=c.get("name"), desc=nfc_desc(c.get("name"), where),
                                frequency=freq if freq in ("r", "c", "f") else None)
    check_unique_descs(out.values(), f"{path}: categories")
    return out


def read_annotation(a: Any, i: int, path: Path, cats: dict[int, Category]) -> tuple[int, SourceAnnotation, bool]:
    """(image id, the annotation, whether its area was missing) of ``annotations[i]``."""
    where = f"{path}: annotations[{i}]"
    if not isinstance(a, dict):
        raise ConvertError(f"{where}: must be an object")
    where += f" (id {a.get('id')})"
    if type(a.get("image_id")) is not int:
        raise ConvertError(f"{where}: 'image_id' must be an int, got {a.get('image_id')!r}")
    cat = cats.get(a.get("category_id"))  # type: ignore[arg-type]
    if cat is None:
        raise ConvertError(f"{where}: category_id {a.get('category_id')!r} is not in 'categories'")
    bbox = a.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        raise ConvertError(f"{where}: 'bbox' must be [x, y, w, h] (4 finite numbers), got {bbox!r}")
    area = a.get("area")
    missing_area = area is None
    if missing_area:
        area = bbox[2] * bbox[3]
    elif not (is_number(area) and area >= 0):
        raise ConvertError(f"{where}: 'area' must be a number >= 0, got {area!r}")
    crowd = a.get("iscrowd", 0)
    if crowd not in (0, 1):
        raise ConvertError(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
    ann = SourceAnnotation(desc=cat.desc, bbox=bbox, area=area, iscrowd=bool(crowd), segmentation=a.get("segmentation"), where=where)
    return a["image_id"], ann, missing_area


def file_name_of(img: dict, where: str) -> str:
    """COCO: ``file_name``."""
    name = img.get("file_name")
    if not isinstance(name, str) or not name:
        raise ConvertError(f"{where}: 'file_name' must be a non-empty string")
    return name


def read_source(path: Path, images_dir: Path, counts: ConvertCounts,
                file_name: Callable[[dict, str], str] = file_name_of,
                extra: Callable[[SourceImage, dict, dict[int, Category]], None] | None = None,
                ) -> tuple[list[SourceImage], list[Category]]:
    """Every image of a COCO-style file with its annotations, and the categories by id.
    ``file_name(img, where)`` names the image file; ``extra(source_image, img, categories)`` adds
    format-specific image fields (LVIS)."""
    images, anns, cats_list = top_level(load_json(path), path)
    cats = read_categories(cats_list, path)
    by_id: dict[int, SourceImage] = {}
    out: list[SourceImage] = []
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict) or type(img.get("id")) is not int:
            raise ConvertError(f"{where}: needs an int 'id'")
        where += f" (id {img['id']})"
        if img["id"] in by_id:
            raise ConvertError(f"{where}: image id {img['id']} appears twice")
        width, height = image_size(img, where)
        file = images_dir / file_name(img, where)
        src = SourceImage(image_id=img["id"], file=file, width=width, height=height, annotations=[], where=where)
        if extra is not None:
            extra(src, img, cats)
        by_id[img["id"]] = src
        out.append(src)
    for i, a in enumerate(anns):
        image_id, ann, missing_area = read_annotation(a, i, path, cats)
        if image_id not in by_id:
            raise ConvertError(f"{ann.where}: image_id {image_id} is not in 'images'")
        counts.area_from_bbox += missing_area
        by_id[image_id].annotations.append(ann)
    return out, sorted(cats.values(), key=lambda c: c.id)


def checked_files(images: list[SourceImage]) -> Iterator[SourceImage]:
    """The images, each after checking that its file exists (lazily, as the writer consumes them)."""
    for img in images:
        check_image_file(img.file, img.where)
        yield img
