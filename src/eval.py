"""COCO-style evaluation of a predictions file (``python -m src.infer`` output, or one written by hand).

    python -m src.eval --pred pred.jsonl [--out metrics.json] [--coco-results OUT.json [--categories FILE]]

Input, one JSON object per line (coordinates in PIXELS of the image, data contract objects)::

    {"image": "/abs/or/rel/path.png", "width": 128, "height": 96,
     "gt":   [{"desc": "cat", "bbox_2d": [x1, y1, x2, y2]}, {"desc": "kite", "poly": [x1, y1, ...]}],
     "pred": [{"desc": "cat", "bbox_2d": [...], "score": 0.9}, ...],     # "score" optional
     "raw_text": "...", "truncated": false, "malformed": false, "hit_max_new_tokens": false,
     "dropped_invalid": 0, "id": "...",                                      # these six optional
     "eval": {...}}      # optional: evaluation-only GT of a converted record (src.data.eval_fields), copied by src.infer

Every line is validated: its keys, flags and GT strictly (the object rules of the data contract, pixels
inside the image) — a bad line stops with one line ``FILE:LINE: ...`` and exit code 2. Predictions are
what a model or another detector really emits: one outside the image is clipped to it and counted
(``pred_clipped``), one breaking the contract (inverted or zero-size box, odd polygon, no desc,
non-finite value or score) is counted (``pred_invalid``) and not scored — never a reason to stop.

Reported (see docs/evaluation.md):

* ``bbox_*``: pycocotools ``COCOeval`` (AP@[.5:.95], AP50, AP75, AR@100). A polygon is evaluated by
  its bounding box. ``segm_*``: the same with masks, computed only when the file holds at least one
  polygon (GT or predicted); boxes then count as their rectangle polygon. ``null`` when undefined.
  Also ``*_AP_small`` / ``_medium`` / ``_large`` (by annotated area) and ``*_AP_per_category``. With
  ``eval`` on the lines (converted data) the GT is the source file's: crowd regions as ignore regions,
  source boxes / areas / masks, skipped annotations, source image ids — the figures equal COCOeval on
  the source annotation file (:mod:`src.eval_coco`).
* ``lvis_bbox_*`` / ``lvis_segm_*``: LVIS federated AP (maxDets 300) when every line carries the LVIS
  fields; ``null`` otherwise.
* ``--coco-results OUT.json``: the predictions in the official COCO results format (category ids from
  ``--categories``, a COCO-style ``categories`` list).
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
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from src.data.contract import DataError, iter_jsonl, parse_object, parse_record
from src.data.coords import bins_to_pixels, clip_polygon
from src.data.eval_fields import EvalFieldError, EvalInfo, is_number, parse_eval_info
from src.data.objects import GEOMETRIES, DetObject

LINE_KEYS = {"image", "width", "height", "gt", "pred", "raw_text", "truncated", "malformed", "hit_max_new_tokens", "dropped_invalid", "id", "eval"}
FLAGS = ("truncated", "malformed", "hit_max_new_tokens")  # optional booleans, default false
REQUIRED_KEYS = ("image", "width", "height", "gt", "pred")
GATES = (0.3, 0.5, 0.75)


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
    pred_clipped: int = 0       # predictions clipped to the image (then scored)
    pred_invalid: int = 0       # predictions breaking the data contract (not scored)
    first_invalid: str = ""     # the first reason, for the report
    source: str = ""  # "file:line"
    eval: EvalInfo | None = None  # evaluation-only GT of a converted record (crowd regions, source boxes, LVIS fields)


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

    gt, gt_px = _objects(obj, "gt", where)  # GT stays strict: any problem stops the run
    preds = read_predicted_objects(obj, where)
    return ImagePredictions(
        image=obj["image"], width=obj["width"], height=obj["height"], gt=gt, gt_pixels=gt_px,
        pred=preds.objects, pred_pixels=preds.pixels, scores=preds.scores, pred_clipped=preds.clipped,
        pred_invalid=len(preds.invalid), first_invalid=preds.invalid[0] if preds.invalid else "",
        **flags, dropped_invalid=dropped, source=where, eval=read_eval_info(obj, len(gt), where),
    )


@dataclass(frozen=True)
class PredictedObjects:
    """The scorable predictions of one line (bins + pixels + scores, in appearance order), how many were
    clipped to the image, and the reasons the others were not scored."""

    objects: tuple[DetObject, ...]
    pixels: tuple[tuple[float, ...], ...]
    scores: tuple[float, ...]
    clipped: int
    invalid: tuple[str, ...]


def clip_to_image(o: Any, width: int, height: int) -> tuple[Any, bool]:
    """A predicted object with its finite pixel coordinates clipped to the image (0..width, 0..height),
    and whether anything moved. Anything else (coord-token strings, bins records, malformed objects) is
    returned as it is, for the data contract to judge."""
    if not isinstance(o, dict):
        return o, False
    moved = False
    out = dict(o)
    for g in GEOMETRIES:
        values = o.get(g)
        if not isinstance(values, list) or not all(is_number(v) for v in values):
            continue
        out[g], m = clip_polygon(values, width, height)
        moved |= m
    return out, moved


def read_predicted_objects(obj: dict, where: str) -> PredictedObjects:
    """Predictions are what a model or another detector really emits: a box a pixel outside the image is
    clipped to it and counted (``pred_clipped``); an object breaking the data contract (no desc, an
    inverted or zero-size box after clipping, an odd polygon, a non-finite value or score, ...) is counted
    (``pred_invalid``) and not scored. Neither stops the run. Stand-in scores keep each prediction's
    appearance rank among ALL of the line's predictions, so dropping one never reorders the others."""
    width, height = obj["width"], obj["height"]
    n = len(obj["pred"])
    default = appearance_scores(n)
    objects, pixels, scores, invalid = [], [], [], []
    clipped = 0
    for j, o in enumerate(obj["pred"]):
        at = f"{where}: pred: objects[{j}]"
        score = default[j]
        if isinstance(o, dict) and "score" in o:
            s = o["score"]
            if not is_number(s):
                invalid.append(f"{at}: 'score' must be a finite number, got {s!r}")
                continue
            score = float(s)
            o = {k: v for k, v in o.items() if k != "score"}
        o, moved = clip_to_image(o, width, height)
        try:
            det, px = parse_object(o, width, height, "pixel", at)
        except DataError as e:
            invalid.append(str(e))
            continue
        if px is None:  # coord-token strings: bins are given, pixels follow from the codec
            px = bins_to_pixels(det.bins, width, height)
        clipped += moved
        objects.append(det)
        pixels.append(px)
        scores.append(score)
    return PredictedObjects(tuple(objects), tuple(pixels), tuple(scores), clipped, tuple(invalid))


