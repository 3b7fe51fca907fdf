"""COCO-style evaluation of a predictions file (``python -m src.infer`` output, or one written by hand).

    python -m src.eval --pred pred.jsonl [--out metrics.json]

Input, one JSON object per line (coordinates in PIXELS of the image, data contract objects)::

    {"image": "/abs/or/rel/path.png", "width": 128, "height": 96,
     "gt":   [{"desc": "cat", "bbox_2d": [x1, y1, x2, y2]}, {"desc": "kite", "poly": [x1, y1, ...]}],
     "pred": [{"desc": "cat", "bbox_2d": [...], "score": 0.9}, ...],     # "score" optional
     "raw_text": "...", "truncated": false, "malformed": false, "hit_max_new_tokens": false,
     "dropped_invalid": 0, "id": "..."}                                      # these six optional

Every line is validated (the object rules of the data contract, pixels inside the image); a bad line
stops with one line ``FILE:LINE: ...`` and exit code 2.

Reported (see docs/evaluation.md):

* ``bbox_*``: pycocotools ``COCOeval`` (AP@[.5:.95], AP50, AP75, AR@100). A polygon is evaluated by
  its bounding box. ``segm_*``: the same with masks, computed only when the file holds at least one
  polygon (GT or predicted); boxes then count as their rectangle polygon. ``null`` when undefined.
* Categories: the exact ``desc`` string (NFC). A predicted desc that no GT carries is a category
  without GT, which COCO skips: such predictions do not lower AP (they do lower ``precision@t``).
* Scores: predictions carry no confidence; the i-th of n predicted objects of an image (0-based,
  appearance order) gets ``1 - i / (n + 1)`` unless the object has an explicit ``"score"``.
* ``precision@t`` / ``recall@t`` / ``f1@t`` for t in 0.3 / 0.5 / 0.75: the training matcher
  (Hungarian on maskIoU, gate t, CLASS-AGNOSTIC) on objects quantized to bins — the same counting code
  as training's rollout evaluation (:func:`src.rollout_matching.stats.count_objects`);
  ``label_precision@t`` / ``label_recall@t`` / ``label_f1@t``: LABEL-AWARE, the same matcher within each
  desc (a match needs the identical desc).
* Parse health: ``parse_valid_rate`` (neither truncated nor malformed, nothing dropped),
  ``truncated_rate`` (the answer ran out before its closing ``}``), ``malformed_rate`` (its structure
  broke), ``hit_max_new_tokens_rate``, ``dropped_invalid``, ``nonempty_rate``,
  ``valid_objects_per_image``; ``images``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from src.data.contract import DataError, iter_jsonl, parse_record
from src.data.coords import bins_to_pixels
from src.data.objects import DetObject

LINE_KEYS = {"image", "width", "height", "gt", "pred", "raw_text", "truncated", "malformed", "hit_max_new_tokens", "dropped_invalid", "id"}
FLAGS = ("truncated", "malformed", "hit_max_new_tokens")  # optional booleans, default false
REQUIRED_KEYS = ("image", "width", "height", "gt", "pred")
GATES = (0.3, 0.5, 0.75)
COCO_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "AR100": 8}  # indices into COCOeval.stats


@dataclass(frozen=True)
class ImagePredictions:
    """One validated line. ``gt`` / ``pred`` are in bins (for the matcher); ``*_pixels`` hold the same
    objects' flat coordinates in pixels (for COCO and pictures), in the same order."""

    image: str
    width: int
    height: int
    gt: tuple[DetObject, ...]
    gt_pixels: tuple[tuple[float, ...], ...]
    pred: tuple[DetObject, ...]
    pred_pixels: tuple[tuple[float, ...], ...]
    scores: tuple[float, ...]
    truncated: bool = False
    malformed: bool = False
    hit_max_new_tokens: bool = False
    dropped_invalid: int = 0
    source: str = ""  # "file:line"


# ------------------------------------------------------------------------------------------ input


def appearance_scores(n: int) -> tuple[float, ...]:
    """Stand-in confidences for ``n`` predictions in appearance order: ``1 - i / (n + 1)``."""
    return tuple(1.0 - i / (n + 1) for i in range(n))


def _objects(line: dict, key: str, where: str) -> tuple[tuple[DetObject, ...], tuple[tuple[float, ...], ...]]:
    """Validate one object list (pixels) through the data contract; return (bins objects, pixel coords)."""
    record = {"images": [line["image"]], "width": line["width"], "height": line["height"], "objects": line[key]}
    rec = parse_record(record, Path("."), f"{where}: {key}", check_image=False)
    if rec.pixel_objects is not None:
        pixels = rec.pixel_objects
    else:  # coord-token strings in a hand-written file: bins are given, pixels follow from the codec
        pixels = tuple(bins_to_pixels(o.bins, rec.width, rec.height) for o in rec.objects)
    return rec.objects, pixels


