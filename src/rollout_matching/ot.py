"""Self-context coord targets for a matched (prediction, GT) pair (SPEC §8).

- bbox <-> bbox: the GT box bins, slot by slot.
- any pair involving a polygon: entropic OT (Sinkhorn, uniform marginals) between the two point sets
  (poly vertices; a bbox is its 4 corners (x1,y1),(x2,y1),(x2,y2),(x1,y2)) with an L2 or L1 cost in
  bins. The plan T is a constant (no gradient flows anywhere here). Targets come from the barycentric
  projection ONLY, ``g_hat_i = sum_j (T_ij / sum_j T_ij) g_j``:
  - poly prediction: one target per coord token, (x_i, y_i) of ``g_hat_i`` for each vertex in order;
  - bbox prediction vs poly GT: the box (min x, min y, max x, max y) of the 4 projected corners.
  Targets are rounded half-up, clamped to 0..999; a target box keeps x2 > x1, y2 > y1.

Sinkhorn runs in the log domain whenever exp(-C / epsilon) could underflow, so a tiny ``epsilon``
relative to the costs stays finite; otherwise the identical iterates run in the faster scaling form.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from src.data.coords import MAX_BIN, fix_box_bins
from src.data.objects import DetObject, flat_vertices

OT_COSTS: tuple[str, ...] = ("l2", "l1")
LINEAR_SAFE = 200.0  # max C / epsilon for the scaling-form iterations (exp(-200) ~ 1e-87: no underflow)


def sinkhorn(cost: np.ndarray, epsilon: float, iters: int) -> np.ndarray:
    """Entropic OT plan ``[n, m]`` for ``cost [n, m]`` with uniform marginals (1/n rows, 1/m columns).

    ``iters`` alternating updates of the dual potentials (log domain, or the identical scaling form
    when exp(-C / epsilon) cannot underflow); after the last update the column marginals are exact
    and the row marginals approximate. The plan is a constant for the loss (numpy, no gradient).
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise ValueError(f"cost must be a non-empty [n, m] matrix, got shape {cost.shape}")
    _check_sinkhorn_args(epsilon, iters)
    n, m = cost.shape
    log_k = -cost[None] / epsilon  # [1, n, m]
    log_a, log_b = np.full((1, n), -np.log(n)), np.full((1, m), -np.log(m))
    f, g = _sinkhorn_potentials(log_k, log_a, log_b, iters)  # [1, n], [1, m]
    return np.exp(log_k + f[:, :, None] + g[:, None, :])[0]


def barycentric_projection(
    source: np.ndarray, target: np.ndarray, *, cost: str = "l2", epsilon: float = 10.0, iters: int = 30
) -> np.ndarray:
    """Project the points ``source [n, 2]`` onto ``target [m, 2]`` -> ``[n, 2]`` float64 bins.

    ``out_i = sum_j (T_ij / sum_j T_ij) target_j`` with ``T = sinkhorn(C, epsilon, iters)`` and
    ``C_ij = ||source_i - target_j||_2`` (``"l2"``) or ``||.||_1`` (``"l1"``).
    """
    proj, _ = _project_batch([source], [target], cost, epsilon, iters)  # [1, n, 2]
    return proj[0]


def prefix_targets(
    pred: DetObject,
    gt: DetObject,
    *,
    ot_cost: str = "l2",
    ot_epsilon: float = 10.0,
    ot_iters: int = 30,
) -> tuple[int, ...]:
    """Target bins for the coord tokens of a matched prediction: ``len(out) == len(pred.bins)``."""
    return prefix_targets_batch([(pred, gt)], ot_cost=ot_cost, ot_epsilon=ot_epsilon, ot_iters=ot_iters)[0]