def read_eval_info(obj: dict, num_gt: int, where: str) -> EvalInfo | None:
    """The line's optional ``eval`` value (copied by ``src.infer`` from a converted record), validated."""
    if "eval" not in obj:
        return None
    try:
        return parse_eval_info(obj["eval"], num_gt)
    except EvalFieldError as e:
        raise DataError(f"{where}: {e}") from None


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


def coco_metrics(images: Sequence[ImagePredictions], iou_type: str) -> dict[str, Any]:
    """COCOeval figures (``iou_type`` "bbox" or "segm"): ``AP, AP50, AP75, AP_small, AP_medium, AP_large,
    AR100`` (None where COCO leaves one undefined, e.g. no GT at all) and ``AP_per_category``. Crowd
    regions, source boxes / areas / masks and skipped annotations come from each line's ``eval``
    (:mod:`src.eval_coco`)."""
    from src.eval_coco import coco_metrics as run

    return run(images, iou_type)


def lvis_metrics(images: Sequence[ImagePredictions], has_poly: bool) -> dict[str, float | None]:
    """``lvis_bbox_*`` (and ``lvis_segm_*`` when polygons exist): LVIS federated AP with maxDets 300,
    None unless every line carries the LVIS fields (:func:`src.eval_coco.lvis_metrics`)."""
    from src.eval_coco import LVIS_KEYS, lvis_metrics as run

    out = {f"lvis_bbox_{k}": v for k, v in run(images, "bbox").items()}
    segm = run(images, "segm") if has_poly else dict.fromkeys(LVIS_KEYS)
    out.update({f"lvis_segm_{k}": v for k, v in segm.items()})
    return out


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
    from src.eval_coco import COCO_KEYS

    out.update({f"bbox_{k}": v for k, v in coco_metrics(images, "bbox").items()})
    has_poly = any(o.geometry == "poly" for im in images for o in (*im.gt, *im.pred))
    segm = coco_metrics(images, "segm") if has_poly else dict.fromkeys(COCO_KEYS)
    out.update({f"segm_{k}": v for k, v in segm.items()})
    out.update(lvis_metrics(images, has_poly))
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
    out["pred_clipped"] = sum(im.pred_clipped for im in images)
    out["pred_invalid"] = sum(im.pred_invalid for im in images)
    return out


