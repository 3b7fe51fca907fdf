"""LVIS v1 json -> :class:`SourceImage` values (``python -m src.data.convert lvis``).

LVIS is COCO-format (:mod:`.coco` reads it) plus, per image, ``neg_category_ids`` (categories verified
absent) and ``not_exhaustive_category_ids`` (categories whose instances may be missing), and per
category a ``frequency`` (``r`` / ``c`` / ``f``). They are kept in each record's ``eval`` by name for
federated evaluation (``src.eval``'s ``lvis_*`` metrics). LVIS v1 image entries have no
``file_name``: the image file is ``--images`` / the last two parts of ``coco_url``
(``train2017/000000391895.jpg``), so ``--images`` is the COCO image root holding ``train2017/`` and
``val2017/``; a ``file_name``, when present, wins.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from src.data.convert.coco import read_source
from src.data.convert.common import Category, ConvertCounts, ConvertError, SourceImage


def lvis_file_name(img: dict, where: str) -> str:
    """``file_name`` when present, else ``<split>/<file>`` from ``coco_url``."""
    if isinstance(img.get("file_name"), str) and img["file_name"]:
        return img["file_name"]
    url = img.get("coco_url")
    parts = urlparse(url).path.strip("/").split("/") if isinstance(url, str) else []
    if len(parts) < 2:
        raise ConvertError(f"{where}: needs 'file_name' or a 'coco_url' ending in <split>/<file> to name its image file, got {url!r}")
    return "/".join(parts[-2:])


def lvis_image_fields(src: SourceImage, img: dict, cats: dict[int, Category]) -> None:
    """Map ``neg_category_ids`` / ``not_exhaustive_category_ids`` to category names on ``src``."""
    for key, attr in (("neg_category_ids", "neg_categories"), ("not_exhaustive_category_ids", "not_exhaustive_categories")):
        ids = img.get(key)
        if not isinstance(ids, list):
            raise ConvertError(f"{src.where}: LVIS needs '{key}' (a list of category ids), got {ids!r}")
        unknown = [c for c in ids if c not in cats]
        if unknown:
            raise ConvertError(f"{src.where}: '{key}' holds category id(s) {unknown[:5]} that are not in 'categories'")
        setattr(src, attr, [cats[c].desc for c in ids])


def read_lvis(path: Path, images_dir: Path, counts: ConvertCounts) -> tuple[list[SourceImage], list[Category]]:
    """Every LVIS image with its annotations and image-level fields, and the categories by id. Each
    image shares one ``frequency`` table (desc -> r / c / f); the record keeps the entries of its GT."""
    frequency: dict[str, str] = {}

    def extra(src: SourceImage, img: dict, cats: dict[int, Category]) -> None:
        if not frequency:
            frequency.update({c.desc: c.frequency for c in cats.values() if c.frequency is not None})
        lvis_image_fields(src, img, cats)
        src.frequency = frequency

    return read_source(path, images_dir, counts, file_name=lvis_file_name, extra=extra)
