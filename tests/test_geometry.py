"""Pairwise geometry in bins: box IoU, centre distance, maskIoU (raster and exact backends)."""

from __future__ import annotations

import numpy as np
import pytest

from src.data.objects import DetObject
from src.rollout_matching import geometry
from src.rollout_matching.geometry import (
    box_iou,
    box_iou_pairs,
    centre_distance,
    mask_iou,
    mask_iou_pairs,
    object_boxes,
    overlapping_pairs,
)


def box(x1, y1, x2, y2):
    return DetObject("box", "bbox_2d", (x1, y1, x2, y2))


def poly(*xy):
    return DetObject("poly", "poly", tuple(xy))


def blob(rng, radius):
    """A random star-shaped polygon of 5-9 vertices around the canvas centre region."""
    c = rng.uniform(300, 700, 2)
    k = int(rng.integers(5, 10))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    r = radius * rng.uniform(0.6, 1.0, k)
    pts = np.clip(np.round(c + np.c_[r * np.cos(ang), r * np.sin(ang)]), 0, 999).astype(int)
    return DetObject("blob", "poly", tuple(pts.ravel().tolist()))


# ------------------------------------------------------------------------------------------ boxes


def test_box_iou_hand_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5]])
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [10, 0, 20, 10], [5, 5, 5, 5]])
    iou = box_iou(a, b)
    assert iou.shape == (3, 4)
    np.testing.assert_allclose(iou[0], [25 / 175, 1.0, 0.0, 0.0])  # overlap, identical, touching, point
    assert iou[2, 3] == 0.0  # two zero-area boxes: empty union -> 0, not NaN
    np.testing.assert_allclose(box_iou_pairs(a, b[:3]), np.diag(iou[:, :3]))


def test_box_iou_empty_shapes():
    assert box_iou(np.zeros((0, 4)), np.ones((3, 4))).shape == (0, 3)
    assert box_iou(np.ones((2, 4)), np.zeros((0, 4))).shape == (2, 0)


def test_centre_distance_hand_value():
    d = centre_distance(np.array([[0, 0, 2, 2]]), np.array([[3, 4, 5, 6], [0, 0, 2, 2]]))
    np.testing.assert_allclose(d, [[5.0, 0.0]])


@pytest.mark.parametrize("dense_max", [geometry.DENSE_PAIRS_MAX, 0], ids=["dense", "str-tree"])
def test_overlapping_pairs_equals_positive_box_iou(monkeypatch, dense_max):
    monkeypatch.setattr(geometry, "DENSE_PAIRS_MAX", dense_max)  # both branches give the same pairs
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 900, (40, 2))
    a = np.c_[xy, xy + rng.uniform(1, 150, (40, 2))]
    xy = rng.uniform(0, 900, (30, 2))
    b = np.c_[xy, xy + rng.uniform(1, 150, (30, 2))]
    b[0] = [a[0, 2], a[0, 1], a[0, 2] + 10, a[0, 3]]  # touches a[0] along an edge: not a pair
    rows, cols = overlapping_pairs(a, b)
    want_rows, want_cols = np.nonzero(box_iou(a, b) > 0)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(cols, want_cols)


def test_object_boxes_and_corner_order():
    objs = [box(10, 20, 30, 40), poly(5, 9, 50, 1, 20, 70)]
    np.testing.assert_array_equal(object_boxes(objs), [o.aabb() for o in objs])
    coords, sizes = geometry._vertices(objs)
    assert sizes.tolist() == [4, 3]
    np.testing.assert_array_equal(coords[:4], objs[0].points())  # same corner order as DetObject.points()


# ---------------------------------------------------------------------------------------- maskIoU


@pytest.mark.parametrize("backend", ["raster", "exact"])
def test_triangle_vs_its_bbox_is_half(backend):
    tri, bb = poly(100, 100, 500, 100, 100, 500), box(100, 100, 500, 500)
    iou = mask_iou([tri], [bb], backend=backend)[0, 0]
    if backend == "exact":
        assert iou == pytest.approx(0.5, abs=1e-12)
    else:
        assert iou == pytest.approx(0.5, abs=0.02)


