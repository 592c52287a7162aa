"""Negative Preference Optimisation (Zhang, Lin, Bai and Mei, 2024, "Negative Preference Optimization: From
Catastrophic Collapse to Effective Unlearning", arXiv 2404.05868), with the retain NLL term of open-unlearning's
NPO (α = 1)."""

from __future__ import annotations

import torch

from .base import UnlearnTrainer
from .losses import npo_loss, sequence_nll
from .registry import register_unlearn_method


class NPOTrainer(UnlearnTrainer):
    """``L = γ · (2/β) mean log(1 + (π_θ/π_ref)^β) + α · NLL(retain)`` (π: summed answer likelihood)."""

    needs_reference = True
    supports_saturation = True
    uses_retain_term = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = self.part(inputs, "forget")
        out = model(input_ids=ids, attention_mask=mask)
        nll, n = sequence_nll(out.logits, labels)
        with torch.no_grad():
            ref_nll, _ = sequence_nll(self.ref()(input_ids=ids, attention_mask=mask).logits, labels)
        w = self.saturation_mask(inputs, nll / n.clamp_min(1))
        loss = self.ucfg.forget_weight * npo_loss(-nll, -ref_nll, self.ucfg.beta, w)
        loss = loss + self.ucfg.retain_weight * self.retain_nll(model, inputs)
        return (loss, out) if return_outputs else loss


register_unlearn_method(
    "npo",
    NPOTrainer,
    paper="Zhang et al., Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning, "
    "COLM 2024",
    summary="NPO on the forget answers (reference = the original model) plus retain NLL",
    defaults={"beta": 0.1},
)
