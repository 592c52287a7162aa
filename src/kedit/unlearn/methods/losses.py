"""Loss functions of the unlearning methods, as plain tensor functions (unit-tested on their own).

All sequence losses read answer tokens only: ``labels`` holds ``-100`` on the prompt and padding (the
"answer-only NLL with −100 masking" of the design notes); position ``t`` of the logits predicts ``labels[t+1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "answer_token_logprobs",
    "npo_loss",
    "reverse_kl",
    "rkld_teacher_logits",
    "sequence_nll",
    "simnpo_loss",
    "token_mean_nll",
]


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    mask = lb != -100
    return lg, lb.clamp_min(0), mask


def answer_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(label_t) [B, T-1], mask [B, T-1])`` at the answer positions (0 elsewhere)."""
    lg, lb, mask = _shift(logits, labels)
    lp = torch.log_softmax(lg, dim=-1).gather(2, lb[..., None]).squeeze(2)
    return lp * mask, mask


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (Σ answer-token NLL [B], number of answer tokens [B])."""
    lp, mask = answer_token_logprobs(logits, labels)
    return -lp.sum(1), mask.sum(1)


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (what ``model(labels=...).loss`` computes)."""
    nll, n = sequence_nll(logits, labels)
    return nll.sum() / n.sum().clamp_min(1)


def _masked_mean(v: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``mean(v)``, or ``Σ w·v / len(v)`` with per-item weights (a saturated item adds 0, the batch size stays)."""
    return v.mean() if weights is None else (v * weights).sum() / v.numel()


def npo_loss(
    logp_theta: torch.Tensor, logp_ref: torch.Tensor, beta: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative Preference Optimisation (Zhang et al., 2024, arXiv 2404.05868):
    ``(2/β) · mean log(1 + (π_θ/π_ref)^β) = −(2/β) · mean log σ(−β · log(π_θ/π_ref))`` over sequences, where
    ``log π`` is the summed answer log-likelihood.

    At θ = θ_ref it equals ``(2/β) log 2``; as β → 0 its gradient tends to ``mean ∇ log π_θ`` (gradient ascent on
    the sequence likelihood), because ``∂/∂r (2/β) log(1 + e^{βr}) = 2σ(βr) → 1``. ``weights`` (per sequence,
    e.g. a saturation mask) scale each sequence's term; the mean stays over all sequences.
    """
    if beta <= 0:
        raise ValueError(f"NPO needs beta > 0, got {beta}")
    log_ratio = logp_theta - logp_ref.detach()
    return -(2.0 / beta) * _masked_mean(F.logsigmoid(-beta * log_ratio), weights)


def simnpo_loss(
    mean_nll: torch.Tensor, beta: float, delta: float = 0.0, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """SimNPO (Fan et al., 2024, arXiv 2410.07163): the reference-free, length-normalised NPO,
    ``−(2/β) · mean log σ(β · (NLL_θ/|y| − δ))`` (``weights`` as in :func:`npo_loss`)."""
    if beta <= 0:
        raise ValueError(f"SimNPO needs beta > 0, got {beta}")
    return -(2.0 / beta) * _masked_mean(F.logsigmoid(beta * (mean_nll - delta)), weights)


def rkld_teacher_logits(z0: torch.Tensor, zs: torch.Tensor, alpha: float) -> torch.Tensor:
    """The unlearning teacher of RKLD (Wang et al., 2024, arXiv 2406.01983), in the "Who's Harry Potter" form
    (Eldan & Russinovich, 2023): ``z_T = z_0 − α · ReLU(z_S − z_0)``. Logits that rise when the model is
    strengthened on the forget set are pushed down; the others stay the original's."""
    if alpha < 0:
        raise ValueError(f"RKLD needs alpha ≥ 0, got {alpha}")
    return z0 - alpha * torch.relu(zs - z0)


class _ReverseKL(torch.autograd.Function):
    """Row-wise ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` with ``p = softmax(z)`` and a fixed ``log q``; the
    gradient is the closed form ``∂KL/∂z_v = p_v (log p_v − log q_v − KL)`` (no graph through the softmax)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        log_p = torch.log_softmax(z.float(), dim=-1)
        p = log_p.exp()
        diff = log_p - log_q.float()
        kl = (p * diff).sum(-1)
        ctx.save_for_backward(p, diff, kl)
        ctx.in_dtype = z.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        p, diff, kl = ctx.saved_tensors
        g = p * (diff - kl[..., None]) * grad_out[..., None]
        return g.to(ctx.in_dtype), None


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions in ``mask`` of ``KL(p_student ‖ p_teacher)``; the teacher is detached."""
    log_q = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    kl = _ReverseKL.apply(student_logits, log_q)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)
