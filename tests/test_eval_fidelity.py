"""src.eval reproduces the official tools on converted data.

* COCO: a synthetic COCO file built here (polygons with several parts, crowd RLE and polygon regions,
  non-crowd RLE, boxes outside the image, zero-size boxes, empty images, a unicode category, unsorted
  image ids) is converted, turned into prediction lines exactly as ``src.infer`` writes them, given
  scored detections, and scored by ``src.eval``; pycocotools' COCOeval on the ORIGINAL file with the
  same detections must give the same bbox and segm AP / AP50 / AP75 / AP by size / AR@100 / AP per
  category (to 1e-6), and so must the ``--coco-results`` file.
* LVIS federated AP on hand-computed cases (negative / not-exhaustive categories, 300 detections).
"""

from __future__ import annotations

import contextlib
import io
import json
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from src.data.contract import load_jsonl
from src.data.convert import convert
from src.eval import evaluate, main, read_predictions
from src.infer import prediction_line

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 5, "name": "kite"}, {"id": 9, "name": "猫"},
              {"id": 11, "name": "cafe\u0301"}, {"id": 12, "name": "unused"}]
STAT_KEYS = {"AP": 0, "AP50": 1, "AP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5, "AR100": 8}


# ------------------------------------------------------------------------------- synthetic COCO


def r2(v: float) -> float:
    return round(float(v), 2)


def random_polygon(rng, cx: float, cy: float, radius: float) -> list[float]:
    k = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = radius * rng.uniform(0.5, 1.0, k)
    return [r2(v) for a, r in zip(angles, radii) for v in (cx + r * np.cos(a), cy + r * np.sin(a))]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a binary [h, w] mask: column-major run lengths, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def seg_bbox_area(seg, h: int, w: int) -> tuple[list[float], float]:
    """COCO-style bbox and area of a segmentation (what the dataset authors store)."""
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else mask_utils.frPyObjects(seg, h, w)
    return [r2(v) for v in mask_utils.toBbox(rle)], float(mask_utils.area(rle))


def synthetic_coco(seed: int = 0, num_images: int = 24) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 100000), size=num_images, replace=False).tolist()  # unsorted ids
    images, anns = [], []
    for img_id in ids:
        w, h = int(rng.integers(60, 400)), int(rng.integers(60, 400))
        images.append({"id": img_id, "file_name": f"{img_id:06d}.jpg", "width": w, "height": h})
        for _ in range(int(rng.integers(0, 10)) if rng.random() > 0.15 else 0):
            cat = int(rng.choice([1, 5, 9, 11]))
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)  # near an edge: polygons stick out
            radius = float(rng.choice([rng.uniform(2, 12), rng.uniform(12, 50), rng.uniform(50, 160)]))
            kind = rng.random()
            ann = {"id": len(anns) + 1000, "image_id": img_id, "category_id": cat, "iscrowd": 0}
            if kind < 0.08:  # crowd region, RLE
                mask = np.zeros((h, w), np.uint8)
                x0, y0 = int(rng.integers(0, w - 5)), int(rng.integers(0, h - 5))
                mask[y0 : y0 + int(rng.integers(5, 80)), x0 : x0 + int(rng.integers(5, 80))] = 1
                ann.update(iscrowd=1, segmentation=uncompressed_rle(mask))
            elif kind < 0.11:  # crowd region, polygon
                ann.update(iscrowd=1, segmentation=[random_polygon(rng, cx, cy, radius)])
            elif kind < 0.15:  # non-crowd RLE
                mask = np.zeros((h, w), np.uint8)
                mask[int(cy) // 2 : int(cy) // 2 + 9, int(cx) // 2 : int(cx) // 2 + 13] = 1
                ann["segmentation"] = uncompressed_rle(mask)
            elif kind < 0.30:  # two parts
                ann["segmentation"] = [random_polygon(rng, cx, cy, radius), random_polygon(rng, cx + radius, cy, radius / 2)]
            else:
                ann["segmentation"] = [random_polygon(rng, cx, cy, radius)]
            ann["bbox"], ann["area"] = seg_bbox_area(ann["segmentation"], h, w)
            if kind > 0.96:  # a degenerate annotation: zero width
                ann["bbox"][2] = 0.0
            anns.append(ann)
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def predictions(rec, rng, names: list[str]) -> list[dict]:
    """Scored detections for one converted record: jittered copies of most GT (some relabelled, some
    as polygons), crowd-region hits and random false positives; pixels inside the image."""
    W, H = rec.width, rec.height

    def clip_box(x1, y1, x2, y2):
        x1, x2 = sorted((min(max(x1, 0), W - 1), min(max(x2, 1), W)))
        y1, y2 = sorted((min(max(y1, 0), H - 1), min(max(y2, 1), H)))
        return [r2(x1), r2(y1), r2(max(x2, x1 + 1)), r2(max(y2, y1 + 1))]

    preds = []
    regions = [(o.desc, bb) for o, bb in zip(rec.objects, (r.bbox for r in rec.eval.objects))]
    regions += [(r.desc, r.bbox) for r in (*rec.eval.crowd, *rec.eval.skipped)]
    for desc, (x, y, w, h) in regions:
        if rng.random() < 0.25:
            continue
        j = rng.normal(0, max(w, h, 1) * 0.08, 4)
        box = clip_box(x + j[0], y + j[1], x + w + j[2], y + h + j[3])
        desc = desc if rng.random() < 0.85 else str(rng.choice(names))
        if rng.random() < 0.4:
            x1, y1, x2, y2 = box
            poly = [x1, y1, r2((x1 + x2) / 2), r2(y1 - (y2 - y1) * 0.1), x2, y1, x2, y2, x1, y2]
            poly = [r2(min(max(v, 0), W if i % 2 == 0 else H)) for i, v in enumerate(poly)]
            preds.append({"desc": desc, "poly": poly})
        else:
            preds.append({"desc": desc, "bbox_2d": box})
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, W - 2), rng.uniform(0, H - 2)
        preds.append({"desc": str(rng.choice(names)), "bbox_2d": clip_box(x, y, x + rng.uniform(2, 90), y + rng.uniform(2, 90))})
    for p in preds:
        p["score"] = float(rng.random())
    return preds


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def reference(ann_file: Path, results: list[dict], iou_type: str) -> tuple[dict, dict]:
    """pycocotools on the ORIGINAL annotation file: the stats and AP per category name (NFC)."""
    gt = quiet(COCO, str(ann_file))
    dt = quiet(gt.loadRes, results)
    ev = COCOeval(gt, dt, iou_type)
    quiet(ev.evaluate)
    quiet(ev.accumulate)
    quiet(ev.summarize)
    stats = {k: float(ev.stats[i]) for k, i in STAT_KEYS.items()}
    per_cat = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, -1]
        if (p > -1).any():
            per_cat[unicodedata.normalize("NFC", gt.cats[cat_id]["name"])] = float(p[p > -1].mean())
    return stats, per_cat


