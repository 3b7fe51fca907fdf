"""src.data.convert: COCO / LVIS / ODVG files built here, converted records checked exactly; every edge
case (crowd, empty image, unicode category, box outside the image, zero size, multi-part polygon, RLE);
--max-objects; the summary with the real tokenizer; bad input -> one line, exit 2, nothing written."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from src.data.contract import load_jsonl
from src.data.convert import convert, main
from src.data.convert.summary import answer_text
from src.data.serialize import order_objects, serialize_objects

CAFE = "cafe\u0301 mug"  # decomposed: the converter stores NFC
CAFE_NFC = unicodedata.normalize("NFC", CAFE)
CROWD_RLE = {"size": [80, 100], "counts": [0, 50, 30, 50, 7870]}


def coco_dict() -> dict:
    """Three images (one with no annotations), two categories (one unicode), every COCO edge case."""
    return {
        "images": [
            {"id": 42, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 7, "file_name": "sub/b.jpg", "width": 50, "height": 50},
            {"id": 9, "file_name": "c.jpg", "width": 64, "height": 64},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": CAFE}],
        "annotations": [
            # a box and its one-part polygon, inside the image: kept exactly
            {"id": 10, "image_id": 42, "category_id": 1, "bbox": [10.5, 20, 30, 40.25], "area": 900.5, "iscrowd": 0,
             "segmentation": [[10.5, 20, 40.5, 20, 40.5, 60.25, 10.5, 60.25]]},
            # sticks out of the image (x to 110 > 100, y to 90 > 80); two polygon parts
            {"id": 11, "image_id": 42, "category_id": 3, "bbox": [80, 70, 30, 20], "area": 300, "iscrowd": 0,
             "segmentation": [[80, 70, 110, 70, 110, 90], [85, 75, 86, 75, 86, 76]]},
            # crowd region (RLE): never a training object
            {"id": 12, "image_id": 42, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2000, "iscrowd": 1, "segmentation": CROWD_RLE},
            # zero width: skipped, kept as evaluation GT
            {"id": 13, "image_id": 7, "category_id": 3, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0,
             "segmentation": [[5, 5, 5, 15, 5, 10]]},
            # a non-crowd RLE mask: a box for training (poly geometry), its mask kept for evaluation
            {"id": 14, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0,
             "segmentation": {"size": [50, 50], "counts": [52, 4, 46, 4, 2394]}},
            # wholly outside the image
            {"id": 15, "image_id": 7, "category_id": 1, "bbox": [60, 60, 5, 5], "area": 25, "iscrowd": 0,
             "segmentation": [[60, 60, 65, 60, 65, 65]]},
        ],
    }


def write_source(tmp_path: Path, data: dict | str, name: str = "ann.json", files=("a.jpg", "sub/b.jpg", "c.jpg")) -> tuple[Path, Path]:
    images = tmp_path / "images"
    for f in files:
        (images / f).parent.mkdir(parents=True, exist_ok=True)
        (images / f).write_bytes(b"")
    ann = tmp_path / name
    ann.write_text(data if isinstance(data, str) else json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return ann, images


def read_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_coco_bbox_records_exact(tmp_path):
    ann, images = write_source(tmp_path, coco_dict())
    out = tmp_path / "data" / "train.jsonl"
    s = convert("coco", ann, images, out)
    assert read_lines(out) == [
        {"id": "42", "images": ["../images/a.jpg"], "width": 100, "height": 80,
         "objects": [{"desc": "person", "bbox_2d": [10.5, 20, 40.5, 60.25]}, {"desc": CAFE_NFC, "bbox_2d": [80, 70, 100, 80]}],
         "eval": {"image_id": 42, "objects": [{"bbox": [10.5, 20, 30, 40.25], "area": 900.5}, {"bbox": [80, 70, 30, 20], "area": 300}],
                  "crowd": [{"desc": "person", "bbox": [0, 0, 50, 50], "area": 2000}]}},
        {"id": "7", "images": ["../images/sub/b.jpg"], "width": 50, "height": 50,
         "objects": [{"desc": "person", "bbox_2d": [1, 2, 4, 6]}],
         "eval": {"image_id": 7, "objects": [{"bbox": [1, 2, 3, 4], "area": 12}],
                  "skipped": [{"desc": CAFE_NFC, "bbox": [5, 5, 0, 10], "area": 0, "reason": "zero_size"},
                              {"desc": "person", "bbox": [60, 60, 5, 5], "area": 25, "reason": "outside_image"}]}},
        {"id": "9", "images": ["../images/c.jpg"], "width": 64, "height": 64, "objects": [], "eval": {"image_id": 9, "objects": []}},
    ]
    cats = json.loads((tmp_path / "data" / "train.categories.json").read_text(encoding="utf-8"))
    assert cats == {"categories": [{"id": 1, "name": "person", "desc": "person", "objects": 2},
                                   {"id": 3, "name": CAFE, "desc": CAFE_NFC, "objects": 1}]}
    assert s.edge_cases == {"crowd": 1, "clipped": 1, "skipped_zero_size": 1, "skipped_outside_image": 1, "dropped_max_objects": 0,
                            "multipart_polygons": 0, "rle_as_bbox": 0, "no_polygon_as_bbox": 0, "area_from_bbox": 0}
    assert (s.images, s.objects, s.objects_per_image) == (3, 3, [2, 1, 0])
    assert not list(out.parent.glob(".*"))  # no temp files left


def test_coco_poly_records_exact(tmp_path):
    ann, images = write_source(tmp_path, coco_dict())
    out = tmp_path / "train.jsonl"
    s = convert("coco", ann, images, out, geometry="poly")
    first, second, third = read_lines(out)
    assert first["objects"] == [
        {"desc": "person", "poly": [10.5, 20, 40.5, 20, 40.5, 60.25, 10.5, 60.25]},  # the source polygon, exactly
        {"desc": CAFE_NFC, "poly": [80, 70, 100, 70, 100, 80]},  # the larger part, clipped to the image
    ]
    assert first["eval"] == {
        "image_id": 42,
        "objects": [{"bbox": [10.5, 20, 30, 40.25], "area": 900.5},  # the poly IS the source mask: nothing more
                    {"bbox": [80, 70, 30, 20], "area": 300, "segmentation": [[80, 70, 110, 70, 110, 90], [85, 75, 86, 75, 86, 76]]}],
        "crowd": [{"desc": "person", "bbox": [0, 0, 50, 50], "area": 2000, "segmentation": CROWD_RLE}],
    }
    assert second["objects"] == [{"desc": "person", "bbox_2d": [1, 2, 4, 6]}]  # RLE -> its box
    assert second["eval"]["objects"] == [{"bbox": [1, 2, 3, 4], "area": 12, "segmentation": {"size": [50, 50], "counts": [52, 4, 46, 4, 2394]}}]
    assert [r["reason"] for r in second["eval"]["skipped"]] == ["zero_size", "outside_image"]
    assert second["eval"]["skipped"][0]["segmentation"] == [[5, 5, 5, 15, 5, 10]]
    assert third["objects"] == []
    assert (s.edge_cases["multipart_polygons"], s.edge_cases["rle_as_bbox"], s.edge_cases["clipped"]) == (1, 1, 1)


def test_converted_records_train_as_before(tmp_path):
    """The contract reads converted records; crowd regions are not objects; training drops 'eval'."""
    ann, images = write_source(tmp_path, coco_dict())
    out = tmp_path / "train.jsonl"
    convert("coco", ann, images, out, geometry="poly")
    with_eval, _ = load_jsonl(out)
    without, _ = load_jsonl(out, keep_eval=False)
    assert [len(r.objects) for r in with_eval] == [2, 1, 0]
    assert with_eval[0].eval.crowd[0].desc == "person" and with_eval[0].eval.image_id == 42
    assert all(r.eval is None for r in without)
    stripped = tmp_path / "stripped.jsonl"
    stripped.write_text("".join(json.dumps({k: v for k, v in rec.items() if k != "eval"}) + "\n" for rec in read_lines(out)))
    plain, _ = load_jsonl(stripped)
    assert [answer_text(r) for r in plain] == [answer_text(r) for r in without]
    assert [r.objects for r in plain] == [r.objects for r in with_eval]


def test_max_objects_keeps_the_largest(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": [i * 10, 0, 5, 5], "area": a, "iscrowd": 0}
                            for i, a in enumerate([10, 40, 30, 40, 5])]}
    ann, images = write_source(tmp_path, data, files=("a.jpg",))
    out = tmp_path / "t.jsonl"
    s = convert("coco", ann, images, out, max_objects=3)
    rec = read_lines(out)[0]
    # areas 40, 40 (ties: the earlier first), 30 kept, in annotation order; 10 and 5 go to eval.skipped
    assert [o["bbox_2d"][0] for o in rec["objects"]] == [10, 20, 30]
    assert [(r["bbox"][0], r["reason"]) for r in rec["eval"]["skipped"]] == [(0, "max_objects"), (40, "max_objects")]
    assert s.edge_cases["dropped_max_objects"] == 2


def lvis_dict() -> dict:
    return {
        "images": [
            {"id": 5, "coco_url": "http://images.cocodataset.org/val2017/000000000005.jpg", "width": 40, "height": 30,
             "neg_category_ids": [3], "not_exhaustive_category_ids": [1]},
            {"id": 6, "coco_url": "http://images.cocodataset.org/train2017/000000000006.jpg", "width": 40, "height": 30,
             "neg_category_ids": [], "not_exhaustive_category_ids": []},
        ],
        "categories": [{"id": 1, "name": "aerosol_can", "frequency": "c"}, {"id": 2, "name": "bow_(weapon)", "frequency": "r"},
                       {"id": 3, "name": "zebra", "frequency": "f"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 2, 10, 8], "area": 60.5, "segmentation": [[1, 2, 11, 2, 11, 10]]},
            {"id": 2, "image_id": 5, "category_id": 2, "bbox": [20, 5, 5, 5], "area": 20, "segmentation": [[20, 5, 25, 5, 25, 10, 20, 10]]},
        ],
    }


def test_lvis_records_exact(tmp_path):
    ann, images = write_source(tmp_path, lvis_dict(), files=("val2017/000000000005.jpg", "train2017/000000000006.jpg"))
    out = tmp_path / "lvis.jsonl"
    convert("lvis", ann, images, out, geometry="poly")
    assert read_lines(out) == [
        {"id": "5", "images": ["images/val2017/000000000005.jpg"], "width": 40, "height": 30,
         "objects": [{"desc": "aerosol_can", "poly": [1, 2, 11, 2, 11, 10]}, {"desc": "bow_(weapon)", "poly": [20, 5, 25, 5, 25, 10, 20, 10]}],
         "eval": {"image_id": 5, "objects": [{"bbox": [1, 2, 10, 8], "area": 60.5}, {"bbox": [20, 5, 5, 5], "area": 20}],
                  "neg_categories": ["zebra"], "not_exhaustive_categories": ["aerosol_can"],
                  "frequency": {"aerosol_can": "c", "bow_(weapon)": "r"}}},
        {"id": "6", "images": ["images/train2017/000000000006.jpg"], "width": 40, "height": 30, "objects": [],
         "eval": {"image_id": 6, "objects": [], "neg_categories": [], "not_exhaustive_categories": [], "frequency": {}}},
    ]
    cats = json.loads((tmp_path / "lvis.categories.json").read_text())["categories"]
    assert [(c["id"], c["frequency"], c["objects"]) for c in cats] == [(1, "c", 1), (2, "r", 1), (3, "f", 0)]


def test_odvg_records_exact(tmp_path):
    lines = [
        {"filename": "a.jpg", "height": 80, "width": 100, "detection": {"instances": [
            {"bbox": [10, 20, 50.5, 60], "label": 0, "category": "person"},
            {"bbox": [90, 70, 120, 95], "label": 2, "category": CAFE},   # outside: clipped
            {"bbox": [5, 5, 5, 30], "label": 0, "category": "person"},    # zero width: skipped
        ]}},
        {"filename": "c.jpg", "height": 64, "width": 64, "detection": {"instances": []}},
    ]
    ann, images = write_source(tmp_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), name="odvg.jsonl")
    out = tmp_path / "out" / "odvg_train.jsonl"
    s = convert("odvg", ann, images, out)
    assert read_lines(out) == [
        {"id": "1", "images": ["../images/a.jpg"], "width": 100, "height": 80,
         "objects": [{"desc": "person", "bbox_2d": [10, 20, 50.5, 60]}, {"desc": CAFE_NFC, "bbox_2d": [90, 70, 100, 80]}],
         "eval": {"image_id": 1, "objects": [{"bbox": [10, 20, 40.5, 40], "area": 1620.0}, {"bbox": [90, 70, 30, 25], "area": 750}],
                  "skipped": [{"desc": "person", "bbox": [5, 5, 0, 25], "area": 0, "reason": "zero_size"}]}},
        {"id": "2", "images": ["../images/c.jpg"], "width": 64, "height": 64, "objects": [], "eval": {"image_id": 2, "objects": []}},
    ]
    cats = json.loads((out.parent / "odvg_train.categories.json").read_text(encoding="utf-8"))["categories"]
    assert [(c["id"], c["desc"]) for c in cats] == [(0, "person"), (2, CAFE_NFC)]
    assert (s.edge_cases["clipped"], s.edge_cases["skipped_zero_size"]) == (1, 1)


def test_summary_counts_tokens_with_the_real_tokenizer(tmp_path, capsys, qwen_tokenizer):
    ann, images = write_source(tmp_path, coco_dict())
    out = tmp_path / "train.jsonl"
    assert main(["coco", "--ann", str(ann), "--images", str(images), "--out", str(out), "--max-new-tokens", "40"]) == 0
    printed = capsys.readouterr().out
    records, _ = load_jsonl(out)
    lengths = sorted(len(qwen_tokenizer(serialize_objects(order_objects(r.objects, "sorted")), add_special_tokens=False)["input_ids"]) + 1
                     for r in records)  # + <|im_end|>
    assert lengths[-1] > 40 > lengths[0]  # the densest answer is cut at 40 tokens, the empty one ({}) is not
    assert f"p50 {lengths[1]}  p90 {lengths[2]}  max {lengths[2]}   max_new_tokens 40" in printed
    cut = sum(n > 40 for n in lengths)
    assert f"warning: {cut} of 3 images" in printed and "--max-objects" in printed
    assert "images 3   objects 3" in printed and f"person 2, {CAFE_NFC} 1" in printed
    assert "crowd 1, clipped 1, skipped_zero_size 1, skipped_outside_image 1" in printed


def test_check_validates_and_summarises(tmp_path, capsys):
    ann, images = write_source(tmp_path, coco_dict())
    out = tmp_path / "train.jsonl"
    convert("coco", ann, images, out)
    assert main(["check", str(out), "--no-token-stats"]) == 0
    assert "images 3   objects 3 (1.00/image)   images without objects 1" in capsys.readouterr().out
    (images / "c.jpg").unlink()
    assert main(["check", str(out), "--no-token-stats"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out}:3:") and "image file not found" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("case, needle", [
    ("missing_file", "annotation file not found"),
    ("malformed", "malformed JSON (Expecting ',' delimiter at line 1 column 15, char 14)"),
    ("unknown_category", "annotations[0] (id 10): category_id 99 is not in 'categories'"),
    ("missing_image", "images[1] (id 7): image file not found"),
    ("duplicate_name", "categories 1 and 3 are both named 'person'"),
    ("unknown_image", "image_id 1234 is not in 'images'"),
    ("bad_bbox", "'bbox' must be [x, y, w, h]"),
    ("odvg_malformed", ".jsonl:2: malformed JSON"),
    ("odvg_grounding", ".jsonl:1: needs 'detection'"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case, needle):
    data = coco_dict()
    fmt, name, files = "coco", "ann.json", ("a.jpg", "sub/b.jpg", "c.jpg")
    if case == "malformed":
        data = '{"images": [] "annotations": []}'
    elif case == "unknown_category":
        data["annotations"][0]["category_id"] = 99
    elif case == "missing_image":
        files = ("a.jpg", "c.jpg")
    elif case == "duplicate_name":
        data["categories"][1]["name"] = "person"
    elif case == "unknown_image":
        data["annotations"][3]["image_id"] = 1234
    elif case == "bad_bbox":
        data["annotations"][2]["bbox"] = [1, 2, "3", 4]
    elif case.startswith("odvg"):
        fmt, name = "odvg", "o.jsonl"
        good = json.dumps({"filename": "a.jpg", "height": 8, "width": 8, "detection": {"instances": []}})
        data = good + "\n{oops\n" if case == "odvg_malformed" else json.dumps({"filename": "a.jpg", "height": 8, "width": 8, "grounding": {}}) + "\n"
    ann, images = write_source(tmp_path, data, name=name, files=files)
    if case == "missing_file":
        ann.unlink()
    out = tmp_path / "out" / "train.jsonl"
    assert main([fmt, "--ann", str(ann), "--images", str(images), "--out", str(out), "--no-token-stats"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith(f"error: {ann}") and "Traceback" not in err
    assert not out.exists() and not (out.parent / "train.categories.json").exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no temp file either


def test_contract_refuses_a_bad_eval_naming_file_and_line(tmp_path):
    from src.data.contract import DataError

    ann, images = write_source(tmp_path, coco_dict())
    out = tmp_path / "train.jsonl"
    convert("coco", ann, images, out)
    lines = read_lines(out)
    lines[1]["eval"]["skipped"][0]["reason"] = "too_small"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=rf"^{out}:2: eval.skipped\[0\]: 'reason' must be one of"):
        load_jsonl(out)
