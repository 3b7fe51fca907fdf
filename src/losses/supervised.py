"""Losses of one teacher-forced forward, shared by stage 1 and stage 2 (SPEC §10).

Inputs are the logits at the supervised positions only (``[N, V]``, flattened over the batch) and, for
each of those positions, what supervises it: a CE target token (or -100), a coord target bin (or -1),
the coord segment (0 = rollout prefix, 1 = tail / stage-1 GT) and the sample it belongs to.

Normalisation (two schemes; ``rollout_matching.loss_normalization``, tested):
    sample (default, both stages):
        loss_s = ce_weight * mean_CE(sample s) + coord_weight * mean_coord(sample s)
                 (a mean over zero positions is 0: a sample with nothing supervised adds exactly 0)
        loss   = sum_s loss_s / num_samples(micro-batch)
    token (``token_denominator`` given):
        loss   = (ce_weight * sum CE + coord_weight * sum coord) over the micro-batch's positions
                 / token_denominator
        where the trainer passes token_denominator = (supervised positions of the whole optimizer step,
        all micro-batches and ranks) / (accumulation steps * world size).
The Trainer divides by gradient_accumulation_steps (``loss_is_scaled_for_ga = False``) and DDP averages
gradients over ranks, so an optimizer step minimises the mean over ALL its samples of loss_s (sample), or
the mean over ALL its supervised positions (token); gradient accumulation 2x1 therefore equals a batch of
2 under both.

Reported figures are token-weighted sums (``*_sum`` / ``*_count``) so that ``loss/ce`` is the mean over
all CE tokens of the logging window and ``loss/coord`` the mean over all coord positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from src.losses.coord import coord_diagnostics, coord_loss_terms, weighted_coord_loss

SEGMENT_PREFIX = 0
SEGMENT_TAIL = 1

# Finite logits are saturated to +-LOGIT_LIMIT before the fp32 loss arithmetic: bf16 holds values up to
# ~3.4e38, and a difference of two such values (CE = lse - target logit) would overflow fp32 to inf.
# Normal logits (|z| << 1e37) are untouched; the clamp is applied only when a batch needs it.
LOGIT_LIMIT = 1e37


class NonFiniteLogitsError(FloatingPointError):
    """NaN / +-inf logits at supervised positions. Raised (never sanitised): such values mean the weights or
    activations are already broken, and a gradient computed from them would be NaN. ``samples`` holds the
    micro-batch indices of the affected samples; the trainer re-raises with the step and sample sources."""

    def __init__(self, message: str, samples: list[int]):
        super().__init__(message)
        self.samples = samples


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor              # scalar, differentiable, normalised as documented above
    sums: dict[str, torch.Tensor]   # detached float sums for logging (names -> scalar)


def _segment_mean(values: torch.Tensor, sample_idx: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Per-sample mean of ``values`` ``[n]`` grouped by ``sample_idx``; 0 for samples without values.

    Stays connected to the graph when ``values`` is empty (all-zero gradient, never NaN)."""
    sums = values.new_zeros(num_samples).index_add(0, sample_idx, values)
    counts = torch.bincount(sample_idx, minlength=num_samples).to(values.dtype)
    return sums / counts.clamp_min(1.0)


def _checked_logits(logits: torch.Tensor, sample_idx: torch.Tensor, ce_mask: torch.Tensor, coord_mask: torch.Tensor) -> torch.Tensor:
    """Raise :class:`NonFiniteLogitsError` on NaN/inf; saturate finite extremes to +-LOGIT_LIMIT.

    One reduction pass over the logits in the common case (nothing to do)."""
    if not logits.numel():
        return logits
    lo, hi = torch.aminmax(logits.detach())  # no [N, V] temporary (abs() would allocate one)
    peak = torch.maximum(-lo, hi)
    if bool(torch.isfinite(peak)) and float(peak) <= LOGIT_LIMIT:
        return logits
    bad_rows = ~torch.isfinite(logits.detach()).all(dim=-1)
    if bool(bad_rows.any()):
        samples = sorted({int(i) for i in sample_idx[bad_rows].tolist()})
        n_coord = int((bad_rows & coord_mask).sum())
        n_ce = int((bad_rows & ce_mask).sum())
        kinds = sorted({"nan" if bool(torch.isnan(logits[bad_rows]).any()) else "", "inf" if bool(torch.isinf(logits[bad_rows]).any()) else ""} - {""})
        raise NonFiniteLogitsError(
            f"non-finite logits ({'/'.join(kinds)}) at {int(bad_rows.sum())} supervised position(s) ({n_coord} coord, {n_ce} CE) "
            f"of micro-batch sample(s) {samples}", samples)
    return logits.float().clamp(-LOGIT_LIMIT, LOGIT_LIMIT)