def reference_results(lines: list[dict], cat_ids: dict[str, int], iou_type: str) -> list[dict]:
    """The same detections in the results format, written independently of src.eval."""
    out = []
    for line in lines:
        for p in line["pred"]:
            geom = p.get("bbox_2d") or p["poly"]
            xs, ys = geom[0::2], geom[1::2]
            det = {"image_id": line["eval"]["image_id"], "category_id": cat_ids[p["desc"]], "score": p["score"]}
            if iou_type == "bbox":
                det["bbox"] = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            else:
                poly = geom if "poly" in p else [geom[0], geom[1], geom[2], geom[1], geom[2], geom[3], geom[0], geom[3]]
                det["segmentation"] = mask_utils.frPyObjects([poly], line["height"], line["width"])[0]
            out.append(det)
    return out


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory):
    """(original annotation file, prediction lines per geometry, category ids by NFC name)."""
    tmp = tmp_path_factory.mktemp("fidelity")
    data = synthetic_coco()
    images = tmp / "images"
    images.mkdir()
    for img in data["images"]:
        (images / img["file_name"]).write_bytes(b"")
    ann_file = tmp / "instances.json"
    ann_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    cat_ids = {unicodedata.normalize("NFC", c["name"]): c["id"] for c in CATEGORIES}
    lines = {}
    for geometry in ("bbox", "poly"):
        out = tmp / f"{geometry}.jsonl"
        convert("coco", ann_file, images, out, geometry=geometry)
        records, _ = load_jsonl(out)
        rng = np.random.default_rng(1)  # the same detections for both geometries
        empty = SimpleNamespace(objects=(), truncated=False, malformed=False, dropped_invalid=0)
        lines[geometry] = [{**prediction_line(r, empty, ""), "pred": predictions(r, rng, sorted(cat_ids))} for r in records]
    assert lines["bbox"][0]["pred"] == lines["poly"][0]["pred"]
    return ann_file, lines, cat_ids, tmp


