"""Strict streaming token-aligned parser (SPEC §6), on the real Qwen vocabulary.

Rollouts are built by serialising objects (SPEC §4) and tokenizing them canonically, or by
concatenating the encodings of pieces to get the NON-canonical splits a model may emit.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from src.data.objects import DetObject
from src.data.serialize import serialize_entry, serialize_objects
from src.rollout_matching import parser as parser_module
from src.rollout_matching.parser import ParsedObject, ParseResult, parse_rollout, prefix_text

CAT = DetObject("cat", "bbox_2d", (10, 20, 300, 400))
TRI = DetObject("blue triangle", "poly", (5, 6, 70, 8, 9, 100, 0, 999))
UNI = DetObject("chat noir 猫 über café", "bbox_2d", (1, 2, 3, 4))
ESC = DetObject('say "hi" \\ {"object_5": [}', "bbox_2d", (500, 501, 502, 503))
OBJECTS = [CAT, TRI, UNI, ESC]


# ---------------------------------------------------------------------------------------------- helpers
def enc(table, *parts: str) -> list[int]:
    """Concatenated encodings of ``parts`` (each tokenized on its own: non-canonical at the joins)."""
    return [i for p in parts for i in table.encode(p)]


def raw(table, ids) -> bytes:
    return b"".join(table.piece(i) for i in ids)


def utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def stop_bytes(table, response) -> bytes:
    """The response bytes the parser sees: up to the first <|im_end|> (id or literal)."""
    ids = list(response)
    if table.im_end_id in ids:
        ids = ids[: ids.index(table.im_end_id)]
    b = raw(table, ids)
    k = b.find(b"<|im_end|>")
    return b if k < 0 else b[:k]


def entry_ends(objs, start_index=1) -> list[int]:
    """Byte offsets just after each object value's '}' in ``serialize_objects(objs)``."""
    ends, n = [], 1  # after '{'
    for i, o in enumerate(objs):
        n += len(serialize_entry(start_index + i, o).encode()) + (2 if i else 0)
        ends.append(n)
    return ends


def check_invariants(r: ParseResult, response, table) -> None:
    """What must hold for ANY response: append-ready prefix, honest positions, consistent flags."""
    response = list(response)
    assert all(type(i) is int for i in r.prefix_ids)
    if r.fallback:
        assert list(r.prefix_ids) == table.encode("{")
        assert r.objects == () and r.max_object_index is None
    else:
        k = len(r.prefix_ids)
        assert list(r.prefix_ids[:-1]) == response[: k - 1]  # only the last token may be replaced
        text = raw(table, r.prefix_ids)
        assert stop_bytes(table, response).startswith(text)
        assert text.endswith(b"}")
        assert table.im_end_id not in r.prefix_ids
    assert not (r.truncated and r.malformed)
    assert r.dropped_invalid >= int(r.incomplete_entry)
    for o in r.objects:
        assert len(o.bins) == len(o.coord_positions) > 0
        assert all(0 <= p < len(r.prefix_ids) - 1 for p in o.coord_positions)
        assert [table.bin_of(response[p]) for p in o.coord_positions] == list(o.bins)
        assert o.key == f"object_{o.index}"
    keys = [o.index for o in r.objects]
    if keys:
        assert r.max_object_index is not None and r.max_object_index >= max(keys)
    assert parse_general(response, table) == r  # the canonical fast path changes nothing


def parse_general(response, table) -> ParseResult:
    """``parse_rollout`` with the canonical-entry fast path switched off: the general path only."""
    with mock.patch.object(parser_module, "_CANON_ENTRY", re.compile(rb"(?!)")):  # a regex that never matches
        return parse_rollout(response, table)


def parse(table, response) -> ParseResult:
    r = parse_rollout(response, table)
    check_invariants(r, response, table)
    return r


def dets(r: ParseResult) -> list[DetObject]:
    return [o.to_det_object() for o in r.objects]


