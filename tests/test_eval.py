"""src.eval: COCOeval figures on known cases, an independent AP cross-check, our matcher's F1, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from src.data.contract import load_jsonl
from src.data.make_shapes import make_shapes
from src.eval import appearance_scores, evaluate, main, read_predictions
from src.infer import gt_pixel_objects


def write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def line(gt: list[dict], pred: list[dict], size: int = 200) -> dict:
    return {"image": "x.png", "width": size, "height": size, "gt": gt, "pred": pred, "truncated": False, "dropped_invalid": 0}


def box(x: float, y: float, s: float = 40, desc: str = "a") -> dict:
    return {"desc": desc, "bbox_2d": [x, y, x + s, y + s]}


@pytest.fixture(scope="module")
def shapes_gt(tmp_path_factory) -> list[dict]:
    """GT of a small shapes val split as prediction lines (boxes AND polygons, in pixels)."""
    out = tmp_path_factory.mktemp("shapes")
    paths = make_shapes(out, num_train=4, num_val=6, seed=0, image_size=64)
    records, _ = load_jsonl(paths["val"])
    return [{"image": str(r.image), "width": r.width, "height": r.height, "gt": gt_pixel_objects(r)} for r in records]


def test_perfect_predictions_score_one(tmp_path, shapes_gt):
    lines = [{**g, "pred": g["gt"]} for g in shapes_gt]
    assert any("poly" in o for g in shapes_gt for o in g["gt"])
    m = evaluate(read_predictions(write_lines(tmp_path / "p.jsonl", lines)))
    assert m["bbox_AP"] == pytest.approx(1.0) and m["bbox_AP50"] == pytest.approx(1.0) and m["bbox_AR100"] == pytest.approx(1.0)
    assert m["segm_AP"] == pytest.approx(1.0)
    for t in (0.3, 0.5, 0.75):
        assert m[f"f1@{t}"] == pytest.approx(1.0)
    assert m["images"] == 6 and m["parse_valid_rate"] == 1.0


def test_boxes_only_have_no_segm(tmp_path):
    m = evaluate(read_predictions(write_lines(tmp_path / "p.jsonl", [line([box(10, 10)], [box(10, 10)])])))
    assert m["bbox_AP"] == pytest.approx(1.0) and m["segm_AP"] is None


def test_shifted_boxes_lower_ap_monotonically(tmp_path):
    gts = [box(20, 20), box(120, 30), box(40, 130), box(130, 130)]
    aps = []
    for shift in (0, 3, 6, 10, 16):
        preds = [{"desc": "a", "bbox_2d": [v + shift for v in g["bbox_2d"]]} for g in gts]
        aps.append(evaluate(read_predictions(write_lines(tmp_path / f"p{shift}.jsonl", [line(gts, preds)])))["bbox_AP"])
    assert aps[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(aps, aps[1:])) and aps[-1] < aps[1] < aps[0]


def test_empty_predictions_score_zero(tmp_path, shapes_gt):
    lines = [{**g, "pred": []} for g in shapes_gt]
    m = evaluate(read_predictions(write_lines(tmp_path / "p.jsonl", lines)))
    assert m["bbox_AP"] == 0.0 and m["bbox_AR100"] == 0.0 and m["f1@0.5"] == 0.0 and m["nonempty_rate"] == 0.0


def interpolated_ap(hits: list[bool], num_gt: int) -> float:
    """COCO's 101-point interpolated AP of a ranked list of hits (independent of pycocotools)."""
    tp = np.cumsum(hits)
    prec = tp / np.arange(1, len(hits) + 1)
    rec = tp / num_gt
    total = 0.0
    for r in np.linspace(0, 1, 101):
        at_or_above = prec[rec >= r - 1e-12]
        total += at_or_above.max() if at_or_above.size else 0.0
    return total / 101


def test_ap_cross_check_by_hand(tmp_path):
    # 1 category, 3 GT; predictions in appearance order (scores 1, 0.75, 0.5): hit, miss, hit.
    gts = [box(10, 10), box(100, 10), box(10, 100)]
    preds = [box(10, 10), box(150, 150), box(100, 10)]
    assert appearance_scores(3) == (1.0, 0.75, 0.5)
    m = evaluate(read_predictions(write_lines(tmp_path / "p.jsonl", [line(gts, preds)])))
    expected = interpolated_ap([True, False, True], 3)
    assert expected == pytest.approx(56 / 101)  # recall <= 1/3: precision 1 (34 points); <= 2/3: 2/3 (33 points)
    assert m["bbox_AP"] == pytest.approx(expected) and m["bbox_AP50"] == pytest.approx(expected)
    assert m["precision@0.5"] == pytest.approx(2 / 3) and m["recall@0.5"] == pytest.approx(2 / 3)