def test_the_synthetic_file_has_every_edge_case(fidelity):
    ann_file, lines, _, _ = fidelity
    anns = json.loads(ann_file.read_text(encoding="utf-8"))["annotations"]
    ev = [line["eval"] for line in lines["poly"]]
    assert sum(a["iscrowd"] for a in anns) >= 3 and any(isinstance(a["segmentation"], dict) and not a["iscrowd"] for a in anns)
    assert sum(isinstance(a["segmentation"], list) and len(a["segmentation"]) > 1 for a in anns) >= 5
    assert {r["reason"] for e in ev for r in e.get("skipped", [])} >= {"zero_size"}
    assert any(not line["gt"] for line in lines["poly"])  # empty images
    assert sum("segmentation" in o for e in ev for o in e["objects"]) >= 10  # clipped / multi-part / RLE masks travel
    bboxes = [o["bbox"] for e in ev for o in e["objects"]]
    sizes = [w * h for _, _, w, h in bboxes]
    assert min(sizes) < 32 ** 2 and max(sizes) > 96 ** 2


@pytest.mark.parametrize("geometry", ["bbox", "poly"])
def test_src_eval_equals_cocoeval_on_the_original_file(fidelity, tmp_path, geometry):
    ann_file, lines, cat_ids, _ = fidelity
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines[geometry]), encoding="utf-8")
    m = evaluate(read_predictions(pred))
    iou_types = ["bbox", "segm"] if geometry == "poly" else ["bbox"]
    for iou_type in iou_types:
        stats, per_cat = reference(ann_file, reference_results(lines[geometry], cat_ids, iou_type), iou_type)
        for k, v in stats.items():
            assert m[f"{iou_type}_{k}"] == pytest.approx(v, abs=1e-6), (iou_type, k)
        assert m[f"{iou_type}_AP_per_category"].keys() == per_cat.keys()
        for name, v in per_cat.items():
            assert m[f"{iou_type}_AP_per_category"][name] == pytest.approx(v, abs=1e-6), (iou_type, name)
        assert 0.05 < stats["AP"] < 0.95 and stats["AP_small"] >= 0 and stats["AP_large"] >= 0  # a non-trivial case


def test_crowd_regions_change_the_result(fidelity, tmp_path):
    """The equality above depends on the crowd regions: without them src.eval would count the
    detections on crowds as false positives."""
    _, lines, _, _ = fidelity
    no_crowd = [{**x, "eval": {k: v for k, v in x["eval"].items() if k != "crowd"}} for x in lines["bbox"]]
    paths = []
    for name, ls in (("with", lines["bbox"]), ("without", no_crowd)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in ls), encoding="utf-8")
        paths.append(p)
    assert evaluate(read_predictions(paths[0]))["bbox_AP"] != evaluate(read_predictions(paths[1]))["bbox_AP"]


