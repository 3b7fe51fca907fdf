"""The optional ``eval`` key of a record: what evaluation needs from the source annotation file and
training ignores.

A converted COCO / LVIS / ODVG record carries, next to its training ``objects``, the ground truth as
the field's official tools read it (``python -m src.data.convert`` writes it, ``python -m src.infer``
copies it to each predictions line, ``python -m src.eval`` scores with it)::

    "eval": {
      "image_id": 139,                                  # the source file's image id (int)
      "objects": [{"bbox": [x, y, w, h], "area": 531.2},              # 1:1 with the record's objects
                  {"bbox": [...], "area": ..., "segmentation": [[x1, y1, ...], [...]]}],
      "crowd":   [{"desc": "person", "bbox": [...], "area": ..., "segmentation": {"size": [h, w], "counts": ...}}],
      "skipped": [{"desc": "kite", "bbox": [...], "area": 0.0, "reason": "zero_size"}],
      "neg_categories": ["aerosol_can"],                # LVIS only (federated evaluation)
      "not_exhaustive_categories": ["person"],
      "frequency": {"person": "f"}                      # LVIS: frequency group of each category with GT here
    }

* ``bbox`` is the source's ``[x, y, w, h]`` in pixels (unclipped), ``area`` the source's ``area``: what
  COCOeval matches boxes with and buckets sizes by.
* ``segmentation`` (polygons or RLE, exactly as in the source) only where the training geometry does
  not reproduce the source mask (several polygon parts, RLE, clipped, box fallback). A region without
  it is its ``poly`` (objects) or its box.
* ``crowd``: ``iscrowd: 1`` annotations: never training objects; COCOeval ignore regions.
* ``skipped``: other source annotations that are not training objects (``reason``: ``zero_size``,
  ``outside_image``, ``max_objects``). They stay ground truth for evaluation, as in the source file.

Every key is optional; unknown keys are errors. ``desc`` and category names are stored NFC-normalised.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any

EVAL_KEYS = {"image_id", "objects", "crowd", "skipped", "neg_categories", "not_exhaustive_categories", "frequency"}
REGION_KEYS = {"bbox", "area", "segmentation"}
SKIP_REASONS = ("zero_size", "outside_image", "max_objects")
FREQUENCIES = ("r", "c", "f")  # LVIS: rare, common, frequent


class EvalFieldError(ValueError):
    """The ``eval`` value breaks its contract; the message says where inside it (no file:line)."""


@dataclass(frozen=True)
class EvalRegion:
    """One ground-truth annotation as COCOeval reads it. ``bbox`` = ``(x, y, w, h)`` in pixels;
    ``segmentation``: source polygons ``[[x1, y1, ...], ...]`` or an RLE dict, or None (use the
    object's own geometry, or this box)."""

    bbox: tuple[float, float, float, float]
    area: float
    segmentation: Any = None
    desc: str | None = None  # crowd / skipped regions only (objects take the record object's desc)
    reason: str | None = None  # skipped regions only

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.desc is None else {"desc": self.desc}
        out.update(bbox=list(self.bbox), area=self.area)
        if self.segmentation is not None:
            out["segmentation"] = self.segmentation
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class EvalInfo:
    """The validated ``eval`` value of one record (see the module docstring)."""

    image_id: int | None = None
    objects: tuple[EvalRegion, ...] | None = None  # None: derive from the record's objects
    crowd: tuple[EvalRegion, ...] = ()
    skipped: tuple[EvalRegion, ...] = ()
    neg_categories: tuple[str, ...] | None = None  # None: not an LVIS (federated) record
    not_exhaustive_categories: tuple[str, ...] = ()
    frequency: dict[str, str] = field(default_factory=dict)

    @property
    def federated(self) -> bool:
        return self.neg_categories is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.image_id is not None:
            out["image_id"] = self.image_id
        if self.objects is not None:
            out["objects"] = [r.to_json() for r in self.objects]
        if self.crowd:
            out["crowd"] = [r.to_json() for r in self.crowd]
        if self.skipped:
            out["skipped"] = [r.to_json() for r in self.skipped]
        if self.neg_categories is not None:
            out["neg_categories"] = list(self.neg_categories)
            out["not_exhaustive_categories"] = list(self.not_exhaustive_categories)
        if self.frequency:
            out["frequency"] = dict(self.frequency)
        return out


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): what a coordinate or an area may be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nfc(s: Any, where: str) -> str:
    if not isinstance(s, str) or not s.strip():
        raise EvalFieldError(f"{where}: must be a non-empty string, got {s!r}")
    return unicodedata.normalize("NFC", s)