# ------------------------------------------------------------------------------------- canonical rollouts
def test_canonical_rollout(token_table):
    text = serialize_objects(OBJECTS)
    response = token_table.encode(text) + [token_table.im_end_id]
    r = parse(token_table, response)
    assert dets(r) == OBJECTS
    assert [o.key for o in r.objects] == ["object_1", "object_2", "object_3", "object_4"]
    assert [o.geometry for o in r.objects] == ["bbox_2d", "poly", "bbox_2d", "bbox_2d"]
    assert isinstance(r.objects[0], ParsedObject)
    assert prefix_text(r, token_table) == text[:-1]  # only the top-level '}' is dropped
    assert (r.dropped_invalid, r.truncated, r.malformed, r.fallback) == (0, False, False, False)
    assert r.stopped_at_im_end and r.num_response_tokens == len(response) - 1
    assert r.max_object_index == 4 and r.cut_backoffs == 0 and not r.incomplete_entry
    # The canonical text ends '"]' '}}': the cut falls inside '}}', which becomes '}'.
    assert raw(token_table, response[-2:-1]) == b"}}"
    assert r.prefix_ids[-1:] == tuple(token_table.encode("}"))


def test_coord_positions_point_at_coord_ids(token_table):
    response = token_table.encode(serialize_objects(OBJECTS))
    r = parse(token_table, response)
    for o, gt in zip(r.objects, OBJECTS):
        assert [token_table.piece(response[p]).decode() for p in o.coord_positions] == [f"<|coord_{k}|>" for k in gt.bins]
        assert all(token_table.is_coord(response[p]) for p in o.coord_positions)
        assert list(o.coord_positions) == sorted(o.coord_positions)


def test_poly_capture_through_nested_arrays(token_table):
    poly = DetObject("star", "poly", tuple(range(100, 120)))  # 10 points
    response = token_table.encode(serialize_objects([poly, CAT]))
    r = parse(token_table, response)
    assert dets(r) == [poly, CAT]
    assert len(r.objects[0].coord_positions) == 20
    assert r.objects[0].bins == tuple(range(100, 120))


def test_unicode_and_escaped_desc(token_table):
    response = token_table.encode(serialize_objects([UNI, ESC]))
    # The non-ASCII desc really is split inside characters by the BPE: some pieces are not UTF-8 alone.
    assert any(not utf8(token_table.piece(i)) for i in response)
    r = parse(token_table, response)
    assert [o.desc for o in r.objects] == [UNI.desc, ESC.desc]


def test_input_types_give_the_same_result(token_table):
    response = token_table.encode(serialize_objects(OBJECTS))
    expected = parse_rollout(response, token_table)
    assert parse_rollout(tuple(response), token_table) == expected
    assert parse_rollout(np.asarray(response, dtype=np.int64), token_table) == expected