ROW_CHUNK = 256  # rows of [N, V] processed at once inside VocabTerms (bounds the fp32 temporaries)


class VocabTerms(torch.autograd.Function):
    """The full-vocabulary part of the loss, memory-lean.

    forward(logits [N, V], ce_rows [n_ce], ce_targets [n_ce], coord_rows [n_coord], coord_ids [1000])
        -> lse [N] (fp32 logsumexp over the full vocabulary), target_logit [n_ce], z [n_coord, 1000]
    Plain autograd would keep a temporary per term and sum three [N, V] gradients; here the backward turns
    the saved logits buffer itself into the gradient (softmax * g_lse, then + g_target at the CE targets and
    + g_z on the coord slice), so the whole loss adds about one [N, V] buffer to the logits. When the logits
    are an intermediate (the model's output) they are therefore overwritten by backward, which can then run
    only once; a leaf tensor gets a fresh gradient buffer. Gradients equal plain autograd's (tested)."""

    @staticmethod
    def forward(ctx, logits, ce_rows, ce_targets, coord_rows, coord_ids):
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for a in range(0, logits.shape[0], ROW_CHUNK):
            lse[a : a + ROW_CHUNK] = torch.logsumexp(logits[a : a + ROW_CHUNK].float(), dim=-1)
        target_logit = logits[ce_rows, ce_targets].float()
        z = logits[coord_rows[:, None], coord_ids[None, :]]
        ctx.save_for_backward(logits, lse, ce_rows, ce_targets, coord_rows, coord_ids)
        ctx.reuse_logits = not logits.is_leaf  # an intermediate (model output): its buffer can hold the gradient
        return lse, target_logit, z

    @staticmethod
    def backward(ctx, g_lse, g_target, g_z):
        logits, lse, ce_rows, ce_targets, coord_rows, coord_ids = ctx.saved_tensors
        if getattr(ctx, "logits_consumed", False):
            raise RuntimeError("VocabTerms.backward reuses the logits buffer for the gradient: backward can run only once (no retain_graph)")
        # The logits are not needed after this point (the lm_head backward needs its input, not its
        # output), so an intermediate logits buffer becomes the gradient: no second [N, V] allocation.
        # A leaf tensor (a caller's own) is never overwritten.
        ctx.logits_consumed = ctx.reuse_logits
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
        for a in range(0, logits.shape[0], ROW_CHUNK):
            b = slice(a, a + ROW_CHUNK)
            grad[b] = (logits[b].float() - lse[b, None]).exp_().mul_(g_lse[b, None])
        if g_target is not None and ce_rows.numel():
            grad.index_put_((ce_rows, ce_targets), g_target.to(grad.dtype), accumulate=True)
        if g_z is not None and coord_rows.numel():
            grad.index_put_((coord_rows[:, None], coord_ids[None, :]), g_z.to(grad.dtype), accumulate=True)
        return grad, None, None, None, None


