"""SerializeAppend, Y_train and supervision masks (SPEC §8-§10) with the real Qwen tokenizer."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from src.data.objects import DetObject
from src.data.serialize import serialize_entry, serialize_objects
from src.rollout_matching.matcher import match_objects
from src.rollout_matching.parser import parse_rollout
from src.rollout_matching.targets import TargetError, build_fragment, build_train_target

GT = [
    DetObject("red square", "bbox_2d", (10, 10, 100, 100)),
    DetObject("blue triangle", "poly", (200, 200, 300, 200, 250, 300)),
    DetObject('wörd "q" 猫', "bbox_2d", (500, 500, 600, 600)),
]


def run(table, response_text_or_ids, gts, supervise_eos=True, **match_kw):
    ids = table.encode(response_text_or_ids) if isinstance(response_text_or_ids, str) else list(response_text_or_ids)
    parsed = parse_rollout(ids, table)
    m = match_objects([o.to_det_object() for o in parsed.objects], gts, **match_kw)
    return parsed, m, build_train_target(parsed, gts, m, table, supervise_eos=supervise_eos)


# ------------------------------------------------------------------------------------- fragment


def test_fragment_comma_rules():
    obj = [GT[0]]
    assert build_fragment('{"object_1": {}}'[:-1], obj, 2).text == ", " + serialize_entry(2, GT[0]) + "}"
    assert build_fragment("{", obj, 1).text == serialize_entry(1, GT[0]) + "}"
    assert build_fragment('{"object_1": {"desc": "a"},', obj, 2).text == serialize_entry(2, GT[0]) + "}"
    assert build_fragment('{"object_1": {}}'[:-1], [], 2).text == "}"
    assert build_fragment("{", [], 1).text == "}"
    with pytest.raises(TargetError):
        build_fragment('{"object_1": {"desc": "a"},', [], 2)
    with pytest.raises(TargetError):
        build_fragment('{"object_1": {"desc": "a', obj, 2)


def test_fragment_desc_spans_cover_exactly_the_value_characters():
    frag = build_fragment("{", GT, 1)
    raw = frag.text.encode()
    assert [raw[s:e].decode() for s, e in frag.desc_spans] == ["red square", "blue triangle", 'wörd \\"q\\" 猫']


# ----------------------------------------------------------------------------- Y_train + masks


@pytest.mark.parametrize("shift, message", [(-1, "is not a coord token"), (10_000, "is not a coord token")],
                         ids=["off-by-one", "past the end"])
def test_coord_target_invariants_are_enforced(token_table, shift, message):
    """A (hypothetical) parser bug that puts coord positions off the coord tokens stops the build."""
    import dataclasses

    text = serialize_objects([GT[0]])
    parsed = parse_rollout(token_table.encode(text), token_table)
    m = match_objects([o.to_det_object() for o in parsed.objects], GT[:1])
    assert m.matches == ((0, 0),)
    bad = dataclasses.replace(parsed.objects[0], coord_positions=tuple(p + shift for p in parsed.objects[0].coord_positions))
    with pytest.raises(TargetError, match=message):
        build_train_target(dataclasses.replace(parsed, objects=(bad,)), GT[:1], m, token_table)



def test_truncated_rollout_keeps_prefix_appends_fn_and_masks(token_table):
    pred = [DetObject("red square", "bbox_2d", (12, 11, 101, 99)), DetObject("ghost", "bbox_2d", (800, 800, 900, 900))]
    text = serialize_objects(pred)
    parsed, m, tt = run(token_table, text[: len(text) - 20], GT)  # second object cut off
    assert len(parsed.objects) == 1 and parsed.truncated
    assert tt.y_ids[: tt.prefix_len] == parsed.prefix_ids
    y = token_table.text(tt.y_ids)
    assert y.endswith("<|im_end|>")
    doc = json.loads(y[: -len("<|im_end|>")])
    assert list(doc) == ["object_1", "object_2", "object_3"]  # FN appended after max index 1
    assert doc["object_2"]["desc"] == "blue triangle" and doc["object_3"]["desc"] == 'wörd "q" 猫'
    assert tt.fn_appended == 2 and tt.matched_for_supervision == 1 and tt.excluded_from_supervision == 0
    # prefix: the matched bbox's four coord tokens, targets = GT bins slot by slot
    prefix_targets = [(p, b) for p, b, s in tt.coord_targets if s == "prefix"]
    assert [p for p, _ in prefix_targets] == list(parsed.objects[0].coord_positions)
    assert [b for _, b in prefix_targets] == [10, 10, 100, 100]
    # tail: every coord token supervised with its own bin; no CE on coord tokens or desc values
    tail_coords = {p: b for p, b, s in tt.coord_targets if s == "tail"}
    for p in range(tt.prefix_len, len(tt.y_ids)):
        if token_table.is_coord(tt.y_ids[p]):
            assert tail_coords[p] == token_table.bin_of(tt.y_ids[p])
            assert p not in tt.ce_positions
    ce_text = "".join(token_table.text([tt.y_ids[p]]) for p in tt.ce_positions)
    for forbidden in ("blue", "triangle", "wörd", "猫", "q"):
        assert forbidden not in ce_text
    assert "poly" in ce_text and "bbox" in ce_text and "desc" in ce_text and "object" in ce_text
    assert all(p >= tt.prefix_len for p in tt.ce_positions)  # nothing in the prefix gets CE
    assert tt.ce_positions[-1] == len(tt.y_ids) - 1  # EOS supervised


def test_fp_and_invalid_prefix_objects_get_no_loss(token_table):
    text = ('{"object_1": {"desc": "ghost", "bbox_2d": ["<|coord_800|>", "<|coord_800|>", "<|coord_900|>", "<|coord_900|>"]}, '
            '"object_7": {"desc": "", "bbox_2d": ["<|coord_1|>", "<|coord_1|>", "<|coord_2|>", "<|coord_2|>"]}, '
            + serialize_entry(2, DetObject("red square", "bbox_2d", (10, 10, 100, 100))) + "}")
    parsed, m, tt = run(token_table, text, GT)
    assert parsed.dropped_invalid == 1 and parsed.max_object_index == 7
    assert m.matches == ((1, 0),) and m.fp == (0,)
    prefix_positions = {p for p, _, s in tt.coord_targets if s == "prefix"}
    assert prefix_positions == set(parsed.objects[1].coord_positions)
    assert tt.excluded_from_supervision == 1
    doc = json.loads(token_table.text(tt.y_ids)[: -len("<|im_end|>")])
    assert "object_8" in doc and "object_9" in doc  # appended keys start after the invalid object_7


@pytest.mark.parametrize("supervise_eos", [True, False])
def test_closing_brace_and_eos_supervision_switch(token_table, supervise_eos):
    parsed, m, tt = run(token_table, serialize_objects(GT[:1]), GT[:1], supervise_eos=supervise_eos)
    assert tt.fragment.text == "}"
    last, eos = len(tt.y_ids) - 2, len(tt.y_ids) - 1
    assert token_table.text([tt.y_ids[last]]) == "}"
    assert (last in tt.ce_positions) == supervise_eos and (eos in tt.ce_positions) == supervise_eos


def test_zero_gt_tail_is_just_close_and_eos(token_table):
    pred = serialize_objects([GT[0]])
    parsed, m, tt = run(token_table, pred, [])
    assert m.fp == (0,) and tt.fn_appended == 0 and tt.matched_for_supervision == 0
    assert token_table.text(tt.y_ids[tt.prefix_len:]) == "}<|im_end|>"
    assert [p for p, _, _ in tt.coord_targets] == []
    assert tt.ce_positions == (len(tt.y_ids) - 2, len(tt.y_ids) - 1)


def test_garbage_rollout_falls_back_to_brace_and_appends_all_gt(token_table):
    parsed, m, tt = run(token_table, "I think there is a cat <|coord_3|>", GT)
    assert parsed.fallback and token_table.text(tt.y_ids[: tt.prefix_len]) == "{"
    doc = json.loads(token_table.text(tt.y_ids)[: -len("<|im_end|>")])
    assert list(doc) == ["object_1", "object_2", "object_3"] and tt.fn_appended == 3


def test_matched_poly_gets_ot_targets_one_per_coord_token(token_table):
    pred = DetObject("blue triangle", "poly", (205, 198, 298, 205, 251, 296))
    parsed, m, tt = run(token_table, serialize_objects([pred]), GT)
    assert m.matches == ((0, 1),)
    prefix = [(p, b) for p, b, s in tt.coord_targets if s == "prefix"]
    assert [p for p, _ in prefix] == list(parsed.objects[0].coord_positions)
    assert [b for _, b in prefix] == [200, 200, 300, 200, 250, 300]  # identity-like OT on near-identical shapes


def test_failed_targets_turn_the_match_into_an_appended_fn(token_table, monkeypatch):
    import src.rollout_matching.targets as targets

    monkeypatch.setattr(targets, "prefix_targets_batch", lambda pairs, **kw: [(1, 2) for _ in pairs])  # wrong length
    parsed, m, tt = run(token_table, serialize_objects([GT[0]]), GT[:1])
    assert m.matches == ((0, 0),) and tt.matched_for_supervision == 0 and tt.fn_appended == 1
    assert tt.excluded_from_supervision == 1


# ----------------------------------------------------------------------------------- property


objects_st = st.lists(
    st.builds(
        lambda desc, x, y, w, h, poly: DetObject(desc, "poly", (x, y, x + w, y, x + w // 2, y + h)) if poly else DetObject(desc, "bbox_2d", (x, y, x + w, y + h)),
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=8).filter(lambda s: s.strip()),
        st.integers(0, 800), st.integers(0, 800), st.integers(2, 199), st.integers(2, 199), st.booleans(),
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(preds=objects_st, gts=objects_st, cut=st.floats(0, 1), seed=st.integers(0, 10))
@example(preds=[], gts=[DetObject("\ufb2a", "bbox_2d", (0, 0, 2, 2))], cut=0.0, seed=0)  # a non-NFC GT desc (found by CI)
def test_prefix_plus_fragment_is_one_json_object_with_unique_keys(token_table, preds, gts, cut, seed):
    ids = token_table.encode(serialize_objects(preds))
    ids = ids[: int(len(ids) * cut) + 1]
    parsed = parse_rollout(ids, token_table)
    m = match_objects([o.to_det_object() for o in parsed.objects], gts)
    tt = build_train_target(parsed, gts, m, token_table, rng=random.Random(seed))
    text = token_table.text(tt.y_ids)
    assert text.endswith("<|im_end|>")
    doc = json.loads(text[: -len("<|im_end|>")])  # raises if not one JSON object
    keys = [k for k in json.loads(text[: -len("<|im_end|>")], object_pairs_hook=lambda kv: [k for k, _ in kv])]
    assert len(keys) == len(set(keys)) == len(parsed.objects) + tt.fn_appended  # well-formed canonical prefix: all valid
    assert len(doc) == len(keys)
    # appended descs are serialised NFC (build_fragment: the tokenizer normalises anyway); the parsed
    # ones came through the tokenizer, so they are NFC already
    assert sorted(o.desc for o in parsed.objects) + sorted(unicodedata.normalize("NFC", gts[j].desc) for j in set(m.fn)) == sorted(
        [doc[k]["desc"] for k in keys][: len(parsed.objects)]) + sorted([doc[k]["desc"] for k in keys][len(parsed.objects):])
    assert all(0 <= p < len(tt.y_ids) for p in tt.ce_positions)
    assert tt.y_ids[: tt.prefix_len] == parsed.prefix_ids


def test_non_nfc_desc_is_appended_in_nfc_so_tokens_round_trip(token_table):
    import unicodedata

    gts = [DetObject("\u0f73", "bbox_2d", (0, 0, 2, 2)), DetObject("Cafe\u0301", "bbox_2d", (5, 5, 9, 9))]
    parsed, m, tt = run(token_table, "", gts)
    doc = json.loads(token_table.text(tt.y_ids)[: -len("<|im_end|>")])
    assert [v["desc"] for v in doc.values()] == [unicodedata.normalize("NFC", g.desc) for g in gts]


# ------------------------------------------------------------------- segment-cached fragment encoding

DESC_ALPHABET = st.sampled_from(list('ab z\u00e9\u732b"\\\n\t,.:{}[]<|>_-019') + ["\U0001f600", "<|coord_5|>", "<|coord_05|>", "<|coord_1000|>"])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(descs=st.lists(st.lists(DESC_ALPHABET, min_size=1, max_size=6).map("".join), min_size=1, max_size=5),
       first=st.integers(1, 500), seed=st.integers(0, 10**6))
def test_encode_serialized_equals_plain_encode(token_table, descs, first, seed):
    """Tokenizing serializer output segment by segment (cached) gives exactly the tokenizer's ids,
    also for descs that spell coord-token text, and the cache stays enabled for the real tokenizer."""
    rng = random.Random(seed)
    objs = []
    for d in descs:
        x, y = rng.randint(0, 900), rng.randint(0, 900)
        if rng.random() < 0.5:
            objs.append(DetObject(d, "bbox_2d", (x, y, x + rng.randint(1, 99), y + rng.randint(1, 99))))
        else:
            objs.append(DetObject(d, "poly", tuple(rng.randint(0, 999) for _ in range(2 * rng.randint(3, 8)))))
    text = build_fragment(rng.choice(["{", '{"object_1": {}}']), objs, first).text
    assert token_table.encode_serialized(text) == token_table.encode(text)
    assert token_table._segments.enabled


def test_encode_serialized_switches_itself_off_for_a_tokenizer_that_merges_across_coords(token_table):
    """A tokenizer whose output for the whole text differs from its output segment by segment: the
    self-check catches it on the first call and plain encode is used from then on."""
    from src.rollout_matching.tokens import TokenTable

    def whole_text_differs(text):  # 'tokenizes across' coord tokens: the whole text gets one extra id
        ids = token_table.encode(text)
        return ids + [token_table.im_end_id] if "<|coord_" in text and len(text) > 30 else ids

    table = TokenTable.from_pieces(token_table.pieces, whole_text_differs, token_table.im_end_id)
    text = build_fragment("{", GT, 1).text
    assert table.encode_serialized(text) == whole_text_differs(text)
    assert not table._segments.enabled
    assert table.encode_serialized(text) == whole_text_differs(text)


def test_no_target_holds_a_control_token_inside_a_desc(qwen_tokenizer, tmp_path):
    """The data contract refuses desc texts spelling Qwen's control tokens; a tokenizer may carry other
    added tokens (here '<obj>'), and GT text encoding to one of them must never become a target: the FN
    tail and the stage-1 answer are checked token by token (coord tokens only where coordinates are)."""
    import copy

    from src.data.contract import DataError, Record
    from src.rollout_matching.matcher import match_objects
    from src.rollout_matching.parser import parse_rollout
    from src.rollout_matching.targets import ControlTokenError, build_train_target
    from src.rollout_matching.tokens import token_table

    tok = copy.deepcopy(qwen_tokenizer)
    tok.add_tokens(["<obj>"], special_tokens=True)
    table = token_table(tok)
    assert tok.convert_tokens_to_ids("<obj>") in table.control_ids
    gts = [DetObject("cat", "bbox_2d", (1, 2, 30, 40)), DetObject("big <obj> here", "bbox_2d", (100, 200, 300, 400))]
    parsed = parse_rollout(table.encode("{}") + [table.im_end_id], table)
    with pytest.raises(ControlTokenError, match=r"the FN tail encodes control token\(s\) \['<obj>'\]"):
        build_train_target(parsed, gts, match_objects([], gts), table)
    build_train_target(parsed, gts[:1], match_objects([], gts[:1]), table)  # a plain desc passes

    import random

    from src.trainers.data import SFTCollator

    collator = SFTCollator.__new__(SFTCollator)  # answer_ids needs only the token table
    collator.table, collator.ordering, collator.rng = table, "sorted", random.Random(0)
    record = Record(image=tmp_path / "x.png", width=64, height=64, objects=tuple(gts), source="train.jsonl:7")
    with pytest.raises(DataError, match=r"^train.jsonl:7: the GT answer encodes control token\(s\) \['<obj>'\]"):
        collator.answer_ids(record)
    assert collator.answer_ids(Record(**{**record.__dict__, "objects": tuple(gts[:1])}))[-1] == table.im_end_id
