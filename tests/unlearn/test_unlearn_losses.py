"""Invariants of the unlearning losses (SYSTEMS.md §3): the RKLD teacher, the reverse KL and its closed-form
gradient, NPO's value at the reference and its gradient-ascent limit, SimNPO's sign."""

from __future__ import annotations

import pytest
import torch

from kedit.unlearn.methods.losses import (
    npo_loss,
    reverse_kl,
    rkld_teacher_logits,
    sequence_nll,
    simnpo_loss,
    token_mean_nll,
)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_teacher_is_the_original_when_strengthening_changes_nothing():
    z0 = torch.randn(2, 5, 11, generator=_g(0))
    zt = rkld_teacher_logits(z0, z0.clone(), alpha=5.0)
    assert torch.equal(zt, z0)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert float(reverse_kl(z0, zt, mask)) == pytest.approx(0.0, abs=1e-6)  # loss 0 at θ = θ0


def test_teacher_leaves_falling_logits_and_pushes_rising_ones_down():
    z0 = torch.randn(4, 9, generator=_g(1))
    zs = z0 + torch.randn(4, 9, generator=_g(2))
    zt = rkld_teacher_logits(z0, zs, alpha=2.0)
    fell = zs <= z0
    assert torch.equal(zt[fell], z0[fell])
    assert torch.allclose(zt[~fell], (z0 - 2.0 * (zs - z0))[~fell])
    assert bool((zt[~fell] < z0[~fell]).all())
    with pytest.raises(ValueError):
        rkld_teacher_logits(z0, zs, alpha=-1.0)


def test_reverse_kl_gradient_matches_autograd_of_the_explicit_formula():
    z = torch.randn(3, 4, 13, generator=_g(3), dtype=torch.float64)
    zt = torch.randn(3, 4, 13, generator=_g(4), dtype=torch.float64)
    mask = torch.rand(3, 4, generator=_g(5)) > 0.3
    a = z.clone().requires_grad_(True)
    loss = reverse_kl(a, zt, mask)
    loss.backward()
    b = z.clone().requires_grad_(True)
    p = torch.softmax(b, -1)
    q = torch.softmax(zt, -1)
    kl = (p * (torch.log(p) - torch.log(q))).sum(-1)
    m = mask.to(kl.dtype)
    explicit = (kl * m).sum() / m.sum()
    explicit.backward()
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad.to(a.grad.dtype), atol=1e-6)
    assert loss.item() >= 0.0
    # the teacher gets no gradient
    t = zt.clone().requires_grad_(True)
    reverse_kl(z.clone().requires_grad_(True), t, mask).backward()
    assert t.grad is None


def test_npo_value_at_reference_and_gradient_ascent_limit():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 17, requires_grad=True)
    labels = torch.randint(0, 17, (3, 6))
    labels[:, :2] = -100  # prompt
    nll, n = sequence_nll(logits, labels)
    ref = (-nll).detach()
    beta = 0.1
    assert float(npo_loss(-nll, ref, beta).detach()) == pytest.approx(2 / beta * torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    # β → 0: ∇ NPO → ∇ mean log π_θ (gradient ascent on the sequence likelihood, i.e. ∇ of −mean NLL_seq)
    shifted = ref - 3.0  # away from the reference, so the limit is not trivially at σ(0)
    g_npo = torch.autograd.grad(npo_loss(-nll, shifted, 1e-4), logits, retain_graph=True)[0]
    g_ga = torch.autograd.grad((-nll).mean(), logits, retain_graph=True)[0]
    assert torch.allclose(g_npo, g_ga, atol=1e-4)
    g_big = torch.autograd.grad(npo_loss(-nll, shifted, 5.0), logits, retain_graph=True)[0]
    assert not torch.allclose(g_big, g_ga, atol=1e-3)  # for large β NPO weights sequences differently
    with pytest.raises(ValueError):
        npo_loss(-nll, ref, 0.0)


def test_simnpo_decreases_as_forget_nll_grows_and_nll_helpers_agree():
    a = simnpo_loss(torch.tensor([0.5, 0.5]), beta=4.5)
    b = simnpo_loss(torch.tensor([2.0, 2.0]), beta=4.5)
    assert float(b) < float(a)
    logits = torch.randn(2, 5, 7, generator=_g(6))
    labels = torch.randint(0, 7, (2, 5), generator=_g(7))
    labels[0, :3] = -100
    nll, n = sequence_nll(logits, labels)
    assert float(token_mean_nll(logits, labels)) == pytest.approx(float(nll.sum() / n.sum()))
    assert n.tolist() == [2, 4]  # labels 3, 4 of row 0; position 0 of row 1 is never predicted