def test_raster_and_exact_agree_on_moderate_shapes():
    rng = np.random.default_rng(1)
    a = [blob(rng, 150) for _ in range(12)]
    b = [DetObject("s", "poly", tuple(int(np.clip(v + s, 0, 999)) for v in o.bins)) for o, s in zip(a, rng.integers(-40, 41, 12))]
    b += [box(300, 300, 600, 550), box(350, 280, 700, 640)]
    raster, exact = mask_iou(a, b), mask_iou(a, b, backend="exact")
    assert raster.shape == exact.shape == (12, 14)
    assert np.abs(raster - exact).max() < 0.02
    assert (exact > 0.3).sum() >= 10  # the comparison covers real overlaps, not just zeros


def test_sliver_is_lost_by_the_raster_at_256_but_not_by_exact():
    """The documented limit: 2 bins = 0.51 px at R=256, rasterised to an empty mask."""
    sliver = [box(500, 100, 502, 900), poly(500, 100, 502, 100, 502, 900, 500, 900)]
    np.testing.assert_allclose(mask_iou(sliver, sliver, backend="exact"), 1.0)
    np.testing.assert_array_equal(mask_iou(sliver, sliver, backend="raster"), 0.0)
    np.testing.assert_allclose(mask_iou(sliver, sliver, resolution=2048), 1.0)  # 4 px wide: seen again


@pytest.mark.parametrize("backend", ["raster", "exact"])
def test_degenerate_polygons_give_zero(backend):
    degenerate = [
        poly(100, 100, 200, 200, 300, 300),  # collinear
        poly(100, 100, 100, 100, 100, 100),  # one repeated point
        poly(100, 100, 300, 300),  # two vertices only
        box(100, 100, 100, 400),  # zero-width box
    ]
    others = degenerate + [box(0, 0, 999, 999), poly(90, 90, 320, 90, 320, 320)]
    iou = mask_iou(degenerate, others, backend=backend)
    np.testing.assert_array_equal(iou, 0.0)


def test_inverted_and_flat_boxes_are_degenerate_on_both_backends():
    """One verdict per box: an inverted box (x2 < x1 or y2 < y1) used to get maskIoU 1.0 with its
    normalised twin from the exact backend (its corners span the same rectangle) and 0.0 from the
    raster one. Such a box (and a zero-width or zero-height one) is degenerate: 0 on both backends, with
    boxes and polygons, through mask_iou and mask_iou_pairs."""
    bad = [box(300, 100, 100, 400), box(100, 400, 300, 100), box(300, 400, 100, 100), box(100, 100, 300, 100)]
    good = [box(100, 100, 300, 400), poly(100, 100, 300, 100, 300, 400, 100, 400), poly(90, 90, 320, 90, 200, 420)]
    for backend in ("raster", "exact"):
        np.testing.assert_array_equal(mask_iou(bad, good + bad, backend=backend), 0.0)
        np.testing.assert_array_equal(mask_iou(good + bad, bad, backend=backend), 0.0)
        rows, cols = np.meshgrid(np.arange(len(bad)), np.arange(len(good)), indexing="ij")
        np.testing.assert_array_equal(mask_iou_pairs(bad, good, rows.ravel(), cols.ravel(), backend=backend), 0.0)
        assert mask_iou(good[:1], good[1:2], backend=backend)[0, 0] == pytest.approx(1.0)  # the proper twin still matches


def test_self_intersecting_polygon_is_repaired_with_both_lobes():
    bow_tie = poly(0, 0, 100, 100, 100, 0, 0, 100)  # two triangles of area 2500 each
    assert mask_iou([bow_tie], [box(0, 0, 100, 100)], backend="exact")[0, 0] == pytest.approx(0.5)
    assert mask_iou([bow_tie], [bow_tie], backend="exact")[0, 0] == pytest.approx(1.0)


def test_coordinates_are_clamped():
    # same shape once the out-of-range vertex is clamped to 999
    a, b = poly(900, 900, 1200, 900, 900, 999), poly(900, 900, 999, 900, 900, 999)
    for backend in ("raster", "exact"):
        assert mask_iou([a], [b], backend=backend)[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["raster", "exact"])
def test_mask_iou_pairs_matches_full_matrix(backend, monkeypatch):
    monkeypatch.setattr(geometry, "RASTER_CHUNK", 3)  # exercise several pycocotools calls
    rng = np.random.default_rng(2)
    a = [blob(rng, 120) for _ in range(10)] + [box(400, 400, 600, 650)]
    b = [blob(rng, 120) for _ in range(7)] + [box(380, 420, 640, 600)]
    full = mask_iou(a, b, backend=backend)
    rows = rng.integers(0, len(a), 30)
    cols = rng.integers(0, len(b), 30)
    np.testing.assert_allclose(mask_iou_pairs(a, b, rows, cols, backend=backend), full[rows, cols])
    assert mask_iou_pairs(a, b, np.zeros(0, int), np.zeros(0, int), backend=backend).shape == (0,)