def format_table(m: dict[str, Any]) -> str:
    """A readable summary of :func:`evaluate`'s dict."""
    def f(v: Any) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    lines = [
        f"images {m['images']}   GT objects {m['gt_objects']}   predicted objects {m['pred_objects']}"
        f"   (clipped to the image {m['pred_clipped']}, invalid and not scored {m['pred_invalid']})",
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


def format_extra_table(m: dict[str, Any]) -> str:
    """COCO size buckets, per-category AP and LVIS federated AP of :func:`evaluate`'s dict (rows only
    for what is defined)."""
    def f(v: Any) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    lines = ["COCOeval by size   small  medium   large   (area as annotated)"]
    for t in ("bbox", "segm"):
        if m[f"{t}_AP"] is not None:
            lines.append(f"  {t}            {f(m[f'{t}_AP_small'])}  {f(m[f'{t}_AP_medium'])}  {f(m[f'{t}_AP_large'])}")
    per_cat = m["bbox_AP_per_category"] or {}
    if per_cat:
        worst = sorted(per_cat.items(), key=lambda kv: kv[1])[:5]
        lines.append(f"bbox AP per category ({len(per_cat)} with GT; in metrics.json), lowest: "
                     + ", ".join(f"{name} {ap:.3f}" for name, ap in worst))
    for t in ("bbox", "segm"):
        if m[f"lvis_{t}_AP"] is not None:
            lines.append(f"LVIS federated {t} (maxDets 300): AP {f(m[f'lvis_{t}_AP'])}  AP50 {f(m[f'lvis_{t}_AP50'])}"
                         f"  APr {f(m[f'lvis_{t}_AP_rare'])}  APc {f(m[f'lvis_{t}_AP_common'])}  APf {f(m[f'lvis_{t}_AP_frequent'])}")
    return "\n".join(lines)


def write_coco_results(images: Sequence[ImagePredictions], out: Path, categories: Path | None) -> str:
    """Write the predictions in the official COCO results format (temp file + rename); return a
    one-line note for the user. Category ids from ``categories`` (a COCO-style JSON), else ours."""
    from src.eval_coco import coco_results, read_categories
    from src.utils.files import atomic_path

    cats = read_categories(categories) if categories is not None else None
    results, left_out = coco_results(images, cats)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(results) + "\n", encoding="utf-8")
    note = f"{len(results)} detections written to {out} (COCO results format)"
    if cats is None:
        note += "; category ids 1..K in sorted desc order (pass --categories for the dataset's ids)"
    if left_out:
        note += f"; {left_out} prediction(s) left out: their desc is not a category of {categories}"
    return note


# --------------------------------------------------------------------------------------- the CLI


def fail(msg: str) -> int:
    print(f"error: {' '.join(str(msg).splitlines())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--pred", required=True, type=Path, help="predictions JSONL (python -m src.infer output)")
    ap.add_argument("--out", type=Path, help="write the metrics as JSON here")
    ap.add_argument("--coco-results", type=Path, help="also write the predictions in the official COCO results format (JSON list)")
    ap.add_argument("--categories", type=Path,
                    help="JSON with a COCO 'categories' list (the source annotation file or the converter's *.categories.json): "
                         "the category ids for --coco-results")
    args = ap.parse_args(argv)
    try:
        if args.categories is not None and args.coco_results is None:
            raise DataError("--categories only sets the ids of --coco-results; add --coco-results OUT.json")
        for out in (args.out, args.coco_results):
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
        images = read_predictions(args.pred)
        if not images:
            raise DataError(f"{args.pred}: no predictions (the file is empty)")
        note = write_coco_results(images, args.coco_results, args.categories) if args.coco_results is not None else None
    except DataError as e:
        return fail(str(e))
    metrics = evaluate(images)
    bad = [im for im in images if im.pred_invalid]
    if bad:
        print(f"note: {metrics['pred_invalid']} invalid prediction(s) in {len(bad)} line(s) were not scored; first: {bad[0].first_invalid}",
              file=sys.stderr)
    print(format_table(metrics))
    print()
    print(format_extra_table(metrics))
    if note is not None:
        print(note)
    if args.out is not None:
        args.out.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"metrics written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
