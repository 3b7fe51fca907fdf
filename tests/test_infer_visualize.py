"""src.infer on a tiny model (one line per image, pixel coords, GT copied) and src.visualize's pictures."""

from __future__ import annotations

import json
from pathlib import Path

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
