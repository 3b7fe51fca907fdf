"""Hungarian matching of parsed predictions to GT objects with dummy FP/FN slots (SPEC §7).

Pipeline for P predictions and G GT objects, all in bins:

1. candidates: for each prediction the ``candidate_top_k`` GT with the highest AABB IoU, among the
   GT whose box overlaps it at all (IoU > 0). A prediction that overlaps no GT box takes its
   ``candidate_top_k`` nearest GT by box-centre distance instead. Every other pair is infeasible.
   (Zero-IoU GT are not used to pad an overlapping prediction's list: their ranks would be ties,
   and they would only inflate ``gating_rejections``.)
2. cost: ``1 - maskIoU`` on candidate pairs only (:mod:`src.rollout_matching.geometry`).
3. gating, before assignment: a candidate with ``maskIoU < maskiou_gate`` becomes infeasible and
   is counted in ``gating_rejections``.
4. assignment on the dummy-augmented square (P+G) x (P+G) problem::

       rows: P predictions, then G dummies      columns: G GT, then P dummies
       [ 1 - maskIoU (gated)  [P, G] | fp_cost on the diagonal, infeasible elsewhere  [P, P] ]
       [ fn_cost on the diagonal, infeasible elsewhere  [G, G] | 0  [G, P] ]

   Infeasible cells are simply left out: the problem is solved as a SPARSE min-weight perfect
   matching (:func:`assign_pairs`, ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``,
   LAPJVsp), one C call whose work grows with the number of feasible pairs instead of (P+G)^3. It
   has the same optimum as ``scipy.optimize.linear_sum_assignment`` on the dense matrix with a
   large finite cost in the infeasible cells; ``tests/test_matcher.py`` checks this on random cases.

A prediction assigned to a real GT at a feasible cost is matched; other predictions are FP; GT not
matched are FN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from src.data.objects import DetObject
from src.rollout_matching.geometry import (
    MASKIOU_BACKENDS,
    MIN_MASKIOU_RESOLUTION,
    box_iou_pairs,
    centre_distance,
    mask_iou_pairs,
    object_boxes,
    overlapping_pairs,
)


@dataclass(frozen=True)
class MatchResult:
    """Outcome of :func:`match_objects`. Indices refer to the ``preds`` / ``gts`` sequences."""

    matches: tuple[tuple[int, int], ...]  # (pred_i, gt_j), sorted by pred_i
    fp: tuple[int, ...]  # unmatched prediction indices, sorted
    fn: tuple[int, ...]  # unmatched GT indices, sorted
    gating_rejections: int  # candidate (pred, gt) pairs rejected because maskIoU < gate
    match_iou: tuple[float, ...]  # maskIoU of each match (internal; never logged as a metric)


def match_objects(
    preds: Sequence[DetObject],
    gts: Sequence[DetObject],
    *,
    candidate_top_k: int = 5,
    maskiou_gate: float = 0.3,
    maskiou_resolution: int = 256,
    maskiou_backend: str = "raster",
    fp_cost: float = 0.5,
    fn_cost: float = 2.0,
) -> MatchResult:
    """Match ``preds`` (P) to ``gts`` (G), both in bins, minimising
    ``sum(1 - maskIoU) over matches + fp_cost * #FP + fn_cost * #FN`` over gated candidate pairs."""
    _check_args(candidate_top_k, maskiou_gate, maskiou_resolution, maskiou_backend, fp_cost, fn_cost)
    num_preds, num_gts = len(preds), len(gts)
    if num_preds == 0 or num_gts == 0:
        return MatchResult(matches=(), fp=tuple(range(num_preds)), fn=tuple(range(num_gts)), gating_rejections=0, match_iou=())

    rows, cols = candidate_pairs(object_boxes(preds), object_boxes(gts), candidate_top_k)  # [K], [K]
    iou = mask_iou_pairs(preds, gts, rows, cols, backend=maskiou_backend, resolution=maskiou_resolution)  # [K]
    feasible = iou >= maskiou_gate  # [K]
    rows, cols, iou = rows[feasible], cols[feasible], iou[feasible]  # [F]
    matched = assign_pairs(num_preds, num_gts, rows, cols, 1.0 - iou, fp_cost=fp_cost, fn_cost=fn_cost)  # [Mt]

    order = np.argsort(rows[matched], kind="stable")
    matched = matched[order]
    m_rows, m_cols = rows[matched], cols[matched]
    return MatchResult(
        matches=tuple(zip(m_rows.tolist(), m_cols.tolist())),
        fp=tuple(sorted(set(range(num_preds)) - set(m_rows.tolist()))),
        fn=tuple(sorted(set(range(num_gts)) - set(m_cols.tolist()))),
        gating_rejections=int((~feasible).sum()),
        match_iou=tuple(iou[matched].tolist()),
    )


