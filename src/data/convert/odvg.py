"""ODVG grounding-detection JSONL -> :class:`SourceImage` values (``python -m src.data.convert odvg``).

One JSON object per line (the detection flavour of the ODVG format)::

    {"filename": "000000391895.jpg", "height": 360, "width": 640,
     "detection": {"instances": [{"bbox": [x1, y1, x2, y2], "label": 3, "category": "motorcycle"}, ...]}}

``bbox`` is ``[x1, y1, x2, y2]`` in pixels; ``label`` the category id and ``category`` its name (one
name per label, one label per name, or the file is refused). ODVG has no crowd flag, no area and no
masks: the area is the box's, boxes only. The image id (and record id) is the 1-based line number.
Lines without ``detection`` (grounding-only records) are refused: they have no category boxes.
"""

from __future__ import annotations

import json
from pathlib import Path

from src.data.convert.common import (
    Category, ConvertCounts, ConvertError, SourceAnnotation, SourceImage, check_unique_descs, image_size, is_number,
    nfc_desc,
)


def read_instance(inst: object, where: str, labels: dict[int, Category]) -> SourceAnnotation:
    """One ``detection.instances`` entry; registers its (label, category) pair in ``labels``."""
    if not isinstance(inst, dict):
        raise ConvertError(f"{where}: must be an object with 'bbox', 'label', 'category'")
    bbox = inst.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        raise ConvertError(f"{where}: 'bbox' must be [x1, y1, x2, y2] (4 finite numbers), got {bbox!r}")
    label = inst.get("label")
    if type(label) is not int:
        raise ConvertError(f"{where}: 'label' must be an int category id, got {label!r}")
    desc = nfc_desc(inst.get("category"), f"{where}: 'category'")
    known = labels.get(label)
    if known is None:
        labels[label] = Category(id=label, name=inst["category"], desc=desc)
    elif known.desc != desc:
        raise ConvertError(f"{where}: label {label} is named {desc!r} here but {known.desc!r} before; one label, one category")
    x1, y1, x2, y2 = bbox
    w, h = x2 - x1, y2 - y1
    return SourceAnnotation(desc=desc, bbox=[x1, y1, w, h], area=max(w, 0) * max(h, 0), iscrowd=False, segmentation=None, where=where)


def read_odvg(path: Path, images_dir: Path, counts: ConvertCounts) -> tuple[list[SourceImage], list[Category]]:
    """Every line of an ODVG detection JSONL as a :class:`SourceImage`, and the categories by label."""
    if not path.is_file():
        raise ConvertError(f"{path}: annotation file not found")
    labels: dict[int, Category] = {}
    out: list[SourceImage] = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ConvertError(f"{where}: each line must be a JSON object")
        det = rec.get("detection")
        if not isinstance(det, dict) or not isinstance(det.get("instances"), list):
            raise ConvertError(f"{where}: needs 'detection': {{'instances': [...]}} (grounding-only lines are not detection data)")
        name = rec.get("filename")
        if not isinstance(name, str) or not name:
            raise ConvertError(f"{where}: 'filename' must be a non-empty string")
        width, height = image_size(rec, where)
        anns = [read_instance(inst, f"{where}: detection.instances[{j}]", labels) for j, inst in enumerate(det["instances"])]
        out.append(SourceImage(image_id=n, file=images_dir / name, width=width, height=height, annotations=anns, where=where))
    check_unique_descs(labels.values(), f"{path}: labels")
    return out, sorted(labels.values(), key=lambda c: c.id)
