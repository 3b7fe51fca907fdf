"""src.infer on a tiny model (one line per image, pixel coords, GT copied) and src.visualize's pictures."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np

import pytest

from src import infer, visualize
from src.data.make_shapes import make_shapes

LINE_KEYS = {"image", "width", "height", "id", "gt", "pred", "raw_text", "truncated", "malformed", "hit_max_new_tokens", "dropped_invalid"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=6, seed=0, image_size=64)["val"]


@pytest.fixture(scope="module")
def pred_file(tmp_path_factory, tiny_model_dirs, shapes) -> Path:
    out = tmp_path_factory.mktemp("infer")
    cfg = out / "decode.yaml"
    cfg.write_text("custom:\n  extra:\n    rollout_matching:\n      max_new_tokens: 24\n      decode_batch_size: 2\n")
    pred = out / "pred.jsonl"
    assert infer.main(["--model", str(tiny_model_dirs["qwen3_vl"]), "--jsonl", str(shapes), "--out", str(pred),
                       "--config", str(cfg), "--limit", "3"]) == 0
    return pred


def test_infer_writes_one_line_per_image(pred_file, shapes):
    lines = [json.loads(x) for x in pred_file.read_text().splitlines()]
    source = [json.loads(x) for x in shapes.read_text().splitlines()][:3]
    assert len(lines) == 3
    assert not list(pred_file.parent.glob(".pred.jsonl.*"))  # no temp file left
    for line, rec in zip(lines, source):
        assert set(line) == LINE_KEYS and line["id"] == rec["id"]
        assert Path(line["image"]).is_file() and (line["width"], line["height"]) == (rec["width"], rec["height"])
        assert [o["desc"] for o in line["gt"]] == [o["desc"] for o in rec["objects"]]
        for got, want in zip(line["gt"], rec["objects"]):
            geom = "bbox_2d" if "bbox_2d" in want else "poly"
            assert got[geom] == want[geom]  # the JSONL's own pixels
        for o in line["pred"]:
            coords = o.get("bbox_2d", o.get("poly"))
            assert all(0 <= v <= line["width"] - 1 for v in coords[0::2]) and all(0 <= v <= line["height"] - 1 for v in coords[1::2])
        assert isinstance(line["raw_text"], str) and line["dropped_invalid"] >= 0
        assert all(isinstance(line[k], bool) for k in ("truncated", "malformed", "hit_max_new_tokens"))
        assert not (line["truncated"] and line["malformed"])  # one meaning per word: never both


def test_eval_reads_infer_output(pred_file, capsys):
    from src.eval import main

    assert main(["--pred", str(pred_file)]) == 0
    assert "bbox" in capsys.readouterr().out


def test_infer_bad_inputs_exit_2(tmp_path, capsys, shapes, tiny_model_dirs):
    cases = [
        (["--model", str(tmp_path / "nope"), "--jsonl", str(shapes)], "not a directory"),
        (["--model", str(tmp_path), "--jsonl", str(shapes)], "cannot load a model"),
        (["--model", str(tiny_model_dirs["qwen3_vl"]), "--jsonl", str(tmp_path / "missing.jsonl")], "file not found"),
    ]
    for args, expect in cases:
        assert infer.main([*args, "--out", str(tmp_path / "p.jsonl")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "p.jsonl").exists()


def test_infer_refuses_a_record_whose_size_differs_from_its_image(tmp_path, capsys, shapes, tiny_model_dirs, monkeypatch):
    rows = [json.loads(x) for x in shapes.read_text().splitlines()][:2]
    rows[1]["height"] += 10
    bad = shapes.parent / "size_mismatch.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(infer, "load_model", lambda *a: pytest.fail("model loaded before the image sizes were checked"))
    assert infer.main(["--model", str(tiny_model_dirs["qwen3_vl"]), "--jsonl", str(bad), "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "size_mismatch.jsonl:2: the record says 64x74 (width x height) but" in err[0], err
    assert "is 64x64 (stored pixels, EXIF orientation not applied)" in err[0]
    assert not (tmp_path / "p.jsonl").exists()


def test_visualize_writes_pictures_and_index(tmp_path, pred_file):
    from PIL import Image

    out = tmp_path / "vis"
    assert visualize.main(["--pred", str(pred_file), "--out", str(out), "--limit", "2"]) == 0
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 2 and (out / "contact_sheet.png").is_file()
    with Image.open(pngs[0]) as im:
        assert max(im.size) >= visualize.MIN_SIDE
    index = (out / "index.html").read_text()
    assert all(p.name in index for p in pngs) and "FN" in index


def test_visualize_bad_input_exits_2(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text("not json\n")
    assert visualize.main(["--pred", str(bad), "--out", str(tmp_path / "vis")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:1:" in err[0]


def test_visualize_refuses_an_image_whose_size_differs_from_the_line(tmp_path, capsys, pred_file):
    line = json.loads(pred_file.read_text().splitlines()[0])
    line["width"] += 1
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps(line) + "\n")
    assert visualize.main(["--pred", str(bad), "--out", str(tmp_path / "vis")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:1: the record says 65x64 (width x height) but {line['image']} is 64x64" in err[0], err


# ----------------------------------------------------------------------------------------- pictures


def disjoint_and_inside(rects, width: int, height: int) -> None:
    for a, b in itertools.combinations(rects, 2):
        assert not a.overlaps(b), (a, b)
        assert max(a.x1, b.x1) >= min(a.x2, b.x2) or max(a.y1, b.y1) >= min(a.y2, b.y2)  # no shared pixel
    for r in rects:
        assert 0 <= r.x1 < r.x2 <= width and 0 <= r.y1 < r.y2 <= height, r


def test_place_labels_crowd_is_disjoint_and_inside_the_canvas():
    from src.visualize import LabelRequest, Rect, place_labels

    rng = random.Random(0)
    anchors = [Rect(150 + rng.randint(-3, 3), 100 + rng.randint(-3, 3), 210, 160) for _ in range(40)]
    anchors += [Rect(380, 280, 400, 300), Rect(-10, -10, 5, 5), Rect(390, 0, 420, 10)]  # at / over the edges
    requests = [LabelRequest(a, rng.randint(20, 50), rng.randint(10, 14), rng.random() < 0.5) for a in anchors]
    placed = place_labels(requests, 400, 300)
    assert len(placed) == len(requests) and all(r is not None for r in placed)  # room enough for all
    disjoint_and_inside(placed, 400, 300)
    for req, r in zip(requests, placed):
        assert (r.width, r.height) == (req.width, req.height)
    first = requests[0]  # the first label gets its preferred side, 2 px off the outline
    assert (placed[0].x1, placed[0].y1) == ((first.anchor.x1, first.anchor.y2 + 2) if first.below else (first.anchor.x1, first.anchor.y1 - first.height - 2))


def test_place_labels_leaves_out_what_does_not_fit():
    from src.visualize import LabelRequest, Rect, place_labels

    requests = [LabelRequest(Rect(10, 10, 20, 20), 30, 10, True) for _ in range(12)] + [LabelRequest(Rect(0, 0, 5, 5), 200, 10, True)]
    placed = place_labels(requests, 100, 40)  # room for at most 3 x 4 labels of 30 x 10
    kept = [r for r in placed if r is not None]
    assert 4 <= len(kept) < 12 and placed[-1] is None  # some left out; wider than the canvas: left out
    disjoint_and_inside(kept, 100, 40)


def det(desc: str, box, width: int, height: int):
    from src.data.coords import pixels_to_bins
    from src.data.objects import DetObject

    return DetObject(desc, "bbox_2d", pixels_to_bins(box, width, height, "bbox_2d")), tuple(float(v) for v in box)


def predictions(tmp_path: Path, gt, pred, width: int = 64, height: int = 48):
    """An ImagePredictions over a grey ``width`` x ``height`` PNG (no colour of the legend in it)."""
    from PIL import Image

    from src.eval import ImagePredictions

    Image.new("RGB", (width, height), (90, 90, 90)).save(tmp_path / "grey.png")
    g = [det(d, b, width, height) for d, b in gt]
    p = [det(d, b, width, height) for d, b in pred]
    return ImagePredictions(image=str(tmp_path / "grey.png"), width=width, height=height, gt=tuple(o for o, _ in g),
                            gt_pixels=tuple(x for _, x in g), pred=tuple(o for o, _ in p), pred_pixels=tuple(x for _, x in p),
                            scores=(1.0,) * len(p), source="pred.jsonl:1")


def test_render_places_every_label_without_overlap(tmp_path):
    """A crowd of overlapping GT and predictions (the "GT personck" case): every label is drawn, the
    labels are pairwise disjoint, inside the image area (above the footer), and each shows its colour."""
    gt = [(f"person {k}", (10 + k, 10 + k, 40 + k, 40 + k)) for k in range(12)]
    pred = [(f"person {k}", (11 + k, 9 + k, 41 + k, 41 + k)) for k in range(12)]
    r = visualize.render(predictions(tmp_path, gt, pred))
    width, height = r.image.size
    assert r.hidden_labels == 0 and len(r.labels) == 24
    assert {lab.text for lab in r.labels} == {f"GT person {k}" for k in range(12)} | {f"{k + 1}. person {k}" for k in range(12)}
    disjoint_and_inside([lab.rect for lab in r.labels], width, height - visualize.FOOTER)
    pixels = np.asarray(r.image)
    for lab in r.labels:
        inside = pixels[lab.rect.y1 : lab.rect.y2, lab.rect.x1 : lab.rect.x2].reshape(-1, 3)
        assert (inside == lab.colour).all(axis=1).any(), lab  # its text was not drawn over


def test_outline_on_the_right_and_bottom_edge_stays_on_the_canvas(tmp_path):
    """A box with x2 = width and y2 = height (allowed by the data contract) keeps its right and bottom
    lines on the last column / row of the image area; an interior box's lines sit at x * scale."""
    im = predictions(tmp_path, [("edge", (32, 24, 64, 48))], [("inner", (8, 8, 24, 20))])
    r = visualize.render(im)
    scale = visualize.MIN_SIDE / 64  # 8
    w, h = r.image.size[0], r.image.size[1] - visualize.FOOTER  # the image area
    pixels = np.asarray(r.image)[:h]  # [h, w, 3]
    fn = np.all(pixels == visualize.COLOURS["fn"], axis=2)  # the unmatched GT: orange, dashed
    fp = np.all(pixels == visualize.COLOURS["fp"], axis=2)  # the unmatched prediction: red
    assert fn[int(24 * scale) :, w - 1].sum() > 0.3 * (h - 24 * scale)  # right edge, dashes visible
    assert fn[h - 1, int(32 * scale) :].sum() > 0.3 * (w - 32 * scale)  # bottom edge
    for x in (int(8 * scale), int(24 * scale)):  # interior verticals pass through column x * scale
        assert fp[int(10 * scale) : int(18 * scale), x].all()


def test_invalid_predictions_are_not_drawn_and_the_picture_is_made(tmp_path):
    """One verdict per box across tools: an inverted predicted box is an invalid object for the parser,
    for src.eval (counted, not scored) and for src.visualize (counted, not drawn) — never a refused file."""
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / "grey.png")
    line = {"image": "grey.png", "width": 64, "height": 48, "gt": [{"desc": "a", "bbox_2d": [8, 8, 24, 20]}],
            "pred": [{"desc": "a", "bbox_2d": [8, 8, 24, 20]}, {"desc": "bad", "bbox_2d": [40, 30, 20, 10]}]}
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps(line) + "\n")
    (path,) = visualize.visualize(pred, tmp_path / "vis")
    assert path.exists()
    from dataclasses import replace

    from src.eval import read_predictions

    (im,) = read_predictions(pred)
    assert im.pred_invalid == 1 and [o.desc for o in im.pred] == ["a"]
    r = visualize.render(replace(im, image=str(tmp_path / "grey.png")))
    assert [lab.text for lab in r.labels if not lab.text.startswith("GT")] == ["1. a"] and r.counts.fp == 0