def teacher_forced_losses(
    logits: torch.Tensor,
    ce_targets: torch.Tensor,
    coord_bins: torch.Tensor,
    coord_segment: torch.Tensor,
    sample_idx: torch.Tensor,
    num_samples: int,
    coord_ids: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    coord_weight: float = 1.0,
    soft_ce_weight: float = 1.0,
    w1_weight: float = 1.0,
    gate_weight: float = 1.0,
    target_sigma: float = 2.0,
    target_truncate: int | None = None,
    temperature: float = 1.0,
    token_denominator: float | None = None,
) -> LossOutput:
    """Masked CE + coord loss.

    Args:
        logits: ``[N, V]`` logits at the supervised positions (any float dtype).
        ce_targets: ``[N]`` long, target token id or -100 (not CE-supervised).
        coord_bins: ``[N]`` long, target bin 0..999 or -1 (not a coord position). A position is never both.
        coord_segment: ``[N]`` long, SEGMENT_PREFIX or SEGMENT_TAIL (only read at coord positions).
        sample_idx: ``[N]`` long, index 0..num_samples-1 of the sample each position belongs to.
        coord_ids: ``[1000]`` long, vocabulary ids of ``<|coord_0..999|>``.
        token_denominator: None = per-sample normalisation; else the token normalisation's divisor
            (see the module docstring).
    """
    if logits.shape[0] != ce_targets.shape[0]:
        raise ValueError(f"logits rows {logits.shape[0]} != supervised positions {ce_targets.shape[0]}")
    ce_mask = ce_targets >= 0
    coord_mask = coord_bins >= 0
    if bool((ce_mask & coord_mask).any()):
        raise ValueError("a position is supervised both by CE and by the coord loss")

    logits = _checked_logits(logits, sample_idx, ce_mask, coord_mask)
    # The only [N, V] work: full-vocab logsumexp, the CE target logits and the [n_coord, 1000] coord slice,
    # in one autograd node that keeps the logits and writes ONE gradient buffer (see VocabTerms).
    ce_rows = ce_mask.nonzero(as_tuple=True)[0]
    coord_rows = coord_mask.nonzero(as_tuple=True)[0]
    lse, target_logit, z = VocabTerms.apply(logits, ce_rows, ce_targets.index_select(0, ce_rows), coord_rows, coord_ids)
    ce_tok = lse.index_select(0, ce_rows) - target_logit  # [n_ce]
    ce_per_sample = _segment_mean(ce_tok, sample_idx.index_select(0, ce_rows), num_samples)

    full_lse = lse.index_select(0, coord_rows)  # [n_coord]
    bins = coord_bins.index_select(0, coord_rows)
    terms = coord_loss_terms(z, full_lse, bins, sigma=target_sigma, truncate=target_truncate, temperature=temperature)
    coord_tok = weighted_coord_loss(terms, soft_ce_weight, w1_weight, gate_weight)  # [n_coord]
    coord_per_sample = _segment_mean(coord_tok, sample_idx.index_select(0, coord_rows), num_samples)

    if token_denominator is None:
        loss = (ce_weight * ce_per_sample + coord_weight * coord_per_sample).sum() / max(num_samples, 1)
    else:
        if token_denominator <= 0:
            raise ValueError(f"token_denominator must be > 0, got {token_denominator}")
        loss = (ce_weight * ce_tok.sum() + coord_weight * coord_tok.sum()) / token_denominator
    if not ce_tok.numel() and not coord_tok.numel():
        loss = loss + logits.sum() * 0.0  # keep the graph connected (DDP) with an exact zero

    seg = coord_segment.index_select(0, coord_rows)
    diag = coord_diagnostics(z, full_lse, bins)
    with torch.no_grad():
        f = lambda t: t.detach().float().sum()  # noqa: E731
        sums = {
            "ce_sum": f(ce_tok), "ce_count": torch.tensor(float(ce_tok.numel()), device=logits.device),
            "coord_sum": f(coord_tok), "coord_count": torch.tensor(float(coord_tok.numel()), device=logits.device),
            "coord_prefix_sum": f(coord_tok[seg == SEGMENT_PREFIX]), "coord_prefix_count": (seg == SEGMENT_PREFIX).float().sum(),
            "coord_tail_sum": f(coord_tok[seg == SEGMENT_TAIL]), "coord_tail_count": (seg == SEGMENT_TAIL).float().sum(),
            "coord_soft_ce_sum": f(terms.soft_ce), "coord_w1_sum": f(terms.w1), "coord_gate_sum": f(terms.gate),
            "coord_mass_sum": f(diag["coord_mass"]), "coord_top1_sum": f(diag["coord_top1"]),
            "coord_abs_err_sum": f(diag["coord_abs_err"]),
        }
    return LossOutput(loss=loss, sums=sums)
