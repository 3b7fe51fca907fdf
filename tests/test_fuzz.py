"""Fuzzing the strict parser and the whole parse -> match -> Y_train path (reliability issue, item 1).

tests/test_parser.py already checks parser invariants on canonical rollouts and on small token
mutations of one canonical answer; tests/test_targets.py checks Y_train on truncated canonical answers.
This file widens the input space and runs every example through ``match_objects`` +
``build_train_target`` as well:

* random token sequences over the WHOLE real Qwen vocabulary mixed with coord ids, the 184
  punctuation-only JSON tokens and key/desc words;
* mutations of rich rollouts (unicode + escaped quotes + ``<|im_end|>`` spelled in a desc, huge numbers,
  deep nesting, extra keys, polys): truncation, deleted / inserted / duplicated tokens, canonical
  tokens split into pieces and neighbouring pieces fused, stray ``<|im_end|>`` ids;
* truncation at EVERY token of a rich rollout (deterministic).

Invariants (``check_invariants`` from tests/test_parser.py plus :func:`check_pipeline`): never raises;
the prefix is the response up to the cut with at most the last token replaced, or the fallback ``{``;
every valid object's bins are the coord ids at its recorded positions; appended keys never collide with
the prefix's keys nor each other; Y_train is ONE JSON object whenever the prefix entries are well-formed
JSON. Example counts are printed at the end of the module (profile: tests/hypothesis_profiles.py).
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from src.data.coords import parse_coord_token
from src.data.objects import DetObject, control_text_in
from src.rollout_matching.matcher import match_objects
from src.rollout_matching.parser import parse_rollout, prefix_text
from src.rollout_matching.targets import build_train_target
from tests.hypothesis_profiles import EXPECTED_EXAMPLES, PROFILE
from tests.test_parser import check_invariants

EXAMPLES: Counter = Counter()
IM_END = "<|im_end|>"

GTS = [
    DetObject("cat", "bbox_2d", (10, 20, 300, 400)),
    DetObject("blue triangle", "poly", (5, 6, 70, 8, 9, 100)),
    DetObject('say "hi" 猫', "bbox_2d", (500, 501, 600, 700)),
]


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    line = f"[fuzz] hypothesis profile '{PROFILE}': examples run per property: " + ", ".join(f"{k}={v}" for k, v in sorted(EXAMPLES.items()))
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    if rep is not None:
        rep.write_line(line)
    else:
        print(line)


# --------------------------------------------------------------------------------------- pipeline check


def check_pipeline(table, response, gts=GTS, seed: int = 0):
    """Parse (+ the parser invariants), match, build Y_train; check what must hold for ANY response."""
    response = list(response)
    r = parse_rollout(response, table)
    check_invariants(r, response, table)
    m = match_objects([o.to_det_object() for o in r.objects], gts)
    tt = build_train_target(r, gts, m, table, rng=random.Random(seed), fn_ordering="random" if seed % 2 else "sorted")
    y = list(tt.y_ids)
    assert y[: tt.prefix_len] == list(r.prefix_ids)
    assert y[-1] == table.im_end_id and table.im_end_id not in y[:-1]
    assert all(0 <= p < len(y) for p in tt.ce_positions)
    for pos, b, _seg in tt.coord_targets:
        assert 0 <= pos < len(y) and 0 <= b <= 999
        assert table.is_coord(y[pos])  # coord loss only where Y_train holds a coord token
    assert not set(tt.ce_positions) & {p for p, _, _ in tt.coord_targets}
    assert tt.fn_appended == len(tt.fn_gt) and len(set(tt.fn_gt)) == len(tt.fn_gt)

    pre = prefix_text(r, table)
    try:
        prefix_pairs = json.loads(pre + "}", object_pairs_hook=list)
    except (json.JSONDecodeError, RecursionError):
        prefix_pairs = None  # invalid entries kept in the prefix: Y_train needs not be JSON
    if prefix_pairs is not None and isinstance(prefix_pairs, list):
        text = table.text(y)
        assert text.endswith(IM_END)
        body = text[: -len(IM_END)]
        top = json.loads(body, object_pairs_hook=list)  # ONE JSON object ...
        assert isinstance(top, list)
        dec = json.JSONDecoder(object_pairs_hook=list)
        body = body.lstrip()  # the answer may start with a space token (' {'); raw_decode does not skip it
        obj, end = dec.raw_decode(body)
        assert body[end:].strip() == ""  # ... and nothing after it
        keys = [k for k, _ in top]
        prefix_keys = [k for k, _ in prefix_pairs]
        appended = keys[len(prefix_keys):]
        assert keys[: len(prefix_keys)] == prefix_keys
        assert len(appended) == tt.fn_appended
        assert len(set(appended)) == len(appended) and not set(appended) & set(prefix_keys), (prefix_keys, appended)
        EXAMPLES["pipeline_json_checked"] += 1
    return r, tt


# ----------------------------------------------------------------------------------------- alphabets


@pytest.fixture(scope="module")
def vocab(token_table):
    t = token_table
    punct = sorted(i for i, p in enumerate(t.pieces) if p and not t.is_coord(i) and set(p) <= set(b'{}[]:," '))
    words = sorted({i for s in ("object", "_", "1", "2", "12", "desc", "bbox", "2", "d", "poly", "cat", "\\", "\\\"", "null",
                                "true", "-", "1e9", ".", "猫", "é", "<|", "im", "_end", "|>") for i in t.encode(s)})
    coords = [int(c) for c in t.coord_ids]
    return {"punct": punct, "words": words, "coords": coords, "n": len(t.pieces)}


def test_punctuation_alphabet_is_the_json_punctuation_tokens(vocab, token_table):
    assert len(vocab["punct"]) >= 150  # Qwen's vocabulary: 184 punctuation-only JSON tokens (plus spaces/quotes)
    assert {token_table.piece(i) for i in vocab["punct"]} >= {b"}}", b'"]', b"},", b'"]}', b'"},', b"]},", b"}}}"}


def token_st(vocab):
    return st.one_of(
        st.integers(0, vocab["n"] - 1),           # anything in the real vocabulary (specials included)
        st.sampled_from(vocab["coords"]),
        st.sampled_from(vocab["punct"]),
        st.sampled_from(vocab["punct"]),
        st.sampled_from(vocab["words"]),
    )


@given(data=st.data())
def test_random_token_sequences(token_table, vocab, data):
    EXAMPLES["random_tokens"] += 1
    t = token_table
    head = data.draw(st.sampled_from([[], t.encode("{"), t.encode('{"object_1": {"desc": "a", "bbox_2d": [')]))
    body = data.draw(st.lists(token_st(vocab), max_size=80))
    check_pipeline(t, head + body, seed=data.draw(st.integers(0, 3)))


# ---------------------------------------------------------------------------------- rich rollouts

desc_st = st.one_of(
    st.sampled_from(["cat", 'say "hi"', "back\\slash", "猫 über café", "emoji 🐈‍⬛", "tab\tnl\n", "{\"object_9\": [}", IM_END, "  ", ""]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6),
)
coord_st = st.integers(0, 999).map(lambda k: f"<|coord_{k}|>")
odd_value_st = st.recursive(
    st.one_of(st.integers(-10**30, 10**30), st.floats(allow_nan=False, allow_infinity=False), st.just(1e308), st.booleans(),
              st.none(), coord_st, st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["desc", "bbox_2d", "poly", "x"]), inner, max_size=3)),
    max_leaves=12,
)


@st.composite
def entry_st(draw):
    kind = draw(st.sampled_from(["bbox", "bbox", "poly", "odd", "extra_key", "deep", "huge"]))
    desc = draw(desc_st)
    if kind == "bbox":
        v = {"desc": desc, "bbox_2d": draw(st.lists(coord_st, min_size=4, max_size=4))}
    elif kind == "poly":
        v = {"desc": desc, "poly": draw(st.lists(st.lists(coord_st, min_size=2, max_size=2), min_size=3, max_size=5))}
    elif kind == "extra_key":
        v = {"desc": desc, "bbox_2d": draw(st.lists(coord_st, min_size=4, max_size=4)), "score": 0.5}
    elif kind == "deep":
        depth = draw(st.integers(5, 60))
        v = {"desc": desc, "bbox_2d": json.loads("[" * depth + '"<|coord_1|>"' + "]" * depth)}
    elif kind == "huge":
        v = {"desc": desc, "bbox_2d": [10**40, -1e308, 3, 4]}
    else:
        v = draw(odd_value_st)
    key = draw(st.one_of(st.integers(1, 12).map(lambda n: f"object_{n}"), st.sampled_from(["object_0", "object_007", "objects", "x", ""]),
                         st.integers(10**20, 10**21).map(lambda n: f"object_{n}")))
    return key, v


def rich_text(entries) -> str:
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in entries) + "}"


def split_token(t, tok: int) -> list[int]:
    """A token spelled by smaller tokens (character by character; bytes as they come)."""
    p = t.piece(tok)
    try:
        s = p.decode("utf-8")
    except UnicodeDecodeError:
        return [tok]
    if t.is_coord(tok) or len(s) < 2:
        return [tok]
    return [i for ch in s for i in t.encode(ch)]


def fuse(t, a: int, b: int) -> list[int]:
    """Two neighbouring tokens replaced by one token spelling both, when the vocabulary has it."""
    try:
        s = (t.piece(a) + t.piece(b)).decode("utf-8")
    except UnicodeDecodeError:
        return [a, b]
    ids = t.encode(s)
    return ids if len(ids) == 1 and not t.is_coord(a) and not t.is_coord(b) else [a, b]


@st.composite
def mutated_rollout(draw, t, vocab):
    entries = draw(st.lists(entry_st(), max_size=5))
    text = rich_text(entries)
    if draw(st.booleans()):  # non-canonical tokenization at random character boundaries
        cuts = sorted(draw(st.sets(st.integers(1, max(len(text) - 1, 1)), max_size=6)))
        parts = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)]) if text[i:j]]
        ids = [i for p in parts for i in t.encode(p)]
    else:
        ids = t.encode(text)
    ops = draw(st.lists(st.tuples(st.sampled_from(["del", "dup", "ins", "split", "fuse", "im_end"]), st.integers(0, 10**6), token_st(vocab)),
                        max_size=5))
    for op, where, tok in ops:
        i = where % (len(ids) + 1)
        if op == "ins":
            ids.insert(i, tok)
        elif op == "im_end":
            ids.insert(i, t.im_end_id)
        elif i < len(ids):
            if op == "del":
                del ids[i]
            elif op == "dup":
                ids.insert(i, ids[i])
            elif op == "split":
                ids[i : i + 1] = split_token(t, ids[i])
            elif op == "fuse" and i + 1 < len(ids):
                ids[i : i + 2] = fuse(t, ids[i], ids[i + 1])
    if draw(st.booleans()):
        ids = ids[: draw(st.integers(0, len(ids)))]  # truncation (the max_new_tokens cap)
    return ids


@pytest.fixture(scope="module")
def mutated(token_table, vocab):
    return mutated_rollout(token_table, vocab)


@given(data=st.data())
def test_mutated_rich_rollouts(token_table, mutated, data):
    EXAMPLES["mutated_rollouts"] += 1
    ids = data.draw(mutated)
    gts = data.draw(st.sampled_from([GTS, GTS[:1], [], GTS * 3]))
    check_pipeline(token_table, ids, gts, seed=data.draw(st.integers(0, 3)))


def proper_box(values: list[str]) -> bool:
    """x2 > x1 and y2 > y1 (inverted or flat boxes are invalid objects)."""
    bins = [parse_coord_token(v) for v in values]
    return None not in bins and bins[2] > bins[0] and bins[3] > bins[1]


@given(entries=st.lists(entry_st(), min_size=1, max_size=4))
@example(entries=[("object_1", {"desc": "\ufb2a", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]})])  # not NFC
def test_valid_objects_survive_rich_neighbours(token_table, entries):
    """Canonical tokenization of rich entries: every well-formed object_N entry is parsed back exactly."""
    EXAMPLES["rich_canonical"] += 1
    t = token_table
    ids = t.encode(rich_text(entries))
    r, _ = check_pipeline(t, ids)
    # With the top-level object closed and every entry tokenized canonically, the parser keeps at least
    # the well-formed ones that come before the first entry breaking the structure (none does here).
    if IM_END not in rich_text(entries):
        good = [(k, v) for k, v in entries if k.startswith("object_") and k[7:].isdigit() and isinstance(v, dict)
                and set(v) in ({"desc", "bbox_2d"}, {"desc", "poly"}) and isinstance(v["desc"], str) and v["desc"].strip()
                and control_text_in(v["desc"]) is None
                and ("bbox_2d" in v and len(v["bbox_2d"]) == 4 and all(isinstance(x, str) for x in v["bbox_2d"]) and proper_box(v["bbox_2d"])
                     or "poly" in v and all(isinstance(p, list) and len(p) == 2 for p in v["poly"]))]
        assert len(r.objects) == len(good)
        # the tokenizer NFC-normalises text, so a desc comes back in NFC (data loaded from JSONL is NFC already)
        assert [o.desc for o in r.objects] == [unicodedata.normalize("NFC", v["desc"]) for _, v in good]


# ---------------------------------------------------------------------------- truncation everywhere

RICH_ENTRIES = [
    ("object_1", {"desc": 'a "quoted" \\ desc 猫', "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_30|>", "<|coord_40|>"]}),
    ("object_2", {"desc": "huge", "bbox_2d": [10**40, 2, 3, 4]}),
    ("object_3", {"desc": "deep", "poly": json.loads("[" * 30 + "1" + "]" * 30)}),
    ("object_10", {"desc": "tri über", "poly": [["<|coord_5|>", "<|coord_6|>"], ["<|coord_70|>", "<|coord_8|>"], ["<|coord_9|>", "<|coord_100|>"]]}),
    ("object_4", {"desc": "dup", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_30|>", "<|coord_40|>"]}),
]


@pytest.mark.parametrize("split", [False, True], ids=["canonical", "split-punctuation"])
def test_truncation_at_every_position_of_a_rich_rollout(token_table, split):
    t = token_table
    text = rich_text(RICH_ENTRIES)
    ids = t.encode(text)
    if split:
        ids = [j for i in ids for j in split_token(t, i)]
    full = parse_rollout(ids, t)
    assert [o.key for o in full.objects] == ["object_1", "object_10", "object_4"] and full.dropped_invalid == 2
    kept = 0
    for cut in range(len(ids) + 1):
        r, tt = check_pipeline(t, ids[:cut], seed=cut)
        assert len(r.objects) <= 3
        kept = max(kept, len(r.objects))
        EXAMPLES["truncation_positions"] += 1
    assert kept == 3


def test_stray_im_end_at_every_position(token_table):
    t = token_table
    ids = t.encode(rich_text(RICH_ENTRIES[:1] + RICH_ENTRIES[3:4]))
    for i in range(len(ids) + 1):
        r, _ = check_pipeline(t, ids[:i] + [t.im_end_id] + ids[i:])
        assert r.stopped_at_im_end or i == len(ids) or r.num_response_tokens >= 0
        EXAMPLES["stray_im_end_positions"] += 1


def test_escaped_object_key_does_not_collide_with_appended_keys(token_table):
    """A key spelled with a JSON escape ("object_\\u0032" == "object_2") must still reserve its index."""
    t = token_table
    text = '{"object_\\u0032": {"desc": "x", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}}'
    r, _ = check_pipeline(t, t.encode(text))
    assert r.max_object_index == 2


def test_example_counts_reached_the_profile():
    """Runs last in this module: each property ran its profile's number of examples."""
    for name in ("random_tokens", "mutated_rollouts", "rich_canonical"):
        if name in EXAMPLES:
            assert EXAMPLES[name] >= EXPECTED_EXAMPLES, (name, EXAMPLES[name])
