"""Coord-token loss (SPEC §10): softCE + W1 + gate at every supervised coord position.

With ``z`` = the logits restricted to the 1000 coord ids (bin order), ``T`` the temperature and ``q`` a
Gaussian over bins centred on the target bin (std ``target_sigma`` bins, optional truncation, normalised):

    p       = softmax(z / T)                                        [N, 1000]
    softCE  = -sum_i q_i log p_i
    W1      = sum_i |CDF_p(i) - CDF_q(i)| / 1000                     (a Dirac shift of d bins costs d/1000)
    gate    = logsumexp(full-vocab logits) - logsumexp(z)  >= 0      (-log of the coord ids' mass)

``coord_loss_terms`` returns the three unweighted per-position terms; ``weighted_coord_loss`` is the one
place where the ``custom.coord_soft_ce_w1`` weights are applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_BINS = 1000


@dataclass(frozen=True)
class CoordTerms:
    """Per-position unweighted terms, each ``[N]`` float32."""

    soft_ce: torch.Tensor
    w1: torch.Tensor
    gate: torch.Tensor


def gaussian_targets(target_bins: torch.Tensor, sigma: float, truncate: int | None = None, num_bins: int = NUM_BINS) -> torch.Tensor:
    """``[N]`` int bins -> ``[N, num_bins]`` float32 rows summing to 1, peaked at the target bin."""
    bins = torch.arange(num_bins, device=target_bins.device, dtype=torch.float32)
    d = bins[None, :] - target_bins.to(torch.float32)[:, None]  # [N, K]
    logq = -0.5 * (d / sigma) ** 2
    if truncate is not None:
        logq = logq.masked_fill(d.abs() > truncate, float("-inf"))
    return torch.softmax(logq, dim=-1)


def coord_loss_terms(
    coord_logits: torch.Tensor,
    full_logsumexp: torch.Tensor,
    target_bins: torch.Tensor,
    *,
    sigma: float = 2.0,
    truncate: int | None = None,
    temperature: float = 1.0,
) -> CoordTerms:
    """Unweighted coord-loss terms.

    Args:
        coord_logits: ``[N, 1000]`` logits at the coord ids, bin order (any float dtype; computed in fp32).
        full_logsumexp: ``[N]`` logsumexp of the FULL-vocab logits at the same positions (for the gate).
        target_bins: ``[N]`` int target bins 0..999.
    """
    z = coord_logits.float()
    q = gaussian_targets(target_bins, sigma, truncate, z.shape[-1])
    # z / T is saturated like the full-vocab logits (src.losses.supervised.LOGIT_LIMIT): a small T must not
    # turn extreme-but-finite bf16 logits into inf (-> NaN in log_softmax).
    logp = torch.log_softmax((z / temperature).clamp(-1e37, 1e37), dim=-1)
    soft_ce = -torch.where(q > 0, q * logp, torch.zeros_like(logp)).sum(-1)  # 0*log0 := 0
    cdf_p = torch.cumsum(logp.exp(), dim=-1)
    cdf_q = torch.cumsum(q, dim=-1)
    w1 = (cdf_p - cdf_q).abs().sum(-1) / z.shape[-1]
    gate = (full_logsumexp.float() - torch.logsumexp(z, dim=-1)).clamp_min(0.0)
    return CoordTerms(soft_ce=soft_ce, w1=w1, gate=gate)


def weighted_coord_loss(terms: CoordTerms, soft_ce_weight: float = 1.0, w1_weight: float = 1.0, gate_weight: float = 1.0) -> torch.Tensor:
    """``[N]`` per-position coord loss: the one place where the term weights are applied."""
    return soft_ce_weight * terms.soft_ce + w1_weight * terms.w1 + gate_weight * terms.gate


def coord_diagnostics(coord_logits: torch.Tensor, full_logsumexp: torch.Tensor, target_bins: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached per-position diagnostics: coord-vocab mass, top-1 bin accuracy, |expected bin - target|."""
    with torch.no_grad():
        z = coord_logits.float()
        mass = torch.exp(torch.logsumexp(z, -1) - full_logsumexp.float())
        top1 = (z.argmax(-1) == target_bins).float()
        p = torch.softmax(z, -1)
        expected = (p * torch.arange(z.shape[-1], device=z.device, dtype=torch.float32)).sum(-1)
        abs_err = (expected - target_bins.float()).abs()
    return {"coord_mass": mass, "coord_top1": top1, "coord_abs_err": abs_err}
