"""Data contract, the one coord convention, and byte-exact serialisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from src.data.contract import DataError, load_jsonl
from src.data.coords import bin_to_pixel, fix_box_bins, parse_coord_token, pixel_to_bin, pixels_to_bins
from src.data.objects import DetObject
from src.data.serialize import SEPARATORS, object_value, order_objects, serialize_entry, serialize_objects


# ------------------------------------------------------------------------------------ coords


def test_one_convention_endpoints_and_formula():
    assert pixel_to_bin(0, 640) == 0
    assert pixel_to_bin(639, 640) == 999
    assert pixel_to_bin(640, 640) == 999  # the far edge clamps
    assert pixel_to_bin(319.5, 640) == 500  # 319.5/639*999 = 499.5 -> half up
    assert bin_to_pixel(999, 480) == 479 and bin_to_pixel(0, 480) == 0


@given(st.integers(2, 4000), st.integers(0, 999))
def test_bin_pixel_bin_round_trip(size, k):
    assert pixel_to_bin(bin_to_pixel(k, size), size) == k


@given(st.integers(2, 4000), st.floats(0, 1))
def test_pixel_bin_pixel_error_is_half_a_bin(size, frac):
    v = frac * (size - 1)
    assert abs(bin_to_pixel(pixel_to_bin(v, size), size) - v) <= 0.5 * (size - 1) / 999 + 1e-9


def test_collapsed_box_is_nudged():
    assert fix_box_bins((10, 10, 10, 10)) == (10, 10, 11, 11)
    assert fix_box_bins((999, 5, 999, 9)) == (998, 5, 999, 9)
    # a 1-pixel-wide box in a 4000 px image collapses to one bin and is nudged out
    assert pixels_to_bins([100, 100, 101, 300], 4000, 4000, "bbox_2d")[2] > pixels_to_bins([100, 100, 101, 300], 4000, 4000, "bbox_2d")[0]


def test_coord_token_parsing_is_strict():
    assert parse_coord_token("<|coord_0|>") == 0 and parse_coord_token("<|coord_999|>") == 999
    for bad in ["<|coord_1000|>", "<|coord_01|>", "<|coord_-1|>", " <|coord_1|>", "<|coord_1|>x", "coord_1"]:
        assert parse_coord_token(bad) is None


# ---------------------------------------------------------------------------------- serializer


def test_serializer_byte_exact_bbox_and_poly():
    objs = [DetObject("red square", "bbox_2d", (1, 2, 30, 40)), DetObject("blue triangle", "poly", (5, 6, 7, 8, 9, 10))]
    expected = (
        '{"object_1": {"desc": "red square", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_30|>", "<|coord_40|>"]}, '
        '"object_2": {"desc": "blue triangle", "poly": [["<|coord_5|>", "<|coord_6|>"], ["<|coord_7|>", "<|coord_8|>"], ["<|coord_9|>", "<|coord_10|>"]]}}'
    )
    assert serialize_objects(objs) == expected
    assert json.loads(expected)["object_2"]["poly"][2] == ["<|coord_9|>", "<|coord_10|>"]


def test_serializer_zero_objects_and_non_ascii_and_escapes():
    assert serialize_objects([]) == "{}"
    text = serialize_objects([DetObject('größe "x" 猫', "bbox_2d", (0, 0, 1, 1))])
    assert 'größe \\"x\\" 猫' in text  # ensure_ascii=False, quotes escaped
    assert json.loads(text)["object_1"]["desc"] == 'größe "x" 猫'


@given(desc=st.text(min_size=1, max_size=12), bins=st.lists(st.integers(0, 999), min_size=3, max_size=20),
       index=st.integers(1, 10**6), is_box=st.booleans())
def test_serialize_entry_equals_the_json_dumps_reference(desc, bins, index, is_box):
    """The assembled entry is byte-identical to json.dumps of the object value (the SPEC §4 definition),
    for any desc (control characters, quotes, backslashes, non-BMP characters) and any bins."""
    obj = DetObject(desc, "bbox_2d", tuple(bins[:4])) if is_box and len(bins) >= 4 else DetObject(desc, "poly", tuple(bins[: len(bins) // 2 * 2]))
    reference = json.dumps(f"object_{index}") + ": " + json.dumps(object_value(obj), ensure_ascii=False, separators=SEPARATORS)
    assert serialize_entry(index, obj) == reference


def test_serialize_entry_rejects_bad_bins():
    with pytest.raises(ValueError, match="bin 1000"):
        serialize_entry(1, DetObject("a", "bbox_2d", (1, 2, 1000, 4)))
    with pytest.raises(ValueError, match="bin -1"):
        serialize_entry(1, DetObject("a", "poly", (1, 2, -1, 4, 5, 6)))
    with pytest.raises(ValueError, match="even number"):
        serialize_entry(1, DetObject("a", "poly", (1, 2, 3, 4, 5)))


def test_entry_numbering_matches_whole_object():
    objs = [DetObject("a", "bbox_2d", (1, 2, 3, 4))]
    assert serialize_objects(objs, start_index=7) == "{" + serialize_entry(7, objs[0]) + "}"


def test_sorted_ordering_top_to_bottom_then_left_to_right():
    a = DetObject("a", "bbox_2d", (500, 100, 600, 200))
    b = DetObject("b", "bbox_2d", (100, 100, 200, 200))
    c = DetObject("c", "poly", (0, 50, 10, 60, 5, 70))
    assert [o.desc for o in order_objects([a, b, c])] == ["c", "b", "a"]


# ------------------------------------------------------------------------------- data contract


@pytest.fixture()
def jsonl_dir(tmp_path: Path) -> Path:
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 48), "white").save(tmp_path / "img" / "a.png")
    return tmp_path


def write_lines(d: Path, *records) -> Path:
    p = d / "data.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return p


GOOD = {"images": ["img/a.png"], "width": 64, "height": 48, "objects": [{"desc": "cat", "bbox_2d": [0, 0, 63, 47]}]}


def test_valid_records_pixels_bins_and_tokens(jsonl_dir):
    p = write_lines(
        jsonl_dir, GOOD,
        {**GOOD, "coords": "bins", "objects": [{"desc": "tri", "poly": [0, 0, 999, 0, 500, 999]}]},
        {**GOOD, "objects": [{"desc": "box", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}]},
        {**GOOD, "objects": []},
    )
    recs, stats = load_jsonl(p)
    assert stats.records == 4
    assert recs[0].objects[0].bins == (0, 0, 999, 999)
    assert recs[0].image == jsonl_dir / "img" / "a.png"
    assert recs[1].objects[0].bins == (0, 0, 999, 0, 500, 999)
    assert recs[2].objects[0].bins == (1, 2, 3, 4)
    assert recs[3].objects == ()


@pytest.mark.parametrize(
    "record, message",
    [
        ("{not json", "malformed JSON"),
        ({k: v for k, v in GOOD.items() if k != "width"}, "missing required key 'width'"),
        ({**GOOD, "objects": [{"desc": "x", "bbox_2d": [0, 0, 5, 5], "poly": [0, 0, 1, 1, 2, 2]}]}, "exactly one geometry"),
        ({**GOOD, "objects": [{"desc": "x"}]}, "exactly one geometry"),
        ({**GOOD, "objects": [{"desc": "", "bbox_2d": [0, 0, 5, 5]}]}, "'desc' must be a non-empty string"),
        ({**GOOD, "objects": [{"desc": "x", "poly": [0, 0, 1, 1, 2]}]}, "even number"),
        ({**GOOD, "objects": [{"desc": "x", "poly": [0, 0, 1, 1]}]}, ">= 6"),
        ({**GOOD, "objects": [{"desc": "x", "bbox_2d": [0, 0, 65, 5]}]}, "x=65 lies outside the image"),
        ({**GOOD, "objects": [{"desc": "x", "bbox_2d": [5, 0, 2, 5]}]}, "x2 > x1"),
        ({**GOOD, "objects": [{"desc": "x", "bbox_2d": [0, 0, "<|coord_3|>", 5]}]}, "mixes strings and numbers"),
        ({**GOOD, "coords": "bins", "objects": [{"desc": "x", "bbox_2d": [0, 0, 1000, 5]}]}, "not ints 0..999"),
        ({**GOOD, "objects": [{"desc": "x", "box": [0, 0, 1, 1]}]}, "unknown object key(s) ['box']"),
        ({**GOOD, "images": ["img/missing.png"]}, "image file not found"),
        ({**GOOD, "coords": "normalized"}, "'coords' must be"),
        ({**GOOD, "extra_field": 1}, "unknown record key(s) ['extra_field']"),
        # desc text that spells a control token would be encoded as that token (a coord inside a desc, a stop)
        ({**GOOD, "objects": [{"desc": "sign <|coord_5|>", "bbox_2d": [0, 0, 5, 5]}]}, "contains '<|coord_5|>', the text of a tokenizer control token"),
        ({**GOOD, "objects": [{"desc": "a<|im_end|>", "bbox_2d": [0, 0, 5, 5]}]}, "contains '<|im_end|>'"),
        ({**GOOD, "objects": [{"desc": "x <think> y", "bbox_2d": [0, 0, 5, 5]}]}, "contains '<think>'"),
    ],
)
def test_bad_lines_name_file_and_line(jsonl_dir, record, message):
    p = write_lines(jsonl_dir, GOOD, record)
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert str(e.value).startswith(f"{p}:2:")
    assert message in str(e.value)


def test_skip_mode_counts_instead_of_dropping_silently(jsonl_dir):
    p = write_lines(jsonl_dir, GOOD, "{not json", {**GOOD, "objects": [{"desc": ""}]}, GOOD)
    recs, stats = load_jsonl(p, on_invalid="skip")
    assert len(recs) == 2 and stats.skipped == 2 and ":2:" in stats.skip_reasons[0]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_desc_is_stored_nfc(jsonl_dir):
    p = write_lines(jsonl_dir, {**GOOD, "objects": [{"desc": "Cafe\u0301", "bbox_2d": [0, 0, 5, 5]}]})
    recs, _ = load_jsonl(p)
    assert recs[0].objects[0].desc == "Caf\u00e9"


def test_desc_text_near_control_tokens_is_plain_text(jsonl_dir):
    """Only whole control-token texts are refused: '<|' alone, 'a | b', '<coord_5>' are ordinary text."""
    p = write_lines(jsonl_dir, {**GOOD, "objects": [{"desc": d, "bbox_2d": [0, 0, 5, 5]} for d in ("<| arrow", "a | b", "<coord_5>", "x <thinking>")]})
    (rec,), _ = load_jsonl(p)
    assert [o.desc for o in rec.objects] == ["<| arrow", "a | b", "<coord_5>", "x <thinking>"]
