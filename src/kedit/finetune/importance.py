"""Element importances of the trainable parameters: Synaptic Intelligence, accumulated inside the training loop,
and the diagonal Fisher information of EWC, computed by an extra pass.

Synaptic Intelligence (Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017): at
every optimiser step ``t`` the path integral ``ω_i += −g_i(t) · Δθ_i(t)`` (``g`` the task-loss gradient the step used,
``Δθ`` the step actually taken); at the end ``Ω_i = max(0, ω_i / ((θ_i^end − θ_i^start)² + ξ))``. It costs one copy
and one fused multiply-add per parameter per step, and no extra forward or backward pass.

EWC (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017): ``F_i = E_x[(∂ℓ(x)/∂θ_i)²]``,
the mean over samples of the squared per-sample gradient of the loss, one backward pass per sample.

EWC-LoRA (Zheng et al., "Revisiting Weight Regularization for Low-Rank Continual Learning", ICLR 2026): the Fisher is
estimated in the full-dimensional space of each adapted weight, ``F_W = E_x[(∂ℓ(x)/∂W)²]`` (``[out, in]`` per
adapted matrix), and the penalty pulls the low-rank update ``ΔW = s·B A`` towards the anchor's, not ``A`` and ``B``
one by one (which ignores how they interact). Its state is one full-size Fisher per adapted matrix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Importance", "LoraView", "SIAccumulator", "fisher_diagonal", "fisher_full_space"]


@dataclass
class Importance:
    """Per-element weights of the quadratic penalty and the anchor ``θ*`` they pull towards, by parameter name."""

    weights: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    kind: str  # "si", "ewc" (full-space, EWC-LoRA) or "ewc-ab" (per LoRA factor)
    seconds: float = 0.0  # time spent computing the importances (accumulation or the extra pass)

    def nbytes(self) -> int:
        """Bytes of the state phase 2 needs: the importances and the anchor."""
        return sum(t.numel() * t.element_size() for d in (self.weights, self.anchor) for t in d.values())

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())


class SIAccumulator:
    """Accumulate Synaptic Intelligence around the optimiser steps of a training loop.

    Usage: ``si = SIAccumulator(named_params)``; per step, after ``loss.backward()``: ``si.before_step()``,
    ``optimizer.step()``, ``si.after_step()``; at the end ``si.finish()``. Parameters without ``requires_grad`` (or
    without a gradient at a step) accumulate nothing, so their ``Ω`` is 0.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], *, xi: float = 1e-3) -> None:
        if xi <= 0:
            raise ValueError(f"xi must be > 0 (the damping of Ω's denominator), got {xi}")
        self.xi = float(xi)
        self.params = {n: p for n, p in named_params}
        if not self.params:
            raise ValueError("no parameters to accumulate importances for")
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        self.prev = {n: torch.empty_like(p) for n, p in self.params.items()}
        self.omega = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.grads: dict[str, torch.Tensor] = {}
        self.seconds = 0.0
        self.steps = 0

    @torch.no_grad()
    def before_step(self) -> None:
        t0 = time.perf_counter()
        self.grads = {}
        for n, p in self.params.items():
            if p.requires_grad and p.grad is not None:
                self.prev[n].copy_(p)
                self.grads[n] = p.grad.detach().clone()
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def after_step(self) -> None:
        t0 = time.perf_counter()
        for n, g in self.grads.items():
            step = self.params[n].detach() - self.prev[n]
            self.omega[n].addcmul_(g.float(), step.float(), value=-1.0)
        self.grads = {}
        self.steps += 1
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def finish(self) -> Importance:
        """``Ω = max(0, ω / ((θ_end − θ_start)² + ξ))`` and the anchor ``θ* = θ_end``."""
        t0 = time.perf_counter()
        weights, anchor = {}, {}
        for n, p in self.params.items():
            moved = (p.detach().float() - self.start[n].float()).square_()
            weights[n] = (self.omega[n] / (moved + self.xi)).clamp_(min=0.0)
            anchor[n] = p.detach().clone()
        self.seconds += time.perf_counter() - t0
        return Importance(weights, anchor, "si", seconds=self.seconds)