def candidate_pairs(pred_boxes: np.ndarray, gt_boxes: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate (pred, gt) pairs from boxes ``pred_boxes [P, 4]`` and ``gt_boxes [G, 4]`` in bins.

    Returns ``rows [K]`` and ``cols [K]`` (int64, each pair once), sorted by prediction and, within a
    prediction, best first. A prediction gets its ``top_k`` GT by box IoU among those with IoU > 0
    (ties: lower GT index first), or, when it overlaps no GT box, its ``top_k`` GT by centre
    distance (closest first).
    """
    num_preds, num_gts = len(pred_boxes), len(gt_boxes)
    rows, cols = overlapping_pairs(pred_boxes, gt_boxes)  # [K'] pairs with box IoU > 0, sorted by row
    iou = box_iou_pairs(pred_boxes[rows], gt_boxes[cols])  # [K']
    order = np.lexsort((-iou, rows))  # by prediction, then IoU descending (stable: GT index on ties)
    rows, cols = rows[order], cols[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # [K'] position within the prediction's run
    rows, cols = rows[rank < top_k], cols[rank < top_k]

    has_candidate = np.zeros(num_preds, dtype=bool)
    has_candidate[rows] = True
    lonely = np.nonzero(~has_candidate)[0]  # [L] predictions overlapping no GT box, ascending
    if lonely.size:
        k = min(top_k, num_gts)
        nearest = np.argsort(centre_distance(pred_boxes[lonely], gt_boxes), axis=1, kind="stable")[:, :k]  # [L, k]
        rows = np.concatenate([rows, np.repeat(lonely, k)])
        cols = np.concatenate([cols, nearest.reshape(-1)])
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
    return rows.astype(np.int64), cols.astype(np.int64)


def assign_pairs(
    num_preds: int,
    num_gts: int,
    rows: np.ndarray,
    cols: np.ndarray,
    cost: np.ndarray,
    *,
    fp_cost: float,
    fn_cost: float,
) -> np.ndarray:
    """Optimal dummy-augmented assignment over the feasible pairs ``(rows[f], cols[f])`` at ``cost[f]``.

    ``rows``, ``cols``, ``cost`` are ``[F]`` with each (pred, gt) pair at most once; every other pair
    is infeasible. Returns the indices ``[Mt]`` into them of the matched pairs (sorted).

    Sparse form of the (P+G) x (P+G) matrix in the module docstring. Rows: prediction i, then dummy
    row P + j for GT j; columns: GT j, then dummy column G + i for prediction i. Edges:

        i -> j          cost[f]   feasible pair f = (i, j)
        i -> G + i      fp_cost   prediction unmatched (FP)
        P + j -> j      fn_cost   GT unmatched (FN)
        P + j -> G + i  0         for each feasible pair f = (i, j)

    The last line replaces the dense [G, P] zero block: a dummy-dummy cell is only used to pair the
    dummies freed by a match (i, j), and any pairing of them costs 0, so this edge set keeps every
    optimal solution. All weights are shifted by +1 (each perfect matching has exactly P + G edges,
    so the optimum does not move) because the sparse solver reads a 0 as "no edge".
    """
    rows, cols, cost = (np.asarray(x) for x in (rows, cols, cost))
    num_pairs = len(rows)
    if num_pairs == 0:
        return np.zeros(0, dtype=np.int64)
    if len(np.unique(rows * num_gts + cols)) != num_pairs:
        raise ValueError("assign_pairs needs each (pred, gt) pair at most once")
    preds, gts = np.arange(num_preds), np.arange(num_gts)
    edge_rows = np.concatenate([rows, preds, num_preds + gts, num_preds + cols])
    edge_cols = np.concatenate([cols, num_gts + preds, gts, num_gts + rows])
    weight = np.concatenate([cost, np.full(num_preds, fp_cost), np.full(num_gts, fn_cost), np.zeros(num_pairs)]) + 1.0
    n = num_preds + num_gts
    graph = csr_matrix((weight, (edge_rows, edge_cols)), shape=(n, n))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)  # [n], [n]
    col_of_row = np.empty(n, dtype=np.int64)
    col_of_row[row_ind] = col_ind
    return np.nonzero(col_of_row[rows] == cols)[0]


def _check_args(top_k: int, gate: float, resolution: int, backend: str, fp_cost: float, fn_cost: float) -> None:
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"candidate_top_k must be an int >= 1, got {top_k!r}")
    if not 0.0 <= gate <= 1.0:
        raise ValueError(f"maskiou_gate must be in [0, 1], got {gate!r}")
    if not isinstance(resolution, (int, np.integer)) or resolution < MIN_MASKIOU_RESOLUTION:
        raise ValueError(f"maskiou_resolution must be an int >= {MIN_MASKIOU_RESOLUTION}, got {resolution!r}")
    if backend not in MASKIOU_BACKENDS:
        raise ValueError(f"maskiou_backend must be one of {MASKIOU_BACKENDS}, got {backend!r}")
    for name, value in (("fp_cost", fp_cost), ("fn_cost", fn_cost)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