@pytest.mark.parametrize("resolution", [16, 256, 1000])
def test_raster_box_rects_equal_pycocotools_for_every_bin_value(resolution):
    """The closed-form pixel rectangle of a box = what pycocotools rasterises, for every bin value of
    each side (the other sides at the extremes) and for 1- and 3-bin boxes everywhere."""
    from pycocotools import mask as coco_mask

    boxes = []
    for v in range(1000):
        boxes += [(v, 0, 999, 999), (0, v, 999, 999), (0, 0, v, 999), (0, 0, 999, v)]
        boxes += [(v, v, min(999, v + 1), min(999, v + 1)), (v, v, min(999, v + 3), min(999, v + 3))]
    boxes = np.array(boxes, dtype=np.float64)
    rles = geometry._raster_rles([box(*b) for b in boxes.astype(int).tolist()], resolution)
    area = np.concatenate([coco_mask.area(rles[i : i + 200]) for i in range(0, len(rles), 200)])  # lists > 255 overflow
    bbox = coco_mask.toBbox(rles)  # [N, 4] x, y, w, h of the mask
    rects = geometry.raster_box_rects(boxes, resolution)  # [N, 4] c0, r0, c1, r1
    w, h = np.maximum(rects[:, 2] - rects[:, 0], 0), np.maximum(rects[:, 3] - rects[:, 1], 0)
    np.testing.assert_array_equal(area, w * h)  # same pixel count ...
    full = w * h > 0
    np.testing.assert_array_equal(bbox[full], np.c_[rects[full, :2], w[full], h[full]])  # ... and the mask fills its box
    assert (~full).sum() > 0 and full.sum() > 0  # both empty and non-empty masks were checked


def test_box_box_pairs_are_bit_identical_to_pycocotools(monkeypatch):
    """mask_iou_pairs' closed form for box-box pairs gives exactly pycocotools' values (mask_iou
    rasterises everything), on crowded random boxes incl. slivers, touching and border boxes."""
    rng = np.random.default_rng(5)

    def rand_boxes(n):
        x1, y1 = rng.integers(0, 999, n), rng.integers(0, 999, n)
        w, h = rng.integers(0, 60, n) * rng.integers(0, 2, n) + rng.integers(0, 4, n), rng.integers(0, 60, n) + rng.integers(0, 4, n)
        return [box(int(a), int(b), int(min(999, a + c)), int(min(999, b + d))) for a, b, c, d in zip(x1, y1, w, h)]

    a = rand_boxes(300) + [box(0, 0, 999, 999), box(100, 100, 200, 200), blob(rng, 100)]
    b = rand_boxes(250) + [box(200, 100, 300, 200), box(0, 0, 999, 999), blob(rng, 200)]
    for resolution in (16, 256, 999):
        full = mask_iou(a, b, resolution=resolution)
        rows, cols = np.nonzero(np.ones(full.shape, dtype=bool))
        pairs = mask_iou_pairs(a, b, rows, cols, resolution=resolution)
        np.testing.assert_array_equal(pairs, full[rows, cols])  # exact, not approximately
        assert (pairs > 0).sum() > 50 and ((pairs > 0) & (pairs < 1)).sum() > 20  # partial overlaps too


def test_mask_iou_empty_and_bad_arguments():
    assert mask_iou([], [box(0, 0, 5, 5)]).shape == (0, 1)
    assert mask_iou([box(0, 0, 5, 5)], [], backend="exact").shape == (1, 0)
    with pytest.raises(ValueError, match="backend"):
        mask_iou([box(0, 0, 5, 5)], [box(0, 0, 5, 5)], backend="shapely")
    with pytest.raises(ValueError, match="resolution"):
        mask_iou([box(0, 0, 5, 5)], [box(0, 0, 5, 5)], resolution=8)
    with pytest.raises(ValueError, match="equal length"):
        mask_iou_pairs([box(0, 0, 5, 5)], [box(0, 0, 5, 5)], np.zeros(2, int), np.zeros(1, int))