def test_explicit_scores_change_the_ranking(tmp_path):
    gts = [box(10, 10), box(100, 10), box(10, 100)]
    preds = [{**box(150, 150), "score": 0.1}, {**box(10, 10), "score": 0.9}, {**box(100, 10), "score": 0.8}]
    m = evaluate(read_predictions(write_lines(tmp_path / "p.jsonl", [line(gts, preds)])))
    assert m["bbox_AP"] == pytest.approx(interpolated_ap([True, True, False], 3))


def test_main_writes_json_and_table(tmp_path, capsys, shapes_gt):
    pred = write_lines(tmp_path / "p.jsonl", [{**g, "pred": g["gt"][:1]} for g in shapes_gt])
    assert main(["--pred", str(pred), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_AR100", "segm_AP", "f1@0.3", "f1@0.5", "f1@0.75",
                "precision@0.5", "recall@0.5", "images", "parse_valid_rate"):
        assert key in m
    out = capsys.readouterr().out
    assert "COCOeval" in out and "index created" not in out and "Accumulating" not in out  # pycocotools silenced


@pytest.mark.parametrize("content, expect", [
    (None, "file not found"),
    ('{"image": "x.png"\n', ":1: malformed JSON"),
    (json.dumps({"image": "x.png", "width": 10, "height": 10, "gt": []}) + "\n", ":1: missing key(s) ['pred']"),
    (json.dumps(line([{"desc": "a", "bbox_2d": [1, 2, 3]}], [box(10, 10)])) + "\n", ":1: gt: objects[0]"),  # GT stays strict
    (json.dumps(line([box(190, 10)], [box(10, 10)])) + "\n", "outside the image"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, content, expect):
    pred = tmp_path / "p.jsonl"
    if content is not None:
        pred.write_text(content)
    assert main(["--pred", str(pred)]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1 and "Traceback" not in err
    if content is not None:
        assert err.startswith(f"error: {pred}:")


# ----------------------------------------------------- one meaning per word; label-aware figures


def test_parse_health_has_one_meaning_in_training_eval_infer_and_src_eval(tmp_path, token_table):
    """A complete answer, one cut mid-way (truncated) and garbage (malformed), counted by the training
    evaluation's code (count_matches on the parse) and by src.infer's line -> src.eval: the same rates.
    Before, src.eval's truncated_rate also counted malformed answers (0.0 in training, 1.0 in src.eval)."""
    from src.config.schema import RolloutMatchingConfig
    from src.data.contract import Record
    from src.data.objects import DetObject
    from src.data.serialize import serialize_objects
    from src.infer import prediction_line
    from src.rollout_matching.parser import parse_rollout
    from src.rollout_matching.stats import DetectionCounts, count_matches, match_kwargs

    gt = (DetObject("a", "bbox_2d", (100, 100, 400, 400)),)
    record = Record(image=Path("x.png"), width=200, height=200, objects=gt, source="x.jsonl:1")
    full = token_table.encode(serialize_objects(gt)) + [token_table.im_end_id]
    responses = {"complete": full, "truncated": full[: len(full) // 2], "malformed": token_table.encode("{]]] garbage") + [token_table.im_end_id]}
    kw = match_kwargs(RolloutMatchingConfig())
    training, lines = DetectionCounts(), []
    for name, ids in responses.items():
        parsed = parse_rollout(ids, token_table)
        assert (parsed.truncated, parsed.malformed) == (name == "truncated", name == "malformed")
        training.add(count_matches(parsed, gt, kw, hit_cap=name == "truncated"))
        lines.append(prediction_line(record, parsed, token_table.text(ids), hit_max_new_tokens=name == "truncated"))
    t = training.metrics(prefix="eval_")
    m = evaluate(read_predictions(write_lines(tmp_path / "p.jsonl", lines)))
    expected = {"truncated_rate": 1 / 3, "malformed_rate": 1 / 3, "hit_max_new_tokens_rate": 1 / 3, "parse_valid_rate": 1 / 3}
    for k, v in expected.items():
        assert t[f"eval_rollout_{k}"] == pytest.approx(v) and m[k] == pytest.approx(v), k


def test_label_aware_figures_next_to_class_agnostic_ones(tmp_path):
    """Every label wrong: class-agnostic P/R/F1 = 1 (geometry only), label-aware 0. The label-aware
    matcher runs within each desc, so a prediction is not lost to a wrong-label neighbour the
    class-agnostic matcher preferred."""
    gts = [box(20, 20, desc="cat"), box(120, 120, desc="dog")]
    wrong = [box(20, 20, desc="dog"), box(120, 120, desc="cat")]
    m = evaluate(read_predictions(write_lines(tmp_path / "wrong.jsonl", [line(gts, wrong)])))
    for t in (0.3, 0.5):
        assert (m[f"precision@{t}"], m[f"recall@{t}"], m[f"f1@{t}"]) == (1.0, 1.0, 1.0)
        assert (m[f"label_precision@{t}"], m[f"label_recall@{t}"], m[f"label_f1@{t}"]) == (0.0, 0.0, 0.0)

    # Two GT: a "cat" and, shifted by 8 px, a "dog". Two predictions: "dog" exactly on the cat and "cat"
    # between the two. Class-agnostic matching pairs by geometry (dog-pred -> cat-GT, cat-pred -> dog-GT):
    # no pair has equal labels. Within each desc, cat-pred -> cat-GT and dog-pred -> dog-GT both pass 0.5.
    gts = [box(50, 50, desc="cat"), box(58, 50, desc="dog")]
    preds = [box(50, 50, desc="dog"), box(54, 50, desc="cat")]
    m = evaluate(read_predictions(write_lines(tmp_path / "cross.jsonl", [line(gts, preds)])))
    assert m["f1@0.5"] == 1.0 and m["label_f1@0.5"] == 1.0 and m["label_precision@0.5"] == 1.0
    from src.config.schema import RolloutMatchingConfig
    from src.rollout_matching.matcher import match_objects
    from src.rollout_matching.stats import match_kwargs

    im = read_predictions(tmp_path / "cross.jsonl")[0]
    agnostic = match_objects(im.pred, im.gt, **match_kwargs(RolloutMatchingConfig(), maskiou_gate=0.5)).matches
    assert not any(im.pred[i].desc == im.gt[j].desc for i, j in agnostic)  # filtering those would give 0


def test_predictions_outside_the_image_are_clipped_and_invalid_ones_counted_not_refused(tmp_path, capsys):
    """A file of 5,000 images never fails on one prediction: a box a pixel outside the image is clipped
    to it (counted in pred_clipped, then scored), an inverted box, a box entirely outside the image, an
    odd polygon, a missing desc and a NaN score are counted in pred_invalid and not scored; the other
    predictions keep their appearance-order scores."""
    lines = [line([box(10, 10)], [box(10, 10)]) for _ in range(5000)]
    lines[17]["pred"] = [{"desc": "a", "bbox_2d": [10, 10, 50, 50.5]}, {"desc": "a", "bbox_2d": [190, 150, 201, 200]}]  # 1 px out
    lines[42]["pred"] = [
        {"desc": "a", "bbox_2d": [50, 10, 10, 50]},                 # inverted
        {"desc": "a", "bbox_2d": [210, 10, 250, 50]},               # entirely outside: zero width after clipping
        {"desc": "a", "poly": [1, 2, 3, 4, 5]},                     # odd polygon
        {"bbox_2d": [10, 10, 50, 50]},                              # no desc
        {**box(10, 10), "score": float("nan")},                     # NaN score
        box(10, 10),                                                # the one valid prediction, appearance rank 5 of 6
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["--pred", str(path), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["images"] == 5000 and m["pred_clipped"] == 1 and m["pred_invalid"] == 5
    assert m["pred_objects"] == 4998 + 2 + 1
    err = capsys.readouterr().err
    assert f"note: 5 invalid prediction(s) in 1 line(s) were not scored; first: {path}:43: pred: objects[0]:" in err
    preds = read_predictions(path)
    im, clipped = preds[42], preds[17]
    assert im.pred_invalid == 5 and len(im.pred) == 1 and im.scores == (1 - 5 / 7,)
    assert clipped.pred_pixels[1] == (190.0, 150.0, 200.0, 200.0) and clipped.pred_clipped == 1


def test_predictions_in_coord_tokens_get_pixels_from_the_codec():
    """A hand-written line may give a prediction as coord-token strings (bins): it is scored, its pixels
    are the codec's (bins_to_pixels), and a 1-pixel box outside the image next to it is clipped as usual."""
    from src.data.coords import bins_to_pixels
    from src.eval import read_line

    tokens = [f"<|coord_{k}|>" for k in (100, 200, 500, 800)]
    line = {"image": "a.png", "width": 100, "height": 50, "gt": [{"desc": "a", "bbox_2d": [10, 10, 50, 40]}],
            "pred": [{"desc": "a", "bbox_2d": tokens}, {"desc": "b", "bbox_2d": [60, 10, 101, 40]}]}
    im = read_line(line, "x.jsonl:1")
    assert len(im.pred) == 2 and im.pred[0].bins == (100, 200, 500, 800) and im.pred_invalid == 0
    assert im.pred_pixels[0] == bins_to_pixels((100, 200, 500, 800), 100, 50)
    assert im.pred_pixels[1] == (60.0, 10.0, 100.0, 40.0) and im.pred_clipped == 1