def test_coco_results_file_scores_the_same_with_pycocotools(fidelity, tmp_path, capsys):
    ann_file, lines, _, tmp = fidelity
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines["poly"]), encoding="utf-8")
    results, metrics = tmp_path / "res" / "results.json", tmp_path / "m.json"
    assert main(["--pred", str(pred), "--out", str(metrics), "--coco-results", str(results),
                 "--categories", str(tmp / "poly.categories.json")]) == 0
    assert "detections written to" in capsys.readouterr().out
    m = json.loads(metrics.read_text(encoding="utf-8"))
    dets = json.loads(results.read_text())
    assert len(dets) == sum(len(x["pred"]) for x in lines["poly"])
    assert set(dets[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    stats, _ = reference(ann_file, dets, "bbox")
    assert stats["AP"] == pytest.approx(m["bbox_AP"], abs=1e-6) and stats["AP_small"] == pytest.approx(m["bbox_AP_small"], abs=1e-6)
    segm_only = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    stats, _ = reference(ann_file, segm_only, "segm")
    assert stats["AP"] == pytest.approx(m["segm_AP"], abs=1e-6) and stats["AP_large"] == pytest.approx(m["segm_AP_large"], abs=1e-6)


def test_coco_results_without_categories_and_unknown_descs(tmp_path, capsys):
    lines = [{"image": "x.png", "width": 50, "height": 50, "gt": [{"desc": "a", "bbox_2d": [1, 1, 20, 20]}],
              "pred": [{"desc": "a", "bbox_2d": [1, 1, 20, 20]}, {"desc": "zz", "bbox_2d": [2, 2, 9, 9]}]}]
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps(lines[0]) + "\n")
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps({"categories": [{"id": 17, "name": "a"}]}))
    assert main(["--pred", str(pred), "--coco-results", str(tmp_path / "r.json"), "--categories", str(cats)]) == 0
    assert "1 prediction(s) left out" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text()) == [{"image_id": 1, "category_id": 17, "bbox": [1.0, 1.0, 19.0, 19.0], "score": 1.0}]  # appearance score 1 - 0/3
    assert main(["--pred", str(pred), "--coco-results", str(tmp_path / "r2.json")]) == 0
    assert "sorted desc order" in capsys.readouterr().out
    assert [d["category_id"] for d in json.loads((tmp_path / "r2.json").read_text())] == [1, 2]


# ------------------------------------------------------------------------------------------- LVIS


def interpolated_ap(hits: list[bool], num_gt: int) -> float:
    """COCO / LVIS 101-point interpolated AP of a ranked list of hits (independent of pycocotools)."""
    tp = np.cumsum(hits)
    prec, rec = tp / np.arange(1, len(hits) + 1), tp / num_gt
    return sum((prec[rec >= r - 1e-12].max() if (rec >= r - 1e-12).any() else 0.0) for r in np.linspace(0, 1, 101)) / 101


def box(x: float, desc: str, score: float | None = None) -> dict:
    out = {"desc": desc, "bbox_2d": [x, 10, x + 20, 30]}
    return out if score is None else {**out, "score": score}


def lvis_line(img_id: int, gt: list[dict], pred: list[dict], neg=(), nel=(), freq=None) -> dict:
    return {"image": f"{img_id}.png", "width": 400, "height": 100, "gt": gt, "pred": pred,
            "eval": {"image_id": img_id, "neg_categories": list(neg), "not_exhaustive_categories": list(nel),
                     "frequency": freq or {}}}


def lvis(tmp_path: Path, lines: list[dict]) -> dict:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return evaluate(read_predictions(p))


def test_lvis_unlisted_category_is_not_penalised_but_a_negative_one_is(tmp_path):
    # image 1 has GT "a"; image 2 has GT "b". A "b" detection on image 1 (score .9) is a false positive
    # only when image 1 lists "b" as verified absent (neg); plain COCO always counts it.
    def lines(neg):
        return [lvis_line(1, [box(10, "a")], [box(10, "a", 0.8), box(200, "b", 0.9)], neg=neg),
                lvis_line(2, [box(10, "b")], [box(10, "b", 0.5)])]

    m = lvis(tmp_path, lines(neg=[]))
    assert m["lvis_bbox_AP"] == pytest.approx(1.0)  # "a": 1, "b": the image-1 detection is ignored
    assert m["bbox_AP"] == pytest.approx((1.0 + interpolated_ap([False, True], 1)) / 2)  # COCO penalises it
    m = lvis(tmp_path, lines(neg=["b"]))
    assert m["lvis_bbox_AP"] == pytest.approx((1.0 + interpolated_ap([False, True], 1)) / 2)
    assert m["lvis_bbox_AP50"] == pytest.approx(m["lvis_bbox_AP"]) and m["lvis_bbox_AR300"] == pytest.approx(1.0)