def prefix_targets_batch(
    pairs: Sequence[tuple[DetObject, DetObject]],
    *,
    ot_cost: str = "l2",
    ot_epsilon: float = 10.0,
    ot_iters: int = 30,
) -> list[tuple[int, ...]]:
    """:func:`prefix_targets` for many matched ``(pred, gt)`` pairs, with ONE batched Sinkhorn."""
    _check_ot_args(ot_cost, ot_epsilon, ot_iters)
    out: list[tuple[int, ...]] = [tuple(gt.bins) for _, gt in pairs]  # bbox <-> bbox: GT slot by slot
    ot_idx = [i for i, (p, g) in enumerate(pairs) if not (p.geometry == "bbox_2d" and g.geometry == "bbox_2d")]
    if not ot_idx:
        return out
    proj, n_b = _project_padded(
        _pad_objects([pairs[i][0] for i in ot_idx]), _pad_objects([pairs[i][1] for i in ot_idx]), ot_cost, ot_epsilon, ot_iters
    )  # [B, n, 2], [B]
    vertex_bins = _round_bins(proj)  # [B, n, 2] one target per poly coord token
    box_bins = _round_bins(np.concatenate([proj[:, :4].min(axis=1), proj[:, :4].max(axis=1)], axis=1))  # [B, 4]
    for b, i in enumerate(ot_idx):
        if pairs[i][0].geometry == "bbox_2d":  # the box of the 4 projected corners
            out[i] = fix_box_bins(box_bins[b].tolist())
        else:  # x_i, y_i of each projected vertex, in order
            out[i] = tuple(vertex_bins[b, : n_b[b]].ravel().tolist())
    return out


def _project_batch(
    sources: Sequence[Sequence], targets: Sequence[Sequence], cost: str, epsilon: float, iters: int
) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric projection of B point sets ``sources[b] [n_b, 2]`` onto ``targets[b] [m_b, 2]``.

    Returns ``proj [B, max n_b, 2]`` (rows past n_b are padding, meaningless) and ``n_b [B]``. All B
    problems run as one padded batch: padding has zero marginal mass, so it never receives or sends
    transport.
    """
    _check_ot_args(cost, epsilon, iters)
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} source sets but {len(targets)} target sets")
    if not sources:
        return np.zeros((0, 0, 2)), np.zeros(0, dtype=np.int64)
    return _project_padded(_pad(sources), _pad(targets), cost, epsilon, iters)


def _project_padded(
    sources: tuple[np.ndarray, np.ndarray, np.ndarray], targets: tuple[np.ndarray, np.ndarray, np.ndarray],
    cost: str, epsilon: float, iters: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_project_batch` on point sets already padded by :func:`_pad` / :func:`_pad_objects`."""
    src, row_ok, n_b = sources  # [B, n, 2], [B, n], [B]
    tgt, col_ok, m_b = targets  # [B, m, 2], [B, m], [B]
    diff = src[:, :, None, :] - tgt[:, None, :, :]  # [B, n, m, 2]
    c = np.sqrt((diff**2).sum(-1)) if cost == "l2" else np.abs(diff).sum(-1)  # [B, n, m]
    # padded entries get log-kernel 0; their -inf marginal (hence potential) keeps them out
    log_k = np.where(row_ok[:, :, None] & col_ok[:, None, :], -c / epsilon, 0.0)  # [B, n, m]
    log_a = np.where(row_ok, -np.log(n_b)[:, None], -np.inf)  # [B, n]
    log_b = np.where(col_ok, -np.log(m_b)[:, None], -np.inf)  # [B, m]
    _, g = _sinkhorn_potentials(log_k, log_a, log_b, iters)  # [B, m]
    # T_ij / sum_j T_ij = softmax_j(log_k_ij + g_j): the row potential f_i cancels
    logits = log_k + g[:, None, :]  # [B, n, m]
    w = np.exp(logits - logits.max(axis=2, keepdims=True))  # [B, n, m]
    w /= w.sum(axis=2, keepdims=True)
    return w @ tgt, n_b  # [B, n, 2], [B]


def _round_bins(values: np.ndarray) -> np.ndarray:
    """Round half-up and clamp to 0..999 (int64, same shape)."""
    return np.clip(np.floor(values + 0.5), 0, MAX_BIN).astype(np.int64)


