"""Sinkhorn OT and barycentric-projection targets for matched pairs (SPEC §8)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from src.data.objects import DetObject
from src.rollout_matching import ot
from src.rollout_matching.ot import barycentric_projection, prefix_targets, prefix_targets_batch, sinkhorn


def box(x1, y1, x2, y2):
    return DetObject("box", "bbox_2d", (x1, y1, x2, y2))


def poly(*xy):
    return DetObject("poly", "poly", tuple(xy))


SQUARE = poly(200, 200, 800, 200, 800, 800, 200, 800)
TRIANGLE = poly(250, 250, 750, 250, 500, 750)


def random_poly(rng, k):
    c = rng.uniform(150, 850, 2)
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    pts = np.clip(np.round(c + rng.uniform(20, 140) * np.c_[np.cos(ang), np.sin(ang)]), 0, 999).astype(int)
    return DetObject("p", "poly", tuple(pts.ravel().tolist()))


def random_box(rng):
    x, y = rng.integers(0, 900, 2)
    w, h = rng.integers(2, 99, 2)
    return box(int(x), int(y), int(x + w), int(y + h))


# ------------------------------------------------------------------------------------- sinkhorn


def test_sinkhorn_marginals_and_mass():
    rng = np.random.default_rng(0)
    plan = sinkhorn(rng.uniform(0, 300, (5, 7)), epsilon=10.0, iters=200)
    assert plan.shape == (5, 7) and np.all(plan >= 0)
    np.testing.assert_allclose(plan.sum(axis=0), 1 / 7, atol=1e-12)  # exact after the last column update
    np.testing.assert_allclose(plan.sum(axis=1), 1 / 5, atol=1e-6)


def test_sinkhorn_tiny_epsilon_is_finite_and_near_the_hard_assignment():
    cost = np.array([[0.0, 500.0, 900.0], [400.0, 10.0, 700.0], [800.0, 600.0, 5.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / divide / invalid warnings either
        plan = sinkhorn(cost, epsilon=1e-6, iters=30)
    assert np.all(np.isfinite(plan))
    np.testing.assert_allclose(plan, np.eye(3) / 3, atol=1e-9)


def test_log_domain_and_scaling_iterations_agree(monkeypatch):
    rng = np.random.default_rng(1)
    cost = rng.uniform(0, 900, (6, 9))
    fast = sinkhorn(cost, epsilon=10.0, iters=30)  # max C / eps = 90 < LINEAR_SAFE: scaling form
    monkeypatch.setattr(ot, "LINEAR_SAFE", -1.0)  # force the log domain
    np.testing.assert_allclose(sinkhorn(cost, epsilon=10.0, iters=30), fast, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"epsilon": 0.0}, "ot_epsilon"), ({"epsilon": float("nan")}, "ot_epsilon"), ({"iters": 0}, "ot_iters")],
)
def test_sinkhorn_bad_arguments(kwargs, message):
    args = {"epsilon": 10.0, "iters": 30} | kwargs
    with pytest.raises(ValueError, match=message):
        sinkhorn(np.ones((2, 2)), **args)
    with pytest.raises(ValueError, match="cost"):
        sinkhorn(np.ones((0, 2)), 10.0, 30)


# -------------------------------------------------------------------------------------- targets


def test_bbox_vs_bbox_copies_the_gt_slot_by_slot():
    assert prefix_targets(box(10, 20, 30, 40), box(12, 18, 35, 44)) == (12, 18, 35, 44)


def test_identical_shapes_give_the_gt_points():
    gt = poly(100, 100, 600, 120, 700, 600, 300, 800, 90, 500)
    assert prefix_targets(gt, gt) == gt.bins
    # a 4-vertex poly on a box's corners, in both directions
    assert prefix_targets(box(100, 200, 600, 700), poly(100, 200, 600, 200, 600, 700, 100, 700)) == (100, 200, 600, 700)
    assert prefix_targets(poly(100, 200, 600, 200, 600, 700, 100, 700), box(100, 200, 600, 700)) == (100, 200, 600, 200, 600, 700, 100, 700)


def test_square_onto_triangle_is_sane():
    targets = prefix_targets(SQUARE, TRIANGLE)
    assert len(targets) == len(SQUARE.bins)
    got = np.array(targets).reshape(-1, 2)
    pred, gt = np.array(SQUARE.points()), np.array(TRIANGLE.points())
    x1, y1, x2, y2 = TRIANGLE.aabb()
    assert np.all((got[:, 0] >= x1) & (got[:, 0] <= x2) & (got[:, 1] >= y1) & (got[:, 1] <= y2))
    for p, t in zip(pred, got):  # each vertex is pulled toward its nearest GT vertex
        nearest = gt[np.argmin(np.linalg.norm(gt - p, axis=1))]
        assert np.linalg.norm(t - nearest) < 0.2 * np.linalg.norm(p - nearest)


def test_bbox_prediction_vs_poly_gt_is_the_box_of_the_projected_corners():
    pred = box(200, 200, 800, 800)
    proj = barycentric_projection(np.array(pred.points()), np.array(TRIANGLE.points()))  # [4, 2]
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    want = tuple(int(np.floor(v + 0.5)) for v in (*lo, *hi))
    assert prefix_targets(pred, TRIANGLE) == want
    x1, y1, x2, y2 = want
    assert x1 < x2 and y1 < y2


def test_bbox_target_keeps_positive_extent():
    thin_gt = poly(500, 100, 500, 900, 500, 500)  # zero-width poly: projected corners share one x
    x1, y1, x2, y2 = prefix_targets(box(400, 100, 600, 900), thin_gt)
    assert x2 > x1 and y2 > y1


def test_poly_prediction_vs_bbox_gt_stays_in_the_box():
    pred = poly(90, 90, 420, 110, 380, 430, 120, 400, 60, 250)
    targets = prefix_targets(pred, box(100, 100, 400, 400))
    assert len(targets) == len(pred.bins)
    assert all(100 <= v <= 400 for v in targets)


def test_l1_and_l2_are_selectable():
    def reference(kind):
        p, g = np.array(SQUARE.points(), float), np.array(TRIANGLE.points(), float)
        diff = p[:, None] - g[None]
        cost = np.linalg.norm(diff, axis=-1) if kind == "l2" else np.abs(diff).sum(-1)
        plan = sinkhorn(cost, 10.0, 30)
        proj = (plan / plan.sum(axis=1, keepdims=True)) @ g
        return tuple(int(np.floor(v + 0.5)) for v in proj.ravel())

    l1, l2 = prefix_targets(SQUARE, TRIANGLE, ot_cost="l1"), prefix_targets(SQUARE, TRIANGLE, ot_cost="l2")
    assert l1 == reference("l1") and l2 == reference("l2")
    assert l1 != l2
    with pytest.raises(ValueError, match="ot_cost"):
        prefix_targets(SQUARE, TRIANGLE, ot_cost="cosine")


def test_tiny_epsilon_stays_finite():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        targets = prefix_targets(SQUARE, TRIANGLE, ot_epsilon=1e-9)
        box_targets = prefix_targets(box(200, 200, 800, 800), TRIANGLE, ot_epsilon=1e-9)
    assert targets == (250, 250, 750, 250, 500, 750, 500, 750)  # hard nearest-vertex assignment
    assert box_targets == (250, 250, 750, 750)


def test_targets_are_clamped_to_bins():
    # rounding can never leave 0..999, even for projections on the canvas border
    assert all(0 <= v <= 999 for v in prefix_targets(poly(0, 0, 999, 0, 999, 999), poly(0, 0, 999, 0, 999, 999, 0, 999)))


@pytest.mark.parametrize("log_domain", [False, True])
def test_batch_equals_one_by_one_and_lengths_match(log_domain, monkeypatch):
    if log_domain:  # padding must be inert in both iteration forms
        monkeypatch.setattr(ot, "LINEAR_SAFE", -1.0)
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(40):
        a = random_box(rng) if rng.random() < 0.4 else random_poly(rng, int(rng.integers(3, 13)))
        b = random_box(rng) if rng.random() < 0.4 else random_poly(rng, int(rng.integers(3, 13)))
        pairs.append((a, b))
    batch = prefix_targets_batch(pairs)
    assert batch == [prefix_targets(p, g) for p, g in pairs]
    assert all(len(t) == len(p.bins) for t, (p, _) in zip(batch, pairs))
    assert all(0 <= v <= 999 for t in batch for v in t)
    assert prefix_targets_batch([]) == []
