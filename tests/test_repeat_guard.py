"""Degenerate-loop guard (SPEC §11): stops loops, never fires on clean rollouts, keeps complete objects."""

from __future__ import annotations

import torch

from src.data.objects import DetObject
from src.data.serialize import serialize_objects
from src.rollout_matching.parser import parse_rollout
from src.rollout_matching.repeat_guard import GuardSettings, RowGuard
from src.rollout.hf import RepeatGuardCriteria


def feed(table, ids, settings):
    g = RowGuard(table, settings)
    for k, t in enumerate(ids):
        if g.push(t):
            return k + 1, g.reason
    return len(ids), None


def box(i, desc="red square"):
    return DetObject(desc, "bbox_2d", (10 * i, 10, 10 * i + 5, 20))


def test_clean_rollout_never_triggers(token_table):
    ids = token_table.encode(serialize_objects([box(i, f"shape {i % 3}") for i in range(60)])) + [token_table.im_end_id]
    assert feed(token_table, ids, GuardSettings()) == (len(ids), None)


def test_repeated_object_loop_stops_and_keeps_distinct_objects(token_table):
    distinct = [box(i) for i in range(5)]
    loop = distinct + [box(2)] * 40
    ids = token_table.encode(serialize_objects(loop))
    used, reason = feed(token_table, ids, GuardSettings(max_duplicate_objects=2))
    assert reason == "duplicate_object" and used < 0.25 * len(ids)
    parsed = parse_rollout(ids[:used], token_table)
    assert [o.bins for o in parsed.objects][:5] == [o.bins for o in distinct]  # every non-duplicate object kept


def test_ngram_loop_stops(token_table):
    ids = token_table.encode(serialize_objects([box(i) for i in range(3)])[:-1] + ', "object_4": {"desc": "' + "la " * 400)
    used, reason = feed(token_table, ids, GuardSettings(ngram_size=8, ngram_max_repeats=4))
    assert reason == "ngram" and used < len(ids) // 4
    assert len(parse_rollout(ids[:used], token_table).objects) == 3


def test_max_objects(token_table):
    ids = token_table.encode(serialize_objects([box(i) for i in range(10)]))
    used, reason = feed(token_table, ids, GuardSettings(max_objects=4))
    assert reason == "max_objects" and len(parse_rollout(ids[:used], token_table).objects) == 4


def test_stopping_criteria_per_row_and_ignores_finished_rows(token_table):
    loop = token_table.encode(serialize_objects([box(1)] * 10))
    clean = token_table.encode(serialize_objects([box(i) for i in range(10)]))
    n = min(len(loop), len(clean))
    prompt = [7, 7, 7]
    crit = RepeatGuardCriteria(token_table, GuardSettings(max_duplicate_objects=1), len(prompt), (token_table.im_end_id, 151643))
    done = None
    for t in range(1, n + 1):
        ids = torch.tensor([prompt + loop[:t], prompt + clean[:t]])
        done = crit(ids, None)
        if done[0]:
            break
    assert done.tolist() == [True, False] and crit.stopped_rows == {0}


def test_multi_object_cycle_stops_at_the_second_consecutive_repeat(token_table):
    a, b, c = box(1), box(2, "blue"), box(3, "green")
    ids = token_table.encode(serialize_objects([box(10), a, b, c] + [a, b, c] * 30))
    used, reason = feed(token_table, ids, GuardSettings())
    assert reason == "duplicate_run"
    parsed = parse_rollout(ids[:used], token_table)
    assert [o.bins for o in parsed.objects] == [o.bins for o in (box(10), a, b, c, a, b)]  # stopped after "a b" repeated


def test_one_stray_duplicate_is_tolerated(token_table):
    objs = [box(i, f"shape {i % 3}") for i in range(30)]
    objs.insert(12, objs[4])  # one exact duplicate in an otherwise clean answer
    ids = token_table.encode(serialize_objects(objs)) + [token_table.im_end_id]
    assert feed(token_table, ids, GuardSettings()) == (len(ids), None)