def test_parser_does_not_import_transformers_or_torch():
    code = (
        "import sys, src.rollout_matching.parser; "
        "bad = [m for m in ('transformers', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ----------------------------------------------------------------------------------------- keys, order
def test_appearance_order_not_numeric(token_table):
    text = "{" + serialize_entry(10, CAT) + ", " + serialize_entry(2, TRI) + "}"
    r = parse(token_table, token_table.encode(text))
    assert [o.key for o in r.objects] == ["object_10", "object_2"]
    assert [o.index for o in r.objects] == [10, 2]
    assert r.max_object_index == 10


def test_duplicates_stay_separate(token_table):
    text = "{" + ", ".join([serialize_entry(1, CAT), serialize_entry(1, CAT), serialize_entry(1, TRI)]) + "}"
    r = parse(token_table, token_table.encode(text))
    assert dets(r) == [CAT, CAT, TRI]
    assert [o.key for o in r.objects] == ["object_1"] * 3
    assert r.objects[0].coord_positions != r.objects[1].coord_positions
    assert r.max_object_index == 1


def test_max_object_index_counts_invalid_kept_keys(token_table):
    bad = '"object_9": {"desc": "", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}'
    text = "{" + bad + ", " + serialize_entry(2, CAT) + "}"
    r = parse(token_table, token_table.encode(text))
    assert dets(r) == [CAT] and r.dropped_invalid == 1
    assert r.max_object_index == 9


def test_max_object_index_ignores_entries_after_the_cut(token_table):
    text = "{" + serialize_entry(2, CAT) + ', "object_9": 5, "object_11": {"desc": "x"'
    r = parse(token_table, token_table.encode(text))
    assert dets(r) == [CAT]
    assert r.max_object_index == 2
    assert r.dropped_invalid == 2 and r.incomplete_entry and r.truncated


# ------------------------------------------------------------------------------------- invalid objects
def arr(*items: str) -> str:
    return "[" + ", ".join(items) + "]"


Q = ['"<|coord_%d|>"' % k for k in (11, 22, 33, 44, 55, 66, 77, 88)]  # quoted coord tokens
B4 = arr(*Q[:4])  # a valid bbox value
P3 = arr(arr(Q[0], Q[1]), arr(Q[2], Q[3]), arr(Q[4], Q[5]))  # a valid poly value


def bbox_with(third: str) -> str:
    """An object value whose bbox's third value is ``third`` (raw JSON text)."""
    return '{"desc": "cat", "bbox_2d": ' + arr(Q[0], Q[1], third, Q[3]) + "}"


BAD_OBJECT_VALUES = {
    "empty desc": f'{{"desc": "", "bbox_2d": {B4}}}',
    "blank desc": f'{{"desc": "  ", "bbox_2d": {B4}}}',
    "no desc": f'{{"bbox_2d": {B4}}}',
    "desc not a string": f'{{"desc": ["cat"], "bbox_2d": {B4}}}',
    "extra key": f'{{"desc": "cat", "bbox_2d": {B4}, "score": 1}}',
    "two geometries": f'{{"desc": "cat", "bbox_2d": {B4}, "poly": {P3}}}',
    "duplicate desc": f'{{"desc": "cat", "desc": "dog", "bbox_2d": {B4}}}',
    "duplicate geometry key": f'{{"desc": "cat", "bbox_2d": {B4}, "bbox_2d": {B4}}}',
    "no geometry": '{"desc": "cat"}',
    "unknown geometry": f'{{"desc": "cat", "box": {B4}}}',
    "bbox with 3 values": f'{{"desc": "cat", "bbox_2d": {arr(*Q[:3])}}}',
    "bbox with 5 values": f'{{"desc": "cat", "bbox_2d": {arr(*Q[:5])}}}',
    "bbox nested": f'{{"desc": "cat", "bbox_2d": {arr(arr(Q[0], Q[1]), arr(Q[2], Q[3]))}}}',
    "poly with 2 pairs": f'{{"desc": "cat", "poly": {arr(arr(Q[0], Q[1]), arr(Q[2], Q[3]))}}}',
    "poly flat": f'{{"desc": "cat", "poly": {arr(*Q[:6])}}}',
    "poly triple": f'{{"desc": "cat", "poly": {arr(arr(*Q[:3]), arr(Q[3], Q[4]), arr(Q[5], Q[6]))}}}',
    "plain number instead of coord": bbox_with("33"),
    "unquoted coord token": bbox_with("<|coord_33|>"),
    "two coords in one string": bbox_with('"<|coord_33|><|coord_34|>"'),
    "coord with extra text": bbox_with('"<|coord_33|> "'),
    "coord 1000 (no such token)": bbox_with('"<|coord_1000|>"'),
    "escaped coord text": bbox_with('"\\u003c|coord_33|>"'),  # JSON-decodes to "<|coord_33|>"
    "coord inside nested object": bbox_with('{"k": "<|coord_33|>"}'),
    "escaped geometry key": f'{{"desc": "cat", "bbox\\u005f2d": {B4}}}',  # JSON says bbox_2d; raw key does not
    "geometry value garbage": '{"desc": "cat", "bbox_2d": garbage}',
    "garbage word in value": f'{{"desc": "cat", "bbox_2d": {B4} oops}}',
    "missing comma": f'{{"desc": "cat" "bbox_2d": {B4}}}',
    "trailing comma": f'{{"desc": "cat", "bbox_2d": {B4},}}',
    "empty object": "{}",
    "not an object_N key": None,  # special-cased below
    # one verdict per box: inverted or zero-width/height boxes are invalid objects (canonical spelling:
    # the fast path; check_invariants also runs the general path on each)
    "inverted box (x2 < x1)": f'{{"desc": "cat", "bbox_2d": {arr(Q[2], Q[1], Q[0], Q[3])}}}',
    "inverted box (y2 < y1)": f'{{"desc": "cat", "bbox_2d": {arr(Q[0], Q[3], Q[2], Q[1])}}}',
    "zero-width box": f'{{"desc": "cat", "bbox_2d": {arr(Q[0], Q[1], Q[0], Q[3])}}}',
    "zero-height box": f'{{"desc": "cat", "bbox_2d": {arr(Q[0], Q[1], Q[2], Q[1])}}}',
    "inverted box, non-canonical spacing": f'{{"desc":"cat","bbox_2d":{arr(Q[2], Q[1], Q[0], Q[3])}}}',
    # a desc spelling a control token is not a valid desc (as in the data contract)
    "desc holding a coord token": f'{{"desc": "sign <|coord_5|>", "bbox_2d": {B4}}}',
    "desc spelling a coord token with an escape": f'{{"desc": "sign \\u003c|coord_5|>", "bbox_2d": {B4}}}',
    "desc holding <think>": f'{{"desc": "a <think> b", "bbox_2d": {B4}}}',
}


@pytest.mark.parametrize("case", sorted(BAD_OBJECT_VALUES))
def test_invalid_object_dropped_neighbours_kept(token_table, case):
    value = BAD_OBJECT_VALUES[case]
    bad = ('"thing_2": ' + serialize_entry(2, CAT).split(": ", 1)[1]) if value is None else '"object_2": ' + value
    text = "{" + serialize_entry(1, CAT) + ", " + bad + ", " + serialize_entry(3, TRI) + "}"
    r = parse(token_table, token_table.encode(text))
    assert dets(r) == [CAT, TRI]
    assert [o.key for o in r.objects] == ["object_1", "object_3"]
    assert r.dropped_invalid == 1
    assert (r.truncated, r.malformed, r.fallback) == (False, False, False)
    assert r.max_object_index == 3
    assert prefix_text(r, token_table) == text[:-1]  # the invalid entry's text stays in the prefix


def test_coord_spelled_as_text_pieces_is_invalid(token_table):
    """The JSON text is identical to a valid object, but one coord is ordinary text tokens, not its id."""
    t = token_table
    head = "{" + serialize_entry(1, CAT) + ', "object_2": {"desc": "dog", "bbox_2d": ["<|coord_1|>", "'
    tail = '", "<|coord_3|>", "<|coord_4|>"]}, ' + serialize_entry(3, TRI) + "}"
    spelled = enc(t, "<|", "coord", "_2", "|>")
    assert not any(t.is_coord(i) for i in spelled)
    response = enc(t, head) + spelled + enc(t, tail)
    r = parse(t, response)
    assert json.loads(raw(t, response))["object_2"]["bbox_2d"][1] == "<|coord_2|>"  # looks valid as text
    assert dets(r) == [CAT, TRI] and r.dropped_invalid == 1


def test_non_object_values_at_top_level(token_table):
    text = (
        "{" + serialize_entry(1, CAT) + ', "object_2": 5, "object_3": "cat", "object_4": null, '
        '"object_5": ["<|coord_1|>", {"a": [1]}], "note": true, ' + serialize_entry(6, TRI) + "}"
    )
    r = parse(token_table, token_table.encode(text))
    assert dets(r) == [CAT, TRI]
    assert r.dropped_invalid == 5 and r.max_object_index == 6
    assert not (r.truncated or r.malformed)


def test_non_object_n_key_with_object_value_is_a_cut_candidate(token_table):
    text = "{" + serialize_entry(1, CAT) + ', "extra": {"desc": "x"}, "object_2": 7}'
    r = parse(token_table, token_table.encode(text))
    assert dets(r) == [CAT]
    assert prefix_text(r, token_table) == "{" + serialize_entry(1, CAT) + ', "extra": {"desc": "x"}'
    assert r.dropped_invalid == 2 and r.max_object_index == 1


# ------------------------------------------------------------------------------ top-level strictness
@pytest.mark.parametrize(
    "after, dropped, incomplete",
    [
        (' "object_2": {"desc": "x"}}', 0, False),  # missing ','
        (",}", 0, False),  # trailing comma
        (", , " + serialize_entry(2, TRI) + "}", 0, False),
        (', "object_2" ' + serialize_entry(3, TRI), 1, True),  # missing ':'
        (', "object_2": cat}', 1, True),  # bare word that is not a JSON scalar
        (', "object_2": {"desc": "x", "bbox_2d": ["<|coord_1|>"}}', 1, True),  # '}' closes a '['
        (', "object_2": [1, 2}, ' + serialize_entry(3, TRI) + "}", 1, True),
        ("]", 0, False),
        (", 5: 6}", 0, False),  # a non-string key
    ],
)
def test_top_level_structure_break_stops_the_scan(token_table, after, dropped, incomplete):
    text = "{" + serialize_entry(1, CAT) + after
    r = parse(token_table, token_table.encode(text))
    assert dets(r) == [CAT]  # nothing after the break is used, not even a valid object
    assert r.malformed and not r.truncated
    assert r.dropped_invalid == dropped and r.incomplete_entry == incomplete
    assert prefix_text(r, token_table) == "{" + serialize_entry(1, CAT)


def test_text_after_the_top_level_close_is_ignored(token_table):
    text = serialize_objects([CAT]) + " " + serialize_objects([TRI, UNI]) + " trailing words"
    r = parse(token_table, token_table.encode(text))
    assert dets(r) == [CAT]
    assert (r.truncated, r.malformed, r.dropped_invalid, r.max_object_index) == (False, False, 0, 1)


def test_leading_whitespace_is_allowed(token_table):
    r = parse(token_table, token_table.encode(" \n\t" + serialize_objects([CAT, TRI])))
    assert dets(r) == [CAT, TRI]


@pytest.mark.parametrize(
    "text, truncated, malformed",
    [
        ("", True, False),
        ("   ", True, False),
        ("I see a cat.", False, True),
        ("```json\n" + serialize_objects([CAT]) + "\n```", False, True),  # must START with '{'
        ('[{"desc": "cat"}]', False, True),
        ("{}", False, False),
        ("{ }", False, False),
        ('{"object_1": {"desc": "cat", "bbox_2d": ["<|coord_1|>"', True, False),
        ('{"object_1": 3}', False, False),
        ("{{", False, True),
    ],
)
def test_fallback_prefix_is_a_fresh_brace(token_table, text, truncated, malformed):
    response = token_table.encode(text)
    r = parse(token_table, response)
    assert r.fallback and r.objects == () and r.max_object_index is None
    assert list(r.prefix_ids) == token_table.encode("{")
    assert (r.truncated, r.malformed) == (truncated, malformed)
    assert r.num_response_tokens == len(response)


def test_empty_response_and_immediate_im_end(token_table):
    r = parse(token_table, [])
    assert r.fallback and r.truncated and not r.stopped_at_im_end and r.num_response_tokens == 0
    r = parse(token_table, [token_table.im_end_id] + token_table.encode(serialize_objects([CAT])))
    assert r.fallback and r.stopped_at_im_end and r.num_response_tokens == 0 and r.dropped_invalid == 0


# ----------------------------------------------------------------------------------------- truncation
def test_truncation_at_every_token(token_table):
    t = token_table
    text = serialize_objects(OBJECTS)
    response = t.encode(text)
    ends = entry_ends(OBJECTS)
    for i in range(len(response) + 1):
        cut = response[:i]
        r = parse(t, cut)
        seen = len(raw(t, cut))
        n_complete = sum(e <= seen for e in ends)
        assert dets(r) == OBJECTS[:n_complete], i
        assert r.fallback == (n_complete == 0)
        if n_complete:
            assert raw(t, r.prefix_ids) == text.encode()[: ends[n_complete - 1]]
            assert r.max_object_index == n_complete
        assert r.truncated == (i < len(response)) and not r.malformed
        assert r.dropped_invalid == int(r.incomplete_entry) <= 1
        # Stopping at <|im_end|> (with garbage after it) gives the same parse.
        r2 = parse(t, cut + [t.im_end_id] + t.encode('garbage", "object_99": {}}'))
        assert (r2.prefix_ids, r2.objects, r2.dropped_invalid, r2.max_object_index) == (
            r.prefix_ids, r.objects, r.dropped_invalid, r.max_object_index)
        assert r2.stopped_at_im_end and r2.num_response_tokens == i


# ------------------------------------------------------------------------------------------ fused cuts
@pytest.mark.parametrize(
    "suffix", ["}", "}}", "},", "}, ", "}}}", "}]", "}}\n", "},\n", "}}<|im_end|>", "}} hello", '},{"', "}:", "}}garbage{"]
)
def test_cut_inside_fused_token(token_table, suffix):
    t = token_table
    entry = serialize_entry(1, CAT)  # ends with '"]}'
    head = "{" + entry[:-1]
    response = t.encode(head + suffix)
    r = parse(t, response)
    assert dets(r) == [CAT] and r.cut_backoffs == 0
    assert prefix_text(r, t) == "{" + entry
    k = len(r.prefix_ids)
    if raw(t, response[:k]) != (head + "}").encode():  # the cut fell inside token k-1: it was re-encoded
        assert raw(t, response[k - 1 : k]).startswith(raw(t, r.prefix_ids[-1:]))


def test_cut_inside_comma_token_mid_rollout(token_table):
    t = token_table
    text = serialize_objects([CAT, TRI])
    response = t.encode(text)
    k = next(i for i in range(len(response)) if t.piece(response[i]) == b"},")
    r = parse(t, response[: k + 5])  # truncated inside object 2
    assert dets(r) == [CAT]
    assert list(r.prefix_ids) == response[:k] + t.encode("}")
    assert r.dropped_invalid == 1 and r.incomplete_entry


def test_quote_bracket_brace_fused_token(token_table):
    t = token_table
    text = "{" + serialize_entry(1, CAT) + " hello"  # BPE gives '"]}' ' hello'
    response = t.encode(text)
    assert b'"]}' in [t.piece(i) for i in response]
    r = parse(t, response)
    assert dets(r) == [CAT] and list(r.prefix_ids) == response[:-1] and r.malformed  # " hello" is not "," or "}"


# ------------------------------------------------------------------------------- non-canonical splits
def split_encode(table, text: str) -> list[int]:
    """Every character tokenized alone (coord tokens kept whole): the least canonical split."""
    ids = []
    for part in re.split(r"(<\|coord_\d+\|>)", text):
        if part.startswith("<|coord_"):
            ids += table.encode(part)
        else:
            for ch in part:
                ids += table.encode(ch)
    return ids


def test_non_canonical_character_split(token_table):
    t = token_table
    text = serialize_objects(OBJECTS)
    response = split_encode(t, text)
    assert len(response) > 2 * len(t.encode(text))
    r = parse(t, response)
    assert dets(r) == OBJECTS
    assert list(r.prefix_ids) == response[:-1]  # the final '}' is its own token: no replacement
    for i in range(0, len(response) + 1, 7):
        check_invariants(parse_rollout(response[:i], t), response[:i], t)


@pytest.mark.parametrize(
    "pieces",
    [
        ['"]', "}", "}"],  # '}' '}' instead of '}}'
        ['"', "]", "}}"],  # '"' ']' instead of '"]'
        ['"', "]", "}", ", ", '"object_2": {"desc": "x"'],
        ['"', "]},", " "],
    ],
)
def test_non_canonical_punctuation_splits(token_table, pieces):
    t = token_table
    entry = serialize_entry(1, CAT)
    response = enc(t, "{" + entry[:-3], *pieces)
    r = parse(t, response)
    assert dets(r) == [CAT]
    assert prefix_text(r, t) == "{" + entry


# ---------------------------------------------------------------------------------------- <|im_end|>
def test_im_end_id_mid_object(token_table):
    t = token_table
    response = t.encode(serialize_objects([CAT, TRI]))
    k = len(t.encode("{" + serialize_entry(1, CAT) + ', "object_2": {"desc": "blue'))
    r = parse(t, response[:k] + [t.im_end_id] + response[k:])
    assert dets(r) == [CAT] and r.stopped_at_im_end and r.truncated
    assert r.num_response_tokens == k and r.dropped_invalid == 1


def test_literal_im_end_spread_over_ordinary_tokens(token_table):
    t = token_table
    head = "{" + serialize_entry(1, CAT) + ", "
    literal = enc(t, "<|", "im", "_end", "|>")
    assert t.im_end_id not in literal and raw(t, literal) == b"<|im_end|>"
    response = enc(t, head) + literal + enc(t, serialize_entry(2, TRI) + "}")
    r = parse(t, response)
    assert dets(r) == [CAT] and r.stopped_at_im_end and r.truncated
    assert r.num_response_tokens == len(enc(t, head)) and r.max_object_index == 1


def test_literal_im_end_starting_mid_token(token_table):
    t = token_table
    head = enc(t, "{" + serialize_entry(1, CAT))
    lt = t.encode(' "<')  # one token whose last byte starts the literal
    assert len(lt) == 1
    response = head + lt + enc(t, "|im_end|>", serialize_entry(2, TRI))
    r = parse(t, response)
    assert dets(r) == [CAT] and r.stopped_at_im_end
    assert r.num_response_tokens == len(head) + 1  # the token holding '<' was partly scanned
    assert list(r.prefix_ids) == head  # canonical '"]}' then ' "<': cut on a token boundary


def test_literal_im_end_inside_a_desc_is_a_hard_stop(token_table):
    t = token_table
    response = enc(t, "{" + serialize_entry(1, CAT) + ', "object_2": {"desc": "a', "<|", "im_end|>", 'b", "bbox_2d": []}}')
    r = parse(t, response)
    assert dets(r) == [CAT] and r.stopped_at_im_end and r.truncated and r.dropped_invalid == 1


# ------------------------------------------------------------------------------------ odd ids, backoff
def test_unknown_ids_never_crash(token_table):
    t = token_table
    head = t.encode('{"object_1": {"desc": "c')
    for bad in (-1, -5, len(t.pieces), 10**9):
        response = head + [bad] + t.encode('at", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}}')
        r = parse(t, response)
        assert r.objects == () and r.dropped_invalid == 1 and not r.fallback  # a NUL in a string: invalid JSON
        assert parse(t, [bad]).malformed


def test_cut_backoff_when_the_replacement_does_not_round_trip(token_table):
    t = token_table

    def bad_encode(text: str) -> list[int]:  # a tokenizer whose '}' does not round-trip
        return token_table.encode(text.replace("}", "]"))

    odd = dataclasses.replace(t, encode=bad_encode)
    # Object 1 ends with a '}' token of its own (token-boundary cut), object 2 inside '}}'.
    response = enc(t, "{" + serialize_entry(1, CAT)[:-1], "}", ", " + serialize_entry(2, UNI) + "}")
    assert t.piece(response[-1]) == b"}}"
    r = parse_rollout(response, odd)
    assert r.cut_backoffs == 1
    assert dets(r) == [CAT] and r.dropped_invalid == 1  # the valid object 2 was lost to the back-off
    assert r.max_object_index == 1
    assert raw(t, r.prefix_ids) == ("{" + serialize_entry(1, CAT)).encode()
    # Nothing cuts on a token boundary: every candidate backs off, then the fresh '{'.
    r = parse_rollout(t.encode(serialize_objects([CAT, UNI])), odd)  # cuts inside '},' and '}}'
    assert r.fallback and r.cut_backoffs == 2 and list(r.prefix_ids) == odd.encode("{")


# ------------------------------------------------------------------------------------------ property
@pytest.fixture(scope="module")
def alphabet(token_table):
    t = token_table
    texts = ['{', '}', '[', ']', '"', ':', ',', ' ', '}}', '"]', '},', '"]}', ' "', '":', '",', ' ["', ' [["',
             ' {"', '{"', '"],', ']]', 'desc', 'bbox', '_', '2', 'd', 'poly', 'object', '1', '7', 'cat', '\\', 'x',
             '<|', 'im_end', '|>', 'null']
    ids = sorted({i for s in texts for i in t.encode(s)})
    ids += [int(t.coord_ids[k]) for k in (0, 1, 500, 999)] + [t.im_end_id, -1, len(t.pieces)]
    return ids


@pytest.fixture(scope="module")
def base_response(token_table):
    return token_table.encode(serialize_objects([CAT, TRI, UNI]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mutations(token_table, alphabet, base_response, data):
    t = token_table
    response = list(base_response)
    ops = data.draw(st.lists(st.tuples(st.sampled_from(["del", "dup", "ins"]), st.integers(0, 10**6),
                                       st.sampled_from(alphabet)), max_size=6))
    for op, where, tok in ops:
        i = where % (len(response) + 1)
        if op == "ins":
            response.insert(i, tok)
        elif response and i < len(response):
            if op == "del":
                del response[i]
            else:
                response.insert(i, response[i])
    r = parse_rollout(response, t)
    check_invariants(r, response, t)
    if not r.fallback and r.dropped_invalid == int(r.incomplete_entry):
        # Nothing invalid was kept (only a trailing incomplete entry was dropped): the prefix is valid JSON.
        parsed = json.loads(prefix_text(r, t) + "}", object_pairs_hook=list)
        assert [k for k, _ in parsed] == [o.key for o in r.objects]
        assert [v[0][1] for _, v in parsed] == [o.desc for o in r.objects]