def read_line(obj: Any, where: str) -> ImagePredictions:
    """Validate one decoded line (raises :class:`DataError` starting with ``where``)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - LINE_KEYS
    if unknown:
        raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(LINE_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}; a line needs {list(REQUIRED_KEYS)}")
    if not isinstance(obj["image"], str) or not obj["image"]:
        raise DataError(f"{where}: 'image' must be a non-empty path string, got {obj['image']!r}")
    for key in ("gt", "pred"):
        if not isinstance(obj[key], list):
            raise DataError(f"{where}: '{key}' must be a list of objects (use [] for none), got {type(obj[key]).__name__}")
    flags = {k: obj.get(k, False) for k in FLAGS}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise DataError(f"{where}: '{k}' must be true or false, got {v!r}")
    dropped = obj.get("dropped_invalid", 0)
    if type(dropped) is not int or dropped < 0:
        raise DataError(f"{where}: 'dropped_invalid' must be an int >= 0, got {dropped!r}")

    # Optional per-prediction "score": validate and strip it before the data-contract object check.
    scores: list[float | None] = []
    preds = []
    for j, o in enumerate(obj["pred"]):
        if isinstance(o, dict) and "score" in o:
            s = o["score"]
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise DataError(f"{where}: pred: objects[{j}]: 'score' must be a finite number, got {s!r}")
            scores.append(float(s))
            o = {k: v for k, v in o.items() if k != "score"}
        else:
            scores.append(None)
        preds.append(o)
    gt, gt_px = _objects(obj, "gt", where)
    pred, pred_px = _objects({**obj, "pred": preds}, "pred", where)
    default = appearance_scores(len(pred))
    return ImagePredictions(
        image=obj["image"], width=obj["width"], height=obj["height"], gt=gt, gt_pixels=gt_px,
        pred=pred, pred_pixels=pred_px, scores=tuple(d if s is None else s for s, d in zip(scores, default)),
        **flags, dropped_invalid=dropped, source=where,
    )


def read_predictions(path: str | Path, limit: int | None = None) -> list[ImagePredictions]:
    """Every line of a predictions file, validated (raises :class:`DataError` ``FILE:LINE: ...``)."""
    path = Path(path)
    out: list[ImagePredictions] = []
    try:
        for n, obj in iter_jsonl(path):
            if isinstance(obj, DataError):
                raise obj
            out.append(read_line(obj, f"{path}:{n}"))
            if limit is not None and len(out) >= limit:
                break
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    return out


# --------------------------------------------------------------------------------- COCO (pycocotools)


def _polygon_area(flat: Sequence[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2.0


def _as_polygon(obj: DetObject, px: Sequence[float]) -> list[float]:
    """Flat pixel polygon of an object; a box is its rectangle (x1,y1),(x2,y1),(x2,y2),(x1,y2)."""
    if obj.geometry == "bbox_2d":
        x1, y1, x2, y2 = px
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    return list(px)


def _xywh(px: Sequence[float]) -> list[float]:
    xs, ys = px[0::2], px[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def coco_metrics(images: Sequence[ImagePredictions], iou_type: str) -> dict[str, float | None]:
    """``{AP, AP50, AP75, AR100}`` of pycocotools COCOeval (``iou_type`` "bbox" or "segm"), pycocotools'
    own prints silenced. ``None`` where COCO leaves a figure undefined (no GT at all)."""
    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not any(im.gt for im in images):
        return dict.fromkeys(COCO_STATS)
    if not any(im.pred for im in images):  # COCO.loadRes cannot take an empty list: nothing found = 0
        return dict.fromkeys(COCO_STATS, 0.0)
    names = sorted({o.desc for im in images for o in (*im.gt, *im.pred)})
    cat = {name: i + 1 for i, name in enumerate(names)}

    def segmentation(o: DetObject, px: Sequence[float], im: ImagePredictions) -> dict:
        rle = mask_utils.frPyObjects([_as_polygon(o, px)], im.height, im.width)
        return mask_utils.merge(rle)

    gts, dets = [], []
    for img_id, im in enumerate(images, start=1):
        for o, px in zip(im.gt, im.gt_pixels):
            ann = {"id": len(gts) + 1, "image_id": img_id, "category_id": cat[o.desc], "iscrowd": 0, "bbox": _xywh(px)}
            if iou_type == "segm":
                ann["segmentation"] = segmentation(o, px, im)
                ann["area"] = float(mask_utils.area(ann["segmentation"]))
            else:
                ann["area"] = _polygon_area(_as_polygon(o, px))
            gts.append(ann)
        for o, px, s in zip(im.pred, im.pred_pixels, im.scores):
            det = {"image_id": img_id, "category_id": cat[o.desc], "score": s}
            if iou_type == "segm":
                det["segmentation"] = segmentation(o, px, im)
            else:
                det["bbox"] = _xywh(px)
            dets.append(det)
    dataset = {
        "images": [{"id": i, "width": im.width, "height": im.height} for i, im in enumerate(images, start=1)],
        "annotations": gts,
        "categories": [{"id": i, "name": n} for n, i in cat.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats)
    return {k: (None if stats[i] < 0 else float(stats[i])) for k, i in COCO_STATS.items()}


# ----------------------------------------------------------------------------------- our matcher


def matcher_counts(images: Iterable[ImagePredictions], gate: float):
    """Summed :class:`DetectionCounts` of the training matcher at ``maskiou_gate=gate`` (other knobs: the
    defaults of :class:`src.config.schema.RolloutMatchingConfig`)."""
    from src.config.schema import RolloutMatchingConfig
    from src.rollout_matching.stats import DetectionCounts, count_objects, match_kwargs

    kw = match_kwargs(RolloutMatchingConfig(), maskiou_gate=gate)
    total = DetectionCounts()
    for im in images:
        total.add(count_objects(im.pred, im.gt, kw, truncated=im.truncated, malformed=im.malformed, dropped_invalid=im.dropped_invalid,
                                hit_cap=im.hit_max_new_tokens))
    return total


def evaluate(images: Sequence[ImagePredictions]) -> dict[str, Any]:
    """All figures of one predictions file (the keys are listed in the module docstring)."""
    out: dict[str, Any] = {"images": len(images)}
    out.update({f"bbox_{k}": v for k, v in coco_metrics(images, "bbox").items()})
    has_poly = any(o.geometry == "poly" for im in images for o in (*im.gt, *im.pred))
    segm = coco_metrics(images, "segm") if has_poly else dict.fromkeys(COCO_STATS)
    out.update({f"segm_{k}": v for k, v in segm.items()})
    for gate in GATES:
        m = matcher_counts(images, gate).metrics()
        out[f"precision@{gate}"] = m["rollout_precision"]
        out[f"recall@{gate}"] = m["rollout_recall"]
        out[f"f1@{gate}"] = m["rollout_f1"]
        out[f"label_precision@{gate}"] = m["rollout_label_precision"]
        out[f"label_recall@{gate}"] = m["rollout_label_recall"]
        out[f"label_f1@{gate}"] = m["rollout_label_f1"]
    # parse health (the same at every gate): training's rollout_* keys without the prefix
    for k in ("parse_valid_rate", "truncated_rate", "malformed_rate", "hit_max_new_tokens_rate", "nonempty_rate",
              "valid_objects_per_image", "dropped_invalid"):
        out[k] = m[f"rollout_{k}"]
    out["dropped_invalid"] = int(out["dropped_invalid"])
    out["gt_objects"] = sum(len(im.gt) for im in images)
    out["pred_objects"] = sum(len(im.pred) for im in images)
    return out


def format_table(m: dict[str, Any]) -> str:
    """A readable summary of :func:`evaluate`'s dict."""
    def f(v: Any) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    lines = [
        f"images {m['images']}   GT objects {m['gt_objects']}   predicted objects {m['pred_objects']}",
        "",
        "COCOeval          AP    AP50    AP75   AR@100",
        f"  bbox        {f(m['bbox_AP'])}  {f(m['bbox_AP50'])}  {f(m['bbox_AP75'])}  {f(m['bbox_AR100'])}",
        f"  segm        {f(m['segm_AP'])}  {f(m['segm_AP50'])}  {f(m['segm_AP75'])}  {f(m['segm_AR100'])}",
        "",
        "matcher (maskIoU gate)   class-agnostic: precision  recall      F1   label-aware: precision  recall      F1",
    ]
    for g in GATES:
        lines.append(f"  @{g:<4}                                  {f(m[f'precision@{g}'])}  {f(m[f'recall@{g}'])}  {f(m[f'f1@{g}'])}"
                     f"                 {f(m[f'label_precision@{g}'])}  {f(m[f'label_recall@{g}'])}  {f(m[f'label_f1@{g}'])}")
    lines += [
        "",
        f"parse: valid {m['parse_valid_rate']:.3f}   truncated {m['truncated_rate']:.3f}   malformed {m['malformed_rate']:.3f}"
        f"   at max_new_tokens {m['hit_max_new_tokens_rate']:.3f}   non-empty {m['nonempty_rate']:.3f}",
        f"       dropped invalid objects {m['dropped_invalid']}   objects/image {m['valid_objects_per_image']:.2f}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the CLI


def fail(msg: str) -> int:
    print(f"error: {' '.join(str(msg).splitlines())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--pred", required=True, type=Path, help="predictions JSONL (python -m src.infer output)")
    ap.add_argument("--out", type=Path, help="write the metrics as JSON here")
    args = ap.parse_args(argv)
    try:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        images = read_predictions(args.pred)
        if not images:
            raise DataError(f"{args.pred}: no predictions (the file is empty)")
    except DataError as e:
        return fail(str(e))
    metrics = evaluate(images)
    print(format_table(metrics))
    if args.out is not None:
        args.out.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"metrics written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
