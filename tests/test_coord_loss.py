"""Coord loss values for known cases and the loss normalisation (SPEC §10)."""

from __future__ import annotations

import math

import pytest
import torch

from src.losses.coord import coord_loss_terms, gaussian_targets, weighted_coord_loss
from src.losses.supervised import teacher_forced_losses


def dirac_logits(bins, n=1000):
    z = torch.full((len(bins), n), -1e4)
    for i, b in enumerate(bins):
        z[i, b] = 1e4
    return z


def test_gaussian_target_normalised_and_peaked():
    q = gaussian_targets(torch.tensor([0, 500, 999]), sigma=2.0)
    assert torch.allclose(q.sum(-1), torch.ones(3))
    assert q.argmax(-1).tolist() == [0, 500, 999]
    assert q[1, 498] == pytest.approx(q[1, 502]) and q[1, 500] > q[1, 499] > q[1, 498]
    assert q[1, 502] / q[1, 500] == pytest.approx(math.exp(-0.5 * (2 / 2) ** 2), rel=1e-5)
    qt = gaussian_targets(torch.tensor([500]), sigma=2.0, truncate=3)
    assert (qt[0, :497] == 0).all() and (qt[0, 504:] == 0).all() and qt.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("d", [0, 1, 7, 250])
def test_w1_of_a_dirac_shift_is_d_over_1000(d):
    z = dirac_logits([500 + d])
    t = coord_loss_terms(z, torch.logsumexp(z, -1), torch.tensor([500]), sigma=1e-4)
    assert t.w1.item() == pytest.approx(d / 1000, abs=1e-6)


def test_gate_zero_when_all_mass_on_coord_ids_and_positive_otherwise():
    z = torch.randn(4, 1000)
    full = torch.cat([torch.full((4, 5000), -1e9), z], -1)
    t = coord_loss_terms(z, torch.logsumexp(full, -1), torch.tensor([1, 2, 3, 4]))
    assert torch.allclose(t.gate, torch.zeros(4), atol=1e-6)
    full2 = torch.cat([torch.zeros(4, 1000), z], -1)  # half the vocabulary competes
    t2 = coord_loss_terms(z, torch.logsumexp(full2, -1), torch.tensor([1, 2, 3, 4]))
    assert (t2.gate > 0).all()


def test_soft_ce_minimised_at_target_distribution():
    target = torch.tensor([300])
    q = gaussian_targets(target, 2.0)
    at_q = coord_loss_terms(q.log(), torch.logsumexp(q.log(), -1), target).soft_ce
    off = coord_loss_terms(dirac_logits([310]) / 1e3, torch.zeros(1), target).soft_ce
    assert at_q.item() < off.item()
    entropy = -(q[q > 0] * q[q > 0].log()).sum().item()
    assert at_q.item() == pytest.approx(entropy, rel=1e-5)


def test_weights_applied_in_one_place():
    z = torch.randn(3, 1000)
    t = coord_loss_terms(z, torch.logsumexp(z, -1) + 0.5, torch.tensor([1, 500, 998]))
    w = weighted_coord_loss(t, 2.0, 3.0, 4.0)
    assert torch.allclose(w, 2 * t.soft_ce + 3 * t.w1 + 4 * t.gate)


def _losses(logits, ce, cb, sample_idx, n):
    coord_ids = torch.arange(200, 1200)
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return teacher_forced_losses(logits, long(ce), long(cb), torch.ones(len(ce), dtype=torch.long), long(sample_idx), n, coord_ids)


def test_per_sample_normalisation_and_accumulation_equivalence():
    torch.manual_seed(0)
    logits = torch.randn(7, 1200)
    ce = [5, 6, -100, 7, -100, 9, -100]
    cb = [-1, -1, 10, -1, 20, -1, 30]
    idx = [0, 0, 0, 1, 1, 1, 1]
    batch = _losses(logits, ce, cb, idx, 2).loss
    a = _losses(logits[:3], ce[:3], cb[:3], [0, 0, 0], 1).loss
    b = _losses(logits[3:], ce[3:], cb[3:], [0, 0, 0, 0], 1).loss
    assert batch.item() == pytest.approx(((a + b) / 2).item(), rel=1e-6)  # GA 2x1 == batch 2


def test_nothing_supervised_gives_finite_zero_and_zero_grad():
    logits = torch.randn(0, 1200, requires_grad=True)
    out = _losses(logits, [], [], [], 3)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
    # a sample with nothing supervised next to one that has supervision contributes exactly 0
    logits2 = torch.randn(2, 1200, requires_grad=True)
    one = _losses(logits2, [5, -100], [-1, 10], [0, 0], 2)
    assert torch.isfinite(one.loss)
    single = _losses(logits2, [5, -100], [-1, 10], [0, 0], 1)
    assert one.loss.item() == pytest.approx(single.loss.item() / 2)


def test_position_supervised_twice_is_rejected():
    with pytest.raises(ValueError, match="both"):
        _losses(torch.randn(1, 1200), [5], [3], [0], 1)


def _reference_losses(logits, ce, cb, idx, n, coord_ids):
    """Plain-autograd reference of teacher_forced_losses' loss (per-sample normalisation, unit weights)."""
    from src.losses.coord import coord_loss_terms, weighted_coord_loss

    lse = torch.logsumexp(logits.float(), -1)
    per = torch.zeros(n)
    ce_m, c_m = ce >= 0, cb >= 0
    ce_tok = lse[ce_m] - logits[ce_m].gather(1, ce[ce_m][:, None]).squeeze(1)
    z = logits[c_m][:, coord_ids]
    c_tok = weighted_coord_loss(coord_loss_terms(z, lse[c_m], cb[c_m]))
    for s in range(n):
        a, b = ce_tok[idx[ce_m] == s], c_tok[idx[c_m] == s]
        per[s] = (a.mean() if a.numel() else 0) + (b.mean() if b.numel() else 0)
    return per.sum() / n


@pytest.mark.parametrize("rows", [1, 7, 300, 600])  # 300/600 span several VocabTerms row chunks
def test_vocab_terms_gradients_equal_plain_autograd(rows):
    g = torch.Generator().manual_seed(rows)
    V, n = 1300, 3
    coord_ids = torch.arange(250, 1250)
    logits = (torch.randn(rows, V, generator=g) * 4).requires_grad_(True)
    is_coord = torch.rand(rows, generator=g) < 0.4
    ce = torch.where(is_coord, torch.full((rows,), -100), torch.randint(0, V, (rows,), generator=g))
    cb = torch.where(is_coord, torch.randint(0, 1000, (rows,), generator=g), torch.full((rows,), -1))
    idx = torch.randint(0, n, (rows,), generator=g)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = _reference_losses(ref_logits, ce, cb, idx, n, coord_ids)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    for inp in (logits, logits * 1.0):  # a leaf (fresh gradient buffer) and an intermediate (buffer reused)
        out = teacher_forced_losses(inp, ce, cb, torch.ones(rows, dtype=torch.long), idx, n, coord_ids)
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_vocab_terms_backward_runs_once():
    logits = torch.randn(3, 1200, requires_grad=True)
    out = _losses(logits * 1.0, [5, -100, 7], [-1, 10, -1], [0, 0, 0], 1)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once|modified by an inplace operation"):  # never a silent wrong gradient
        out.loss.backward()