def _pad(point_sets: Sequence[Sequence]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack point sets ``[k_b, 2]`` into ``[B, K, 2]`` (zeros past k_b); also a mask ``[B, K]`` and ``k_b [B]``."""
    coords = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in point_sets]
    return _pad_flat(np.concatenate(coords), [len(c) for c in coords])


def _pad_objects(objs: Sequence[DetObject]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_pad` of the objects' vertices (``DetObject.points``), built from one flat list."""
    flat, sizes = flat_vertices(objs)
    return _pad_flat(np.array(flat, dtype=np.float64).reshape(-1, 2), sizes)


def _pad_flat(coords: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_pad` of point sets given stacked: ``coords [V, 2]``, set b holding ``sizes[b]`` rows in order."""
    k_b = np.array(sizes, dtype=np.int64)  # [B]
    if k_b.min() == 0:
        raise ValueError("every point set needs at least one point")
    ok = np.arange(int(k_b.max()))[None, :] < k_b[:, None]  # [B, K]
    out = np.zeros(ok.shape + (2,))
    out[ok] = coords  # row-major: set by set, in order
    return out, ok, k_b


def _sinkhorn_potentials(log_k: np.ndarray, log_a: np.ndarray, log_b: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Sinkhorn on ``log_k [B, n, m]`` (= -C / epsilon) with log marginals ``log_a [B, n]``, ``log_b [B, m]``.

    Returns potentials ``f [B, n]``, ``g [B, m]`` with ``log T = log_k + f_i + g_j`` (-inf on padding,
    whose marginal is -inf). When every kernel entry is >= exp(-LINEAR_SAFE) the same iterates run in
    the scaling form u = exp(f), v = exp(g) (no under/overflow possible there, and ~10x faster in
    numpy); otherwise in the log domain, which is stable for any epsilon.
    """
    if -log_k.min() <= LINEAR_SAFE:
        return _sinkhorn_scaling(log_k, log_a, log_b, iters)
    return _sinkhorn_log(log_k, log_a, log_b, iters)


def _sinkhorn_log(log_k: np.ndarray, log_a: np.ndarray, log_b: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-domain iterations. Padding has log-kernel 0 and a -inf marginal: every real row/column then
    has a finite log-kernel, so each log-sum-exp has a finite maximum and never gives NaN."""
    f = np.zeros(log_a.shape)
    g = np.where(np.isfinite(log_b), 0.0, -np.inf)  # padded columns carry no mass from the start
    for _ in range(iters):
        f = log_a - _logsumexp(log_k + g[:, None, :], axis=2)  # [B, n]
        g = log_b - _logsumexp(log_k + f[:, :, None], axis=1)  # [B, m]
    return f, g


def _sinkhorn_scaling(log_k: np.ndarray, log_a: np.ndarray, log_b: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """The iterates of :func:`_sinkhorn_log` as u = exp(f), v = exp(g) (needs exp(log_k) not to underflow)."""
    kernel = np.exp(log_k)  # [B, n, m]
    a, b = np.exp(log_a), np.exp(log_b)  # [B, n], [B, m]
    u = np.ones(a.shape)
    v = (b > 0).astype(np.float64)
    for _ in range(iters):  # batched matmul: ~2x faster than the equivalent einsum at these sizes
        u = a / (kernel @ v[:, :, None])[:, :, 0]  # [B, n]
        v = b / (u[:, None, :] @ kernel)[:, 0, :]  # [B, m]
    with np.errstate(divide="ignore"):  # padding: log(0) = -inf, as in the log domain
        return np.log(u), np.log(v)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    mx = x.max(axis=axis, keepdims=True)
    return np.log(np.exp(x - mx).sum(axis=axis)) + np.squeeze(mx, axis=axis)


def _check_ot_args(cost: str, epsilon: float, iters: int) -> None:
    if cost not in OT_COSTS:
        raise ValueError(f"ot_cost must be one of {OT_COSTS}, got {cost!r}")
    _check_sinkhorn_args(epsilon, iters)


def _check_sinkhorn_args(epsilon: float, iters: int) -> None:
    if not (np.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"ot_epsilon must be a finite number > 0, got {epsilon!r}")
    if not isinstance(iters, (int, np.integer)) or iters < 1:
        raise ValueError(f"ot_iters must be an int >= 1, got {iters!r}")
