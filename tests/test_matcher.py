"""Matching (SPEC §7): candidates, gating, dummy FP/FN augmentation, sparse assignment == dense LSA."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from src.data.objects import DetObject
from src.rollout_matching.geometry import mask_iou, object_boxes
from src.rollout_matching.matcher import MatchResult, assign_pairs, candidate_pairs, match_objects

BACKENDS = ["raster", "exact"]
INFEASIBLE = 1e6


def box(x1, y1, x2, y2):
    return DetObject("box", "bbox_2d", (x1, y1, x2, y2))


def poly(*xy):
    return DetObject("poly", "poly", tuple(xy))


def shifted(o: DetObject, dx: int, dy: int) -> DetObject:
    return DetObject(o.desc, o.geometry, tuple(v + (dx if i % 2 == 0 else dy) for i, v in enumerate(o.bins)))


SCENE = [
    box(50, 50, 200, 180),
    poly(300, 60, 450, 80, 420, 220, 310, 200),
    box(600, 600, 900, 950),
    poly(100, 500, 250, 450, 300, 600, 200, 700, 90, 650),
    box(700, 100, 760, 300),
    poly(450, 450, 520, 460, 500, 560),
]


# ---------------------------------------------------------------------- the dense SPEC §7 reference


def dense_reference(num_preds, num_gts, rows, cols, cost, fp_cost, fn_cost):
    """Literal SPEC §7: ONE linear_sum_assignment on the (P+G)^2 dummy-augmented matrix."""
    n = num_preds + num_gts
    m = np.full((n, n), INFEASIBLE)
    m[rows, cols] = cost  # [P, G] block, feasible pairs only
    m[np.arange(num_preds), num_gts + np.arange(num_preds)] = fp_cost  # [P, P] diagonal
    m[num_preds + np.arange(num_gts), np.arange(num_gts)] = fn_cost  # [G, G] diagonal
    m[num_preds:, num_gts:] = 0.0  # [G, P] zeros
    r, c = linear_sum_assignment(m)
    real = (r < num_preds) & (c < num_gts) & (m[r, c] < INFEASIBLE)
    return set(zip(r[real].tolist(), c[real].tolist()))


def total_cost(pairs, num_preds, num_gts, cost_of, fp_cost, fn_cost):
    return sum(cost_of[p] for p in pairs) + fp_cost * (num_preds - len(pairs)) + fn_cost * (num_gts - len(pairs))


@settings(max_examples=150, deadline=None)
@given(
    num_preds=st.integers(0, 9),
    num_gts=st.integers(0, 9),
    density=st.floats(0.0, 1.0),
    fp_cost=st.sampled_from([0.05, 0.3, 0.5, 2.0]),
    fn_cost=st.sampled_from([0.1, 0.4, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_assignment_equals_dense_lsa(num_preds, num_gts, density, fp_cost, fn_cost, seed):
    rng = np.random.default_rng(seed)
    feasible = rng.random((num_preds, num_gts)) < density
    rows, cols = np.nonzero(feasible)
    cost = rng.random(len(rows))  # continuous: ties have probability 0, so the optimum is unique
    got = assign_pairs(num_preds, num_gts, rows, cols, cost, fp_cost=fp_cost, fn_cost=fn_cost)
    got_pairs = set(zip(rows[got].tolist(), cols[got].tolist()))
    want_pairs = dense_reference(num_preds, num_gts, rows, cols, cost, fp_cost, fn_cost)
    cost_of = dict(zip(zip(rows.tolist(), cols.tolist()), cost.tolist()))
    assert total_cost(got_pairs, num_preds, num_gts, cost_of, fp_cost, fn_cost) == pytest.approx(
        total_cost(want_pairs, num_preds, num_gts, cost_of, fp_cost, fn_cost)
    )
    assert got_pairs == want_pairs
    assert len({p for p, _ in got_pairs}) == len(got_pairs) == len({g for _, g in got_pairs})  # one-to-one


@pytest.mark.parametrize("seed", range(4))
def test_match_objects_equals_dense_reference_on_random_scenes(seed):
    rng = np.random.default_rng(seed)
    gts = []
    for _ in range(40):
        x, y = rng.integers(0, 900, 2)
        w, h = rng.integers(15, 100, 2)
        gts.append(box(int(x), int(y), int(min(x + w, 999)), int(min(y + h, 999))))
    preds = [shifted(g, *rng.integers(-12, 13, 2)) for g in gts[:30]]
    preds += [shifted(g, *rng.integers(-25, 26, 2)) for g in gts[:15]]  # duplicates
    preds = [DetObject(p.desc, p.geometry, tuple(int(np.clip(v, 0, 999)) for v in p.bins)) for p in preds]
    res = match_objects(preds, gts, maskiou_backend="exact")
    # rebuild the same gated candidate costs and solve the literal dense problem
    rows, cols = candidate_pairs(object_boxes(preds), object_boxes(gts), 5)
    iou = mask_iou(preds, gts, backend="exact")[rows, cols]
    keep = iou >= 0.3
    want = dense_reference(len(preds), len(gts), rows[keep], cols[keep], 1 - iou[keep], 0.5, 2.0)
    assert set(res.matches) == want
    assert res.gating_rejections == int((~keep).sum())


# ------------------------------------------------------------------------------------ behaviours


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_match_one_to_one_in_any_order(backend):
    perm = [3, 0, 5, 1, 4, 2]
    preds = [SCENE[j] for j in perm]
    res = match_objects(preds, SCENE, maskiou_backend=backend)
    assert res.matches == tuple((i, j) for i, j in enumerate(perm))
    assert res.fp == () and res.fn == () and res.gating_rejections == 0
    assert len(res.match_iou) == len(res.matches)
    assert min(res.match_iou) > 0.97


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_prediction_below_gate_is_fp_and_fn(backend):
    gt = box(100, 100, 300, 300)
    pred = shifted(gt, 130, 0)  # IoU = 70*200 / (2*40000 - 14000) ~ 0.21 < 0.3
    res = match_objects([pred], [gt], maskiou_backend=backend)
    assert res == MatchResult(matches=(), fp=(0,), fn=(0,), gating_rejections=1, match_iou=())
    assert match_objects([pred], [gt], maskiou_gate=0.2, maskiou_backend=backend).matches == ((0, 0),)


def test_dummy_fp_and_fn():
    gts = [box(100, 100, 300, 300), box(600, 600, 800, 800)]
    preds = [box(900, 0, 990, 60), shifted(gts[0], 5, 5)]  # a hallucination, then a good hit
    res = match_objects(preds, gts)
    assert res.matches == ((1, 0),)
    assert res.fp == (0,) and res.fn == (1,)
    assert res.gating_rejections == 2  # the hallucination's candidates (both GT, by centre distance) fail


def test_cheap_unmatched_beats_a_poor_match_when_costs_say_so():
    gt = box(100, 100, 300, 300)
    pred = shifted(gt, 60, 0)  # IoU ~ 0.54, cost ~ 0.46
    assert match_objects([pred], [gt]).matches == ((0, 0),)
    res = match_objects([pred], [gt], fp_cost=0.2, fn_cost=0.2)  # 0.4 < 0.46: leave both unmatched
    assert res.matches == () and res.fp == (0,) and res.fn == (0,) and res.gating_rejections == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_predictions_one_matched_one_fp(backend):
    gt = poly(200, 200, 500, 220, 480, 500, 220, 480)
    preds = [shifted(gt, 30, 20), shifted(gt, 3, 2)]  # the second is better
    res = match_objects(preds, [gt], maskiou_backend=backend)
    assert res.matches == ((1, 0),) and res.fp == (0,) and res.fn == ()


def test_empty_cases():
    gts = SCENE[:3]
    assert match_objects([], gts) == MatchResult((), (), (0, 1, 2), 0, ())
    assert match_objects(gts[:2], []) == MatchResult((), (0, 1), (), 0, ())
    assert match_objects([], []) == MatchResult((), (), (), 0, ())


def test_top_k_limits_the_candidates():
    # the GT with the best BOX IoU is the mirror triangle (same AABB, maskIoU 0); the box is second
    pred = poly(0, 0, 400, 0, 0, 400)
    gts = [poly(400, 0, 400, 400, 0, 400), box(0, 0, 300, 300), box(350, 350, 999, 999)]
    only_best = match_objects([pred], gts, candidate_top_k=1, maskiou_backend="exact")
    assert only_best.matches == () and only_best.gating_rejections == 1
    two = match_objects([pred], gts, candidate_top_k=2, maskiou_backend="exact")
    assert two.matches == ((0, 1),) and two.gating_rejections == 1
    assert two.match_iou[0] == pytest.approx(0.7)


def test_candidate_pairs_top_k_by_box_iou_and_centre_fallback():
    preds = np.array([[0, 0, 100, 100], [800, 800, 820, 820]], dtype=float)
    gts = np.array(
        [
            [0, 0, 100, 100],  # IoU 1 with pred 0
            [50, 0, 150, 100],  # IoU 1/3
            [0, 0, 100, 50],  # IoU 1/2
            [90, 90, 200, 200],  # IoU ~0.004
            [600, 600, 650, 650],  # far from pred 0; centre distance to pred 1 ~ 247
            [900, 900, 950, 950],  # centre distance to pred 1 ~ 177
        ],
        dtype=float,
    )
    rows, cols = candidate_pairs(preds, gts, 3)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 2), (0, 1), (1, 5), (1, 4), (1, 3)]
    rows, cols = candidate_pairs(preds, gts, 10)  # pred 0 never gets zero-IoU GT; pred 1 gets all G
    assert cols[rows == 0].tolist() == [0, 2, 1, 3]
    assert sorted(cols[rows == 1].tolist()) == list(range(6))


def test_centre_distance_fallback_matches_the_nearest_gt_when_gate_is_zero():
    gts = [box(0, 0, 50, 50), box(500, 500, 560, 560), box(900, 900, 950, 950)]
    pred = box(600, 600, 640, 640)  # overlaps no GT box; nearest centre is GT 1
    res = match_objects([pred], gts, candidate_top_k=1, maskiou_gate=0.0)
    assert res.matches == ((0, 1),) and res.match_iou == (0.0,)
    gated = match_objects([pred], gts, candidate_top_k=2)
    assert gated.matches == () and gated.gating_rejections == 2


def test_results_are_sorted_and_consistent():
    rng = np.random.default_rng(7)
    preds = [shifted(SCENE[j], *rng.integers(-8, 9, 2)) for j in rng.permutation(6)] + [box(0, 900, 40, 950)]
    res = match_objects(preds, SCENE)
    assert [i for i, _ in res.matches] == sorted(i for i, _ in res.matches)
    assert list(res.fp) == sorted(res.fp) and list(res.fn) == sorted(res.fn)
    assert set(res.fp) | {i for i, _ in res.matches} == set(range(len(preds)))
    assert set(res.fn) | {j for _, j in res.matches} == set(range(len(SCENE)))
    assert all(0.3 <= v <= 1.0 for v in res.match_iou)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"candidate_top_k": 0}, "candidate_top_k"),
        ({"candidate_top_k": 2.5}, "candidate_top_k"),
        ({"maskiou_gate": -0.1}, "maskiou_gate"),
        ({"maskiou_gate": 1.5}, "maskiou_gate"),
        ({"maskiou_resolution": 8}, "maskiou_resolution"),
        ({"maskiou_backend": "mask"}, "maskiou_backend"),
        ({"fp_cost": 0.0}, "fp_cost"),
        ({"fn_cost": -1.0}, "fn_cost"),
        ({"fn_cost": float("inf")}, "fn_cost"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        match_objects(SCENE[:1], SCENE[:1], **kwargs)
