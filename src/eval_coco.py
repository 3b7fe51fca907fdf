"""COCO and LVIS scoring of validated predictions lines with pycocotools (used by ``src.eval``).

One ground-truth builder feeds three consumers:

* :func:`coco_metrics` — pycocotools ``COCOeval`` (AP, AP50, AP75, AR@100, AP small / medium /
  large, AP per category);
* :func:`lvis_metrics` — LVIS' federated evaluation (:class:`FederatedCOCOeval`, maxDets 300);
* :func:`coco_results` — the predictions in the official results format.

Ground truth per image, in COCO terms (see :mod:`src.data.eval_fields`):

* each GT object, with the source ``bbox`` / ``area`` / ``segmentation`` from ``eval.objects`` where the
  line has them, else derived from its geometry (box ``[x1, y1, x2 - x1, y2 - y1]``; area = polygon area
  for bbox, mask area for segm; mask = its polygon, a box as its rectangle);
* ``eval.crowd`` regions as ``iscrowd: 1`` (COCOeval's ignore regions);
* ``eval.skipped`` annotations as ordinary GT (they are GT in the source file, just not trained on).

Masks are rasterised by pycocotools itself (``COCOeval`` converts polygons and RLE exactly as for a
file it loaded), so a converted file scores as its source annotation file does.

Image ids: ``eval.image_id`` when every line has one and they are distinct (pycocotools breaks score
ties by image id, so the source ids reproduce its order), else the 1-based line number. Category ids:
1..K over the sorted category names (a category is its exact NFC ``desc``).
"""

from __future__ import annotations

import contextlib
import io
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from src.data.contract import DataError
from src.data.objects import DetObject

if TYPE_CHECKING:
    from src.eval import ImagePredictions

COCO_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5, "AR100": 8}  # COCOeval.stats
COCO_KEYS = (*COCO_STATS, "AP_per_category")
AREAS = ("all", "small", "medium", "large")  # COCOeval's areaRng order
LVIS_MAX_DETS = 300
LVIS_FREQUENCY_KEYS = {"r": "AP_rare", "c": "AP_common", "f": "AP_frequent"}
LVIS_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", *LVIS_FREQUENCY_KEYS.values(), f"AR{LVIS_MAX_DETS}")


# ------------------------------------------------------------------------------------ ground truth