def fisher_diagonal(
    model: torch.nn.Module,
    named_params: Sequence[tuple[str, torch.Tensor]],
    samples: Sequence[dict[str, torch.Tensor]],
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Importance:
    """Diagonal empirical Fisher ``F_i = mean_x (∂ℓ(x)/∂θ_i)²`` over ``samples`` (one backward pass each), anchored at
    the current values of ``named_params``."""
    if not samples:
        raise ValueError("the Fisher pass needs at least one sample")
    params = dict(named_params)
    t0 = time.perf_counter()
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for i, batch in enumerate(samples):
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n].add_(p.grad.float().square())
        if progress is not None:
            progress(i + 1, len(samples))
    model.zero_grad(set_to_none=True)
    for f in fisher.values():
        f.div_(len(samples))
    anchor = {n: p.detach().clone() for n, p in params.items()}
    return Importance(fisher, anchor, "ewc-ab", seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class LoraView:
    """Where one adapted matrix's LoRA factors live: ``ΔW = scale · B A`` in math orientation ``[out, in]``."""

    a_name: str  # parameter name of ``A`` ([r, in])
    b_name: str  # parameter name of ``B`` ([out, r])
    scale: float
    transposed: bool  # the base weight is stored ``[in, out]`` (GPT-2's Conv1D)

    def delta(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * (params[self.b_name] @ params[self.a_name])


def lora_deltas(views: Mapping[str, LoraView], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module path: ΔW}`` of every adapted matrix (differentiable in ``params``)."""
    return {path: v.delta(params) for path, v in views.items()}


def fisher_full_space(
    model: torch.nn.Module,
    base_weights: Mapping[str, torch.Tensor],
    views: Mapping[str, LoraView],
    params: Mapping[str, torch.Tensor],
    samples: Sequence[dict[str, torch.Tensor]],
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Importance:
    """EWC-LoRA's Fisher: ``F_W = mean_x (∂ℓ(x)/∂W)²`` of every adapted base weight ``W`` (``base_weights``, by module
    path; math orientation ``[out, in]``), one backward pass per sample. The base weights get a gradient only for
    this pass (their ``requires_grad`` is restored). The anchor is the LoRA factors (``params``) at this point, so
    the stored state is the full-size Fisher plus the factors."""
    if not samples:
        raise ValueError("the Fisher pass needs at least one sample")
    missing = sorted(set(views) - set(base_weights))
    if missing:
        raise ValueError(f"no base weight given for adapted module(s) {missing[:3]}")
    t0 = time.perf_counter()
    flags = {p: w.requires_grad for p, w in base_weights.items()}
    fisher = {p: torch.zeros_like(w, dtype=torch.float32) for p, w in base_weights.items()}
    try:
        for w in base_weights.values():
            w.requires_grad_(True)
        for i, batch in enumerate(samples):
            model.zero_grad(set_to_none=True)
            for w in base_weights.values():
                w.grad = None
            loss_fn(model, batch).backward()
            with torch.no_grad():
                for p, w in base_weights.items():
                    if w.grad is not None:
                        fisher[p].add_(w.grad.float().square())
            if progress is not None:
                progress(i + 1, len(samples))
    finally:
        for p, w in base_weights.items():
            w.grad = None
            w.requires_grad_(flags[p])
        model.zero_grad(set_to_none=True)
    weights = {}
    for p, f in fisher.items():
        f.div_(len(samples))
        weights[p] = f.t().contiguous() if views[p].transposed else f
    anchor = {n: t.detach().clone() for n, t in params.items()}
    return Importance(weights, anchor, "ewc", seconds=time.perf_counter() - t0)
