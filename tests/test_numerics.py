"""Numerical safety of the losses (reliability issue, item 3).

Decision (docs/reliability.md): NaN / +-inf logits at supervised positions are NOT sanitised — they
mean the weights or activations are already broken and any gradient would be NaN — the step fails with
:class:`NonFiniteLogitsError` naming the optimizer step and the samples (stage 2: their JSONL file:line).
Extreme but FINITE logits (bf16 goes up to ~3.4e38) are saturated to +-1e37 before the fp32 arithmetic,
so losses and gradients stay finite. A micro-batch with nothing supervised gives an exact, finite 0 with
an all-zero gradient.
"""

from __future__ import annotations

import pytest
import torch

from src.losses.supervised import LOGIT_LIMIT, NonFiniteLogitsError, SEGMENT_PREFIX, SEGMENT_TAIL, teacher_forced_losses

V = 1200
COORD_IDS = torch.arange(100, 1100)


def inputs(n_ce=3, n_coord=3, samples=2):
    """Rows: first n_ce CE positions, then n_coord coord positions; samples assigned round-robin."""
    n = n_ce + n_coord
    ce = torch.full((n,), -100)
    ce[:n_ce] = torch.arange(n_ce) + 5
    bins = torch.full((n,), -1)
    bins[n_ce:] = torch.tensor([0, 500, 999] * n_coord)[:n_coord]
    seg = torch.full((n,), SEGMENT_TAIL)
    seg[n_ce::2] = SEGMENT_PREFIX
    sidx = torch.arange(n) % samples
    return ce, bins, seg, sidx


def losses(logits, ce, bins, seg, sidx, samples=2, **kw):
    return teacher_forced_losses(logits, ce, bins, seg, sidx, samples, COORD_IDS, **kw)


# -------------------------------------------------------------------------------- non-finite logits


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["coord", "ce"])
def test_non_finite_logits_fail_naming_the_sample(bad, where):
    ce, bins, seg, sidx = inputs()
    logits = torch.randn(len(ce), V)
    row = 4 if where == "coord" else 1  # row 4 is a coord row of sample 0; row 1 a CE row of sample 1
    logits[row, 150] = bad
    with pytest.raises(NonFiniteLogitsError) as ei:
        losses(logits, ce, bins, seg, sidx)
    assert ei.value.samples == [int(sidx[row])]
    msg = str(ei.value)
    assert f"sample(s) [{int(sidx[row])}]" in msg and ("1 coord" if where == "coord" else "1 CE") in msg
    assert ("nan" if bad != bad else "inf") in msg


def test_trainer_names_step_and_source_on_nan(tiny_model_dirs, tmp_path):
    from tests.test_trainers import make_cfg, make_trainer, records, stage2_inputs
    from src.data.make_shapes import make_shapes

    shapes = tmp_path / "shapes"
    make_shapes(shapes, num_train=2, num_val=1, seed=0, image_size=64, min_shapes=1, max_shapes=2, kinds=("rectangle",))
    tr = make_trainer(make_cfg(tiny_model_dirs["qwen3_vl"], shapes, tmp_path))
    model = tr.model

    def poison(module, args, out):
        out.logits = out.logits.clone()
        out.logits[-1, 0] = float("nan")  # the last supervised position (EOS of the last sample)
        return out

    h = model.register_forward_hook(poison)
    try:
        model.train()
        with pytest.raises(NonFiniteLogitsError) as ei:
            tr.compute_loss(model, stage2_inputs(tr, records(shapes, 2)))
    finally:
        h.remove()
    msg = str(ei.value)
    assert "optimizer step 1" in msg and "sample 1 (" in msg and "train.jsonl:2" in msg and "lower the learning rate" in msg


# ------------------------------------------------------------------------------ nothing supervised


def test_nothing_supervised_gives_exact_zero_and_zero_gradient():
    logits = torch.randn(0, V, requires_grad=True)  # the selective forward kept no row
    e = torch.zeros(0, dtype=torch.long)
    out = losses(logits, e, e, e, e, samples=3)
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    out.loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))
    assert all(torch.isfinite(v) for v in out.sums.values())


def test_unsupervised_rows_give_zero_gradient_and_finite_loss():
    logits = torch.randn(4, V, requires_grad=True)
    none = torch.full((4,), -100)
    out = losses(logits, none, torch.full((4,), -1), torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_a_sample_with_nothing_supervised_does_not_touch_the_others():
    ce, bins, seg, sidx = inputs(samples=2)
    logits = torch.randn(len(ce), V, requires_grad=True)
    a = losses(logits, ce, bins, seg, sidx, samples=2).loss
    # the same rows, but the micro-batch holds a third sample without any supervised position
    b = losses(logits, ce, bins, seg, sidx, samples=3).loss
    assert torch.allclose(b, a * 2 / 3)  # per-sample mean: the empty sample adds exactly 0
    (g,) = torch.autograd.grad(b, logits)
    assert torch.isfinite(g).all()


# ------------------------------------------------------------------------------- extreme magnitudes


@pytest.mark.parametrize("scale", [1e4, 1e30, 3e38])
@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_extreme_bf16_logits_keep_losses_and_gradients_finite(scale, temperature):
    torch.manual_seed(0)
    ce, bins, seg, sidx = inputs(n_ce=4, n_coord=6)
    raw = torch.randn(len(ce), V).sign() * scale
    logits = raw.clamp(-3.38e38, 3.38e38).to(torch.bfloat16).requires_grad_(True)  # bf16 range
    assert torch.isfinite(logits).all()
    out = losses(logits, ce, bins, seg, sidx, temperature=temperature)
    assert torch.isfinite(out.loss), out.loss
    assert all(torch.isfinite(v) for v in out.sums.values()), out.sums
    out.loss.backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_large_bf16_logits_give_the_exact_loss_unsaturated():
    """1e4-scale bf16 logits are far below the saturation limit: the loss equals the fp64 reference."""
    torch.manual_seed(1)
    ce, bins, seg, sidx = inputs(n_ce=3, n_coord=0, samples=1)
    logits = (torch.randn(len(ce), V) * 1e4).to(torch.bfloat16)
    out = losses(logits, ce, bins, seg, sidx, samples=1)
    ref = (torch.logsumexp(logits.double(), -1) - logits.double().gather(1, ce[:, None]).squeeze(1)).mean()
    assert float(logits.float().abs().max()) < LOGIT_LIMIT
    assert torch.allclose(out.loss.double(), ref, rtol=1e-5)


def test_saturation_keeps_normal_logits_bit_identical():
    ce, bins, seg, sidx = inputs()
    logits = torch.randn(len(ce), V)
    a = losses(logits, ce, bins, seg, sidx).loss
    big = logits.clone()
    big[0, 1000] = 3e38  # one extreme value in another row changes nothing in the rows without it
    b = losses(big, ce, bins, seg, sidx)
    assert torch.isfinite(b.loss)
    # rows 1.. are untouched by the clamp: compare their per-row CE contribution via a batch without row 0
    keep = torch.arange(1, len(ce))
    a1 = losses(logits[keep], ce[keep], bins[keep], seg[keep], sidx[keep]).loss
    b1 = losses(big[keep], ce[keep], bins[keep], seg[keep], sidx[keep]).loss
    assert torch.equal(a1, b1) and torch.isfinite(a)