def polygon_area(flat: Sequence[float]) -> float:
    """Shoelace area of a flat ``[x1, y1, ..., xn, yn]`` polygon (pixels²)."""
    xs, ys = flat[0::2], flat[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2.0


def as_polygon(obj: DetObject, px: Sequence[float]) -> list[float]:
    """Flat pixel polygon of an object; a box is its rectangle (x1,y1),(x2,y1),(x2,y2),(x1,y2)."""
    if obj.geometry == "bbox_2d":
        x1, y1, x2, y2 = px
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    return list(px)


def xywh(px: Sequence[float]) -> list[float]:
    """``[x, y, w, h]`` of the bounding box of flat pixel coordinates."""
    xs, ys = px[0::2], px[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def polygon_rle(flat: Sequence[float], height: int, width: int) -> dict:
    """One polygon rasterised by pycocotools into a compressed RLE (``counts`` as bytes)."""
    return mask_utils.merge(mask_utils.frPyObjects([list(flat)], height, width))


def box_polygon(bbox: Sequence[float]) -> list[list[float]]:
    """A source ``[x, y, w, h]`` box as a one-polygon segmentation."""
    x, y, w, h = bbox
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def image_ids(images: Sequence[ImagePredictions]) -> list[int]:
    """COCO image id of each line: ``eval.image_id`` when all lines have distinct ones, else 1..N."""
    ids = [im.eval.image_id if im.eval is not None else None for im in images]
    if all(i is not None for i in ids) and len(set(ids)) == len(ids):
        return ids  # type: ignore[return-value]
    return list(range(1, len(images) + 1))


def category_names(images: Sequence[ImagePredictions], federated: bool = False) -> list[str]:
    """Sorted names of every category the lines mention (GT, predictions, crowd / skipped regions, and
    with ``federated`` the LVIS negative / not-exhaustive lists)."""
    names: set[str] = set()
    for im in images:
        names.update(o.desc for o in (*im.gt, *im.pred))
        if im.eval is not None:
            names.update(r.desc for r in (*im.eval.crowd, *im.eval.skipped))  # type: ignore[misc]
            if federated and im.eval.federated:
                names.update(im.eval.neg_categories or ())
                names.update(im.eval.not_exhaustive_categories)
    return sorted(names)


def gt_annotations(im: ImagePredictions, img_id: int, cat: dict[str, int], iou_type: str) -> list[dict]:
    """COCO GT annotations of one line (ids left to the caller): objects, crowd and skipped regions."""
    anns = []
    regions = im.eval.objects if im.eval is not None and im.eval.objects is not None else (None,) * len(im.gt)
    for o, px, src in zip(im.gt, im.gt_pixels, regions):
        ann: dict[str, Any] = {"image_id": img_id, "category_id": cat[o.desc], "iscrowd": 0}
        ann["bbox"] = list(src.bbox) if src is not None else xywh(px)
        seg = src.segmentation if src is not None and src.segmentation is not None else [as_polygon(o, px)]
        if iou_type == "segm":
            ann["segmentation"] = seg
        if src is not None:
            ann["area"] = src.area
        elif iou_type == "segm":
            ann["area"] = float(mask_utils.area(polygon_rle(seg[0], im.height, im.width)))
        else:
            ann["area"] = polygon_area(seg[0])
        anns.append(ann)
    if im.eval is not None:
        for crowd, regs in ((1, im.eval.crowd), (0, im.eval.skipped)):
            for r in regs:
                ann = {"image_id": img_id, "category_id": cat[r.desc], "iscrowd": crowd, "bbox": list(r.bbox), "area": r.area}
                if iou_type == "segm":
                    ann["segmentation"] = r.segmentation if r.segmentation is not None else box_polygon(r.bbox)
                anns.append(ann)
    return anns


def detections(im: ImagePredictions, img_id: int, cat: dict[str, int], iou_type: str) -> list[dict]:
    """COCO results of one line: ``bbox`` (xywh) or ``segmentation`` (compressed RLE), and ``score``."""
    dets = []
    for o, px, s in zip(im.pred, im.pred_pixels, im.scores):
        det: dict[str, Any] = {"image_id": img_id, "category_id": cat[o.desc], "score": s}
        if iou_type == "segm":
            det["segmentation"] = polygon_rle(as_polygon(o, px), im.height, im.width)
        else:
            det["bbox"] = xywh(px)
        dets.append(det)
    return dets


@dataclass
class CocoInputs:
    """A COCO ground-truth dataset dict and its detections, plus the id maps used to build them."""

    dataset: dict
    dets: list[dict]
    cat_ids: dict[str, int]  # name -> category id
    img_ids: list[int]  # per line


def build_inputs(images: Sequence[ImagePredictions], iou_type: str, federated: bool = False) -> CocoInputs:
    """Ground truth and detections of all lines for ``iou_type`` ``bbox`` or ``segm``."""
    cat = {name: i + 1 for i, name in enumerate(category_names(images, federated))}
    ids = image_ids(images)
    gts: list[dict] = []
    dets: list[dict] = []
    for img_id, im in zip(ids, images):
        for ann in gt_annotations(im, img_id, cat, iou_type):
            ann["id"] = len(gts) + 1  # ids start at 1: pycocotools reads 0 as "unmatched"
            gts.append(ann)
        dets.extend(detections(im, img_id, cat, iou_type))
    dataset = {
        "images": [{"id": i, "width": im.width, "height": im.height} for i, im in zip(ids, images)],
        "annotations": gts,
        "categories": [{"id": i, "name": n} for n, i in cat.items()],
    }
    return CocoInputs(dataset=dataset, dets=dets, cat_ids=cat, img_ids=ids)


# ------------------------------------------------------------------------------------- COCOeval


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def run_cocoeval(inputs: CocoInputs, iou_type: str, evaluator: type[COCOeval] = COCOeval, **kwargs) -> COCOeval:
    """Evaluate and accumulate (pycocotools' prints silenced). No detections is a valid result (AP 0
    where GT exists), not an error as in ``COCO.loadRes``."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _coco(inputs.dataset)
        if inputs.dets:
            coco_dt = coco_gt.loadRes(inputs.dets)
        else:
            coco_dt = _coco({**inputs.dataset, "annotations": []})
        ev = evaluator(coco_gt, coco_dt, iou_type, **kwargs)
        ev.evaluate()
        ev.accumulate()
    return ev


def mean_valid(values: np.ndarray) -> float | None:
    """Mean of the entries > -1 (COCOeval's "defined" entries); None when there are none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def per_category_ap(ev: COCOeval, names: dict[int, str], max_det_index: int = -1) -> dict[str, float | None]:
    """AP@[.5:.95] of each category with at least one non-crowd GT (area "all"), keyed by name."""
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        ap = mean_valid(precision[:, :, k, 0, max_det_index])
        if ap is not None:
            out[names[cat_id]] = ap
    return dict(sorted(out.items()))


def coco_metrics(images: Sequence[ImagePredictions], iou_type: str) -> dict[str, Any]:
    """``AP, AP50, AP75, AP_small, AP_medium, AP_large, AR100`` of COCOeval (None where COCO leaves a
    figure undefined, e.g. no GT in a size bucket) and ``AP_per_category``."""
    inputs = build_inputs(images, iou_type)
    ev = run_cocoeval(inputs, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    stats = np.asarray(ev.stats)
    out: dict[str, Any] = {k: (None if stats[i] < 0 else float(stats[i])) for k, i in COCO_STATS.items()}
    out["AP_per_category"] = per_category_ap(ev, {i: n for n, i in inputs.cat_ids.items()})
    return out


# ------------------------------------------------------------------------------------------- LVIS


class FederatedCOCOeval(COCOeval):
    """COCOeval with LVIS' federated rule for categories not exhaustively annotated in an image: an
    unmatched detection of such a category is ignored (neither TP nor FP). Everything else — greedy
    matching, area ranges, 101-point interpolation, ``pr = tp / (tp + fp + eps)`` — is the same in both
    evaluators. The two other LVIS rules act on the detections beforehand (:func:`federated_detections`).
    ``not_exhaustive``: image id -> category ids."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, iou_type: str, not_exhaustive: dict[int, set[int]]):
        super().__init__(coco_gt, coco_dt, iou_type)
        self.params.maxDets = [LVIS_MAX_DETS]
        self.not_exhaustive = not_exhaustive

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802, N803 - pycocotools' names
        result = super().evaluateImg(imgId, catId, aRng, maxDet)
        if result is not None and catId in self.not_exhaustive.get(imgId, ()):
            result["dtIgnore"] = np.logical_or(result["dtIgnore"], result["dtMatches"] == 0)
        return result


def federated_detections(inputs: CocoInputs, images: Sequence[ImagePredictions]) -> list[dict]:
    """LVIS' two detection rules, in its order: keep each image's ``LVIS_MAX_DETS`` best-scored
    detections (all categories together; a stable sort, so ties keep file order), then drop those whose
    category is neither annotated in the image (any GT annotation) nor in its negative list."""
    by_image: dict[int, list[dict]] = {}
    for d in inputs.dets:
        by_image.setdefault(d["image_id"], []).append(d)
    present: dict[int, set[int]] = {}
    for ann in inputs.dataset["annotations"]:
        present.setdefault(ann["image_id"], set()).add(ann["category_id"])
    kept = []
    for img_id, im in zip(inputs.img_ids, images):
        dets = sorted(by_image.get(img_id, []), key=lambda d: d["score"], reverse=True)[:LVIS_MAX_DETS]
        allowed = present.get(img_id, set()) | {inputs.cat_ids[n] for n in im.eval.neg_categories or ()}  # type: ignore[union-attr]
        kept.extend(d for d in dets if d["category_id"] in allowed)
    return kept


def lvis_metrics(images: Sequence[ImagePredictions], iou_type: str) -> dict[str, float | None]:
    """LVIS federated AP (keys :data:`LVIS_KEYS`), or all None unless every line carries the LVIS fields
    (``eval.neg_categories`` / ``eval.not_exhaustive_categories``). ``AP_rare`` / ``_common`` /
    ``_frequent`` average the categories of each ``eval.frequency`` group."""
    if not images or not all(im.eval is not None and im.eval.federated for im in images):
        return dict.fromkeys(LVIS_KEYS)
    inputs = build_inputs(images, iou_type, federated=True)
    inputs.dets = federated_detections(inputs, images)
    not_exhaustive = {i: {inputs.cat_ids[n] for n in im.eval.not_exhaustive_categories} for i, im in zip(inputs.img_ids, images)}  # type: ignore[union-attr]
    ev = run_cocoeval(inputs, iou_type, FederatedCOCOeval, not_exhaustive=not_exhaustive)
    precision, recall = ev.eval["precision"][..., 0], ev.eval["recall"][..., 0]  # [T, R, K, A], [T, K, A]
    thr = {round(float(t), 2): i for i, t in enumerate(ev.params.iouThrs)}
    out = {"AP": mean_valid(precision[:, :, :, 0]), "AP50": mean_valid(precision[thr[0.5], :, :, 0]),
           "AP75": mean_valid(precision[thr[0.75], :, :, 0])}
    for a, area in enumerate(AREAS[1:], start=1):
        out[f"AP_{area}"] = mean_valid(precision[:, :, :, a])
    frequency: dict[str, str] = {}
    for im in images:
        frequency.update(im.eval.frequency)  # type: ignore[union-attr]
    k_of = {c: k for k, c in enumerate(ev.params.catIds)}
    for group, key in LVIS_FREQUENCY_KEYS.items():
        ks = [k_of[inputs.cat_ids[n]] for n, f in frequency.items() if f == group and n in inputs.cat_ids]
        out[key] = mean_valid(precision[:, :, ks, 0]) if ks else None
    out[f"AR{LVIS_MAX_DETS}"] = mean_valid(recall[:, :, 0])
    return out


# ------------------------------------------------------------------------------ results format


def read_categories(path: str | Path) -> dict[str, int]:
    """``{NFC name: id}`` from a JSON file with a COCO-style ``categories`` list (a COCO / LVIS
    annotation file, or the ``*.categories.json`` written by ``src.data.convert``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list):
        raise DataError(f"{path}: needs a top-level 'categories' list of {{\"id\", \"name\"}} (a COCO annotation file or *.categories.json)")
    out: dict[str, int] = {}
    for i, c in enumerate(cats):
        if not (isinstance(c, dict) and type(c.get("id")) is int and isinstance(c.get("name"), str)):
            raise DataError(f"{path}: categories[{i}] needs an int 'id' and a string 'name'")
        name = unicodedata.normalize("NFC", c["name"])
        if name in out:
            raise DataError(f"{path}: categories[{i}]: the name {name!r} is used twice; a desc must name one category")
        out[name] = c["id"]
    return out


def coco_results(images: Sequence[ImagePredictions], categories: dict[str, int] | None = None) -> tuple[list[dict], int]:
    """Every prediction in the official COCO results format, and how many were left out.

    Each entry: ``image_id`` (see :func:`image_ids`), ``category_id`` (``categories[desc]``, or the ids
    the evaluation itself uses when ``categories`` is None), ``bbox`` ``[x, y, w, h]``, ``score``; when
    the file holds polygons also ``segmentation`` (compressed RLE, boxes as their rectangle). A
    prediction whose desc is not in ``categories`` is left out (counted). For segm scoring with
    pycocotools, drop ``bbox`` from the entries first: ``loadRes`` would otherwise take the box area
    for the area ranges."""
    has_poly = any(o.geometry == "poly" for im in images for o in (*im.gt, *im.pred))
    own = build_inputs(images, "bbox")
    cat = own.cat_ids if categories is None else categories
    out, left_out = [], 0
    for img_id, im in zip(own.img_ids, images):
        for o, px, s in zip(im.pred, im.pred_pixels, im.scores):
            if o.desc not in cat:
                left_out += 1
                continue
            entry: dict[str, Any] = {"image_id": img_id, "category_id": cat[o.desc], "bbox": xywh(px), "score": s}
            if has_poly:
                rle = polygon_rle(as_polygon(o, px), im.height, im.width)
                entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            out.append(entry)
    return out, left_out