def check_segmentation(seg: Any, where: str) -> Any:
    """Polygons (a non-empty list of flat ``[x1, y1, ...]`` lists, each even and >= 4 values, as
    pycocotools accepts them) or RLE (``{"size": [h, w], "counts": str | [ints]}``). Returned as given."""
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if set(seg) != {"size", "counts"} or not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
            raise EvalFieldError(f"{where}: an RLE segmentation is {{\"size\": [h, w], \"counts\": ...}}, got keys {sorted(seg)}")
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(type(v) is int and v >= 0 for v in counts))):
            raise EvalFieldError(f"{where}: RLE 'counts' must be a string or a list of ints >= 0")
        return seg
    if not isinstance(seg, list) or not seg:
        raise EvalFieldError(f"{where}: 'segmentation' must be a list of polygons or an RLE object")
    for i, part in enumerate(seg):
        if not (isinstance(part, list) and len(part) >= 4 and len(part) % 2 == 0 and all(is_number(v) for v in part)):
            raise EvalFieldError(f"{where}: polygon {i} must be a flat list of an even number (>= 4) of finite numbers")
    return seg


def _check_keys(obj: Any, allowed: set[str], where: str) -> None:
    """``obj`` is a JSON object whose keys are all in ``allowed``."""
    if not isinstance(obj, dict):
        raise EvalFieldError(f"{where}: must be an object with keys among {sorted(allowed)}, got {type(obj).__name__}")
    unknown = set(obj) - allowed
    if unknown:
        raise EvalFieldError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def parse_region(obj: Any, where: str, kind: str) -> EvalRegion:
    """One region; ``kind`` is ``objects`` (no desc), ``crowd`` (desc) or ``skipped`` (desc, reason)."""
    allowed = REGION_KEYS | ({"desc"} if kind != "objects" else set()) | ({"reason"} if kind == "skipped" else set())
    _check_keys(obj, allowed, where)
    bbox = obj.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        raise EvalFieldError(f"{where}: 'bbox' must be [x, y, w, h] (4 finite numbers), got {bbox!r}")
    area = obj.get("area")
    if not is_number(area) or area < 0:
        raise EvalFieldError(f"{where}: 'area' must be a finite number >= 0, got {area!r}")
    seg = check_segmentation(obj["segmentation"], where) if "segmentation" in obj else None
    desc = _nfc(obj.get("desc"), f"{where}: 'desc'") if kind != "objects" else None
    reason = obj.get("reason") if kind == "skipped" else None
    if kind == "skipped" and reason not in SKIP_REASONS:
        raise EvalFieldError(f"{where}: 'reason' must be one of {list(SKIP_REASONS)}, got {reason!r}")
    return EvalRegion(bbox=tuple(bbox), area=area, segmentation=seg, desc=desc, reason=reason)  # type: ignore[arg-type]


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise EvalFieldError(f"{where}: must be a list of category names")
    return tuple(_nfc(v, f"{where}[{i}]") for i, v in enumerate(value))


def parse_eval_info(obj: Any, num_objects: int) -> EvalInfo:
    """Validate a record's ``eval`` value (``num_objects``: the record's object count, which
    ``eval.objects`` must equal). Raises :class:`EvalFieldError` naming the place inside ``eval``."""
    _check_keys(obj, EVAL_KEYS, "eval")
    image_id = obj.get("image_id")
    if image_id is not None and type(image_id) is not int:
        raise EvalFieldError(f"'eval.image_id' must be an int, got {image_id!r}")
    lists = {}
    for kind in ("objects", "crowd", "skipped"):
        value = obj.get(kind)
        if value is not None and not isinstance(value, list):
            raise EvalFieldError(f"'eval.{kind}' must be a list")
        lists[kind] = None if value is None else tuple(parse_region(r, f"eval.{kind}[{i}]", kind) for i, r in enumerate(value))
    if lists["objects"] is not None and len(lists["objects"]) != num_objects:
        raise EvalFieldError(f"'eval.objects' has {len(lists['objects'])} entries but the record has {num_objects} objects (they pair up 1:1)")
    has_neg, has_nel = "neg_categories" in obj, "not_exhaustive_categories" in obj
    if has_neg != has_nel:
        raise EvalFieldError("'eval.neg_categories' and 'eval.not_exhaustive_categories' come together (LVIS federated evaluation)")
    frequency = obj.get("frequency", {})
    if not isinstance(frequency, dict) or not all(v in FREQUENCIES for v in frequency.values()):
        raise EvalFieldError(f"'eval.frequency' must map category names to one of {list(FREQUENCIES)}")
    return EvalInfo(
        image_id=image_id, objects=lists["objects"], crowd=lists["crowd"] or (), skipped=lists["skipped"] or (),
        neg_categories=_names(obj["neg_categories"], "eval.neg_categories") if has_neg else None,
        not_exhaustive_categories=_names(obj["not_exhaustive_categories"], "eval.not_exhaustive_categories") if has_nel else (),
        frequency={_nfc(k, "eval.frequency key"): v for k, v in frequency.items()},
    )