def test_lvis_not_exhaustive_ignores_unmatched_detections_only(tmp_path):
    # one GT "a"; detections: unmatched (.9), hit (.8), unmatched (.7)
    preds = [box(150, "a", 0.9), box(10, "a", 0.8), box(300, "a", 0.7)]
    m = lvis(tmp_path, [lvis_line(1, [box(10, "a")], preds, nel=["a"])])
    assert m["lvis_bbox_AP"] == pytest.approx(1.0)
    m = lvis(tmp_path, [lvis_line(1, [box(10, "a")], preds)])
    assert m["lvis_bbox_AP"] == pytest.approx(interpolated_ap([False, True, False], 1))
    # a not-exhaustive category whose only detection misses: no TP at all
    m = lvis(tmp_path, [lvis_line(1, [box(10, "a")], [box(150, "a", 0.9)], nel=["a"])])
    assert m["lvis_bbox_AP"] == pytest.approx(0.0)


def test_lvis_keeps_300_detections_per_image_before_the_federated_filter(tmp_path):
    # 300 higher-scored detections of "c" (neither annotated nor negative: dropped afterwards) push the
    # only "a" hit out of the image's top 300; with 299 it stays.
    for n_c, expected in ((300, 0.0), (299, 1.0)):
        preds = [box(300, "c", 0.9 + i * 1e-5) for i in range(n_c)] + [box(10, "a", 0.5)]
        m = lvis(tmp_path, [lvis_line(1, [box(10, "a")], preds)])
        assert m["lvis_bbox_AP"] == pytest.approx(expected)


def test_lvis_frequency_groups_and_non_lvis_files(tmp_path):
    freq = {"a": "r", "b": "f"}
    m = lvis(tmp_path, [lvis_line(1, [box(10, "a"), box(100, "b")], [box(10, "a", 0.9), box(250, "b", 0.8)], freq=freq)])
    assert (m["lvis_bbox_AP_rare"], m["lvis_bbox_AP_frequent"], m["lvis_bbox_AP_common"]) == (pytest.approx(1.0), pytest.approx(0.0), None)
    assert m["lvis_bbox_AP"] == pytest.approx(0.5) and m["lvis_segm_AP"] is None
    plain = {"image": "x.png", "width": 400, "height": 100, "gt": [box(10, "a")], "pred": [box(10, "a")]}
    m = lvis(tmp_path, [plain])
    assert all(m[k] is None for k in m if k.startswith("lvis_")) and m["bbox_AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad_eval, needle", [
    ({"objects": [{"bbox": [1, 2, 3], "area": 1}]}, "eval.objects[0]: 'bbox' must be [x, y, w, h]"),
    ({"objects": []}, "'eval.objects' has 0 entries but the record has 1 objects"),
    ({"crowd": [{"bbox": [1, 2, 3, 4], "area": 1}]}, "eval.crowd[0]: 'desc': must be a non-empty string"),
    ({"neg_categories": []}, "come together"),
    ({"color": 1}, "eval: unknown key(s) ['color']"),
])
def test_bad_eval_field_exits_2_with_one_line(tmp_path, capsys, bad_eval, needle):
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"image": "x.png", "width": 50, "height": 50, "gt": [box(1, "a")], "pred": [], "eval": bad_eval}) + "\n")
    assert main(["--pred", str(pred)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.startswith(f"error: {pred}:1:") and len(err.splitlines()) == 1


def test_score_ties_break_by_source_image_id(tmp_path):
    """COCOeval ranks equal scores by image id order; the lines carry the source ids (file order 20,
    10), so the miss on image 10 ranks before the hit on image 20, as in the source file."""
    lines = [{"image": f"{i}.png", "width": 400, "height": 100, "gt": [box(10, "a")], "pred": [box(x, "a", 0.5)],
              "eval": {"image_id": i, "objects": [{"bbox": [10, 10, 20, 20], "area": 400}]}} for i, x in ((20, 10), (10, 200))]
    assert lvis(tmp_path, lines)["bbox_AP"] == pytest.approx(interpolated_ap([False, True], 2))
    for x in lines:
        del x["eval"]  # no source ids: line order decides
    assert lvis(tmp_path, lines)["bbox_AP"] == pytest.approx(interpolated_ap([True, False], 2))
