"""MemFlex (Tian et al., 2024, "To Forget or Not? Towards Practical Knowledge Unlearning for Large Language
Models", arXiv 2407.01920, the KnowUnDo benchmark): locate the LoRA tensors that carry the unlearn scope and unlearn
only there, so the retention scope is not over-forgotten.

**Localisation** (:func:`localize`). Every unlearn-scope (forget) and retention-scope (retain) item is copied
``memflex_copies`` times with random labels: ``memflex_label_noise`` of its answer tokens (at least one) are replaced
by random vocabulary ids (never a prompt token, never a special id). The answer NLL (mean per item) is averaged
over each set's copies and back-propagated, giving the gradients ``g_unlearn[k]`` and ``g_retain[k]`` of every LoRA
tensor ``k`` (each A and each B matrix). The located region is the whole tensors with
``cos(g_unlearn[k], g_retain[k]) < μ`` (``memflex_cos_threshold``, 0.92) and ``mean|g_unlearn[k]| > σ``
(``memflex_grad_threshold``, 6e-4): the unlearn scope pulls them in a direction of their own, and hard.

**Unlearning** (:class:`MemFlexTrainer`). Only located tensors train; the loss is the mean over the batch's items of
``−0.4 · NLL`` for forget items and ``+2.0 · NLL`` for retain items (the paper's rewritten weights: ``forget_weight``
0.4, ``retain_weight`` 2.0), each item's NLL the mean over its answer tokens; AdamW at lr 3e-4, 2 epochs.

Differences from the paper's run, stated: the paper localises on a LoRA that was first trained to inject the
knowledge (so its B matrices are non-zero); kedit unlearns an already trained model with a fresh LoRA whose B is 0,
so ``∂L/∂A = Bᵀ(·) = 0`` at localisation and no A matrix passes the magnitude test -- the located region is a set of
B matrices over fixed seeded A's. Forget and retain items are paired one to one in each batch (the paper interleaves
them 1:1 and shuffles); the learning rate decays linearly (the paper: cosine, T_max 150).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import UnlearnConfig, UnlearnTrainer, collate
from .losses import sequence_nll
from .registry import register_unlearn_method

__all__ = ["Localization", "MemFlexTrainer", "locate", "localize", "random_label_copies"]

logger = logging.getLogger(__name__)

Encoded = tuple[list[int], list[int]]


def random_label_copies(
    items: Sequence[Encoded],
    *,
    vocab_size: int,
    copies: int,
    noise: float,
    seed: int,
    special_ids: Sequence[int] = (),
) -> list[Encoded]:
    """``copies`` corrupted copies of every encoded ``(input_ids, labels)`` item: ``round(noise · n)`` (at least 1)
    of its ``n`` answer tokens (``labels != -100``) are replaced, in the ids and the labels alike, by random ids
    drawn from ``[0, vocab_size)`` minus ``special_ids``. Prompt tokens are never touched. Deterministic for
    ``seed``."""
    if copies < 1:
        raise ValueError(f"memflex_copies must be ≥ 1, got {copies}")
    if not 0.0 < noise <= 1.0:
        raise ValueError(f"memflex_label_noise must be in (0, 1], got {noise}")
    special = set(special_ids)
    if vocab_size <= len(special):
        raise ValueError("no non-special token id to draw random labels from")
    rng = random.Random(seed * 7919 + 2407)
    out: list[Encoded] = []
    for ids, labels in items:
        answer = [t for t, y in enumerate(labels) if y != -100]
        if not answer:
            raise ValueError("an item without answer tokens cannot get random labels")
        k = max(1, round(noise * len(answer)))
        for _ in range(copies):
            new_ids, new_labels = list(ids), list(labels)
            for t in rng.sample(answer, k):
                r = rng.randrange(vocab_size)
                while r in special:
                    r = rng.randrange(vocab_size)
                new_ids[t] = new_labels[t] = r
            out.append((new_ids, new_labels))
    return out


@dataclass
class Localization:
    """Per LoRA tensor: the gradient cosine between the scopes and the mean |gradient| on the unlearn scope."""

    cosine: dict[str, float]
    magnitude: dict[str, float]
    cos_threshold: float
    grad_threshold: float
    located: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "located": list(self.located),
            "tensors": len(self.cosine),
            "cos_threshold": self.cos_threshold,
            "grad_threshold": self.grad_threshold,
            "cosine": {k: (None if c != c else c) for k, c in self.cosine.items()},  # NaN: a zero gradient
            "magnitude": dict(self.magnitude),
        }


def locate(
    cosine: dict[str, float], magnitude: dict[str, float], cos_threshold: float, grad_threshold: float
) -> list[str]:
    """The tensors with ``cosine < cos_threshold`` and ``magnitude > grad_threshold`` (a NaN cosine -- a zero
    gradient on one side -- is never located), in the order of ``cosine``."""
    return [k for k, c in cosine.items() if c < cos_threshold and magnitude[k] > grad_threshold]


def _lora_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    if not params:
        raise ValueError("MemFlex localises LoRA tensors, and the model has none (train with lora=True)")
    return params


def _mean_gradient(
    model: Any, params: dict[str, torch.nn.Parameter], items: list[Encoded], pad: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """The gradient of the mean (over items) of the per-item mean answer NLL, for each tensor in ``params``."""
    from kedit.core.batching import device_of

    device = device_of(model)
    for p in params.values():
        p.grad = None
    fn = collate(pad)
    for b in range(0, len(items), batch_size):
        batch = fn([{"forget": x} for x in items[b : b + batch_size]])
        ids, mask, labels = (batch[f"forget_{k}"].to(device) for k in ("input_ids", "attention_mask", "labels"))
        nll, n = sequence_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
        ((nll / n.clamp_min(1)).sum() / len(items)).backward()
    grads = {}
    for name, p in params.items():
        grads[name] = (p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
        p.grad = None
    return grads


def localize(model: Any, tok: Any, data: Any, cfg: UnlearnConfig) -> Localization:
    """MemFlex's localisation on ``model`` (a peft model with LoRA adapters) over ``data``
    (:class:`~kedit.unlearn.methods.base.ForgetRetainData`): gradients on random-label copies of the forget
    (unlearn scope) and retain (retention scope) items, then the thresholds. The model's weights are not changed;
    its train/eval mode and gradient flags are restored."""
    from kedit.core.batching import pad_id

    if not data.retain:
        raise ValueError("MemFlex needs retention-scope (retain) items to localise against")
    params = _lora_parameters(model)
    vocab = len(tok)
    special = [i for i in tok.all_special_ids if i is not None]
    kw = {"vocab_size": vocab, "copies": cfg.memflex_copies, "noise": cfg.memflex_label_noise, "special_ids": special}
    forget = random_label_copies(data.forget, seed=cfg.seed, **kw)
    retain = random_label_copies(data.retain, seed=cfg.seed + 1, **kw)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    try:
        model.eval()  # no dropout: the localisation is a function of the weights, the data and the seed
        for n, p in model.named_parameters():
            p.requires_grad_(n in params)
        g_u = _mean_gradient(model, params, forget, pad_id(tok), cfg.batch_size)
        g_r = _mean_gradient(model, params, retain, pad_id(tok), cfg.batch_size)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    cosine, magnitude = {}, {}
    for name in params:
        u, r = g_u[name].flatten().double(), g_r[name].flatten().double()
        nu, nr = float(u.norm()), float(r.norm())
        cosine[name] = float(u @ r) / (nu * nr) if nu > 0 and nr > 0 else float("nan")
        magnitude[name] = float(u.abs().mean())
    loc = Localization(cosine, magnitude, cfg.memflex_cos_threshold, cfg.memflex_grad_threshold)
    loc.located = locate(cosine, magnitude, loc.cos_threshold, loc.grad_threshold)
    logger.info("MemFlex located %d of %d LoRA tensors", len(loc.located), len(params))
    return loc


class MemFlexTrainer(UnlearnTrainer):
    """``L = mean over the batch's items of (−γ · NLL_forget_i, +α · NLL_retain_j)`` on the located LoRA tensors
    only (γ = 0.4, α = 2.0); :meth:`prepare` localises and freezes the rest before training."""

    @staticmethod
    def prepare(model: Any, tok: Any, data: Any, cfg: UnlearnConfig) -> dict[str, Any]:
        loc = localize(model, tok, data, cfg)
        if not loc.located:
            mags = [m for m in loc.magnitude.values() if m > 0]
            cos = [c for c in loc.cosine.values() if c == c]
            raise ValueError(
                f"MemFlex located no LoRA tensor (cos < {loc.cos_threshold} and mean|g| > {loc.grad_threshold}); "
                f"this model's mean|g| spans {min(mags, default=0):.3g}..{max(mags, default=0):.3g} and its cosines "
                f"{min(cos, default=float('nan')):.3g}..{max(cos, default=float('nan')):.3g}: adjust "
                "memflex_grad_threshold / memflex_cos_threshold"
            )
        located = set(loc.located)
        for n, p in model.named_parameters():
            p.requires_grad_(n in located)
        return loc.to_dict()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = self.part(inputs, "forget")
        out = model(input_ids=ids, attention_mask=mask)
        nll, n = sequence_nll(out.logits, labels)
        total = -self.ucfg.forget_weight * (nll / n.clamp_min(1)).sum()
        count = ids.shape[0]
        r = self.part(inputs, "retain")
        if r is not None and self.ucfg.retain_weight:
            rids, rmask, rlabels = r
            rnll, rn = sequence_nll(model(input_ids=rids, attention_mask=rmask).logits, rlabels)
            total = total + self.ucfg.retain_weight * (rnll / rn.clamp_min(1)).sum()
            count += rids.shape[0]
        loss = total / count
        return (loss, out) if return_outputs else loss


register_unlearn_method(
    "memflex",
    MemFlexTrainer,
    paper="Tian et al., To Forget or Not? Towards Practical Knowledge Unlearning for Large Language Models "
    "(KnowUnDo / MemFlex), arXiv 2407.01920",
    summary="localise LoRA tensors by gradient cosine / magnitude on random-label copies, then unlearn only there",
    defaults={"lora": True, "forget_weight": 0.4, "retain_weight": 2.0, "lr": 3e-4, "epochs": 2.0},
)
